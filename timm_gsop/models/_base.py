"""What the GSoP-Nets share: argument checks, the bottleneck's residual end, the stage builder, the
forward passes over stem, stages and head, and timm's classifier API.

``GSoPResNet`` (ImageNet) and ``GSoPResNetCifar`` differ in their stem, bottleneck and final norm;
both are a ``GSoPNet`` whose stages ``layer1``, ``layer2``... come from ``make_blocks`` and whose head
is average pooling (GSoP-Net1) or iSQRT-COV pooling (GSoP-Net2) before a linear classifier.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.layers import (
    DropPath, LayerType, create_classifier, get_device_dtype, register_notrace_function)
from timm.models import build_model_with_cfg, checkpoint_seq, list_pretrained, resolve_pretrained_cfg
from timm.models._features import feature_take_indices

from ..layers import GSoPAttn, IsqrtCovPool, resolve_attn_mode
from ..layers._checks import check_int
from ._checkpoint import (
    check_finite, check_state_dict_fits, checkpoint_filter_fn, convert_official_state_dict, load_checkpoint_file)

__all__ = ['GSoPNet', 'GSoPBottleneckBase', 'make_blocks', 'create_head', 'check_input_size', 'create_gsop_model',
           'GLOBAL_POOLS']

#: ``global_pool`` choices: timm's pools, 'isqrt' (iSQRT-COV, GSoP-Net2) and '' (no pooling).
GLOBAL_POOLS = ('avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax', 'fastcatavgmax',
                'isqrt', '')


# Bounds that no GSoP-Net reaches, so that a typo cannot allocate gigabytes before failing.
MAX_BLOCKS_PER_STAGE = 1000
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 4096  # in_chans, stem_chs


def check_attn_mode(attn_mode: Any) -> str:
    """The GSoP block mode, or 'none' for the backbone without GSoP blocks."""
    if attn_mode is None:  # timm.create_model drops None arguments: None there would silently mean 'channel'
        raise ValueError("attn_mode=None: pass attn_mode='none' for the backbone without GSoP blocks "
                         "(timm.create_model drops None arguments, which keeps the default 'channel').")
    return resolve_attn_mode(attn_mode) or 'none'


def resolve_layer(name: str, value: Any, get_layer: Callable[[Any], Any], names: str) -> Callable[..., nn.Module]:
    """``get_act_layer`` / ``get_norm_layer`` of ``value``; a ValueError naming the argument and timm's names."""
    try:
        layer = get_layer(value)
    except (KeyError, AssertionError, TypeError):
        layer = None
    if not callable(layer):
        from timm.layers import create_act, create_norm  # for the message only: the names timm knows
        known = getattr(create_act if name == 'act_layer' else create_norm, names, {})
        raise ValueError(f"{name}={value!r} is not a layer class or one of timm's names: {', '.join(sorted(known))}")
    return layer


@register_notrace_function
def check_input_size(x: Tensor, min_size: int) -> Tensor:
    """Returns ``x`` (so fx keeps the check in its graph) or raises for a too small image."""
    if x.shape[-1] < min_size or x.shape[-2] < min_size:
        raise ValueError(
            f'Input of {x.shape[-2]}x{x.shape[-1]} px is smaller than this model accepts: '
            f'height and width must be at least {min_size} px.')
    return x


class GSoPBottleneckBase(nn.Module):
    """What the two bottlenecks share: the attention layer at the end of the residual branch, the
    projection shortcut, stochastic depth, and how the three meet the shortcut.

    The attention layer gets the shortcut too, so that its scale and the residual add are one pass
    over the map, unless stochastic depth has to drop the scaled branch alone.
    """
    expansion = 4

    def init_residual(self, outplanes: int, downsample: Optional[nn.Module],
                      attn_layer: Optional[Callable[..., nn.Module]], drop_path: float, device=None, dtype=None) -> None:
        """Called by the subclass after its convs (the parameters' order, and so a seed's init, follows)."""
        self.attn = attn_layer(outplanes, device=device, dtype=dtype) if attn_layer is not None else None
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0. else None

    def add_shortcut(self, x: Tensor, shortcut: Tensor) -> Tensor:
        """Attention (where there is a GSoP block), stochastic depth, then the residual add."""
        if self.attn is not None and self.drop_path is None:
            return self.attn(x, shortcut)
        if self.attn is not None:
            x = self.attn(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return x + shortcut


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
    """Base of the GSoP-Net classes: checked arguments, GSoP stages, the forward passes, the head and
    timm's classifier API.

    A subclass sets ``channels`` (bottleneck width of each stage), builds its stem, its stages
    (``make_blocks`` with ``self.attn_layers(...)``) and ``maxpool`` / ``norm`` / ``act`` (identities
    where it has none), defines ``forward_stem`` (the stem up to feature 0), sets ``num_features``, then
    calls ``init_head`` and ``init_weights``. Arguments are checked here, each with a ValueError that
    names it; one that would have no effect (``attn_dim`` without GSoP blocks, ``cov_dim`` /
    ``sqrt_iters`` without iSQRT-COV pooling) is an error too.
    """
    #: Values of ``attn_dim``, ``cov_dim`` and ``sqrt_iters`` when they are not given.
    default_attn_dim: int = 128
    default_cov_dim: int = 256
    default_sqrt_iters: int = 3
    #: Bottleneck width (planes) of each stage; a stage's output has 4x as many channels.
    channels: Tuple[int, ...] = ()

    def __init__(
            self,
            *,
            layers: Sequence[int],
            num_classes: int,
            in_chans: int,
            attn_mode: str,
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
        num_stages = len(self.channels)
        widest = max(self.channels) * GSoPBottleneckBase.expansion
        attn_mode = check_attn_mode(attn_mode)
        if not isinstance(layers, (tuple, list)) or len(layers) != num_stages:
            raise ValueError(f'layers must give the blocks of each of the {num_stages} stages, got {layers!r}')
        for i, depth in enumerate(layers):
            check_int(f'layers[{i}]', depth, high=MAX_BLOCKS_PER_STAGE)
        if (not isinstance(attn_stages, (tuple, list)) or len(attn_stages) != num_stages
                or not all(isinstance(a, bool) for a in attn_stages)):
            raise ValueError(f'attn_stages must be {num_stages} booleans, got {attn_stages!r}')
        check_int('num_classes', num_classes, low=0, high=MAX_CLASSES)
        check_int('in_chans', in_chans, high=MAX_CHANNELS)
        check_int('min_input_size', min_input_size)
        _check_global_pool(global_pool)
        _check_rate('drop_rate', drop_rate)
        _check_rate('drop_path_rate', drop_path_rate)
        if not isinstance(zero_init_last, bool):
            raise ValueError(f'zero_init_last must be True or False, got {zero_init_last!r}')
        if attn_dim is not None:
            check_int('attn_dim', attn_dim, high=widest, why=" (the widest stage's channels)")
            if attn_mode == 'none' or not any(attn_stages):
                raise ValueError("attn_dim has no effect on a model without GSoP blocks (attn_mode='none'); "
                                 "leave it out.")
        for name, value, high in (('cov_dim', cov_dim, widest), ('sqrt_iters', sqrt_iters, 100)):
            if value is not None:
                check_int(name, value, high=high)
                if global_pool != 'isqrt':
                    raise ValueError(f"{name} sets the iSQRT-COV pool (global_pool='isqrt', GSoP-Net2) and has "
                                     f"no effect with global_pool={global_pool!r}; leave it out.")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.attn_mode = attn_mode
        self.attn_dim = self.default_attn_dim if attn_dim is None else attn_dim
        self.cov_dim = self.default_cov_dim if cov_dim is None else cov_dim
        self.sqrt_iters = self.default_sqrt_iters if sqrt_iters is None else sqrt_iters
        self.drop_rate = drop_rate
        self.min_input_size = min_input_size
        self.grad_checkpointing = False

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """torch's ``load_state_dict``, for this package's and the official GSoP code's checkpoints.

        Official parameter names are converted first. Non-finite values (as stored, or once cast to
        this model's dtype) are refused, and a strict load that does not fit raises a CheckpointError
        (a RuntimeError, as torch's) which sets the checkpoint's architecture beside the model's and
        says what to pass; nothing is loaded then. ``create_model(checkpoint_path=...)`` and train.py's
        ``--initial-checkpoint`` / ``--resume`` load through here.
        """
        state_dict = convert_official_state_dict(state_dict)
        check_finite(state_dict, self)
        if strict:
            check_state_dict_fits(state_dict, self)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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

    def forward_stem(self, x: Tensor) -> Tensor:
        """The stem, up to its feature map (feature index 0); defined by each model."""
        raise NotImplementedError

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Forward that also returns feature maps: the stem (index 0) and each stage (1, 2...).

        ``norm=True`` gives the last stage after the final norm (what ``features_only`` returns),
        where the model has one (the pre-activation CIFAR ResNet).
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.channels) + 1, indices)
        x = self.forward_stem(check_input_size(x, self.min_input_size))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = [getattr(self, f'layer{i + 1}') for i in range(len(self.channels))]
        for feat_idx, stage in enumerate(stages[:max_index] if stop_early else stages, start=1):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing else stage(x)
            feat = x
            if feat_idx == len(stages):
                x = self.act(self.norm(x))
                feat = x if norm else feat
            if feat_idx in take_indices:
                intermediates.append(feat)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (stem pool, final norm, head) that the requested intermediates do not need."""
        num_stages = len(self.channels)
        take_indices, max_index = feature_take_indices(num_stages + 1, indices)
        for i in range(max_index, num_stages):
            setattr(self, f'layer{i + 1}', nn.Sequential())
        if max_index == 0:
            self.maxpool = nn.Identity()
        if prune_norm or max_index < num_stages:
            self.norm, self.act = nn.Identity(), nn.Identity()
        if max_index < num_stages:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < num_stages:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.forward_stem(check_input_size(x, self.min_input_size)))
        for name, stage in self.named_children():  # TorchScript unrolls this loop; the stages are layer1, 2...
            if name.startswith('layer'):
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint_seq(stage, x)
                else:
                    x = stage(x)
        return self.act(self.norm(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def create_gsop_model(model_cls: Type[nn.Module], variant: str, pretrained: bool = False,
                      feature_cfg: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
    """``build_model_with_cfg`` with the checkpoint filter. No GSoP-Net weights are published: ``pretrained=True``
    needs a file (``pretrained_cfg_overlay=dict(file=...)``), a folder (``local-dir:``, ``hf-hub:``) or a backbone
    tag (``gsop_resnet50.a1_in1k_backbone``: a timm ResNet's weights in the backbone, the GSoP blocks new)."""
    cfg = None
    if pretrained:
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), overlay)
        if not (cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict or cfg.source in ('hf-hub', 'local-dir')):
            tags = list_pretrained(f'{variant}.*')
            raise RuntimeError(
                f"No pretrained weights are published for {variant}: load a file with pretrained=True, "
                f"pretrained_cfg_overlay=dict(file='PATH') (timm or official GSoP checkpoints) or checkpoint_path="
                f"'PATH', or an exported folder with timm.create_model('local-dir:FOLDER', pretrained=True)"
                + (f"; or warm-start it from a timm ResNet's ImageNet weights: {', '.join(tags)}." if tags else '.'))
        if cfg.source not in ('hf-hub', 'local-dir') and 'num_classes' in kwargs and 'num_classes' not in overlay:
            # a file keeps a classifier of the requested classes (timm compares with the cfg's 1000)
            kwargs['pretrained_cfg_overlay'] = dict(overlay, num_classes=kwargs['num_classes'])
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                    feature_cfg=feature_cfg, **kwargs)
    except (OSError, EOFError):  # timm's loader says FileNotFoundError() or EOFError(), with no message
        if cfg is not None and cfg.file and not cfg.state_dict:
            load_checkpoint_file(cfg.file)  # raises the reason
        raise
