"""Publish GSoP-Net weights the way timm users load them: a Hugging Face Hub folder.

    run.py       reading a checkpoint and what its training run left (args.yaml, summary.csv, classes)
    export.py    rebuilding the model, its preprocessing, the export and the push
    card.py      the model card
    folder.py    writing the folder atomically, never replacing what an export did not make

The command line is ``timm-gsop export|push`` (``timm_gsop.cli``).
"""
from .card import measure, model_card
from .export import (
    PREPROCESSING_KEYS, build_model_from_checkpoint, export_checkpoint, export_data_config, parse_model_kwargs,
    push_checkpoint)
from .folder import ALLOWED_FILES, StagedFolder
from .messages import ExportError, Reporter
from .run import LoadedCheckpoint, TrainRun, read_checkpoint, read_label_names_file, read_run

__all__ = [
    'ExportError', 'LoadedCheckpoint', 'TrainRun', 'read_checkpoint', 'read_run', 'read_label_names_file',
    'build_model_from_checkpoint', 'export_data_config', 'export_checkpoint', 'push_checkpoint',
    'parse_model_kwargs', 'model_card', 'measure', 'ALLOWED_FILES', 'PREPROCESSING_KEYS', 'StagedFolder',
    'Reporter',
]
