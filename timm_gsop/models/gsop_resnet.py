"""GSoP-Net: ResNets with global second-order pooling blocks (Gao et al., CVPR 2019).

GSoP-Net1 puts a GSoP block after ``bn3`` of the last bottleneck of each of the four stages and
pools by global average. GSoP-Net2 has blocks in the first three stages only and pools by iSQRT-COV
(matrix square root of a 256-d covariance, 32,896 values) before the classifier.

As in the official code (ZilinGao/Global-Second-order-Pooling-Convolutional-Networks) the last
stage keeps stride 1 without dilation: 14x14 features at 224 px. Parameter names follow timm's
ResNet; ``checkpoint_filter_fn`` (``_checkpoint.py``) converts checkpoints of the official code.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerType, get_act_layer, get_norm_layer
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import downsample_conv

from ._base import GSoPNet, check_input_size, make_blocks
from ._checkpoint import create_gsop_model

__all__ = ['GSoPResNet', 'GSoPBottleneck']


class GSoPBottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3) with an optional attention layer after bn3.

    The attention layer gets the shortcut too, so that its scale and the residual add are one pass
    over the map, unless stochastic depth has to drop the scaled branch alone.
    """
    expansion = 4

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
        self.attn = attn_layer(outplanes, **dd) if attn_layer is not None else None
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0. else None

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        if self.attn is not None and self.drop_path is None:
            if isinstance(self.act3, nn.ReLU):  # the attention layer's one pass ends in the block's ReLU
                return self.attn(x, shortcut, True)
            x = self.attn(x, shortcut)
        else:
            if self.attn is not None:
                x = self.attn(x)
            if self.drop_path is not None:
                x = self.drop_path(x)
            x = x + shortcut
        return self.act3(x)


class GSoPResNet(GSoPNet):
    """GSoP-Net on a ResNet (bottleneck) backbone.

    Args:
        layers: bottlenecks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        num_classes: classifier outputs (0 for none).
        in_chans: input image channels.
        attn_mode: GSoP block mode: 'channel' (default), 'position', 'fusion_avg', 'fusion_max',
            'fusion_concat'; 'none' or None for the same backbone without GSoP blocks.
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

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            num_classes: int = 1000,
            in_chans: int = 3,
            attn_mode: Optional[str] = 'channel',
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
            num_stages=4, layers=layers, num_classes=num_classes, in_chans=in_chans, attn_mode=attn_mode,
            attn_dim=attn_dim, attn_stages=attn_stages, global_pool=global_pool, cov_dim=cov_dim,
            sqrt_iters=sqrt_iters, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            zero_init_last=zero_init_last, min_input_size=min_input_size)
        if last_stride not in (1, 2) or isinstance(last_stride, bool):
            raise ValueError(f'last_stride must be 1 or 2, got {last_stride!r}')
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = norm_layer(64, **dd)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module='act1')]

        stages, stage_info = make_blocks(
            block_fn=GSoPBottleneck,
            channels=(64, 128, 256, 512),
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

        self.num_features = stage_info[-1]['num_chs']
        self.init_head(global_pool, **dd)
        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Forward that also returns feature maps: the stem (index 0) and the 4 stages (1-4)."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        x = check_input_size(x, self.min_input_size)
        intermediates = []
        take_indices, max_index = feature_take_indices(5, indices)
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if stop_early:
            stages = stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(5, indices)
        for i in range(max_index, 4):
            setattr(self, f'layer{i + 1}', nn.Sequential())
        if max_index == 0:
            self.maxpool = nn.Identity()
        if max_index < 4:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.reset_classifier(0, '')
        elif prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        x = check_input_size(x, self.min_input_size)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


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


# No weights are published yet: the tags name architectures only (no url / hf_hub_id).
default_cfgs = generate_default_cfgs({
    'gsop_resnet50': _cfg(),
    'gsop_resnet101': _cfg(),
    'gsop2_resnet50': _cfg(),
    'gsop2_resnet101': _cfg(),
})

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
