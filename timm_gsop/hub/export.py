"""Export a checkpoint as a folder that timm and the Hugging Face Hub load (timm's ``save_for_hf``: the run's
preprocessing and class names in config.json), checked to rebuild the same model alone; and push it."""
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import timm
from huggingface_hub import HfApi
from timm.data import resolve_data_config

from ..models._checkpoint import CheckpointError, check_state_dict_fits, inspect_state_dict
from .card import OFFICIAL_CODE_URL, model_card, warm_start
from .folder import ALLOWED_FILES, MANIFEST, check_out_dir, staged_folder
from .run import ExportError, LoadedCheckpoint, finite_number, read_checkpoint, report, run_label_names

__all__ = ['export_checkpoint', 'push_checkpoint', 'build_model_from_checkpoint', 'export_data_config',
           'PREPROCESSING_KEYS', 'HUB_LICENSES']

_DATA_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
PREPROCESSING_KEYS = ('img_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std',
                      'test_img_size', 'test_crop_pct')
_CHOICES = dict(crop_mode=('center', 'squash', 'border'),
                interpolation=('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos'))
MAX_IMG_SIZE = 4096
#: Licence ids of huggingface.co/docs/hub/repositories-licenses ('other' needs a name and link: not offered).
HUB_LICENSES = tuple(
    'apache-2.0 mit bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear isc zlib unlicense cc0-1.0 cc-by-2.0 cc-by-2.5 '
    'cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 '
    'cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 openrail openrail++ '
    'creativeml-openrail-m bigscience-openrail-m afl-3.0 artistic-2.0 bsl-1.0 ecl-2.0 epl-1.0 epl-2.0 eupl-1.1 '
    'eupl-1.2 gpl-2.0 gpl-3.0 lgpl-2.1 lgpl-3.0 agpl-3.0 mpl-2.0 osl-3.0 postgresql ncsa wtfpl odc-by odbl pddl '
    'cdla-permissive-2.0 unknown'.split())
# create_model's own keywords: not model arguments (the weights come from the checkpoint).
_NOT_MODEL_ARGS = set(inspect.signature(timm.create_model).parameters) - {'model_name', 'kwargs'} | {'features_only'}


def build_model_from_checkpoint(
        checkpoint: LoadedCheckpoint, model_name: str, model_kwargs: Optional[Dict[str, Any]] = None,
        verbose: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """(``timm.create_model(model_name, **kwargs)`` in eval mode with the checkpoint's weights, kwargs): what
    the weights decide (num_classes, attn_dim, attn_mode where they tell), the run's, then ``model_kwargs``."""
    names = sorted(timm.list_models('gsop*'))
    if model_name not in names + timm.list_pretrained('gsop*'):  # a backbone tag: its preprocessing is the run's
        raise ExportError(f'unknown model {model_name!r}; this exports GSoP-Net models: {", ".join(names)}')
    if checkpoint.arch and not checkpoint.official and checkpoint.arch != model_name:
        report(f'warning: the checkpoint was trained as {checkpoint.arch!r}, exporting as {model_name!r}')
    run_kwargs = checkpoint.args.get('model_kwargs')
    given = dict(run_kwargs if isinstance(run_kwargs, dict) else {}, **(model_kwargs or {}))
    wrong = sorted(_NOT_MODEL_ARGS & set(given))
    if wrong:
        raise ExportError(f'{", ".join(wrong)} cannot be given as model kwargs: the export takes the weights from '
                          f'the checkpoint and builds the model with its own arguments')
    arch = inspect_state_dict(checkpoint.state_dict)  # blocks per stage come from the name (or model_kwargs)
    decided = dict(num_classes=arch.num_classes, attn_mode=arch.attn_mode, attn_dim=arch.attn_dim,
                   in_chans=None if arch.in_chans == 3 else arch.in_chans)
    kwargs = {k: v for k, v in decided.items() if v is not None} | given
    if arch.attn_modes == ('none',) and 'attn_mode' not in given:
        raise ExportError(
            f'the checkpoint has no GSoP block{f" (trained as {checkpoint.arch!r})" if checkpoint.arch else ""}. '
            f'As {model_name} it would be the GSoP-Net backbone without GSoP blocks, whose last stage keeps '
            f'stride 1: not the same network as a plain ResNet. If it was trained as {model_name} with '
            f'attn_mode=none, pass --model-kwargs attn_mode=none.')
    if 'attn_mode' not in kwargs:
        raise ExportError('the checkpoint has both channel and position gates but no fusion convolutions: it is '
                          'attn_mode fusion_avg or fusion_max, which its keys cannot tell apart. Pass --model-kwargs '
                          'attn_mode=fusion_avg (or attn_mode=fusion_max), as it was trained.')
    report(f'creating {model_name}({", ".join(f"{k}={v!r}" for k, v in kwargs.items())})', verbose)
    try:  # on the meta device first: arguments that do not fit the weights cost no memory
        model = timm.create_model(model_name, device='meta', **kwargs)
        check_state_dict_fits(checkpoint.state_dict, model, model_name=model_name, cli=True)
        model = timm.create_model(model_name, **kwargs)
        model.load_state_dict(checkpoint.state_dict, strict=True)  # refuses values non-finite in the model's dtype
    except CheckpointError as e:
        raise ExportError(f'{checkpoint.path}: {e}') from e
    except Exception as e:  # the constructors refuse bad arguments, naming them
        raise ExportError(f'cannot create {model_name} with {kwargs}: {type(e).__name__}: {e}') from e
    return model.eval(), kwargs


def export_data_config(model: nn.Module, run_args: Dict[str, Any], preprocessing: Optional[Dict[str, Any]] = None,
                       origin: str = 'the run') -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(exported preprocessing, the one the run validated with): the model's defaults updated with the run's
    values as train.py's ``resolve_data_config(args, model=model)`` does, then with ``preprocessing``; all checked."""
    config = {k: v for k, v in resolve_data_config({}, model=model).items() if k in _DATA_KEYS}
    config['input_size'] = tuple(config['input_size'])
    chans, min_size = config['input_size'][0], (model.pretrained_cfg.get('min_input_size') or (3, 1, 1))[-1]
    run = {k: run_args.get(k) for k in _DATA_KEYS}
    if run['input_size'] is None:  # train.py's --input-size wins over --img-size
        run['img_size'] = run_args.get('img_size')
    configs = []
    for where, values in ((f'{origin}: ', run), ('', preprocessing or {})):
        for key, value in ((k, v) for k, v in values.items() if v is not None and v != ''):
            if key in ('img_size', 'test_img_size', 'input_size'):
                size = value[1:] if key == 'input_size' and isinstance(value, (list, tuple)) and len(value) == 3 \
                    and value[0] == chans else value
                size = [size] * 2 if isinstance(size, int) else size
                if not (isinstance(size, (list, tuple)) and len(size) == 2
                        and all(type(s) is int and min_size <= s <= MAX_IMG_SIZE for s in size)):
                    raise ExportError(f'{where}{key} must be one or two integers from {min_size} to {MAX_IMG_SIZE} '
                                      f'(px){f" after {chans} channels" if key == "input_size" else ""}, got {value!r}')
                config['test_input_size' if key == 'test_img_size' else 'input_size'] = (chans, *size)
            elif key in ('crop_pct', 'test_crop_pct'):
                config[key] = finite_number(value)
                if config[key] is None or not 0 < config[key] <= 1:
                    raise ExportError(f'{where}{key} must be a number in (0, 1], got {value!r}')
            elif key in _CHOICES:
                if value not in _CHOICES[key]:
                    raise ExportError(f'{where}{key} must be one of {", ".join(_CHOICES[key])}; got {value!r}')
                config[key] = value
            elif key in ('mean', 'std'):
                numbers = [finite_number(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
                if len(numbers) not in (1, chans) or None in numbers or (key == 'std' and min(numbers) <= 0):
                    raise ExportError(f'{where}{key} needs 1 or {chans} finite numbers{" > 0" if key == "std" else ""}'
                                      f', got {value!r}')
                config[key] = tuple(numbers * chans if len(numbers) == 1 else numbers)
            else:
                raise ExportError(f'unknown preprocessing setting {key!r}; known: {", ".join(PREPROCESSING_KEYS)}')
        configs.append(dict(config))  # after the run's values, then after the export's
    return configs[1], configs[0]


def _verify(model: nn.Module, folder: Path, data_config: Dict[str, Any], label_names: Optional[Sequence[str]]):
    """Export files only, config.json of strict JSON; the folder alone rebuilds the logits, preprocessing, names."""
    names, constants = sorted(p.name for p in folder.iterdir()), []
    json.loads((folder / 'config.json').read_text(), parse_constant=constants.append)
    if constants or not set(names) <= set(ALLOWED_FILES) or 'model.safetensors' not in names:
        raise ExportError(f'internal error: the export folder holds {names}; config.json non-JSON values: {constants}')
    try:
        reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    except Exception as e:
        raise ExportError(f'the exported folder does not load with timm.create_model("local-dir:...", '
                          f'pretrained=True): {type(e).__name__}: {e}') from e
    size = model.pretrained_cfg.get('min_input_size', (3, 64, 64))[-1]  # the cheapest input the model takes
    x = torch.randn(2, data_config['input_size'][0], size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), reloaded(x)
    if not torch.isfinite(want).all():
        raise ExportError('the weights are finite but give non-finite logits (NaN or inf) on a random input; '
                          'the checkpoint is not usable as it is')
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        raise ExportError('internal error: the exported folder rebuilds a model whose logits differ from the source')
    cfg = reloaded.pretrained_cfg  # config.json gives lists
    keys = _DATA_KEYS + ('test_input_size', 'test_crop_pct')
    got = {k: tuple(cfg[k]) if isinstance(cfg.get(k), list) else cfg.get(k) for k in keys}
    if got != {k: data_config.get(k) for k in keys} or list(cfg.get('label_names') or []) != list(label_names or []):
        raise ExportError(f'internal error: the exported folder gives preprocessing {got} and class names '
                          f'{cfg.get("label_names")}, not {data_config} and {label_names}')


def export_checkpoint(
        checkpoint: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None, *, force: bool = False, repo_id: Optional[str] = None,
        license: Optional[str] = None, preprocessing: Optional[Dict[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None, dataset: Optional[str] = None, install: Optional[str] = None,
        verbose: bool = True) -> Path:
    """Export ``checkpoint`` to the new folder ``out_dir`` (returned), as the CLI's options of the same names
    describe (``preprocessing``: ``PREPROCESSING_KEYS``); raises ExportError."""
    checkpoint_path, out_dir = Path(checkpoint), Path(out_dir)
    if not str(out_dir).isprintable():  # bytes that are not UTF-8 arrive as surrogates, which are not printable
        raise ExportError(f'folder name {os.fsencode(out_dir)!r} is not UTF-8 text or not printable; choose another')
    if license is not None and license not in HUB_LICENSES:
        raise ExportError(f'--license {license!r} is not a Hub licence id; choose one of {", ".join(HUB_LICENSES)}')
    for name, value in (('--dataset-name', dataset), ('--install', install), ('--repo-id', repo_id)):
        if value is not None and (not value.isprintable() or not value.strip()):
            raise ExportError(f'{name} must be one line of printable text, got {value!r}')
    replaces = check_out_dir(out_dir, force)

    ckpt = read_checkpoint(checkpoint_path)
    report(f'{checkpoint_path}: weights from "{ckpt.source}"; run arguments from {ckpt.args_origin or "-"}', verbose)
    model_name = model_name or ckpt.args.get('model')
    if not isinstance(model_name, str):
        raise ExportError(f'no --model given, and no args.yaml beside {checkpoint_path} (nor the checkpoint) '
                          f'names one: pass --model NAME, one of {", ".join(sorted(timm.list_models("gsop*")))}')
    model, kwargs = build_model_from_checkpoint(ckpt, model_name, model_kwargs, verbose)
    data_config, measured = export_data_config(model, ckpt.args, preprocessing, ckpt.args_origin)
    data_dir, name = ckpt.args.get('data_dir') or ckpt.args.get('data'), str(ckpt.args.get('dataset') or '')
    if label_names is not None and len(label_names) != model.num_classes:
        raise ExportError(f'{len(label_names)} label names given for a classifier of {model.num_classes} classes')
    if label_names is not None and len(set(label_names)) != len(label_names):
        raise ExportError('the label names are not unique')
    if label_names is None and model.num_classes:
        label_names, origin = run_label_names(ckpt.args, model.num_classes)
        if label_names or not (data_dir or name):
            report(f'class names from {origin}' if label_names else f'class names not written: {origin}', verbose)
        else:
            report(f'warning: class names not written: {origin}; pass --label-names FILE to give them')
    if not dataset and (data_dir or '/' in name):
        dataset = f'`{name}`' if '/' in name else f'the image folder `{Path(str(data_dir)).name}`'

    # The weights' licence is the publisher's (none unless given), their origin the run (None: left out); they
    # are not a backbone tag's (which load only the backbone): the card says where the run started instead.
    started_from = warm_start(ckpt.args, model.pretrained_cfg)
    model_name = model.pretrained_cfg.get('architecture') or model_name
    model.pretrained_cfg = dict(
        model.pretrained_cfg, license=license, origin_url=OFFICIAL_CODE_URL if ckpt.official else None, tag=None,
        notes=None)
    # attn_mode / attn_dim are written even where they are the defaults, so that the folder does not depend on them.
    export_args = {k: kwargs[k] for k in ('attn_mode', 'attn_dim') if k in kwargs}
    with staged_folder(out_dir, replaces) as tmp:
        report(f'writing model.safetensors and config.json to {tmp}', verbose)
        try:
            timm.models.save_for_hf(
                model, tmp, model_args=export_args, safe_serialization=True, data_config=data_config,
                model_config=dict(label_names=list(label_names)) if label_names else None)
        except OSError:
            raise
        except Exception as e:  # safetensors reports write failures (a full disk) as its own error
            raise ExportError(f'cannot write {tmp}: {type(e).__name__}: {e}') from e
        os.chmod(tmp / 'model.safetensors', (tmp / 'config.json').stat().st_mode)  # safetensors writes 0600
        card = model_card(
            model=model, model_name=model_name, model_args=json.loads((tmp / 'config.json').read_text())['model_args'],
            checkpoint=ckpt, data_config=data_config, measured_config=measured, label_names=label_names,
            dataset=dataset, title=repo_id.split('/')[-1] if repo_id else out_dir.name, repo_id=repo_id,
            license=license, install=install, started_from=started_from)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        _verify(model, tmp, data_config, label_names)
    return out_dir


def push_checkpoint(
        checkpoint: Union[str, os.PathLike], repo_id: str, model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None, *, private: bool = False, revision: Optional[str] = None,
        create_pr: bool = False, commit_message: Optional[str] = None, verbose: bool = True, **export_options):
    """Export ``checkpoint`` (``export_options`` as for ``export_checkpoint``) and upload it to the Hub model repo
    ``repo_id`` with the usual login (``hf auth login``, ``HF_TOKEN``); returns huggingface_hub's ``CommitInfo``."""
    from huggingface_hub import get_token
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ExportError(f'repo id {repo_id!r} is not of the form USER/NAME or ORG/NAME')
    if not get_token():
        raise ExportError('not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN')
    with tempfile.TemporaryDirectory(prefix='timm-gsop-push-') as tmp:
        folder = export_checkpoint(checkpoint, Path(tmp) / repo_id.split('/')[-1], model_name, model_kwargs,
                                   repo_id=repo_id, verbose=verbose, **export_options)
        api = HfApi()
        repo_id = api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True).repo_id
        if revision and revision != 'main':
            api.create_branch(repo_id, branch=revision, repo_type='model', exist_ok=True)
        report(f'uploading to {repo_id}' + (f'@{revision}' if revision else ''), verbose)
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type='model', revision=revision, create_pr=create_pr,
            commit_message=commit_message or f'Add {model_name or "GSoP-Net"} weights', ignore_patterns=[MANIFEST])
