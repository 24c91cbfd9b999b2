"""The fused-GSoP switch, in the style of timm's ``use_fused_attn``: read once when a layer is built.

``TIMM_GSOP_FUSED=1`` in the environment (or ``set_fused_gsop(True)``) makes GSoP layers built afterwards call the
fused GSoP ops (``fused_ops.py``): Triton kernels on CUDA, their eager kernels on every other device. ``0`` (the
default, until a GPU run shows the fused path faster) keeps the eager ops. timm's ``set_layer_config(exportable=True)``
turns it off, as it does timm's fused attention.
"""
import os

from timm.layers import is_exportable

__all__ = ['use_fused_gsop', 'set_fused_gsop']

_USE_FUSED_GSOP = os.environ.get('TIMM_GSOP_FUSED', '0').lower() in ('1', 'true', 'yes', 'on')


def use_fused_gsop() -> bool:
    """Whether GSoP layers built now take the fused ops."""
    return _USE_FUSED_GSOP and not is_exportable()


def set_fused_gsop(enable: bool = True) -> None:
    """Switch the fused GSoP ops on or off for layers built from now on."""
    global _USE_FUSED_GSOP
    _USE_FUSED_GSOP = bool(enable)
