"""A train.py run that survives being stopped: the same command continues it.

``python -m timm_gsop.train`` (what ``timm-gsop train`` runs, once per process under torchrun) calls
``continue_run`` before train.py starts. With ``--experiment NAME``, a run folder that holds checkpoints is
continued from its newest readable one (``--resume`` is added); the folder's ``args.yaml`` must describe the same
run, a finished run exits 0, and ``summary.csv`` loses the rows of epochs that are done again. Without
``--experiment`` (train.py's time-stamped folders) nothing is continued; ``--resume PATH`` keeps train.py's meaning.

During the run ``RunSaver`` takes the place of timm's ``CheckpointSaver`` (train.py looks it up as
``timm.utils.CheckpointSaver`` when it builds its saver), and ``StopOnSignal`` turns SIGTERM, SIGUSR1 and SIGINT into
a checkpoint at the next optimizer step and exit status ``STOPPED``:

- every file is written under a ``.partial`` name, synced and renamed into place, so a kill at any instant leaves
  the complete old file or the complete new one (timm's saver unlinks ``last.pth.tar`` before the rename);
- the saver's history and best metric come back from the checkpoint that is continued (timm's
  ``CheckpointSaver.load_state_dict``), so ``--checkpoint-hist`` and ``model_best.pth.tar`` span the whole run, and
  an epoch end that a kill interrupted between its files is completed;
- ``summary.csv`` keeps one header (train.py writes another after each start);
- a stop saves ``last.pth.tar`` with the weights, optimizer, loss scaler and EMA after the last finished update and
  the epoch before it as its epoch: train.py then starts the interrupted epoch again from its first batch with
  those weights, its learning rates exactly those of an uninterrupted run.

train.py reports each update to its saver through the recovery hook (``saver.save_recovery(epoch, update)`` every
``--recovery-interval`` updates): the interval is set to 1 while it runs, and the user's own interval still writes
its ``recovery-*`` files.
"""
import csv
import glob
import os
import re
import shutil
import signal
import sys
from typing import List, Optional, Tuple

import torch
from timm.utils import CheckpointSaver, load_checkpoint_metadata
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .timm_scripts import STOPPED, LaunchError, option_given, option_value

__all__ = ['STOPPED', 'CONTINUE_WITH_CHANGES', 'Stopped', 'RunSaver', 'StopOnSignal', 'continue_run',
           'newest_checkpoint', 'checkpoint_progress', 'trim_summary']

CONTINUE_WITH_CHANGES = '--continue-with-changes'
PARTIAL = '.partial'  # files being written: never read as checkpoints, removed at the next start

# train.py options that do not change what a run computes: they may differ between the starts of one run.
_FREE_ARGS = {
    'resume', 'no_resume_opt', 'start_epoch', 'output', 'experiment', 'config', 'workers', 'pin_mem',
    'no_prefetcher', 'use_multi_epochs_loader', 'log_interval', 'recovery_interval', 'checkpoint_hist',
    'save_epochs', 'stop_epoch', 'save_images', 'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id',
    'device', 'device_modules', 'local_rank', 'channels_last', 'torchcompile', 'torchcompile_mode', 'torchscript',
    'synchronize_step', 'dist_bn', 'no_ddp_bb',
}


class Stopped(BaseException):
    """Raised at the optimizer step after a stop signal; ``python -m timm_gsop.train`` exits with ``STOPPED``."""


def _is_primary() -> bool:
    return os.environ.get('RANK', '0') == '0'


def _say(message: str) -> None:
    if _is_primary():  # one line per run, not per process
        print(f'timm_gsop: {message}', file=sys.stderr, flush=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    partial = path + PARTIAL
    try:
        with open(partial, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    _fsync_dir(path)


def checkpoint_progress(path: str) -> Tuple[Tuple[int, int], dict]:
    """``((epoch to start, updates done in it), checkpoint metadata)`` of a train.py checkpoint; an OSError or
    RuntimeError when it cannot be read (a truncated file, say). Only the metadata is read (memory-mapped)."""
    meta = load_checkpoint_metadata(path)
    if not isinstance(meta, dict) or 'epoch' not in meta or 'state_dict' not in meta:
        raise RuntimeError('not a train.py checkpoint')
    stopped = (meta.get('saver') or {}).get('stopped')
    if stopped:  # saved at a stop, mid-epoch
        return (int(stopped['epoch']), int(stopped['updates'])), meta
    return (int(meta['epoch']) + 1, 0), meta


def newest_checkpoint(run_dir: str, quiet: bool = False) -> Tuple[Optional[str], Tuple[int, int], dict]:
    """The readable checkpoint of ``run_dir`` that is furthest into the run (ties: ``last`` first, then by
    name, so every process picks the same file); unreadable ones are skipped with a warning, never deleted."""
    names = ['last.pth.tar'] + sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, 'checkpoint-*.pth.tar')))
    best: Tuple[Optional[str], Tuple[int, int], dict] = (None, (0, 0), {})
    for name in names:
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            progress, meta = checkpoint_progress(path)
        except Exception as e:  # truncated, corrupt or foreign: say so once, leave the file alone
            reason = str(e).split('. ')[0].splitlines()[0] if str(e).strip() else type(e).__name__
            if not quiet:
                _say(f'skipping {path}: unreadable ({reason})')
            continue
        if best[0] is None or progress > best[1]:
            best = (path, progress, meta)
    return best


def trim_summary(path: str, before_epoch: int) -> None:
    """Keep ``summary.csv``'s header and its rows of epochs before ``before_epoch``, each once (the last one): the
    epochs after them are trained again. Lines a kill cut short and repeated headers go."""
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        text = f.read()
    lines = text.splitlines()
    if not lines:
        return
    header = lines[0]
    width = len(next(csv.reader([header])))
    rows = {}
    for line in lines[1:]:
        fields = next(csv.reader([line]), [])
        if line == header or len(fields) != width or not re.fullmatch('[0-9]+', fields[0]):
            continue
        if int(fields[0]) < before_epoch:
            rows[int(fields[0])] = line
    kept = '\n'.join([header] + [rows[e] for e in sorted(rows)]) + '\n' if rows else ''
    if kept == text:
        return
    if kept:
        _write_atomic(path, kept.encode())
    else:  # no epoch done: train.py starts a new file with its header
        os.unlink(path)


def _planned_epochs(args) -> int:
    """The epochs train.py runs with ``args``: its scheduler's count (cooldown and warmup prefix included)."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    try:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr or 0.1)
        _, epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=1)
    except Exception:
        epochs = args.epochs + getattr(args, 'cooldown_epochs', 0)
    stop_epoch = getattr(args, 'stop_epoch', None)
    return min(epochs, stop_epoch) if stop_epoch else epochs


def _option_names(parser) -> dict:
    names = {}
    for action in parser._actions:
        long_names = [o for o in action.option_strings if o.startswith('--')]
        if long_names:
            names.setdefault(action.dest, long_names[0])
    return names


def _differences(run: dict, new: dict, option_names: dict) -> List[str]:
    out = []
    for key in sorted(set(run) & set(new) - _FREE_ARGS):
        if run[key] != new[key]:
            out.append(f'{option_names.get(key, key)} {_show(new[key])} (the run: {_show(run[key])})')
    return out


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ' '.join(map(str, value)) or '[]'
    if isinstance(value, dict):
        return ' '.join(f'{k}={v}' for k, v in value.items()) or '{}'
    return str(value)


def continue_run(script: str, argv: List[str], world_size: Optional[int] = None,
                 check_only: bool = False) -> Optional[List[str]]:
    """train.py's arguments for this start of the run: ``argv`` with ``--resume`` added where a run folder holds
    a checkpoint to continue; None when the run has finished. A ``LaunchError`` refuses another run's arguments
    in the folder before anything is written. ``check_only`` (the launcher, before it starts the processes)
    writes and announces nothing; ``world_size`` is the number of processes (default: torchrun's WORLD_SIZE)."""
    import runpy
    import yaml

    accept_changes = CONTINUE_WITH_CHANGES in argv
    argv = [a for a in argv if a != CONTINUE_WITH_CHANGES]
    experiment = option_value(argv, '--experiment')
    if not any(option_given(argv, o) for o in ('--config', '-c', '--resume')) and not (experiment and os.path.isdir(
            os.path.join(option_value(argv, '--output') or os.path.join('.', 'output', 'train'), experiment))):
        return argv  # no run folder to continue (what train.py would parse is all on the command line)
    saved_argv = sys.argv
    sys.argv = [script] + argv
    try:  # train.py's own parser (its module code defines it; main() does not run), --config files included
        train_py = runpy.run_path(script, run_name='timm_gsop_train_args')
        if '_parse_args' not in train_py or 'parser' not in train_py:
            return argv  # not timm's train.py (a script of one's own): it runs as it is
        args, args_text = train_py['_parse_args']()
    finally:
        sys.argv = saved_argv
    if not args.experiment:
        return argv  # a new time-stamped folder: nothing to continue
    run_dir = os.path.join(args.output or os.path.join('.', 'output', 'train'), args.experiment)
    writes = _is_primary() and not check_only
    if args.resume and args.resume != 'auto':  # train.py's meaning; the saver's history comes back from it
        resume = os.path.abspath(args.resume)
        if writes and os.path.dirname(resume) == os.path.abspath(run_dir) and os.path.isfile(resume):
            _tidy(run_dir, checkpoint_progress(resume)[0][0])
        RunSaver.resume_from = resume
        return argv
    argv = _without_option(argv, '--resume')  # 'auto': train.py's own auto-resume, done here for every version
    if not os.path.isdir(run_dir):
        return argv
    path, (epoch, updates), meta = newest_checkpoint(run_dir, quiet=check_only)
    if path is None:
        if writes:  # a start that saved nothing: its files are written anew
            _tidy(run_dir, 0)
        return argv

    run_args_file = os.path.join(run_dir, 'args.yaml')
    run_args = None
    if os.path.isfile(run_args_file):
        with open(run_args_file, encoding='utf-8') as f:
            run_args = yaml.safe_load(f)
    elif hasattr(meta.get('args'), '__dict__'):  # no args.yaml: the checkpoint's own record of its arguments
        run_args = yaml.safe_load(yaml.safe_dump(vars(meta['args'])))
    changes = _differences(run_args or {}, yaml.safe_load(args_text), _option_names(train_py['parser']))
    world_size = world_size or int(os.environ.get('WORLD_SIZE', 1))
    run_world_size = getattr(meta.get('args'), 'world_size', world_size)
    if run_world_size != world_size:
        changes.append(f'processes {world_size} (the run: {run_world_size}; the global batch is --batch-size '
                       'times the processes)')
    if changes and not accept_changes:
        raise LaunchError(
            f'{run_dir} holds a run with other arguments: {"; ".join(changes)}. Continue it with its own arguments '
            f'({run_args_file}), give another --experiment to start a new run, or add {CONTINUE_WITH_CHANGES} to '
            'continue it from its newest checkpoint with these')
    planned = _planned_epochs(args)
    if updates == 0 and epoch >= planned:
        _say(f'{run_dir} has finished: epoch {epoch - 1} was the last of its {planned}; nothing to train '
             f'(more epochs: --epochs N {CONTINUE_WITH_CHANGES})')
        return None
    if writes:
        _tidy(run_dir, epoch)
    if not check_only:
        where = (f'stopped after update {updates} of epoch {epoch}, which starts again from its first batch with '
                 'these weights' if updates else f'epoch {epoch - 1} done, {planned - epoch} to go')
        _say(f'continuing {run_dir} from {os.path.basename(path)} ({where})' +
             (f' with the changes: {"; ".join(changes)}' if changes else ''))
    RunSaver.resume_from = os.path.abspath(path)
    return argv + ['--resume', path]


def _tidy(run_dir: str, epoch: int) -> None:
    """Before a start at ``epoch``: a killed save's partial files go (never read), and summary.csv's rows of the
    epochs trained again."""
    for partial in glob.glob(os.path.join(run_dir, '*' + PARTIAL)):
        os.unlink(partial)
    trim_summary(os.path.join(run_dir, 'summary.csv'), epoch)


def _without_option(argv: List[str], option: str) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + '='):
            out.append(a)
    return out


class RunSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` with atomic files, its bookkeeping continued from the resumed checkpoint, one
    header in ``summary.csv`` and a checkpoint at a stop (see the module docstring)."""
    resume_from: Optional[str] = None  # set by continue_run

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.position: Optional[Tuple[int, int]] = None  # (epoch, updates done in it)
        self.stopped_at: Optional[Tuple[int, int]] = None  # while a stop's checkpoint is written
        self.user_recovery_interval = getattr(self.args, 'recovery_interval', 0) if self.args else 0
        if self.args is not None:
            self.args.recovery_interval = 1  # train.py reports every update to save_recovery
        StopOnSignal.saver = self
        self._restored = None
        if self.resume_from and os.path.dirname(self.resume_from) == os.path.abspath(self.checkpoint_dir):
            self.load_state_dict_from_checkpoint(self.resume_from)

    # --- atomic files
    def _save(self, save_path, epoch, metric=None):
        if getattr(self, '_bookkeeping_only', False):
            return
        partial = save_path + PARTIAL
        interval = getattr(self.args, 'recovery_interval', None)
        if self.args is not None:
            self.args.recovery_interval = self.user_recovery_interval  # the run's own value in the checkpoint
        try:
            super()._save(partial, epoch, metric)
            with open(partial, 'rb') as f:
                os.fsync(f.fileno())
            os.replace(partial, save_path)
        except BaseException as e:
            if os.path.exists(partial):
                os.unlink(partial)
            if isinstance(e, (OSError, RuntimeError)):  # torch's zip writer says "unexpected pos" for a full disk
                free = shutil.disk_usage(self.checkpoint_dir).free
                raise RuntimeError(
                    f'could not write {save_path} ({free / 2 ** 20:.0f} MiB free on its file system): '
                    f'{str(e).splitlines()[0] if str(e) else type(e).__name__}. The files already in '
                    f'{self.checkpoint_dir} are unchanged, and the same command continues from them') from e
            raise
        finally:
            if self.args is not None:
                self.args.recovery_interval = interval

    def _replace(self, src, dst):
        if not getattr(self, '_bookkeeping_only', False):
            os.replace(src, dst)  # atomic on POSIX: dst is the old file or the new one, never missing
            _fsync_dir(dst)

    def _duplicate(self, src, dst):
        if os.path.exists(dst) and os.path.samefile(src, dst):
            return  # already the same file (a rename between two links of one file would do nothing)
        partial = dst + PARTIAL
        if os.path.exists(partial):
            os.unlink(partial)
        try:
            os.link(src, partial)
        except OSError:
            shutil.copy2(src, partial)
        os.replace(partial, dst)
        _fsync_dir(dst)

    def state_dict(self, epoch=None, metric=None):
        state = super().state_dict(epoch, metric)
        if self.stopped_at is not None:
            state['pending'] = (None, None)
            state['stopped'] = dict(epoch=self.stopped_at[0], updates=self.stopped_at[1])
        return state

    # --- continuing the bookkeeping
    def load_state_dict_from_checkpoint(self, checkpoint_path):
        if self._restored == os.path.abspath(checkpoint_path):  # a train.py that restores it too
            return True
        self._restored = os.path.abspath(checkpoint_path)
        try:
            meta = load_checkpoint_metadata(checkpoint_path)
        except Exception:
            return False
        state = dict(meta.get('saver') or {})
        if not state:
            return False
        epoch, metric = state.get('pending', (None, None))
        if epoch is None or os.path.basename(checkpoint_path) != 'last.pth.tar':
            self.load_state_dict(state)
            return True
        # The epoch end that wrote last.pth.tar: its ranked copy and model_best, done again from it in case a kill
        # came between its files (done already, it gives the same files and history).
        self.load_state_dict(dict(state, pending=(None, None)))
        self._bookkeeping_only = True
        try:
            super().save_checkpoint(epoch, metric)
        finally:
            self._bookkeeping_only = False
        return True

    def save_checkpoint(self, epoch, metric=None):
        summary = os.path.join(self.checkpoint_dir, 'summary.csv')
        trim_summary(summary, epoch + 1)  # the header train.py repeats after each start
        self.position = (epoch + 1, 0)
        return super().save_checkpoint(epoch, metric)

    # --- every update (train.py's recovery hook)
    def save_recovery(self, epoch, batch_idx=0):
        self.position = (epoch, batch_idx + 1)
        StopOnSignal.in_update = False
        if StopOnSignal.agreed and StopOnSignal.saved is None:
            self.save_stop()
        if self.user_recovery_interval and (batch_idx + 1) % self.user_recovery_interval == 0:
            super().save_recovery(epoch, batch_idx)

    def save_stop(self) -> str:
        """``last.pth.tar`` now, with the epoch before the current one as its epoch: train.py starts the current
        epoch again, from these weights."""
        tmp = os.path.join(self.checkpoint_dir, 'tmp' + self.extension)
        last = os.path.join(self.checkpoint_dir, 'last' + self.extension)
        self.stopped_at = self.position  # what state_dict() records, in this file only
        try:
            self._save(tmp, self.position[0] - 1)
            self._replace(tmp, last)
        finally:
            self.stopped_at = None
        StopOnSignal.saved = last
        return last


class StopOnSignal:
    """SIGTERM, SIGUSR1 (SLURM's ``--signal``) and a first Ctrl-C ask for a stop; the processes agree on it after
    an optimizer step (one all-reduce of a flag a step, where there are several), the saver writes the checkpoint
    after that update, and every process raises ``Stopped`` at the next step, before changing anything."""
    requested: Optional[int] = None
    agreed = False
    in_update = False  # from an optimizer step to the end of its bookkeeping (EMA, logging, save_recovery)
    pid: Optional[int] = None  # DataLoader workers inherit the handlers: only this process acts
    saver: Optional[RunSaver] = None
    saved: Optional[str] = None

    @classmethod
    def install(cls) -> None:
        cls.pid = os.getpid()
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, cls._request)
        register_optimizer_step_post_hook(cls._after_step)
        register_optimizer_step_pre_hook(cls._before_step)

    @classmethod
    def _request(cls, signum, frame):
        if os.getpid() != cls.pid:
            return
        if signum == signal.SIGINT and cls.requested == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        first, cls.requested = cls.requested is None, signum  # set first: a second signal may come during the print
        if first:
            _say(f'{signal.Signals(signum).name}: saving a checkpoint at the next optimizer step, then stopping')
            # A signal to the whole process group also ends the DataLoader's workers (PyTorch's handler in them). Its
            # SIGCHLD handler would raise at whatever this process does, an update half done included; without it,
            # the loader raises at the next batch, between updates, where the last finished one is saved.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    @classmethod
    def _after_step(cls, optimizer, args, kwargs):
        if cls.agreed:
            return
        flag = cls.requested is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device('cuda', torch.cuda.current_device()) if backend == 'nccl' else torch.device('cpu')
            t = torch.tensor([int(flag)], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        cls.agreed = flag

    @classmethod
    def _before_step(cls, optimizer, args, kwargs):
        if cls.agreed:
            raise Stopped()
        cls.in_update = True

    @classmethod
    def save_after_failure(cls) -> Optional[str]:
        """After a stop signal that also reached the DataLoader workers (a signal to the whole process group:
        torchrun's SIGTERM, SLURM's), they end and train.py fails at its next batch: save the last finished update
        still, unless one was under way."""
        saver = cls.saver
        if cls.requested is None or saver is None or cls.saved or cls.in_update or not (saver.position or (0, 0))[1]:
            return None
        return saver.save_stop()
