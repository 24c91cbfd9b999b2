"""Checkpoints of GSoP-Nets: reading a file, the official code's names, and the error that sets a checkpoint's
architecture beside the model's. timm's pretrained loader ends in ``checkpoint_filter_fn`` (which also warm-starts
a GSoP-Net from a timm ResNet for the backbone tags); it, ``create_model(checkpoint_path=...)`` and train.py end
in ``GSoPNet.load_state_dict``."""
import argparse
import logging
import os
import re
import shlex
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from timm.models import clean_state_dict

__all__ = ['CheckpointError', 'StateDictArch', 'inspect_state_dict', 'check_finite', 'check_state_dict_fits',
           'load_checkpoint_file', 'state_dict_from_checkpoint', 'checkpoint_filter_fn',
           'convert_official_state_dict', 'is_official_state_dict', 'BACKBONE_TAG_SUFFIX', 'is_backbone_cfg']

_logger = logging.getLogger(__name__)

#: Pretrained tags ending so (``gsop_resnet50.a1_in1k_backbone``) load a timm ResNet's weights into the backbone.
BACKBONE_TAG_SUFFIX = '_backbone'
# What a GSoP-Net has and a ResNet has not: the GSoP blocks and GSoP-Net2's iSQRT-COV pool.
_GSOP_ONLY = re.compile(r'layer\d+\.\d+\.attn\.|global_pool\.')


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that cannot be read, is not finite or does not fit (a RuntimeError, as torch's raises)."""


# Official module names -> ours: inside a stage's bottleneck (layerN.i.NAME.*) or, for Net2's head, at the top.
_OFFICIAL_NAMES = {
    'conv_for_DR': 'attn.channel_gate.conv_reduce', 'bn_for_DR': 'attn.channel_gate.bn_reduce',
    'row_bn': 'attn.channel_gate.row_bn', 'row_conv_group': 'attn.channel_gate.row_conv',
    'fc_adapt_channels': 'attn.channel_gate.fc',
    'conv_for_DR_spatial': 'attn.position_gate.conv_reduce', 'bn_for_DR_spatial': 'attn.position_gate.bn_reduce',
    'row_bn_for_spatial': 'attn.position_gate.row_bn', 'row_conv_group_for_spatial': 'attn.position_gate.row_conv',
    'fc_adapt_channels_for_spatial': 'attn.position_gate.fc',
    'dilate_conv_for_concat1': 'attn.fuse_channel', 'dilate_conv_for_concat2': 'attn.fuse_position',
    'bn_for_concat': 'attn.fuse_bn', 'layer_reduce': 'global_pool.conv_reduce', 'layer_reduce_bn': 'global_pool.bn',
}
_OFFICIAL_KEY = re.compile(r'^(layer\d+\.\d+\.)?([^.]+)(\..+)$')


def _official_to_ours(key: str) -> str:
    m = _OFFICIAL_KEY.match(key)
    return f'{m[1] or ""}{_OFFICIAL_NAMES[m[2]]}{m[3]}' if m and m[2] in _OFFICIAL_NAMES else key


def is_official_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` has the official GSoP code's parameter names."""
    return any(isinstance(k, str) and _official_to_ours(k) != k for k in clean_state_dict(state_dict))


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A state dict of the official GSoP code (``module.`` prefix allowed) in our names; any other as it is."""
    bad = next((k for k in state_dict if not isinstance(k, str)), None)
    if bad is not None:
        raise CheckpointError(f'the state dict has a key {bad!r} of type {type(bad).__name__}: a state dict '
                              f'maps parameter names (strings) to tensors')
    cleaned = clean_state_dict(state_dict)
    out = {_official_to_ours(k): v for k, v in cleaned.items()}
    if list(out) == list(cleaned):  # no official name
        return state_dict
    for k in [k for k in out if k.endswith('.running_mean')]:  # PyTorch 0.4.0's BatchNorm counted no steps
        out.setdefault(k[:-len('running_mean')] + 'num_batches_tracked', torch.tensor(0))
    return out


def load_checkpoint_file(path: Any) -> Any:
    """A checkpoint file's content: ``torch.load(weights_only=True)`` (train.py's ``argparse.Namespace``
    args allowed, nothing else pickled), or a ``.safetensors`` file. Errors are one-line CheckpointErrors."""
    try:
        if str(path).endswith('.safetensors'):
            import safetensors.torch
            return safetensors.torch.load_file(str(path), device='cpu')
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except OSError as e:  # missing, a folder, a symlink loop, no permission
        raise CheckpointError(f'cannot read checkpoint {path}: {e.strerror or e}') from None
    except Exception as e:  # an empty or damaged file; blocked globals of a foreign pickle
        detail = ''.join(f': {line}' for line in str(e).strip().splitlines()[:1])
        raise CheckpointError(
            f'cannot read checkpoint {path}: {type(e).__name__}{detail}. The file is corrupted or truncated, or '
            f'holds pickled objects other than tensors and containers (torch.load(weights_only=True) refuses them).'
        ) from None


def state_dict_from_checkpoint(checkpoint: Any) -> Tuple[str, Dict[str, Tensor]]:
    """(entry, state dict) of a loaded checkpoint, in timm's order (EMA weights first; '' for a bare state
    dict), wrapper prefixes removed and official names converted; CheckpointError if it is none."""
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
    return source, clean_state_dict(convert_official_state_dict(state_dict))


@dataclass(frozen=True)
class StateDictArch:
    """The architecture a GSoP-Net state dict was saved from, read off its keys and shapes."""
    layers: Tuple[int, ...]  # blocks per stage
    attn_stages: Tuple[bool, ...]  # which stages hold a GSoP block
    attn_modes: Tuple[str, ...]  # the modes these weights fit: one, or ('fusion_avg', 'fusion_max'), or ('none',)
    attn_dim: Optional[int]
    isqrt_head: bool  # GSoP-Net2's iSQRT-COV pooling
    cov_dim: Optional[int]
    num_classes: int  # 0 without a classifier
    in_chans: Optional[int]
    preact: bool  # the CIFAR pre-activation ResNet (a final norm, no stem BN)
    attn_mode: Optional[str]  # the one of attn_modes, None where the weights cannot tell

    def describe(self) -> str:
        if not self.layers:
            return 'not a GSoP-Net/ResNet state dict (no layer1.* keys)'
        stages = ', '.join(str(i + 1) for i, on in enumerate(self.attn_stages) if on)
        head = f', iSQRT-COV head cov_dim={self.cov_dim}' if self.isqrt_head else ''
        return (f'layers={self.layers}, attn_mode={self.attn_mode or " or ".join(self.attn_modes)!r}, attn_dim='
                f'{self.attn_dim}, num_classes={self.num_classes} (GSoP-Net{2 if self.isqrt_head else 1}, '
                f'{f"GSoP blocks in stages {stages}" if stages else "no GSoP blocks"}{head}'
                f'{", pre-activation CIFAR ResNet" if self.preact else ""})')


def inspect_state_dict(state_dict: Mapping[str, Any]) -> StateDictArch:
    """What a state dict (this package's names) says about its architecture; needs shapes only."""
    blocks: Dict[int, int] = {}  # per stage
    attn = set()  # stages with a GSoP block
    for m in filter(None, (re.match(r'layer(\d+)\.(\d+)\.(attn\.)?', k) for k in state_dict)):
        blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
        if m[3]:
            attn.add(int(m[1]))
    gates = tuple(g for g in ('channel', 'position') if any(f'.attn.{g}_gate.' in k for k in state_dict))
    # fusion_avg and fusion_max have the same parameters: the keys cannot tell them apart
    modes = ('fusion_concat',) if any('.attn.fuse_' in k for k in state_dict) else \
        ('fusion_avg', 'fusion_max') if len(gates) == 2 else gates or ('none',)

    def dim(key: str, i: int = 0) -> Optional[int]:  # size ``i`` of the first tensor whose name matches ``key``
        shape = next((v.shape for k, v in state_dict.items() if re.fullmatch(key, k)), None)
        return shape[i] if shape is not None and len(shape) > i else None
    stages = sorted(blocks)
    return StateDictArch(
        layers=tuple(blocks[s] for s in stages), attn_stages=tuple(s in attn for s in stages), attn_modes=modes,
        attn_dim=dim(r'.*_gate\.conv_reduce\.weight'), isqrt_head='global_pool.conv_reduce.weight' in state_dict,
        cov_dim=dim(r'global_pool\.conv_reduce\.weight'), num_classes=dim(r'fc\.weight') or 0,
        in_chans=dim(r'conv1\.weight', 1), preact='norm.weight' in state_dict and 'bn1.weight' not in state_dict,
        attn_mode=modes[0] if len(modes) == 1 else None)


def check_finite(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None) -> None:
    """Raise a CheckpointError naming the tensors (real or complex) that hold NaN or inf, as stored or, for
    ``model``'s parameters, once cast to its dtype (float64 1e300 is inf in a float32 model)."""
    own, bad = model.state_dict() if model is not None else {}, []
    for k, v in state_dict.items():
        if isinstance(v, Tensor) and not v.is_meta and (v.is_floating_point() or v.is_complex()):
            if v.is_floating_point() and k in own and own[k].is_floating_point():
                v = v.to(own[k].dtype)
            # a sum is as cheap as a read; the exact test is for a non-finite sum, which may be an overflow
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
    counts = [f'--{k.replace("_", "-")} {kwargs[k]}' for k in ('num_classes', 'in_chans') if k in kwargs]
    return ' '.join(flags + counts)


# Blocks per stage of the registered variants (gsop_* and gsop2_*): the mismatch error names the one that fits.
_VARIANT_LAYERS = {(3, 4, 6, 3): 'resnet50', (3, 4, 23, 3): 'resnet101', (18, 18, 18): 'resnet164_cifar'}


def is_backbone_cfg(pretrained_cfg: Optional[Mapping[str, Any]]) -> bool:
    """Whether a model's pretrained cfg is a backbone tag's: its weights are a timm ResNet's, loaded into the backbone."""
    return str((pretrained_cfg or {}).get('tag') or '').endswith(BACKBONE_TAG_SUFFIX)


def _backbone_advice(ckpt: StateDictArch, model: StateDictArch, model_name: str) -> str:
    """What a backbone tag loads, and which GSoP-Net fits the ResNet checkpoint it was given."""
    from timm.models import list_pretrained  # the registry: not needed at import
    arch = model_name.split('.')[0]
    if not ckpt.layers:
        return ('It is not a ResNet checkpoint (no layer1.* keys): a backbone tag loads the weights of a timm '
                'ResNet (resnet50, resnet101) into the GSoP-Net of its depth.')
    if 'none' not in ckpt.attn_modes or ckpt.isqrt_head:
        return (f"It holds GSoP blocks: it is a GSoP-Net's checkpoint, not a ResNet's. Load it whole with the "
                f"untagged name: timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay=dict(file=...)).")
    if ckpt.layers != model.layers:
        variant = _VARIANT_LAYERS.get(ckpt.layers)
        tags = list_pretrained(f'{arch.split("_")[0]}_{variant}.*{BACKBONE_TAG_SUFFIX}') if variant else []
        return (f'Its backbone is a ResNet with layers={ckpt.layers}, the model\'s {model.layers}: warm-start the '
                f'GSoP-Net of its depth ({", ".join(tags)}).' if tags else
                f'Its backbone is a ResNet with layers={ckpt.layers}: no GSoP-Net has that depth.')
    return ("Its parameters differ from the backbone's as listed below: a backbone tag loads a plain timm ResNet "
            "(7x7 stem, no attention) of the model's depth.")


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
    if 'num_classes' in kwargs and (path or not cli):  # on a command line, where the file starts a new run
        tune = dict(kwargs, num_classes=model.num_classes)
        instead = ' in place of --initial-checkpoint' if cli else ''
        text += (f'; or, to fine-tune it for {model.num_classes} classes, load it as pretrained weights{instead}: '
                 f'{_call(shown, tune, cli, path=path or "PATH")}')
    return text


def check_state_dict_fits(state_dict: Mapping[str, Any], model: nn.Module, check_classifier: bool = True,
                          model_name: Optional[str] = None, cli: bool = False, path: Optional[str] = None,
                          ignore: Sequence[str] = (), backbone: bool = False) -> None:
    """Raise a CheckpointError when ``state_dict`` does not load strictly into ``model`` (but ``ignore`` and,
    without ``check_classifier``, ``fc.*``), saying what to pass: create_model keywords or, with ``cli``,
    train.py/validate.py/export flags; for other classes also how to fine-tune (from the file ``path``,
    which a command line names only where it starts a new run). ``backbone``: the state dict is a timm
    ResNet's for a backbone tag, which has no GSoP tensors and must fit all others."""
    target = model.state_dict()
    skip = set(ignore) | (set() if check_classifier else {'fc.weight', 'fc.bias'})
    new = {k for k in target if _GSOP_ONLY.match(k)} if backbone else set()  # a ResNet has none of them
    # PyTorch 0.4 checkpoints have no BN step counters; they do not change outputs and torch fills them in.
    missing = [k for k in target if k not in state_dict and k not in skip | new
               and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict if (k not in target or k in new) and k not in skip]
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}'
                  for k in target if k in state_dict and k not in skip | new and state_dict[k].shape != target[k].shape]
    if not (missing or unexpected or mismatched):
        return
    ckpt, ours = inspect_state_dict(state_dict), inspect_state_dict(target)
    if getattr(model, 'attn_mode', None) in ours.attn_modes:  # fusion_avg / fusion_max: the model knows which
        ours = replace(ours, attn_modes=(model.attn_mode,), attn_mode=model.attn_mode)
    name = model_name or (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    advice = _backbone_advice(ckpt, ours, name) if backbone else \
        _how_to_fit(ckpt, ours, name, check_classifier, cli, path)
    raise CheckpointError(
        f'The checkpoint does not fit this {name} model.\n'
        f'  checkpoint: {ckpt.describe()}\n'
        f'  model:      {ours.describe()}\n'
        f'{advice}\n'
        f'  missing keys ({len(missing)}): {_show(missing)}\n'
        f'  unexpected keys ({len(unexpected)}): {_show(unexpected)}\n'
        f'  shape mismatches ({len(mismatched)}): {_show(mismatched)}')


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """timm's pretrained filter: a timm or official GSoP checkpoint in the model's names, its fit checked.
    A classifier of other classes than the model's is replaced by the model's new one (fine-tuning).

    For a backbone tag (``gsop_resnet50.a1_in1k_backbone``) the checkpoint is a timm ResNet's: it must fit
    everything but the GSoP blocks (and GSoP-Net2's iSQRT-COV pool), which keep the model's own tensors, as
    a new classifier does; a warning line says what was loaded and what was not."""
    _, state_dict = state_dict_from_checkpoint(state_dict)
    own = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    backbone = is_backbone_cfg(cfg)
    adapted = getattr(model, 'in_chans', 3) != 3  # timm adapts a stem of other input channels after this filter
    check_state_dict_fits(state_dict, model, check_classifier=False, ignore=('conv1.weight',) if adapted else (),
                          backbone=backbone)
    if any(k not in own or v.shape != own[k].shape for k, v in state_dict.items() if k.startswith('fc.')):
        state_dict = dict({k: v for k, v in state_dict.items() if not k.startswith('fc.')},
                          **{k: v for k, v in own.items() if k.startswith('fc.')})
    if backbone:
        new = [k for k in own if _GSOP_ONLY.match(k)]
        state_dict = dict(state_dict, **{k: own[k] for k in new})
        fc = [k for k in own if k.startswith('fc.')]
        new_fc = [k for k in fc if state_dict[k] is own[k]]  # replaced above: other classes, or GSoP-Net2's head
        source = cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url') or 'the given state dict'
        _logger.warning(
            f'{cfg.get("architecture")}.{cfg.get("tag")}: loaded {len(own) - len(new) - len(new_fc)} tensors of '
            f'{source} (stem, stages{", classifier" if fc and not new_fc else ""}); the model\'s own '
            f'initialisation: {len(new)} GSoP tensors{f", the classifier ({len(new_fc)})" if new_fc else ""}')
    return state_dict
