"""What a training run left behind: the checkpoint (weights and metadata), train.py's arguments,
its per-epoch summary and the class names of its training set.

train.py writes ``args.yaml`` and ``summary.csv`` next to its checkpoints; the arguments are also
stored in each checkpoint. Nothing here is required: an official GSoP checkpoint or a bare state
dict has none of it.
"""
import argparse
import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..models._checkpoint import (
    CheckpointError, check_finite, is_official_state_dict, load_checkpoint_file, state_dict_from_checkpoint)
from .messages import ExportError

__all__ = [
    'LoadedCheckpoint', 'read_checkpoint', 'TrainRun', 'read_run', 'read_summary_csv', 'run_dataset',
    'run_label_names', 'read_label_names_file', 'check_label_names',
]

PathLike = Union[str, os.PathLike]


@dataclass
class LoadedCheckpoint:
    """A checkpoint's weights (in this package's parameter names) and what it says about itself."""
    path: Path
    state_dict: Dict[str, torch.Tensor]
    source: str  # where the weights came from: 'state_dict_ema', 'state_dict', ... or 'top level'
    official: bool  # written by the official GSoP code (converted to our names)
    epoch: Optional[int] = None
    arch: Optional[str] = None
    metric: Optional[float] = None
    train_args: Dict[str, Any] = field(default_factory=dict)  # train.py's args, when stored


def _to_float(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        return float(value.flatten()[0]) if value.numel() else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_checkpoint(path: PathLike) -> LoadedCheckpoint:
    """Read a timm train.py checkpoint, an official GSoP checkpoint, a bare state dict or a .safetensors file.

    ``torch.load(weights_only=True)`` only (train.py's ``argparse.Namespace`` allowed); the EMA
    weights of a timm checkpoint when present; wrapper prefixes removed, official names converted.
    Non-finite values are an error.
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f'checkpoint not found: {path}')
    if not path.is_file():
        raise ExportError(f'checkpoint is not a file: {path}')
    if path.stat().st_size == 0:
        raise ExportError(f'checkpoint is empty (0 bytes): {path}')
    try:
        checkpoint = load_checkpoint_file(str(path))
    except Exception as e:  # zip/pickle/EOF errors of a truncated file, blocked globals of a foreign pickle
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ExportError(
            f'cannot read checkpoint {path}: {type(e).__name__}: {first_line}\n'
            f'The file is corrupted or truncated, or it is not a PyTorch checkpoint that loads with '
            f'torch.load(weights_only=True) (pickled objects other than tensors and plain containers are refused).'
        ) from e
    if not isinstance(checkpoint, dict):
        raise ExportError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of weights')
    try:
        source, state_dict = state_dict_from_checkpoint(checkpoint)
    except CheckpointError as e:
        raise ExportError(f'{path}: {e}') from e
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ExportError(
            f'checkpoint {path} holds no state dict: expected tensors under "state_dict_ema", "state_dict" or '
            f'at the top level, found the entries {sorted(map(str, checkpoint))[:12]}')
    try:
        check_finite(state_dict)
    except CheckpointError as e:
        raise ExportError(f'{path}: {e}') from e

    meta = checkpoint if source else {}
    args = meta.get('args')
    train_args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    epoch = meta.get('epoch')
    metric = next((_to_float(meta[k]) for k in ('metric', 'best_prec1') if meta.get(k) is not None), None)
    return LoadedCheckpoint(
        path=path, state_dict=state_dict, source=source or 'top level',
        official=is_official_state_dict(checkpoint[source] if source else checkpoint),
        epoch=int(epoch) if isinstance(epoch, (int, float)) else None,
        arch=meta.get('arch') if isinstance(meta.get('arch'), str) else None,
        metric=metric, train_args=dict(train_args))


@dataclass
class TrainRun:
    """train.py's arguments and per-epoch results for a checkpoint (empty where it left none)."""
    args: Dict[str, Any] = field(default_factory=dict)
    args_origin: str = ''  # 'args.yaml', or 'the arguments stored in the checkpoint'
    summary: List[Dict[str, float]] = field(default_factory=list)  # summary.csv rows, numbers as floats

    def model_kwargs(self) -> Dict[str, Any]:
        kwargs = self.args.get('model_kwargs')
        return dict(kwargs) if isinstance(kwargs, dict) else {}


def read_summary_csv(path: PathLike) -> List[Dict[str, float]]:
    """Rows of train.py's summary.csv, numbers as floats (unparseable cells dropped)."""
    rows = []
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            parsed = {}
            for k, v in row.items():
                if k is None:
                    continue
                try:
                    parsed[k.strip()] = float(v)
                except (TypeError, ValueError):
                    pass
            if 'epoch' in parsed:
                rows.append(parsed)
    return rows


def read_run(checkpoint: LoadedCheckpoint) -> TrainRun:
    """args.yaml (else the checkpoint's stored arguments) and summary.csv beside the checkpoint."""
    run = TrainRun()
    args_file = checkpoint.path.parent / 'args.yaml'
    if args_file.is_file():
        import yaml
        try:
            with open(args_file) as f:
                args = yaml.safe_load(f)
            if isinstance(args, dict):
                run.args, run.args_origin = args, 'args.yaml'
        except yaml.YAMLError:
            pass
    if not run.args and checkpoint.train_args:
        run.args, run.args_origin = dict(checkpoint.train_args), 'the arguments stored in the checkpoint'
    summary_file = checkpoint.path.parent / 'summary.csv'
    if summary_file.is_file():
        run.summary = read_summary_csv(summary_file)
    return run


# --------------------------------------------------------------------------------------------------
# the training set: its name and class names
# --------------------------------------------------------------------------------------------------

def _is_folder_dataset(name: str) -> bool:
    """timm reads a dataset name without a ``prefix/`` (``''``, ``'folder'``, ...) as a folder or tar of images."""
    return '/' not in name


def run_dataset(args: Dict[str, Any]) -> Optional[str]:
    """The training set as train.py's ``--dataset`` / ``--data-dir`` name it (a folder by its own name only)."""
    name = str(args.get('dataset') or '')
    data_dir = str(args.get('data_dir') or args.get('data') or '')
    if not _is_folder_dataset(name):
        return f'`{name}`'
    if not data_dir:
        return None
    return f'the image folder `{os.path.basename(os.path.normpath(data_dir))}`'


def run_label_names(args: Dict[str, Any], num_classes: int) -> Tuple[Optional[List[str]], str]:
    """Class names of the run's training set in the classifier's order, and a note on where they came from.

    As train.py builds its training set: timm's ``create_dataset`` with the run's dataset, data dir,
    train split and class map, so the order is timm's (natural sort of the class folders for an
    ImageFolder). Folder datasets and ``torch/`` datasets already on disk are read; others
    (``hfds/``, ``tfds/``, ``wds/``) are not, and no download is ever made.
    """
    name = str(args.get('dataset') or '')
    data_dir = args.get('data_dir') or args.get('data')
    if not (_is_folder_dataset(name) or name.startswith('torch/')):
        return None, f'the run trained on {name}, which is not read here'
    if not data_dir:
        return None, 'the run records no --data-dir to read them from'
    from timm.data import create_dataset
    split = args.get('train_split') or 'train'
    try:
        dataset = create_dataset(name, root=str(data_dir), split=split, is_training=True,
                                 class_map=args.get('class_map') or None, download=False)
    except Exception as e:  # the folder moved, or a torch/ dataset is not downloaded
        return None, f'the training set could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    if class_to_idx:
        names = [n for n, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
        if sorted(class_to_idx.values()) != list(range(len(names))):
            return None, 'the class map does not number the classes 0 .. N-1'
    else:
        names = list(getattr(dataset, 'classes', None) or [])
    if len(names) != num_classes:
        return None, f'the training set has {len(names)} classes, the classifier {num_classes}'
    return [str(n) for n in names], f'the class folders of the training set (split {split!r})'


def read_label_names_file(path: PathLike) -> List[str]:
    """Class names from a file: a JSON list, or one name a line (as timm's ``.txt`` class maps)."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except OSError as e:
        raise ExportError(f'cannot read the label names file {path}: {e.strerror or e}') from e
    if path.suffix == '.json':
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExportError(f'{path} is not valid JSON: {e}') from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ExportError(f'{path} must hold a JSON list of class names (strings)')
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_label_names(names: Sequence[str], num_classes: int) -> List[str]:
    if len(names) != num_classes:
        raise ExportError(f'{len(names)} label names given for a classifier of {num_classes} classes')
    if len(set(names)) != len(names):
        raise ExportError('the label names are not unique')
    return list(names)
