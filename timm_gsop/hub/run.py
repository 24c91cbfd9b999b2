"""What a training run left behind: the checkpoint (weights and metadata), train.py's arguments
(``args.yaml``, else those stored in the checkpoint), its per-epoch ``summary.csv`` and the class names
of its training set. None of it is required: an official GSoP checkpoint or a bare state dict has none.
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from timm.models import clean_state_dict

from ..models._checkpoint import CheckpointError, check_finite, load_checkpoint_file, state_dict_from_checkpoint

__all__ = [
    'ExportError', 'Reporter', 'LoadedCheckpoint', 'read_checkpoint', 'TrainRun', 'read_run', 'run_label_names',
    'read_label_names_file', 'check_label_names',
]

PathLike = Union[str, os.PathLike]


class ExportError(Exception):
    """A checkpoint that cannot be exported, or an export that cannot be written; the message says why."""


class Reporter:
    """``progress(msg)``: timed lines on stderr when verbose; ``warn(msg)``: always shown."""

    def __init__(self, verbose: bool = True):
        self.verbose, self._start = verbose, time.monotonic()

    def progress(self, msg: str) -> None:
        if self.verbose:
            print(f'[timm-gsop {time.monotonic() - self._start:6.1f}s] {msg}', file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        print(f'timm-gsop: warning: {msg}', file=sys.stderr, flush=True)


def finite_number(value: Any) -> Optional[float]:
    """``value`` as a finite float (a one-element tensor too), else None."""
    if isinstance(value, torch.Tensor):
        value = value.flatten()[0].item() if value.numel() == 1 else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class LoadedCheckpoint:
    """A checkpoint's weights (in this package's parameter names) and what it says about itself."""
    path: Path
    state_dict: Dict[str, torch.Tensor]
    source: str  # where the weights were found: 'state_dict_ema', 'state_dict', ... or 'top level'
    official: bool  # written by the official GSoP code (names converted)
    epoch: Optional[int] = None
    arch: Optional[str] = None
    metric: Optional[float] = None
    train_args: Dict[str, Any] = field(default_factory=dict)  # train.py's arguments, when stored


def read_checkpoint(path: PathLike) -> LoadedCheckpoint:
    """A timm train.py checkpoint (its EMA weights when present), an official GSoP checkpoint, a state
    dict or a .safetensors file, read with ``torch.load(weights_only=True)``; non-finite values refused."""
    path = Path(path)
    problem = 'not found' if not path.exists() else 'is not a file' if not path.is_file() else \
        'is empty (0 bytes)' if path.stat().st_size == 0 else None
    if problem:
        raise ExportError(f'checkpoint {problem}: {path}')
    try:
        checkpoint = load_checkpoint_file(str(path))
    except Exception as e:  # zip/pickle/EOF errors of a truncated file, blocked globals of a foreign pickle
        first_line = (str(e).strip().splitlines() or [''])[0]
        raise ExportError(
            f'cannot read checkpoint {path}: {type(e).__name__}: {first_line}. The file is corrupted or truncated, '
            f'or not a PyTorch checkpoint that loads with torch.load(weights_only=True).') from e
    if not isinstance(checkpoint, dict):
        raise ExportError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of weights')
    try:
        source, state_dict = state_dict_from_checkpoint(checkpoint)
        if not state_dict or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
            raise CheckpointError(
                f'no state dict: expected tensors named by strings under "state_dict_ema", "state_dict" or at the '
                f'top level, found the entries {sorted(map(str, checkpoint))[:12]}')
        check_finite(state_dict)
    except CheckpointError as e:
        raise ExportError(f'{path}: {e}') from e
    except (AttributeError, TypeError) as e:  # keys that are not names (timm's clean_state_dict needs strings)
        raise ExportError(f'{path} holds no state dict of tensors named by strings ({type(e).__name__}: {e})') from e
    raw = checkpoint[source] if source else checkpoint
    meta = checkpoint if source else {}
    args = meta.get('args')
    train_args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    epoch = finite_number(meta.get('epoch'))
    metric = next((finite_number(meta[k]) for k in ('metric', 'best_prec1') if meta.get(k) is not None), None)
    return LoadedCheckpoint(
        path=path, state_dict=state_dict, source=source or 'top level',
        official=bool(set(state_dict) - set(clean_state_dict(raw)) - {k for k in state_dict if 'num_batches' in k}),
        epoch=int(epoch) if epoch is not None else None,
        arch=meta.get('arch') if isinstance(meta.get('arch'), str) else None,
        metric=metric, train_args=dict(train_args))


@dataclass
class TrainRun:
    """train.py's arguments and per-epoch results for a checkpoint (empty where it left none)."""
    args: Dict[str, Any] = field(default_factory=dict)
    args_origin: str = ''  # 'args.yaml', or 'the arguments stored in the checkpoint'
    summary: List[Dict[str, float]] = field(default_factory=list)  # summary.csv rows with a whole epoch

    def model_kwargs(self) -> Dict[str, Any]:
        kwargs = self.args.get('model_kwargs')
        return dict(kwargs) if isinstance(kwargs, dict) else {}


def _read_summary_csv(path: Path) -> List[Dict[str, float]]:
    """summary.csv rows with a whole, finite epoch; their finite numbers as floats."""
    def number(text: Any) -> Optional[float]:
        try:
            return finite_number(float(text))
        except (TypeError, ValueError):
            return None
    with open(path, newline='', encoding='utf-8', errors='replace') as f:
        rows = [{k.strip(): x for k, v in row.items() if isinstance(k, str) and (x := number(v)) is not None}
                for row in csv.DictReader(f)]
    return [row for row in rows if row.get('epoch', 0.5).is_integer()]


def read_run(checkpoint: LoadedCheckpoint) -> TrainRun:
    """args.yaml (else the checkpoint's stored arguments) and summary.csv beside the checkpoint."""
    import yaml
    run = TrainRun()
    args_file = checkpoint.path.parent / 'args.yaml'
    if args_file.is_file():
        try:
            args = yaml.safe_load(args_file.read_text(encoding='utf-8'))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ExportError(f'cannot read {args_file}: {type(e).__name__}; fix or move it') from e
        if not isinstance(args, dict):
            raise ExportError(f'{args_file} holds no train.py arguments (a YAML mapping)')
        run.args, run.args_origin = args, 'args.yaml'
    elif checkpoint.train_args:
        run.args, run.args_origin = dict(checkpoint.train_args), 'the arguments stored in the checkpoint'
    summary_file = checkpoint.path.parent / 'summary.csv'
    if summary_file.is_file():
        run.summary = _read_summary_csv(summary_file)
    return run


def run_label_names(args: Dict[str, Any], num_classes: int) -> Tuple[Optional[List[str]], str]:
    """Class names of the run's training set in the classifier's order, and where they came from.

    For an image folder, as timm's folder reader orders them: the names of the class folders (those with
    an image) in natural sort order (``timm.utils.natural_key``), or the run's ``--class-map``. Folders are
    listed until their first image, never whole; other datasets (``torch/``, ``hfds/``, ...) are not read.
    """
    from timm.data.dataset_factory import _search_split  # train.py's way from --data-dir to the split folder
    from timm.data import get_img_extensions
    from timm.data.readers.class_map import load_class_map
    from timm.utils import natural_key
    name, data_dir = str(args.get('dataset') or ''), args.get('data_dir') or args.get('data')
    if '/' in name:
        return None, f'the run trained on {name}, which is not read here'
    if not data_dir:
        return None, 'the run records no --data-dir'
    root = _search_split(str(data_dir), str(args.get('train_split') or 'train'))
    try:
        if args.get('class_map'):
            class_to_idx = load_class_map(args['class_map'], root)
            names = [n for n, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
        else:
            images = get_img_extensions()  # timm's reader takes the folders that hold images; the first one tells
            names = sorted((e.name for e in os.scandir(root) if e.is_dir() and any(
                os.path.splitext(f.name)[1].lower() in images for f in os.scandir(e.path))), key=natural_key)
    except Exception as e:  # the folder moved or is unreadable
        return None, f'the training set could not be read ({type(e).__name__}: {root})'
    if len(names) != num_classes:
        return None, f'the training set has {len(names)} class folders, the classifier {num_classes} classes'
    return names, f'the class folders of {root}'


def read_label_names_file(path: PathLike) -> List[str]:
    """Class names from a file: a JSON list, or one name a line (as timm's ``.txt`` class maps)."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f'cannot read the label names file {path}: {getattr(e, "strerror", None) or e}') from e
    if path.suffix != '.json':
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        names = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f'{path} is not valid JSON: {e}') from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ExportError(f'{path} must hold a JSON list of class names (strings)')
    return names


def check_label_names(names: Sequence[str], num_classes: int) -> List[str]:
    if len(names) != num_classes:
        raise ExportError(f'{len(names)} label names given for a classifier of {num_classes} classes')
    if len(set(names)) != len(names):
        raise ExportError('the label names are not unique')
    return list(names)
