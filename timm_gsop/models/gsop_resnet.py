"""GSoP-Net: ResNets with global second-order pooling blocks (Gao et al., CVPR 2019).

GSoP-Net1 puts a GSoP block after ``bn3`` of the last bottleneck of each of the four stages and
pools by global average. GSoP-Net2 has blocks in the first three stages only and pools by iSQRT-COV
(matrix square root of a 256-d covariance, 32,896 values) before the classifier.

As in the official code (ZilinGao/Global-Second-order-Pooling-Convolutional-Networks) the last
stage keeps stride 1 without dilation: 14x14 features at 224 px. Parameter names follow timm's
ResNet; ``checkpoint_filter_fn`` (``_checkpoint.py``) converts checkpoints of the official code.
"""
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerType, get_act_layer, get_norm_layer
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.resnet import downsample_conv

from ._base import GSoPBottleneckBase, GSoPNet, create_gsop_model, make_blocks, resolve_layer
from ._checkpoint import BACKBONE_TAG_SUFFIX

__all__ = ['GSoPResNet', 'GSoPBottleneck']


class GSoPBottleneck(GSoPBottleneckBase):
    """ResNet v1.5 bottleneck (stride on the 3x3) with an optional attention layer after bn3."""

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            attn_layer: Optional[Callable[..., nn.Module]] = None,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(planes, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = norm_layer(planes, **dd)
        self.act2 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.init_residual(outplanes, downsample, attn_layer, drop_path, **dd)
        self.act3 = act_layer(inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        if self.attn is not None and self.drop_path is None and isinstance(self.act3, nn.ReLU):
            return self.attn(x, shortcut, True)  # the attention layer's one pass ends in the block's ReLU
        return self.act3(self.add_shortcut(x, shortcut))


class GSoPResNet(GSoPNet):
    """GSoP-Net on a ResNet (bottleneck) backbone.

    Args:
        layers: bottlenecks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        num_classes: classifier outputs (0 for none).
        in_chans: input image channels.
        attn_mode: GSoP block mode: 'channel' (default), 'position', 'fusion_avg', 'fusion_max',
            'fusion_concat'; 'none' for the same backbone without GSoP blocks.
        attn_dim: channels of the GSoP block's reduced copy (128).
        attn_stages: which of the 4 stages end with a GSoP block (Net1: all, Net2: the first three).
        last_stride: stride of the last stage: 1 as in the official code (14x14 at 224 px), 2 for
            a standard ResNet layout.
        global_pool: 'avg' (Net1) or 'isqrt' (Net2: iSQRT-COV pooling), any timm pool type, or ''.
        cov_dim: covariance size of the iSQRT-COV pool (256).
        sqrt_iters: Newton-Schulz iterations of the iSQRT-COV pool (3).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        zero_init_last: zero-init each block's last BN weight (timm's default for ResNets; the
            official GSoP code does not).
        min_input_size: smallest accepted height/width in pixels.
        act_layer, norm_layer: classes or timm's names ('relu', 'silu', 'batchnorm', ...), for the
            backbone and the GSoP blocks (the iSQRT-COV pool keeps BN + ReLU).
    """
    channels = (64, 128, 256, 512)

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            num_classes: int = 1000,
            in_chans: int = 3,
            attn_mode: str = 'channel',
            attn_dim: Optional[int] = None,
            attn_stages: Tuple[bool, ...] = (True, True, True, True),
            last_stride: int = 1,
            global_pool: str = 'avg',
            cov_dim: Optional[int] = None,
            sqrt_iters: Optional[int] = None,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = False,
            min_input_size: int = 64,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(
            layers=layers, num_classes=num_classes, in_chans=in_chans, attn_mode=attn_mode,
            attn_dim=attn_dim, attn_stages=attn_stages, global_pool=global_pool, cov_dim=cov_dim,
            sqrt_iters=sqrt_iters, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            zero_init_last=zero_init_last, min_input_size=min_input_size)
        if last_stride not in (1, 2) or not isinstance(last_stride, int) or isinstance(last_stride, bool):
            raise ValueError(f'last_stride must be 1 or 2, got {last_stride!r}')
        act_layer = resolve_layer('act_layer', act_layer, get_act_layer, '_ACT_LAYER_DEFAULT')
        norm_layer = resolve_layer('norm_layer', norm_layer, get_norm_layer, '_NORM_MAP')

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = norm_layer(64, **dd)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module='act1')]

        stages, stage_info = make_blocks(
            block_fn=GSoPBottleneck,
            channels=self.channels,
            block_repeats=layers,
            strides=(1, 2, 2, last_stride),
            inplanes=64,
            reduction=4,
            downsample_layer=partial(downsample_conv, kernel_size=1, norm_layer=norm_layer),
            # The first stage's 56x56 map is reduced with stride 2 in its GSoP block, as in the official code.
            attn_layers=self.attn_layers(attn_stages, (2, 1, 1, 1), act_layer=act_layer, norm_layer=norm_layer),
            drop_path_rate=drop_path_rate,
            act_layer=act_layer,
            norm_layer=norm_layer,
            **dd,
        )
        for stage in stages:
            self.add_module(*stage)
        self.feature_info.extend(stage_info)
        self.norm, self.act = nn.Identity(), nn.Identity()  # a post-activation ResNet has no final norm

        self.num_features = stage_info[-1]['num_chs']
        self.init_head(global_pool, **dd)
        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.act1(self.bn1(self.conv1(x)))


def _create_gsop_resnet(variant: str, pretrained: bool = False, **kwargs) -> GSoPResNet:
    return create_gsop_model(GSoPResNet, variant, pretrained, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14), 'min_input_size': (3, 64, 64),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:1811.12006', 'paper_name': 'Global Second-order Pooling Convolutional Networks',
        'origin_url': 'https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks',
        **kwargs,
    }


def _backbone_cfg(source: str) -> Dict[str, Any]:
    """A warm-start tag: the weights and preprocessing of timm's ResNet ``source`` ('resnet50.a1_in1k').
    Its backbone (and GSoP-Net1's classifier) load, the GSoP blocks keep the model's initialisation
    (``checkpoint_filter_fn``). The registry has the source's cfg: ``import timm`` registers its ResNets."""
    src = get_pretrained_cfg(source)
    size = src.input_size
    return _cfg(
        hf_hub_id=src.hf_hub_id, url=src.url, license=src.license,
        input_size=size, pool_size=(size[1] // 16, size[2] // 16),  # output stride 16: the stride-1 last stage
        test_input_size=src.test_input_size, crop_pct=src.crop_pct, test_crop_pct=src.test_crop_pct,
        crop_mode=src.crop_mode, interpolation=src.interpolation, mean=src.mean, std=src.std,
        notes=(f'backbone pretrained: the weights of timm {source} ({src.hf_hub_id}); GSoP blocks untrained',))


# No GSoP-Net weights are published: the untagged names are architectures only, and the *_backbone tags
# warm-start one from the ImageNet weights of a timm ResNet of the same depth.
_SOURCES = {'resnet50': ('a1_in1k', 'tv2_in1k'), 'resnet101': ('a1h_in1k',)}
default_cfgs = generate_default_cfgs({
    **{name: _cfg() for name in ('gsop_resnet50', 'gsop_resnet101', 'gsop2_resnet50', 'gsop2_resnet101')},
    **{f'{net}_{depth}.{tag}{BACKBONE_TAG_SUFFIX}': _backbone_cfg(f'{depth}.{tag}')
       for net in ('gsop', 'gsop2') for depth, tags in _SOURCES.items() for tag in tags},
})
for _default in default_cfgs.values():  # timm makes the first tag with weights the default: keep the untagged
    _default.tags.remove('')           # one, so that a partial load happens only where a backbone tag is named
    _default.tags.appendleft('')

_NET1 = dict(attn_stages=(True, True, True, True), global_pool='avg')  # a GSoP block in every stage
_NET2 = dict(attn_stages=(True, True, True, False), global_pool='isqrt')  # the head replaces stage 4's


@register_model
def gsop_resnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net1 ResNet-50: a GSoP block in every stage, average pooling (28.29M parameters)."""
    model_args = dict(layers=(3, 4, 6, 3), **_NET1)
    return _create_gsop_resnet('gsop_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def gsop_resnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net1 ResNet-101: a GSoP block in every stage, average pooling."""
    model_args = dict(layers=(3, 4, 23, 3), **_NET1)
    return _create_gsop_resnet('gsop_resnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def gsop2_resnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net2 ResNet-50: GSoP blocks in stages 1-3, iSQRT-COV pooling (58.28M parameters)."""
    model_args = dict(layers=(3, 4, 6, 3), **_NET2)
    return _create_gsop_resnet('gsop2_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def gsop2_resnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net2 ResNet-101: GSoP blocks in stages 1-3, iSQRT-COV pooling."""
    model_args = dict(layers=(3, 4, 23, 3), **_NET2)
    return _create_gsop_resnet('gsop2_resnet101', pretrained, **dict(model_args, **kwargs))
