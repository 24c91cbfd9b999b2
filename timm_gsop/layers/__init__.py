from .covariance import covariance, position_covariance
from .isqrt_cov import IsqrtCovPool, sqrtm_newton_schulz, triu_indices, triu_vec
from .config import set_fused_gsop, use_fused_gsop
from .gsop import ATTN_MODES, GSoPAttn, GSoPChannelGate, GSoPPositionGate, resolve_attn_mode

__all__ = [
    'covariance', 'position_covariance', 'IsqrtCovPool', 'sqrtm_newton_schulz', 'triu_indices', 'triu_vec',
    'ATTN_MODES', 'GSoPAttn', 'GSoPChannelGate', 'GSoPPositionGate', 'resolve_attn_mode', 'set_fused_gsop',
    'use_fused_gsop',
]
