"""Publish GSoP-Net weights the way timm users load them: a Hugging Face Hub folder.

``export_checkpoint`` turns a timm ``train.py`` checkpoint (its EMA weights when present) or a
checkpoint of the official GSoP code into a folder holding

* ``model.safetensors``: the weights, in this package's (timm) parameter names;
* ``config.json``: architecture, model arguments and pretrained cfg as timm reads them, so that
  ``timm.create_model('local-dir:FOLDER', pretrained=True)`` or, once uploaded,
  ``timm.create_model('hf-hub:USER/REPO', pretrained=True)`` (after ``import timm_gsop``) rebuilds
  the exact model with no keyword arguments;
* ``README.md``: a model card (architecture, parameters, GMACs, training recipe and results when
  train.py's ``args.yaml`` / ``summary.csv`` lie beside the checkpoint, usage, citation), and
  ``training_curves.png`` when matplotlib is importable.

The folder is written under a temporary sibling name, checked (no pickle file; the folder alone
rebuilds a model with the same logits) and renamed at the end. ``push_checkpoint`` exports to a
temporary folder and uploads it with ``huggingface_hub``.
"""
import argparse
import ast
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import timm
from huggingface_hub import HfApi

from .models._checkpoint import check_state_dict_fits, convert_official_state_dict, is_official_state_dict

__all__ = [
    'ExportError', 'LoadedCheckpoint', 'read_checkpoint', 'build_model_from_checkpoint', 'export_checkpoint',
    'push_checkpoint', 'parse_model_kwargs', 'generate_model_card', 'ALLOWED_FILES',
]

PathLike = Union[str, os.PathLike]

#: Everything an exported folder may hold; anything else (a pickle above all) is an error.
ALLOWED_FILES = ('model.safetensors', 'config.json', 'README.md', 'training_curves.png')
_PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.pickle', '.tar', '.ckpt', '.npz')

PAPER_TITLE = 'Global Second-order Pooling Convolutional Networks'
PAPER_URL = 'https://arxiv.org/abs/1811.12006'
OFFICIAL_CODE_URL = 'https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks'
CITATION = """@inproceedings{gao2019global,
  title     = {Global Second-order Pooling Convolutional Networks},
  author    = {Gao, Zilin and Xie, Jiangtao and Wang, Qilong and Li, Peihua},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2019}
}"""

# train.py arguments shown in the card's recipe table, in this order (those present and set).
_RECIPE_KEYS = (
    'model', 'model_kwargs', 'dataset', 'train_split', 'val_split', 'num_classes', 'img_size', 'input_size',
    'crop_pct', 'epochs', 'batch_size', 'grad_accum_steps', 'opt', 'opt_eps', 'momentum', 'weight_decay', 'lr',
    'lr_base', 'lr_base_size', 'sched', 'warmup_epochs', 'warmup_lr', 'min_lr', 'cooldown_epochs',
    'decay_epochs', 'decay_rate', 'smoothing', 'mixup', 'cutmix', 'mixup_prob', 'aa', 'reprob', 'remode',
    'color_jitter', 'scale', 'ratio', 'hflip', 'drop', 'drop_path', 'bce_loss', 'amp', 'amp_dtype', 'channels_last',
    'model_ema', 'model_ema_decay', 'sync_bn', 'seed',
)
# train.py arguments that describe the training machine rather than the recipe; never published.
_PRIVATE_KEYS = frozenset((
    'data_dir', 'data', 'output', 'resume', 'initial_checkpoint', 'experiment', 'class_map', 'log_wandb',
    'wandb_project', 'wandb_tags', 'wandb_resume_id', 'device', 'device_modules', 'local_rank', 'rank',
    'world_size', 'dist_backend', 'dist_url', 'workers', 'pin_mem', 'log_interval', 'recovery_interval',
    'checkpoint_hist', 'torchcompile', 'dataset_download', 'input_img_mode', 'input_key', 'target_key',
))


class ExportError(Exception):
    """A checkpoint that cannot be exported, or an export that cannot be written; the message says why."""


def _progress_printer(verbose: bool) -> Callable[[str], None]:
    start = time.monotonic()

    def progress(msg: str) -> None:
        if verbose:
            print(f'[timm-gsop {time.monotonic() - start:6.1f}s] {msg}', file=sys.stderr, flush=True)
    return progress


# --------------------------------------------------------------------------------------------------
# reading checkpoints
# --------------------------------------------------------------------------------------------------

@dataclass
class LoadedCheckpoint:
    """A checkpoint's weights (in our parameter names) and what it says about itself."""
    path: Path
    state_dict: Dict[str, torch.Tensor]
    source: str  # which entry the weights came from, e.g. 'state_dict_ema'
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

    Always ``torch.load(weights_only=True)`` (with ``argparse.Namespace`` allowed, as timm's train.py
    stores its arguments that way). The EMA weights of a timm checkpoint are taken when present.
    Wrapper prefixes (``module.``, ``_orig_mod.``) are removed and official names converted.
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f'checkpoint not found: {path}')
    if not path.is_file():
        raise ExportError(f'checkpoint is not a file: {path}')
    if path.stat().st_size == 0:
        raise ExportError(f'checkpoint is empty (0 bytes): {path}')
    try:
        if path.suffix == '.safetensors':
            import safetensors.torch
            checkpoint = safetensors.torch.load_file(str(path), device='cpu')
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # zip/pickle/EOF errors of a truncated file, blocked globals of a foreign pickle
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ExportError(
            f'cannot read checkpoint {path}: {type(e).__name__}: {first_line}\n'
            f'The file is corrupted or truncated, or it is not a PyTorch checkpoint that loads with '
            f'torch.load(weights_only=True) (pickled objects other than tensors and plain containers are refused).'
        ) from e
    if not isinstance(checkpoint, dict):
        raise ExportError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of weights')

    source = ''
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict) and checkpoint[key]:
            source = key
            break
    state_dict = checkpoint[source] if source else checkpoint
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ExportError(
            f'checkpoint {path} holds no state dict: expected tensors under "state_dict_ema", "state_dict" or '
            f'at the top level, found the entries {sorted(map(str, checkpoint))[:12]}')

    clean = {}
    for k, v in state_dict.items():
        for prefix in ('_orig_mod.', 'module.', '_orig_mod.'):
            k = k[len(prefix):] if k.startswith(prefix) else k
        clean[k] = v
    official = is_official_state_dict(clean)
    if official:
        clean = convert_official_state_dict(clean)

    meta = checkpoint if source else {}
    args = meta.get('args')
    train_args = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}
    epoch = meta.get('epoch')
    metric = _to_float(meta['metric']) if meta.get('metric') is not None else (
        _to_float(meta['best_prec1']) if meta.get('best_prec1') is not None else None)
    return LoadedCheckpoint(
        path=path, state_dict=clean, source=source or 'top level', official=official,
        epoch=int(epoch) if isinstance(epoch, (int, float)) else None,
        arch=meta.get('arch') if isinstance(meta.get('arch'), str) else None,
        metric=metric, train_args=train_args)


# --------------------------------------------------------------------------------------------------
# building the model
# --------------------------------------------------------------------------------------------------

def parse_model_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``['attn_mode=position', 'attn_dim=64']`` -> dict; values are Python literals where they parse."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition('=')
        key = key.strip().replace('-', '_')
        if not sep or not key.isidentifier():
            raise ExportError(f'model kwarg {item!r} is not of the form key=value')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def infer_model_kwargs(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """What the weights themselves say: num_classes (fc), attn_dim, and attn_mode where the keys decide it."""
    out: Dict[str, Any] = {}
    if 'fc.weight' in state_dict:
        out['num_classes'] = int(state_dict['fc.weight'].shape[0])
    elif not any(k.startswith('fc.') for k in state_dict):
        out['num_classes'] = 0
    dims = [v.shape[0] for k, v in state_dict.items() if k.endswith('_gate.conv_reduce.weight')]
    if dims:
        out['attn_dim'] = int(dims[0])
    has_c = any('.attn.channel_gate.' in k for k in state_dict)
    has_p = any('.attn.position_gate.' in k for k in state_dict)
    has_f = any('.attn.fuse_' in k for k in state_dict)
    if has_f:
        out['attn_mode'] = 'fusion_concat'
    elif has_c and not has_p:
        out['attn_mode'] = 'channel'
    elif has_p and not has_c:
        out['attn_mode'] = 'position'
    elif not has_c and not has_p:
        out['attn_mode'] = 'none'
    # channel + position gates without fusion convs: fusion_avg or fusion_max, the keys cannot tell.
    return out


def _gsop_model_names() -> List[str]:
    return sorted(timm.list_models('gsop*'))


def build_model_from_checkpoint(
        checkpoint: LoadedCheckpoint,
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        progress: Callable[[str], None] = lambda msg: None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """``timm.create_model(model_name, **kwargs)`` with the checkpoint's weights loaded strictly.

    kwargs: what the weights say (num_classes, attn_dim, attn_mode), then train.py's
    ``--model-kwargs`` stored in the checkpoint, then ``model_kwargs`` (later ones win).
    Returns the model (eval mode) and the kwargs it was created with.
    """
    names = _gsop_model_names()
    if model_name not in names:
        raise ExportError(f'unknown model {model_name!r}; this exports GSoP-Net models: {", ".join(names)}')
    if checkpoint.arch and not checkpoint.official and checkpoint.arch != model_name:
        progress(f'warning: the checkpoint was trained as {checkpoint.arch!r}, exporting as {model_name!r}')

    kwargs = infer_model_kwargs(checkpoint.state_dict)
    train_kwargs = checkpoint.train_args.get('model_kwargs') or {}
    if isinstance(train_kwargs, dict):
        kwargs.update(train_kwargs)
    kwargs.update(model_kwargs or {})
    user_keys = set(model_kwargs or {})
    if 'attn_mode' not in kwargs:
        raise ExportError(
            'the checkpoint has both channel and position gates but no fusion convolutions: it is attn_mode '
            'fusion_avg or fusion_max, which its keys cannot tell apart. Pass --model-kwargs attn_mode=fusion_avg '
            '(or attn_mode=fusion_max), as it was trained.')
    progress(f'creating {model_name}({", ".join(f"{k}={v!r}" for k, v in kwargs.items())})')
    try:
        model = timm.create_model(model_name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ExportError(f'cannot create {model_name} with {kwargs}: {e}') from e

    state_dict = checkpoint.state_dict
    hint = 'Pass the model name and --model-kwargs the checkpoint was trained with.'
    if user_keys & {'attn_mode', 'attn_dim', 'num_classes'}:
        hint += ' (Without attn_mode / attn_dim / num_classes in --model-kwargs they are read from the weights.)'
    try:
        check_state_dict_fits(state_dict, model, hint=hint)
    except ValueError as e:
        raise ExportError(f'checkpoint {checkpoint.path} does not fit {model_name}: {e}') from e
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), kwargs


# --------------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------------

def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass (convolutions and matrix products), batch 1.

    ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per multiply-add; this returns half.
    """
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


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


def _read_train_args(checkpoint: LoadedCheckpoint) -> Tuple[Dict[str, Any], str]:
    args_file = checkpoint.path.parent / 'args.yaml'
    if args_file.is_file():
        import yaml
        try:
            with open(args_file) as f:
                args = yaml.safe_load(f)
            if isinstance(args, dict):
                return args, 'args.yaml'
        except yaml.YAMLError:
            pass
    if checkpoint.train_args:
        return dict(checkpoint.train_args), 'the arguments stored in the checkpoint'
    return {}, ''


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f'{value:g}'
    if isinstance(value, (list, tuple)):
        return ', '.join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ', '.join(f'{k}={_fmt(v)}' for k, v in value.items())
    return str(value)


def _is_private_value(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(('/', '~', '\\')) or (len(value) > 2 and value[1] == ':'))


def _plot_training_curves(rows: List[Dict[str, float]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except Exception:
        return False
    epochs = [r['epoch'] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, label in (('train_loss', 'train loss'), ('eval_loss', 'eval loss')):
        if any(key in r for r in rows):
            ax_loss.plot([r['epoch'] for r in rows if key in r], [r[key] for r in rows if key in r], label=label)
    ax_loss.set_xlabel('epoch')
    ax_loss.set_ylabel('loss')
    ax_loss.legend()
    for key, label in (('eval_top1', 'top-1'), ('eval_top5', 'top-5')):
        if any(key in r for r in rows):
            ax_acc.plot([r['epoch'] for r in rows if key in r], [r[key] for r in rows if key in r], label=label)
    ax_acc.set_xlabel('epoch')
    ax_acc.set_ylabel('eval accuracy (%)')
    ax_acc.legend()
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs:
        ax_acc.set_xlim(min(epochs), max(epochs) if max(epochs) > min(epochs) else min(epochs) + 1)
    fig.tight_layout()
    fig.savefig(path, format='png')
    plt.close(fig)
    return True


def _architecture_text(model_name: str, kwargs: Dict[str, Any]) -> str:
    net2 = model_name.startswith('gsop2')
    depth = '101' if model_name.endswith('101') else '50'
    mode = kwargs.get('attn_mode') or 'none'
    if mode == 'none':
        blocks = 'no GSoP blocks (the same backbone without attention, the paper\'s baseline)'
    else:
        where = 'stages 1-3' if net2 else 'every stage'
        blocks = (f'a GSoP block (attn_mode=`{mode}`, attn_dim={kwargs.get("attn_dim", 128)}) after the last '
                  f'bottleneck\'s bn3 in {where}')
    pool = ('iSQRT-COV pooling (matrix square root of a 256x256 covariance, 32,896 features)' if net2
            else 'global average pooling')
    return (f'GSoP-Net{2 if net2 else 1} on ResNet-{depth}: {blocks}; {pool}; the last stage keeps stride 1 '
            f'(14x14 features at 224 px) as in the official code.')


def generate_model_card(
        model: nn.Module,
        model_name: str,
        model_kwargs: Dict[str, Any],
        checkpoint: LoadedCheckpoint,
        out_dir: Path,
        title: str,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
        progress: Callable[[str], None] = lambda msg: None,
) -> str:
    """README.md text; writes ``training_curves.png`` into ``out_dir`` when it can."""
    cfg = model.pretrained_cfg
    license = license or cfg.get('license') or 'apache-2.0'
    n_params = sum(p.numel() for p in model.parameters())
    progress('counting multiply-accumulates at 224x224')
    macs = count_macs(model, (3, 224, 224))
    input_size = tuple(cfg.get('input_size', (3, 224, 224)))

    lines = [
        '---',
        'tags:',
        '- image-classification',
        '- timm',
        '- gsop-net',
        'library_name: timm',
        'pipeline_tag: image-classification',
        f'license: {license}',
        '---',
        f'# Model card for {title}',
        '',
        f'A GSoP-Net image classification model (`{model_name}`), from "{PAPER_TITLE}" (Gao, Xie, Wang, Li; '
        f'CVPR 2019), implemented as a [timm](https://github.com/huggingface/pytorch-image-models) model by the '
        f'`timm_gsop` package.',
        '',
        '## Model Details',
        '- **Model type:** image classification / feature backbone',
        f'- **Architecture:** `{model_name}`. {_architecture_text(model_name, model_kwargs)}',
        f'- **Model arguments (config.json `model_args`):** `{json.dumps(model_kwargs, sort_keys=True)}`',
        f'- **Params (M):** {n_params / 1e6:.2f}',
        f'- **GMACs (224x224):** {macs / 1e9:.2f} (multiply-accumulates of convolutions and matrix products, '
        f'counted with `torch.utils.flop_counter.FlopCounterMode`; the paper reports this quantity as "GFLOPs"; '
        f'{2 * macs / 1e9:.2f} GFLOPs at 2 FLOPs per multiply-add)',
        f'- **Image size:** {input_size[1]}x{input_size[2]} (accepts any size from '
        f'{tuple(cfg.get("min_input_size", (3, 64, 64)))[-1]} px)',
        f'- **Preprocessing:** resize + center crop (crop_pct={cfg.get("crop_pct")}, '
        f'{cfg.get("interpolation")}), mean={_fmt(cfg.get("mean"))}, std={_fmt(cfg.get("std"))}',
        f'- **Classes:** {model.num_classes}',
        f'- **Paper:** [{PAPER_TITLE}]({PAPER_URL}) (CVPR 2019)',
        f'- **Original code:** {OFFICIAL_CODE_URL}',
    ]
    if checkpoint.official:
        origin = f'converted from a checkpoint of the official GSoP code (arch `{checkpoint.arch}`'
        origin += f', epoch {checkpoint.epoch}' if checkpoint.epoch is not None else ''
        origin += f', best top-1 {checkpoint.metric:.2f}%' if checkpoint.metric is not None else ''
        lines.append(f'- **Weights:** {origin})')
    else:
        which = 'EMA weights' if 'ema' in checkpoint.source else 'weights'
        epoch = f' of epoch {checkpoint.epoch}' if checkpoint.epoch is not None else ''
        lines.append(f'- **Weights:** {which}{epoch} of a checkpoint written by timm\'s `train.py`' if checkpoint.source != 'top level'
                     else '- **Weights:** a bare state dict')

    args, args_origin = _read_train_args(checkpoint)
    if args:
        lines += ['', '## Training recipe', '', f'From {args_origin} (paths and machine settings left out).', '',
                  '| argument | value |', '|---|---|']
        shown = set()
        for key in _RECIPE_KEYS:
            value = args.get(key)
            if value is None or value == '' or value == {} or key in _PRIVATE_KEYS or _is_private_value(value):
                continue
            lines.append(f'| {key} | {_fmt(value)} |')
            shown.add(key)
        rest = {k: v for k, v in args.items() if k not in shown and k not in _PRIVATE_KEYS
                and not _is_private_value(v) and v is not None and v != '' and v != {} and v != []}
        if rest:
            lines += ['', '<details><summary>All other arguments</summary>', '', '```yaml']
            lines += [f'{k}: {json.dumps(v) if not isinstance(v, str) else v}' for k, v in sorted(rest.items())]
            lines += ['```', '', '</details>']

    summary_file = checkpoint.path.parent / 'summary.csv'
    rows = read_summary_csv(summary_file) if summary_file.is_file() else []
    if rows:
        best = max((r for r in rows if 'eval_top1' in r), key=lambda r: r['eval_top1'], default=None)
        this = next((r for r in rows if checkpoint.epoch is not None and int(r['epoch']) == checkpoint.epoch), None)
        lines += ['', '## Results', '', f'From summary.csv ({len(rows)} epochs logged by train.py; evaluation on '
                  f'{args.get("dataset") or "the validation set"}'
                  f'{", split " + str(args["val_split"]) if args.get("val_split") else ""}).', '',
                  '| weights | epoch | top-1 (%) | top-5 (%) |', '|---|---|---|---|']

        def row_text(label, r):
            top5 = f'{r["eval_top5"]:.2f}' if 'eval_top5' in r else 'n/a'
            return f'| {label} | {int(r["epoch"])} | {r.get("eval_top1", float("nan")):.2f} | {top5} |'
        if this is not None:
            lines.append(row_text('this checkpoint', this))
        if best is not None and best is not this:
            lines.append(row_text('best epoch of the run', best))
        last = rows[-1]
        if last is not this and last is not best and 'eval_top1' in last:
            lines.append(row_text('last epoch of the run', last))
        if _plot_training_curves(rows, out_dir / 'training_curves.png'):
            lines += ['', '![Training curves](training_curves.png)']
        else:
            lines += ['', '_No plot of the training curves: matplotlib is not installed where this card was made._']
    elif checkpoint.metric is not None:
        lines += ['', '## Results', '', f'The checkpoint records a top-1 accuracy of {checkpoint.metric:.2f}% '
                  f'(no summary.csv beside it).']

    hub_name = f'hf-hub:{repo_id}' if repo_id else 'hf-hub:USER/REPO'
    lines += [
        '', '## Model Usage', '',
        '`pip install timm timm-gsop`; `import timm_gsop` registers the GSoP-Net models with timm, and the model is '
        'rebuilt from `config.json` with no further arguments.', '',
        '### Image classification', '```python',
        'import timm',
        'import timm_gsop  # registers the gsop models',
        'import torch',
        'from PIL import Image', '',
        f"model = timm.create_model('{hub_name}', pretrained=True).eval()",
        "data_config = timm.data.resolve_model_data_config(model)",
        "transform = timm.data.create_transform(**data_config, is_training=False)", '',
        "img = Image.open('image.jpg').convert('RGB')",
        'with torch.no_grad():',
        '    probs = model(transform(img).unsqueeze(0)).softmax(dim=-1)',
        f'top_probs, top_classes = probs.topk({min(5, max(model.num_classes, 1))})',
        '```', '',
        '### Image embeddings', '```python',
        'with torch.no_grad():',
        '    features = model.forward_features(transform(img).unsqueeze(0))  # unpooled feature map',
        '    embedding = model.forward_head(features, pre_logits=True)  # pooled, before the classifier',
        '```', '',
        "A local copy of this folder loads the same way: `timm.create_model('local-dir:PATH', pretrained=True)`.",
        '',
        '## Citation', '```bibtex', CITATION, '```', '',
    ]
    return '\n'.join(lines)


# --------------------------------------------------------------------------------------------------
# export / push
# --------------------------------------------------------------------------------------------------

def _check_folder(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    bad = [n for n in names if n not in ALLOWED_FILES or n.endswith(_PICKLE_SUFFIXES)]
    if bad or 'model.safetensors' not in names or 'config.json' not in names:
        raise ExportError(f'internal error: the export folder holds {names}; unexpected: {bad}')


def _verify_reload(model: nn.Module, folder: Path, progress: Callable[[str], None]) -> float:
    """Rebuild the model from the folder alone and compare logits on a random batch; returns max |diff|."""
    progress('checking that the folder alone rebuilds the model (same logits)')
    try:
        reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    except Exception as e:
        raise ExportError(
            f'the exported folder does not load with timm.create_model("local-dir:...", pretrained=True): '
            f'{type(e).__name__}: {e}') from e
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), reloaded(x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        raise ExportError(
            f'internal error: the exported folder rebuilds a model whose logits differ from the source model '
            f'(max |diff| {(want - got).abs().max().item() if want.shape == got.shape else "shape"})')
    return float((want - got).abs().max())


def export_checkpoint(
        checkpoint: PathLike,
        out_dir: PathLike,
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        *,
        force: bool = False,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
        verbose: bool = True,
        verify: bool = True,
) -> Path:
    """Export ``checkpoint`` to the folder ``out_dir`` (see the module docstring). Returns ``out_dir``.

    Raises ExportError with a message that says what is wrong.
    """
    progress = _progress_printer(verbose)
    checkpoint_path = Path(checkpoint)
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise ExportError(f'{out_dir} already exists; use --force to replace it')
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise ExportError(f'{out_dir} exists and is not a folder; not replacing it')
        resolved = out_dir.resolve()
        if checkpoint_path.exists() and resolved in checkpoint_path.resolve().parents:
            raise ExportError(f'{out_dir} holds the checkpoint {checkpoint_path}; export to another folder')

    progress(f'reading {checkpoint_path}')
    ckpt = read_checkpoint(checkpoint_path)
    kind = 'official GSoP checkpoint (names converted)' if ckpt.official else f'weights from "{ckpt.source}"'
    progress(f'{len(ckpt.state_dict)} tensors, {kind}')
    model, kwargs = build_model_from_checkpoint(ckpt, model_name, model_kwargs, progress)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.partial-', dir=out_dir.parent))
    try:
        progress(f'writing model.safetensors and config.json to {tmp}')
        # The factory records the kwargs it was called with; attn_mode / attn_dim / num_classes are
        # written even where they are the defaults, so that the folder does not depend on them.
        export_args = {k: kwargs[k] for k in ('attn_mode', 'attn_dim') if k in kwargs}
        export_args.setdefault('attn_mode', getattr(model, 'attn_mode', None) or 'none')
        timm.models.save_for_hf(model, tmp, model_args=export_args, safe_serialization=True)
        card = generate_model_card(
            model, model_name, json.loads((tmp / 'config.json').read_text())['model_args'], ckpt, tmp,
            title=repo_id.split('/')[-1] if repo_id else out_dir.name, repo_id=repo_id, license=license,
            progress=progress)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        _check_folder(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the files are for publishing
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if verify:
            _verify_reload(model, tmp, progress)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.old-', dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f'done: {out_dir}')
    return out_dir


def push_checkpoint(
        checkpoint: PathLike,
        repo_id: str,
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        commit_message: Optional[str] = None,
        license: Optional[str] = None,
        verbose: bool = True,
):
    """Export ``checkpoint`` and upload the folder to the Hub model repo ``repo_id``.

    The token comes from the usual Hugging Face login (``hf auth login``) or the ``HF_TOKEN``
    environment variable; it is never printed. Returns huggingface_hub's ``CommitInfo``.
    """
    from huggingface_hub import get_token
    progress = _progress_printer(verbose)
    if '/' not in repo_id or repo_id.count('/') > 1 or not all(repo_id.split('/')):
        raise ExportError(f'repo id {repo_id!r} is not of the form USER/NAME or ORG/NAME')
    if not get_token():
        raise ExportError('not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN')
    with tempfile.TemporaryDirectory(prefix='timm-gsop-push-') as tmp:
        folder = export_checkpoint(
            checkpoint, Path(tmp) / repo_id.split('/')[-1], model_name, model_kwargs,
            repo_id=repo_id, license=license, verbose=verbose)
        config = json.loads((folder / 'config.json').read_text())
        args = config.get('model_args', {})
        message = commit_message or (
            f'Add {model_name} weights (attn_mode={args.get("attn_mode")}, attn_dim={args.get("attn_dim")}, '
            f'num_classes={config.get("num_classes")})')
        api = HfApi()
        progress(f'creating (or reusing) the model repo {repo_id}' + (' (private)' if private else ''))
        repo_url = api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
        repo_id = getattr(repo_url, 'repo_id', None) or repo_id
        if revision and revision != 'main':
            api.create_branch(repo_id, branch=revision, repo_type='model', exist_ok=True)
        progress(f'uploading {", ".join(sorted(p.name for p in folder.iterdir()))} to {repo_id}'
                 + (f'@{revision}' if revision else '') + (' as a pull request' if create_pr else ''))
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type='model', revision=revision,
            create_pr=create_pr, commit_message=message)
    progress('uploaded')
    return info
