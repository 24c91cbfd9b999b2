"""``timm-gsop train | validate | benchmark`` (through train_timm.sh, the checkout's wrapper of it) and
timm_gsop.launcher.timm_scripts, without timm's train.py and without the network.

The launcher is run with ``--dry-run`` (it prints the command it would run) or with fake scripts that print their
arguments; finding train.py is tested with a temporary cache and a clone URL that cannot work.
"""
import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm

from timm_gsop import cli
from timm_gsop.launcher import launch, recipes
from timm_gsop.launcher.timm_scripts import (
    LaunchError, TimmScriptNotFound, check_args, checkout_dir, find_script, run_defaults, timm_git_ref)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'train_timm.sh'
_ENV_VARS = ('TIMM_TRAIN_PY', 'TIMM_VALIDATE_PY', 'TIMM_BENCHMARK_PY', 'TIMM_GSOP_CACHE_DIR', 'TIMM_GSOP_TIMM_REPO',
             'TIMM_GSOP_DEMO_DIR')


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No TIMM_*_PY, an empty cache, and a clone that fails at once (a local path that is not a repo)."""
    for var in _ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / 'cache'
    monkeypatch.setenv('TIMM_GSOP_CACHE_DIR', str(cache))
    monkeypatch.setenv('TIMM_GSOP_TIMM_REPO', str(tmp_path / 'no-such-repo'))
    return cache


def run_sh(*args, env=None, cwd=None):
    env = dict(os.environ if env is None else env, PYTHON=sys.executable)
    return subprocess.run(
        ['bash', str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def run_cli(*argv, env=None, cwd=None):
    """``timm-gsop ARGV`` in this process (a dry run or a refusal starts no script): a CompletedProcess."""
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd or saved_cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                returncode = cli.main(list(argv))
            except SystemExit as e:  # argparse
                returncode = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(argv, returncode, out.getvalue(), err.getvalue())


def dry_run(*args, command='train', **kwargs):
    proc = run_cli(command, '--dry-run', *args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def train_args(cmd):
    """The arguments that go to train.py: what follows ``-m timm_gsop.train``."""
    i = cmd.index('timm_gsop.train')
    assert cmd[i - 1] == '-m'
    return cmd[i + 1:]


def test_user_args_pass_through_unchanged(tmp_path):
    user = ['--data-dir', str(tmp_path / 'my data'), '--model', 'gsop2_resnet101',
            '--model-kwargs', 'attn_mode=fusion_max', 'attn_dim=64', '--experiment=a b "c"', '--amp']
    cmd = dry_run(*user[:4], '--dry-run', *user[4:])  # own options may sit anywhere
    assert cmd[:3] == [sys.executable, '-m', 'timm_gsop.train']
    assert train_args(cmd) == user
    proc = run_sh(*user[:4], '--dry-run', *user[4:])  # the same through the checkout's wrapper
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert cmd[:3] == [sys.executable, '-m', 'timm_gsop.train']
    assert train_args(cmd) == user


def test_recipe_first_then_user_args_win(tmp_path):
    cmd = dry_run('--recipe', 'paper-net1', '--data-dir', str(tmp_path), '--epochs', '3', '--model', 'gsop2_resnet101')
    args = train_args(cmd)
    rec = recipes.recipe_args('paper-net1')
    assert args == rec + ['--data-dir', str(tmp_path), '--epochs', '3', '--model', 'gsop2_resnet101']
    # argparse (train.py's parser) keeps the last occurrence: the user's values.
    parser = argparse.ArgumentParser()
    parser.add_argument('--epochs', type=int)
    parser.add_argument('--model')
    parsed, _ = parser.parse_known_args(args)
    assert (parsed.epochs, parsed.model) == (3, 'gsop2_resnet101')


def test_recipes_are_what_the_paper_and_brief_say():
    def value(args, opt, n=1):
        i = len(args) - 1 - args[::-1].index(opt)
        return args[i + 1:i + 1 + n]

    net1, net2, cifar = (recipes.recipe_args(n) for n in ('paper-net1', 'paper-net2', 'cifar100'))
    assert value(net1, '--epochs') == ['95'] and value(net1, '--decay-milestones', 3) == ['30', '60', '90']
    assert value(net2, '--epochs') == ['65'] and value(net2, '--decay-milestones', 3) == ['30', '45', '60']
    for r in (net1, net2):
        assert value(r, '--opt') == ['sgd'] and value(r, '--momentum') == ['0.9']
        assert value(r, '--lr-base') == ['0.1'] and value(r, '--lr-base-size') == ['256']
        assert value(r, '--weight-decay') == ['1e-4'] and value(r, '--batch-size') == ['256']
        assert value(r, '--color-jitter') == ['0'] and value(r, '--smoothing') == ['0'] and '--aa' not in r
    assert value(cifar, '--dataset') == ['torch/cifar100'] and '--dataset-download' in cifar
    assert value(cifar, '--epochs') == ['164'] and value(cifar, '--decay-milestones', 2) == ['81', '122']
    assert value(cifar, '--lr') == ['0.1'] and value(cifar, '--batch-size') == ['128']
    assert value(cifar, '--img-size') == ['32'] and value(cifar, '--model')[0].endswith('_cifar')
    a3 = recipes.recipe_args('rsb-a3')
    assert value(a3, '--opt') == ['lamb'] and value(a3, '--sched') == ['cosine'] and '--model-ema' in a3


def test_unknown_recipe_lists_recipes(tmp_path):
    proc = run_cli('train', '--dry-run', '--recipe', 'paper-net3', '--data-dir', str(tmp_path))
    assert proc.returncode != 0 and proc.stdout == ''
    assert "Unknown recipe 'paper-net3'" in proc.stderr
    for name in recipes.recipe_names():
        assert name in proc.stderr


def test_recipe_without_dataset_is_refused():
    proc = run_cli('train', '--dry-run', '--recipe', 'paper-net2')
    assert proc.returncode != 0 and '--data-dir' in proc.stderr


def test_torchrun_single_node(tmp_path):
    cmd = dry_run('--nproc-per-node', '8', '--recipe', 'paper-net2', '--data-dir', str(tmp_path), '--batch-size', '32')
    i = cmd.index('-m')
    assert cmd[:i + 2] == [sys.executable, '-m', 'torch.distributed.run']
    launcher = cmd[i + 2:cmd.index('timm_gsop.train') - 1]
    assert launcher == ['--nproc-per-node', '8', '--standalone']
    assert train_args(cmd)[-4:] == ['--data-dir', str(tmp_path), '--batch-size', '32']
    cmd = dry_run('--nproc-per-node', '8', '--max-restarts', '3', '--data-dir', str(tmp_path))
    assert cmd[cmd.index('torch.distributed.run') + 1:cmd.index('timm_gsop.train') - 1] == [
        '--nproc-per-node', '8', '--max-restarts', '3', '--standalone']
    for bad, message in ((['--nproc-per-node', '8', '--max-restarts', 'x'], '--max-restarts must be an integer'),
                         (['--max-restarts', '3'], 'need --nproc-per-node')):
        proc = run_cli('train', '--dry-run', *bad, '--data-dir', str(tmp_path))
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_torchrun_multi_node(tmp_path):
    cmd = dry_run('--nproc-per-node=8', '--nnodes', '2', '--node-rank', '1', '--rdzv-endpoint', 'node0:29500',
                  '--data-dir', str(tmp_path))
    launcher = cmd[cmd.index('torch.distributed.run') + 1:cmd.index('timm_gsop.train') - 1]
    assert launcher == ['--nproc-per-node', '8', '--nnodes', '2', '--node-rank', '1', '--rdzv-endpoint', 'node0:29500']
    assert train_args(cmd) == ['--data-dir', str(tmp_path)]
    proc = run_cli('train', '--dry-run', '--nproc-per-node', '8', '--nnodes', '2', '--node-rank', '0',
                   '--data-dir', str(tmp_path))
    assert proc.returncode != 0 and '--rdzv-endpoint' in proc.stderr


def test_demo_dry_run_writes_nothing(tmp_path, monkeypatch):
    import torch
    demo_dir = tmp_path / 'demo'
    env = dict(os.environ, TIMM_GSOP_DEMO_DIR=str(demo_dir))
    args = train_args(dry_run('--epochs', '1', env=env, cwd=tmp_path))
    assert args[args.index('--data-dir') + 1] == str(demo_dir)
    assert args[args.index('--device') + 1] == ('cuda' if torch.cuda.is_available() else 'cpu')
    assert args[-2:] == ['--epochs', '1'] and args.count('--epochs') == 2  # the user's comes last
    assert args[args.index('--output') + 1] == str(tmp_path / 'output' / 'train')
    assert not demo_dir.exists() and not (tmp_path / 'output').exists()


def test_help_documents_own_options():
    proc = run_sh('--help')
    assert proc.returncode == 0
    for opt in ('--recipe', '--nproc-per-node', '--nnodes', '--node-rank', '--rdzv-endpoint', '--dry-run',
                '--help-train', '--validate', '--benchmark', 'TIMM_TRAIN_PY', 'TIMM_BENCHMARK_PY', *recipes.recipe_names()):
        assert opt in proc.stdout


def test_not_found_message(offline, tmp_path):
    with pytest.raises(TimmScriptNotFound) as e:
        find_script('train.py')
    msg = str(e.value)
    assert 'export TIMM_TRAIN_PY=' in msg and 'git clone --depth 1 --branch' in msg
    assert str(checkout_dir()) in msg and 'no-such-repo' in msg  # where it looked, why the fetch failed
    assert not offline.exists() or not any(offline.iterdir())  # no half checkout left behind


def test_not_found_without_git(offline, tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path / 'empty-bin'))
    with pytest.raises(TimmScriptNotFound, match='git is not installed') as e:
        find_script('validate.py')
    assert 'export TIMM_VALIDATE_PY=' in str(e.value)


def test_script_stops_with_the_message_when_offline(offline, tmp_path):
    demo_dir = tmp_path / 'demo'
    proc = run_cli('train', '--epochs', '1', env=dict(os.environ, TIMM_GSOP_DEMO_DIR=str(demo_dir)), cwd=tmp_path)
    assert proc.returncode == 2
    assert 'export TIMM_TRAIN_PY=' in proc.stderr
    assert not demo_dir.exists()  # stopped before doing any work


def test_lookup_order(offline, tmp_path, monkeypatch):
    cached = Path(checkout_dir())
    cached.mkdir(parents=True)
    (cached / 'train.py').write_text('')
    (cached / 'validate.py').write_text('')
    assert find_script('train.py') == str(cached / 'train.py')  # the cache, no clone needed

    own = tmp_path / 'own'
    own.mkdir()
    (own / 'train.py').write_text('')
    (own / 'validate.py').write_text('')
    monkeypatch.setenv('TIMM_TRAIN_PY', str(own / 'train.py'))
    assert find_script('train.py') == str(own / 'train.py')  # the variable wins
    assert find_script('validate.py') == str(own / 'validate.py')  # ... and validate.py sits beside it
    monkeypatch.setenv('TIMM_TRAIN_PY', str(own / 'missing.py'))
    with pytest.raises(TimmScriptNotFound, match='TIMM_TRAIN_PY'):
        find_script('train.py')


def test_git_ref():
    assert timm_git_ref('1.0.31') == 'v1.0.31'
    assert timm_git_ref('1.0.29.dev0') == 'main'  # no tag for a development build
    assert checkout_dir('v1.0.31').endswith('pytorch-image-models-v1.0.31')


def _fake_script(path):
    path.write_text(
        'import json, sys, timm\n'
        'if __name__ == "__main__":\n'
        '    print(json.dumps(dict(argv=sys.argv, gsop="gsop2_resnet50" in timm.list_models("gsop*"))))\n')
    return path


@pytest.mark.parametrize('script', ['train', 'validate', 'benchmark'])
def test_module_runs_script_as_main_with_models_registered(tmp_path, script):
    fake = _fake_script(tmp_path / f'{script}.py')
    env = dict(os.environ, **{f'TIMM_{script.upper()}_PY': str(fake)})
    proc = subprocess.run(
        [sys.executable, '-m', f'timm_gsop.{script}', '--model', 'resnet50', '--x=1 2'],  # not checked: not gsop*
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == dict(argv=[str(fake), '--model', 'resnet50', '--x=1 2'], gsop=True)


@pytest.mark.parametrize('option', ['--nproc-per-node', '--nnodes', '--node-rank', '--rdzv-endpoint', '--recipe'])
def test_empty_option_values_are_refused(tmp_path, option):
    for args in ([option, ''], [f'{option}=']):
        proc = run_cli('train', '--dry-run', *args, '--data-dir', str(tmp_path))
        assert proc.returncode == 2 and proc.stdout == ''
        assert f'{option} needs a value, got an empty one' in proc.stderr


def test_validate_names_its_own_variable(offline, tmp_path):
    own = tmp_path / 'own'
    own.mkdir()
    (own / 'train.py').write_text('')  # a train.py with no validate.py beside it
    env = dict(os.environ, TIMM_TRAIN_PY=str(own / 'train.py'))
    proc = run_cli('validate', '--model', 'gsop_resnet50', env=env)
    assert proc.returncode == 2
    assert 'TIMM_VALIDATE_PY is not set and there is no validate.py beside TIMM_TRAIN_PY' in proc.stderr
    assert 'TIMM_TRAIN_PY is set to' not in proc.stderr


@pytest.mark.parametrize('args, message', [
    (['--nnodes', 'abc'], "--nnodes must be a positive integer, got 'abc'"),
    (['--nproc-per-node', '0'], "--nproc-per-node must be a positive integer, got '0'"),
    (['--nnodes', '2', '--node-rank', '-7'], "--node-rank must be 0 .. --nnodes - 1 (2), got '-7'"),
    (['--nnodes', '2', '--node-rank', '2'], "--node-rank must be 0 .. --nnodes - 1 (2), got '2'"),
    (['--node-rank', 'x'], "--node-rank must be 0 .. --nnodes - 1 (no --nnodes given), got 'x'"),
    (['--nnodes', '2', '--node-rank', '0', '--rdzv-backend', 'foo'],
     "--rdzv-backend must be one of static, c10d, etcd, etcd-v2 (torchrun's), got 'foo'"),
])
def test_bad_torchrun_values_are_refused(tmp_path, args, message):
    proc = run_cli('train', '--dry-run', '--nproc-per-node', '2', '--rdzv-endpoint', 'h:1', *args,
                   '--data-dir', str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.strip() == f'timm-gsop train: error: {message}'


def test_ddp_without_gpus_is_refused_before_torchrun(offline, tmp_path):
    import torch
    if torch.cuda.device_count() >= 2:
        pytest.skip('this machine has the GPUs')
    proc = run_cli('train', '--nproc-per-node', '2', '--data-dir', str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ''
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f'timm-gsop train: error: --nproc-per-node 2 needs 2 GPUs on this node, found {torch.cuda.device_count()}')
    assert not offline.exists()  # refused before train.py was looked for


def test_benchmark_mode(tmp_path):
    cmd = dry_run('--model', 'gsop_resnet50', '--bench', 'inference', command='benchmark')
    assert cmd == [sys.executable, '-m', 'timm_gsop.benchmark', '--model', 'gsop_resnet50', '--bench', 'inference']
    proc = run_sh('--dry-run', '--benchmark', '--recipe', 'paper-net1')  # the wrapper's --benchmark
    assert proc.returncode == 2 and proc.stderr.strip() == (
        'timm-gsop benchmark: error: --recipe is for training (timm-gsop train), not for benchmark')
    own = tmp_path / 'own'
    own.mkdir()
    (own / 'train.py').write_text('')
    fake = _fake_script(own / 'benchmark.py')  # found beside TIMM_TRAIN_PY
    env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS}  # a TIMM_BENCHMARK_PY of the caller's would win
    proc = run_sh('--benchmark', '--model', 'gsop_resnet50', env=dict(env, TIMM_TRAIN_PY=str(own / 'train.py')))
    assert proc.returncode == 0, proc.stderr
    assert '"gsop": true' in proc.stdout and str(fake) in proc.stdout


# --- validate.py with a run's args.yaml, and the checkpoint checked against the flags -------------------------

def _run_folder(tmp_path, **run_args):
    """A training run's folder: a 10-class gsop_resnet50 with one block per stage, and its args.yaml."""
    import timm
    import torch
    import yaml
    import timm_gsop  # noqa: F401
    run = tmp_path / 'run'
    run.mkdir()
    model = timm.create_model('gsop_resnet50', layers=(1, 1, 1, 1), num_classes=10)
    torch.save({'epoch': 3, 'state_dict': model.state_dict()}, run / 'model_best.pth.tar')
    args = dict(model='gsop_resnet50', model_kwargs={'layers': [1, 1, 1, 1], 'attn_mode': 'channel'},
                num_classes=10, img_size=64, input_size=None, crop_pct=1.0, mean=[0.5, 0.4, 0.3], std=None,
                interpolation='', device='cpu', data_dir=str(tmp_path / 'data'), dataset='', val_split='validation',
                model_ema=True, no_prefetcher=False, epochs=5, workers=1)
    args.update(run_args)
    (run / 'args.yaml').write_text(yaml.safe_dump(args))
    return run


def test_validate_takes_the_run_settings_from_args_yaml(tmp_path):
    run = _run_folder(tmp_path)
    fake = _fake_script(tmp_path / 'validate.py')
    env = dict(os.environ, TIMM_VALIDATE_PY=str(fake))
    proc = run_sh('--validate', '--checkpoint', str(run / 'model_best.pth.tar'), '--crop-pct', '0.9', env=env)
    assert proc.returncode == 0, proc.stderr
    import json
    argv = json.loads(proc.stdout.strip().splitlines()[-1])['argv'][1:]
    assert argv == [
        '--model', 'gsop_resnet50', '--model-kwargs', 'attn_mode=channel', 'layers=[1, 1, 1, 1]',
        '--num-classes', '10', '--img-size', '64', '--mean', '0.5', '0.4', '0.3', '--device', 'cpu',
        '--data-dir', str(tmp_path / 'data'), '--split', 'validation', '--use-ema', '--workers', '1',
        '--checkpoint', str(run / 'model_best.pth.tar'), '--crop-pct', '0.9']  # the user's crop wins
    assert f'from {run / "args.yaml"}' in proc.stderr
    # the user's --input-size stands for the run's --img-size too
    assert '--img-size' not in run_defaults(['--checkpoint', str(run / 'model_best.pth.tar'), '--input-size', '3', '9', '9'])
    assert run_defaults(['--checkpoint', str(tmp_path / 'elsewhere' / 'x.pth')]) == []  # no args.yaml: nothing


@pytest.mark.parametrize('content', ['- a list', 'model: [unclosed', b'\xff\xfe'])
def test_unreadable_args_yaml_is_one_line(tmp_path, content):
    run = _run_folder(tmp_path)
    (run / 'args.yaml').write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LaunchError, match='args.yaml') as e:
        run_defaults(['--checkpoint', str(run / 'model_best.pth.tar')])
    assert '\n' not in str(e.value)


def test_checkpoint_mismatch_speaks_in_launcher_flags(tmp_path):
    ckpt = str(_run_folder(tmp_path) / 'model_best.pth.tar')
    check_args('validate.py', ['--model', 'gsop_resnet50', '--model-kwargs', 'layers=(1,1,1,1)',
                                     '--num-classes', '10', '--checkpoint', ckpt])  # fits: no error
    with pytest.raises(LaunchError) as e:
        check_args('validate.py', ['--model', 'gsop_resnet50', '--checkpoint', ckpt])
    msg = str(e.value)
    assert '--model-kwargs' in msg and 'layers=' in msg and 'timm.create_model(' not in msg
    with pytest.raises(LaunchError) as e:
        check_args('train.py', ['--model', 'gsop_resnet50', '--num-classes', '10', '--resume', ckpt])
    assert '--model-kwargs' in str(e.value)


def test_fine_tuning_with_initial_checkpoint_names_pretrained_path(tmp_path):
    ckpt = str(_run_folder(tmp_path) / 'model_best.pth.tar')
    with pytest.raises(LaunchError) as e:
        check_args('train.py', ['--model', 'gsop_resnet50', '--model-kwargs', 'layers=(1,1,1,1)',
                                '--num-classes', '3', '--initial-checkpoint', ckpt])
    message = str(e.value)
    assert '--num-classes 10' in message  # to keep its classifier
    assert f'in place of --initial-checkpoint: --pretrained --pretrained-path {ckpt}' in message  # to fine-tune
    assert '--num-classes 3' in message and 'timm.create_model(' not in message
    for option in ('--checkpoint', '--resume'):  # these continue or score the run: no fine-tuning advice
        with pytest.raises(LaunchError) as e:
            check_args('validate.py' if option == '--checkpoint' else 'train.py',
                       ['--model', 'gsop_resnet50', '--model-kwargs', 'layers=(1,1,1,1)', '--num-classes', '3',
                        option, ckpt])
        assert '--num-classes 10' in str(e.value) and 'fine-tune' not in str(e.value)


@pytest.mark.parametrize('script', ['train.py', 'validate.py', 'benchmark.py'])
def test_launcher_refuses_what_the_script_would_refuse_with_a_traceback(tmp_path, script):
    def refused(*argv):
        with pytest.raises(LaunchError) as e:
            check_args(script, list(argv))
        assert '\n' not in str(e.value)
        return str(e.value)

    assert refused('--model', 'gsop_resnet5') == (
        "unknown model 'gsop_resnet5'; the GSoP-Net models: " + ', '.join(timm.list_models('gsop*')))
    assert "attn_mode='none'" in refused('--model', 'gsop_resnet50', '--model-kwargs', 'attn_mode=None')
    assert refused('--model', 'gsop_resnet50', '--model-kwargs', 'attn_mode=chanel').startswith(
        "--model gsop_resnet50 with these options: ValueError: ")
    check_args(script, ['--model', 'resnet5'])  # another family: the script's own error
    ablation = ['--model', 'gsop_resnet50', '--model-kwargs', 'attn_mode=none']
    if script == 'validate.py':  # without --checkpoint validate.py asks for published weights: GSoP has none
        assert refused(*ablation).startswith('no pretrained weights are published for gsop_resnet50: give --checkpoint')
    else:
        check_args(script, ablation)  # the ablation builds
    if script == 'train.py':
        assert '--pretrained-path FILE' in refused(*ablation, '--pretrained')
        check_args(script, ablation + ['--pretrained', '--pretrained-path', 'ck.pth'])  # a file: timm loads it
    if script != 'benchmark.py':
        option = '--checkpoint' if script == 'validate.py' else '--resume'
        missing = tmp_path / 'model_bset.pth.tar'
        assert refused('--model', 'gsop_resnet50', option, str(missing)) == (
            f'cannot read checkpoint {missing}: No such file or directory')


def test_launcher_refuses_a_mismatch_before_the_script_runs(tmp_path):
    run = _run_folder(tmp_path, model_kwargs={})  # args.yaml without the run's layers
    fake = _fake_script(tmp_path / 'validate.py')
    proc = run_cli('validate', '--checkpoint', str(run / 'model_best.pth.tar'),
                  env=dict(os.environ, TIMM_VALIDATE_PY=str(fake)))
    assert proc.returncode == 2 and proc.stdout == ''  # validate.py never ran
    assert f'timm-gsop validate: error: {run / "model_best.pth.tar"}: ' in proc.stderr and '--model-kwargs' in proc.stderr


def test_demo_never_replaces_a_folder_it_did_not_make(tmp_path):
    own = tmp_path / 'photos'
    own.mkdir()
    (own / 'holiday.jpg').write_bytes(b'mine')
    proc = subprocess.run([sys.executable, '-m', 'timm_gsop.launcher.demo_data', str(own), '--train-per-class', '1',
                           '--val-per-class', '1', '--num-classes', '1'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f'demo_data: {own} is not empty and holds no demo set')
    assert [p.name for p in own.iterdir()] == ['holiday.jpg']
    demo = tmp_path / 'demo'
    for n in (1, 2):  # a demo set with other arguments is replaced
        proc = subprocess.run([sys.executable, '-m', 'timm_gsop.launcher.demo_data', str(demo), '--train-per-class', '1',
                               '--val-per-class', '1', '--num-classes', str(n)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert len(list((demo / 'train').iterdir())) == n


@pytest.mark.parametrize('content', [b'', b'hello\n'])
def test_unreadable_checkpoint_is_one_line(tmp_path, content):
    ckpt = tmp_path / 'broken.pth.tar'
    ckpt.write_bytes(content)
    with pytest.raises(LaunchError) as e:
        check_args('train.py', ['--model', 'gsop_resnet50', '--resume', str(ckpt)])
    message = str(e.value)
    assert message.startswith(f'cannot read checkpoint {ckpt}: ') and message.count(str(ckpt)) == 1
    assert 'The file is corrupted or truncated' in message and '\n' not in message
    import torch
    torch.save({'state_dict': {'fc.weight': 1.0}}, ckpt)  # a file, but no state dict
    no_state_dict = f"^{re.escape(str(ckpt))}: the checkpoint holds no state dict: .*'fc.weight'"
    with pytest.raises(LaunchError, match=no_state_dict):
        check_args('train.py', ['--model', 'gsop_resnet50', '--resume', str(ckpt)])
    with pytest.raises(LaunchError, match="^--model gsop_resnet50 with these options: ValueError: .*'channel'"):
        check_args('validate.py', ['--model', 'gsop_resnet50', '--model-kwargs', 'attn_mode=foo',
                                         '--checkpoint', str(_run_folder(tmp_path) / 'model_best.pth.tar')])


@pytest.mark.parametrize('bad', ['nan', 'float64 1e300'])
def test_launcher_refuses_non_finite_weights_before_the_script_runs(tmp_path, bad):
    import torch
    run = _run_folder(tmp_path)
    ckpt = run / 'model_best.pth.tar'
    state_dict = torch.load(ckpt)['state_dict']
    state_dict['fc.bias'] = (state_dict['fc.bias'].double() * 1e300 if bad != 'nan'
                             else torch.full_like(state_dict['fc.bias'], float('nan')))
    torch.save({'state_dict': state_dict}, ckpt)
    with pytest.raises(LaunchError, match=f'^{re.escape(str(ckpt))}: The checkpoint holds non-finite values') as e:
        check_args('validate.py', ['--model', 'gsop_resnet50', '--model-kwargs', 'layers=(1,1,1,1)',
                                         '--num-classes', '10', '--checkpoint', str(ckpt)])
    assert 'fc.bias' in str(e.value)


# --- after training: the report and the commands it prints -------------------------------------------------------

_FAKE_TRAIN = '''
import argparse, os, yaml
if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for option in ("--output", "--experiment", "--model"):
        parser.add_argument(option)
    args, _ = parser.parse_known_args()
    out = os.path.join(args.output or "./output/train", args.experiment)  # as train.py names it
    os.makedirs(out)
    with open(os.path.join(out, "summary.csv"), "w") as f:
        f.write("epoch,train_loss,eval_top1\\n0,2.0,40.0\\n1,1.5,62.5\\n2,1.4,60.0\\n")
    open(os.path.join(out, "model_best.pth.tar"), "w").close()
    with open(os.path.join(out, "args.yaml"), "w") as f:
        yaml.safe_dump(dict(model=args.model, device="cpu", workers=1), f)
'''


def test_report_prints_commands_that_work(tmp_path):
    """A run through the checkout's wrapper (another cwd): its report's validate command runs validate.py."""
    (tmp_path / 'train.py').write_text(_FAKE_TRAIN)
    fake_validate = _fake_script(tmp_path / 'validate.py')
    env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS}
    env.update(TIMM_TRAIN_PY=str(tmp_path / 'train.py'), TIMM_VALIDATE_PY=str(fake_validate))
    cwd = tmp_path / 'elsewhere'
    cwd.mkdir()
    proc = run_sh('--data-dir', 'data', '--model', 'resnet18', '--experiment', 'run 1', env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    run = cwd / 'output' / 'train' / 'run 1'  # train.py's default --output, from the cwd
    lines = dict(line.split(': ', 1) for line in proc.stdout.strip().splitlines())
    assert lines['Checkpoint'] == str(run / 'model_best.pth.tar')
    assert lines['Validation top-1'] == '62.50% (best, epoch 1); last epoch 2: 60.00%'
    validate = shlex.split(lines['Validate it'])
    assert validate == [str(SCRIPT), 'validate', '--checkpoint', str(run / 'model_best.pth.tar')]
    assert shlex.split(lines['Export it'].strip()) == [
        str(SCRIPT), 'export', str(run / 'model_best.pth.tar'), str(run / 'export')]
    proc = subprocess.run(validate, env=dict(env, PYTHON=sys.executable), cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # the user's shell: this venv's python
    assert proc.returncode == 0, proc.stderr
    import json
    argv = json.loads(proc.stdout.strip().splitlines()[-1])['argv'][1:]
    assert argv == ['--model', 'resnet18', '--device', 'cpu', '--workers', '1',
                    '--checkpoint', str(run / 'model_best.pth.tar')]  # the run's settings from its args.yaml


def test_printed_commands_name_what_the_user_ran(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_GSOP_LAUNCHER', str(ROOT / 'train_timm.sh'))
    monkeypatch.chdir(ROOT)
    assert launch.own_command() == ['./train_timm.sh']  # as the README runs it
    monkeypatch.chdir(tmp_path)
    assert launch.own_command() == [str(ROOT / 'train_timm.sh')]
    monkeypatch.delenv('TIMM_GSOP_LAUNCHER')
    console_script = shutil.which('timm-gsop', path=os.path.dirname(sys.executable))
    if console_script is None:
        pytest.skip('this install has no timm-gsop console script beside its interpreter')
    monkeypatch.setenv('PATH', os.path.dirname(console_script))
    assert launch.own_command() == ['timm-gsop']  # an activated venv
    monkeypatch.setenv('PATH', str(tmp_path))
    assert launch.own_command() == [console_script]  # a venv that is not on PATH
