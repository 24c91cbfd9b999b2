"""The two full-size steps of a GSoP block around its gates, each with one backward for what autograd does in several.

A GSoP block reads its map ``x`` twice: a ReLU copy feeds the gate, and the gate scales ``x`` (plus the
residual shortcut). Both steps touch full feature maps, so their backward passes are what a block
costs on a GPU; the count of bytes and ops in ``benchmarks/traffic.py`` measures what each saves.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from timm.layers import register_notrace_function

__all__ = ['scale_add']

# Marks a gradient that a gate product's backward made and nothing else holds, so the backward of the map's other
# use may add into it in place.
_OWNED = '_gsop_owned_grad'


def _mark_owned(grad: Tensor) -> None:
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        setattr(grad, _OWNED, True)


def _take_owned(grad: Tensor) -> bool:
    """Whether ``grad`` is a gate product's own gradient (then unmarked: it is about to be used)."""
    owned = getattr(grad, _OWNED, False)
    if owned:
        delattr(grad, _OWNED)
    return owned


class _ReluCopy(torch.autograd.Function):
    """``(x, relu(x[..., ::s, ::s]))``: the map and the ReLU copy of every s-th pixel, with one backward.

    The gradients of the two outputs both reach ``x``. Autograd would mask the copy's gradient, scatter
    it into a full-size zero map where s > 1 (one per sliced dimension), and add two full maps. Here
    the masked gradient is added into the map's gradient in place: one pass over the map where s == 1,
    a pass over every s-th pixel where s > 1. It does so only where that gradient is the gate product's
    own fresh tensor (``scale_add``'s ``grad * gate``, marked by its backward; autograd may have added
    other branches' gradients into it); any other gradient (shared with another branch, a caller's
    ``grad_outputs``, an expanded one) gets an out-of-place sum, as under ``create_graph``, where the
    backward stays differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, stride: int) -> Tuple[Tensor, Tensor]:
        rectified = F.relu(x[:, :, ::stride, ::stride])
        ctx.save_for_backward(rectified)
        ctx.stride = stride
        return x, rectified

    @staticmethod
    def backward(ctx, grad_x: Tensor, grad_rectified: Tensor):
        rectified, = ctx.saved_tensors
        s = ctx.stride
        owned = _take_owned(grad_x)
        if torch.is_grad_enabled() or not owned:  # out of place (and differentiable under create_graph)
            grad_x = grad_x.clone(memory_format=torch.preserve_format)
            grad_x[:, :, ::s, ::s] += grad_rectified * (rectified > 0)
        elif s == 1:
            grad_x.addcmul_(grad_rectified, rectified > 0)
        else:
            grad_x[:, :, ::s, ::s].add_(torch.ops.aten.threshold_backward(grad_rectified, rectified, 0))
        return grad_x, None


@register_notrace_function
def _relu_copy(x: Tensor, stride: int = 1) -> Tuple[Tensor, Tensor]:
    """``(x, relu(x[..., ::stride, ::stride]))`` for a (B, C, H, W) map: what a GSoP block scales, and what its gate reads.

    The backward adds the copy's gradient into the map's in place where ``scale_add`` made that gradient.
    """
    if torch.jit.is_scripting():  # TorchScript cannot call an autograd.Function
        return x, F.relu(x[:, :, ::stride, ::stride])
    return _ReluCopy.apply(x, stride)


class _ScaleAdd(torch.autograd.Function):
    """``x * gate (+ shortcut)`` for a per-channel gate (B, C, 1, 1), with a backward two map passes shorter.

    Autograd's backward of ``addcmul`` forms ``x * value`` at full size before multiplying it with the
    gradient for the gate (its derivative formula scales the other factor first); here the gate's
    gradient is the sum over positions of ``grad * x``: one batched dot product per channel where
    (B*C, H*W) rows are a view (NCHW) and the two share a dtype, else a product and a sum
    (channels_last; or a float32 shortcut under autocast, which makes the gradient float32). The
    backward is made of differentiable ops on the saved inputs, so double backward works.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor, shortcut: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, gate)
        return x * gate if shortcut is None else torch.addcmul(shortcut, x, gate)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, gate = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * gate
            _mark_owned(grad_x)
        grad_gate = None
        if ctx.needs_input_grad[1]:
            if grad.dtype == x.dtype and grad.is_contiguous() and x.is_contiguous():
                b, c = x.shape[:2]
                grad_gate = torch.bmm(grad.reshape(b * c, 1, -1), x.reshape(b * c, -1, 1)).view(b, c, 1, 1)
            else:
                grad_gate = (grad * x).sum((2, 3), keepdim=True)
        grad_shortcut = grad if ctx.needs_input_grad[2] else None
        return grad_x, grad_gate, grad_shortcut


@register_notrace_function
def scale_add(x: Tensor, gate: Tensor, shortcut: Optional[Tensor] = None) -> Tensor:
    """``x * gate + shortcut`` (or ``x * gate``) for a (B, C, 1, 1) gate on a (B, C, H, W) map of its dtype."""
    if torch.jit.is_scripting():  # TorchScript cannot call an autograd.Function
        return x * gate if shortcut is None else torch.addcmul(shortcut, x, gate)
    return _ScaleAdd.apply(x, gate, shortcut)
