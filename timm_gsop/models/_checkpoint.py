"""Checkpoints of GSoP models: reading them, what a state dict says, and loading it with errors that explain.

* ``inspect_state_dict`` reads the architecture off a state dict's keys and shapes (blocks per stage,
  attention mode, attn_dim, head, classes). It is the one place that does: the load errors, the
  exporter's inference of model arguments and the model card all use it.
* Every load path checks the same things and raises the same ``CheckpointError``: timm's pretrained
  loader (``pretrained_cfg_overlay``, ``hf-hub:``, ``local-dir:``) through ``checkpoint_filter_fn``;
  ``checkpoint_path=``, ``load_state_dict`` and train.py's resume through the models' load_state_dict
  pre-hook. Checkpoints of the official code (ZilinGao/Global-Second-order-Pooling-Convolutional-
  Networks) are converted to this package's names on all of them.
* ``create_gsop_model`` is timm's ``build_model_with_cfg`` with that filter, and keeps a checkpoint
  file's classifier when it has the requested number of classes.
"""
import argparse
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from timm.models import build_model_with_cfg, clean_state_dict, create_model, is_model
from timm.models._pretrained import PretrainedCfg

__all__ = [
    'CheckpointError', 'StateDictArch', 'inspect_state_dict', 'check_finite', 'check_state_dict_fits',
    'load_checkpoint_file', 'state_dict_from_checkpoint', 'checkpoint_filter_fn', 'convert_official_state_dict',
    'is_official_state_dict', 'create_gsop_model',
]


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that does not fit the model, or holds non-finite values; the message says what to do.

    Both a ValueError (what the pretrained filter raised before) and a RuntimeError (what torch's
    ``load_state_dict`` raises), so that callers catching either keep working.
    """


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
        import shlex
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
            if _same_structure(candidate, ckpt):
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
