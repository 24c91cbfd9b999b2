"""Checkpoints of GSoP-Nets: reading a file, the official GSoP names, and the error that sets a
checkpoint's architecture beside the model's.

timm's pretrained loader ends in ``checkpoint_filter_fn``; it, ``create_model(checkpoint_path=...)``
and train.py end in ``GSoPNet.load_state_dict``. The export and the launcher read files with
``load_checkpoint_file`` and explain a mismatch in their flags (``check_state_dict_fits(..., cli=True)``).
"""
import argparse
import math
import os
import re
import shlex
import stat
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from timm.models import build_model_with_cfg, clean_state_dict, resolve_pretrained_cfg

__all__ = [
    'CheckpointError', 'StateDictArch', 'inspect_state_dict', 'check_finite', 'check_state_dict_fits',
    'load_checkpoint_file', 'state_dict_from_checkpoint', 'checkpoint_filter_fn',
    'convert_official_state_dict', 'is_official_state_dict', 'create_gsop_model',
]


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that cannot be read, holds non-finite values or does not fit the model; the message
    says what to do. A RuntimeError too, as what torch's ``load_state_dict`` raises."""


# Official module names -> ours: inside a stage's bottleneck (layerN.i.NAME.*) or, for Net2's head, at the top.
_OFFICIAL_NAMES = {
    'conv_for_DR': 'attn.channel_gate.conv_reduce',
    'bn_for_DR': 'attn.channel_gate.bn_reduce',
    'row_bn': 'attn.channel_gate.row_bn',
    'row_conv_group': 'attn.channel_gate.row_conv',
    'fc_adapt_channels': 'attn.channel_gate.fc',
    'conv_for_DR_spatial': 'attn.position_gate.conv_reduce',
    'bn_for_DR_spatial': 'attn.position_gate.bn_reduce',
    'row_bn_for_spatial': 'attn.position_gate.row_bn',
    'row_conv_group_for_spatial': 'attn.position_gate.row_conv',
    'fc_adapt_channels_for_spatial': 'attn.position_gate.fc',
    'dilate_conv_for_concat1': 'attn.fuse_channel',
    'dilate_conv_for_concat2': 'attn.fuse_position',
    'bn_for_concat': 'attn.fuse_bn',
    'layer_reduce': 'global_pool.conv_reduce',
    'layer_reduce_bn': 'global_pool.bn',
}
_OFFICIAL_KEY = re.compile(r'^(layer\d+\.\d+\.)?([^.]+)(\..+)$')


def _official_to_ours(key: str) -> str:
    m = _OFFICIAL_KEY.match(key)
    return f'{m[1] or ""}{_OFFICIAL_NAMES[m[2]]}{m[3]}' if m and m[2] in _OFFICIAL_NAMES else key


def is_official_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` has the official GSoP code's parameter names."""
    return any(isinstance(k, str) and _official_to_ours(k) != k for k in clean_state_dict(state_dict))


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A state dict of the official GSoP code (``module.`` prefix allowed) in our names; any other is
    returned as it is. Keys that are not names are a CheckpointError.

    The official code ran on PyTorch 0.4.0, whose BatchNorm had no ``num_batches_tracked``: missing
    counters are added as zeros."""
    bad = next((k for k in state_dict if not isinstance(k, str)), None)
    if bad is not None:
        raise CheckpointError(f'the state dict has a key {bad!r} of type {type(bad).__name__}: a state dict '
                              f'maps parameter names (strings) to tensors')
    cleaned = clean_state_dict(state_dict)
    out = {_official_to_ours(k): v for k, v in cleaned.items()}
    if list(out) == list(cleaned):  # no official name
        return state_dict
    for k in list(out):
        if k.endswith('.running_mean'):
            out.setdefault(k[:-len('running_mean')] + 'num_batches_tracked', torch.tensor(0, dtype=torch.long))
    return out


def load_checkpoint_file(path: Any) -> Any:
    """A checkpoint file's content: ``torch.load(weights_only=True)`` (train.py's ``argparse.Namespace``
    args allowed, nothing else pickled), or a ``.safetensors`` file. Errors are one-line CheckpointErrors."""
    try:
        st = os.stat(path)
    except OSError as e:  # missing, a symlink loop, a name too long, no permission
        reason = 'not found' if isinstance(e, FileNotFoundError) else f'unreadable ({e.strerror or e})'
        raise CheckpointError(f'checkpoint {reason}: {path}') from None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        raise CheckpointError(f'checkpoint {"is not a file" if st.st_size else "is empty (0 bytes)"}: {path}')
    try:
        if str(path).endswith('.safetensors'):
            import safetensors.torch
            return safetensors.torch.load_file(str(path), device='cpu')
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # zip/pickle/EOF errors of a damaged file, blocked globals of a foreign pickle
        first_line = (str(e).strip().splitlines() or [''])[0]
        raise CheckpointError(
            f'cannot read checkpoint {path}: {type(e).__name__}: {first_line}. The file is corrupted or truncated, '
            f'or not one that torch.load(weights_only=True) reads (pickled objects other than tensors and plain '
            f'containers are refused).') from None


def state_dict_from_checkpoint(checkpoint: Any) -> Tuple[str, Dict[str, Tensor]]:
    """(entry, state dict) of a loaded checkpoint, wrapper prefixes removed and official names converted.

    The entry is where the weights were found, in timm's order (EMA weights first; '' for a bare state
    dict). A checkpoint without tensors, with keys that are not names, or with an ``epoch`` that is not
    a count is a CheckpointError."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'the checkpoint holds a {type(checkpoint).__name__}, not a dict of weights')
    entries = ('state_dict_ema', 'model_ema', 'state_dict', 'model')
    source = next((k for k in entries if isinstance(checkpoint.get(k), dict) and checkpoint[k]), '')
    state_dict = checkpoint[source] if source else checkpoint
    bad = next((k for k, v in state_dict.items() if not isinstance(v, Tensor)), None)
    if not state_dict or bad is not None:
        raise CheckpointError(
            f'the checkpoint holds no state dict: expected tensors under "state_dict_ema", "state_dict" or at '
            f'the top level, found {"nothing" if bad is None else f"{bad!r}: {type(state_dict[bad]).__name__}"}')
    epoch = checkpoint.get('epoch') if source else None
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, (int, float))
                              or not math.isfinite(epoch) or epoch < 0):
        raise CheckpointError(f'the checkpoint says epoch {epoch!r}, not a count of epochs: the file is damaged')
    return source, clean_state_dict(convert_official_state_dict(state_dict))


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
        out = dict(layers=self.layers, num_classes=self.num_classes, attn_mode=self.attn_mode, attn_dim=self.attn_dim)
        return {k: v for k, v in out.items() if v is not None}

    def describe(self) -> str:
        if not self.layers:
            return 'not a GSoP-Net/ResNet state dict (no layer1.* keys)'
        stages = ', '.join(str(i + 1) for i, on in enumerate(self.attn_stages) if on)
        return (f'layers={self.layers}, attn_mode={self.attn_mode or " or ".join(self.attn_modes)!r}, '
                f'attn_dim={self.attn_dim}, num_classes={self.num_classes} ({self.net}, '
                + (f'GSoP blocks in stages {stages}' if stages else 'no GSoP blocks')
                + (f', iSQRT-COV head cov_dim={self.cov_dim}' if self.isqrt_head else '')
                + (', pre-activation CIFAR ResNet)' if self.preact else ')'))


def inspect_state_dict(state_dict: Mapping[str, Any]) -> StateDictArch:
    """What a state dict (this package's names) says about its architecture; needs shapes only."""
    blocks: Dict[int, int] = {}
    attn: Dict[int, bool] = {}
    for k in state_dict:
        m = re.match(r'layer(\d+)\.(\d+)\.', k)
        if m:
            stage = int(m[1])
            blocks[stage] = max(blocks.get(stage, 0), int(m[2]) + 1)
            attn[stage] = attn.get(stage, False) or '.attn.' in k
    gates = tuple(g for g in ('channel', 'position') if any(f'.attn.{g}_gate.' in k for k in state_dict))
    if any('.attn.fuse_' in k for k in state_dict):
        modes = ('fusion_concat',)
    elif len(gates) == 2:
        modes = ('fusion_avg', 'fusion_max')  # same parameters: the keys cannot tell them apart
    else:
        modes = gates or ('none',)

    def dim(key: str, i: int = 0, suffix: bool = False) -> Optional[int]:
        shape = next((v.shape for k, v in state_dict.items() if (k.endswith(key) if suffix else k == key)), None)
        return shape[i] if shape is not None and len(shape) > i else None

    return StateDictArch(
        layers=tuple(blocks[s] for s in sorted(blocks)), attn_stages=tuple(attn[s] for s in sorted(blocks)),
        attn_modes=modes, attn_dim=dim('_gate.conv_reduce.weight', suffix=True),
        position_cov=dim('.attn.position_gate.row_bn.weight', suffix=True),
        isqrt_head='global_pool.conv_reduce.weight' in state_dict, cov_dim=dim('global_pool.conv_reduce.weight'),
        head_in=dim('global_pool.conv_reduce.weight', 1), num_classes=dim('fc.weight') or 0,
        in_chans=dim('conv1.weight', 1), preact='norm.weight' in state_dict and 'bn1.weight' not in state_dict)


def check_finite(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None) -> None:
    """Raise a CheckpointError naming the tensors (real or complex) that hold NaN or inf, as stored or, for
    ``model``'s parameters, once cast to its dtype (float64 1e300 is inf in a float32 model)."""
    target = model.state_dict() if model is not None else {}
    bad = []
    for k, v in state_dict.items():
        if not isinstance(v, Tensor) or v.is_meta or not (v.is_floating_point() or v.is_complex()):
            continue
        own = target.get(k)
        if own is not None and own.is_floating_point() and v.is_floating_point():
            v = v.to(own.dtype)
        # A sum is NaN or inf when any value is, and far cheaper than isfinite's mask; only a non-finite
        # (or overflowing) sum needs the exact test.
        if not (bool(torch.isfinite(v.sum())) or bool(torch.isfinite(v).all())):
            bad.append(k)
    if bad:
        cast = ', or too large for the model dtype' if model is not None else ''
        raise CheckpointError(
            f'The checkpoint holds non-finite values (NaN or inf{cast}) in {len(bad)} tensor(s): {_show(bad)}. '
            f'Such weights give NaN outputs; the training diverged or the file is damaged: use another checkpoint.')


def _show(items: Sequence[str], n: int = 8) -> str:
    return ', '.join(items[:n]) + (f' ... ({len(items)} in all)' if len(items) > n else '') if items else 'none'


def _call(name: str, kwargs: Dict[str, Any], cli: bool, path: Optional[str] = None) -> str:
    """Creating the model: timm.create_model keywords, or train.py/validate.py flags (``name`` '': unchanged);
    with ``path``, as pretrained weights from that file."""
    if not cli:
        args = [repr(name)] + (['pretrained=True', f'pretrained_cfg_overlay=dict(file={path!r})'] if path else [])
        return f'timm.create_model({", ".join(args + [f"{k}={v!r}" for k, v in kwargs.items()])}, ...)'
    flags = [f'--model {name}'] if name else []
    if path:
        flags.append(f'--pretrained --pretrained-path {shlex.quote(path)}')
    rest = [f'{k}={v}'.replace(', ', ',') for k, v in kwargs.items() if k not in ('num_classes', 'in_chans')]
    if rest:  # train.py reads each value with ast.literal_eval; a tuple without spaces is one shell word
        flags.append('--model-kwargs ' + ' '.join(map(shlex.quote, rest)))
    flags += [f'--{k.replace("_", "-")} {kwargs[k]}' for k in ('num_classes', 'in_chans') if k in kwargs]
    return ' '.join(flags)


# Blocks per stage of the registered variants (gsop_* and gsop2_*): the mismatch error names the one that fits.
_VARIANT_LAYERS = {(3, 4, 6, 3): 'resnet50', (3, 4, 23, 3): 'resnet101', (18, 18, 18): 'resnet164_cifar'}


def _how_to_fit(ckpt: StateDictArch, model: StateDictArch, model_name: str, check_classifier: bool, cli: bool,
                path: Optional[str]) -> str:
    """What to pass to create the model the checkpoint was trained as (and to fine-tune it on other classes)."""
    if not ckpt.layers:
        return 'It is not a checkpoint of a GSoP-Net: load it into the model it was trained with.'
    name, kwargs = model_name, {}
    if (ckpt.layers, ckpt.isqrt_head, ckpt.preact) != (model.layers, model.isqrt_head, model.preact):
        variant = _VARIANT_LAYERS.get(ckpt.layers, '')
        if not variant or ('cifar' in variant) != ckpt.preact:
            variant = 'resnet164_cifar' if ckpt.preact else 'resnet50'
            kwargs['layers'] = ckpt.layers
        name = f'gsop{"2" if ckpt.isqrt_head else ""}_{variant}'
    default_stages = (True,) * (len(ckpt.layers) - ckpt.isqrt_head) + (False,) * ckpt.isqrt_head
    if 'none' not in ckpt.attn_modes and ckpt.attn_stages != default_stages:
        kwargs['attn_stages'] = ckpt.attn_stages
    if not set(model.attn_modes) & set(ckpt.attn_modes):
        kwargs['attn_mode'] = ckpt.attn_modes[0]
    for key in ('attn_dim', 'cov_dim', 'in_chans') + (('num_classes',) if check_classifier else ()):
        if getattr(ckpt, key) is not None and getattr(ckpt, key) != getattr(model, key):
            kwargs[key] = getattr(ckpt, key)
    if name == model_name and not kwargs:
        return "Its parameters differ from the model's as listed below."
    shown = '' if cli and name == model_name else name  # a command line has --model already
    text = f'Pass the arguments it was trained with: {_call(shown, kwargs, cli)}'
    if kwargs.get('attn_mode') == 'fusion_avg' and len(ckpt.attn_modes) > 1:
        text += " (or attn_mode='fusion_max': the two have the same weights; pass the one it was trained with)"
    if 'num_classes' in kwargs:
        tune = dict(kwargs, num_classes=model.num_classes)
        text += (f'; or, to fine-tune it for {model.num_classes} classes, load it as pretrained weights: '
                 f'{_call(shown, tune, cli, path=path or "PATH")}')
    return text


def check_state_dict_fits(state_dict: Mapping[str, Any], model: nn.Module, check_classifier: bool = True,
                          model_name: Optional[str] = None, cli: bool = False, path: Optional[str] = None,
                          ignore: Sequence[str] = ()) -> None:
    """Raise a CheckpointError when ``state_dict`` does not load strictly into ``model``.

    The message sets the checkpoint's architecture beside the model's and says what to pass, as
    ``timm.create_model`` keywords or, with ``cli``, as train.py/validate.py/export flags; for other
    classes also how to fine-tune from it (``path``: the checkpoint's file). ``check_classifier=False``
    leaves out ``fc.*``, ``ignore`` other keys."""
    target = model.state_dict()
    skip = tuple(ignore) + (() if check_classifier else ('fc.weight', 'fc.bias'))
    # PyTorch 0.4 checkpoints have no BN step counters; they do not change outputs and torch fills them in.
    missing = [k for k in target if k not in state_dict and k not in skip and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict if k not in target and k not in skip]
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}'
                  for k in target if k in state_dict and k not in skip and state_dict[k].shape != target[k].shape]
    if not (missing or unexpected or mismatched):
        return
    ckpt, ours = inspect_state_dict(state_dict), inspect_state_dict(target)
    if getattr(model, 'attn_mode', None) in ours.attn_modes:  # fusion_avg / fusion_max: the model knows which
        ours = replace(ours, attn_modes=(model.attn_mode,))
    name = model_name or (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    raise CheckpointError(
        f'The checkpoint does not fit this {name} model.\n'
        f'  checkpoint: {ckpt.describe()}\n'
        f'  model:      {ours.describe()}\n'
        f'{_how_to_fit(ckpt, ours, name, check_classifier, cli, path)}\n'
        f'  missing keys ({len(missing)}): {_show(missing)}\n'
        f'  unexpected keys ({len(unexpected)}): {_show(unexpected)}\n'
        f'  shape mismatches ({len(mismatched)}): {_show(mismatched)}')


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """timm's pretrained filter: a timm or official GSoP checkpoint in the model's names, its fit checked.

    A classifier of other classes than the model's is replaced by the model's new one (fine-tuning)."""
    _, state_dict = state_dict_from_checkpoint(state_dict)
    own = model.state_dict()
    # timm adapts a stem of other input channels after this filter
    adapted = getattr(model, 'in_chans', 3) != 3
    check_state_dict_fits(state_dict, model, check_classifier=False, ignore=('conv1.weight',) if adapted else ())
    if any(k not in own or v.shape != own[k].shape for k, v in state_dict.items() if k.startswith('fc.')):
        state_dict = dict({k: v for k, v in state_dict.items() if not k.startswith('fc.')},
                          **{k: v for k, v in own.items() if k.startswith('fc.')})
    return state_dict


def create_gsop_model(model_cls: Type[nn.Module], variant: str, pretrained: bool = False,
                      feature_cfg: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
    """``build_model_with_cfg`` for the GSoP family, with the checkpoint filter.

    No weights are published: ``pretrained=True`` needs a file (``pretrained_cfg_overlay=dict(file=...)``)
    or an exported folder (``local-dir:``, ``hf-hub:``). A file keeps its classifier when it has the
    requested ``num_classes`` (timm would compare with the architecture's 1000 and replace it); with
    other classes the model gets a new one."""
    cfg = None
    if pretrained:
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=overlay)
        if not (cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict or cfg.source in ('hf-hub', 'local-dir')):
            raise RuntimeError(
                f'No pretrained weights are published for {variant}. Load a checkpoint file with '
                f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='PATH')) "
                f"(timm or official GSoP checkpoints), checkpoint_path='PATH', or an exported folder with "
                f"timm.create_model('local-dir:FOLDER', pretrained=True).")
        # a folder's config.json gives its classes
        if cfg.source not in ('hf-hub', 'local-dir') and 'num_classes' in kwargs and 'num_classes' not in overlay:
            kwargs['pretrained_cfg_overlay'] = dict(overlay, num_classes=kwargs['num_classes'])
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                    feature_cfg=feature_cfg, **kwargs)
    except (OSError, EOFError):  # timm's loader says FileNotFoundError() or EOFError(), with no message
        if cfg is not None and cfg.file and not cfg.state_dict:
            load_checkpoint_file(cfg.file)  # raises the reason
        raise
