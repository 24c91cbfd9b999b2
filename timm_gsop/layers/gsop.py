"""GSoP block: attention from global second-order pooling (Gao et al., CVPR 2019).

A reduced copy of the input gives a covariance matrix; a row-wise convolution and a 1x1 conv turn
it into a sigmoid gate that scales the input per channel (channel mode) or per position (position
mode), or both (three fusions). The block has timm's attention-layer interface, ``GSoPAttn(channels)``,
so it also serves as ``attn_layer`` of timm's own ResNet blocks.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import LayerType, create_act_layer, get_norm_layer, register_notrace_module

from ._checks import check_positive_int
from .covariance import covariance, no_autocast, position_covariance
from .gate_ops import relu_copy, scale_add

__all__ = ['GSoPAttn', 'GSoPChannelGate', 'GSoPPositionGate', 'ATTN_MODES', 'resolve_attn_mode']

# Upstream names, in the official code's order.
ATTN_MODES: Tuple[str, ...] = ('channel', 'position', 'fusion_avg', 'fusion_max', 'fusion_concat')


def resolve_attn_mode(attn_mode: Optional[str]) -> Optional[str]:
    """Validate an attention mode; None and 'none' mean no GSoP block (the ablation baseline)."""
    if attn_mode is None or attn_mode == 'none':
        return None
    if attn_mode not in ATTN_MODES:
        raise ValueError(
            f"Unknown GSoP attn_mode {attn_mode!r}; valid: {', '.join(map(repr, ATTN_MODES))}, "
            f"or 'none' / None for no GSoP block.")
    return attn_mode


@register_notrace_module  # fx keeps the gate whole, so its float32 part stays free of autocast
class GSoPChannelGate(nn.Module):
    """Per-channel gate (B, C, 1, 1) from the (attn_dim x attn_dim) covariance of a reduced map.

    Takes the block's ReLU copy (``GSoPAttn`` makes it): 1x1 conv to ``attn_dim`` -> norm -> act ->
    covariance -> norm of its rows -> row-wise conv (4 filters a row) -> 1x1 conv to C -> sigmoid. From
    the covariance on, the gate computes in float32 (autocast off): the matrices are small, and no
    cast of a weight is needed. The gate comes back in the input's dtype.

    Args:
        channels: channels of the input map (and of the gate).
        attn_dim: channels of the reduced map, the covariance size (128).
        act_layer, norm_layer: classes or timm's names ('relu', 'batchnorm').
    """

    def __init__(
            self,
            channels: int,
            attn_dim: int = 128,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        norm_layer = get_norm_layer(norm_layer)
        self.conv_reduce = nn.Conv2d(channels, attn_dim, kernel_size=1, bias=True, **dd)
        self.bn_reduce = norm_layer(attn_dim, **dd)
        self.act = create_act_layer(act_layer, inplace=True)
        # The covariance's rows are the channels of a 2d norm, and each row gets its own 4 filters:
        # a grouped conv with one group per row and a (attn_dim x 1) kernel (the paper's "row-wise convolution").
        self.row_bn = norm_layer(attn_dim, **dd)
        self.row_conv = nn.Conv2d(
            attn_dim, 4 * attn_dim, kernel_size=(attn_dim, 1), groups=attn_dim, bias=True, **dd)
        self.fc = nn.Conv2d(4 * attn_dim, channels, kernel_size=1, bias=True, **dd)

    def _gate(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        x = covariance(x).to(self.row_conv.weight.dtype).unsqueeze(-1)  # (B, d, d, 1): a row per channel
        x = self.fc(self.row_conv(self.row_bn(x)))  # (B, C, 1, 1)
        return torch.sigmoid(x).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = self.act(self.bn_reduce(self.conv_reduce(x)))
        if torch.jit.is_scripting():
            return self._gate(x, dtype)
        with no_autocast(x):
            return self._gate(x, dtype)


@register_notrace_module  # fx keeps the gate whole, so its float32 part stays free of autocast
class GSoPPositionGate(nn.Module):
    """Per-position gate (B, 1, H, W) from the covariance of a (pool_size x pool_size) pooled map.

    Takes the block's ReLU copy: 1x1 conv to ``attn_dim`` -> norm -> average pool to pool_size x
    pool_size -> position covariance (P x P, P = pool_size^2) -> norm of its rows -> row-wise conv ->
    act -> 1x1 conv to P -> sigmoid, enlarged back to H x W. From the covariance on, in float32 as in
    the channel gate.
    """

    def __init__(
            self,
            channels: int,
            attn_dim: int = 128,
            pool_size: int = 8,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        norm_layer = get_norm_layer(norm_layer)
        num_pos = pool_size * pool_size
        self.pool_size = pool_size
        self.conv_reduce = nn.Conv2d(channels, attn_dim, kernel_size=1, bias=True, **dd)
        self.bn_reduce = norm_layer(attn_dim, **dd)
        self.row_bn = norm_layer(num_pos, **dd)
        self.row_conv = nn.Conv2d(
            num_pos, 4 * num_pos, kernel_size=(num_pos, 1), groups=num_pos, bias=True, **dd)
        self.act = create_act_layer(act_layer, inplace=True)
        self.fc = nn.Conv2d(4 * num_pos, num_pos, kernel_size=1, bias=True, **dd)

    def _gate(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        x = position_covariance(x).to(self.row_conv.weight.dtype).unsqueeze(-1)  # (B, P, P, 1)
        x = self.fc(self.act(self.row_conv(self.row_bn(x))))  # (B, P, 1, 1)
        return torch.sigmoid(x).to(dtype).view(x.shape[0], 1, self.pool_size, self.pool_size)

    def forward(self, x: Tensor) -> Tensor:
        out_size = (x.shape[-2], x.shape[-1])
        dtype = x.dtype
        x = self.bn_reduce(self.conv_reduce(x))  # no activation here in the official block
        x = F.adaptive_avg_pool2d(x, self.pool_size)
        if torch.jit.is_scripting():
            gate = self._gate(x, dtype)
        else:
            with no_autocast(x):
                gate = self._gate(x, dtype)
        return F.adaptive_avg_pool2d(gate, out_size)


def _concat_fuse_kernel(channels: int) -> Tuple[int, int, int]:
    """(groups, kernel height, padding) of the official concat fusion's (k x 1) grouped convs."""
    groups = max(1, channels // 64)
    while channels % groups:
        groups -= 1
    factor = max(-2, int(math.log2(32 / groups)))
    return groups, 2 * factor + 5, factor + 2


class GSoPAttn(nn.Module):
    """GSoP block with timm's attention-layer interface.

    Args:
        channels: channels of the input (and output).
        attn_mode: one of ``ATTN_MODES``: 'channel' scales channels, 'position' scales positions,
            'fusion_avg' / 'fusion_max' / 'fusion_concat' combine both (sum, max, or two (k x 1)
            grouped convs + BN), as the official code defines them.
        attn_dim: channels of the reduced copy, the covariance size in channel mode (128).
        reduce_stride: stride of the channel gate's 1x1 reduction (2 in ResNet's first stage, as in the
            official code). A 1x1 conv of stride s reads one pixel in s^2: the block takes those pixels
            for the gate's ReLU copy, so the copy and its gradient are 1/s^2 of the map.
        pool_size: side of the pooled map in position mode (8: a 64 x 64 covariance).
        act_layer, norm_layer: classes or timm's names ('relu', 'batchnorm').

    ``forward(x)`` returns the scaled map; ``forward(x, shortcut)`` returns it plus ``shortcut``,
    in one pass where the mode allows (channel mode: a fused multiply-add, one full-map pass instead
    of the two of a multiply and then an add).
    """

    def __init__(
            self,
            channels: int,
            attn_mode: str = 'channel',
            attn_dim: int = 128,
            reduce_stride: int = 1,
            pool_size: int = 8,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        mode = resolve_attn_mode(attn_mode)
        if mode is None:
            raise ValueError("GSoPAttn needs an attention mode; leave the layer out for attn_mode='none'.")
        for name, value in (('channels', channels), ('attn_dim', attn_dim), ('reduce_stride', reduce_stride),
                            ('pool_size', pool_size)):
            check_positive_int(name, value)
        norm_layer = get_norm_layer(norm_layer)
        self.attn_mode = mode
        self.reduce_stride = reduce_stride
        use_channel = mode != 'position'
        use_position = mode != 'channel'
        self.channel_gate = GSoPChannelGate(
            channels, attn_dim, act_layer=act_layer, norm_layer=norm_layer, **dd) if use_channel else None
        self.position_gate = GSoPPositionGate(
            channels, attn_dim, pool_size, act_layer=act_layer, norm_layer=norm_layer, **dd) if use_position else None
        if mode == 'fusion_concat':
            groups, k, pad = _concat_fuse_kernel(channels)
            self.fuse_channel = nn.Conv2d(channels, channels, (k, 1), padding=(pad, 0), groups=groups, **dd)
            self.fuse_position = nn.Conv2d(channels, channels, (k, 1), padding=(pad, 0), groups=groups, **dd)
            self.fuse_bn = norm_layer(channels, **dd)
        else:
            self.fuse_channel = None
            self.fuse_position = None
            self.fuse_bn = None

    def forward(self, x: Tensor, shortcut: Optional[Tensor] = None) -> Tensor:
        s = self.reduce_stride
        if self.position_gate is None:
            assert self.channel_gate is not None
            x, rectified = relu_copy(x, s)
            return scale_add(x, self.channel_gate(rectified), shortcut)

        x, rectified = relu_copy(x)
        by_position = (x * self.position_gate(rectified)).relu_()  # in place on a fresh product: one map less
        if self.channel_gate is None:
            # Not in place: the ReLU's backward reads its output.
            return by_position if shortcut is None else by_position + shortcut
        else:
            by_channel = scale_add(x, self.channel_gate(rectified[:, :, ::s, ::s]))
            if self.attn_mode == 'fusion_avg':
                # The official "average" is a plain sum; the next BN/conv absorbs the factor 1/2.
                out = by_channel + by_position
            elif self.attn_mode == 'fusion_max':
                out = torch.maximum(by_channel, by_position)
            else:
                assert self.fuse_channel is not None and self.fuse_position is not None and self.fuse_bn is not None
                out = self.fuse_bn(self.fuse_channel(by_channel) + self.fuse_position(by_position))
        # Each fusion's result is a fresh tensor whose backward does not read it: add in place.
        return out if shortcut is None else out.add_(shortcut)
