"""Checkpoints of GSoP models: official GSoP names, what a state dict looks like, the load filter, the builder.

``checkpoint_filter_fn`` converts checkpoints of the official code (ZilinGao/Global-Second-order-Pooling-
Convolutional-Networks) and checks that a checkpoint fits the model; ``create_gsop_model`` is timm's
``build_model_with_cfg`` with that filter.
"""
import re
from typing import Any, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from timm.models import build_model_with_cfg
from timm.models._pretrained import PretrainedCfg

__all__ = ['checkpoint_filter_fn', 'convert_official_state_dict', 'is_official_state_dict', 'create_gsop_model']


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


def _official_keys_pre_hook(module, state_dict, prefix, *args) -> None:
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not is_official_state_dict({k[len(prefix):]: None for k in keys}):
        return
    converted = convert_official_state_dict({k[len(prefix):]: state_dict.pop(k) for k in keys})
    state_dict.update({prefix + k: v for k, v in converted.items()})


def describe_checkpoint(state_dict: Dict[str, Tensor]) -> str:
    """What a (converted) state dict looks like: depth, net, attention mode, attn_dim."""
    depth = 1 + max((int(m.group(1)) for k in state_dict for m in [re.match(r'layer3\.(\d+)\.', k)] if m), default=-1)
    depth_name = {6: 'resnet50', 23: 'resnet101'}.get(depth, f'{depth} blocks in stage 3')
    has_c = any('.attn.channel_gate.' in k for k in state_dict)
    has_p = any('.attn.position_gate.' in k for k in state_dict)
    has_f = any('.attn.fuse_' in k for k in state_dict)
    mode = ('fusion_concat' if has_f else 'fusion_avg or fusion_max' if has_c and has_p
            else 'channel' if has_c else 'position' if has_p else 'none')
    net = 'GSoP-Net2 (isqrt pool)' if 'global_pool.conv_reduce.weight' in state_dict else 'GSoP-Net1'
    dims = [v.shape[0] for k, v in state_dict.items() if k.endswith('gate.conv_reduce.weight')]
    dim = f', attn_dim={dims[0]}' if dims else ''
    return f'{depth_name}, {net}, attn_mode={mode}{dim}'


def check_state_dict_fits(
        state_dict: Dict[str, Tensor],
        model: nn.Module,
        skip: Tuple[str, ...] = (),
        hint: str = 'Create the model with the arguments the checkpoint was trained with '
                    '(model name, attn_mode, attn_dim).',
) -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped keys (and what the checkpoint looks like)."""
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict and k not in skip]
    unexpected = [k for k in state_dict if k not in target and k not in skip]
    mismatched = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}'
        for k in target if k in state_dict and k not in skip and state_dict[k].shape != target[k].shape]
    if not (missing or unexpected or mismatched):
        return

    def show(keys):
        return ', '.join(keys[:8]) + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '') if keys else 'none'
    raise ValueError(
        f'Checkpoint does not fit this model.\n'
        f'  checkpoint looks like: {describe_checkpoint(state_dict)}\n'
        f'  model is:              {describe_checkpoint(target)}\n'
        f'  missing keys: {show(missing)}\n'
        f'  unexpected keys: {show(unexpected)}\n'
        f'  shape mismatches: {show(mismatched)}\n'
        f'{hint}')


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Convert official GSoP checkpoints, and check that a checkpoint fits ``model``.

    A checkpoint for another architecture (depth, net, attention mode, attn_dim) raises a
    ValueError that lists the missing and unexpected keys and what the checkpoint looks like.
    The classifier is left to timm (it is dropped when num_classes differs).
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    if is_official_state_dict(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    check_state_dict_fits(state_dict, model, skip=('fc.weight', 'fc.bias'))
    return state_dict


def _has_weights_source(cfg: PretrainedCfg) -> bool:
    return bool(cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict or cfg.source in ('hf-hub', 'local-dir'))


def create_gsop_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool = False,
        feature_cfg: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """``build_model_with_cfg`` for the GSoP family, with the official checkpoint filter.

    ``pretrained=True`` without any weights source is an error that says how to load a file (timm
    would otherwise fail deep in its loader or fall back to random weights).
    """
    if 'attn_mode' in kwargs and kwargs['attn_mode'] is None:
        kwargs['attn_mode'] = 'none'  # timm's builder drops None kwargs; keep the ablation a string
    if pretrained:
        from timm.models import resolve_pretrained_cfg
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        if not _has_weights_source(cfg):
            raise RuntimeError(
                f'No pretrained weights are published for {variant}. Load a checkpoint file with '
                f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='PATH')) "
                f"(timm or official GSoP checkpoints), checkpoint_path='PATH', or an exported folder with "
                f"timm.create_model('local-dir:FOLDER', pretrained=True).")
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )
