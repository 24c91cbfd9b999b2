"""Checkpoints of GSoP models: reading them and loading them, with the same checks on every path.

* Every load path checks the same things and raises the same ``CheckpointError`` (``_state_dict.py``):
  timm's pretrained loader (``pretrained_cfg_overlay``, ``hf-hub:``, ``local-dir:``) through
  ``checkpoint_filter_fn``; ``checkpoint_path=``, ``load_state_dict`` and train.py's resume through the
  models' load_state_dict pre-hook, which timm's loader ends in too. Checkpoints of the official code
  (ZilinGao/Global-Second-order-Pooling-Convolutional-Networks) are converted to this package's names
  on all of them.
* ``create_gsop_model`` is timm's ``build_model_with_cfg`` with that filter, and keeps a checkpoint
  file's classifier when it has the requested number of classes.
"""
import argparse
import os
import re
import sys
from typing import Any, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from timm.models import build_model_with_cfg, clean_state_dict
from timm.models._pretrained import PretrainedCfg

from ._state_dict import (
    CheckpointError, StateDictArch, check_finite, check_state_dict_fits, inspect_state_dict)

__all__ = [
    'CheckpointError', 'StateDictArch', 'inspect_state_dict', 'check_finite', 'check_state_dict_fits',
    'load_checkpoint_file', 'state_dict_from_checkpoint', 'checkpoint_filter_fn', 'convert_official_state_dict',
    'is_official_state_dict', 'create_gsop_model',
]


# --------------------------------------------------------------------------------------------------
# official names
# --------------------------------------------------------------------------------------------------

# Official parameter names -> ours: inside a stage's bottleneck (layerN.i.NAME.*), and Net2's head (NAME.*).
_OFFICIAL_BLOCK_NAMES = {
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
}
_OFFICIAL_HEAD_NAMES = {'layer_reduce': 'global_pool.conv_reduce', 'layer_reduce_bn': 'global_pool.bn'}
_OFFICIAL_BLOCK_KEY = re.compile(r'^(layer\d+\.\d+)\.([^.]+)\.(.+)$')
_OFFICIAL_MARKERS = ('conv_for_DR', 'row_conv_group', 'layer_reduce', 'dilate_conv_for_concat', 'fc_adapt_channels')


def _official_to_ours(key: str) -> str:
    m = _OFFICIAL_BLOCK_KEY.match(key)
    if m and m.group(2) in _OFFICIAL_BLOCK_NAMES:
        return f'{m.group(1)}.{_OFFICIAL_BLOCK_NAMES[m.group(2)]}.{m.group(3)}'
    module, _, rest = key.partition('.')
    return f'{_OFFICIAL_HEAD_NAMES[module]}.{rest}' if module in _OFFICIAL_HEAD_NAMES else key


def is_official_state_dict(state_dict: Dict[str, Any]) -> bool:
    """True for a state dict of the official GSoP code (its attention or Net2 head parameter names)."""
    return any(marker in k for k in state_dict for marker in _OFFICIAL_MARKERS)


def convert_official_state_dict(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Rename an official GSoP checkpoint's parameters (``module.`` prefix allowed) to ours.

    The official code ran on PyTorch 0.4.0, whose BatchNorm had no ``num_batches_tracked``: missing
    counters are added as zeros.
    """
    out = {_official_to_ours(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state_dict.items()}
    for k in list(out):
        if k.endswith('.running_mean'):
            out.setdefault(k[:-len('running_mean')] + 'num_batches_tracked', torch.tensor(0, dtype=torch.long))
    return out


# --------------------------------------------------------------------------------------------------
# reading checkpoint files
# --------------------------------------------------------------------------------------------------

def load_checkpoint_file(path: str, mmap: bool = False) -> Any:
    """A checkpoint file's content: ``torch.load(weights_only=True)`` (train.py's ``argparse.Namespace``
    args allowed, nothing else pickled), or a ``.safetensors`` file. ``mmap`` reads shapes without the data."""
    if str(path).endswith('.safetensors'):
        import safetensors.torch
        return safetensors.torch.load_file(str(path), device='cpu')
    with torch.serialization.safe_globals([argparse.Namespace]):
        if mmap:
            try:
                return torch.load(str(path), map_location='cpu', weights_only=True, mmap=True)
            except RuntimeError:  # files in the legacy (pre-zip) format cannot be mapped
                pass
        return torch.load(str(path), map_location='cpu', weights_only=True)


# Where a checkpoint keeps its weights, in timm's ``load_state_dict`` order (EMA weights first).
_STATE_DICT_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')


def state_dict_from_checkpoint(checkpoint: Dict[str, Any]) -> Tuple[str, Dict[str, Tensor]]:
    """(entry, state dict) of a loaded checkpoint, wrapper prefixes removed and official names converted.

    The entry is where the weights were found ('state_dict_ema', ..., or '' for a bare state dict).
    """
    source = next((k for k in _STATE_DICT_KEYS if isinstance(checkpoint.get(k), dict) and checkpoint[k]), '')
    state_dict = clean_state_dict(checkpoint[source] if source else checkpoint)
    if is_official_state_dict(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    return source, state_dict


# --------------------------------------------------------------------------------------------------
# the load paths
# --------------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """timm's pretrained filter: official names converted and the fit to ``model`` checked.

    A classifier of another size than the model's is left to timm, which replaces it (fine-tuning).
    Finite values are checked by the load_state_dict pre-hook, which this load path ends in too.
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    state_dict = clean_state_dict(state_dict)
    if is_official_state_dict(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    same_classes = inspect_state_dict(state_dict).num_classes == getattr(model, 'num_classes', None)
    check_state_dict_fits(state_dict, model, check_classifier=same_classes)
    return state_dict


def _official_keys_pre_hook(
        module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Dict, strict: bool,
        missing_keys, unexpected_keys, error_msgs,
) -> None:
    """``load_state_dict`` pre-hook (``checkpoint_path=``, ``load_state_dict``, train.py's resume, and
    the end of timm's pretrained loader): converts official names, rejects non-finite values and, in
    a strict load, explains a mismatch instead of torch's list of keys."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    own = {k[len(prefix):]: state_dict[k] for k in keys}
    if is_official_state_dict(own):
        for k in keys:
            del state_dict[k]
        own = convert_official_state_dict(own)
        state_dict.update({prefix + k: v for k, v in own.items()})
    check_finite(own)
    if _load_is_strict():
        check_state_dict_fits(own, module)


def _load_is_strict() -> bool:
    """The ``strict`` of the ``load_state_dict`` call running the pre-hook.

    torch hands its hooks strict=True whatever the caller passed, and a non-strict load (timm
    replacing a classifier, a partial checkpoint) must not be refused: read it from the caller's
    frame. Not found (an unusual caller): False, and torch's own check applies.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is nn.Module.load_state_dict.__code__:
            return bool(frame.f_locals.get('strict', True))
        frame = frame.f_back
    return False


def _has_weights_source(cfg: PretrainedCfg) -> bool:
    return bool(cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict or cfg.source in ('hf-hub', 'local-dir'))


def _classes_in_source(cfg: PretrainedCfg) -> Optional[int]:
    """Classifier outputs of a weights file (or state dict) given in the pretrained cfg; None when unknown.

    Exported folders (hf-hub:, local-dir:) say it in their config.json already. A file is memory-mapped:
    only its shapes are read here.
    """
    if cfg.source in ('hf-hub', 'local-dir'):
        return None
    try:
        if cfg.state_dict:
            state_dict = cfg.state_dict
        elif cfg.file and os.path.isfile(cfg.file):
            checkpoint = load_checkpoint_file(cfg.file, mmap=True)
            state_dict = state_dict_from_checkpoint(checkpoint)[1] if isinstance(checkpoint, dict) else {}
        else:
            return None
        return inspect_state_dict(clean_state_dict(state_dict)).num_classes or None
    except Exception:  # an unreadable file: timm's loader reports it
        return None


def create_gsop_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        feature_cfg: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """``build_model_with_cfg`` for the GSoP family, with the checkpoint filter.

    ``pretrained=True`` without any weights source is an error that says how to load a file (timm
    would otherwise fail deep in its loader or fall back to random weights). A weights file keeps its
    classifier when it has the requested ``num_classes`` (or when none is requested): timm compares
    with the architecture's default cfg (1000 classes) and would replace it with a random one.
    """
    if 'attn_mode' in kwargs and kwargs['attn_mode'] is None:
        kwargs['attn_mode'] = 'none'  # timm's builder drops None kwargs; keep the ablation a string
    if pretrained:
        from timm.models import resolve_pretrained_cfg
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=overlay)
        if not _has_weights_source(cfg):
            raise RuntimeError(
                f'No pretrained weights are published for {variant}. Load a checkpoint file with '
                f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='PATH')) "
                f"(timm or official GSoP checkpoints), checkpoint_path='PATH', or an exported folder with "
                f"timm.create_model('local-dir:FOLDER', pretrained=True).")
        source_classes = None if 'num_classes' in overlay else _classes_in_source(cfg)
        if source_classes is not None:
            kwargs.setdefault('num_classes', source_classes)
            kwargs['pretrained_cfg_overlay'] = dict(overlay, num_classes=source_classes)
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )
