"""``timm-gsop export|push``: GSoP-Net weights as a Hugging Face Hub folder that timm loads."""
from .export import export_checkpoint, push_checkpoint
from .folder import ALLOWED_FILES, MANIFEST
from .run import ExportError

__all__ = ['ExportError', 'export_checkpoint', 'push_checkpoint', 'ALLOWED_FILES', 'MANIFEST']
