"""The model card (README.md) of an export, rendered by timm's ``generate_readme``: facts from the model, its cost
counted on the meta device, results from train.py's ``summary.csv``, the recipe from its ``args.yaml``."""
import json
import re
from importlib import metadata
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import timm
from timm.models._hub import generate_readme
from timm.optim import get_optimizer_info

from ..layers import GSoPPositionGate
from ..models._checkpoint import inspect_state_dict, is_backbone_cfg
from .run import LoadedCheckpoint

__all__ = ['model_card', 'measure', 'recipe', 'install_line', 'warm_start', 'OFFICIAL_CODE_URL']

OFFICIAL_CODE_URL = 'https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks'
CITATION = """@inproceedings{gao2019global,
  title     = {Global Second-order Pooling Convolutional Networks},
  author    = {Gao, Zilin and Xie, Jiangtao and Wang, Qilong and Li, Peihua},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2019}
}"""
# train.py arguments about the machine, not the recipe: workers, devices, processes, logging; and paths.
_MACHINE_ARG = re.compile(r'(workers|pin_mem|device.*|(local_)?rank|world_size|dist_.*|.*_interval|checkpoint_hist'
                          r'|.*wandb.*|no_prefetcher|torchcompile.*|synchronize_step|experiment)')
_PATH = re.compile(r'[/~.\\]|.:\\')


def _applies(key: str, args: Dict[str, Any]) -> bool:
    """False for an argument that the run's other choices made irrelevant (momentum beside adamw, ...)."""
    if key in ('momentum', 'opt_betas', 'opt_eps'):  # timm's optimizer registry says which ones it takes
        try:
            info = get_optimizer_info(str(args.get('opt') or 'sgd').lower().split('_')[-1])
        except (ValueError, KeyError):
            return True
        return getattr(info, 'has_' + key.removeprefix('opt_'))  # has_momentum, has_betas, has_eps
    sched, reprob, mixup = args.get('sched'), bool(args.get('reprob')), bool(args.get('mixup') or args.get('cutmix'))
    for prefix, applies in (
            ('decay_epochs', sched == 'step'), ('decay_milestones', sched == 'multistep'), ('lr_k', sched == 'poly'),
            ('decay_rate', sched in ('step', 'multistep', 'plateau')), ('patience_epochs', sched == 'plateau'),
            ('lr_cycle_', sched in ('cosine', 'tanh', 'poly')), ('lr_noise_', bool(args.get('lr_noise'))),
            (('warmup_lr', 'warmup_prefix'), bool(args.get('warmup_epochs'))), ('lr_base', not args.get('lr')),
            ('model_ema_', bool(args.get('model_ema'))), ('mixup_', mixup or bool(args.get('cutmix_minmax'))),
            ('amp_', bool(args.get('amp'))), ('bce_', bool(args.get('bce_loss'))), (('remode', 'recount'), reprob),
            ('resplit', reprob), ('kd_', bool(args.get('kd_model_name'))), ('naflex_', bool(args.get('naflex_loader'))),
            ('clip_mode', args.get('clip_grad') is not None), ('layer_decay_', args.get('layer_decay') is not None),
            (('train_size_', 'train_batch_sizes'), bool(args.get('train_img_sizes')))):
        if key.startswith(prefix):
            return applies
    return True


def recipe(args: Dict[str, Any]) -> Dict[str, Any]:
    """The run's arguments that applied (train.py's defaults included), without paths and machine settings."""
    return {k: v for k, v in sorted(args.items()) if isinstance(k, str) and v is not None and v is not False
            and v not in ('', [], {}) and not _PATH.match(str(v)) and not _MACHINE_ARG.fullmatch(k)
            and _applies(k, args)}


def measure(model_name: str, model_kwargs: Dict[str, Any], input_size: Sequence[int]) -> Tuple[int, Tuple[int, ...]]:
    """(multiply-accumulates, feature map (C, H, W)) of an eval forward of one image, on the meta device (no memory)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = timm.create_model(model_name, device='meta', **model_kwargs).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        features = model.forward_features(torch.zeros(1, *input_size, device='meta'))
        model.forward_head(features)
    return counter.get_total_flops() // 2, tuple(features.shape[1:])  # it counts 2 FLOPs a multiply-add


def install_line(install: Optional[str] = None) -> str:
    """``install`` when given; else the pip command that repeats how this package was installed, where others can
    (from an index, or a VCS or archive URL: PEP 610's direct_url.json says which); else its source URL from its
    metadata, else: from its source."""
    if install:
        return f'`{install}`'
    try:
        dist = metadata.distribution('timm-gsop')
    except metadata.PackageNotFoundError:
        return 'Install `timm` and the `timm-gsop` package from its source'
    direct_url = dist.read_text('direct_url.json')
    if direct_url is None and (dist.read_text('INSTALLER') or '').strip() in ('pip', 'uv'):
        return '`pip install timm-gsop`'  # pip and uv record every install that is not from an index
    origin = json.loads(direct_url or '{}')
    url, vcs = origin.get('url', ''), origin.get('vcs_info', {})
    if url.startswith('https://') and vcs.get('commit_id'):
        return f'`pip install {vcs["vcs"]}+{url}@{vcs["commit_id"]}`'
    if url.startswith('https://') and 'archive_info' in origin:
        return f'`pip install {url}`'
    urls = [u.split(',', 1)[-1].strip() for u in dist.metadata.get_all('Project-URL') or []]
    url = next((u for u in urls + [dist.metadata.get('Home-page')] if u and u.startswith('https://')), None)
    return f'Install `timm` and the `timm-gsop` package from {url if url else "its source"}'


def warm_start(args: Dict[str, Any], pretrained_cfg: Dict[str, Any]) -> Optional[str]:
    """For a run that train.py warm-started (``--pretrained`` with a backbone tag): the source weights, their
    licence and what they gave; None for any other run."""
    if not (args.get('pretrained') and is_backbone_cfg(pretrained_cfg)):
        return None
    arch, hub_id, licence = pretrained_cfg.get('architecture') or '', pretrained_cfg.get('hf_hub_id'), \
        pretrained_cfg.get('license')
    net2 = arch.startswith('gsop2')  # its classifier follows the iSQRT-COV head: never the ResNet's
    same_classes = args.get('num_classes') in (None, pretrained_cfg.get('num_classes'))
    if args.get('pretrained_path') or not hub_id:  # a file in place of the tag's source: the run knows no more
        source = 'a local file given to train.py (`--pretrained-path`: its origin and licence are not recorded)'
    else:
        source = f'[{hub_id}](https://huggingface.co/{hub_id}) (licence `{licence or "not recorded"}`)'
    loaded = 'stem, stages and classifier' if same_classes and not net2 else 'stem and stages'
    new = ['the GSoP blocks'] + (['the iSQRT-COV head'] if net2 else []) + \
        ([] if same_classes and not net2 else ['the classifier'])
    return (f'the weights of {source}, through the backbone tag `{arch}.{pretrained_cfg.get("tag")}`: its '
            f'{loaded} started from them; {", ".join(new[:-1]) + " and " if len(new) > 1 else ""}{new[-1]} from the '
            f"model's initialisation")


def _fmt(value: Any) -> str:
    return ', '.join(map(_fmt, value)) if isinstance(value, (list, tuple)) else \
        f'{value:g}' if isinstance(value, float) else str(value)


def _size(input_size: Sequence[int]) -> str:
    return f'{input_size[-2]}x{input_size[-1]}'


def architecture_text(model: nn.Module) -> str:
    """One paragraph: backbone, where the GSoP blocks sit and their covariances, head, classifier, stride."""
    arch = inspect_state_dict(model.state_dict())  # blocks per stage, stages with a GSoP block, pre-activation
    stages = [str(i + 1) for i, on in enumerate(arch.attn_stages) if on]
    mode, dim, pool = model.attn_mode, model.attn_dim, model.global_pool.pool_type
    text = f'GSoP-Net{2 if pool == "isqrt" else 1} on {"a pre-activation" if arch.preact else "a"} ' \
           f'ResNet-{3 * sum(arch.layers) + 2} ({_fmt(arch.layers)} bottlenecks per stage); '
    if mode == 'none' or not stages:
        text += 'no GSoP blocks; '
    else:
        covs = [f'{dim}x{dim} channel covariance'] if mode != 'position' else []
        grid = next((m.pool_size for m in model.modules() if isinstance(m, GSoPPositionGate)), None)
        if grid:
            covs.append(f'{grid ** 2}x{grid ** 2} position covariance of a {grid}x{grid} pooled map')
        where = 'at the end of the residual branch of the last block' if arch.preact else \
            'after bn3 of the last bottleneck'
        text += f'a GSoP block (attn_mode `{mode}`, attn_dim {dim}: {" and ".join(covs)}) {where} of ' \
                f'stage{"s" if len(stages) > 1 else ""} {", ".join(stages)}; '
    if pool == 'isqrt':
        cov = model.cov_dim
        text += f'iSQRT-COV pooling (1x1 conv {model.num_features}->{cov}, {cov}x{cov} covariance, ' \
                f'{model.sqrt_iters} Newton-Schulz iterations, upper triangle of {cov * (cov + 1) // 2:,} values); '
    else:
        text += f'global {"average" if pool == "avg" else pool or "no"} pooling; '
    text += f'a linear classifier to {model.num_classes} classes; ' if model.num_classes else 'no classifier; '
    return text + f'output stride {model.feature_info[-1]["reduction"]}.'


def _results(checkpoint: LoadedCheckpoint, where: str, measured: Dict[str, Any], exported: Dict[str, Any]) -> List[str]:
    rows = [r for r in checkpoint.summary if 'eval_top1' in r]
    if not rows:
        return [] if checkpoint.metric is None else [
            '## Results', '', f'The checkpoint records a top-1 accuracy of {checkpoint.metric:.2f}% (no summary.csv '
            'beside it, so how it was measured is unknown).', '']
    split = f', split `{checkpoint.args["val_split"]}`' if checkpoint.args.get('val_split') else ''
    lines = ['## Results', '', f'Validation by train.py during training ({len(rows)} epochs in its summary.csv) on '
             f'{where}{split}, at {_size(measured["input_size"])} px, resize + {measured["crop_mode"]} crop with '
             f'crop_pct {_fmt(measured["crop_pct"])}, {measured["interpolation"]} interpolation.',
             'That is the preprocessing in config.json: the usage code below reproduces these numbers.'
             if measured == {k: exported[k] for k in measured} else "**config.json's preprocessing was set "
             'differently at export, so these numbers were not measured with it.**', '',
             '| weights | epoch | top-1 (%) | top-5 (%) |', '|---|---|---|---|']
    picks = [('this checkpoint', next((r for r in rows if int(r['epoch']) == checkpoint.epoch), None)),
             ('best epoch of the run', max(rows, key=lambda r: r['eval_top1'])), ('last epoch of the run', rows[-1])]
    for i, (label, r) in enumerate(picks):
        if r is not None and not any(r is other for _, other in picks[:i]):  # each row once
            top5 = f'{r["eval_top5"]:.2f}' if 'eval_top5' in r else 'n/a'
            lines.append(f'| {label} | {int(r["epoch"])} | {r["eval_top1"]:.2f} | {top5} |')
    return lines + ['']


def _usage(hub_name: str, num_classes: int, has_labels: bool, install: str) -> str:
    return '\n'.join([
        '', f'{install}; `import timm_gsop` registers the GSoP-Net models with timm, and the model is rebuilt from '
        '`config.json` with no further arguments, preprocessing included.', '', '```python', 'import timm',
        'import timm_gsop  # registers the gsop models', 'import torch', 'from PIL import Image', '',
        f"model = timm.create_model('{hub_name}', pretrained=True).eval()",
        'data_config = timm.data.resolve_model_data_config(model)',
        'transform = timm.data.create_transform(**data_config, is_training=False)', '',
        "img = Image.open('image.jpg').convert('RGB')", 'with torch.no_grad():',
        '    probs = model(transform(img).unsqueeze(0)).softmax(dim=-1)',
        f'top_probs, top_classes = probs.topk({min(5, max(num_classes, 1))})',
        *(["print([model.pretrained_cfg['label_names'][i] for i in top_classes[0]])"] if has_labels else []),
        '```', '', "A local copy of this folder loads with `timm.create_model('local-dir:PATH', pretrained=True)`."])


def model_card(
        *, model: nn.Module, model_name: str, model_args: Dict[str, Any], checkpoint: LoadedCheckpoint,
        data_config: Dict[str, Any], measured_config: Dict[str, Any],
        label_names: Optional[Sequence[str]], dataset: Optional[str], title: str, repo_id: Optional[str] = None,
        license: Optional[str] = None, install: Optional[str] = None, started_from: Optional[str] = None) -> str:
    """README.md text. ``data_config`` is the exported preprocessing, ``measured_config`` the run's;
    ``started_from``: what a warm-started run started from (``warm_start``)."""
    size = tuple(data_config['input_size'])
    macs, features = measure(model_name, model_args, size)
    weights = 'EMA weights' if 'ema' in checkpoint.source else 'weights'
    weights += f' of epoch {checkpoint.epoch}' if checkpoint.epoch is not None else ''
    weights += ' converted from a checkpoint of the official GSoP code' if checkpoint.official else \
        ' of a timm `train.py` checkpoint' if checkpoint.source != 'top level' else ' of a state dict'
    test = ''
    if data_config.get('test_input_size'):
        crop = f', crop_pct {_fmt(data_config["test_crop_pct"])}' if data_config.get('test_crop_pct') else ''
        test = f'; recommended at test time: {_size(data_config["test_input_size"])}{crop} (`use_test_size=True`)'
    classes = f'{model.num_classes}' + (f': {", ".join(label_names[:10])}{", ..." if len(label_names) > 10 else ""}'
                                        if label_names else ' (no class names given)' if model.num_classes else '')
    details = {
        'Model type': 'image classification / feature backbone',
        'Architecture': f'`{model_name}`: {architecture_text(model)}',
        'Model arguments (config.json `model_args`)': f'`{json.dumps(model_args, sort_keys=True)}`',
        'Params (M)': f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
        f'GMACs ({_size(size)})': f'{macs / 1e9:.{2 if macs >= 1e8 else 4}f} (counted with `FlopCounterMode`)',
        'Feature map': f'{features[0]} channels: {features[1]}x{features[2]} at {_size(size)}',
        'Image size': f'{_size(size)}{test}',
        'Preprocessing': f'resize + {data_config["crop_mode"]} crop (crop_pct {_fmt(data_config["crop_pct"])}, '
                         f'{data_config["interpolation"]}), mean ({_fmt(data_config["mean"])}), '
                         f'std ({_fmt(data_config["std"])})',
        'Classes': classes,
        'Training data': dataset or 'not recorded',
        'Weights': weights,
        **({'Started from': started_from} if started_from else {}),
        'License': f'`{license}`' if license else 'none given by the publisher',
        'Paper': '[Global Second-order Pooling Convolutional Networks](https://arxiv.org/abs/1811.12006) (CVPR 2019)',
        'Original code': OFFICIAL_CODE_URL,
    }
    description = [f'A GSoP-Net image classification model (`{model_name}`) from "Global Second-order Pooling '
                   'Convolutional Networks" (Gao, Xie, Wang, Li; CVPR 2019), as a [timm](https://github.com/'
                   'huggingface/pytorch-image-models) model of the `timm_gsop` package.', '']
    description += _results(checkpoint, dataset or "the run's validation set", measured_config, data_config)
    applied = recipe(checkpoint.args)
    if applied:
        description += ['## Training recipe', '', f'The arguments of train.py that applied, its defaults included, from '
                        f'{checkpoint.args_origin} (paths and machine settings left out):', '', '```yaml',
                        *(f'{k}: {v if isinstance(v, str) else json.dumps(v)}' for k, v in applied.items()), '```']
    return generate_readme(dict(
        tags=['image-classification', 'timm', 'gsop-net'], license=license or 'unknown', details=details,
        description='\n'.join(description).rstrip(), citation=CITATION,
        usage=_usage(f'hf-hub:{repo_id or "USER/REPO"}', model.num_classes, bool(label_names), install_line(install)),
    ), title)
