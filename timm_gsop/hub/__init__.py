"""Publish GSoP-Net weights the way timm users load them: a Hugging Face Hub folder.

    run.py       the checkpoint and what its training run left (args.yaml, summary.csv, class folders)
    export.py    rebuilding the model and its preprocessing, the export and the push
    card.py      the model card
    folder.py    putting the folder in place, never replacing what an export did not make

The command line is ``timm-gsop export|push`` (``timm_gsop_cli``).
"""
from .card import measure, model_card
from .export import (
    HUB_LICENSES, PREPROCESSING_KEYS, build_model_from_checkpoint, export_checkpoint, export_data_config,
    parse_model_kwargs, push_checkpoint)
from .folder import ALLOWED_FILES, MANIFEST, StagedFolder
from .run import ExportError, LoadedCheckpoint, TrainRun, read_checkpoint, read_label_names_file, read_run

__all__ = [
    'ExportError', 'LoadedCheckpoint', 'TrainRun', 'read_checkpoint', 'read_run', 'read_label_names_file',
    'build_model_from_checkpoint', 'export_data_config', 'export_checkpoint', 'push_checkpoint', 'parse_model_kwargs',
    'model_card', 'measure', 'ALLOWED_FILES', 'MANIFEST', 'HUB_LICENSES', 'PREPROCESSING_KEYS', 'StagedFolder',
]
