"""The model card (README.md) of an export: every fact read from the model, its weights and the run.

The card is a ``model_card`` dict in the form of timm's ``push_to_hf_hub`` and rendered by timm's
own ``generate_readme``. Architecture facts come from ``inspect_state_dict`` of the exported weights
(blocks per stage, GSoP blocks, covariance sizes, head), cost from counting a forward pass at the
exported input size, results and recipe from train.py's ``summary.csv`` / ``args.yaml``.
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from timm.models._hub import generate_readme

from ..models._checkpoint import StateDictArch, inspect_state_dict
from .run import LoadedCheckpoint, TrainRun

__all__ = ['model_card', 'measure', 'CITATION']

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


def measure(model: nn.Module, input_size: Sequence[int]) -> Tuple[int, Tuple[int, ...]]:
    """(multiply-accumulates, feature map shape (C, H, W)) of one eval forward pass of a batch of 1.

    ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per multiply-add of convolutions and
    matrix products; this returns half.
    """
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            features = model.forward_features(torch.zeros(1, *input_size))
            model.forward_head(features)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2, tuple(features.shape[1:])


def _fmt(value: Any, nested: bool = False) -> str:
    if isinstance(value, float):
        return f'{value:g}'
    if isinstance(value, (list, tuple)):
        text = ', '.join(_fmt(v, nested=True) for v in value)
        return f'({text})' if nested else text
    if isinstance(value, dict):
        return ', '.join(f'{k}={_fmt(v, nested=True)}' for k, v in value.items())
    return str(value)


def _size(input_size: Sequence[int]) -> str:
    return f'{input_size[-2]}x{input_size[-1]}'


def _is_private_value(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(('/', '~', '\\')) or (len(value) > 2 and value[1] == ':'))


def architecture_text(arch: StateDictArch, model: nn.Module, output_stride: int) -> str:
    """One paragraph: backbone, where the GSoP blocks sit and their covariances, head, classifier, stride."""
    backbone = (f'{"a pre-activation " if arch.preact else "a "}ResNet-{arch.depth} '
                f'({", ".join(map(str, arch.layers))} bottlenecks per stage)')
    mode = getattr(model, 'attn_mode', None) or arch.attn_mode or ' or '.join(arch.attn_modes)
    stages = [str(i + 1) for i, on in enumerate(arch.attn_stages) if on]
    if mode == 'none' or not stages:
        blocks = 'no GSoP blocks (the backbone alone, the paper\'s baseline)'
    else:
        covs = []
        if mode != 'position':
            covs.append(f'{arch.attn_dim}x{arch.attn_dim} channel covariance')
        if mode != 'channel' and arch.position_cov:
            grid = math.isqrt(arch.position_cov)
            covs.append(f'{arch.position_cov}x{arch.position_cov} position covariance of a {grid}x{grid} pooled map')
        where = ('at the end of the residual branch of the last block' if arch.preact
                 else 'after bn3 of the last bottleneck')
        blocks = (f'a GSoP block (attn_mode `{mode}`, attn_dim {arch.attn_dim}: {" and ".join(covs)}) {where} '
                  f'of stage{"s" if len(stages) > 1 else ""} {", ".join(stages)}')
    if arch.isqrt_head:
        n = arch.cov_dim * (arch.cov_dim + 1) // 2
        head = (f'iSQRT-COV pooling (1x1 conv {arch.head_in}->{arch.cov_dim}, {arch.cov_dim}x{arch.cov_dim} '
                f'covariance, {getattr(model, "sqrt_iters", "?")} Newton-Schulz iterations, upper triangle of '
                f'{n:,} values)')
    else:
        pool = getattr(model.global_pool, 'pool_type', 'avg') or 'no'
        head = f'global {"average" if pool == "avg" else pool} pooling'
    classes = f'a linear classifier to {arch.num_classes} classes' if arch.num_classes else 'no classifier'
    stride = f'output stride {output_stride}'
    if not arch.preact and output_stride == 16:
        stride += ' (the last stage keeps stride 1, as in the official code)'
    return f'{arch.net} on {backbone}; {blocks}; {head}; {classes}; {stride}.'


def _results_section(run: TrainRun, checkpoint: LoadedCheckpoint, dataset: Optional[str],
                     measured: Dict[str, Any], exported: Dict[str, Any]) -> List[str]:
    rows = run.summary
    if not rows:
        if checkpoint.metric is None:
            return []
        return ['## Results', '', f'The checkpoint records a top-1 accuracy of {checkpoint.metric:.2f}% '
                f'(no summary.csv beside it, so how it was measured is unknown).', '']
    split = run.args.get('val_split')
    where = (dataset or "the run's validation set") + (f', split `{split}`' if split else '')
    how = (f'{_size(measured["input_size"])} px, resize + {measured["crop_mode"]} crop with crop_pct '
           f'{_fmt(measured["crop_pct"])}, {measured["interpolation"]} interpolation')
    same = all(measured[k] == exported[k] for k in measured)
    lines = ['## Results', '',
             f'Validation by train.py during training ({len(rows)} epochs in its summary.csv) on '
             f'{where}, at {how}.',
             'That is the preprocessing in config.json: the usage code below reproduces these numbers.' if same else
             '**config.json\'s preprocessing was set differently at export, so these numbers were not measured '
             'with it.**', '',
             '| weights | epoch | top-1 (%) | top-5 (%) |', '|---|---|---|---|']

    def row(label: str, r: Dict[str, float]) -> str:
        top5 = f'{r["eval_top5"]:.2f}' if 'eval_top5' in r else 'n/a'
        return f'| {label} | {int(r["epoch"])} | {r.get("eval_top1", float("nan")):.2f} | {top5} |'
    this = next((r for r in rows if checkpoint.epoch is not None and int(r['epoch']) == checkpoint.epoch), None)
    best = max((r for r in rows if 'eval_top1' in r), key=lambda r: r['eval_top1'], default=None)
    if this is not None:
        lines.append(row('this checkpoint', this))
    if best is not None and best is not this:
        lines.append(row('best epoch of the run', best))
    last = rows[-1]
    if last is not this and last is not best and 'eval_top1' in last:
        lines.append(row('last epoch of the run', last))
    return lines + ['']


def _recipe_section(run: TrainRun) -> List[str]:
    if not run.args:
        return []
    lines = ['## Training recipe', '', f'From {run.args_origin} (paths and machine settings left out).', '',
             '| argument | value |', '|---|---|']
    shown = set()

    def published(key: str, value: Any) -> bool:
        return (key not in _PRIVATE_KEYS and not _is_private_value(value)
                and value is not None and value != '' and value != {} and value != [])
    for key in _RECIPE_KEYS:
        if published(key, run.args.get(key)):
            lines.append(f'| {key} | {_fmt(run.args[key])} |')
            shown.add(key)
    rest = {k: v for k, v in run.args.items() if k not in shown and published(k, v)}
    if rest:
        lines += ['', '<details><summary>All other arguments</summary>', '', '```yaml']
        lines += [f'{k}: {json.dumps(v) if not isinstance(v, str) else v}' for k, v in sorted(rest.items())]
        lines += ['```', '', '</details>']
    return lines + ['']


def _plot_training_curves(rows: List[Dict[str, float]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except Exception:
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, keys, ylabel in ((ax_loss, (('train_loss', 'train loss'), ('eval_loss', 'eval loss')), 'loss'),
                             (ax_acc, (('eval_top1', 'top-1'), ('eval_top5', 'top-5')), 'eval accuracy (%)')):
        for key, label in keys:
            if any(key in r for r in rows):
                ax.plot([r['epoch'] for r in rows if key in r], [r[key] for r in rows if key in r], label=label)
        ax.set_xlabel('epoch')
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, format='png')
    plt.close(fig)
    return True


def _usage(hub_name: str, num_classes: int, has_labels: bool) -> str:
    lines = [
        '',
        '`pip install timm timm-gsop`; `import timm_gsop` registers the GSoP-Net models with timm, and the model is '
        'rebuilt from `config.json` with no further arguments, preprocessing included.', '',
        '### Image classification', '```python',
        'import timm',
        'import timm_gsop  # registers the gsop models',
        'import torch',
        'from PIL import Image', '',
        f"model = timm.create_model('{hub_name}', pretrained=True).eval()",
        'data_config = timm.data.resolve_model_data_config(model)',
        'transform = timm.data.create_transform(**data_config, is_training=False)', '',
        "img = Image.open('image.jpg').convert('RGB')",
        'with torch.no_grad():',
        '    probs = model(transform(img).unsqueeze(0)).softmax(dim=-1)',
        f'top_probs, top_classes = probs.topk({min(5, max(num_classes, 1))})',
    ]
    if has_labels:
        lines.append("print([model.pretrained_cfg['label_names'][i] for i in top_classes[0]])")
    lines += [
        '```', '',
        '### Image embeddings', '```python',
        'with torch.no_grad():',
        '    features = model.forward_features(transform(img).unsqueeze(0))  # unpooled feature map',
        '    embedding = model.forward_head(features, pre_logits=True)  # pooled, before the classifier',
        '```', '',
        "A local copy of this folder loads the same way: `timm.create_model('local-dir:PATH', pretrained=True)`.",
    ]
    return '\n'.join(lines)


def model_card(
        *,
        model: nn.Module,
        model_name: str,
        model_args: Dict[str, Any],
        checkpoint: LoadedCheckpoint,
        run: TrainRun,
        data_config: Dict[str, Any],
        measured_config: Dict[str, Any],
        label_names: Optional[Sequence[str]],
        dataset: Optional[str],
        title: str,
        out_dir: Path,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
) -> str:
    """README.md text for an export; writes ``training_curves.png`` into ``out_dir`` when it can.

    ``data_config`` is the exported preprocessing, ``measured_config`` the one the run validated with.
    """
    arch = inspect_state_dict(model.state_dict())
    input_size = tuple(data_config['input_size'])
    macs, features = measure(model, input_size)
    output_stride = model.feature_info[-1]['reduction']
    n_params = sum(p.numel() for p in model.parameters())

    if checkpoint.official:
        weights = (f'converted from a checkpoint of the official GSoP code (arch `{checkpoint.arch}`'
                   + (f', epoch {checkpoint.epoch}' if checkpoint.epoch is not None else '')
                   + (f', best top-1 {checkpoint.metric:.2f}%' if checkpoint.metric is not None else '') + ')')
    elif checkpoint.source != 'top level':
        weights = (f'{"EMA weights" if "ema" in checkpoint.source else "weights"}'
                   f'{f" of epoch {checkpoint.epoch}" if checkpoint.epoch is not None else ""} '
                   f'of a checkpoint written by timm\'s `train.py`')
    else:
        weights = 'a bare state dict'
    test = ''
    if data_config.get('test_input_size'):
        test = (f'; recommended at test time: {_size(data_config["test_input_size"])}'
                f'{", crop_pct " + _fmt(data_config["test_crop_pct"]) if data_config.get("test_crop_pct") else ""} '
                f'(`resolve_model_data_config(model, use_test_size=True)`)')
    classes = str(arch.num_classes)
    if label_names:
        classes += f': {", ".join(label_names[:10])}{", ..." if len(label_names) > 10 else ""}'
    elif arch.num_classes:
        classes += ' (no class names given)'

    details = {
        'Model type': 'image classification / feature backbone',
        'Architecture': f'`{model_name}`: {architecture_text(arch, model, output_stride)}',
        'Model arguments (config.json `model_args`)': f'`{json.dumps(model_args, sort_keys=True)}`',
        'Params (M)': f'{n_params / 1e6:.2f}',
        f'GMACs ({_size(input_size)})': f'{macs / 1e9:.{2 if macs >= 1e8 else 4}f} (multiply-accumulates of '
                                         f'convolutions and matrix products at the input size of config.json, '
                                         f'counted with `torch.utils.flop_counter.FlopCounterMode`)',
        'Feature map': f'{features[0]} channels, output stride {output_stride}: {features[1]}x{features[2]} at '
                       f'{_size(input_size)}',
        'Image size': f'{_size(input_size)}{test}',
        'Preprocessing': f'resize + {data_config["crop_mode"]} crop (crop_pct {_fmt(data_config["crop_pct"])}, '
                         f'{data_config["interpolation"]}), mean ({_fmt(data_config["mean"])}), '
                         f'std ({_fmt(data_config["std"])})',
        'Classes': classes,
        'Training data': dataset or 'not recorded',
        'Weights': weights,
        'License': f'`{license}`' if license else 'none given by the publisher',
        'Paper': f'[{PAPER_TITLE}]({PAPER_URL}) (CVPR 2019)',
        'Original code': OFFICIAL_CODE_URL,
    }
    description = [
        f'A GSoP-Net image classification model (`{model_name}`) from "{PAPER_TITLE}" (Gao, Xie, Wang, Li; '
        f'CVPR 2019), as a [timm](https://github.com/huggingface/pytorch-image-models) model of the `timm_gsop` '
        f'package.', '']
    description += _results_section(run, checkpoint, dataset, measured_config, data_config)
    if run.summary:
        if _plot_training_curves(run.summary, out_dir / 'training_curves.png'):
            description += ['![Training curves](training_curves.png)', '']
        else:
            description += ['_No plot of the training curves: matplotlib is not installed where this card was '
                            'made._', '']
    description += _recipe_section(run)
    card = dict(
        tags=['image-classification', 'timm', 'gsop-net'],
        license=license or 'unknown',
        description='\n'.join(description).rstrip(),
        details=details,
        usage=_usage(f'hf-hub:{repo_id}' if repo_id else 'hf-hub:USER/REPO', arch.num_classes, bool(label_names)),
        citation=CITATION,
    )
    return generate_readme(card, title)
