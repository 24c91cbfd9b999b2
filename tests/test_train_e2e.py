"""End to end with timm's real train.py: GSoP-Net2 with a fusion mode and EMA, 2 epochs on CPU, then the
user's next steps (validate.py with only --checkpoint; fine-tuning to other classes), and an export.

train.py is found as ``timm-gsop train`` finds it (TIMM_TRAIN_PY, or the checkout cached at the
installed timm version's tag) but never fetched: without it these tests skip.
"""
import csv
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from timm_gsop.launcher.demo_data import make_demo_dataset
from timm_gsop.launcher.recipes import RECIPES
from timm_gsop.launcher.timm_scripts import TimmScriptNotFound, find_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_py():
    try:
        return find_script('train.py', fetch=False)
    except TimmScriptNotFound as e:
        pytest.skip(f"timm's train.py is not available (set TIMM_TRAIN_PY to run this test): {e}".splitlines()[0])


def test_recipes_parse_with_train_py():
    """Every recipe argument is one train.py knows (argparse exits on an unknown option)."""
    parser = runpy.run_path(_train_py(), run_name='timm_train')['parser']
    for name, recipe in RECIPES.items():
        args = parser.parse_args(recipe['args'] + ['--data-dir', '/data'])
        assert args.epochs > 0, name


def test_gsop2_fusion_ema_trains_and_reloads(tmp_path):
    import timm
    import timm_gsop  # noqa: F401

    train_py = _train_py()
    data = make_demo_dataset(str(tmp_path / 'data'), train_per_class=4, val_per_class=2, num_classes=2)
    out = tmp_path / 'out'
    cmd = [
        sys.executable, '-m', 'timm_gsop.train',
        '--data-dir', data, '--model', 'gsop2_resnet50', '--model-kwargs', 'attn_mode=fusion_avg',
        '--num-classes', '2', '--img-size', '64', '--crop-pct', '1.0', '--device', 'cpu',
        '--epochs', '2', '--batch-size', '4', '--validation-batch-size', '4', '--workers', '0',
        '--opt', 'sgd', '--lr', '0.01', '--sched', 'cosine', '--warmup-epochs', '0',
        '--model-ema', '--model-ema-decay', '0.9',
        '--output', str(out), '--experiment', 'e2e', '--log-interval', '1', '--seed', '1',
    ]
    env = dict(os.environ, TIMM_TRAIN_PY=train_py, OMP_NUM_THREADS='2')
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = out / 'e2e'
    with open(run / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['epoch'] for r in rows] == ['0', '1']
    assert all(float(r['eval_top1']) >= 0 for r in rows)

    best = run / 'model_best.pth.tar'
    ckpt = torch.load(best, map_location='cpu', weights_only=False)
    assert 'state_dict_ema' in ckpt  # --model-ema saved its weights
    model = timm.create_model(
        'gsop2_resnet50', attn_mode='fusion_avg', num_classes=2, checkpoint_path=str(best)).eval()
    # create_model loads the EMA weights of a timm checkpoint: those, not the raw ones, are in the model.
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ckpt['state_dict_ema'].items())
    assert any(not torch.equal(ckpt['state_dict'][k], v) for k, v in ckpt['state_dict_ema'].items())
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 2) and torch.isfinite(y).all()

    # The checkpoint is specific to the architecture it was trained as.
    with pytest.raises(RuntimeError):
        timm.create_model('gsop2_resnet50', attn_mode='fusion_concat', num_classes=2, checkpoint_path=str(best))

    # validate.py with only the checkpoint: model, kwargs, classes, size, crop, device and EMA from args.yaml
    # give the run's own best top-1.
    proc = subprocess.run(['bash', os.path.join(ROOT, 'train_timm.sh'), '--validate', '--checkpoint', str(best),
                           '--workers', '0'], env=dict(env, PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split('--result\n')[-1])
    assert f"{result['top1']:.3f}" == f"{max(float(r['eval_top1']) for r in rows):.3f}"

    # Fine-tuning to 3 classes the way the launcher's error says: --pretrained --pretrained-path.
    cmd_ft = cmd[:cmd.index('--num-classes')] + [
        '--num-classes', '3', '--pretrained', '--pretrained-path', str(best), '--epochs', '1', '--lr', '1e-12',
        '--warmup-epochs', '0', '--img-size', '64',
        '--device', 'cpu', '--batch-size', '4', '--workers', '0', '--output', str(out), '--experiment', 'ft']
    proc = subprocess.run(cmd_ft, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tuned = torch.load(out / 'ft' / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    assert tuned['fc.weight'].shape[0] == 3
    # lr ~0 (train.py reads 0 as "not given"): the convolutions are still the checkpoint's (EMA) weights,
    # loaded through timm's pretrained path.
    convs = [k for k in ckpt['state_dict_ema'] if k.endswith('conv1.weight')]
    assert convs and all(torch.allclose(tuned[k], ckpt['state_dict_ema'][k], atol=1e-6) for k in convs)


def test_demo_run_exports_a_folder_that_reproduces_its_card(tmp_path):
    """The Hub user's path with the real train.py: a run at 64 px / crop 0.9 with its own mean and std,
    exported, then evaluated as the card's usage code does: the card's top-1 again."""
    import re
    from PIL import Image
    import timm
    from timm.data import create_transform, resolve_model_data_config
    from timm_gsop import cli

    train_py = _train_py()
    data = make_demo_dataset(str(tmp_path / 'data'), train_per_class=8, val_per_class=6, num_classes=3)
    cmd = [
        sys.executable, '-m', 'timm_gsop.train',
        '--data-dir', data, '--model', 'gsop_resnet50', '--model-kwargs', 'layers=(1,1,1,1)', 'attn_dim=32',
        '--num-classes', '3', '--img-size', '64', '--crop-pct', '0.9', '--mean', '0.5', '0.45', '0.4',
        '--std', '0.25', '0.25', '0.25', '--device', 'cpu', '--epochs', '2', '--batch-size', '8', '--workers', '0',
        '--opt', 'adamw', '--lr', '2e-3', '--warmup-epochs', '0', '--seed', '1',
        # the card's snippet transforms PIL images; without the prefetcher train.py's validation does the same
        '--no-prefetcher', '--output', str(tmp_path / 'out'), '--experiment', 'demo', '--log-interval', '1',
    ]
    env = dict(os.environ, TIMM_TRAIN_PY=train_py, OMP_NUM_THREADS='2')
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    folder = tmp_path / 'export'
    assert cli.main(['export', str(tmp_path / 'out' / 'demo' / 'model_best.pth.tar'), str(folder),
                     '--model', 'gsop_resnet50', '-q']) == 0
    card_top1 = float(re.search(r'\| this checkpoint \| \d+ \| ([\d.]+) \|', (folder / 'README.md').read_text())[1])
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    names = model.pretrained_cfg['label_names']
    files = sorted((tmp_path / 'data' / 'validation').glob('*/*.png'))
    with torch.no_grad():
        preds = model(torch.stack([transform(Image.open(f).convert('RGB')) for f in files])).argmax(-1).tolist()
    top1 = 100.0 * sum(names[p] == f.parent.name for p, f in zip(preds, files)) / len(files)
    assert f'{top1:.2f}' == f'{card_top1:.2f}'
    assert tuple(model.pretrained_cfg['input_size']) == (3, 64, 64) and model.pretrained_cfg['crop_pct'] == 0.9


def test_benchmark_runs_gsop_models():
    """timm's benchmark.py knows the GSoP models through ``python -m timm_gsop.benchmark``."""
    _train_py()
    try:
        benchmark_py = find_script('benchmark.py', fetch=False)
    except TimmScriptNotFound as e:
        pytest.skip(str(e).splitlines()[0])
    cmd = [sys.executable, '-m', 'timm_gsop.benchmark', '--model', 'gsop2_resnet50', '--model-kwargs',
           'layers=(1,1,1,1)', '--device', 'cpu', '--bench', 'train', '--batch-size', '2', '--img-size', '64',
           '--num-warm-iter', '1', '--num-bench-iter', '5', '--no-retry']
    proc = subprocess.run(cmd, env=dict(os.environ, TIMM_BENCHMARK_PY=benchmark_py, OMP_NUM_THREADS='2'),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split('--result\n')[-1])
    assert result['model'] == 'gsop2_resnet50' and result['train_samples_per_sec'] > 0
