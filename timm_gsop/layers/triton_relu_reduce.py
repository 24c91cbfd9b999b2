"""Triton kernels for the channel gate's reduction: a 1x1 conv of ``relu(x[:, :, ::s, ::s])`` as one GEMM.

The GEMM runs over the rows ``m = (b, ho, wo)`` of the strided map, ``(B*Ho*Wo, C) @ (C, d)``, and
applies the ReLU (and the stride) as it loads the map, so the block never writes a ReLU copy. Its
backward reads the map again instead of a saved copy: the data gradient's epilogue masks by ``x > 0``
and adds into the map's gradient in place; the weight gradient applies the same ReLU on load.

The launchers are plain functions (no autograd) that launch through ``torch.library.wrap_triton``,
so a ``torch.library.triton_op`` can call them and ``torch.compile`` traces into the kernels. They
run on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), which is how the tests check them.

Every map may have any strides (NCHW or channels_last): the kernels take them from the tensors.
Products run in the map's dtype (a float32 weight is cast to it, as autocast does) and accumulate in
float32, or in float64 for float64 maps. A float32 GEMM uses TF32 where eager 1x1 convs do
(``torch.backends.cudnn.allow_tf32``).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import is_cuda, multi_processor_count, wrap_triton

__all__ = ['relu_reduce_fwd', 'relu_reduce_bwd']


@triton.jit
def _row_index(rows, hw_out, w_out):
    """(b, ho, wo) of rows ``m = (b, ho, wo)`` of the strided map, in 32-bit (fast) integer division."""
    b = rows // hw_out
    r = rows - b * hw_out
    ho = r // w_out
    return b, ho, r - ho * w_out


@triton.jit
def _offsets(b, ho, wo, stride_b, step_h, step_w):
    """Element offsets of the rows; ``step_h``/``step_w`` are a map's strides times the gate's stride.

    Only the batch term is 64-bit: a whole batch may pass 2**31 elements, one image may not.
    """
    return b.to(tl.int64) * stride_b + (ho * step_h + wo * step_w)


@triton.jit
def _dot_operand(t, x_ptr, acc, UPCAST_DOT: tl.constexpr):
    """A GEMM operand rounded to the map's dtype; with UPCAST_DOT, held in the accumulator's dtype.

    The interpreter's dot multiplies a bfloat16's raw bits; bfloat16 products are exact in float32, so
    the upcast operands give the same sums as the GPU's bfloat16 dot.
    """
    t = t.to(x_ptr.dtype.element_ty)
    if UPCAST_DOT:
        t = t.to(acc.dtype)
    return t


@triton.jit
def _relu_reduce_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, y_ptr,
        M, C, D, hw_out, w_out,
        sx_b, sx_c, sx_h, sx_w,
        sw_d, sw_c,
        HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < D
    b, ho, wo = _row_index(rm, hw_out, w_out)
    x_ptrs = x_ptr + _offsets(b, ho, wo, sx_b, sx_h, sx_w)[:, None] + rk[None, :] * sx_c
    w_ptrs = w_ptr + rk[:, None] * sw_c + rn[None, :] * sw_d
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        mask_k = k0 + rk < C
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(acc.dtype)
        a = _dot_operand(tl.where(a < 0, 0.0, a), x_ptr, acc, UPCAST_DOT)  # ReLU on load; NaN stays NaN, as in torch
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, _dot_operand(w, x_ptr, acc, UPCAST_DOT), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * sx_c
        w_ptrs += BLOCK_K * sw_c
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * D + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _relu_reduce_bwd_data_kernel(
        gy_ptr, w_ptr, x_ptr, gx_in_ptr, gx_ptr,
        M, C, D, hw_out, w_out,
        sg_b, sg_d, sg_h, sg_w,
        sx_b, sx_c, sx_h, sx_w,
        sgi_b, sgi_c, sgi_h, sgi_w,
        sgx_b, sgx_c, sgx_h, sgx_w,
        sw_d, sw_c,
        HAS_GRAD_IN: tl.constexpr, ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``grad_x[rows, c] = grad_in[rows, c] + (grad_y @ W)[m, c] * (x > 0)`` at the strided rows (without
    HAS_GRAD_IN, grad_in is zero); other positions untouched. grad_in may be grad_x itself (in place)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_c = rc < C
    b, ho, wo = _row_index(rm, hw_out, w_out)
    g_ptrs = gy_ptr + _offsets(b, ho, wo, sg_b, sg_h, sg_w)[:, None] + rk[None, :] * sg_d
    w_ptrs = w_ptr + rk[:, None] * sw_d + rc[None, :] * sw_c
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = k0 + rk < D
        g = tl.load(g_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(_dot_operand(g, x_ptr, acc, UPCAST_DOT), _dot_operand(w, x_ptr, acc, UPCAST_DOT), acc,
                     input_precision=INPUT_PRECISION)
        g_ptrs += BLOCK_K * sg_d
        w_ptrs += BLOCK_K * sw_d
    mask = mask_m[:, None] & mask_c[None, :]
    x_rows = _offsets(b, ho, wo, sx_b, sx_h, sx_w)
    x = tl.load(x_ptr + x_rows[:, None] + rc[None, :] * sx_c, mask=mask, other=0.0).to(acc.dtype)
    gx = tl.where(x <= 0, 0.0, acc)  # as torch's ReLU backward: a NaN in x passes the gradient
    if HAS_GRAD_IN:
        gi_ptrs = gx_in_ptr + _offsets(b, ho, wo, sgi_b, sgi_h, sgi_w)[:, None] + rc[None, :] * sgi_c
        gx += tl.load(gi_ptrs, mask=mask, other=0.0).to(acc.dtype)
    gx_ptrs = gx_ptr + _offsets(b, ho, wo, sgx_b, sgx_h, sgx_w)[:, None] + rc[None, :] * sgx_c
    tl.store(gx_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_reduce_bwd_weight_kernel(
        gy_ptr, x_ptr, gw_ptr, gb_ptr,
        M, C, D, hw_out, w_out, rows_per_split,
        sg_b, sg_d, sg_h, sg_w,
        sx_b, sx_c, sx_h, sx_w,
        ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Split ``pid_s`` of ``grad_w = grad_y^T @ relu(x_s)`` and of ``grad_b = grad_y.sum(rows)`` over its rows.

    Each split writes its own partial sums (summed after, in a fixed order: deterministic, no atomics).
    """
    pid_d = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_d = rd < D
    mask_c = rc < C
    if ACC_FP64:
        acc = tl.zeros((BLOCK_D, BLOCK_C), dtype=tl.float64)
        acc_b = tl.zeros((BLOCK_D,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_D, BLOCK_C), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask_m = rm < m_end
        b, ho, wo = _row_index(rm, hw_out, w_out)
        g_rows = _offsets(b, ho, wo, sg_b, sg_h, sg_w)
        g = tl.load(gy_ptr + rd[:, None] * sg_d + g_rows[None, :], mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        g = _dot_operand(g, x_ptr, acc, UPCAST_DOT)
        x_rows = _offsets(b, ho, wo, sx_b, sx_h, sx_w)
        a = tl.load(x_ptr + x_rows[:, None] + rc[None, :] * sx_c, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        a = a.to(acc.dtype)
        a = _dot_operand(tl.where(a < 0, 0.0, a), x_ptr, acc, UPCAST_DOT)
        acc = tl.dot(g, a, acc, input_precision=INPUT_PRECISION)
        acc_b += tl.sum(g.to(acc.dtype), axis=1)
    gw_ptrs = gw_ptr + pid_s.to(tl.int64) * D * C + rd[:, None] * C + rc[None, :]
    tl.store(gw_ptrs, acc, mask=mask_d[:, None] & mask_c[None, :])
    # The bias gradient once per split: by the first column block.
    tl.store(gb_ptr + pid_s * D + rd, acc_b, mask=mask_d & (pid_c == 0))


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_args(x: Tensor, weight: Tensor, stride: int) -> Tuple[int, int, int, int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f'relu_reduce: x must be (B, C, H, W), got shape {tuple(x.shape)}.')
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f'relu_reduce: weight must be (d, C) with C = {x.shape[1]} (a 1x1 conv weight viewed 2-D), '
            f'got shape {tuple(weight.shape)}.')
    if x.dtype not in _DTYPES:
        raise ValueError(f"relu_reduce: x's dtype must be one of {', '.join(map(str, _DTYPES))}, got {x.dtype}.")
    if weight.device != x.device:
        raise ValueError(f'relu_reduce: weight must be on x\'s device {x.device}, got {weight.device}.')
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f'relu_reduce: stride must be a positive int, got {stride!r}.')
    batch, channels, height, width = x.shape
    h_out, w_out = triton.cdiv(height, stride), triton.cdiv(width, stride)
    return batch, channels, height, width, h_out, w_out, weight.shape[0]


def _acc_fp64(x: Tensor) -> bool:
    return x.dtype == torch.float64


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision, which only float32 operands heed: TF32 where eager 1x1 convs use it."""
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and torch.version.hip is None
    return 'tf32' if tf32 else 'ieee'


def _upcast_dot(x: Tensor) -> bool:
    # Off CUDA the kernels run in Triton's interpreter, whose dot reads bfloat16 as raw integers.
    return not is_cuda(x) and x.dtype == torch.bfloat16


def _strided(t: Tensor, stride: int) -> Tuple[int, int, int, int]:
    """Strides (b, c, h, w) of every ``stride``-th pixel of a map."""
    return t.stride(0), t.stride(1), t.stride(2) * stride, t.stride(3) * stride


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _gemm_blocks(on_cuda: bool, dtype: torch.dtype, m: int, n: int, k: int,
                 max_n: int = 128) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an (m x k) @ (k x n) GEMM on operands of ``dtype``.

    Fixed sizes, no autotuning (which the interpreter would run slowly). Off CUDA (the interpreter),
    blocks of 16, tl.dot's smallest: few elements to emulate, and the tests' sizes leave partial blocks.
    On CUDA the largest that ptxas compiles without spilling for sm_80 and sm_90 in every launch of the
    GSoP models (``benchmarks/compile_table.py``): a K step of 32 in every dtype (the map's tile passes
    through registers for its ReLU; 64 bfloat16 channels spilled) and 8 warps from 128 x 64 on.
    """
    if not on_cuda:
        return 16, 16, 16, 4, 1
    if dtype == torch.float64:
        return _pow2_block(m, 16, 64), _pow2_block(n, 16, 64), 16, 4, 2
    block_m = _pow2_block(m, 16, 128)
    block_n = _pow2_block(n, 16, max_n)
    block_k = _pow2_block(k, 16, 32)
    return block_m, block_n, block_k, 8 if block_m * block_n >= 128 * 64 else 4, 3


def _num_splits(x: Tensor, rows: int, block_rows: int, tiles: int) -> int:
    """Row splits of the weight gradient's reduction: about one program per SM, each with its partial sums.

    Few splits keep the partial sums small (at attn_dim 128 and 256 channels, 64 splits write 8 MiB).
    """
    if is_cuda(x):
        target = multi_processor_count(x.device)
    else:
        target = 4  # the interpreter: a few, so the tests cover the split sums
    return max(1, min(triton.cdiv(target, tiles), triton.cdiv(rows, block_rows)))


def relu_reduce_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    """``conv1x1(relu(x[:, :, ::stride, ::stride]), weight, bias)`` without a ReLU copy.

    Args:
        x: (B, C, H, W) map, any strides.
        weight: (d, C), any float dtype; its tiles are cast to ``x.dtype``.
        bias: (d,) or None; added to the float32 (float64) accumulator.
        stride: the gate's stride s; the output is (B, d, ceil(H/s), ceil(W/s)).

    Returns:
        (B, d, Ho, Wo) in ``x.dtype``, channels_last (a permuted (B, Ho, Wo, d) tensor).
    """
    batch, channels, _, _, h_out, w_out, dim = _check_args(x, weight, stride)
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f'relu_reduce: bias must be ({dim},) or None, got shape {tuple(bias.shape)}.')
    rows = batch * h_out * w_out
    y = torch.empty((batch, h_out, w_out, dim), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y.permute(0, 3, 1, 2)
    if channels == 0:  # an empty sum: the bias alone
        return y.copy_(bias if bias is not None else torch.zeros_like(y)).permute(0, 3, 1, 2)
    block_m, block_n, block_k, num_warps, num_stages = _gemm_blocks(is_cuda(x), x.dtype, rows, dim, channels)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(dim, block_n))
    wrap_triton(_relu_reduce_fwd_kernel)[grid](
        x, weight, bias if bias is not None else weight, y,
        rows, channels, dim, h_out * w_out, w_out,
        *_strided(x, stride),
        weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, ACC_FP64=_acc_fp64(x), INPUT_PRECISION=_input_precision(x.dtype),
        UPCAST_DOT=_upcast_dot(x),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return y.permute(0, 3, 1, 2)


def relu_reduce_bwd(
        grad_in: Optional[Tensor], grad_y: Tensor, x: Tensor, weight: Tensor, stride: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of ``relu_reduce_fwd``, added to the map's other gradient ``grad_in`` (None: zero).

    Args:
        grad_in: x's shape, any strides, or None; it is read, never written.
        grad_y: (B, d, Ho, Wo), any strides.
        x, weight, stride: as given to ``relu_reduce_fwd``.

    Returns:
        ``(grad_x, grad_weight (d, C), grad_bias (d,))``: ``grad_x = grad_in + (grad_y @ weight) * (x > 0)`` at
        the strided positions ``[:, :, ::stride, ::stride]`` and ``grad_in`` elsewhere, a new tensor in
        grad_in's dtype and layout (x's without it); the others in float32 (float64 for a float64 map), summed
        deterministically (fixed row splits, no atomics).
    """
    batch, channels, _, _, h_out, w_out, dim = _check_args(x, weight, stride)
    if grad_in is not None and grad_in.shape != x.shape:
        raise ValueError(f'relu_reduce: grad_in must have x\'s shape {tuple(x.shape)}, got {tuple(grad_in.shape)}.')
    if grad_y.shape != (batch, dim, h_out, w_out):
        raise ValueError(
            f'relu_reduce: grad_y must be {(batch, dim, h_out, w_out)}, got {tuple(grad_y.shape)}.')
    rows = batch * h_out * w_out
    fp64 = _acc_fp64(x)
    acc_dtype = torch.float64 if fp64 else torch.float32
    if rows == 0 or channels == 0 or dim == 0:
        return (torch.zeros_like(x) if grad_in is None else grad_in.clone(),
                torch.zeros((dim, channels), device=x.device, dtype=acc_dtype), grad_y.sum((0, 2, 3), dtype=acc_dtype))
    # The kernel writes every s-th pixel, reading grad_in there: the other pixels come from a copy of grad_in.
    if stride == 1:
        grad_x = torch.empty_like(x if grad_in is None else grad_in)
    elif grad_in is None:
        grad_x = torch.zeros_like(x)
    else:
        grad_x = grad_in = grad_in.clone(memory_format=torch.preserve_format)  # then added into in place
    source = grad_x if grad_in is None else grad_in  # not read without grad_in
    precision = _input_precision(x.dtype)
    g_strides = (grad_y.stride(0), grad_y.stride(1), grad_y.stride(2), grad_y.stride(3))
    x_strides = _strided(x, stride)

    # At most 64 x 64 a block, over 8 warps: its epilogue holds the map's, the other gradient's and the sum's tiles
    # beside the accumulator (128 rows spilled on sm_80 and sm_90).
    block_m, block_n, block_k, num_warps, num_stages = _gemm_blocks(is_cuda(x), x.dtype, rows, channels, dim, max_n=64)
    if is_cuda(x):
        block_m, num_warps = min(block_m, 64), 8
    grid = (triton.cdiv(rows, block_m), triton.cdiv(channels, block_n))
    wrap_triton(_relu_reduce_bwd_data_kernel)[grid](
        grad_y, weight, x, source, grad_x,
        rows, channels, dim, h_out * w_out, w_out,
        *g_strides, *x_strides, *_strided(source, stride), *_strided(grad_x, stride),
        weight.stride(0), weight.stride(1),
        HAS_GRAD_IN=grad_in is not None, ACC_FP64=fp64, INPUT_PRECISION=precision, UPCAST_DOT=_upcast_dot(x),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )

    # Weight gradient: output (d, C), reduction over the rows.
    # Two stages: with three, ptxas (Triton 3.7, sm_80) spilled 8 bytes at 128 x 128 float32 and 64 x 128 bfloat16.
    block_d, block_c, block_r, num_warps, num_stages = _gemm_blocks(is_cuda(x), x.dtype, dim, channels, rows)
    num_stages = min(num_stages, 2)
    tiles = triton.cdiv(dim, block_d) * triton.cdiv(channels, block_c)
    splits = _num_splits(x, rows, block_r, tiles)
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
    splits = triton.cdiv(rows, rows_per_split)
    grad_w = torch.empty((splits, dim, channels), device=x.device, dtype=acc_dtype)
    grad_b = torch.empty((splits, dim), device=x.device, dtype=acc_dtype)
    grid = (triton.cdiv(dim, block_d), triton.cdiv(channels, block_c), splits)
    wrap_triton(_relu_reduce_bwd_weight_kernel)[grid](
        grad_y, x, grad_w, grad_b,
        rows, channels, dim, h_out * w_out, w_out, rows_per_split,
        *g_strides, *x_strides,
        ACC_FP64=fp64, INPUT_PRECISION=precision, UPCAST_DOT=_upcast_dot(x),
        BLOCK_D=block_d, BLOCK_C=block_c, BLOCK_M=block_r, num_warps=num_warps, num_stages=num_stages,
    )
    return grad_x, grad_w.sum(0), grad_b.sum(0)
