"""The wheel alone: built from this checkout, installed into a new venv, run from an empty folder.

The new venv gets torch, timm and the other dependencies from this suite's environment through a path line (a
``.pth`` in its site-packages), not by installing them again (minutes and gigabytes). That line makes the
suite's site-packages importable but not a site directory, so the ``.pth`` hooks there (this checkout's editable
install among them) do not run: ``timm_gsop`` and ``timm-gsop`` come from the wheel, which the tests check, and
nothing reads the checkout. What this does not test is pip resolving the wheel's dependencies.
"""
import json
import os
import shlex
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from timm_gsop.launcher.recipes import recipe_args
from timm_gsop.launcher.timm_scripts import SCRIPT_ENV, TimmScriptNotFound, find_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def wheel_venv(tmp_path_factory):
    """(venv, wheel, env, an empty working folder): the built wheel installed in a venv that is on PATH."""
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'  # what the wheel is built from, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / 'timm_gsop', src / 'timm_gsop', ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run(pip + ['wheel', '--no-deps', '--no-build-isolation', '--no-index', '-w', str(tmp / 'dist'),
                          str(src)], check=True, timeout=300)
    wheel, = (tmp / 'dist').glob('timm_gsop-*.whl')
    venv = tmp / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    subprocess.run(pip + ['--python', str(python), 'install', '--no-deps', '--no-index', str(wheel)], check=True,
                   timeout=300)
    venv_site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                               check=True, capture_output=True, text=True).stdout.strip()
    Path(venv_site, 'suite_dependencies.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    work = tmp / 'work'
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHONPATH', 'PYTHONHOME', 'TIMM_GSOP_LAUNCHER', 'TIMM_GSOP_DEMO_DIR', *SCRIPT_ENV.values())}
    env.update(PATH=f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}', VIRTUAL_ENV=str(venv),  # as `activate`
               TIMM_GSOP_CACHE_DIR=str(tmp / 'cache'), OMP_NUM_THREADS='2')
    return venv, wheel, env, work


def _run(cmd, env, cwd, timeout=300):
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{shlex.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


def test_wheel_holds_the_package_only_and_its_command_runs_without_the_checkout(wheel_venv):
    venv, wheel, env, work = wheel_venv
    tops = {name.split('/')[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {'timm_gsop', wheel.name.split('-py')[0] + '.dist-info'}  # no second package
    where = _run(['python', '-c', 'import timm_gsop, timm_gsop.launcher.launch; print(timm_gsop.__file__)'], env, work)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    assert shutil.which('timm-gsop', path=env['PATH']) == str(venv / 'bin' / 'timm-gsop')
    out = _run(['timm-gsop', '--help'], env, work).stdout
    assert all(command in out for command in ('train', 'validate', 'benchmark', 'export', 'push'))

    # the torchrun command, without train.py (none is set, none is cached)
    proc = _run(['timm-gsop', 'train', '--recipe', 'paper-net1', '--data-dir', 'D', '--nproc-per-node', '8',
                 '--dry-run'], env, work)
    cmd = shlex.split(proc.stdout)
    assert cmd == [str(venv / 'bin' / 'python'), '-m', 'torch.distributed.run', '--nproc-per-node', '8',
                   '--standalone', '-m', 'timm_gsop.train', *recipe_args('paper-net1'), '--data-dir', 'D']
    assert not list(work.iterdir())  # a dry run writes nothing


def test_wheel_trains_the_demo_and_its_printed_commands_work(wheel_venv):
    try:
        scripts = {var: find_script(name, fetch=False) for name, var in SCRIPT_ENV.items()}
    except TimmScriptNotFound as e:
        pytest.skip(f"timm's scripts are not available (set TIMM_TRAIN_PY to run this test): {e}".splitlines()[0])
    venv, wheel, env, work = wheel_venv
    env = dict(env, **scripts)
    proc = _run(['timm-gsop', 'train', '--epochs', '1', '--warmup-epochs', '0'], env, work, timeout=900)
    lines = dict(line.split(': ', 1) for line in proc.stdout.splitlines() if ': ' in line and line[0].isupper())
    checkpoint = Path(lines['Checkpoint'])
    assert checkpoint.is_file() and checkpoint.is_relative_to(work / 'output' / 'train')
    top1 = lines['Validation top-1'].split('%')[0]

    validate = shlex.split(lines['Validate it'])
    assert validate[:3] == ['timm-gsop', 'validate', '--checkpoint']  # the venv is on PATH
    result = json.loads(_run(validate, env, work).stdout.split('--result\n')[-1])
    assert f"{result['top1']:.2f}" == top1  # the run's own settings, from its args.yaml

    export = shlex.split(lines['Export it'].strip())
    assert export[:2] == ['timm-gsop', 'export']
    folder = Path(_run(export, env, work).stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith('.')) == [
        'README.md', 'config.json', 'model.safetensors']
