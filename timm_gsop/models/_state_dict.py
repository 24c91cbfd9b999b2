"""What a GSoP-Net state dict says about its architecture, and whether it fits a model.

``inspect_state_dict`` reads the architecture off a state dict's keys and shapes (blocks per stage,
GSoP stages, attention mode, attn_dim, covariance sizes, head, classes). It is the one place that
does: the load errors (``check_state_dict_fits``), the exporter's inference of model arguments and
the model card all use it.
"""
import re
import shlex
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from timm.models import create_model, is_model

__all__ = ['CheckpointError', 'StateDictArch', 'inspect_state_dict', 'check_finite', 'check_state_dict_fits']


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that does not fit the model, or holds non-finite values; the message says what to do.

    Both a ValueError (what the pretrained filter raised before) and a RuntimeError (what torch's
    ``load_state_dict`` raises), so that callers catching either keep working.
    """


# --------------------------------------------------------------------------------------------------
# what a state dict says
# --------------------------------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r'^layer(\d+)\.(\d+)\.')


@dataclass(frozen=True)
class StateDictArch:
    """The architecture a GSoP-Net state dict was saved from, read off its keys and shapes."""
    layers: Tuple[int, ...]  # blocks per stage
    attn_stages: Tuple[bool, ...]  # which stages hold a GSoP block
    attn_modes: Tuple[str, ...]  # the modes these weights fit: one, or ('fusion_avg', 'fusion_max'), or ('none',)
    attn_dim: Optional[int]  # channels of the GSoP blocks' reduced copy (their channel covariance size)
    position_cov: Optional[int]  # position covariance size (pooled positions), position and fusion modes
    isqrt_head: bool  # Net2's iSQRT-COV pooling
    cov_dim: Optional[int]  # its covariance size
    head_in: Optional[int]  # channels into the iSQRT-COV head
    num_classes: int  # classifier outputs, 0 without a classifier
    in_chans: Optional[int]
    preact: bool  # the CIFAR pre-activation ResNet (a final norm, no stem BN)

    @property
    def attn_mode(self) -> Optional[str]:
        """The attention mode, or None where the weights cannot tell (fusion_avg and fusion_max)."""
        return self.attn_modes[0] if len(self.attn_modes) == 1 else None

    @property
    def net(self) -> str:
        return 'GSoP-Net2' if self.isqrt_head else 'GSoP-Net1'

    @property
    def depth(self) -> int:
        """ResNet depth of a bottleneck network: 3 convs a block, the stem conv and the classifier."""
        return 3 * sum(self.layers) + 2

    def kwargs(self) -> Dict[str, Any]:
        """The model arguments the weights decide (attn_mode only where they tell it)."""
        out: Dict[str, Any] = dict(layers=self.layers, num_classes=self.num_classes)
        if self.attn_mode is not None:
            out['attn_mode'] = self.attn_mode
        if self.attn_dim is not None:
            out['attn_dim'] = self.attn_dim
        return out

    def describe(self) -> str:
        if not self.layers:
            return 'not a GSoP-Net/ResNet state dict (no layer1.* keys)'
        mode = self.attn_mode or ' or '.join(self.attn_modes)
        text = (f'layers={self.layers}, attn_mode={mode!r}, attn_dim={self.attn_dim}, '
                f'num_classes={self.num_classes} ({self.net}')
        stages = [str(i + 1) for i, on in enumerate(self.attn_stages) if on]
        text += f', GSoP blocks in stages {", ".join(stages)}' if stages else ', no GSoP blocks'
        if self.isqrt_head:
            text += f', iSQRT-COV head cov_dim={self.cov_dim}'
        return text + (', pre-activation CIFAR ResNet)' if self.preact else ')')


def inspect_state_dict(state_dict: Dict[str, Any]) -> StateDictArch:
    """What a state dict (this package's names) says about its architecture; needs shapes only."""
    blocks: Dict[int, int] = {}
    attn: Dict[int, bool] = {}
    for k in state_dict:
        m = _BLOCK_KEY.match(k)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
            attn[stage] = attn.get(stage, False) or '.attn.' in k
    has_c = any('.attn.channel_gate.' in k for k in state_dict)
    has_p = any('.attn.position_gate.' in k for k in state_dict)
    if any('.attn.fuse_' in k for k in state_dict):
        modes: Tuple[str, ...] = ('fusion_concat',)
    elif has_c and has_p:
        modes = ('fusion_avg', 'fusion_max')  # same parameters: the keys cannot tell them apart
    else:
        modes = ('channel',) if has_c else ('position',) if has_p else ('none',)

    def shape(key: str) -> Optional[Tuple[int, ...]]:
        return tuple(state_dict[key].shape) if key in state_dict else None

    def first_shape(suffix: str) -> Optional[Tuple[int, ...]]:
        return next((tuple(v.shape) for k, v in state_dict.items() if k.endswith(suffix)), None)

    reduce = first_shape('_gate.conv_reduce.weight')
    position_bn = first_shape('.attn.position_gate.row_bn.weight')
    head = shape('global_pool.conv_reduce.weight')
    fc, conv1 = shape('fc.weight'), shape('conv1.weight')
    stages = sorted(blocks)
    return StateDictArch(
        layers=tuple(blocks[s] for s in stages),
        attn_stages=tuple(attn[s] for s in stages),
        attn_modes=modes,
        attn_dim=reduce[0] if reduce else None,
        position_cov=position_bn[0] if position_bn else None,
        isqrt_head=head is not None,
        cov_dim=head[0] if head else None,
        head_in=head[1] if head else None,
        num_classes=fc[0] if fc else 0,
        in_chans=conv1[1] if conv1 and len(conv1) == 4 else None,
        preact='norm.weight' in state_dict and 'bn1.weight' not in state_dict,
    )


def _model_arch(model: nn.Module) -> StateDictArch:
    """``inspect_state_dict`` of the model's own weights, with its exact attn_mode."""
    arch = inspect_state_dict(model.state_dict())
    mode = getattr(model, 'attn_mode', None)
    if mode is not None and mode in arch.attn_modes:
        arch = replace(arch, attn_modes=(mode,))
    return arch


# --------------------------------------------------------------------------------------------------
# checks shared by every load path
# --------------------------------------------------------------------------------------------------

def check_finite(state_dict: Dict[str, Any]) -> None:
    """Raise CheckpointError naming the tensors that hold NaN or inf (a diverged run, a damaged file)."""
    def finite(t: Tensor) -> bool:
        # A sum is NaN or inf when any value is, and one reduction is far cheaper than isfinite's mask;
        # only a non-finite sum (or an overflowing one) needs the exact test.
        return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
    bad = [k for k, v in state_dict.items()
           if isinstance(v, Tensor) and v.is_floating_point() and not v.is_meta and not finite(v)]
    if bad:
        raise CheckpointError(
            f'The checkpoint holds non-finite values (NaN or inf) in {len(bad)} tensor(s): {_show(bad)}. '
            f'Such weights give NaN outputs; the training diverged or the file is damaged: use another checkpoint.')


def _show(keys: Sequence[str], n: int = 8) -> str:
    if not keys:
        return 'none'
    return ', '.join(keys[:n]) + (f' ... ({len(keys)} in all)' if len(keys) > n else '')


def _format_kwargs(kwargs: Dict[str, Any], cli: bool) -> str:
    if cli:
        return ' '.join(shlex.quote(f'{k}={v}') for k, v in kwargs.items())  # strings need no quotes there
    return ', '.join(f'{k}={v!r}' for k, v in kwargs.items())


def _same_structure(name: str, ckpt: StateDictArch) -> bool:
    """Whether registered model ``name`` has the checkpoint's blocks, head and stem by default.

    Only on the error path: the model is built on the meta device (shapes only) where it can be,
    else on the CPU.
    """
    if not is_model(name):
        return False
    default = None
    for device in ('meta', 'cpu'):
        try:
            with torch.device(device):
                default = inspect_state_dict(create_model(name).state_dict())
            break
        except Exception:
            continue
    if default is None:
        return False
    gsop_stages = ckpt.attn_stages if 'none' not in ckpt.attn_modes else default.attn_stages
    return (default.layers, default.isqrt_head, default.preact, default.attn_stages) == (
        ckpt.layers, ckpt.isqrt_head, ckpt.preact, gsop_stages)


def _how_to_fit(ckpt: StateDictArch, model: StateDictArch, model_name: str, check_classifier: bool,
                cli: bool) -> str:
    """What to pass to build the model the checkpoint was trained as."""
    if not ckpt.layers:
        return 'It is not a checkpoint of a GSoP-Net: load it into the model it was trained with.'
    name = model_name
    structure = (ckpt.layers, ckpt.isqrt_head, ckpt.preact)
    if structure != (model.layers, model.isqrt_head, model.preact):
        net = '2' if ckpt.isqrt_head else ''
        cifar = '_cifar' if ckpt.preact else ''
        for candidate in (f'gsop{net}_resnet{ckpt.depth}{cifar}',
                          re.sub(r'^gsop2?_', f'gsop{net}_', model_name)):
            if candidate != model_name and _same_structure(candidate, ckpt):
                name = candidate
                break
    kwargs: Dict[str, Any] = {}
    if name == model_name and ckpt.layers != model.layers:
        kwargs['layers'] = ckpt.layers
    if not set(model.attn_modes) & set(ckpt.attn_modes):
        kwargs['attn_mode'] = ckpt.attn_modes[0]
    if ckpt.attn_dim is not None and ckpt.attn_dim != model.attn_dim:
        kwargs['attn_dim'] = ckpt.attn_dim
    if ckpt.isqrt_head and model.isqrt_head and ckpt.cov_dim != model.cov_dim:
        kwargs['cov_dim'] = ckpt.cov_dim
    if check_classifier and ckpt.num_classes != model.num_classes:
        kwargs['num_classes'] = ckpt.num_classes
    if ckpt.in_chans is not None and ckpt.in_chans != model.in_chans:
        kwargs['in_chans'] = ckpt.in_chans
    if name == model_name and not kwargs:
        if ckpt.isqrt_head != model.isqrt_head:
            return (f'The checkpoint is a {ckpt.net}, the model a {model.net}: use a '
                    f'{"gsop2_*" if ckpt.isqrt_head else "gsop_*"} model.')
        return 'Create the model with the arguments the checkpoint was trained with.'
    fusion = (" (or attn_mode='fusion_max': the two have the same weights; pass the one it was trained with)"
              if kwargs.get('attn_mode') == 'fusion_avg' and len(ckpt.attn_modes) > 1 else '')
    if cli:
        what = (f'--model {name}' if name != model_name else '') + (
            f' --model-kwargs {_format_kwargs(kwargs, cli=True)}' if kwargs else '')
        return f'Export it as it was trained: {what.strip()}{fusion}'
    args = ', '.join([repr(name)] + ([_format_kwargs(kwargs, cli=False)] if kwargs else []))
    return f'Create the model as the checkpoint was trained: timm.create_model({args}, ...){fusion}'


def check_state_dict_fits(
        state_dict: Dict[str, Any],
        model: nn.Module,
        check_classifier: bool = True,
        model_name: Optional[str] = None,
        cli: bool = False,
) -> None:
    """Raise a CheckpointError when ``state_dict`` does not load strictly into ``model``.

    The message sets the checkpoint's architecture (layers, attn_mode, attn_dim, num_classes) beside
    the model's, says what to pass to create the model that fits (as ``timm.create_model`` keywords,
    or ``timm-gsop export`` options with ``cli``), then lists missing, unexpected and mis-shaped keys.
    ``check_classifier=False`` leaves out ``fc.*`` (timm replaces a classifier of another size).
    """
    target = model.state_dict()
    skip = () if check_classifier else ('fc.weight', 'fc.bias')
    # PyTorch 0.4 checkpoints have no BN step counters; they do not change outputs and torch fills them in.
    missing = [k for k in target if k not in state_dict and k not in skip and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict if k not in target and k not in skip]
    mismatched = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}'
        for k in target if k in state_dict and k not in skip and state_dict[k].shape != target[k].shape]
    if not (missing or unexpected or mismatched):
        return
    ckpt, ours = inspect_state_dict(state_dict), _model_arch(model)
    name = model_name or (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    raise CheckpointError(
        f'The checkpoint does not fit this {name} model.\n'
        f'  checkpoint: {ckpt.describe()}\n'
        f'  model:      {ours.describe()}\n'
        f'{_how_to_fit(ckpt, ours, name, check_classifier, cli)}\n'
        f'  missing keys ({len(missing)}): {_show(missing)}\n'
        f'  unexpected keys ({len(unexpected)}): {_show(unexpected)}\n'
        f'  shape mismatches ({len(mismatched)}): {_show(mismatched)}')
