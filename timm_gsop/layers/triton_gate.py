"""Triton kernels of the GSoP gate product: ``out = act(x * gate + shortcut)`` and its backward, one pass each.

``x`` and ``shortcut`` are (B, C, H, W) maps in any layout whose H and W collapse into one index (NCHW and
channels_last both do); ``gate`` holds one value per (B, C). The forward reads x and the shortcut once and writes
the output; the backward reads the gradient, the map and (with the ReLU) the output once, writes the map's and the
shortcut's gradients, and sums ``grad * x`` over positions in float32 for the gate's gradient, each program owning
a block of channels of one image (no atomics, the same sum in every run).

Launchers take and return tensors (no autograd); CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import wrap_triton

__all__ = ['gate_product_fwd', 'gate_product_bwd']

_BLOCK_C = 32
_BLOCK_HW = 64
# The backward holds five maps' tiles: 16 x 64 over 8 warps keeps it under 128 registers a thread (32 x 64 over 4
# took up to 254 on NCHW-strided maps: 2 blocks an SM, too few loads in flight for a memory-bound pass).
_BWD_BLOCK_C = 16
_BWD_NUM_WARPS = 8


@triton.jit
def _gate_product_fwd_kernel(
        x_ptr, gate_ptr, sc_ptr, out_ptr,
        C, HW,
        sx_b, sx_c, sx_hw,
        ss_b, ss_c, ss_hw,
        so_b, so_c, so_hw,
        HAS_SHORTCUT: tl.constexpr, RELU: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_hw < HW)[None, :]
    gate = tl.load(gate_ptr + b * C + offs_c, mask=mask_c, other=0.).to(tl.float32)
    x = tl.load(x_ptr + b * sx_b + offs_c[:, None] * sx_c + offs_hw[None, :] * sx_hw, mask=mask, other=0.)
    out = x.to(tl.float32) * gate[:, None]
    if HAS_SHORTCUT:
        sc = tl.load(sc_ptr + b * ss_b + offs_c[:, None] * ss_c + offs_hw[None, :] * ss_hw, mask=mask, other=0.)
        out += sc.to(tl.float32)
    if RELU:
        out = tl.where(out < 0., 0., out)  # NaN stays NaN, as in torch.relu (tl.maximum would drop it)
    tl.store(out_ptr + b * so_b + offs_c[:, None] * so_c + offs_hw[None, :] * so_hw,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_product_bwd_kernel(
        grad_ptr, x_ptr, gate_ptr, out_ptr, grad_x_ptr, grad_gate_ptr, grad_sc_ptr,
        C, HW,
        sg_b, sg_c, sg_hw,
        sx_b, sx_c, sx_hw,
        so_b, so_c, so_hw,
        sgx_b, sgx_c, sgx_hw,
        sgs_b, sgs_c, sgs_hw,
        RELU: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    gate = tl.load(gate_ptr + b * C + offs_c, mask=mask_c, other=0.).to(tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        offs_hw = start + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < HW)[None, :]
        c_off = offs_c[:, None]
        hw_off = offs_hw[None, :]
        g = tl.load(grad_ptr + b * sg_b + c_off * sg_c + hw_off * sg_hw, mask=mask, other=0.).to(tl.float32)
        if RELU:
            out = tl.load(out_ptr + b * so_b + c_off * so_c + hw_off * so_hw, mask=mask, other=0.)
            g = tl.where(out <= 0, 0., g)  # as torch's ReLU backward: a NaN output passes the gradient
            tl.store(grad_sc_ptr + b * sgs_b + c_off * sgs_c + hw_off * sgs_hw,
                     g.to(grad_sc_ptr.dtype.element_ty), mask=mask)
        x = tl.load(x_ptr + b * sx_b + c_off * sx_c + hw_off * sx_hw, mask=mask, other=0.).to(tl.float32)
        acc += g * x
        tl.store(grad_x_ptr + b * sgx_b + c_off * sgx_c + hw_off * sgx_hw,
                 (g * gate[:, None]).to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_gate_ptr + b * C + offs_c, tl.sum(acc, axis=1), mask=mask_c)


def _collapsible(t: Tensor) -> Tensor:
    """``t`` itself where its H and W index as one (stride_h == W * stride_w), else a contiguous copy."""
    if t.size(2) == 1 or t.stride(2) == t.size(3) * t.stride(3):
        return t
    return t.contiguous()


def _strides(t: Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(3)


def gate_product_fwd(x: Tensor, gate: Tensor, shortcut: Optional[Tensor], relu: bool) -> Tensor:
    """``act(x * gate + shortcut)`` for a (B, C, H, W) map and a (B, C, ...) gate; out in x's dtype and layout."""
    x = _collapsible(x)
    B, C, H, W = x.shape
    gate = gate.reshape(B, C).contiguous()
    out = torch.empty_like(x)
    sc = _collapsible(shortcut) if shortcut is not None else x
    grid = (B, triton.cdiv(C, _BLOCK_C), triton.cdiv(H * W, _BLOCK_HW))
    # wrap_triton: torch.compile traces the launch (inside the op's own eager call it is a plain launch).
    wrap_triton(_gate_product_fwd_kernel)[grid](
        x, gate, sc, out, C, H * W, *_strides(x), *_strides(sc), *_strides(out),
        HAS_SHORTCUT=shortcut is not None, RELU=relu, BLOCK_C=_BLOCK_C, BLOCK_HW=_BLOCK_HW)
    return out


def gate_product_bwd(grad: Tensor, x: Tensor, gate: Tensor, out: Optional[Tensor],
                     relu: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(grad_x, grad_gate (B, C) float32, grad_shortcut): the shortcut's gradient is the masked gradient with the
    ReLU, and None without it (it is ``grad`` itself)."""
    grad, x = _collapsible(grad), _collapsible(x)
    B, C, H, W = x.shape
    gate = gate.reshape(B, C).contiguous()
    grad_x = torch.empty_like(x, dtype=grad.dtype)
    grad_gate = torch.empty(B, C, device=x.device, dtype=torch.float32)
    if relu:
        assert out is not None
        out = _collapsible(out)
        grad_sc = torch.empty_like(grad)
    else:
        out = grad_sc = grad  # not read
    grid = (B, triton.cdiv(C, _BWD_BLOCK_C))
    wrap_triton(_gate_product_bwd_kernel)[grid](
        grad, x, gate, out, grad_x, grad_gate, grad_sc, C, H * W,
        *_strides(grad), *_strides(x), *_strides(out), *_strides(grad_x), *_strides(grad_sc),
        RELU=relu, BLOCK_C=_BWD_BLOCK_C, BLOCK_HW=_BLOCK_HW, num_warps=_BWD_NUM_WARPS)
    return grad_x, grad_gate, grad_sc if relu else None
