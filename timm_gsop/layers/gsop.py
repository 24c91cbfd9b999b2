"""GSoP block: attention from global second-order pooling (Gao et al., CVPR 2019).

A reduced copy of the input gives a covariance matrix; a row-wise convolution and a 1x1 conv turn
it into a sigmoid gate that scales the input per channel (channel mode) or per position (position
mode), or both (three fusions). The block has timm's attention-layer interface, ``GSoPAttn(channels)``,
so it also serves as ``attn_layer`` of timm's own ResNet blocks.
"""
import math
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import register_notrace_function

from .covariance import covariance, position_covariance

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


class GSoPChannelGate(nn.Module):
    """Per-channel gate (B, C, 1, 1) from the (attn_dim x attn_dim) covariance of a reduced copy."""

    def __init__(
            self,
            channels: int,
            attn_dim: int = 128,
            reduce_stride: int = 1,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.reduce_stride = reduce_stride
        self.conv_reduce = nn.Conv2d(channels, attn_dim, kernel_size=1, stride=reduce_stride, bias=True, **dd)
        self.bn_reduce = norm_layer(attn_dim, **dd)
        self.act = act_layer(inplace=True)
        # Covariance rows are the channels of a BatchNorm2d, and each row gets its own 4 filters:
        # a grouped conv with one group per row (the paper's "row-wise convolution").
        self.row_bn = norm_layer(attn_dim, **dd)
        self.row_conv = nn.Conv2d(
            attn_dim, 4 * attn_dim, kernel_size=(attn_dim, 1), groups=attn_dim, bias=True, **dd)
        self.fc = nn.Conv2d(4 * attn_dim, channels, kernel_size=1, bias=True, **dd)

    def forward(self, x: Tensor) -> Tensor:
        if self.reduce_stride > 1:
            # A strided 1x1 conv reads one pixel in stride^2: take the ReLU copy of those only.
            s = self.reduce_stride
            x = F.conv2d(F.relu(x[:, :, ::s, ::s]), self.conv_reduce.weight, self.conv_reduce.bias)
        else:
            x = self.conv_reduce(F.relu(x))
        x = self.act(self.bn_reduce(x))
        x = covariance(x).unsqueeze(-1)  # (B, d, d, 1)
        x = _row_wise_conv(self.row_bn(x), self.row_conv.weight, self.row_conv.bias)  # (B, 4d), one bmm
        x = _pointwise(x, self.fc.weight, self.fc.bias)  # self.fc on a 1x1 map, as a linear layer
        return torch.sigmoid(x).view(x.shape[0], x.shape[1], 1, 1)


class GSoPPositionGate(nn.Module):
    """Per-position gate (B, 1, H, W) from the covariance of a (pool_size x pool_size) pooled map."""

    def __init__(
            self,
            channels: int,
            attn_dim: int = 128,
            pool_size: int = 8,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_pos = pool_size * pool_size
        self.pool_size = pool_size
        self.conv_reduce = nn.Conv2d(channels, attn_dim, kernel_size=1, bias=True, **dd)
        self.bn_reduce = norm_layer(attn_dim, **dd)
        self.row_bn = norm_layer(num_pos, **dd)
        self.row_conv = nn.Conv2d(
            num_pos, 4 * num_pos, kernel_size=(num_pos, 1), groups=num_pos, bias=True, **dd)
        self.act = act_layer(inplace=True)
        self.fc = nn.Conv2d(4 * num_pos, num_pos, kernel_size=1, bias=True, **dd)

    def forward(self, x: Tensor) -> Tensor:
        out_size = (x.shape[-2], x.shape[-1])
        x = self.bn_reduce(self.conv_reduce(F.relu(x)))  # no activation here in the official block
        x = F.adaptive_avg_pool2d(x, self.pool_size)
        x = position_covariance(x).unsqueeze(-1)  # (B, P, P, 1)
        x = _row_wise_conv(self.row_bn(x), self.row_conv.weight, self.row_conv.bias)  # (B, 4P)
        x = _pointwise(self.act(x), self.fc.weight, self.fc.bias)  # (B, P)
        x = torch.sigmoid(x).view(x.shape[0], 1, self.pool_size, self.pool_size)
        return F.adaptive_avg_pool2d(x, out_size)


def _row_wise_conv(mats: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The row-wise convolution of (B, R, R, 1) matrices, as a batched matrix product.

    ``weight`` (k * R, 1, R, 1) and ``bias`` are those of the grouped conv with one group per row
    and an (R, 1) kernel (``row_conv``); output channel ``k * i + j`` is row i dotted with filter
    ``weight[k * i + j]``, exactly as the conv computes it. One einsum (a bmm over the rows) is
    several times faster than the grouped conv on CPU, forward and backward. Returns (B, k * R).
    """
    rows = mats.flatten(2)  # (B, R, R)
    out = torch.einsum('bil,ikl->bik', rows, weight.reshape(rows.shape[1], -1, rows.shape[2])).flatten(1)
    if bias is not None:
        out = out + bias
    return out


def _pointwise(v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1 conv (``weight`` (C_out, C_in, 1, 1)) on (B, C_in) vectors, i.e. a 1x1 map: (B, C_out)."""
    return F.linear(v, weight.flatten(1), bias)


class _ChannelScaleAdd(torch.autograd.Function):
    """x * gate (+ shortcut) for a per-channel gate (B, C, 1, 1), with a leaner backward.

    Autograd's backward of addcmul forms grad * x at full size and then sums it over the positions
    for the gate's gradient; here each channel's gradient is a dot product of two (H*W) rows (one
    bmm), with no full-size temporary. On CPU a fresh full-size tensor costs page faults as well as
    a memory pass: at the stage-1 shape this backward is about 3x faster. The backward is made of
    differentiable ops on the saved inputs, so double backward works.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor, shortcut: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, gate)
        return x * gate if shortcut is None else torch.addcmul(shortcut, x, gate)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, gate = ctx.saved_tensors
        grad_x = grad * gate if ctx.needs_input_grad[0] else None
        grad_gate = None
        if ctx.needs_input_grad[1]:
            if grad.is_contiguous() and x.is_contiguous():
                b, c = x.shape[:2]
                dtype = torch.promote_types(grad.dtype, x.dtype)  # bmm wants one dtype (autocast mixes them)
                grad_gate = torch.bmm(
                    grad.reshape(b * c, 1, -1).to(dtype), x.reshape(b * c, -1, 1).to(dtype)).view(b, c, 1, 1)
            else:  # e.g. channels_last, where (B*C, H*W) rows are not a view
                grad_gate = (grad * x).sum((2, 3), keepdim=True)
        grad_shortcut = grad if ctx.needs_input_grad[2] else None
        return grad_x, grad_gate, grad_shortcut


@register_notrace_function
def channel_scale_add(x: Tensor, gate: Tensor, shortcut: Optional[Tensor] = None) -> Tensor:
    """``x * gate + shortcut`` (or ``x * gate``) for a (B, C, 1, 1) gate on a (B, C, H, W) map."""
    if torch.jit.is_scripting():  # TorchScript cannot call an autograd.Function
        return x * gate if shortcut is None else torch.addcmul(shortcut, x, gate)
    return _ChannelScaleAdd.apply(x, gate, shortcut)


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
        reduce_stride: stride of the channel-mode reduction conv (2 in ResNet's first stage).
        pool_size: side of the pooled map in position mode (8: a 64 x 64 covariance).

    ``forward(x)`` returns the scaled map; ``forward(x, shortcut)`` returns it plus ``shortcut``,
    in one pass where the mode allows (channel mode: a fused multiply-add).
    """

    def __init__(
            self,
            channels: int,
            attn_mode: str = 'channel',
            attn_dim: int = 128,
            reduce_stride: int = 1,
            pool_size: int = 8,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        mode = resolve_attn_mode(attn_mode)
        if mode is None:
            raise ValueError("GSoPAttn needs an attention mode; leave the layer out for attn_mode='none'.")
        if not isinstance(attn_dim, int) or attn_dim <= 0:
            raise ValueError(f'attn_dim must be a positive integer, got {attn_dim!r}')
        self.attn_mode = mode
        use_channel = mode != 'position'
        use_position = mode != 'channel'
        self.channel_gate = GSoPChannelGate(
            channels, attn_dim, reduce_stride, act_layer=act_layer, norm_layer=norm_layer, **dd) if use_channel else None
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
        if self.channel_gate is not None and self.position_gate is None:
            return channel_scale_add(x, self.channel_gate(x), shortcut)

        assert self.position_gate is not None
        by_position = (x * self.position_gate(x)).relu_()  # in place on a fresh product: one map less
        if self.channel_gate is None:
            # Not in place: the ReLU's backward reads its output.
            return by_position if shortcut is None else by_position + shortcut
        else:
            by_channel = channel_scale_add(x, self.channel_gate(x))
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
