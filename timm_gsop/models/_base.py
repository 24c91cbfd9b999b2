"""What the GSoP-Nets share: argument checks, the stage builder, the head and timm's classifier API.

``GSoPResNet`` (ImageNet) and ``GSoPResNetCifar`` differ in their stem, bottleneck and final norm;
both are a ``GSoPNet`` whose stages come from ``make_blocks`` and whose head is average pooling
(GSoP-Net1) or iSQRT-COV pooling (GSoP-Net2) before a linear classifier.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.layers import LayerType, create_classifier, get_device_dtype, register_notrace_function

from ..layers import GSoPAttn, IsqrtCovPool, resolve_attn_mode
from ..layers._checks import check_positive_int
from ._checkpoint import _official_keys_pre_hook

__all__ = ['GSoPNet', 'make_blocks', 'create_head', 'check_input_size', 'GLOBAL_POOLS']

#: ``global_pool`` choices: timm's pools, 'isqrt' (iSQRT-COV, GSoP-Net2) and '' (no pooling).
GLOBAL_POOLS = ('avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax', 'fastcatavgmax',
                'isqrt', '')


@register_notrace_function
def check_input_size(x: Tensor, min_size: int) -> Tensor:
    """Returns ``x`` (so fx keeps the check in its graph) or raises for a too small image."""
    if x.shape[-1] < min_size or x.shape[-2] < min_size:
        raise ValueError(
            f'Input of {x.shape[-2]}x{x.shape[-1]} px is smaller than this model accepts: '
            f'height and width must be at least {min_size} px.')
    return x


def make_blocks(
        block_fn: Type[nn.Module],
        channels: Sequence[int],
        block_repeats: Sequence[int],
        strides: Sequence[int],
        inplanes: int,
        reduction: int,
        downsample_layer: Callable[..., nn.Module],
        attn_layers: Optional[Sequence[Optional[Callable[..., nn.Module]]]] = None,
        drop_path_rate: float = 0.,
        device=None,
        dtype=None,
        **block_kwargs,
) -> Tuple[List[Tuple[str, nn.Module]], List[Dict[str, Any]]]:
    """The stages ``layer1``, ``layer2``... of a ResNet made of ``block_fn`` bottlenecks.

    Args:
        block_fn: the bottleneck, called as ``block_fn(inplanes, planes, stride=, downsample=,
            attn_layer=, drop_path=, **block_kwargs, device=, dtype=)``; its output has
            ``planes * block_fn.expansion`` channels.
        channels: bottleneck width (planes) of each stage.
        block_repeats: bottlenecks in each stage.
        strides: stride of each stage (its first block's).
        inplanes: channels of the map the first stage takes.
        reduction: stride of that map relative to the image (for ``feature_info``).
        downsample_layer: ``(in_chs, out_chs, stride=, device=, dtype=) -> module``, the projection
            shortcut of a stage's first block where the width or the stride changes.
        attn_layers: per stage, the attention layer of its last block (GSoP sits there), or None.
        drop_path_rate: stochastic depth, rising linearly from 0 at the first block to this at the last.
        **block_kwargs: passed on to every block (act_layer, norm_layer).

    Returns:
        ``[(name, stage)]`` and the stages' ``feature_info``.
    """
    dd = {'device': device, 'dtype': dtype}
    attn_layers = attn_layers or [None] * len(channels)
    num_blocks = sum(block_repeats)
    block_idx = 0
    stages, feature_info = [], []
    for stage_idx, (planes, repeats, stride, attn_layer) in enumerate(
            zip(channels, block_repeats, strides, attn_layers)):
        outplanes = planes * block_fn.expansion
        blocks = []
        for i in range(repeats):
            downsample = None
            if i == 0 and (stride != 1 or inplanes != outplanes):
                downsample = downsample_layer(inplanes, outplanes, stride=stride, **dd)
            blocks.append(block_fn(
                inplanes,
                planes,
                stride=stride if i == 0 else 1,
                downsample=downsample,
                attn_layer=attn_layer if i == repeats - 1 else None,
                drop_path=drop_path_rate * block_idx / max(num_blocks - 1, 1),
                **block_kwargs,
                **dd,
            ))
            inplanes = outplanes
            block_idx += 1
        reduction *= stride
        name = f'layer{stage_idx + 1}'
        stages.append((name, nn.Sequential(*blocks)))
        feature_info.append(dict(num_chs=outplanes, reduction=reduction, module=name))
    return stages, feature_info


def create_head(
        num_features: int,
        num_classes: int,
        pool_type: str,
        cov_dim: int,
        sqrt_iters: int,
        device=None,
        dtype=None,
) -> Tuple[nn.Module, nn.Module]:
    """Global pool and classifier: timm's ``create_classifier``, or iSQRT-COV pooling + Linear for 'isqrt'."""
    dd = {'device': device, 'dtype': dtype}
    if pool_type != 'isqrt':
        return create_classifier(num_features, num_classes, pool_type=pool_type, **dd)
    pool = IsqrtCovPool(num_features, cov_dim=cov_dim, num_iter=sqrt_iters, **dd)
    return pool, _linear_classifier(pool.out_features, num_classes, **dd)


def _linear_classifier(in_features: int, num_classes: int, device=None, dtype=None) -> nn.Module:
    """The classifier behind an iSQRT-COV pool (an identity for ``num_classes=0``)."""
    if num_classes > 0:
        return nn.Linear(in_features, num_classes, device=device, dtype=dtype)
    return nn.Identity()


def _check_global_pool(global_pool: Any) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f'Unknown global_pool {global_pool!r}; valid: {", ".join(map(repr, GLOBAL_POOLS))}.')


def _check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0. <= value < 1.:
        raise ValueError(f'{name} must be a number in [0, 1), got {value!r}')


class GSoPNet(nn.Module):
    """Base of the GSoP-Net classes: checked arguments, GSoP stages, the head and timm's classifier API.

    A subclass builds its stem and stages (``make_blocks`` with ``self.attn_layers(...)``), sets
    ``num_features``, then calls ``init_head`` and ``init_weights``. Arguments are checked here, each
    with a ValueError that names it; one that would have no effect (``attn_dim`` without GSoP blocks,
    ``cov_dim`` / ``sqrt_iters`` without iSQRT-COV pooling) is an error too.
    """
    #: Values of ``attn_dim``, ``cov_dim`` and ``sqrt_iters`` when they are not given.
    default_attn_dim: int = 128
    default_cov_dim: int = 256
    default_sqrt_iters: int = 3

    def __init__(
            self,
            *,
            num_stages: int,
            layers: Sequence[int],
            num_classes: int,
            in_chans: int,
            attn_mode: Optional[str],
            attn_dim: Optional[int],
            attn_stages: Sequence[bool],
            global_pool: str,
            cov_dim: Optional[int],
            sqrt_iters: Optional[int],
            drop_rate: float,
            drop_path_rate: float,
            zero_init_last: bool,
            min_input_size: int,
    ):
        super().__init__()
        attn_mode = resolve_attn_mode(attn_mode)
        if not isinstance(layers, (tuple, list)) or len(layers) != num_stages:
            raise ValueError(f'layers must give the blocks of each of the {num_stages} stages, got {layers!r}')
        for i, depth in enumerate(layers):
            check_positive_int(f'layers[{i}]', depth)
        if (not isinstance(attn_stages, (tuple, list)) or len(attn_stages) != num_stages
                or not all(isinstance(a, bool) for a in attn_stages)):
            raise ValueError(f'attn_stages must be {num_stages} booleans, got {attn_stages!r}')
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'num_classes must be an integer >= 0 (0: no classifier), got {num_classes!r}')
        check_positive_int('in_chans', in_chans)
        check_positive_int('min_input_size', min_input_size)
        _check_global_pool(global_pool)
        _check_rate('drop_rate', drop_rate)
        _check_rate('drop_path_rate', drop_path_rate)
        if not isinstance(zero_init_last, bool):
            raise ValueError(f'zero_init_last must be True or False, got {zero_init_last!r}')
        if attn_dim is not None:
            check_positive_int('attn_dim', attn_dim)
            if attn_mode is None or not any(attn_stages):
                raise ValueError("attn_dim has no effect on a model without GSoP blocks (attn_mode='none'); "
                                 "leave it out.")
        for name, value in (('cov_dim', cov_dim), ('sqrt_iters', sqrt_iters)):
            if value is not None:
                check_positive_int(name, value)
                if global_pool != 'isqrt':
                    raise ValueError(f"{name} sets the iSQRT-COV pool (global_pool='isqrt', GSoP-Net2) and has "
                                     f"no effect with global_pool={global_pool!r}; leave it out.")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.attn_mode = attn_mode or 'none'
        self.attn_dim = self.default_attn_dim if attn_dim is None else attn_dim
        self.cov_dim = self.default_cov_dim if cov_dim is None else cov_dim
        self.sqrt_iters = self.default_sqrt_iters if sqrt_iters is None else sqrt_iters
        self.drop_rate = drop_rate
        self.min_input_size = min_input_size
        self.grad_checkpointing = False
        # Official GSoP checkpoints also load through plain load_state_dict (checkpoint_path=, train.py).
        self.register_load_state_dict_pre_hook(_official_keys_pre_hook)

    def attn_layers(
            self,
            attn_stages: Sequence[bool],
            reduce_strides: Sequence[int],
            act_layer: LayerType,
            norm_layer: LayerType,
    ) -> List[Optional[Callable[..., nn.Module]]]:
        """Per stage, the GSoP block for ``make_blocks`` (None where ``attn_stages`` says no)."""
        if self.attn_mode == 'none':
            return [None] * len(attn_stages)
        return [
            partial(GSoPAttn, attn_mode=self.attn_mode, attn_dim=self.attn_dim, reduce_stride=stride,
                    act_layer=act_layer, norm_layer=norm_layer) if use else None
            for use, stride in zip(attn_stages, reduce_strides)]

    def init_head(self, global_pool: str, device=None, dtype=None) -> None:
        self.global_pool, self.fc = create_head(
            self.num_features, self.num_classes, global_pool, self.cov_dim, self.sqrt_iters,
            device=device, dtype=dtype)
        if isinstance(self.global_pool, IsqrtCovPool):
            self.head_hidden_size = self.global_pool.out_features
        else:
            self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False) -> None:
        """He (fan-out) init of every conv; norms start at weight 1, bias 0 as built.

        Args:
            zero_init_last: zero the last weight of each residual branch (timm's default for its
                ResNets; the official GSoP code does not, hence False in the models).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False):
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier on the model's device, dtype and train/eval mode.

        ``global_pool=None`` keeps the pooling; an iSQRT-COV pool then keeps its trained weights.
        """
        if global_pool is not None:
            _check_global_pool(global_pool)
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if (global_pool is None or global_pool == 'isqrt') and isinstance(self.global_pool, IsqrtCovPool):
            self.fc = _linear_classifier(self.head_hidden_size, num_classes, **dd)
        else:
            self.init_head(self.global_pool.pool_type if global_pool is None else global_pool, **dd)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)
