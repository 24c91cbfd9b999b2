"""Export a checkpoint as a folder that timm and the Hugging Face Hub load, and push it.

``export_checkpoint`` reads the checkpoint and its run (``run.py``), rebuilds the model it was
trained as, and writes with timm's own ``save_for_hf``:

* ``model.safetensors``: the weights (the EMA weights of a train.py checkpoint when present);
* ``config.json``: architecture, model arguments, and a ``pretrained_cfg`` whose preprocessing
  (input size, crop, interpolation, mean, std) is what the run validated with, plus the class names;
  options override any of it;
* ``README.md``: the model card (``card.py``), and ``training_curves.png`` with matplotlib.

It is written in a staged folder (``folder.py``), checked (no pickle file; the folder alone rebuilds
a model with the same logits and the same preprocessing), then put in place atomically.
``push_checkpoint`` exports to a temporary folder and uploads it with ``huggingface_hub``.
"""
import ast
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import timm
from huggingface_hub import HfApi
from timm.data import resolve_data_config, resolve_model_data_config

from ..models._checkpoint import CheckpointError, check_state_dict_fits, inspect_state_dict
from .card import OFFICIAL_CODE_URL, model_card
from .folder import ALLOWED_FILES, StagedFolder
from .messages import ExportError, Reporter
from .run import LoadedCheckpoint, TrainRun, check_label_names, read_checkpoint, read_run, run_dataset, run_label_names

__all__ = [
    'export_checkpoint', 'push_checkpoint', 'build_model_from_checkpoint', 'export_data_config',
    'parse_model_kwargs', 'PREPROCESSING_KEYS',
]

PathLike = Union[str, os.PathLike]

_PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.pickle', '.tar', '.ckpt', '.npz')
_DATA_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
#: What ``preprocessing=`` may set (the export options of the same names).
PREPROCESSING_KEYS = ('img_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std',
                      'test_img_size', 'test_crop_pct')
_CROP_MODES = ('center', 'squash', 'border')
_INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')


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


def build_model_from_checkpoint(
        checkpoint: LoadedCheckpoint,
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        run: Optional[TrainRun] = None,
        reporter: Optional[Reporter] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """``timm.create_model(model_name, **kwargs)`` with the checkpoint's weights loaded strictly.

    kwargs: what the weights decide (``inspect_state_dict``: num_classes, attn_dim, attn_mode where
    the keys tell it), then the run's ``--model-kwargs``, then ``model_kwargs`` (later ones win).
    Returns the model (eval mode) and the kwargs it was created with.
    """
    reporter = reporter or Reporter(verbose=False)
    names = sorted(timm.list_models('gsop*'))
    if model_name not in names:
        raise ExportError(f'unknown model {model_name!r}; this exports GSoP-Net models: {", ".join(names)}')
    if checkpoint.arch and not checkpoint.official and checkpoint.arch != model_name:
        reporter.warn(f'the checkpoint was trained as {checkpoint.arch!r}, exporting as {model_name!r}')

    arch = inspect_state_dict(checkpoint.state_dict)
    given = dict((run or TrainRun()).model_kwargs(), **(model_kwargs or {}))
    kwargs = {k: v for k, v in arch.kwargs().items() if k != 'layers'}  # blocks per stage come from the name
    if arch.in_chans not in (None, 3):
        kwargs['in_chans'] = arch.in_chans
    kwargs.update(given)
    if arch.attn_modes == ('none',) and 'attn_mode' not in given:
        raise ExportError(
            f'the checkpoint has no GSoP block{f" (trained as {checkpoint.arch!r})" if checkpoint.arch else ""}. '
            f'As {model_name} it would be the GSoP-Net backbone without GSoP blocks, whose last stage keeps '
            f'stride 1: not the same network as a plain ResNet. If it was trained as {model_name} with '
            f'attn_mode=none, pass --model-kwargs attn_mode=none.')
    if 'attn_mode' not in kwargs:
        raise ExportError(
            'the checkpoint has both channel and position gates but no fusion convolutions: it is attn_mode '
            'fusion_avg or fusion_max, which its keys cannot tell apart. Pass --model-kwargs attn_mode=fusion_avg '
            '(or attn_mode=fusion_max), as it was trained.')
    reporter.progress(f'creating {model_name}({", ".join(f"{k}={v!r}" for k, v in kwargs.items())})')
    try:
        model = timm.create_model(model_name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ExportError(f'cannot create {model_name} with {kwargs}: {e}') from e
    try:
        check_state_dict_fits(checkpoint.state_dict, model, model_name=model_name, cli=True)
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except CheckpointError as e:
        raise ExportError(f'{checkpoint.path}: {e}') from e
    return model.eval(), kwargs


def _spatial(value: Any, name: str, min_size: int) -> Tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(s, int) and s >= min_size for s in size):
        raise ExportError(f'{name} must be one or two integers of at least {min_size} (px), got {value!r}')
    return size


def export_data_config(
        model: nn.Module,
        run_args: Dict[str, Any],
        preprocessing: Optional[Dict[str, Any]] = None,
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(exported preprocessing, the preprocessing the run validated with).

    train.py validates with ``resolve_data_config(vars(args), model=model)``: the same call on the
    run's arguments gives its input size, crop, interpolation, mean and std (the model's defaults
    without a run). ``preprocessing`` (keys ``PREPROCESSING_KEYS``) overrides them and adds
    ``test_input_size`` / ``test_crop_pct``.
    """
    measured = {k: v for k, v in resolve_data_config(dict(run_args), model=model).items() if k in _DATA_KEYS}
    measured['input_size'] = tuple(measured['input_size'])
    config = dict(measured)
    options = {k: v for k, v in (preprocessing or {}).items() if v is not None}
    unknown = sorted(set(options) - set(PREPROCESSING_KEYS))
    if unknown:
        raise ExportError(f'unknown preprocessing settings {unknown}; known: {", ".join(PREPROCESSING_KEYS)}')
    chans = config['input_size'][0]
    min_size = (model.pretrained_cfg.get('min_input_size') or (3, 1, 1))[-1]
    for key in ('img_size', 'test_img_size'):
        if key in options:
            config[key.replace('img_size', 'input_size')] = (chans, *_spatial(options[key], key, min_size))
    for key in ('crop_pct', 'test_crop_pct'):
        if key in options:
            if not isinstance(options[key], (int, float)) or not 0 < options[key] <= 1:
                raise ExportError(f'{key} must be a number in (0, 1], got {options[key]!r}')
            config[key] = float(options[key])
    for key, valid in (('crop_mode', _CROP_MODES), ('interpolation', _INTERPOLATIONS)):
        if key in options:
            if options[key] not in valid:
                raise ExportError(f'{key} must be one of {", ".join(valid)}; got {options[key]!r}')
            config[key] = options[key]
    for key in ('mean', 'std'):
        if key in options:
            values = tuple(float(v) for v in options[key])
            if len(values) not in (1, chans) or (key == 'std' and min(values) <= 0):
                raise ExportError(f'{key} needs 1 or {chans} values{" > 0" if key == "std" else ""}, got {values}')
            config[key] = values * chans if len(values) == 1 else values
    return config, measured


def _check_folder(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    bad = [n for n in names if n not in ALLOWED_FILES or n.endswith(_PICKLE_SUFFIXES)]
    if bad or 'model.safetensors' not in names or 'config.json' not in names:
        raise ExportError(f'internal error: the export folder holds {names}; unexpected: {bad}')


def _verify_reload(model: nn.Module, folder: Path, data_config: Dict[str, Any],
                   label_names: Optional[Sequence[str]]) -> None:
    """The folder alone must rebuild the model (same logits), its preprocessing and its class names."""
    try:
        reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    except Exception as e:
        raise ExportError(
            f'the exported folder does not load with timm.create_model("local-dir:...", pretrained=True): '
            f'{type(e).__name__}: {e}') from e
    size = model.pretrained_cfg.get('min_input_size', (3, 64, 64))[-1]  # the cheapest input the model takes
    x = torch.randn(2, data_config['input_size'][0], size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), reloaded(x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        raise ExportError('internal error: the exported folder rebuilds a model whose logits differ from the source')
    def as_tuples(cfg: Dict[str, Any]) -> Dict[str, Any]:  # config.json gives lists
        return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in _DATA_KEYS}
    resolved = resolve_model_data_config(reloaded)
    test = resolve_model_data_config(reloaded, use_test_size=True)
    want_test = dict(data_config, input_size=data_config.get('test_input_size', data_config['input_size']),
                     crop_pct=data_config.get('test_crop_pct', data_config['crop_pct']))
    if as_tuples(resolved) != as_tuples(data_config) or as_tuples(test) != as_tuples(want_test):
        raise ExportError(f'internal error: the exported folder resolves to preprocessing {resolved}, '
                          f'not {data_config}')
    if label_names and list(reloaded.pretrained_cfg.get('label_names') or []) != list(label_names):
        raise ExportError('internal error: the exported folder does not carry the class names')


def export_checkpoint(
        checkpoint: PathLike,
        out_dir: PathLike,
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        *,
        force: bool = False,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
        preprocessing: Optional[Dict[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        dataset: Optional[str] = None,
        verbose: bool = True,
        verify: bool = True,
) -> Path:
    """Export ``checkpoint`` to the folder ``out_dir`` (see the module docstring). Returns ``out_dir``.

    ``force`` replaces a previous export at ``out_dir``, nothing else. ``preprocessing`` overrides
    the run's (keys ``PREPROCESSING_KEYS``); ``label_names`` and ``dataset`` (a name for the card)
    replace what the run says; ``license`` is the card's licence (none by default). Raises
    ExportError with a message that says what is wrong.
    """
    reporter = Reporter(verbose)
    checkpoint_path, out_dir = Path(checkpoint), Path(out_dir)
    staged = StagedFolder(out_dir, force=force, keep=[checkpoint_path], report=reporter.warn)

    reporter.progress(f'reading {checkpoint_path}')
    ckpt = read_checkpoint(checkpoint_path)
    run = read_run(ckpt)
    kind = 'official GSoP checkpoint (names converted)' if ckpt.official else f'weights from "{ckpt.source}"'
    reporter.progress(f'{len(ckpt.state_dict)} tensors, {kind}' + (f'; run arguments from {run.args_origin}'
                                                                   if run.args else ''))
    model, kwargs = build_model_from_checkpoint(ckpt, model_name, model_kwargs, run, reporter)
    data_config, measured = export_data_config(model, run.args, preprocessing)
    if label_names is not None:
        label_names = check_label_names(label_names, model.num_classes)
    elif model.num_classes:
        label_names, origin = run_label_names(run.args, model.num_classes)
        # Worth a warning when the run names its data but it cannot be read; expected without a run.
        named = run.args.get('data_dir') or run.args.get('data') or run.args.get('dataset')
        (reporter.progress if label_names or not named else reporter.warn)(
            f'class names {"from " if label_names else "not written: "}{origin}'
            + ('' if label_names else '; pass --label-names FILE to give them'))
    if not dataset:
        dataset = run_dataset(run.args)
        reporter.progress(f'training data on the card: {dataset or "not recorded"} (--dataset-name to name it)')

    # This model is ours to describe: the weights' licence is the publisher's (none unless given),
    # and their origin is the run, not the official code.
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ('license', 'origin_url')}
    if license:
        model.pretrained_cfg['license'] = license
    if ckpt.official:
        model.pretrained_cfg['origin_url'] = OFFICIAL_CODE_URL
    # attn_mode / attn_dim are written even where they are the defaults, so that the folder does not depend on them.
    export_args = {k: kwargs[k] for k in ('attn_mode', 'attn_dim') if k in kwargs}
    with staged as tmp:
        reporter.progress(f'writing model.safetensors and config.json to {tmp}')
        try:
            timm.models.save_for_hf(
                model, tmp, model_args=export_args, safe_serialization=True, data_config=data_config,
                model_config=dict(label_names=list(label_names)) if label_names else None)
        except OSError:
            raise
        except Exception as e:  # safetensors reports write failures (a full disk) as its own error
            raise ExportError(f'cannot write {tmp}: {type(e).__name__}: {e}') from e
        reporter.progress(f'counting multiply-accumulates at {data_config["input_size"][1]}x'
                          f'{data_config["input_size"][2]} and writing the model card')
        card = model_card(
            model=model, model_name=model_name, model_args=json.loads((tmp / 'config.json').read_text())['model_args'],
            checkpoint=ckpt, run=run, data_config=data_config, measured_config=measured, label_names=label_names,
            dataset=dataset, title=repo_id.split('/')[-1] if repo_id else out_dir.name, out_dir=tmp,
            repo_id=repo_id, license=license)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        _check_folder(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the files are for publishing
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if verify:
            reporter.progress('checking that the folder alone rebuilds the model (same logits, preprocessing)')
            _verify_reload(model, tmp, data_config, label_names)
        staged.commit()
    reporter.progress(f'done: {out_dir}')
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
        verbose: bool = True,
        **export_options,
):
    """Export ``checkpoint`` (``export_options`` as for ``export_checkpoint``) and upload the folder to
    the Hub model repo ``repo_id``, as timm's ``push_to_hf_hub`` does but with the checked folder.

    The token comes from the usual Hugging Face login (``hf auth login``) or the ``HF_TOKEN``
    environment variable; it is never printed. Returns huggingface_hub's ``CommitInfo``.
    """
    from huggingface_hub import get_token
    reporter = Reporter(verbose)
    if '/' not in repo_id or repo_id.count('/') > 1 or not all(repo_id.split('/')):
        raise ExportError(f'repo id {repo_id!r} is not of the form USER/NAME or ORG/NAME')
    if not get_token():
        raise ExportError('not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN')
    with tempfile.TemporaryDirectory(prefix='timm-gsop-push-') as tmp:
        folder = export_checkpoint(
            checkpoint, Path(tmp) / repo_id.split('/')[-1], model_name, model_kwargs,
            repo_id=repo_id, verbose=verbose, **export_options)
        config = json.loads((folder / 'config.json').read_text())
        args = config.get('model_args', {})
        message = commit_message or (
            f'Add {model_name} weights (attn_mode={args.get("attn_mode")}, attn_dim={args.get("attn_dim")}, '
            f'num_classes={config.get("num_classes")})')
        api = HfApi()
        reporter.progress(f'creating (or reusing) the model repo {repo_id}' + (' (private)' if private else ''))
        repo_url = api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
        repo_id = getattr(repo_url, 'repo_id', None) or repo_id
        if revision and revision != 'main':
            api.create_branch(repo_id, branch=revision, repo_type='model', exist_ok=True)
        reporter.progress(f'uploading {", ".join(sorted(p.name for p in folder.iterdir()))} to {repo_id}'
                          + (f'@{revision}' if revision else '') + (' as a pull request' if create_pr else ''))
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type='model', revision=revision,
            create_pr=create_pr, commit_message=message)
    reporter.progress('uploaded')
    return info
