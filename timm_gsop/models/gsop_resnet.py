"""GSoP-Net: ResNets with global second-order pooling blocks (Gao et al., CVPR 2019).

GSoP-Net1 puts a GSoP block after ``bn3`` of the last bottleneck of each of the four stages and
pools by global average. GSoP-Net2 has blocks in the first three stages only and pools by iSQRT-COV
(matrix square root of a 256-d covariance, 32,896 values) before the classifier.

As in the official code (ZilinGao/Global-Second-order-Pooling-Convolutional-Networks) the last
stage keeps stride 1 without dilation: 14x14 features at 224 px. Parameter names follow timm's
ResNet; ``checkpoint_filter_fn`` converts checkpoints of the official code.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, create_classifier, register_notrace_function
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers import GSoPAttn, IsqrtCovPool, resolve_attn_mode
from ._checkpoint import _official_keys_pre_hook, create_gsop_model

__all__ = ['GSoPResNet', 'GSoPBottleneck']


@register_notrace_function
def check_input_size(x: Tensor, min_size: int) -> Tensor:
    """Returns ``x`` (so fx keeps the check in its graph) or raises for a too small image."""
    if x.shape[-1] < min_size or x.shape[-2] < min_size:
        raise ValueError(
            f'Input of {x.shape[-2]}x{x.shape[-1]} px is smaller than this model accepts: '
            f'height and width must be at least {min_size} px.')
    return x


class GSoPBottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3) with an optional attention layer after bn3.

    The attention layer gets the shortcut too, so that its scale and the residual add are one pass.
    """
    expansion = 4

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            attn_layer: Optional[Any] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            drop_path: float = 0.,
    ):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.act2 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, outplanes, kernel_size=1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.attn = attn_layer(outplanes) if attn_layer is not None else None
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
        if self.drop_path is not None:
            if self.attn is not None:
                x = self.attn(x)
            x = self.drop_path(x) + shortcut
        elif self.attn is not None:
            x = self.attn(x, shortcut)
        else:
            x = x + shortcut
        return self.act3(x)


def _make_stage(
        inplanes: int,
        planes: int,
        depth: int,
        stride: int,
        attn_layer: Optional[Any],
        drop_path_rates: List[float],
        **block_kwargs,
) -> Tuple[nn.Sequential, int]:
    outplanes = planes * GSoPBottleneck.expansion
    downsample = None
    if stride != 1 or inplanes != outplanes:
        norm_layer = block_kwargs.get('norm_layer', nn.BatchNorm2d)
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
            norm_layer(outplanes),
        )
    blocks = []
    for i in range(depth):
        blocks.append(GSoPBottleneck(
            inplanes if i == 0 else outplanes,
            planes,
            stride=stride if i == 0 else 1,
            downsample=downsample if i == 0 else None,
            attn_layer=attn_layer if i == depth - 1 else None,  # GSoP only in a stage's last block
            drop_path=drop_path_rates[i],
            **block_kwargs,
        ))
    return nn.Sequential(*blocks), outplanes


class GSoPResNet(nn.Module):
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
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            num_classes: int = 1000,
            in_chans: int = 3,
            attn_mode: Optional[str] = 'channel',
            attn_dim: int = 128,
            attn_stages: Tuple[bool, ...] = (True, True, True, True),
            last_stride: int = 1,
            global_pool: str = 'avg',
            cov_dim: int = 256,
            sqrt_iters: int = 3,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = False,
            min_input_size: int = 64,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        attn_mode = self._init_common(
            4, layers, attn_mode, attn_dim, attn_stages, num_classes, drop_rate, cov_dim, sqrt_iters, min_input_size)
        if last_stride not in (1, 2):
            raise ValueError(f'last_stride must be 1 or 2, got {last_stride}')

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module='act1')]
        # The first stage's 56x56 map is reduced with stride 2 in the GSoP block, as in the official code.
        inplanes = self._add_stages(
            _make_stage, 64, 4, layers, (64, 128, 256, 512), (1, 2, 2, last_stride), (2, 1, 1, 1),
            attn_mode, attn_dim, attn_stages, drop_path_rate, act_layer, norm_layer)

        self.num_features = inplanes
        self.global_pool, self.fc = self._create_head(global_pool, num_classes)

        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, GSoPBottleneck):
                    m.zero_init_last()
        # Official GSoP checkpoints also load through plain load_state_dict (checkpoint_path=, train.py).
        self.register_load_state_dict_pre_hook(_official_keys_pre_hook)

    def _init_common(
            self, num_stages: int, layers: Tuple[int, ...], attn_mode: Optional[str], attn_dim: int,
            attn_stages: Tuple[bool, ...], num_classes: int, drop_rate: float, cov_dim: int, sqrt_iters: int,
            min_input_size: int,
    ) -> Optional[str]:
        """The argument checks and attributes every GSoP-Net shares; returns the resolved attn_mode."""
        attn_mode = resolve_attn_mode(attn_mode)
        if not isinstance(attn_dim, int) or attn_dim <= 0:
            raise ValueError(f'attn_dim must be a positive integer, got {attn_dim!r}')
        if len(layers) != num_stages or len(attn_stages) != num_stages:
            raise ValueError(f'layers and attn_stages need {num_stages} entries, got {layers} and {attn_stages}')
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.attn_mode = attn_mode or 'none'
        self.cov_dim = cov_dim
        self.sqrt_iters = sqrt_iters
        self.min_input_size = min_input_size
        self.grad_checkpointing = False
        return attn_mode

    def _add_stages(
            self, make_stage: Callable[..., Tuple[nn.Sequential, int]], inplanes: int, reduction: int,
            layers: Tuple[int, ...], widths: Tuple[int, ...], strides: Tuple[int, ...],
            reduce_strides: Tuple[int, ...], attn_mode: Optional[str], attn_dim: int, attn_stages: Tuple[bool, ...],
            drop_path_rate: float, act_layer: Type[nn.Module], norm_layer: Type[nn.Module],
    ) -> int:
        """Add the stages ``layer1``... and their feature_info; returns the last stage's channels.

        A stage chosen by ``attn_stages`` gets a GSoP block (with ``reduce_strides[i]``) in its last block.
        """
        block_dpr = torch.linspace(0, drop_path_rate, sum(layers)).tolist()
        offset = 0
        for i, (depth, width, stride) in enumerate(zip(layers, widths, strides)):
            reduction *= stride
            attn_layer = None
            if attn_mode is not None and attn_stages[i]:
                attn_layer = partial(
                    GSoPAttn, attn_mode=attn_mode, attn_dim=attn_dim, reduce_stride=reduce_strides[i],
                    act_layer=act_layer, norm_layer=norm_layer)
            stage, inplanes = make_stage(
                inplanes, width, depth, stride, attn_layer, block_dpr[offset:offset + depth],
                act_layer=act_layer, norm_layer=norm_layer)
            offset += depth
            self.add_module(f'layer{i + 1}', stage)
            self.feature_info.append(dict(num_chs=inplanes, reduction=reduction, module=f'layer{i + 1}'))
        return inplanes

    def _create_head(self, global_pool: str, num_classes: int) -> Tuple[nn.Module, nn.Module]:
        if global_pool == 'isqrt':
            pool = IsqrtCovPool(self.num_features, cov_dim=self.cov_dim, num_iter=self.sqrt_iters)
            self.head_hidden_size = pool.out_features
            fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
            return pool, fc
        pool, fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * pool.feat_mult()
        return pool, fc

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier; an iSQRT-COV pool keeps its trained weights unless ``global_pool`` changes it."""
        self.num_classes = num_classes
        if global_pool is None or global_pool == self.global_pool.pool_type:
            if isinstance(self.global_pool, IsqrtCovPool):
                self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
                return
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = self._create_head(global_pool, num_classes)

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

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

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
        'license': 'mit',
        **kwargs,
    }


# No weights are published yet: the tags name architectures only (no url / hf_hub_id).
default_cfgs = generate_default_cfgs({
    'gsop_resnet50': _cfg(),
    'gsop_resnet101': _cfg(),
    'gsop2_resnet50': _cfg(),
    'gsop2_resnet101': _cfg(),
})

_NET1 = dict(attn_stages=(True, True, True, True), global_pool='avg')
_NET2 = dict(attn_stages=(True, True, True, False), global_pool='isqrt')


@register_model
def gsop_resnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net1 ResNet-50: a GSoP block in every stage, average pooling (28.29M parameters)."""
    return _create_gsop_resnet('gsop_resnet50', pretrained, **dict(dict(layers=(3, 4, 6, 3), **_NET1), **kwargs))


@register_model
def gsop_resnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net1 ResNet-101: a GSoP block in every stage, average pooling."""
    return _create_gsop_resnet('gsop_resnet101', pretrained, **dict(dict(layers=(3, 4, 23, 3), **_NET1), **kwargs))


@register_model
def gsop2_resnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net2 ResNet-50: GSoP blocks in stages 1-3, iSQRT-COV pooling (58.28M parameters)."""
    return _create_gsop_resnet('gsop2_resnet50', pretrained, **dict(dict(layers=(3, 4, 6, 3), **_NET2), **kwargs))


@register_model
def gsop2_resnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net2 ResNet-101: GSoP blocks in stages 1-3, iSQRT-COV pooling."""
    return _create_gsop_resnet('gsop2_resnet101', pretrained, **dict(dict(layers=(3, 4, 23, 3), **_NET2), **kwargs))
