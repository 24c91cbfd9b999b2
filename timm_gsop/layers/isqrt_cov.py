"""iSQRT-COV: matrix square root of a covariance by Newton-Schulz iterations, and its pooling head.

Li et al., "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix
Square Root Normalization" (CVPR 2018); GSoP-Net2 uses it as its final pooling. Everything is
batched (bmm), autograd gives the backward, and the maths runs in float32 whatever the input's precision.
"""
from typing import Optional

import torch
from torch import Tensor, nn
from timm.layers import LayerType, create_act_layer, get_norm_layer, register_notrace_function

from ._checks import check_int
from .covariance import autocast_off, covariance, second_order_dtype

__all__ = ['sqrtm_newton_schulz', 'triu_vec', 'triu_indices', 'IsqrtCovPool']


@autocast_off
def _sqrtm_newton_schulz(x: Tensor, num_iter: int, eps: float) -> Tensor:
    dim = x.shape[-1]
    eye = torch.eye(dim, device=x.device, dtype=x.dtype).unsqueeze(0)
    # Pre-normalise by the trace so the iteration converges; the floor keeps a zero matrix
    # (a constant feature map) finite instead of 0/0.
    trace = torch.diagonal(x, dim1=-2, dim2=-1).sum(-1).clamp_min(eps).view(-1, 1, 1)
    a = x / trace
    zy = 1.5 * eye - 0.5 * a
    y = torch.bmm(a, zy)
    if num_iter >= 2:
        z = zy
        for _ in range(num_iter - 2):
            zy = torch.baddbmm(eye * 1.5, z, y, alpha=-0.5)
            y, z = torch.bmm(y, zy), torch.bmm(zy, z)
        y = 0.5 * torch.bmm(y, torch.baddbmm(eye * 3.0, z, y, alpha=-1.0))
    # Post-compensation: undo the trace normalisation (sqrt of the scale).
    return y * trace.sqrt()


@register_notrace_function
def sqrtm_newton_schulz(x: Tensor, num_iter: int = 3, eps: float = 1e-5) -> Tensor:
    """Approximate square root of a batch of SPD matrices (B, d, d) by coupled Newton-Schulz.

    ``num_iter`` iterations after trace pre-normalisation, then sqrt(trace) post-compensation, as
    iSQRT-COV defines it. ``eps`` floors the trace. Returns float32 (float64 for float64 ``x``).
    """
    if num_iter < 1:
        raise ValueError(f'num_iter must be >= 1, got {num_iter}')
    return _sqrtm_newton_schulz(x.to(second_order_dtype(x)), num_iter, eps)


def triu_indices(dim: int, device: Optional[torch.device] = None) -> Tensor:
    """Flat indices of the upper triangle of a symmetric (dim, dim) matrix, in iSQRT-COV's order.

    The order is the lower triangle row by row, (0,0), (1,0), (1,1), (2,0), ... which for a
    symmetric matrix are the upper-triangle values column by column. Classifier weights trained on
    the official code depend on it.
    """
    idx = torch.tril_indices(dim, dim, device=device)
    return idx[0] * dim + idx[1]


@register_notrace_function
def triu_vec(x: Tensor, index: Optional[Tensor] = None) -> Tensor:
    """(B, d, d) symmetric matrices -> (B, d(d+1)/2) vectors of their upper triangles."""
    if index is None:
        index = triu_indices(x.shape[-1], x.device)
    return x.flatten(1).index_select(1, index)


class IsqrtCovPool(nn.Module):
    """Global pooling by the matrix square root of a covariance (GSoP-Net2's head, iSQRT-COV).

    1x1 conv to ``cov_dim`` channels + norm + act, covariance over positions, Newton-Schulz square
    root, upper triangle: (B, C, H, W) -> (B, cov_dim * (cov_dim + 1) / 2) in the input's dtype. Any
    backbone's feature map can feed it; put a Linear on its output.

    Args:
        channels: input channels.
        cov_dim: channels after the reduction, the covariance size (256 in GSoP-Net2).
        num_iter: Newton-Schulz iterations (3 in GSoP-Net2).
        eps: floor of the trace in the pre-normalisation.
        act_layer, norm_layer: after the reduction conv; classes or timm's names ('relu', 'batchnorm').
    """
    pool_type = 'isqrt'

    def __init__(
            self,
            channels: int,
            cov_dim: int = 256,
            num_iter: int = 3,
            eps: float = 1e-5,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        check_int('cov_dim', cov_dim)
        check_int('num_iter', num_iter)
        self.cov_dim = cov_dim
        self.num_iter = num_iter
        self.eps = eps
        self.conv_reduce = nn.Conv2d(channels, cov_dim, kernel_size=1, bias=False, **dd)
        self.bn = get_norm_layer(norm_layer)(cov_dim, **dd)
        self.act = create_act_layer(act_layer, inplace=True)
        self.register_buffer('index', triu_indices(cov_dim, device=device), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the triangle's index (after a model made on the meta device is materialised)."""
        self.index = triu_indices(self.cov_dim, device=self.conv_reduce.weight.device)

    @property
    def out_features(self) -> int:
        return self.cov_dim * (self.cov_dim + 1) // 2

    def feat_mult(self) -> int:
        return 1

    def is_identity(self) -> bool:
        return False

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = self.act(self.bn(self.conv_reduce(x)))
        x = sqrtm_newton_schulz(covariance(x), self.num_iter, self.eps)
        return triu_vec(x, self.index).to(dtype)
