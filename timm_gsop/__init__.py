"""GSoP-Net (Gao et al., CVPR 2019) as a timm model family: ``import timm_gsop`` registers the models."""
from .layers import ATTN_MODES, GSoPAttn, IsqrtCovPool, covariance, sqrtm_newton_schulz, triu_vec
from .models import GSoPResNet, GSoPResNetCifar, checkpoint_filter_fn

__version__ = '0.1.0'
__all__ = [
    'ATTN_MODES', 'GSoPAttn', 'IsqrtCovPool', 'covariance', 'sqrtm_newton_schulz', 'triu_vec',
    'GSoPResNet', 'GSoPResNetCifar', 'checkpoint_filter_fn',
]
