"""Covariance pooling: the second-order statistic at the heart of GSoP.

Both functions take a feature map (B, C, *spatial) and never build the M x M centring matrix
of the textbook form: they centre by subtracting a mean (or an outer product of sums), so cost and
memory stay at one (C x M) @ (M x C) product (and, for ``covariance``, one product backward).
They compute in float32 whatever the input's precision (float64 stays float64) and return that: a
covariance in bf16/fp16 loses the small differences it is made of, and under autocast the layers
after it run in float32 too.
"""
import contextlib
import functools

import torch
from torch import Tensor
from timm.layers import register_notrace_function

__all__ = ['covariance', 'position_covariance', 'no_autocast', 'autocast_off', 'second_order_dtype', 'scaled_bmm']


def second_order_dtype(x: Tensor) -> torch.dtype:
    """The dtype second-order maths on ``x`` runs in: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def no_autocast(x: Tensor):
    """A context with autocast off on ``x``'s device (nothing to turn off where autocast does not exist: meta)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_off(fn):
    """Decorator: ``fn`` runs with autocast off on the device of its first tensor argument.

    TorchScript compiles ``fn`` itself (scripted code has no autocast to turn off, and cannot enter a context manager).
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = next(a for a in args if isinstance(a, Tensor))
        with no_autocast(x):
            return fn(*args, **kwargs)
    return wrapper


def scaled_bmm(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``alpha * (a @ b)`` for batches of matrices, scaled in the product's own kernel.

    ``baddbmm`` with ``beta=0`` ignores its ``input`` (nothing is read, NaN or not): an empty 0-d
    tensor stands in for it, so there is no separate pass over the result to scale it.
    """
    return torch.baddbmm(a.new_empty(()), a, b, beta=0., alpha=alpha)


class _Covariance(torch.autograd.Function):
    """Covariance of (B, C, M) rows over M, in ``dtype``; its backward is one matrix product.

    With Xc the centred input and G the incoming gradient, the gradient with respect to Xc is
    (1/M) (G + G^T) Xc. Its rows sum to zero because Xc's do, so the centring's adjoint (subtract
    each row's mean) leaves it unchanged: it is the gradient with respect to X as well, and the
    mean needs no backward pass of its own. Autograd through ``x - mean`` and a bmm would spend
    two products, the mean's reduction and broadcast, and two casts on it.

    The centred input is kept for the backward. Under ``create_graph`` the backward recomputes it
    from the saved input, so second derivatives see the centring too.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:
        # The mean is accumulated in ``dtype`` and the subtraction promotes to it: the centred map is
        # the only copy of the input in ``dtype``.
        xc = x - x.mean(dim=2, keepdim=True, dtype=dtype)
        ctx.save_for_backward(x, xc)
        return scaled_bmm(xc, xc.transpose(1, 2), 1. / x.shape[2])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, xc = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate through the centring as well
            xc = x - x.mean(dim=2, keepdim=True, dtype=xc.dtype)
        grad_x = scaled_bmm(grad + grad.transpose(1, 2), xc, 1. / x.shape[2])
        return grad_x.to(x.dtype), None


@register_notrace_function
@autocast_off
def covariance(x: Tensor) -> Tensor:
    """Covariance of the channels of ``x`` over its positions.

    Args:
        x: (B, C, *spatial) features, M = prod(spatial) positions.

    Returns:
        (B, C, C) matrices (1/M) * sum_m (x_m - mean)(x_m - mean)^T, in float32 (float64 for float64 ``x``).
    """
    x = x.flatten(2)
    dtype = second_order_dtype(x)
    if torch.jit.is_scripting():  # TorchScript cannot call an autograd.Function
        x = x - x.mean(dim=2, keepdim=True, dtype=dtype)
        return torch.bmm(x, x.transpose(1, 2)).div_(x.shape[2])
    return _Covariance.apply(x, dtype)


@register_notrace_function
@autocast_off
def position_covariance(x: Tensor) -> Tensor:
    """Second-order statistic between positions, as GSoP's position mode defines it.

    The official GSoP code centres over the d channels but normalises by the position count M:
    (1/M) X^T X - (1/M^2) s s^T with X the (d, M) map and s = X^T 1. This equals a covariance of the
    positions only when d == M; it is kept so that converted official weights behave as trained.

    Args:
        x: (B, d, *spatial) features, M = prod(spatial) positions.

    Returns:
        (B, M, M) matrices in float32 (float64 for float64 ``x``).
    """
    x = x.flatten(2).to(second_order_dtype(x))  # (B, d, M)
    m = x.shape[2]
    s = x.sum(dim=1).unsqueeze(2)  # (B, M, 1): per-position sum over channels
    outer = torch.bmm(s, s.transpose(1, 2))
    return torch.baddbmm(outer, x.transpose(1, 2), x, beta=-1.0 / (m * m), alpha=1.0 / m)
