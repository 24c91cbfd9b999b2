"""What a training run left: the checkpoint, train.py's arguments (``args.yaml``, else those the checkpoint
stores), its ``summary.csv`` and its class names. Only the weights are required (an official or bare state dict)."""
import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import yaml

from ..models._checkpoint import (
    CheckpointError, check_finite, is_official_state_dict, load_checkpoint_file, state_dict_from_checkpoint)

__all__ = ['ExportError', 'report', 'LoadedCheckpoint', 'read_checkpoint', 'run_label_names']


class ExportError(Exception):
    """A checkpoint that cannot be exported, or an export that cannot be written; the message says why."""


def report(msg: str, show: bool = True) -> None:
    """A line on stderr: progress (``show``: when verbose) or a warning (always)."""
    if show:
        print(f'timm-gsop: {msg}', file=sys.stderr, flush=True)


def finite_number(value: Any) -> Optional[float]:
    """``value`` as a finite float (a one-element tensor too), else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if finite else None


@dataclass
class LoadedCheckpoint:
    """A checkpoint's weights (in this package's parameter names), what it says about itself, and its run."""
    path: Path
    state_dict: Dict[str, torch.Tensor]
    source: str  # where the weights were found: 'state_dict_ema', 'state_dict', ... or 'top level'
    official: bool  # written by the official GSoP code (names converted)
    epoch: Optional[int] = None
    arch: Optional[str] = None
    metric: Optional[float] = None
    args: Dict[str, Any] = field(default_factory=dict)  # train.py's arguments
    args_origin: str = ''  # 'args.yaml', or 'the arguments stored in the checkpoint'
    summary: List[Dict[str, float]] = field(default_factory=list)  # summary.csv rows with a whole epoch


def read_checkpoint(path: Union[str, os.PathLike]) -> LoadedCheckpoint:
    """A train.py checkpoint (its EMA weights when present), an official one, a state dict or a .safetensors
    file, non-finite values refused; beside it train.py's args.yaml (else its stored arguments) and summary.csv."""
    path = Path(path)
    try:  # a missing, empty or damaged file, pickled objects: one line that names the file
        checkpoint = load_checkpoint_file(path)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    try:  # keys that are not names, no state dict, non-finite values
        source, state_dict = state_dict_from_checkpoint(checkpoint)
        check_finite(state_dict)
    except CheckpointError as e:
        raise ExportError(f'{path}: {e}') from e
    meta = checkpoint if source else {}
    epoch = meta.get('epoch')  # the card shows it
    if epoch is not None and (finite_number(epoch) is None or epoch < 0):
        raise ExportError(f'{path}: the checkpoint says epoch {epoch!r}, not a count of epochs: the file is damaged')
    ckpt = LoadedCheckpoint(
        path=path, state_dict=state_dict, source=source or 'top level',
        official=is_official_state_dict(checkpoint[source] if source else checkpoint),
        epoch=None if epoch is None else int(epoch),
        arch=meta.get('arch') if isinstance(meta.get('arch'), str) else None,
        metric=next((finite_number(meta[k]) for k in ('metric', 'best_prec1') if meta.get(k) is not None), None))
    stored = vars(meta['args']) if isinstance(meta.get('args'), argparse.Namespace) else meta.get('args')
    args_file = path.parent / 'args.yaml'
    if args_file.is_file():
        try:
            ckpt.args, ckpt.args_origin = yaml.safe_load(args_file.read_text(encoding='utf-8')), 'args.yaml'
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ExportError(f'cannot read {args_file}: {type(e).__name__}; fix or move it') from e
        if not isinstance(ckpt.args, dict):
            raise ExportError(f'{args_file} holds no train.py arguments (a YAML mapping)')
    elif isinstance(stored, dict) and stored:
        ckpt.args, ckpt.args_origin = dict(stored), 'the arguments stored in the checkpoint'
    if (path.parent / 'summary.csv').is_file():
        ckpt.summary = _read_summary_csv(path.parent / 'summary.csv')
    return ckpt


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


def run_label_names(args: Dict[str, Any], num_classes: int) -> Tuple[Optional[List[str]], str]:
    """(class names in the classifier's order, where they came from): the run's ``--class-map``, else, as timm's
    folder reader orders them, its class folders (those with an image, listed until the first) by ``natural_key``."""
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
            names = sorted(class_to_idx, key=class_to_idx.get)
        else:
            images = get_img_extensions()  # timm's reader takes the folders that hold images; the first one tells
            names = sorted((e.name for e in os.scandir(root) if e.is_dir() and any(
                os.path.splitext(f.name)[1].lower() in images for f in os.scandir(e.path))), key=natural_key)
    except Exception as e:  # the folder moved or is unreadable
        return None, f'the training set could not be read ({type(e).__name__}: {root})'
    if len(names) != num_classes:
        return None, f'the training set has {len(names)} class folders, the classifier {num_classes} classes'
    return names, f'the class folders of {root}'

