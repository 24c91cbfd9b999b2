"""A training run survives being stopped (``timm_gsop.launcher.resume``): kill -9 at random instants, SIGTERM,
torchrun's restarts, a full disk; the same command continues the run; another run's arguments are refused.

timm's train.py is not in timm's wheel and CI is offline, so these runs use ``tests/train_stub.py``, a small
train.py stand-in that makes the calls the resume layer relies on in train.py's order. The same properties are
checked on timm's real train.py with the demo's model and images in ``test_real_train_py_survives_stops``, where
the script can be found (``TIMM_TRAIN_PY``, or a checkout cached at the installed timm's tag).
"""
import csv
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from timm_gsop.launcher.resume import (
    RunSaver, checkpoint_progress, newest_checkpoint, trim_summary)
from timm_gsop.launcher.timm_scripts import STOPPED, TimmScriptNotFound, find_script

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / 'tests' / 'train_stub.py'


def _env(train_py=STUB, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith('TIMM_')}
    env.update(TIMM_TRAIN_PY=str(train_py), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1', **extra)
    return env


def _stub_cmd(out, *extra, experiment='R', launcher=False):
    base = ['--experiment', experiment, '--output', str(out), '--epochs', '5', '--checkpoint-hist', '2',
            '--sched-on-updates', '--model-ema', *extra]
    if launcher:  # timm-gsop train: a dataset option keeps the demo out
        return [sys.executable, '-m', 'timm_gsop', 'train', '--data-dir', 'synthetic', *base]
    return [sys.executable, '-m', 'timm_gsop.train', *base]


def _summary(run_dir):
    text = (run_dir / 'summary.csv').read_text()
    lines = text.splitlines()
    assert sum(line.startswith('epoch') for line in lines) == 1, text  # one header
    return list(csv.DictReader(lines))


def _check_folder(run_dir):
    """Every checkpoint name in the folder is a complete checkpoint; the names a kill leaves are .partial ones."""
    import argparse
    for path in run_dir.glob('*.pth.tar'):
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        assert 'state_dict' in checkpoint and 'epoch' in checkpoint, path
    others = {p.name for p in run_dir.iterdir()} - {p.name for p in run_dir.glob('checkpoint-*.pth.tar')}
    assert {n for n in others if not n.endswith('.partial')} <= {
        'args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'tmp.pth.tar'}, others


def _folder_state(run_dir):
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in run_dir.iterdir()}


def _kill_group(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def soak(cmd, env, run_dir, kills, rng, max_updates, log):
    """Start ``cmd`` again and again, killing its whole process tree (kill -9) at a random instant of its training
    (after 0 to ``max_updates`` logged updates of this start, plus a fraction of a step) or, every other time, the
    moment a checkpoint write is under way; then run it to its end. Counted in updates, not seconds, so that a slow
    machine's starts train as far as a fast one's. Returns (kills, kills during a write)."""
    import threading
    done = during_write = 0
    while done < kills:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        updates = []

        def read(out=proc.stdout, seen=updates):
            for line in out:
                log.write(line)
                seen.append(line.startswith('Train:'))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        at_write, target = done % 2 == 1, rng.randint(0, max_updates)
        while proc.poll() is None:
            if at_write and any(run_dir.glob('*.partial')):
                break
            if not at_write and sum(updates) > target:
                time.sleep(rng.uniform(0, 0.05))
                break
            time.sleep(0.002)
        if proc.poll() is not None:
            reader.join()
            assert proc.returncode == 0, f'the run failed (status {proc.returncode}): see {log.name}'
            return done, during_write  # it finished before this kill
        during_write += any(run_dir.glob('*.partial'))
        _kill_group(proc)
        proc.wait()
        reader.join()
        done += 1
        _check_folder(run_dir)
    final = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    assert final.returncode == 0, f'see {log.name}'
    return done, during_write


def _check_run(run_dir, reference_dir, epochs, hist):
    """The properties of a run that was stopped: every epoch once, one header, the learning rate of each epoch
    as the uninterrupted run's, the ranked history within --checkpoint-hist, model_best the best epoch."""
    rows, reference = _summary(run_dir), _summary(reference_dir)
    assert [int(r['epoch']) for r in rows] == list(range(epochs))
    assert [r['lr'] for r in rows] == [r['lr'] for r in reference]
    assert len(list(run_dir.glob('checkpoint-*.pth.tar'))) <= hist
    top1 = [float(r['eval_top1']) for r in rows]
    best_epoch = top1.index(max(top1))  # ties: the earlier epoch, as timm's saver ranks them
    assert checkpoint_progress(str(run_dir / 'model_best.pth.tar'))[1]['epoch'] == best_epoch
    assert checkpoint_progress(str(run_dir / 'last.pth.tar'))[0] == (epochs, 0)
    assert not list(run_dir.glob('*.partial'))
    return top1[-1], float(reference[-1]['eval_top1'])


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted stub run: the learning rates and top-1 that a stopped run must reproduce."""
    out = tmp_path_factory.mktemp('reference')
    subprocess.run(_stub_cmd(out), env=_env(), check=True, capture_output=True)
    return out / 'R'


def test_kill_9_soak(tmp_path):
    """20 kill -9 of the whole process tree at random instants, half of them during a checkpoint write, each
    followed by the same command: the run ends at its planned epoch with a continuous record, its top-1 near an
    uninterrupted run's."""
    cmd = _stub_cmd(tmp_path, '--log-interval', '1', '--epochs', '6')
    subprocess.run(_stub_cmd(tmp_path / 'reference', '--epochs', '6'), env=_env(), check=True, capture_output=True)
    with open(tmp_path / 'log', 'w') as log:
        kills, during_write = soak(cmd, _env(), tmp_path / 'R', 20, random.Random(0), max_updates=16, log=log)
    assert kills == 20 and during_write >= 8, (kills, during_write)
    final, uninterrupted = _check_run(tmp_path / 'R', tmp_path / 'reference' / 'R', epochs=6, hist=2)
    assert abs(final - uninterrupted) <= 25, (final, uninterrupted)
    assert 'continuing' in (tmp_path / 'log').read_text()


@pytest.mark.parametrize('target', ['launcher', 'group'])
def test_sigterm_stops_with_a_checkpoint_and_the_same_command_continues(tmp_path, reference, target):
    """SIGTERM to the launcher alone (Kubernetes, a scheduler's kill of the job's process), or to the whole process
    group (Ctrl-C's path, SLURM), mid-epoch: the process tree ends within 30 s with status 75 after saving the last
    update, and the same command continues from there."""
    cmd = _stub_cmd(tmp_path, '--step-delay', '0.2', launcher=True)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:  # mid-epoch 1: epoch 0's checkpoint is on disk
        if line.startswith('Train: 1 [0/'):
            break
    time.sleep(0.5)
    (os.kill if target == 'launcher' else os.killpg)(proc.pid, signal.SIGTERM)
    started = time.monotonic()
    output = proc.communicate(timeout=60)[0]
    assert time.monotonic() - started < 30
    assert proc.returncode == STOPPED, output
    assert 'SIGTERM: saving a checkpoint at the next optimizer step' in output
    (epoch, updates), meta = checkpoint_progress(str(tmp_path / 'R' / 'last.pth.tar'))
    assert epoch == 1 and 1 <= updates < 12 and meta['saver']['stopped'] == dict(epoch=1, updates=updates)
    assert os.path.exists(tmp_path / 'R' / 'checkpoint-0.pth.tar')
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f'from last.pth.tar (stopped after update {updates} of epoch 1' in again.stderr
    _check_run(tmp_path / 'R', reference, epochs=5, hist=2)


def test_torchrun_restarts_continue_the_run(tmp_path, reference):
    """torchrun --max-restarts 3 with its worker killed twice: each restart continues, every epoch is trained once
    in the record (train.py's DDP needs GPUs: several ranks are checked by benchmarks/gpu_checks.sh)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '1',
           '--max-restarts', '3', '-m', 'timm_gsop.train', *_stub_cmd(tmp_path, '--step-delay', '0.05')[3:]]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed, seen = 0, []
    for line in proc.stdout:
        seen.append(line)
        if killed < 2 and line.startswith(f'Train: {1 + 2 * killed} [0/'):  # epochs 1 and 3 are under way
            worker = int(subprocess.check_output(['pgrep', '-P', str(proc.pid), '-f', 'timm_gsop.train']).split()[0])
            os.kill(worker, signal.SIGKILL)
            killed += 1
    proc.wait(timeout=300)
    output = ''.join(seen)
    assert proc.returncode == 0 and killed == 2, output
    assert output.count('continuing') == 2, output
    _check_run(tmp_path / 'R', reference, epochs=5, hist=2)


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A run of 2 epochs that has finished: each test gets a copy (``_finished_run``)."""
    out = tmp_path_factory.mktemp('finished')
    subprocess.run(_stub_cmd(out, '--epochs', '2'), env=_env(), check=True, capture_output=True)
    return out / 'R'


def _finished_run(tmp_path, finished):
    shutil.copytree(finished, tmp_path / 'R')
    return _stub_cmd(tmp_path, '--epochs', '2'), tmp_path / 'R'


@pytest.mark.parametrize('change, option', [
    (['--lr', '0.01'], '--lr 0.01 (the run: 0.003)'),
    (['--model', 'test_efficientnet'], '--model test_efficientnet (the run: test_resnet)'),
    (['--data-dir', 'other'], '--data-dir other (the run: synthetic)'),
])
def test_another_runs_arguments_are_refused(tmp_path, change, option, finished):
    cmd, run_dir = _finished_run(tmp_path, finished)
    before = _folder_state(run_dir)
    proc = subprocess.run(cmd + change, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], proc.stderr
    assert '--experiment' in lines[0] and '--continue-with-changes' in lines[0]
    assert _folder_state(run_dir) == before


def test_finished_run_exits_0_without_writing(tmp_path, finished):
    cmd, run_dir = _finished_run(tmp_path, finished)
    before = _folder_state(run_dir)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and 'has finished: epoch 1 was the last of its 2' in proc.stderr
    assert _folder_state(run_dir) == before


def test_more_epochs_continue_with_changes(tmp_path, finished):
    cmd, run_dir = _finished_run(tmp_path, finished)
    proc = subprocess.run(cmd + ['--epochs', '3'], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and '--epochs 3 (the run: 2)' in proc.stderr
    proc = subprocess.run(cmd + ['--epochs', '3', '--continue-with-changes'], env=_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert 'with the changes: --epochs 3 (the run: 2)' in proc.stderr
    assert [int(r['epoch']) for r in _summary(run_dir)] == [0, 1, 2]


def test_unreadable_checkpoint_is_skipped_never_deleted(tmp_path, finished):
    cmd, run_dir = _finished_run(tmp_path, finished)
    last = run_dir / 'last.pth.tar'
    data = last.read_bytes()
    last.unlink()  # a hard link of checkpoint-1: write a new file
    last.write_bytes(data[:len(data) // 2])  # cut short by something else than the saver (a copy, a sync)
    path, progress, _ = newest_checkpoint(str(run_dir))
    assert path == str(run_dir / 'checkpoint-1.pth.tar') and progress == (2, 0)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stderr.count(f'skipping {last}: unreadable') == 1
    assert last.read_bytes() == data[:len(data) // 2]


def test_a_start_without_checkpoint_starts_afresh(tmp_path, finished):
    cmd, run_dir = _finished_run(tmp_path, finished)
    for path in run_dir.glob('*.pth.tar'):
        path.unlink()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and 'continuing' not in proc.stderr
    assert [int(r['epoch']) for r in _summary(run_dir)] == [0, 1]


@pytest.mark.skipif(not shutil.which('unshare') or subprocess.run(
    ['unshare', '-Urm', 'true'], capture_output=True).returncode != 0, reason='needs a mount namespace (unshare -Urm)')
def test_full_disk_keeps_the_last_checkpoint(tmp_path):
    """The run folder on a 15 MiB file system (2.5 checkpoints): the third checkpoint does not fit. The run fails, its last
    complete checkpoint and the rest stay as they were, no partial file is left; with room, the same command
    continues."""
    script = f'''
        set -u
        mount -t tmpfs -o size=15m tmpfs {tmp_path}
        {sys.executable} -m timm_gsop.train {" ".join(_stub_cmd(tmp_path, "--checkpoint-hist", "3")[3:])} > {tmp_path}/log1 2>&1
        echo "first=$?"
        ls {tmp_path}/R
        {sys.executable} -c "from timm_gsop.launcher.resume import checkpoint_progress as p; print('last', p('{tmp_path}/R/last.pth.tar')[0])"
        mount -o remount,size=64m {tmp_path}
        {sys.executable} -m timm_gsop.train {" ".join(_stub_cmd(tmp_path, "--checkpoint-hist", "3")[3:])} > {tmp_path}/log2 2>&1
        echo "second=$?"
        grep -h "continuing\\|could not write" {tmp_path}/log1 {tmp_path}/log2 | cut -c1-300
        tail -n +2 {tmp_path}/R/summary.csv | cut -d, -f1 | tr '\\n' ' '
    '''
    proc = subprocess.run(['unshare', '-Urm', 'bash', '-c', script], env=_env(), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout
    assert 'first=1' in out and 'could not write' in out and 'MiB free on its file system' in out, out + proc.stderr
    assert '.partial' not in out
    assert 'last (2, 0)' in out  # epochs 0 and 1 were saved; epoch 2's save found no room
    assert 'second=0' in out and 'continuing' in out and out.rstrip().endswith('0 1 2 3 4'), out


def test_trim_summary(tmp_path):
    path = tmp_path / 'summary.csv'
    path.write_text('epoch,loss,eval_top1\n0,1.0,10\n1,0.9,20\nepoch,loss,eval_top1\n2,0.8,30\n1,0.7,25\n3,0.')
    trim_summary(str(path), 3)
    assert path.read_text() == 'epoch,loss,eval_top1\n0,1.0,10\n1,0.7,25\n2,0.8,30\n'
    trim_summary(str(path), 0)
    assert not path.exists()


def test_saver_files_are_replaced_atomically(tmp_path, monkeypatch):
    """What a kill in between leaves: the old last.pth.tar (never unlinked before the rename), and a partial file
    under a name no loader takes for a checkpoint."""
    model = torch.nn.Linear(4, 2)
    saver = RunSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path), max_history=2)
    saver.save_checkpoint(0, metric=1.0)
    before = (tmp_path / 'last.pth.tar').read_bytes()

    def fail_mid_write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b'PK\x03\x04 half a zip')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', fail_mid_write)
    with pytest.raises(RuntimeError, match='could not write .*tmp.pth.tar .*No space left on device.*unchanged'):
        saver.save_checkpoint(1, metric=2.0)
    assert (tmp_path / 'last.pth.tar').read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']


def test_launcher_report_reads_any_summary(tmp_path, capsys):
    from timm_gsop.launcher.launch import report
    run = tmp_path / 'R'
    run.mkdir()
    (run / 'summary.csv').write_text('epoch,eval_top1\n0,10\nepoch,eval_top1\n1,30.5\n2,')
    report(['--experiment', 'R', '--output', str(tmp_path)])
    assert 'Validation top-1: 30.50% (best, epoch 1); last epoch 1: 30.50%' in capsys.readouterr().out


def _real_train_py():
    try:
        return find_script('train.py', fetch=False)
    except TimmScriptNotFound:
        return None


@pytest.mark.skipif(_real_train_py() is None, reason="timm's train.py not found (TIMM_TRAIN_PY, or a checkout "
                                                      "cached at the installed timm's tag)")
def test_real_train_py_survives_stops(tmp_path):
    """timm's own train.py with the demo's model and images: kill -9 at random instants (one during a checkpoint
    write), a SIGTERM mid-epoch, then the same command to the end: every epoch once, one header, model_best the
    best epoch."""
    from timm_gsop.launcher.demo_data import make_demo_dataset
    data = make_demo_dataset(str(tmp_path / 'data'), train_per_class=16, val_per_class=6)
    env = _env(_real_train_py())
    cmd = [sys.executable, '-m', 'timm_gsop', 'train', '--data-dir', data, '--model', 'gsop_resnet50',
           '--model-kwargs', 'layers=(1,1,1,1)', 'attn_dim=32', '--num-classes', '10', '--img-size', '64',
           '--opt', 'adamw', '--lr', '3e-3', '--sched', 'cosine', '--sched-on-updates', '--epochs', '4',
           '--warmup-epochs', '1', '--batch-size', '16', '--workers', '1', '--device', 'cpu', '--log-interval', '2',
           '--checkpoint-hist', '2', '--model-ema', '--output', str(tmp_path), '--experiment', 'R']
    with open(tmp_path / 'log', 'w') as log:
        kills, during_write = soak(cmd + ['--log-interval', '1'], env, tmp_path / 'R', 4, random.Random(1),
                                   max_updates=15, log=log)
    assert kills == 4 and during_write >= 1, (kills, during_write)
    proc = subprocess.Popen(cmd + ['--epochs', '6', '--continue-with-changes'], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith('Train: 4 [   2/'):
            break
    os.kill(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == STOPPED, output
    assert checkpoint_progress(str(tmp_path / 'R' / 'last.pth.tar'))[0][0] == 4
    final = subprocess.run(cmd + ['--epochs', '6'], env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    rows = _summary(tmp_path / 'R')
    assert [int(r['epoch']) for r in rows] == list(range(6))
    top1 = [float(r['eval_top1']) for r in rows]
    assert checkpoint_progress(str(tmp_path / 'R' / 'model_best.pth.tar'))[1]['epoch'] == top1.index(max(top1))
    assert len(list((tmp_path / 'R').glob('checkpoint-*.pth.tar'))) <= 2
    assert 'Validation top-1' in final.stdout


@pytest.mark.skipif(not torch.cuda.is_available() or _real_train_py() is None,
                    reason="needs a CUDA GPU and timm's train.py (benchmarks/gpu_checks.sh runs it)")
@pytest.mark.parametrize('nproc', [1, 2])
def test_cuda_processes_stop_at_one_step(tmp_path, nproc):
    """train.py under torchrun on GPUs with AMP and EMA: SIGUSR1 to the launcher mid-epoch ends every process
    within 60 s with status 75 after one checkpoint of the common step (with 2 processes the ranks agree by
    all-reduce); the same command continues to the planned epoch, each epoch once."""
    if torch.cuda.device_count() < nproc:
        pytest.skip(f'needs {nproc} GPUs')
    from timm_gsop.launcher.demo_data import make_demo_dataset
    data = make_demo_dataset(str(tmp_path / 'data'), train_per_class=32, val_per_class=6)
    cmd = [sys.executable, '-m', 'timm_gsop', 'train', '--nproc-per-node', str(nproc), '--data-dir', data,
           '--model', 'gsop_resnet50', '--model-kwargs', 'layers=(1,1,1,1)', '--num-classes', '10', '--img-size', '64',
           '--epochs', '3', '--batch-size', '8', '--workers', '2', '--amp', '--model-ema', '--log-interval', '1',
           '--output', str(tmp_path), '--experiment', 'R']
    proc = subprocess.Popen(cmd, env=_env(_real_train_py()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith('Train: 1 [   3/'):
            break
    os.kill(proc.pid, signal.SIGUSR1)
    started = time.monotonic()
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == STOPPED and time.monotonic() - started < 60, output
    assert subprocess.run(['pgrep', '-g', str(proc.pid)], capture_output=True).stdout == b''  # no process left
    (epoch, updates), _ = checkpoint_progress(str(tmp_path / 'R' / 'last.pth.tar'))
    assert epoch == 1 and updates >= 4, (epoch, updates)
    again = subprocess.run(cmd, env=_env(_real_train_py()), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and 'continuing' in again.stderr, again.stderr[-3000:]
    assert [int(r['epoch']) for r in _summary(tmp_path / 'R')] == [0, 1, 2]


def test_stop_checkpoint_progress(tmp_path):
    """A stop's last.pth.tar starts its epoch again; the epoch end after it (several processes finish the update
    they agreed on, then the epoch) is a plain end-of-epoch checkpoint again."""
    from timm_gsop.launcher.resume import StopOnSignal
    model = torch.nn.Linear(4, 2)
    saver = RunSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path), max_history=2)
    saver.save_checkpoint(0, metric=1.0)
    saver.save_recovery(1, batch_idx=4)
    try:
        assert saver.save_stop() == str(tmp_path / 'last.pth.tar')
    finally:
        StopOnSignal.saved = None
    (epoch, updates), meta = checkpoint_progress(str(tmp_path / 'last.pth.tar'))
    assert (epoch, updates, meta['epoch']) == (1, 5, 0)
    assert checkpoint_progress(str(tmp_path / 'model_best.pth.tar'))[0] == (1, 0)  # its own file still
    saver.save_checkpoint(1, metric=0.5)
    assert checkpoint_progress(str(tmp_path / 'last.pth.tar'))[0] == (2, 0)
