"""Fused GSoP ops (channel mode): each full-size pass of a GSoP block once, as ``torch.library`` ops.

* ``timm_gsop::relu_reduce``: the gate's 1x1 reduction of ``relu(x[..., ::s, ::s])``, the ReLU applied as the
  map is read, so no ReLU copy is written; its backward returns the masked data gradient and the weight's.
* ``timm_gsop::batch_norm_stats_``: a BatchNorm's batch mean and variance of the reduced map (float32), and its
  running statistics updated as ``nn.BatchNorm2d`` does.
* ``timm_gsop::bn_relu_cov``: BatchNorm + ReLU + centring + Gram of the reduced map, in float32, per image: the
  (d x d) covariance without writing the normalised map; its backward through the BN's batch statistics.
* ``timm_gsop::gate_product``: ``x * gate + shortcut`` and the block's ReLU in one pass, and one backward pass.

Each op is a ``triton_op``: on CUDA (and on the CPU under ``TRITON_INTERPRET=1``) it launches Triton kernels that
``torch.compile`` sees through; on every other device (and in float64) its kernel is the eager code below, which
defines what the Triton kernels compute. Autograd comes with the ops (``register_autograd``), so they can be
called from any module; the backward of a backward (``create_graph``) is refused with a one-line error.
"""
import functools
import importlib
import os
from types import ModuleType
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op
from timm.layers import register_notrace_function

from ._triton import is_cuda

__all__ = ['relu_reduce', 'join_reduction', 'batch_norm_stats_', 'bn_relu_cov', 'gate_product']

# Triton reads TRITON_INTERPRET when its kernels are defined: the CPU runs them only if it was set before.
_INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'


@functools.lru_cache(maxsize=None)
def _triton_module(name: str) -> Optional[ModuleType]:
    """The module of Triton launchers ``name`` in this package, or None where it or Triton is missing."""
    try:
        return importlib.import_module(f'.{name}', __package__)
    except ImportError:
        return None


def _kernels(name: str, t: Tensor) -> Optional[ModuleType]:
    """The launchers to use for ``t``: Triton's on CUDA (the CPU when interpreted), None for the eager kernel."""
    if t.dtype == torch.float64 or not (is_cuda(t) or (_INTERPRET and t.device.type == 'cpu')):
        return None
    return _triton_module(name)


def _refuse_double_backward() -> None:
    """One line instead of torch's generic error: the ops' backward passes are not differentiable."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            'The fused GSoP ops have no double backward (create_graph=True): build the model with them off '
            '(TIMM_GSOP_FUSED=0, or timm_gsop.layers.set_fused_gsop(False) before create_model).')


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- the reduction: 1x1 conv of relu(x[..., ::s, ::s]) ----

@triton_op('timm_gsop::relu_reduce', mutates_args=())
def _relu_reduce(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    """(B, d, ceil(H/s), ceil(W/s)) = conv1x1(relu(x[:, :, ::s, ::s])) + bias, weight (d, C, 1, 1), in x's dtype."""
    kernels = _kernels('triton_relu_reduce', x)
    if kernels is not None:
        return kernels.relu_reduce_fwd(x, weight.flatten(1), bias, stride)
    return F.conv2d(F.relu(x[:, :, ::stride, ::stride]), weight.to(x.dtype),
                    None if bias is None else bias.to(x.dtype))


@triton_op('timm_gsop::relu_reduce_backward', mutates_args=())
def _relu_reduce_backward(grad_in: Optional[Tensor], grad_y: Tensor, x: Tensor, weight: Tensor,
                          stride: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias): the data gradient, masked by x > 0 at the strided pixels, plus the map's
    other gradient ``grad_in`` (None: zero) in a new tensor; the weight's and bias's, accumulated in float32, in the
    weight's dtype."""
    kernels = _kernels('triton_relu_reduce', x)
    if kernels is not None:
        grad_x, grad_w, grad_b = kernels.relu_reduce_bwd(grad_in, grad_y, x, weight.flatten(1), stride)
        return grad_x, grad_w.view_as(weight).to(weight.dtype), grad_b.to(weight.dtype)
    s = stride
    acc = _acc_dtype(x)
    xs = x[:, :, ::s, ::s]
    g = grad_y.to(acc)
    grad_w = torch.einsum('bdhw,bchw->dc', g, F.relu(xs).to(acc))
    grad_xs = torch.ops.aten.threshold_backward(torch.einsum('bdhw,dc->bchw', g, weight.flatten(1).to(acc)), xs, 0)
    grad_x = torch.zeros_like(x) if grad_in is None else grad_in.clone(memory_format=torch.preserve_format)
    grad_x[:, :, ::s, ::s] += grad_xs.to(grad_x.dtype)
    return grad_x, grad_w.view_as(weight).to(weight.dtype), g.sum((0, 2, 3)).to(weight.dtype)


def _relu_reduce_setup(ctx, inputs, output) -> None:
    x, weight, bias, stride = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride = stride
    ctx.has_bias = bias is not None


def _relu_reduce_bwd(ctx, grad_y: Tensor):
    _refuse_double_backward()
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = torch.ops.timm_gsop.relu_reduce_backward(None, grad_y, x, weight, ctx.stride)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None


_relu_reduce.register_autograd(_relu_reduce_bwd, setup_context=_relu_reduce_setup)


class _ReductionLink:
    """What the reduction's backward leaves for ``_JoinReduction``'s: the gradient of the reduced map."""
    __slots__ = ('grad_y', 'stride')

    def __init__(self, stride: int):
        self.grad_y: Optional[Tensor] = None
        self.stride = stride


_LINK = '_gsop_reduction_link'


class _JoinReduction(torch.autograd.Function):
    """``x`` itself, for a GSoP block to scale and reduce; its backward adds the reduction's data gradient to the
    map's other gradient in the reduction's own backward kernel (it reads that gradient and writes the sum: no
    full-size gradient of the reduction's and no separate sum of two), with the weight's gradient from the same
    pass. The incoming gradient is only read: a hook or ``retain_grad`` that keeps it sees it unchanged.

    The reduction (``_DeferredReluReduce``) leaves its incoming gradient on the link; autograd runs this backward
    after it, as the reduction reads this output.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], link: _ReductionLink) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.link = link
        ctx.has_bias = bias is not None
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Optional[Tensor]):
        _refuse_double_backward()
        x, weight = ctx.saved_tensors
        link = ctx.link
        if link.grad_y is None:  # the reduction took no part in the loss
            return grad, None, None, None
        grad, grad_w, grad_b = torch.ops.timm_gsop.relu_reduce_backward(grad, link.grad_y, x, weight, link.stride)
        link.grad_y = None
        return grad, grad_w, grad_b if ctx.has_bias else None, None


class _DeferredReluReduce(torch.autograd.Function):
    """``relu_reduce`` of the map ``_JoinReduction`` made: its backward hands the gradient on to that one's."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, link: _ReductionLink) -> Tensor:
        ctx.link = link
        return torch.ops.timm_gsop.relu_reduce(x, weight, bias, stride)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        _refuse_double_backward()
        ctx.link.grad_y = grad_y
        return None, None, None, None, None


@register_notrace_function  # fx: a call in the graph, its checks at run time
def join_reduction(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    """``x``, marked so that ``relu_reduce`` of it adds its data gradient to the returned map's other gradient in
    one pass (eager autograd; elsewhere ``x`` itself and the plain ops)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or not x.requires_grad:
        return x
    link = _ReductionLink(stride)
    out = _JoinReduction.apply(x, weight, bias, link)
    setattr(out, _LINK, link)
    return out


def relu_reduce(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    """``conv2d(relu(x[:, :, ::stride, ::stride]), weight, bias)`` for a 1x1 ``weight``, reading ``x`` once."""
    link = getattr(x, _LINK, None)
    if link is not None and link.stride == stride and torch.is_grad_enabled():
        return _DeferredReluReduce.apply(x, weight, bias, stride, link)
    return torch.ops.timm_gsop.relu_reduce(x, weight, bias, stride)


# ---- BatchNorm statistics of the reduced map ----

@triton_op('timm_gsop::batch_norm_stats_',
           mutates_args=('running_mean', 'running_var', 'num_batches_tracked'))
def _batch_norm_stats_(y: Tensor, running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
                       momentum: float) -> Tuple[Tensor, Tensor]:
    """(mean, biased variance) over (B, H, W) in float32; the running statistics move by ``momentum`` (the
    variance's unbiased) and the batch count by one, as nn.BatchNorm2d updates them."""
    kernels = _kernels('triton_bn_relu_cov', y)
    if kernels is not None:
        mean, var = kernels.channel_stats(y)
    else:
        var, mean = torch.var_mean(y.to(_acc_dtype(y)), dim=(0, 2, 3), correction=0)
    n = y.numel() // y.size(1)
    running_mean.mul_(1. - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1. - momentum).add_((var * (n / max(n - 1, 1))).to(running_var.dtype), alpha=momentum)
    num_batches_tracked.add_(1)
    return mean, var


def batch_norm_stats_(y: Tensor, running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
                      momentum: float) -> Tuple[Tensor, Tensor]:
    """Batch mean and biased variance of ``y`` per channel (float32), updating the running statistics in place."""
    return torch.ops.timm_gsop.batch_norm_stats_(y.detach(), running_mean, running_var, num_batches_tracked, momentum)


# ---- BatchNorm + ReLU + covariance ----

def _normalised(y: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(xhat, a, invstd) of the eager kernels: a = xhat * weight + bias, flattened to (B, d, M), in float32/64."""
    acc = _acc_dtype(y)
    invstd = torch.rsqrt(var.to(acc) + eps)
    xhat = (y.to(acc).flatten(2) - mean.to(acc)[:, None]) * invstd[:, None]
    return xhat, xhat * weight.to(acc)[:, None] + bias.to(acc)[:, None], invstd


@triton_op('timm_gsop::bn_relu_cov', mutates_args=())
def _bn_relu_cov(y: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float,
                 training: bool) -> Tuple[Tensor, Tensor]:
    """(cov (B, d, d), zmean (B, d)) of z = relu(BN(y)) over each image's positions, in float32 (float64 for
    float64 ``y``). ``training`` says that mean and var are this batch's (the backward then goes through them)."""
    kernels = _kernels('triton_bn_relu_cov', y)
    if kernels is not None:
        invstd = torch.rsqrt(var.float() + eps)
        return kernels.bn_relu_cov_fwd(y, mean.float(), invstd, weight, bias)
    _, a, _ = _normalised(y, mean, var, weight, bias, eps)
    z = a.relu_()
    zmean = z.mean(2)
    z = z - zmean[:, :, None]
    return torch.baddbmm(z.new_empty(()), z, z.transpose(1, 2), beta=0., alpha=1. / z.shape[2]), zmean


@triton_op('timm_gsop::bn_relu_cov_backward', mutates_args=())
def _bn_relu_cov_backward(grad_cov: Tensor, y: Tensor, zmean: Tensor, mean: Tensor, var: Tensor, weight: Tensor,
                          bias: Tensor, eps: float, training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_y in y's dtype, grad_weight, grad_bias in the weight's dtype) of ``bn_relu_cov``."""
    kernels = _kernels('triton_bn_relu_cov', y)
    if kernels is not None:
        invstd = torch.rsqrt(var.float() + eps)
        grad_y, grad_w, grad_b = kernels.bn_relu_cov_bwd(
            grad_cov, y, zmean, mean.float(), invstd, weight, bias, training)
        return grad_y, grad_w.to(weight.dtype), grad_b.to(weight.dtype)
    xhat, a, invstd = _normalised(y, mean, var, weight, bias, eps)
    m = a.shape[2]
    zc = a.relu() - zmean[:, :, None]
    # The centring's adjoint leaves (G + G^T) zc / M as it is: its rows sum to zero, as zc's do.
    grad_cov = grad_cov.to(zc.dtype)
    grad_a = torch.baddbmm(zc.new_empty(()), grad_cov + grad_cov.transpose(1, 2), zc, beta=0., alpha=1. / m)
    grad_a = torch.ops.aten.threshold_backward(grad_a, a, 0)  # torch's ReLU backward: NaN passes
    grad_w = (grad_a * xhat).sum((0, 2))
    grad_b = grad_a.sum((0, 2))
    grad_xhat = grad_a * weight.to(grad_a.dtype)[:, None]
    if training:  # through the batch mean and variance
        n = grad_a.shape[0] * m
        grad_xhat = grad_xhat - (grad_b * weight.to(grad_a.dtype) / n)[:, None] - xhat * (grad_w * weight.to(
            grad_a.dtype) / n)[:, None]
    grad_y = (grad_xhat * invstd[:, None]).view_as(y).to(y.dtype)
    return grad_y, grad_w.to(weight.dtype), grad_b.to(weight.dtype)


def _bn_relu_cov_setup(ctx, inputs, output) -> None:
    y, mean, var, weight, bias, eps, training = inputs
    ctx.save_for_backward(y, output[1], mean, var, weight, bias)
    ctx.eps, ctx.training = eps, training
    ctx.mark_non_differentiable(output[1])


def _bn_relu_cov_bwd(ctx, grad_cov: Tensor, grad_zmean: Optional[Tensor]):
    _refuse_double_backward()
    y, zmean, mean, var, weight, bias = ctx.saved_tensors
    grad_y, grad_w, grad_b = torch.ops.timm_gsop.bn_relu_cov_backward(
        grad_cov, y, zmean, mean, var, weight, bias, ctx.eps, ctx.training)
    return grad_y, None, None, grad_w, grad_b, None, None


_bn_relu_cov.register_autograd(_bn_relu_cov_bwd, setup_context=_bn_relu_cov_setup)


def bn_relu_cov(y: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float,
                training: bool) -> Tensor:
    """Covariance (B, d, d) of relu(batch_norm(y)) over each image's positions, in float32 (float64 for float64).

    ``mean`` and ``var`` (biased) are the batch's own where ``training`` (the gradient then flows through them, as
    through a BatchNorm in training), else the running statistics.
    """
    return torch.ops.timm_gsop.bn_relu_cov(y, mean.detach(), var.detach(), weight, bias, eps, training)[0]


# ---- the gate product ----

@triton_op('timm_gsop::gate_product', mutates_args=())
def _gate_product(x: Tensor, gate: Tensor, shortcut: Optional[Tensor], relu: bool) -> Tensor:
    """``x * gate (+ shortcut)``, then ReLU if ``relu``: (B, C, H, W) map, (B, C, 1, 1) gate, in x's dtype."""
    kernels = _kernels('triton_gate', x)
    if kernels is not None:
        return kernels.gate_product_fwd(x, gate, shortcut, relu)
    out = x * gate if shortcut is None else torch.addcmul(shortcut, x, gate)
    return out.relu_() if relu else out


@triton_op('timm_gsop::gate_product_backward', mutates_args=())
def _gate_product_backward(grad: Tensor, x: Tensor, gate: Tensor, out: Tensor,
                           relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_gate, grad_shortcut): the gradient masked by ``out > 0`` (with the ReLU) times the gate; the
    gate's, summed over positions in float32; the shortcut's (the masked gradient; empty without the ReLU, where it
    is ``grad`` itself). ``out`` is read only with the ReLU."""
    kernels = _kernels('triton_gate', x)
    if kernels is not None:
        grad_x, grad_gate, grad_sc = kernels.gate_product_bwd(grad, x, gate, out if relu else None, relu)
    else:
        if relu:
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        grad_x = grad * gate
        acc = _acc_dtype(x)
        grad_gate = torch.einsum('bchw,bchw->bc', grad.to(acc), x.to(acc))
        grad_sc = grad if relu else None
    grad_gate = grad_gate.view(gate.shape).to(gate.dtype)
    return grad_x, grad_gate, grad_sc if grad_sc is not None else grad.new_empty(0)


def _gate_product_setup(ctx, inputs, output) -> None:
    x, gate, shortcut, relu = inputs
    ctx.save_for_backward(x, gate, output if relu else None)
    ctx.relu = relu
    ctx.has_shortcut = shortcut is not None


def _gate_product_bwd(ctx, grad: Tensor):
    _refuse_double_backward()
    x, gate, out = ctx.saved_tensors
    grad_x, grad_gate, grad_sc = torch.ops.timm_gsop.gate_product_backward(
        grad, x, gate, out if ctx.relu else x, ctx.relu)
    if not ctx.has_shortcut:
        grad_sc = None
    elif not ctx.relu:
        grad_sc = grad
    return grad_x, grad_gate, grad_sc, None


_gate_product.register_autograd(_gate_product_bwd, setup_context=_gate_product_setup)


@register_notrace_function
def gate_product(x: Tensor, gate: Tensor, shortcut: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """``x * gate + shortcut`` (or ``x * gate``) for a (B, C, 1, 1) gate, and its ReLU if ``relu``: one pass."""
    return torch.ops.timm_gsop.gate_product(x, gate, shortcut, relu)
