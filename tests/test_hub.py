"""Export / load / push of GSoP-Net weights as Hugging Face Hub folders (timm_gsop.hub, timm-gsop CLI).

Small models throughout (attn_dim=16, num_classes=7, 64 px inputs). The Hub is never contacted:
the hf-hub: path runs the real huggingface_hub client against a loopback server (then from its
cache with HF_HUB_OFFLINE=1), and the push path stops at a mocked HfApi.
"""
import argparse
import email.message
import hashlib
import json
import os
import runpy
import subprocess
import sys
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import safetensors.torch
import torch

import timm
import timm_gsop  # noqa: F401  (registers the models)
from timm_gsop import cli, hub
from timm_gsop.hub import card, export

from export_helpers import FAKE_MACS, assert_publishable, batch, fast_card, logits, make_model, write_run  # noqa: F401
from official_reference import official_state_dict, save_official_checkpoint

ATTN_DIM = 16
NUM_CLASSES = 7
pytestmark = pytest.mark.usefixtures('fast_card')  # tests that need real MAC counts undo it


@pytest.fixture(scope='module')
def net1_run(tmp_path_factory):
    """A timm train.py output folder: checkpoint (weights + EMA weights + args), args.yaml, summary.csv."""
    kwargs = dict(attn_mode='position', attn_dim=ATTN_DIM, num_classes=NUM_CLASSES)
    model, ema = make_model('gsop_resnet50', 1, **kwargs), make_model('gsop_resnet50', 2, **kwargs)
    args = dict(
        model='gsop_resnet50', model_kwargs={'attn_mode': 'position', 'attn_dim': ATTN_DIM}, num_classes=NUM_CLASSES,
        epochs=3, batch_size=32, opt='sgd', lr=0.1, momentum=0.9, weight_decay=1e-4, sched='cosine',
        decay_epochs=90, decay_rate=0.1, mixup=0.0, mixup_prob=1.0, workers=8, device='cuda:0',
        model_ema=True, data_dir='/home/someone/data/imagenet', output='/home/someone/out', dataset='',
        lr_base=0.1, lr_base_size=256, kd_temperature=4.0, naflex_max_seq_len=576, clip_mode='norm',
        train_size_schedule='constant', layer_decay_min_scale=0)
    checkpoint = write_run(
        tmp_path_factory.mktemp('train') / 'gsop_resnet50-run', model, args, ema=ema, epoch=1, metric=52.5,
        summary='epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
                '0,2.5,2.4,31.25,71.5,0.1\n1,1.9,1.8,52.5,88.75,0.05\n2,1.7,1.9,50.0,87.0,0.01\n')
    return dict(checkpoint=checkpoint, logits=logits(ema), logits_not_ema=logits(model))


@pytest.fixture(scope='module')
def net2_checkpoint(tmp_path_factory):
    """gsop2_resnet50 (fusion_concat) weights in a bare {'state_dict'} checkpoint (no args, no EMA)."""
    root = tmp_path_factory.mktemp('net2')
    model = make_model('gsop2_resnet50', 3, attn_mode='fusion_concat', attn_dim=ATTN_DIM, num_classes=NUM_CLASSES)
    torch.save({'state_dict': model.state_dict()}, root / 'last.pth.tar')
    return dict(root=root, checkpoint=root / 'last.pth.tar', logits=logits(model))


@pytest.fixture(scope='module')
def net2_export(net2_checkpoint):
    """net2_checkpoint exported with explicit --model-kwargs."""
    root = net2_checkpoint['root']
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(card, 'measure', lambda *args: (FAKE_MACS, (2048, 14, 14)))
        rc = cli.main([
            'export', str(net2_checkpoint['checkpoint']), str(root / 'export'), '--model', 'gsop2_resnet50', '-q',
            '--model-kwargs', 'attn_mode=fusion_concat', f'attn_dim={ATTN_DIM}', f'num_classes={NUM_CLASSES}'])
    assert rc == 0
    return dict(net2_checkpoint, folder=root / 'export')


# --------------------------------------------------------------------------------------------------
# export round trips
# --------------------------------------------------------------------------------------------------

def test_export_net1_ema_round_trip_and_card(net1_run, tmp_path, capsys, monkeypatch):
    monkeypatch.undo()  # real MAC count
    out = tmp_path / 'gsop_resnet50.position_in7'
    rc = cli.main(['export', str(net1_run['checkpoint']), str(out), '--model', 'gsop_resnet50'])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip() == str(out)
    assert 'state_dict_ema' in captured.err and 'writing model.safetensors' in captured.err  # progress
    assert_publishable(out)

    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'gsop_resnet50'
    assert config['num_classes'] == NUM_CLASSES
    assert config['model_args'] == {
        'attn_mode': 'position', 'attn_dim': ATTN_DIM, 'num_classes': NUM_CLASSES, 'global_pool': 'avg', 'in_chans': 3}
    pcfg = config['pretrained_cfg']
    # the run set no input size: the model's defaults, which train.py validated with
    assert pcfg['num_classes'] == NUM_CLASSES and tuple(pcfg['input_size']) == (3, 224, 224)
    assert pcfg['crop_pct'] == 0.875 and len(pcfg['mean']) == 3 and len(pcfg['std']) == 3
    assert 'license' not in pcfg and 'label_names' not in config  # none given; the run's folder is not here

    # the folder alone rebuilds the model; EMA weights were exported, not the raw ones
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert loaded.attn_mode == 'position' and loaded.num_classes == NUM_CLASSES
    got = logits(loaded)
    torch.testing.assert_close(got, net1_run['logits'], rtol=0, atol=0)
    assert not torch.allclose(got, net1_run['logits_not_ema'], atol=1e-3)
    weights = safetensors.torch.load_file(out / 'model.safetensors')
    assert (out / 'model.safetensors').stat().st_mode == (out / 'config.json').stat().st_mode  # not 0600
    assert weights['layer1.2.attn.position_gate.conv_reduce.weight'].shape[0] == ATTN_DIM

    readme = (out / 'README.md').read_text()
    assert readme.startswith('---\n') and 'library_name: timm' in readme and 'license: unknown' in readme
    assert '# Model card for gsop_resnet50.position_in7' in readme
    assert 'Global Second-order Pooling Convolutional Networks' in readme
    assert 'Gao, Zilin and Xie, Jiangtao and Wang, Qilong and Li, Peihua' in readme and 'CVPR' in readme
    n_params = sum(p.numel() for p in loaded.parameters())
    assert f'**Params (M):** {n_params / 1e6:.2f}' in readme
    macs = card.measure('gsop_resnet50', config['model_args'], (3, 224, 224))[0]
    assert f'**GMACs (224x224):** {macs / 1e9:.2f}' in readme
    assert 'ResNet-50 (3, 4, 6, 3 bottlenecks per stage)' in readme
    assert '64x64 position covariance of a 8x8 pooled map' in readme and '14x14 at 224x224' in readme
    assert 'EMA weights of epoch 1' in readme and '**License:** none given' in readme
    recipe = readme.split('```yaml\n')[1].split('```')[0].splitlines()
    assert {'lr: 0.1', 'sched: cosine', 'epochs: 3', 'opt: sgd', 'momentum: 0.9', 'model_ema: true'} <= set(recipe)
    # what did not apply (step decay beside cosine, mixup settings without mixup) and the machine are left out
    assert not [line for line in recipe if line.startswith(('decay_', 'mixup_', 'workers', 'device', 'output'))]
    # lr given (no lr_base scaling), no teacher, no naflex loader, no clipping, no layer decay, one image size
    assert not [line for line in recipe if line.startswith(('lr_base', 'kd_', 'naflex_', 'clip_', 'layer_', 'train_'))]
    assert 'mixup: 0.0' in recipe  # set, and off
    assert '/home/someone' not in readme  # no local paths published; the data folder by its own name:
    assert '**Training data:** the image folder `imagenet`' in readme
    assert '| this checkpoint | 1 | 52.50 | 88.75 |' in readme
    assert "timm.create_model('hf-hub:USER/REPO', pretrained=True)" in readme and 'import timm_gsop' in readme
    assert 'matplotlib' not in readme and 'pip install timm timm-gsop' not in readme  # nothing untrue
    assert 'Install `timm` and the `timm-gsop` package from ' in readme


def test_export_net2_round_trip(net2_export):
    folder = net2_export['folder']
    assert_publishable(folder)
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'gsop2_resnet50'
    assert config['model_args']['attn_mode'] == 'fusion_concat'
    assert config['model_args']['attn_dim'] == ATTN_DIM and config['model_args']['global_pool'] == 'isqrt'
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert loaded.num_classes == NUM_CLASSES and loaded.fc.in_features == 256 * 257 // 2
    torch.testing.assert_close(logits(loaded), net2_export['logits'], rtol=0, atol=0)
    readme = (folder / 'README.md').read_text()
    assert '**GMACs (224x224):** 1.23' in readme and 'GSoP-Net2 on a ResNet-50' in readme
    assert 'GSoP block (attn_mode `fusion_concat`' in readme and 'of stages 1, 2, 3;' in readme
    assert '1x1 conv 2048->256, 256x256 covariance, 3 Newton-Schulz iterations, upper triangle of 32,896' in readme
    assert '## Training recipe' not in readme  # no args.yaml and no stored args: no recipe section


def test_measure_counts_multiply_adds_and_the_feature_map(monkeypatch):
    monkeypatch.undo()
    kwargs = dict(layers=(1, 1, 1, 1), attn_dim=16, num_classes=0)
    macs, features = card.measure('gsop_resnet50', kwargs, (3, 96, 64))
    assert features == (2048, 6, 4)  # output stride 16
    stem = 64 * 3 * 49 * 48 * 32  # the 7x7 stride-2 conv alone
    assert stem < macs < 1e9
    from torch.utils.flop_counter import FlopCounterMode  # the meta-device count is the real forward's
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        timm.create_model('gsop_resnet50', **kwargs).eval()(torch.zeros(1, 3, 96, 64))
    assert macs == counter.get_total_flops() // 2
    # a huge input size costs nothing to count: no memory is allocated for it
    assert card.measure('gsop_resnet50', kwargs, (3, 4096, 4096))[1] == (2048, 256, 256)


# --------------------------------------------------------------------------------------------------
# official checkpoints
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,net,mode,pytorch04', [
    ('gsop_resnet50', 1, 'channel', False),
    ('gsop2_resnet50', 2, 'fusion_avg', True),
], ids=['net1-channel', 'net2-fusion_avg-pytorch0.4'])
def test_export_official_checkpoint(tmp_path, capsys, name, net, mode, pytorch04):
    sd = official_state_dict(50, net, mode, attn_dim=ATTN_DIM, num_classes=NUM_CLASSES, seed=5)
    path = tmp_path / 'model_best.pth.tar'
    # pytorch04: BatchNorm without num_batches_tracked, as PyTorch 0.4.0 saved it
    save_official_checkpoint(path, sd, arch='resnet50', drop_num_batches_tracked=pytorch04)
    out = tmp_path / 'export'
    extra = []
    if mode.startswith('fusion_') and mode != 'fusion_concat':
        # fusion_avg and fusion_max have the same parameters: the user must say which
        assert cli.main(['export', str(path), str(out), '--model', name, '-q']) == 1
        assert 'fusion_avg or fusion_max' in capsys.readouterr().err and not out.exists()
        extra = ['--model-kwargs', f'attn_mode={mode}']

    rc = cli.main(['export', str(path), str(out), '--model', name, '-q'] + extra)
    assert rc == 0, capsys.readouterr().err
    assert_publishable(out)
    assert 'converted from a checkpoint of the official GSoP code' in (out / 'README.md').read_text()
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['attn_mode'] == mode and config['model_args']['attn_dim'] == ATTN_DIM
    exported = logits(timm.create_model(f'local-dir:{out}', pretrained=True))

    if pytorch04:
        # The filter path needs the BN step counters; they do not affect eval-mode outputs.
        path = tmp_path / 'with_counters.pth.tar'
        save_official_checkpoint(path, sd, arch='resnet50')
    reference = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES),
        attn_mode=mode, attn_dim=ATTN_DIM, num_classes=NUM_CLASSES)
    torch.testing.assert_close(exported, logits(reference), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# hf-hub: with the real huggingface_hub client, offline
# --------------------------------------------------------------------------------------------------

_COMMIT = 'a' * 40


class _HubResolveHandler(BaseHTTPRequestHandler):
    """Serves FOLDER as /{repo_id}/resolve/{revision}/{filename}, with the headers the Hub sends."""

    def __init__(self, *args, folder: Path, repo_id: str, log: list, **kwargs):
        self.folder, self.repo_id, self.log = folder, repo_id, log
        super().__init__(*args, **kwargs)

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _file(self):
        prefix = f'/{self.repo_id}/resolve/'
        path = self.path.split('?')[0]
        if not path.startswith(prefix):
            return None
        revision, _, filename = path[len(prefix):].partition('/')
        file = self.folder / filename
        return file if revision in ('main', _COMMIT) and filename and file.is_file() else None

    def _headers(self, file):
        if file is None:
            self.send_response(404)
            self.send_header('X-Error-Code', 'EntryNotFound')
            self.send_header('X-Error-Message', 'Entry not found')
            self.send_header('Content-Length', '0')
            self.end_headers()
            return None
        data = file.read_bytes()
        self.send_response(200)
        self.send_header('X-Repo-Commit', _COMMIT)
        self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Content-Type', 'application/octet-stream')
        self.end_headers()
        return data

    def do_HEAD(self):
        self.log.append(('HEAD', self.path))
        self._headers(self._file())

    def do_GET(self):
        self.log.append(('GET', self.path))
        data = self._headers(self._file())
        if data is not None:
            self.wfile.write(data)


_LOAD_SCRIPT = """
import sys, timm, timm_gsop, torch, safetensors.torch, huggingface_hub.constants as hf_constants
x = safetensors.torch.load_file(sys.argv[2])['x']
out = {}
with torch.no_grad():
    out['online'] = timm.create_model(sys.argv[1], pretrained=True).eval()(x)
    # offline mode: the client refuses every HTTP request, so this load can only come from its cache
    hf_constants.HF_HUB_OFFLINE = True
    assert hf_constants.is_offline_mode()
    out['offline'] = timm.create_model(sys.argv[1], pretrained=True).eval()(x)
safetensors.torch.save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])
"""


def _load_in_subprocess(tmp_path: Path, model_name: str, env_extra: dict) -> dict:
    """huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE at import: a fresh interpreter."""
    x_file, out_file = tmp_path / 'x.safetensors', tmp_path / 'logits.safetensors'
    safetensors.torch.save_file({'x': batch()}, x_file)
    out_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING_FACE_'))}
    env.update(HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_XET='1', HF_HOME=str(tmp_path / 'hf_home'),
               HF_HUB_ETAG_TIMEOUT='120', HF_HUB_DOWNLOAD_TIMEOUT='120', **env_extra)  # busy CI machines
    proc = subprocess.run([sys.executable, '-c', _LOAD_SCRIPT, model_name, str(x_file), str(out_file)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return safetensors.torch.load_file(out_file)


def test_hf_hub_loading_with_real_client(net2_export, tmp_path):
    repo_id, log = 'gsop-test/gsop2_resnet50.demo', []
    handler = partial(_HubResolveHandler, folder=net2_export['folder'], repo_id=repo_id, log=log)
    server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cache = tmp_path / 'hub_cache'
    try:
        got = _load_in_subprocess(tmp_path, f'hf-hub:{repo_id}', dict(
            HF_ENDPOINT=f'http://127.0.0.1:{server.server_address[1]}', HF_HUB_CACHE=str(cache)))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    torch.testing.assert_close(got['online'], net2_export['logits'], rtol=0, atol=0)
    torch.testing.assert_close(got['offline'], net2_export['logits'], rtol=0, atol=0)
    fetched = {path.rsplit('/', 1)[-1] for method, path in log if method == 'GET'}
    assert fetched == {'config.json', 'model.safetensors'}  # no pickle weights asked for
    snapshot = cache / 'models--gsop-test--gsop2_resnet50.demo' / 'snapshots' / _COMMIT
    assert (snapshot / 'model.safetensors').is_file() and (snapshot / 'config.json').is_file()
    assert (cache / 'models--gsop-test--gsop2_resnet50.demo' / 'refs' / 'main').read_text() == _COMMIT


# --------------------------------------------------------------------------------------------------
# push, up to the network
# --------------------------------------------------------------------------------------------------

class _FakeApi:
    calls: list = []
    uploaded: dict = {}

    def __init__(self, *args, **kwargs):
        _FakeApi.calls.append(('init', args, kwargs))

    def create_repo(self, repo_id, **kwargs):
        _FakeApi.calls.append(('create_repo', repo_id, kwargs))
        return argparse.Namespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        _FakeApi.calls.append(('create_branch', repo_id, kwargs))

    def upload_folder(self, **kwargs):
        _FakeApi.calls.append(('upload_folder', kwargs['repo_id'], kwargs))
        folder = Path(kwargs['folder_path'])
        _FakeApi.uploaded = {p.name: p.read_bytes() for p in folder.iterdir()}
        _FakeApi.folder = folder
        return argparse.Namespace(commit_url='https://hub.invalid/commit/1', pr_url='https://hub.invalid/pr/1')


def test_push_up_to_the_network(net1_run, monkeypatch, capsys):
    token = 'hf_FAKEtoken1234567890secret'
    monkeypatch.setenv('HF_TOKEN', token)
    monkeypatch.setattr(export, 'HfApi', _FakeApi)
    _FakeApi.calls, _FakeApi.uploaded = [], {}
    rc = cli.main(['push', str(net1_run['checkpoint']), 'someone/gsop-r50-demo', '--model', 'gsop_resnet50',
                   '--private', '--revision', 'v1', '--create-pr', '--commit-message', 'Add position-mode weights'])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert token not in captured.out + captured.err
    assert captured.out.strip() == 'https://hub.invalid/pr/1'

    kinds = [c[0] for c in _FakeApi.calls]
    assert kinds == ['init', 'create_repo', 'create_branch', 'upload_folder']
    assert not _FakeApi.calls[0][1] and 'token' not in _FakeApi.calls[0][2]  # token from the login / env
    _, repo, create_kwargs = _FakeApi.calls[1]
    assert repo == 'someone/gsop-r50-demo' and create_kwargs['private'] is True and create_kwargs['exist_ok']
    assert _FakeApi.calls[2][1] == 'someone/gsop-r50-demo' and _FakeApi.calls[2][2]['branch'] == 'v1'
    _, repo, upload = _FakeApi.calls[3]
    assert repo == 'someone/gsop-r50-demo'
    assert upload['revision'] == 'v1' and upload['create_pr'] is True
    assert upload['commit_message'] == 'Add position-mode weights'

    names = set(_FakeApi.uploaded)
    assert {'model.safetensors', 'config.json', 'README.md'} <= names <= set(hub.ALLOWED_FILES)
    config = json.loads(_FakeApi.uploaded['config.json'])
    assert config['model_args']['attn_mode'] == 'position' and config['num_classes'] == NUM_CLASSES
    card = _FakeApi.uploaded['README.md'].decode()
    assert '# Model card for gsop-r50-demo' in card
    assert "timm.create_model('hf-hub:someone/gsop-r50-demo', pretrained=True)" in card
    weights = safetensors.torch.load(_FakeApi.uploaded['model.safetensors'])
    assert weights['fc.weight'].shape == (NUM_CLASSES, 2048)
    assert not _FakeApi.folder.exists()  # the temporary export is cleaned up


def test_push_without_login_stops_before_the_network(net1_run, monkeypatch, tmp_path, capsys):
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    monkeypatch.setattr(export, 'HfApi', _FakeApi)
    _FakeApi.calls = []
    rc = cli.main(['push', str(net1_run['checkpoint']), 'someone/repo', '--model', 'gsop_resnet50', '-q'])
    assert rc == 1 and 'not logged in' in capsys.readouterr().err
    assert _FakeApi.calls == []


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------

def test_error_missing_checkpoint(tmp_path, capsys):
    rc = cli.main(['export', str(tmp_path / 'nope.pth.tar'), str(tmp_path / 'out'), '--model', 'gsop_resnet50'])
    err = capsys.readouterr().err
    assert rc == 1 and 'No such file or directory' in err and 'nope.pth.tar' in err
    assert not (tmp_path / 'out').exists()


def test_error_corrupted_checkpoint(net2_checkpoint, tmp_path, capsys):
    broken = tmp_path / 'truncated.pth.tar'
    broken.write_bytes(net2_checkpoint['checkpoint'].read_bytes()[:100_000])
    rc = cli.main(['export', str(broken), str(tmp_path / 'out'), '--model', 'gsop2_resnet50'])
    err = capsys.readouterr().err
    assert rc == 1 and 'cannot read checkpoint' in err and 'corrupted or truncated' in err
    assert 'Traceback' not in err and not (tmp_path / 'out').exists()


def test_error_wrong_architecture(net2_checkpoint, net1_run, tmp_path, capsys):
    # a GSoP-Net2 checkpoint exported as GSoP-Net1: the error says which model and arguments fit
    rc = cli.main(['export', str(net2_checkpoint['checkpoint']), str(tmp_path / 'out'), '--model', 'gsop_resnet50'])
    err = capsys.readouterr().err
    assert rc == 1 and 'does not fit this gsop_resnet50 model' in err
    assert "checkpoint: layers=(3, 4, 6, 3), attn_mode='fusion_concat', attn_dim=16, num_classes=7 (GSoP-Net2" in err
    assert 'Pass the arguments it was trained with: --model gsop2_resnet50' in err
    assert 'missing keys (' in err and 'layer4.2.attn.' in err and 'global_pool.conv_reduce.weight' in err
    # an attention mode the weights were not trained with
    rc = cli.main(['export', str(net1_run['checkpoint']), str(tmp_path / 'out'), '--model', 'gsop_resnet50',
                   '--model-kwargs', 'attn_mode=channel'])
    err = capsys.readouterr().err
    assert rc == 1 and '--model-kwargs attn_mode=position' in err
    assert 'attn.channel_gate.' in err and 'attn.position_gate.' in err
    assert not (tmp_path / 'out').exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize('argv', [['--help'], ['export', '--help'], ['push', '--help'], ['export']])
def test_console_script_answers(argv):
    """What the installed ``timm-gsop`` runs (pyproject's entry point), in a fresh interpreter."""
    import re  # tomllib is Python 3.11+
    pyproject = (Path(__file__).parents[1] / 'pyproject.toml').read_text()
    module, func = re.search(r'^timm-gsop\s*=\s*"([^"]+)"', pyproject, re.M)[1].split(':')
    proc = subprocess.run([sys.executable, '-c', f'import sys; from {module} import {func}; sys.exit({func}())', *argv],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    if argv == ['export']:  # a missing argument: one line
        assert proc.returncode == 2 and proc.stdout == ''
        assert proc.stderr.strip().splitlines() == [
            'timm-gsop export: error: the following arguments are required: checkpoint, out_dir '
            '(--help lists the options)']
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith('usage: timm-gsop')
        commands = ('train', 'validate', 'benchmark', 'export', 'push')
        assert all(c in proc.stdout for c in commands) if argv == ['--help'] else '--model' in proc.stdout


def test_python_m_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['timm_gsop', 'push', '--help'])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module('timm_gsop', run_name='__main__')
    out = capsys.readouterr().out
    assert exc.value.code == 0 and '--create-pr' in out and '--revision' in out and '--private' in out


class _Distribution:
    def __init__(self, files):
        self.files, self.metadata = files, email.message.Message()  # no Project-URL

    def read_text(self, name):
        return self.files.get(name)


@pytest.mark.parametrize('files, line', [
    ({'INSTALLER': 'pip\n'}, '`pip install timm-gsop`'),  # from an index: pip records no direct URL
    ({'INSTALLER': 'pip\n', 'direct_url.json': json.dumps(dict(
        url='https://github.com/u/timm-gsop', vcs_info=dict(vcs='git', commit_id='abc123')))},
     '`pip install git+https://github.com/u/timm-gsop@abc123`'),
    ({'INSTALLER': 'pip\n', 'direct_url.json': json.dumps(dict(url='file:///home/u/timm-gsop', dir_info={}))},
     'Install `timm` and the `timm-gsop` package from its source'),  # a local folder: others cannot repeat it
    ({'INSTALLER': 'conda\n'}, 'Install `timm` and the `timm-gsop` package from its source'),
])
def test_card_install_line_repeats_how_the_package_was_installed(monkeypatch, files, line):
    monkeypatch.setattr(card.metadata, 'distribution', lambda name: _Distribution(files))
    assert card.install_line() == line
    assert card.install_line('pip install x') == '`pip install x`'
