"""Triton kernels for the channel gate's BatchNorm + ReLU + covariance of the reduced map.

The gate's reduced map ``y`` (B, d, H, W) goes through BatchNorm (batch or running statistics), a ReLU
and a covariance over the M = H * W positions of each sample. The kernels here read ``y`` once per
pass and never write the normalised map, its ReLU or a float32 copy:

- ``channel_stats``: per-channel mean and biased variance of ``y`` (BatchNorm's batch statistics);
- ``bn_relu_cov_fwd``: ``z = relu(bn(y))`` on load, the Gram matrix of ``z`` and its per-sample mean,
  hence the covariance;
- ``bn_relu_cov_bwd``: the covariance's gradient through the ReLU and BatchNorm to ``y``, its weight
  and its bias, recomputing ``z`` from ``y``.

The launchers are plain functions without autograd, for ``torch.library.triton_op`` bodies: kernels
are launched through ``torch.library.wrap_triton``, which also runs them in eager mode. They run on
CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported). Any strides of ``y`` work (NCHW, channels_last, slices).

Precision: statistics, sums and products accumulate in float32 (float64 for a float64 ``y``). The
products' operands are float32 too: exact (``'ieee'``) for float32 and float64 maps; TF32 on a GPU for
bfloat16 / float16 maps, which carry no more mantissa bits than TF32 (Triton's interpreter computes
these products exactly).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import wrap_triton

__all__ = ['channel_stats', 'bn_relu_cov_fwd', 'bn_relu_cov_bwd']


@triton.jit
def _positions(m, W, s_h, s_w, FLAT_HW: tl.constexpr):
    """Offsets of flat positions ``m`` (h * W + w) in a map with strides ``s_h``, ``s_w``."""
    if FLAT_HW:  # H and W merge into one stride: no division, and contiguity stays visible to the compiler
        return m * s_w
    else:
        return (m // W) * s_h + (m % W) * s_w


@triton.jit
def _load_tile(base, c, m, D, M, W, s_c, s_h, s_w, dtype, FLAT_HW: tl.constexpr):
    """A (channels, positions) tile of one sample's map in ``dtype``, zero outside it, and its mask."""
    mask = (c[:, None] < D) & (m[None, :] < M)
    offs = c[:, None] * s_c + _positions(m, W, s_h, s_w, FLAT_HW)[None, :]
    return tl.load(base + offs, mask=mask, other=0.).to(dtype), mask


@triton.jit
def _load_bn(mean_ptr, scale_ptr, bias_ptr, c, D):
    """Per-channel mean, scale (invstd * weight) and bias; zero outside the channels."""
    mask = c < D
    return (tl.load(mean_ptr + c, mask=mask, other=0.), tl.load(scale_ptr + c, mask=mask, other=0.),
            tl.load(bias_ptr + c, mask=mask, other=0.))


@triton.jit
def _bn_relu(y, mean, scale, bias):
    """relu((y - mean) * scale + bias) on a (channels, positions) tile. Centring first keeps z exact to
    rounding where a channel's mean is large against its spread (a folded y * scale + shift would cancel).
    NaN stays NaN, as in torch.relu (tl.maximum would drop it)."""
    a = (y - mean[:, None]) * scale[:, None] + bias[:, None]
    return tl.where(a < 0., 0., a)


@triton.jit
def _channel_stats_kernel(
        y_ptr, mean_ptr, m2_ptr,
        D, M, W, s_yb, s_yc, s_yh, s_yw,
        FLAT_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Per (sample, channel): mean and sum of squared deviations over the M positions.

    Each tile's own mean and squared deviations are merged into the running ones (Chan et al.'s
    pairwise update), so no sum of squares of raw values ever cancels.
    """
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    dtype = mean_ptr.dtype.element_ty
    y_base = y_ptr + b * s_yb
    mean = tl.zeros((BLOCK_C,), dtype=dtype)
    m2 = tl.zeros((BLOCK_C,), dtype=dtype)
    count = tl.zeros((BLOCK_C,), dtype=dtype)
    offs_m = tl.arange(0, BLOCK_M)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs_m
        y, mask = _load_tile(y_base, c, m, D, M, W, s_yc, s_yh, s_yw, dtype, FLAT_HW)
        count_tile = tl.sum((m < M).to(dtype), axis=0)
        mean_tile = tl.sum(y, axis=1) / count_tile
        dev = tl.where(mask, y - mean_tile[:, None], 0.)
        delta = mean_tile - mean
        count_before = count
        count += count_tile
        mean += delta * (count_tile / count)
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (count_before * count_tile / count)
    tl.store(mean_ptr + b * D + c, mean, mask=c < D)
    tl.store(m2_ptr + b * D + c, m2, mask=c < D)


@triton.jit
def _bn_relu_cov_fwd_kernel(
        y_ptr, mean_ptr, scale_ptr, bias_ptr, cov_ptr, zmean_ptr,
        D, M, W, s_yb, s_yc, s_yh, s_yw,
        FLAT_HW: tl.constexpr, ONE_TILE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One (BLOCK_D x BLOCK_D) tile of one sample's covariance of z = relu(bn(y)).

    The K loop runs over positions. Each channel's z is first shifted by a reference value, the
    mean of its first BLOCK_M positions: the Gram matrix of the shifted values minus the outer
    product of their means is the covariance, and with the reference near the mean that rank-one
    correction cancels few digits even when z's mean is large against its spread.
    """
    b = tl.program_id(0).to(tl.int64)
    ci = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dtype = scale_ptr.dtype.element_ty
    y_base = y_ptr + b * s_yb
    offs_m = tl.arange(0, BLOCK_M)
    count_first = tl.sum((offs_m < M).to(dtype), axis=0)

    mean_i, scale_i, bias_i = _load_bn(mean_ptr, scale_ptr, bias_ptr, ci, D)
    y, _ = _load_tile(y_base, ci, offs_m, D, M, W, s_yc, s_yh, s_yw, dtype, FLAT_HW)
    z = _bn_relu(y, mean_i, scale_i, bias_i)
    ref_i = tl.sum(tl.where(offs_m[None, :] < M, z, 0.), axis=1) / count_first
    if not ONE_TILE:
        mean_j, scale_j, bias_j = _load_bn(mean_ptr, scale_ptr, bias_ptr, cj, D)
        y, _ = _load_tile(y_base, cj, offs_m, D, M, W, s_yc, s_yh, s_yw, dtype, FLAT_HW)
        z = _bn_relu(y, mean_j, scale_j, bias_j)
        ref_j = tl.sum(tl.where(offs_m[None, :] < M, z, 0.), axis=1) / count_first

    gram = tl.zeros((BLOCK_D, BLOCK_D), dtype=dtype)
    sum_i = tl.zeros((BLOCK_D,), dtype=dtype)
    sum_j = tl.zeros((BLOCK_D,), dtype=dtype)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs_m
        y, mask = _load_tile(y_base, ci, m, D, M, W, s_yc, s_yh, s_yw, dtype, FLAT_HW)
        zi = tl.where(mask, _bn_relu(y, mean_i, scale_i, bias_i) - ref_i[:, None], 0.)
        sum_i += tl.sum(zi, axis=1)
        if ONE_TILE:
            gram = tl.dot(zi, tl.trans(zi), gram, input_precision=PRECISION)
        else:
            y, mask = _load_tile(y_base, cj, m, D, M, W, s_yc, s_yh, s_yw, dtype, FLAT_HW)
            zj = tl.where(mask, _bn_relu(y, mean_j, scale_j, bias_j) - ref_j[:, None], 0.)
            sum_j += tl.sum(zj, axis=1)
            gram = tl.dot(zi, tl.trans(zj), gram, input_precision=PRECISION)
    shifted_mean_i = sum_i / M
    if ONE_TILE:
        shifted_mean_j = shifted_mean_i
    else:
        shifted_mean_j = sum_j / M
    cov = gram / M - shifted_mean_i[:, None] * shifted_mean_j[None, :]
    tl.store(cov_ptr + b * D * D + ci[:, None] * D + cj[None, :], cov,
             mask=(ci[:, None] < D) & (cj[None, :] < D))
    # The first column of tiles writes the mean of z (the other columns hold the same values).
    tl.store(zmean_ptr + b * D + ci, ref_i + shifted_mean_i, mask=(ci < D) & (tl.program_id(2) == 0))


@triton.jit
def _sym_grad_tile(g_base, ci, ck, D, s_gr, s_gc, dtype):
    """The (ci, ck) tile of G + G^T for one sample's (D x D) gradient G."""
    mask = (ci[:, None] < D) & (ck[None, :] < D)
    g = tl.load(g_base + ci[:, None] * s_gr + ck[None, :] * s_gc, mask=mask, other=0.)
    g_t = tl.load(g_base + ck[None, :] * s_gr + ci[:, None] * s_gc, mask=mask, other=0.)
    return (g + g_t).to(dtype)


@triton.jit
def _bn_relu_cov_bwd_kernel(
        gc_ptr, y_ptr, zmean_ptr, mean_ptr, invstd_ptr, scale_ptr, bias_ptr, coef_ptr,
        gy_ptr, sum_ptr, sum_xhat_ptr,
        D, M, W, s_yb, s_yc, s_yh, s_yw, s_gyb, s_gyc, s_gyh, s_gyw, s_gb, s_gr, s_gc,
        FLAT_HW: tl.constexpr, ONE_TILE: tl.constexpr, PRECISION: tl.constexpr,
        WRITE_SUMS: tl.constexpr, WRITE_GRAD: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One sample's rows ``ci`` of the gradient, looping over its positions.

    grad_z = (1/M) (G + G^T) (z - zmean) (the covariance's gradient; the centring's adjoint leaves
    it unchanged, since its rows sum to zero), grad_a = grad_z where z > 0, else 0. With
    WRITE_SUMS the sample's per-channel sums of grad_a and grad_a * xhat are written; with
    WRITE_GRAD, grad_y = c1 * grad_a + c0 + c2 * xhat with the per-channel coefficients in
    ``coef_ptr`` (3, D), xhat = (y - mean) * invstd.
    """
    b = tl.program_id(0).to(tl.int64)
    ci = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dtype = scale_ptr.dtype.element_ty
    y_base = y_ptr + b * s_yb
    gy_base = gy_ptr + b * s_gyb
    g_base = gc_ptr + b * s_gb
    cmask = ci < D
    mean_i, scale_i, bias_i = _load_bn(mean_ptr, scale_ptr, bias_ptr, ci, D)
    zmean_i = tl.load(zmean_ptr + b * D + ci, mask=cmask, other=0.)
    invstd_i = tl.load(invstd_ptr + ci, mask=cmask, other=0.)
    if WRITE_GRAD:
        c1 = tl.load(coef_ptr + ci, mask=cmask, other=0.)
        c0 = tl.load(coef_ptr + D + ci, mask=cmask, other=0.)
        c2 = tl.load(coef_ptr + 2 * D + ci, mask=cmask, other=0.)
    if ONE_TILE:  # the whole of G + G^T stays in registers across the loop
        g = _sym_grad_tile(g_base, ci, ci, D, s_gr, s_gc, dtype)
    sum_a = tl.zeros((BLOCK_D,), dtype=dtype)
    sum_a_xhat = tl.zeros((BLOCK_D,), dtype=dtype)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs_m
        y, mask = _load_tile(y_base, ci, m, D, M, W, s_yc, s_yh, s_yw, dtype, FLAT_HW)
        z = _bn_relu(y, mean_i, scale_i, bias_i)
        if ONE_TILE:
            zc = tl.where(mask, z - zmean_i[:, None], 0.)
            grad_z = tl.dot(g, zc, input_precision=PRECISION)
        else:
            grad_z = tl.zeros((BLOCK_D, BLOCK_M), dtype=dtype)
            for k0 in range(0, D, BLOCK_D):
                ck = k0 + offs_d
                mean_k, scale_k, bias_k = _load_bn(mean_ptr, scale_ptr, bias_ptr, ck, D)
                zmean_k = tl.load(zmean_ptr + b * D + ck, mask=ck < D, other=0.)
                yk, mask_k = _load_tile(y_base, ck, m, D, M, W, s_yc, s_yh, s_yw, dtype, FLAT_HW)
                zk = tl.where(mask_k, _bn_relu(yk, mean_k, scale_k, bias_k) - zmean_k[:, None], 0.)
                gk = _sym_grad_tile(g_base, ci, ck, D, s_gr, s_gc, dtype)
                grad_z = tl.dot(gk, zk, grad_z, input_precision=PRECISION)
        # The ReLU's backward as torch's (a NaN z passes the gradient); zero outside the map.
        grad_a = tl.where(mask & ~(z <= 0.), grad_z / M, 0.)
        xhat = (y - mean_i[:, None]) * invstd_i[:, None]
        if WRITE_SUMS:
            sum_a += tl.sum(grad_a, axis=1)
            sum_a_xhat += tl.sum(grad_a * xhat, axis=1)
        if WRITE_GRAD:
            grad_y = c1[:, None] * grad_a + c0[:, None] + c2[:, None] * xhat
            offs = ci[:, None] * s_gyc + _positions(m, W, s_gyh, s_gyw, FLAT_HW)[None, :]
            tl.store(gy_base + offs, grad_y.to(gy_ptr.dtype.element_ty), mask=mask)
    if WRITE_SUMS:
        tl.store(sum_ptr + b * D + ci, sum_a, mask=cmask)
        tl.store(sum_xhat_ptr + b * D + ci, sum_a_xhat, mask=cmask)


def _compute_dtype(y: Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def _dot_precision(y: Tensor) -> str:
    # TF32 keeps 10 mantissa bits, more than a bfloat16 / float16 map carries.
    return 'ieee' if y.dtype in (torch.float32, torch.float64) else 'tf32'


def _map_strides(t: Tensor) -> Tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _flat_hw(*maps: Tensor) -> bool:
    """Whether every map's H and W merge into one stride (NCHW and channels_last do)."""
    return all(t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in maps)


def _block_d(d: int, block_d: Optional[int]) -> int:
    # tl.dot needs at least 16 along every side; 128 covers the usual attn_dim in one tile.
    return block_d or min(128, max(16, triton.next_power_of_2(d)))


def _launch_options(block_d: int, backward: bool, dtype: torch.dtype) -> dict:
    # Chosen so that ptxas (sm_80 and sm_90, Triton 3.7 and 3.8) spills no registers with the default tiles.
    # The backward keeps all of G + G^T in registers, so no pipelined load. Over 8 warps a 128-row G spilled
    # 3 KiB on Triton 3.7's sm_90 float32 maps: 16 warps hold it. 16-bit maps need more than the 128 registers
    # a thread gets at 16 warps, and do not spill over 8.
    warps = 4 if block_d < 128 else 16 if backward and dtype == torch.float32 else 8
    return dict(num_warps=warps, num_stages=1 if backward else 2)


def _check_map(y: Tensor) -> None:
    if y.dim() != 4:
        raise ValueError(f'Expected a (B, d, H, W) map, got shape {tuple(y.shape)}')


def _fold_affine(
        mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, scale, bias) in ``dtype`` with bn(y) = (y - mean) * scale + bias."""
    mean = mean.to(dtype).contiguous()
    invstd = invstd.to(dtype).contiguous()
    scale = invstd if weight is None else invstd * weight.to(dtype)
    bias = torch.zeros_like(mean) if bias is None else bias.to(dtype).contiguous()
    return mean, invstd, scale.contiguous(), bias


def channel_stats(y: Tensor, *, block_m: int = 32) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``y`` over (B, H, W).

    Args:
        y: (B, d, H, W) map, any dtype and strides.
        block_m: positions per tile (a power of two, at least 16).

    Returns:
        (mean, var), each (d,) in float32 (float64 for a float64 ``y``).
    """
    _check_map(y)
    B, D, H, W = y.shape
    M = H * W
    dtype = _compute_dtype(y)
    block_c = min(64, max(16, triton.next_power_of_2(D)))
    sample_mean = torch.empty((B, D), device=y.device, dtype=dtype)
    sample_m2 = torch.empty((B, D), device=y.device, dtype=dtype)
    wrap_triton(_channel_stats_kernel)[(B, triton.cdiv(D, block_c))](
        y, sample_mean, sample_m2, D, M, W, *_map_strides(y),
        FLAT_HW=_flat_hw(y), BLOCK_C=block_c, BLOCK_M=block_m)
    # Every sample has M positions: merging B equal-count groups, again without raw sums of squares.
    mean = sample_mean.mean(0)
    var = (sample_m2.sum(0) + M * (sample_mean - mean).square().sum(0)) / (B * M)
    return mean, var


def bn_relu_cov_fwd(
        y: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        *,
        block_d: Optional[int] = None,
        block_m: int = 16,
) -> Tuple[Tensor, Tensor]:
    """Covariance of z = relu(batch_norm(y)) per sample, with BatchNorm's statistics given.

    Args:
        y: (B, d, H, W) map, any dtype and strides.
        mean, invstd: (d,) statistics, invstd = 1 / sqrt(var + eps).
        weight, bias: (d,) BatchNorm affine parameters, or None (1 and 0).
        block_d, block_m: tile sides (powers of two, at least 16); by default 128 or the next power of
            two of d, and 16.

    Returns:
        (cov, zmean): (B, d, d) covariances (1/M) sum_m (z_m - zmean)(z_m - zmean)^T over the M = H * W
        positions, and the (B, d) means of z; float32 (float64 for a float64 ``y``).
    """
    _check_map(y)
    B, D, H, W = y.shape
    M = H * W
    dtype = _compute_dtype(y)
    mean, _, scale, bias = _fold_affine(mean, invstd, weight, bias, dtype)
    block_d = _block_d(D, block_d)
    tiles = triton.cdiv(D, block_d)
    cov = torch.empty((B, D, D), device=y.device, dtype=dtype)
    zmean = torch.empty((B, D), device=y.device, dtype=dtype)
    wrap_triton(_bn_relu_cov_fwd_kernel)[(B, tiles, tiles)](
        y, mean, scale, bias, cov, zmean, D, M, W, *_map_strides(y),
        FLAT_HW=_flat_hw(y), ONE_TILE=tiles == 1, PRECISION=_dot_precision(y),
        BLOCK_D=block_d, BLOCK_M=block_m, **_launch_options(block_d, backward=False, dtype=y.dtype))
    return cov, zmean


def bn_relu_cov_bwd(
        grad_cov: Tensor,
        y: Tensor,
        zmean: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        training: bool,
        *,
        block_d: Optional[int] = None,
        block_m: int = 16,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of ``bn_relu_cov_fwd``: gradients of y, weight and bias from the covariance's gradient.

    Args:
        grad_cov: (B, d, d) gradient of the covariance, any strides.
        y, mean, invstd, weight, bias: as given to ``bn_relu_cov_fwd``; ``zmean`` its second output.
        training: whether mean and invstd were y's own batch statistics (BatchNorm in training):
            then their gradients flow into grad_y too.
        block_d, block_m: tile sides (powers of two, at least 16); by default as in the forward.

    Returns:
        (grad_y, grad_weight, grad_bias): grad_y in y's dtype and layout (NCHW stays NCHW,
        channels_last stays channels_last; other strides give a contiguous grad_y); grad_weight and
        grad_bias (d,) in float32 (float64 for a float64 ``y``), also when weight / bias are None.
    """
    _check_map(y)
    B, D, H, W = y.shape
    M = H * W
    dtype = _compute_dtype(y)
    mean, invstd, scale, bias = _fold_affine(mean, invstd, weight, bias, dtype)
    zmean = zmean.to(dtype).contiguous()
    block_d = _block_d(D, block_d)
    tiles = triton.cdiv(D, block_d)
    grad_y = torch.empty_like(y)  # keeps y's strides when y is dense
    # Per-sample channel sums of grad_a and grad_a * xhat: deterministic, no atomics.
    sum_grad = torch.empty((B, D), device=y.device, dtype=dtype)
    sum_grad_xhat = torch.empty((B, D), device=y.device, dtype=dtype)
    kernel = wrap_triton(_bn_relu_cov_bwd_kernel)[(B, tiles)]
    shared = dict(
        FLAT_HW=_flat_hw(y, grad_y), ONE_TILE=tiles == 1, PRECISION=_dot_precision(y),
        BLOCK_D=block_d, BLOCK_M=block_m, **_launch_options(block_d, backward=True, dtype=y.dtype))

    def launch(coef: Tensor, write_sums: bool, write_grad: bool) -> None:
        kernel(
            grad_cov, y, zmean, mean, invstd, scale, bias, coef, grad_y, sum_grad, sum_grad_xhat,
            D, M, W, *_map_strides(y), *_map_strides(grad_y), *grad_cov.stride(),
            WRITE_SUMS=write_sums, WRITE_GRAD=write_grad, **shared)

    if training:
        # BatchNorm's batch statistics need grad_a's channel sums over the whole batch first.
        launch(scale, write_sums=True, write_grad=False)  # scale: a placeholder, coef is not read
        grad_bias, grad_weight = sum_grad.sum(0), sum_grad_xhat.sum(0)
        count = B * M
        coef = torch.stack([scale, -scale * grad_bias / count, -scale * grad_weight / count])
        launch(coef, write_sums=False, write_grad=True)
    else:
        coef = torch.stack([scale, torch.zeros_like(scale), torch.zeros_like(scale)])
        launch(coef, write_sums=True, write_grad=True)
        grad_bias, grad_weight = sum_grad.sum(0), sum_grad_xhat.sum(0)
    return grad_y, grad_weight, grad_bias
