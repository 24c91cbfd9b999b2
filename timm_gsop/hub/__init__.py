"""Publish GSoP-Net weights as timm users load them, a Hugging Face Hub folder (``timm-gsop export|push``):
``run.py`` reads the checkpoint and its run, ``export.py`` rebuilds the model and writes the folder,
``card.py`` the model card, and ``folder.py`` puts it in place, never replacing what an export did not make.
"""
from .export import HUB_LICENSES, PREPROCESSING_KEYS, export_checkpoint, push_checkpoint
from .folder import ALLOWED_FILES, MANIFEST
from .run import ExportError

__all__ = ['ExportError', 'export_checkpoint', 'push_checkpoint', 'ALLOWED_FILES', 'MANIFEST', 'HUB_LICENSES',
           'PREPROCESSING_KEYS']
