"""GSoP-Net on the pre-activation ResNet-164 for CIFAR (32x32 images).

The paper (Gao et al., CVPR 2019) reports CIFAR-100 top-1 error with ResNet-164: GSoP-Net1 20.86,
GSoP-Net2 18.58. The official code has no CIFAR models, so this network is built from the paper's
description and the ImageNet design (``gsop_resnet.py``):

* Backbone: pre-activation bottleneck ResNet-164 (He et al., "Identity Mappings in Deep Residual
  Networks", 2016): a 3x3 stem conv to 16 channels, 3 stages of 18 bottlenecks
  (BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1) with output widths 64/128/256 (bottleneck
  widths 16/32/64) and strides 1/2/2, no max-pool, a final BN-ReLU: 32x32 input -> 8x8 features.
  A stage's first block takes its projection shortcut from the pre-activated input (as timm's
  ``PreActBottleneck``).
* GSoP blocks: one on the residual branch of each stage's last block, before the add (Net1: all
  3 stages; Net2: stages 1-2, the last stage's GSoP block replaced by the iSQRT-COV head).
  The reduction conv has stride 1 everywhere: the maps are at most 32x32. Position mode pools to
  8x8 (64 positions), which is the last stage's size and a downsampling of the others.

Parameter names follow the ImageNet models (``conv1``, ``layerN``, ``global_pool``, ``fc``) plus
the final ``norm`` / ``act``.
"""
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from timm.layers import LayerType, get_act_layer, get_norm_layer
from timm.models import generate_default_cfgs, register_model

from ..layers._checks import check_int
from ._base import MAX_CHANNELS, GSoPBottleneckBase, GSoPNet, create_gsop_model, make_blocks, resolve_layer

__all__ = ['GSoPResNetCifar', 'GSoPPreActBottleneck', 'CIFAR100_MEAN', 'CIFAR100_STD']

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class GSoPPreActBottleneck(GSoPBottleneckBase):
    """Pre-activation bottleneck with an optional attention layer at the end of the residual branch.

    The projection shortcut (``downsample``, a bare 1x1 conv) takes the pre-activated input.
    """

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
        self.bn1 = norm_layer(inplanes, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False, **dd)
        self.bn2 = norm_layer(planes, **dd)
        self.act2 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False, **dd)
        self.bn3 = norm_layer(planes, **dd)
        self.act3 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, outplanes, kernel_size=1, bias=False, **dd)
        self.init_residual(outplanes, downsample, attn_layer, drop_path, **dd)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: Tensor) -> Tensor:
        x_preact = self.act1(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.conv2(self.act2(self.bn2(x)))
        x = self.conv3(self.act3(self.bn3(x)))
        return self.add_shortcut(x, shortcut)


class GSoPResNetCifar(GSoPNet):
    """GSoP-Net on a pre-activation bottleneck ResNet for 32x32 images (ResNet-164 by default).

    Choice of ``attn_dim`` (64) and the Net2 ``cov_dim`` (64); the paper gives neither for CIFAR:

    * ``attn_dim=64``: the reduced copy should not be wider than the block it reduces, and the
      narrowest stage has 64 channels; attn_dim/width is then 1, 1/2, 1/4 over the stages (ImageNet's
      128: 1/2 ... 1/16). The last stage's 64x64 covariance comes from the 64 positions of an 8x8
      map, rank at most 63 after centring: nearly full, as on ImageNet, where every GSoP block has
      more positions than its 128 channels; a 128x128 one would be at least half zero eigenvalues.
      The 3 GSoP blocks add 194,688 parameters to the 1,726,388 of the plain ResNet-164 (+11%,
      as ImageNet's blocks add to ResNet-50); attn_dim=128 would add 487,232 (+28%) and widen
      stage 1's 64 channels, attn_dim=32 would add 85,280 (+5%).
    * ``cov_dim=64`` for the iSQRT-COV head (256 on ImageNet, from 14x14 = 196 positions): not
      wider than the 256-channel map, and again nearly full rank from 8x8 = 64 positions. Its
      classifier has 64*65/2*100 = 208,000 weights, so Net2 (2.02M parameters) stays 5% above Net1
      (1.92M); cov_dim=128 would give a 825,600-weight classifier (half the backbone) and 2.65M
      parameters, cov_dim=256 a 3.29M-weight classifier, twice the backbone.

    Args:
        layers: bottlenecks per stage, (18, 18, 18) for ResNet-164.
        num_classes: classifier outputs (0 for none).
        in_chans: input image channels.
        attn_mode: GSoP block mode: 'channel' (default), 'position', 'fusion_avg', 'fusion_max',
            'fusion_concat'; 'none' for the same backbone without GSoP blocks.
        attn_dim: channels of the GSoP block's reduced copy (64, see above).
        attn_stages: which of the 3 stages end with a GSoP block (Net1: all, Net2: the first two).
        global_pool: 'avg' (Net1) or 'isqrt' (Net2: iSQRT-COV pooling), any timm pool type, or ''.
        cov_dim: covariance size of the iSQRT-COV pool (64, see above).
        sqrt_iters: Newton-Schulz iterations of the iSQRT-COV pool (3).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        zero_init_last: zero-init each block's last conv (an identity block at init).
        min_input_size: smallest accepted height/width in pixels (32).
        stem_chs: channels of the stem conv (16).
    """

    default_attn_dim = 64
    default_cov_dim = 64
    channels = (16, 32, 64)

    def __init__(
            self,
            layers: Tuple[int, ...] = (18, 18, 18),
            num_classes: int = 100,
            in_chans: int = 3,
            attn_mode: str = 'channel',
            attn_dim: Optional[int] = None,
            attn_stages: Tuple[bool, ...] = (True, True, True),
            global_pool: str = 'avg',
            cov_dim: Optional[int] = None,
            sqrt_iters: Optional[int] = None,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = False,
            min_input_size: int = 32,
            stem_chs: int = 16,
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
        check_int('stem_chs', stem_chs, high=MAX_CHANNELS)
        act_layer = resolve_layer('act_layer', act_layer, get_act_layer, '_ACT_LAYER_DEFAULT')
        norm_layer = resolve_layer('norm_layer', norm_layer, get_norm_layer, '_NORM_MAP')

        # Pre-activation: the stem is a bare conv, the first block's BN-ReLU follows it.
        self.conv1 = nn.Conv2d(in_chans, stem_chs, kernel_size=3, stride=1, padding=1, bias=False, **dd)
        self.maxpool = nn.Identity()  # the 32x32 input keeps its resolution into stage 1
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module='conv1')]
        stages, stage_info = make_blocks(
            block_fn=GSoPPreActBottleneck,
            channels=self.channels,
            block_repeats=layers,
            strides=(1, 2, 2),
            inplanes=stem_chs,
            reduction=1,
            downsample_layer=partial(nn.Conv2d, kernel_size=1, bias=False),
            # The GSoP blocks' reduction conv has stride 1 everywhere: the maps are at most 32x32.
            attn_layers=self.attn_layers(attn_stages, (1, 1, 1), act_layer=act_layer, norm_layer=norm_layer),
            drop_path_rate=drop_path_rate,
            act_layer=act_layer,
            norm_layer=norm_layer,
            **dd,
        )
        for stage in stages:
            self.add_module(*stage)
        self.feature_info.extend(stage_info)
        # The last feature is the normalised one that the head sees (as timm's ResNetV2).
        self.feature_info[-1]['module'] = 'act'

        self.num_features = stage_info[-1]['num_chs']
        self.norm = norm_layer(self.num_features, **dd)
        self.act = act_layer(inplace=True)
        self.init_head(global_pool, **dd)
        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1',
            blocks=r'^layer(\d+)' if coarse else [(r'^layer(\d+)\.(\d+)', None), (r'^norm', (99999,))])

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)


def _create_gsop_resnet_cifar(variant: str, pretrained: bool = False, **kwargs) -> GSoPResNetCifar:
    return create_gsop_model(
        GSoPResNetCifar, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'min_input_size': (3, 32, 32),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': CIFAR100_MEAN, 'std': CIFAR100_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:1811.12006', 'paper_name': 'Global Second-order Pooling Convolutional Networks',
        **kwargs,
    }


# No weights exist: the tags name architectures only (no url / hf_hub_id).
default_cfgs = generate_default_cfgs({
    'gsop_resnet164_cifar': _cfg(),
    'gsop2_resnet164_cifar': _cfg(),
})


@register_model
def gsop_resnet164_cifar(pretrained: bool = False, **kwargs) -> GSoPResNetCifar:
    """GSoP-Net1 pre-act ResNet-164 for CIFAR-100: a GSoP block in every stage, average pooling.

    1,921,076 parameters.
    """
    model_args = dict(layers=(18, 18, 18), attn_stages=(True, True, True), global_pool='avg')
    return _create_gsop_resnet_cifar('gsop_resnet164_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def gsop2_resnet164_cifar(pretrained: bool = False, **kwargs) -> GSoPResNetCifar:
    """GSoP-Net2 pre-act ResNet-164 for CIFAR-100: GSoP blocks in stages 1-2, iSQRT-COV pooling.

    2,020,852 parameters.
    """
    model_args = dict(layers=(18, 18, 18), attn_stages=(True, True, False), global_pool='isqrt')
    return _create_gsop_resnet_cifar('gsop2_resnet164_cifar', pretrained, **dict(model_args, **kwargs))
