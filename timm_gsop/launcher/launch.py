"""``timm-gsop train | validate | benchmark``: timm's reference scripts with the GSoP-Net models registered.

``train`` is train.py with what a launcher adds: an embedded demo when no dataset is named, recipes, torchrun for
several processes or nodes, ``--dry-run``, and checks that refuse in one line what the script would refuse later
with a traceback (or not at all). Every other argument goes to the script unchanged, after the recipe's or the
demo's: argparse keeps an option's last occurrence, so the user's win. ``validate --checkpoint RUN/ckpt`` takes the
options it is not given from the run's ``args.yaml``.

The script runs as its own process, ``python -m timm_gsop.train ARGS`` (under torchrun one per GPU): the command
``--dry-run`` prints.
"""
import argparse
import csv
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import List

import torch

from .recipes import describe_recipes, recipe_args
from .timm_scripts import (
    SCRIPT_ENV, STOPPED, LaunchError, cache_dir, check_args, find_script, option_given, option_value, run_defaults)

__all__ = ['add_train_arguments', 'add_script_arguments', 'train', 'run_timm_script', 'torchrun_launch', 'demo_args',
           'own_command']

TORCHRUN_OPTIONS = ('--nproc-per-node', '--nnodes', '--node-rank', '--rdzv-endpoint', '--rdzv-backend', '--max-restarts')
RDZV_BACKENDS = ('static', 'c10d', 'etcd', 'etcd-v2')  # torchrun's
DATASET_OPTIONS = ('--data-dir', '--dataset', '-c', '--config')  # a positional DIR is deprecated in train.py

_ENVIRONMENT = """environment:
  TIMM_TRAIN_PY            path to timm's train.py; else a checkout cached at the installed timm
  TIMM_VALIDATE_PY         version's tag under ~/.cache/timm_gsop (TIMM_GSOP_CACHE_DIR), else a
  TIMM_BENCHMARK_PY        shallow git clone there (validate.py, benchmark.py: beside train.py)"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = textwrap.fill(
        "Runs timm's train.py with the GSoP-Net models registered (python -m timm_gsop.train). Every argument that "
        "is not an option below goes to train.py unchanged, after the recipe's, so later arguments win (train.py "
        'keeps the last occurrence of an option). With no dataset (--data-dir / --dataset / --config) and no '
        'recipe, trains a small GSoP-Net on a generated 10-class shapes ImageFolder (no download; on the CPU when '
        'there is no GPU) and prints the checkpoint, its validation top-1 and the commands to validate and export it.',
        100)  # the epilog's layout is kept: the help's formatter takes text as it is
    parser.epilog = '\n\n'.join([
        f'recipes:\n{describe_recipes()}',
        _ENVIRONMENT + '\n  TIMM_GSOP_DEMO_DIR       where the demo writes its shapes dataset (default: the cache dir)',
        'examples:\n'
        '  timm-gsop train                                            # the CPU demo\n'
        '  timm-gsop train --recipe paper-net1 --data-dir /data/imagenet --amp --experiment r50-net1\n'
        '      (run again, the same command continues a stopped run; SIGTERM / SIGUSR1 stop it with a\n'
        '      checkpoint and exit status 75; --continue-with-changes continues it with other arguments)\n'
        '  timm-gsop train --recipe paper-net2 --nproc-per-node 8 --batch-size 32 --data-dir /data/imagenet\n'
        '  timm-gsop validate --checkpoint output/train/RUN/model_best.pth.tar\n'
        '  timm-gsop benchmark --model gsop_resnet50 --device cpu --bench inference\n'
        'In a checkout ./train_timm.sh is timm-gsop train, and ./train_timm.sh --validate / --benchmark are\n'
        'timm-gsop validate / benchmark.'])
    own = parser.add_argument_group('launcher options')
    own.add_argument('--recipe', metavar='NAME', help="put recipe NAME's train.py arguments first (--list-recipes)")
    own.add_argument('--list-recipes', action='store_true', help='list the recipes and exit')
    own.add_argument('--nproc-per-node', metavar='N', help='run under torchrun with N processes per node, one GPU each')
    own.add_argument('--nnodes', metavar='N', help='number of nodes (with --node-rank and --rdzv-endpoint)')
    own.add_argument('--node-rank', metavar='R', help="this node's rank, 0 .. N-1")
    own.add_argument('--rdzv-endpoint', metavar='HOST:PORT', help="rendezvous host:port (node 0's address)")
    own.add_argument('--rdzv-backend', metavar='NAME', help="torchrun's rendezvous backend (default: torchrun's, static)")
    own.add_argument('--max-restarts', metavar='N', help="torchrun restarts the processes up to N times after a "
                     'failure; each restart continues the run (needs --experiment)')
    own.add_argument('--dry-run', action='store_true', help='print the command and exit (fetches and writes nothing)')
    own.add_argument('--help-train', action='store_true', help="show train.py's own --help")


def add_script_arguments(parser: argparse.ArgumentParser, script: str) -> None:
    """validate / benchmark: the launcher's own options; the training-only ones are refused by name."""
    parser.description = textwrap.fill(
        f"Runs timm's {script}.py with the GSoP-Net models registered (python -m timm_gsop.{script}); every "
        f'argument that is not an option below goes to {script}.py unchanged.' + (
            " With --checkpoint RUN/model_best.pth.tar, the options it is not given come from the run's "
            'RUN/args.yaml (model, --model-kwargs, classes, input size, crop, mean/std, interpolation, device, '
            'dataset, EMA).' if script == 'validate' else ''), 100)
    parser.epilog = _ENVIRONMENT
    parser.add_argument('--dry-run', action='store_true', help='print the command and exit (fetches nothing)')
    parser.add_argument(f'--help-{script}', dest='help_script', action='store_true',
                        help=f"show {script}.py's own --help")
    for option in ('--recipe', *TORCHRUN_OPTIONS):
        parser.add_argument(option, help=argparse.SUPPRESS)


def _launcher_option(opts: argparse.Namespace, option: str):
    return getattr(opts, option[2:].replace('-', '_'), None)


def torchrun_launch(opts: argparse.Namespace) -> List[str]:
    """The command before ``-m timm_gsop.train``: this interpreter, under torchrun with ``--nproc-per-node``."""
    for option in ('--recipe', *TORCHRUN_OPTIONS):
        if _launcher_option(opts, option) == '':  # an empty value would read as "not given"
            raise LaunchError(f'{option} needs a value, got an empty one')
    nproc, nnodes, rank, endpoint, backend, restarts = (_launcher_option(opts, o) for o in TORCHRUN_OPTIONS)
    for option, value in (('--nproc-per-node', nproc), ('--nnodes', nnodes)):
        if value is not None and not re.fullmatch('[1-9][0-9]*', value):
            raise LaunchError(f"{option} must be a positive integer, got '{value}'")
    if restarts is not None and not re.fullmatch('[0-9]+', restarts):
        raise LaunchError(f"--max-restarts must be an integer >= 0, got '{restarts}'")
    if backend is not None and backend not in RDZV_BACKENDS:
        raise LaunchError(f"--rdzv-backend must be one of {', '.join(RDZV_BACKENDS)} (torchrun's), got '{backend}'")
    if rank is not None and not (re.fullmatch('[0-9]+', rank) and nnodes and int(rank) < int(nnodes)):
        raise LaunchError(f"--node-rank must be 0 .. --nnodes - 1 ({nnodes or 'no --nnodes given'}), got '{rank}'")
    if nproc is None:
        if any(v is not None for v in (nnodes, rank, endpoint, backend, restarts)):
            raise LaunchError('--nnodes / --node-rank / --rdzv-* / --max-restarts need --nproc-per-node')
        return [sys.executable]
    launch = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', nproc]
    launch += ['--max-restarts', restarts] if restarts is not None else []
    if nnodes is None or nnodes == '1':
        if rank is not None or endpoint is not None:
            raise LaunchError('--node-rank / --rdzv-endpoint need --nnodes > 1')
        return launch + ['--standalone']
    if endpoint is None:
        raise LaunchError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address)")
    if rank is None and backend != 'c10d':  # c10d assigns ranks; the static backend needs them
        raise LaunchError(f'--nnodes {nnodes} needs --node-rank (0 .. {int(nnodes) - 1})')
    launch += ['--nnodes', nnodes]
    launch += ['--node-rank', rank] if rank is not None else []
    launch += ['--rdzv-backend', backend] if backend is not None else []
    return launch + ['--rdzv-endpoint', endpoint]


def demo_args(data_dir: str, device: str) -> List[str]:
    # A reduced-depth GSoP-Net1 (one bottleneck per stage, a GSoP block in each) at 64 px, 600 training images:
    # about 100 s on 2 CPU cores, far above chance (10 %) on the 10 shapes.
    return [
        '--data-dir', data_dir, '--model', 'gsop_resnet50', '--model-kwargs', 'layers=(1,1,1,1)', '--num-classes', '10',
        '--img-size', '64', '--crop-pct', '1.0', '--scale', '0.5', '1', '--color-jitter', '0', '--smoothing', '0.1',
        '--opt', 'adamw', '--lr', '3e-3', '--weight-decay', '0.05', '--sched', 'cosine', '--sched-on-updates',
        '--epochs', '5', '--warmup-epochs', '1', '--batch-size', '32', '--workers', '1', '--device', device,
        '--log-interval', '5', '--checkpoint-hist', '1', '--output', os.path.join(os.getcwd(), 'output', 'train'),
        '--experiment', time.strftime('gsop-demo-%Y%m%d-%H%M%S'),
    ]


def own_command() -> List[str]:
    """This command line as the user's shell reaches it, for the commands it prints: ./train_timm.sh in a checkout
    (which names itself in TIMM_GSOP_LAUNCHER), this install's ``timm-gsop``, else ``python -m timm_gsop``."""
    launcher = os.environ.get('TIMM_GSOP_LAUNCHER')
    if launcher:
        here = os.path.dirname(os.path.abspath(launcher)) == os.getcwd()
        return ['./' + os.path.basename(launcher) if here else launcher]
    script = shutil.which('timm-gsop', path=os.path.dirname(sys.executable))  # the console script of this install
    if script:
        return ['timm-gsop' if shutil.which('timm-gsop') == script else script]
    return [sys.executable, '-m', 'timm_gsop']


def _run(cmd: List[str], env=None) -> int:
    """Run ``cmd`` to its end. SIGTERM and SIGUSR1 sent to this process are passed on (to torchrun as SIGUSR1, which
    it passes to its processes: its SIGTERM would also end their DataLoader workers); after one, a run that did not
    finish exits with ``STOPPED``. Ctrl-C reaches the whole process group: the script stops on its own."""
    proc = subprocess.Popen(cmd, env=env)
    stops = []

    def relay(signum, frame):
        stops.append(signum)
        proc.send_signal(signal.SIGUSR1 if 'torch.distributed.run' in cmd else signum)

    previous = {s: signal.signal(s, relay) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while True:
            try:
                returncode = proc.wait()
                break
            except KeyboardInterrupt:  # the script had the same Ctrl-C (one process group): let it stop on its own
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if returncode < 0:
        returncode = 128 - returncode  # killed by a signal: as a shell says it
    return STOPPED if stops and returncode != 0 else returncode


def _start(script: str, argv: List[str], nproc=None) -> dict:
    """Refuse, before any work, what this node or the script cannot run; find the script (fetching it if needed)
    once, for every torchrun process. Returns the script's environment."""
    if nproc is not None:  # train.py's distributed mode runs one process per GPU: DDP on the CPU fails inside it
        gpus = torch.cuda.device_count()
        if gpus < int(nproc):
            raise LaunchError(f"--nproc-per-node {nproc} needs {nproc} GPUs on this node, found {gpus} (train.py's "
                              'distributed mode runs one process per GPU): drop --nproc-per-node to train in one process')
    env = dict(os.environ, **{SCRIPT_ENV[f'{script}.py']: find_script(f'{script}.py')})
    if nproc is not None:  # torchrun passes SIGUSR1 on to its processes too (a stop with a checkpoint)
        env.setdefault('TORCHELASTIC_SIGNALS_TO_HANDLE', 'SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1')
    check_args(f'{script}.py', argv)
    return env


def _announce(script: str, cmd: List[str]) -> None:
    print(f'timm-gsop {script}: {shlex.join(cmd)}', file=sys.stderr, flush=True)


def train(opts: argparse.Namespace, user_args: List[str]) -> int:
    if opts.list_recipes:
        print(describe_recipes())
        return 0
    launch = torchrun_launch(opts)
    if opts.help_train:
        return _run([sys.executable, '-m', 'timm_gsop.train', '--help'])
    names_dataset = any(option_given(user_args, o) for o in DATASET_OPTIONS)
    demo_dir = None
    if opts.recipe is not None:
        try:
            pre_args = recipe_args(opts.recipe)
        except KeyError as e:
            raise LaunchError(e.args[0])
        if not names_dataset:
            raise LaunchError(f'recipe {opts.recipe} needs a dataset: add --data-dir DIR '
                              '(and --dataset NAME for a non-folder dataset)')
    elif not names_dataset:
        demo_dir = os.environ.get('TIMM_GSOP_DEMO_DIR') or os.path.join(cache_dir(), 'demo-shapes')
        pre_args = demo_args(demo_dir, 'cuda' if opts.nproc_per_node or torch.cuda.is_available() else 'cpu')
    else:
        pre_args = []
    argv = pre_args + user_args
    cmd = launch + ['-m', 'timm_gsop.train'] + argv
    if opts.dry_run:
        print(shlex.join(cmd))
        return 0
    env = _start('train', argv, opts.nproc_per_node)
    from .resume import continue_run  # refused or finished: before any process starts
    processes = int(opts.nproc_per_node or 1) * int(opts.nnodes or 1)
    if continue_run(env[SCRIPT_ENV['train.py']], argv, world_size=processes, check_only=True) is None:
        report(argv)
        return 0
    if demo_dir:
        from .demo_data import make_demo_dataset
        print(f'timm-gsop train: demo: writing/reusing the generated shapes dataset at {demo_dir}', file=sys.stderr)
        try:
            make_demo_dataset(demo_dir)
        except ValueError as e:  # a folder it did not make
            raise LaunchError(f'demo: {e} (TIMM_GSOP_DEMO_DIR)')
    _announce('train', cmd)
    returncode = _run(cmd, env)
    if returncode == 0:
        report(argv)
    return returncode


def report(argv: List[str]) -> None:
    """Where the run went, when train.py's --experiment names its folder: the best checkpoint, its top-1 and the
    commands that validate and export it."""
    experiment = option_value(argv, '--experiment')
    if not experiment:
        return
    out = os.path.abspath(os.path.join(option_value(argv, '--output') or os.path.join('output', 'train'), experiment))
    summary = os.path.join(out, 'summary.csv')
    if not os.path.isfile(summary):
        print(f'timm-gsop train: no {summary}: nothing to report', file=sys.stderr)
        return
    rows = []
    with open(summary, newline='') as f:
        for row in csv.DictReader(f):  # rows without a number (a header repeated, a line cut short) say nothing
            try:
                rows.append(dict(row, eval_top1=float(row.get('eval_top1'))))
            except (TypeError, ValueError):
                continue
    checkpoint = os.path.join(out, 'model_best.pth.tar')
    saved = os.path.isfile(checkpoint)
    print(f'\nCheckpoint: {checkpoint if saved else "(none saved)"}')
    if rows:
        best = max(rows, key=lambda r: r['eval_top1'])
        print(f'Validation top-1: {best["eval_top1"]:.2f}% (best, epoch {best["epoch"]}); '
              f'last epoch {rows[-1]["epoch"]}: {rows[-1]["eval_top1"]:.2f}%')
    print(f'Summary: {summary}')
    if saved:
        command = own_command()
        print(f'Validate it: {shlex.join(command + ["validate", "--checkpoint", checkpoint])}')
        print(f'Export it:   {shlex.join(command + ["export", checkpoint, os.path.join(out, "export")])}')


def run_timm_script(script: str, opts: argparse.Namespace, argv: List[str]) -> int:
    """``timm-gsop validate`` / ``benchmark``: the script in one process, validate.py with the run's settings."""
    if opts.recipe is not None:
        raise LaunchError(f'--recipe is for training (timm-gsop train), not for {script}')
    misplaced = next((o for o in TORCHRUN_OPTIONS if _launcher_option(opts, o) is not None), None)
    if misplaced:
        raise LaunchError(f'{misplaced} is for training (timm-gsop train): {script}.py runs in one process '
                          '(it has no distributed mode)')
    if opts.help_script:
        return _run([sys.executable, '-m', f'timm_gsop.{script}', '--help'])
    if script == 'validate':
        argv = run_defaults(argv) + argv
    cmd = [sys.executable, '-m', f'timm_gsop.{script}'] + argv
    if opts.dry_run:
        print(shlex.join(cmd))
        return 0
    env = _start(script, argv)
    _announce(script, cmd)
    return _run(cmd, env)
