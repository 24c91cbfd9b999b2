"""Find timm's reference scripts (train.py, validate.py, benchmark.py) and run them with the GSoP models registered.

The scripts live in timm's repository, not in its pip package. They are looked up in this order:

1. ``TIMM_TRAIN_PY`` / ``TIMM_VALIDATE_PY`` / ``TIMM_BENCHMARK_PY``: path to the script (or to a
   checkout holding it). When only ``TIMM_TRAIN_PY`` is set, the others are taken from beside it.
2. A checkout in the cache, ``<cache>/pytorch-image-models-<tag>``, where ``<tag>`` is the installed
   timm version's git tag (``v1.0.31``) so the scripts match the library they import. ``<cache>`` is
   ``TIMM_GSOP_CACHE_DIR``, else ``$XDG_CACHE_HOME/timm_gsop``, else ``~/.cache/timm_gsop``.
3. ``git clone --depth 1 --branch <tag>`` of ``TIMM_GSOP_TIMM_REPO`` (default: timm's GitHub
   repository) into that cache.

When all fail (offline, no git) a ``TimmScriptNotFound`` says how to set the variables.

Before running validate.py, the options it is not given are taken from the training run's ``args.yaml``
beside ``--checkpoint`` (model, its kwargs, classes, preprocessing, device, dataset). Before any script runs, a
GSoP model's name and keywords are checked, and a checkpoint it would load (validate.py's ``--checkpoint``,
train.py's ``--initial-checkpoint`` / ``--resume``) is checked against the model the flags describe: a mismatch
says which flags fit. ``timm_gsop.launcher.launch`` (``timm-gsop train | validate | benchmark``) does both once before it
starts the script; ``python -m timm_gsop.train`` and its siblings do them again, as entry points of their own.
"""
import argparse
import os
import runpy
import shlex
import shutil
import subprocess
import sys
from typing import List, Optional

__all__ = [
    'TimmScriptNotFound', 'LaunchError', 'timm_git_ref', 'cache_dir', 'checkout_dir', 'find_script', 'run_defaults',
    'check_args', 'run_script', 'option_given', 'option_value', 'STOPPED',
]

TIMM_REPO_URL = 'https://github.com/huggingface/pytorch-image-models'
SCRIPT_ENV = {'train.py': 'TIMM_TRAIN_PY', 'validate.py': 'TIMM_VALIDATE_PY', 'benchmark.py': 'TIMM_BENCHMARK_PY'}
_CLONE_TIMEOUT = 600
STOPPED = 75  # EX_TEMPFAIL (sysexits.h): train.py stopped on a signal after a checkpoint; the same command continues


class TimmScriptNotFound(RuntimeError):
    pass


def timm_git_ref(version: Optional[str] = None) -> str:
    """Git ref of a timm version: its release tag, or ``main`` for a development build (no tag yet)."""
    if version is None:
        try:  # the installed distribution's metadata: no torch import
            from importlib.metadata import version as dist_version
            version = dist_version('timm')
        except Exception:
            import timm
            version = timm.__version__
    version = version.split('+')[0]
    return 'main' if 'dev' in version else f'v{version}'


def cache_dir() -> str:
    path = os.environ.get('TIMM_GSOP_CACHE_DIR')
    if not path:
        base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
        path = os.path.join(base, 'timm_gsop')
    return path


def checkout_dir(ref: Optional[str] = None) -> str:
    return os.path.join(cache_dir(), f'pytorch-image-models-{ref or timm_git_ref()}')


def _from_env(name: str) -> Optional[str]:
    var = SCRIPT_ENV[name]
    value = os.environ.get(var)
    if not value and name != 'train.py' and os.environ.get('TIMM_TRAIN_PY'):
        # A checkout's scripts sit side by side: TIMM_TRAIN_PY alone is enough.
        train_py = os.environ['TIMM_TRAIN_PY']
        beside = os.path.join(train_py if os.path.isdir(train_py) else os.path.dirname(train_py), name)
        if not os.path.isfile(beside):
            raise TimmScriptNotFound(
                f'{var} is not set and there is no {name} beside TIMM_TRAIN_PY ({beside} is not a file): '
                f'set {var}=/path/to/{name}.')
        return os.path.abspath(beside)
    if not value:
        return None
    path = os.path.join(value, name) if os.path.isdir(value) else value
    if not os.path.isfile(path):
        raise TimmScriptNotFound(f'{var} is set to {value!r}, but {path} is not a file.')
    return os.path.abspath(path)


def _clone(ref: str, dest: str) -> None:
    """Shallow clone into a temporary folder, then rename: concurrent callers never see half a checkout."""
    git = shutil.which('git')
    if git is None:
        raise TimmScriptNotFound('git is not installed')
    url = os.environ.get('TIMM_GSOP_TIMM_REPO') or TIMM_REPO_URL
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f'{dest}.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [git, 'clone', '--quiet', '--depth', '1', '--branch', ref, url, tmp]
    print(f'timm_gsop: fetching timm\'s scripts: {" ".join(cmd[:-1])} {dest}', file=sys.stderr)
    env = dict(os.environ, GIT_TERMINAL_PROMPT='0')  # fail instead of asking for credentials
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_CLONE_TIMEOUT)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TimmScriptNotFound(f'git clone of {url} timed out after {_CLONE_TIMEOUT} s')
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TimmScriptNotFound(f'git clone of {url} at {ref} failed: {proc.stderr.strip() or proc.returncode}')
    try:
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        if not os.path.isdir(dest):
            raise


def find_script(name: str = 'train.py', fetch: bool = True) -> str:
    """Absolute path of timm's ``train.py``, ``validate.py`` or ``benchmark.py`` (see the module docstring)."""
    if name not in SCRIPT_ENV:
        raise ValueError(f'Unknown timm script {name!r}; known: {", ".join(SCRIPT_ENV)}')
    path = _from_env(name)
    if path:
        return path
    ref = timm_git_ref()
    dest = checkout_dir(ref)
    path = os.path.join(dest, name)
    if os.path.isfile(path):
        return path
    reason = 'fetching was turned off'
    if fetch:
        try:
            _clone(ref, dest)
        except (TimmScriptNotFound, OSError) as e:
            reason = str(e)
        else:
            if os.path.isfile(path):
                return path
            reason = f'the checkout at {dest} has no {name}'
    var = SCRIPT_ENV[name]
    raise TimmScriptNotFound(
        f"timm's {name} was not found: {var} is not set, there is no checkout at {dest}, "
        f'and it could not be fetched ({reason}).\n'
        f"{name} ships with timm's source repository, not with the pip package. Either\n"
        f'  export {var}=/path/to/pytorch-image-models/{name}\n'
        f'with a checkout at the installed timm version ({ref}), or make one where it is looked for:\n'
        f'  git clone --depth 1 --branch {ref} {TIMM_REPO_URL} {dest}')


# train.py's args.yaml keys -> validate.py's options: what validate.py needs to evaluate the run's model
# as train.py did. The options a user gives win, and --img-size / --input-size count as one.
_RUN_TO_VALIDATE = {
    'model': '--model', 'model_kwargs': '--model-kwargs', 'num_classes': '--num-classes', 'in_chans': '--in-chans',
    'input_size': '--input-size', 'img_size': '--img-size', 'crop_pct': '--crop-pct', 'mean': '--mean',
    'std': '--std', 'interpolation': '--interpolation', 'gp': '--gp', 'device': '--device',
    'data_dir': '--data-dir', 'dataset': '--dataset', 'val_split': '--split', 'class_map': '--class-map',
    'no_prefetcher': '--no-prefetcher', 'model_ema': '--use-ema', 'workers': '--workers',
}
_ALIASES = {'--model': ('-m',), '--img-size': ('--input-size',), '--input-size': ('--img-size',)}


class LaunchError(ValueError):
    """A one-line reason not to start the script."""


def option_given(argv: List[str], option: str) -> bool:
    names = (option, *_ALIASES.get(option, ()))
    return any(a in names or a.split('=', 1)[0] in names for a in argv)


def option_value(argv: List[str], option: str) -> Optional[str]:
    value = None
    for i, a in enumerate(argv):
        if a == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(option + '='):
            value = a.split('=', 1)[1]
    return value


def run_defaults(argv: List[str]) -> List[str]:
    """validate.py options from the ``args.yaml`` beside ``--checkpoint`` that ``argv`` does not give."""
    checkpoint = option_value(argv, '--checkpoint')
    run_args = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), 'args.yaml') if checkpoint else ''
    if not os.path.isfile(run_args):
        return []
    import yaml
    try:
        with open(run_args, encoding='utf-8') as f:
            run = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise LaunchError(f'cannot read {run_args}: {str(e).splitlines()[0]}')
    if not isinstance(run, dict):
        raise LaunchError(f'{run_args} is not a train.py args.yaml (a mapping of its options)')
    out = []
    for key, option in _RUN_TO_VALIDATE.items():
        value = run.get(key)
        if value in (None, '', [], {}, False) or option_given(argv + out, option):
            continue
        if value is True:
            out.append(option)
        elif isinstance(value, dict):  # --model-kwargs: each value as a Python literal (ParseKwargs reads it back)
            out += [option] + [f'{k}={v if isinstance(v, str) else repr(v)}' for k, v in value.items()]
        else:
            out += [option] + [str(v) for v in (value if isinstance(value, list) else [value])]
    if out:
        print(f'timm_gsop: from {run_args}: {shlex.join(out)}', file=sys.stderr)  # a command line to copy
    return out


def check_args(name: str, argv: List[str]) -> None:
    """Refuse, in one line before the script starts, what it would refuse later with a traceback (or not at all):
    a GSoP model name or keywords it cannot build; ``attn_mode=None``, which ``create_model`` drops (building the
    default model); published weights, which GSoP models have none of (a backbone tag loads a ResNet's); a checkpoint that is missing, unreadable
    or non-finite, or that does not fit the model the flags describe (saying which flags fit).
    """
    model_name = option_value(argv, '--model') or option_value(argv, '-m') or ''
    if not model_name.startswith('gsop') or option_given(argv, '--config') or option_given(argv, '-c'):
        return  # another family, or options this parser does not see (a --config file)
    import torch
    import timm
    from timm.utils import ParseKwargs
    from ..models._base import check_attn_mode
    from ..models._checkpoint import (
        CheckpointError, check_finite, check_state_dict_fits, is_backbone_cfg, load_checkpoint_file,
        state_dict_from_checkpoint)
    if model_name not in timm.list_models('gsop*', include_tags=True):  # a backbone tag too
        raise LaunchError(f'unknown model {model_name!r}; the GSoP-Net models: {", ".join(timm.list_models("gsop*"))}')
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument('--num-classes', type=int)
    parser.add_argument('--in-chans', type=int)
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    flags, _ = parser.parse_known_args(argv)
    try:
        if 'attn_mode' in flags.model_kwargs:  # the model's own check: create_model would drop attn_mode=None
            check_attn_mode(flags.model_kwargs['attn_mode'])
        with torch.device('meta'):  # shapes only
            model = timm.create_model(
                model_name, num_classes=flags.num_classes, in_chans=flags.in_chans or 3, **flags.model_kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        reason = f'{type(e).__name__}: {str(e).splitlines()[0]}' if str(e).strip() else type(e).__name__
        raise LaunchError(f'--model {model_name} with these options: {reason}')

    options = {'validate.py': ('--checkpoint',), 'train.py': ('--initial-checkpoint', '--resume')}.get(name, ())
    option, path = next(((o, p) for o in options if (p := option_value(argv, o))), ('', None))
    # validate.py asks for published weights without --checkpoint (or with --pretrained); train.py with --pretrained
    if (option_given(argv, '--pretrained') and not option_value(argv, '--pretrained-path')
            and not is_backbone_cfg(model.pretrained_cfg)) or (name == 'validate.py' and not path):
        use = '--checkpoint FILE' if name == 'validate.py' else '--pretrained-path FILE with --pretrained'
        raise LaunchError(f'no pretrained weights are published for {model_name}: give {use} '
                          f'(a checkpoint of train.py, or an official GSoP one)')
    if not path:
        return
    try:
        checkpoint = load_checkpoint_file(path)  # pickle never runs: weights_only
    except CheckpointError as e:
        raise LaunchError(str(e))  # one line naming the file and why
    try:  # what the script's strict load refuses
        _, state_dict = state_dict_from_checkpoint(checkpoint)
        # fine-tuning advice (--pretrained-path) only where the file starts a new run
        check_state_dict_fits(state_dict, model, model_name=model_name, cli=True,
                              path=path if option == '--initial-checkpoint' else None)
        check_finite(state_dict, model)
    except CheckpointError as e:
        raise LaunchError(f'{path}: {e}')


def run_script(name: str, argv=None) -> None:
    """Run timm's ``name`` as ``__main__`` with ``argv`` (default: this process's arguments). train.py runs
    continued where its run folder holds a checkpoint, and stops on a signal with a checkpoint (``resume``)."""
    import timm_gsop  # noqa: F401  registers the GSoP models in timm's registry

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        path = find_script(name)
        if name == 'validate.py':
            argv = run_defaults(argv) + argv
        check_args(name, argv)
        if name == 'train.py':
            from . import resume
            sys.path.insert(0, os.path.dirname(path))  # train.py's parser is read before it runs
            argv = resume.continue_run(path, argv)
            if argv is None:
                sys.exit(0)  # the run has finished
            import timm.utils
            timm.utils.CheckpointSaver = resume.RunSaver  # what train.py builds its saver from
            resume.StopOnSignal.install()
    except (TimmScriptNotFound, LaunchError) as e:
        print(f'timm_gsop: {e}', file=sys.stderr)
        sys.exit(2)
    sys.argv = [path] + argv  # argparse shows the script's name
    if sys.path[0] != os.path.dirname(path):
        sys.path.insert(0, os.path.dirname(path))  # as `python train.py` would
    if name != 'train.py':
        runpy.run_path(path, run_name='__main__')
        return
    from .resume import Stopped, StopOnSignal, _say
    try:
        runpy.run_path(path, run_name='__main__')
    except BaseException as e:
        if StopOnSignal.requested is None:
            raise
        if not isinstance(e, Stopped):  # the signal also ended the DataLoader's workers: train.py failed
            StopOnSignal.save_after_failure()
        saved = StopOnSignal.saved or "none written at this stop: the last epoch's stands"
        _say(f'stopped; checkpoint: {saved}. The same command continues the run')
        sys.exit(STOPPED)
