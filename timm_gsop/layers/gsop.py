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

from ._checks import check_int
from .config import use_fused_gsop
from .covariance import autocast_off, covariance, position_covariance
from .fused_ops import batch_norm_stats_, bn_relu_cov, gate_product, join_reduction, relu_reduce
from .gate_ops import _relu_copy, scale_add

__all__ = [
    'GSoPAttn', 'GSoPChannelGate', 'GSoPPositionGate', 'ATTN_MODES', 'resolve_attn_mode', 'ReluConv2d',
    'BatchNormReluCov2d',
]

# Upstream names, in the official code's order.
ATTN_MODES: Tuple[str, ...] = ('channel', 'position', 'fusion_avg', 'fusion_max', 'fusion_concat')


def resolve_attn_mode(attn_mode: Optional[str]) -> Optional[str]:
    """Validate an attention mode; None and 'none' mean no GSoP block (the ablation baseline)."""
    if attn_mode is None or attn_mode == 'none':
        return None
    if attn_mode not in ATTN_MODES:
        raise ValueError(
            f"Unknown GSoP attn_mode {attn_mode!r}; valid: {', '.join(map(repr, ATTN_MODES))}, "
            f"or 'none' for the backbone without GSoP blocks.")
    return attn_mode


class ReluConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters) that also reads a full map with its ReLU applied on load.

    ``forward(x)`` is the conv; ``forward(x, relu_stride)`` is the conv of ``relu(x[..., ::s, ::s])`` as one fused
    op (``relu_reduce``) that never writes the ReLU copy: the fused GSoP path's reduction.
    """

    def forward(self, x: Tensor, relu_stride: Optional[int] = None) -> Tensor:
        if relu_stride is not None:
            if torch.jit.is_scripting():
                return self._conv_forward(F.relu(x[:, :, ::relu_stride, ::relu_stride]), self.weight, self.bias)
            return relu_reduce(x, self.weight, self.bias, relu_stride)
        return self._conv_forward(x, self.weight, self.bias)


class BatchNormReluCov2d(nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` (same parameters, buffers and statistics) that can also end in the covariance.

    ``forward(x)`` is the BatchNorm; ``forward(x, True)`` returns the (B, C, C) float32 covariance of
    ``relu(batch_norm(x))`` over each image's positions, as two fused ops (the batch statistics in training, then
    BatchNorm + ReLU + centring + Gram in one pass), updating the running statistics as the BatchNorm does.
    """

    def forward(self, x: Tensor, relu_cov: bool = False) -> Tensor:
        if relu_cov and not torch.jit.is_scripting():
            return self._relu_cov(x)
        assert not relu_cov, 'TorchScript runs the eager GSoP ops: the gate calls this BatchNorm with relu_cov=False'
        return self._batch_norm(x)

    def _batch_norm(self, x: Tensor) -> Tensor:
        # nn.BatchNorm2d.forward, which TorchScript cannot call from a subclass.
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x, self.running_mean if track else None, self.running_var if track else None, self.weight, self.bias,
            use_batch, factor, self.eps)

    def fusable(self) -> bool:
        """Whether the fused ops do what this BatchNorm does: affine, momentum-tracked running statistics."""
        return (self.affine and self.track_running_stats and self.momentum is not None
                and self.running_mean is not None and self.running_var is not None
                and self.num_batches_tracked is not None)

    @torch.jit.unused
    def _relu_cov(self, x: Tensor) -> Tensor:
        assert self.weight is not None and self.bias is not None and self.momentum is not None
        assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
        if self.training:
            if x.numel() // x.size(1) <= 1:
                raise ValueError(f'Expected more than 1 value per channel when training, got input size {x.size()}')
            mean, var = batch_norm_stats_(
                x, self.running_mean, self.running_var, self.num_batches_tracked, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return bn_relu_cov(x, mean, var, self.weight, self.bias, self.eps, self.training)


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

    With the fused GSoP ops (``use_fused_gsop()`` when built), a ReLU act and a BatchNorm2d norm, the gate also
    takes the block's map itself, ``forward(x, relu_stride)``: the reduction reads it with the ReLU on load and the
    BatchNorm + ReLU + covariance is one pass (``ReluConv2d`` and ``BatchNormReluCov2d``, same state dict).
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
        act = create_act_layer(act_layer, inplace=True)
        self.fused = use_fused_gsop() and norm_layer is nn.BatchNorm2d and type(act) is nn.ReLU
        conv_layer = ReluConv2d if self.fused else nn.Conv2d
        self.conv_reduce = conv_layer(channels, attn_dim, kernel_size=1, bias=True, **dd)
        self.bn_reduce = (BatchNormReluCov2d if self.fused else norm_layer)(attn_dim, **dd)
        self.act = act
        # The covariance's rows are the channels of a 2d norm, and each row gets its own 4 filters:
        # a grouped conv with one group per row and a (attn_dim x 1) kernel (the paper's "row-wise convolution").
        self.row_bn = norm_layer(attn_dim, **dd)
        self.row_conv = nn.Conv2d(
            attn_dim, 4 * attn_dim, kernel_size=(attn_dim, 1), groups=attn_dim, bias=True, **dd)
        self.fc = nn.Conv2d(4 * attn_dim, channels, kernel_size=1, bias=True, **dd)

    @torch.jit.unused
    def fusable(self) -> bool:
        """Whether ``forward(x, relu_stride)`` runs the fused ops (built fused, its parts not swapped since)."""
        return (self.fused and isinstance(self.conv_reduce, ReluConv2d) and type(self.bn_reduce) is BatchNormReluCov2d
                and self.bn_reduce.fusable() and type(self.act) is nn.ReLU and not torch.onnx.is_in_onnx_export())

    @autocast_off
    def _gate(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        x = x.to(self.row_conv.weight.dtype).unsqueeze(-1)  # (B, d, d, 1): a row per channel
        x = self.fc(self.row_conv(self.row_bn(x)))  # (B, C, 1, 1)
        return torch.sigmoid(x).to(dtype)

    def forward(self, x: Tensor, relu_stride: Optional[int] = None) -> Tensor:
        """The gate of the ReLU copy ``x`` or, with ``relu_stride`` (fused path), of the map ``x`` itself."""
        dtype = x.dtype
        if relu_stride is not None and not torch.jit.is_scripting() and self.fusable():
            x = self.bn_reduce(self.conv_reduce(x, relu_stride), True)
        else:
            if relu_stride is not None:
                x = F.relu(x[:, :, ::relu_stride, ::relu_stride])
            x = covariance(self.act(self.bn_reduce(self.conv_reduce(x))))
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

    @autocast_off
    def _gate(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        x = position_covariance(x).to(self.row_conv.weight.dtype).unsqueeze(-1)  # (B, P, P, 1)
        x = self.fc(self.act(self.row_conv(self.row_bn(x))))  # (B, P, 1, 1)
        return torch.sigmoid(x).to(dtype).view(x.shape[0], 1, self.pool_size, self.pool_size)

    def forward(self, x: Tensor) -> Tensor:
        out_size = (x.shape[-2], x.shape[-1])
        dtype = x.dtype
        x = self.bn_reduce(self.conv_reduce(x))  # no activation here in the official block
        x = F.adaptive_avg_pool2d(x, self.pool_size)
        return F.adaptive_avg_pool2d(self._gate(x, dtype), out_size)


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
    of the two of a multiply and then an add); ``forward(x, shortcut, True)`` ends in a ReLU (a bottleneck's own),
    in that same pass with the fused ops.

    The fused GSoP ops (``use_fused_gsop()`` when the layer is built) serve channel mode with a ReLU act and a
    BatchNorm2d norm; the position and fusion modes keep the eager ops.
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
            check_int(name, value)
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

    def forward(self, x: Tensor, shortcut: Optional[Tensor] = None, relu: bool = False) -> Tensor:
        s = self.reduce_stride
        if self.position_gate is None:
            assert self.channel_gate is not None
            if not torch.jit.is_scripting() and self.channel_gate.fusable():
                conv = self.channel_gate.conv_reduce
                x = join_reduction(x, conv.weight, conv.bias, s)  # the reduction's gradient joins the product's
                return gate_product(x, self.channel_gate(x, s), shortcut, relu)
            x, rectified = _relu_copy(x, s)
            out = scale_add(x, self.channel_gate(rectified), shortcut)
            return out.relu_() if relu else out  # scale_add's backward does not read its output

        x, rectified = _relu_copy(x)
        if self.channel_gate is None:
            by_position = x * self.position_gate(rectified)
            if shortcut is None:
                # A caller may add to the result in place (timm's blocks do): clamp_min's backward reads its
                # input, not its output, as the ReLU's would.
                return torch.clamp_min(by_position, 0.)
            out = by_position.relu_() + shortcut  # in place on a fresh product: one map less
            return out.relu_() if relu else out
        else:
            by_position = (x * self.position_gate(rectified)).relu_()  # in place on a fresh product: one map less
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
        if shortcut is not None:
            out = out.add_(shortcut)
        return out.relu_() if relu else out
