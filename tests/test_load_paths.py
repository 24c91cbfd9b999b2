"""Every way of loading a checkpoint says the same thing about it: timm's pretrained loader
(``pretrained_cfg_overlay``, ``local-dir:``), ``checkpoint_path=``, ``load_state_dict`` and
``timm-gsop export``. A checkpoint of another architecture gets one explanation (layers, attn_mode,
attn_dim, num_classes and what to pass, as Python keywords or as the launcher's flags); non-finite
weights are refused; unreadable files get one line; a weights file keeps its classifier when it has
the requested classes.

The "demo" checkpoint is what ``train_timm.sh`` trains: gsop_resnet50 with one bottleneck per stage.
"""
import ast
import json
import os
import re
import shlex

import pytest
import safetensors.torch
import torch

import timm
import timm_gsop  # noqa: F401
from timm_gsop import cli
from timm_gsop.models._checkpoint import (
    CheckpointError, check_state_dict_fits, load_checkpoint_file, state_dict_from_checkpoint)

from export_helpers import fast_card, logits, make_model, write_run  # noqa: F401

DEMO = dict(layers=(1, 1, 1, 1), num_classes=10)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    model = make_model('gsop_resnet50', 7, **DEMO)
    path = tmp_path_factory.mktemp('demo') / 'model_best.pth.tar'
    torch.save({'epoch': 4, 'arch': 'gsop_resnet50', 'state_dict': model.state_dict()}, path)
    return dict(path=path, model=model, logits=logits(model))


def _load_error(path_kind: str, checkpoint, tmp_path, capsys) -> str:
    """The message of loading the demo checkpoint into a default gsop_resnet50 by one load path."""
    if path_kind == 'export':
        assert cli.main(['export', str(checkpoint), str(tmp_path / 'out'), '--model', 'gsop_resnet50', '-q']) == 1
        return capsys.readouterr().err
    with pytest.raises(CheckpointError) as err:
        if path_kind == 'pretrained_cfg_overlay':
            timm.create_model('gsop_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
        elif path_kind == 'checkpoint_path':
            timm.create_model('gsop_resnet50', num_classes=10, checkpoint_path=str(checkpoint))
        else:
            timm.create_model('gsop_resnet50').load_state_dict(torch.load(checkpoint)['state_dict'])
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)  # callers catch either
    return str(err.value)


@pytest.mark.parametrize('path_kind', ['pretrained_cfg_overlay', 'checkpoint_path', 'load_state_dict', 'export'])
def test_the_same_explanation_on_every_load_path(demo, tmp_path, capsys, path_kind):
    msg = _load_error(path_kind, demo['path'], tmp_path, capsys)
    assert 'does not fit this gsop_resnet50 model' in msg
    assert "checkpoint: layers=(1, 1, 1, 1), attn_mode='channel', attn_dim=128, num_classes=10" in msg
    assert 'model:      layers=(3, 4, 6, 3)' in msg
    assert 'missing keys (' in msg and 'unexpected keys (' in msg and len(msg) < 3000  # not torch's key dump
    if path_kind == 'export':
        assert "Pass the arguments it was trained with: --model-kwargs 'layers=(1,1,1,1)'" in msg
    else:
        assert "timm.create_model('gsop_resnet50', layers=(1, 1, 1, 1)" in msg
    assert not (tmp_path / 'out').exists()


def test_following_the_advice_loads_the_checkpoint(demo, tmp_path, capsys):
    msg = _load_error('checkpoint_path', demo['path'], tmp_path, capsys)
    assert "timm.create_model('gsop_resnet50', layers=(1, 1, 1, 1), ...)" in msg  # num_classes=10 was passed
    model = timm.create_model('gsop_resnet50', layers=(1, 1, 1, 1), num_classes=10, checkpoint_path=str(demo['path']))
    torch.testing.assert_close(logits(model), demo['logits'], rtol=0, atol=0)
    msg = _load_error('load_state_dict', demo['path'], tmp_path, capsys)
    assert "timm.create_model('gsop_resnet50', layers=(1, 1, 1, 1), num_classes=10, ...)" in msg
    assert ("to fine-tune it for 1000 classes, load it as pretrained weights: timm.create_model('gsop_resnet50', "
            "pretrained=True, pretrained_cfg_overlay=dict(file='PATH'), layers=(1, 1, 1, 1), num_classes=1000, ...)"
            in msg)
    msg = _load_error('export', demo['path'], tmp_path, capsys)
    assert cli.main(['export', str(demo['path']), str(tmp_path / 'out'), '--model', 'gsop_resnet50', '-q',
                     '--model-kwargs', 'layers=(1, 1, 1, 1)']) == 0


def test_pretrained_file_keeps_its_classifier(demo):
    model = timm.create_model('gsop_resnet50', pretrained=True, layers=(1, 1, 1, 1), num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(demo['path'])))
    assert model.num_classes == 10 and model.pretrained_cfg['num_classes'] == 10
    torch.testing.assert_close(logits(model), demo['logits'], rtol=0, atol=0)  # the trained classifier, not a new one
    # Without num_classes the model has the architecture's 1000 classes, as any timm model: a new classifier.
    model = timm.create_model('gsop_resnet50', pretrained=True, layers=(1, 1, 1, 1),
                              pretrained_cfg_overlay=dict(file=str(demo['path'])))
    assert model.fc.out_features == 1000


def test_pretrained_file_with_other_classes_gets_a_new_classifier(demo):
    model = timm.create_model('gsop_resnet50', pretrained=True, layers=(1, 1, 1, 1), num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(demo['path']))).eval()
    assert model.fc.weight.shape == (5, 2048)
    with torch.no_grad():  # fine-tuning: the backbone is the checkpoint's
        torch.testing.assert_close(model.forward_head(model.forward_features(torch.ones(1, 3, 64, 64)), pre_logits=True),
                                   demo['model'].forward_head(demo['model'].forward_features(torch.ones(1, 3, 64, 64)),
                                                              pre_logits=True), rtol=0, atol=0)


@pytest.fixture(scope='module')
def nan_checkpoint(demo, tmp_path_factory):
    state_dict = {k: v.clone() for k, v in demo['model'].state_dict().items()}
    state_dict['layer2.0.bn1.running_var'][3] = float('inf')
    state_dict['fc.weight'][1, 2] = float('nan')
    root = tmp_path_factory.mktemp('nan')
    torch.save({'state_dict': state_dict}, root / 'diverged.pth.tar')
    # an exported folder (as the Hub would serve it) holding the same weights
    folder = root / 'folder'
    model = timm.create_model('gsop_resnet50', **DEMO)
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    safetensors.torch.save_file(state_dict, folder / 'model.safetensors')
    return dict(path=root / 'diverged.pth.tar', state_dict=state_dict, folder=folder)


@pytest.mark.parametrize('path_kind', ['pretrained_cfg_overlay', 'local-dir', 'checkpoint_path', 'load_state_dict',
                                       'export'])
def test_non_finite_weights_are_refused_on_every_load_path(nan_checkpoint, tmp_path, capsys, path_kind):
    if path_kind == 'export':
        assert cli.main(['export', str(nan_checkpoint['path']), str(tmp_path / 'out'), '--model', 'gsop_resnet50',
                         '-q', '--model-kwargs', 'layers=(1, 1, 1, 1)']) == 1
        msg = capsys.readouterr().err
        assert not (tmp_path / 'out').exists()
    else:
        with pytest.raises(CheckpointError) as err:
            if path_kind == 'pretrained_cfg_overlay':
                timm.create_model('gsop_resnet50', pretrained=True, pretrained_cfg_overlay=dict(
                    file=str(nan_checkpoint['path'])), **DEMO)
            elif path_kind == 'local-dir':
                timm.create_model(f'local-dir:{nan_checkpoint["folder"]}', pretrained=True)
            elif path_kind == 'checkpoint_path':
                timm.create_model('gsop_resnet50', checkpoint_path=str(nan_checkpoint['path']), **DEMO)
            else:
                timm.create_model('gsop_resnet50', **DEMO).load_state_dict(nan_checkpoint['state_dict'], strict=False)
        msg = str(err.value)
    assert 'non-finite values (NaN or inf' in msg and ' in 2 tensor(s): ' in msg
    assert 'layer2.0.bn1.running_var' in msg and 'fc.weight' in msg


def test_plain_resnet_checkpoint_exports_only_as_attn_mode_none(tmp_path, capsys, fast_card):
    resnet = make_model('resnet50', 11, **DEMO)  # timm's own ResNet: no GSoP block, stride-2 last stage
    path = tmp_path / 'resnet50.pth.tar'
    torch.save({'arch': 'resnet50', 'state_dict': resnet.state_dict()}, path)
    args = ['export', str(path), str(tmp_path / 'out'), '--model', 'gsop_resnet50', '-q',
            '--model-kwargs', 'layers=(1, 1, 1, 1)']
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "no GSoP block (trained as 'resnet50')" in err and 'attn_mode=none' in err
    assert not (tmp_path / 'out').exists()
    assert cli.main(args + ['attn_mode=none']) == 0  # said explicitly: the ablation backbone
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['model_args']['attn_mode'] == 'none'
    assert 'no GSoP blocks' in (tmp_path / 'out' / 'README.md').read_text()


def test_attn_mode_none_run_exports_without_extra_arguments(tmp_path, fast_card):
    model = make_model('gsop_resnet50', 12, attn_mode='none', **DEMO)
    checkpoint = write_run(tmp_path / 'run', model, dict(
        model='gsop_resnet50', model_kwargs=dict(attn_mode='none', layers=[1, 1, 1, 1]), num_classes=10))
    assert cli.main(['export', str(checkpoint), str(tmp_path / 'out'), '--model', 'gsop_resnet50', '-q']) == 0
    torch.testing.assert_close(logits(timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)),
                               logits(model), rtol=0, atol=0)


def test_non_strict_loads_stay_non_strict(demo):
    backbone = {k: v for k, v in demo['model'].state_dict().items() if not k.startswith('fc.')}
    model = timm.create_model('gsop_resnet50', layers=(1, 1, 1, 1), num_classes=3)
    result = model.load_state_dict(backbone, strict=False)  # a partial checkpoint, loaded on purpose
    assert set(result.missing_keys) == {'fc.weight', 'fc.bias'} and not result.unexpected_keys
    with pytest.raises(CheckpointError, match='missing keys \\(2\\): fc.weight, fc.bias'):
        model.load_state_dict(backbone)


def test_launcher_style_advice_is_flags_that_train_py_parses(demo):
    model = timm.create_model('gsop_resnet50', num_classes=5, device='meta')
    state_dict = state_dict_from_checkpoint(torch.load(demo['path']))[1]
    with pytest.raises(CheckpointError) as err:
        check_state_dict_fits(state_dict, model, cli=True, path=str(demo['path']))
    msg = str(err.value)
    assert "Pass the arguments it was trained with: --model-kwargs 'layers=(1,1,1,1)' --num-classes 10" in msg
    tune = f"--pretrained --pretrained-path {demo['path']} --model-kwargs 'layers=(1,1,1,1)' --num-classes 5"
    assert ('to fine-tune it for 5 classes, load it as pretrained weights in place of --initial-checkpoint: '
            f'{tune}') in msg
    assert 'timm.create_model' not in msg
    with pytest.raises(CheckpointError) as err:  # no file that starts a new run (validate.py, --resume, export)
        check_state_dict_fits(state_dict, model, cli=True)
    assert '--num-classes 10' in str(err.value) and 'fine-tune' not in str(err.value)
    words = shlex.split(tune)  # what a shell hands to train.py; its --model-kwargs values go through literal_eval
    key, value = words[words.index('--model-kwargs') + 1].split('=')
    assert (key, ast.literal_eval(value)) == ('layers', (1, 1, 1, 1))


def test_fine_tuning_advice_when_only_the_classes_differ(demo, tmp_path, capsys):
    with pytest.raises(CheckpointError) as err:
        timm.create_model('gsop_resnet50', layers=(1, 1, 1, 1), num_classes=5, checkpoint_path=str(demo['path']))
    msg = str(err.value)
    assert "checkpoint: layers=(1, 1, 1, 1), attn_mode='channel', attn_dim=128, num_classes=10" in msg
    assert "Pass the arguments it was trained with: timm.create_model('gsop_resnet50', num_classes=10, ...)" in msg
    advice = "pretrained=True, pretrained_cfg_overlay=dict(file='PATH'), num_classes=5, ...)"
    assert advice in msg and 'missing keys (0)' in msg and 'shape mismatches (2): fc.weight' in msg
    model = timm.create_model('gsop_resnet50', layers=(1, 1, 1, 1), num_classes=5, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(demo['path'])))  # the advice, followed
    assert model.fc.out_features == 5
    torch.testing.assert_close(model.layer4[0].conv3.weight, demo['model'].layer4[0].conv3.weight, rtol=0, atol=0)


def _overflowing_and_complex_nan(demo):
    """(float64 values beyond float32's range, a complex tensor holding NaN): finite as stored, not as loaded."""
    big = {k: v.clone() for k, v in demo['model'].state_dict().items()}
    big['layer3.0.conv2.weight'] = big['layer3.0.conv2.weight'].double()
    big['layer3.0.conv2.weight'][0, 0, 0, 0] = 1e300
    cplx = {k: v.clone() for k, v in demo['model'].state_dict().items()}
    cplx['layer1.0.bn1.weight'] = torch.complex(cplx['layer1.0.bn1.weight'], torch.zeros_like(cplx['layer1.0.bn1.weight']))
    cplx['layer1.0.bn1.weight'][0] = complex(0, float('nan'))
    return {'float64 1e300': (big, 'layer3.0.conv2.weight'), 'complex nan': (cplx, 'layer1.0.bn1.weight')}


@pytest.mark.parametrize('kind', ['float64 1e300', 'complex nan'])
@pytest.mark.parametrize('path_kind', ['pretrained_cfg_overlay', 'checkpoint_path', 'load_state_dict', 'export'])
def test_values_non_finite_in_the_model_are_refused(demo, tmp_path, capsys, kind, path_kind):
    state_dict, key = _overflowing_and_complex_nan(demo)[kind]
    path = tmp_path / 'odd.pth.tar'
    torch.save({'state_dict': state_dict}, path)
    if path_kind == 'export':
        assert cli.main(['export', str(path), str(tmp_path / 'out'), '--model', 'gsop_resnet50', '-q',
                         '--model-kwargs', 'layers=(1, 1, 1, 1)']) == 1
        msg = capsys.readouterr().err
        assert 'Traceback' not in msg and not (tmp_path / 'out').exists()
    else:
        with pytest.raises(CheckpointError) as err:
            if path_kind == 'pretrained_cfg_overlay':
                timm.create_model('gsop_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **DEMO)
            elif path_kind == 'checkpoint_path':
                timm.create_model('gsop_resnet50', checkpoint_path=str(path), **DEMO)
            else:
                timm.create_model('gsop_resnet50', **DEMO).load_state_dict(state_dict, strict=False)
        msg = str(err.value)
    assert 'non-finite values (NaN or inf' in msg and f'1 tensor(s): {key}.' in msg


def _unreadable(kind, tmp_path, demo):
    path = tmp_path / f'{kind}.pth.tar'
    if kind == 'folder':
        path.mkdir()
    elif kind == 'symlink loop':
        os.symlink(path, path)
    elif kind == 'zero bytes':
        path.write_bytes(b'')
    elif kind == 'integer key':
        torch.save({'state_dict': {0: torch.ones(1), **demo['model'].state_dict()}}, path)
    elif kind == 'epoch nan':
        torch.save({'epoch': float('nan'), 'state_dict': demo['model'].state_dict()}, path)
    return path


UNREADABLE = {'missing': 'No such file or directory', 'folder': 'Is a directory',
              'symlink loop': 'Too many levels of symbolic links', 'zero bytes': 'EOFError. The file is corrupted',
              'integer key': "key 0 of type int", 'epoch nan': 'says epoch nan'}


@pytest.mark.parametrize('kind', list(UNREADABLE))
def test_unreadable_checkpoints_are_one_line_errors(demo, tmp_path, capsys, kind):
    path = _unreadable(kind, tmp_path, demo)
    if kind != 'epoch nan':  # only the export reads the epoch (for the card)
        with pytest.raises(CheckpointError) as err:
            state_dict_from_checkpoint(load_checkpoint_file(path))
        assert UNREADABLE[kind] in str(err.value) and '\n' not in str(err.value)
    assert cli.main(['export', str(path), str(tmp_path / 'out'), '--model', 'gsop_resnet50', '-q',
                     '--model-kwargs', 'layers=(1, 1, 1, 1)', 'num_classes=10']) == 1
    err_text = capsys.readouterr().err
    assert 'Traceback' not in err_text and len(err_text.strip().splitlines()) <= 2, err_text
    assert UNREADABLE[kind] in err_text
    if kind in ('missing', 'folder', 'symlink loop', 'zero bytes'):  # before timm's empty FileNotFoundError / EOFError
        with pytest.raises(CheckpointError, match=re.escape(UNREADABLE[kind])):
            timm.create_model('gsop_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **DEMO)
    if kind == 'integer key':
        with pytest.raises(CheckpointError, match=re.escape(UNREADABLE[kind])):
            timm.create_model('gsop_resnet50', **DEMO).load_state_dict(torch.load(path)['state_dict'])


def test_pretrained_file_into_other_input_channels(demo):
    # timm adapts a 3-channel stem to in_chans=1 (the sum over the colour channels) after the filter.
    model = timm.create_model('gsop_resnet50', pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(
        file=str(demo['path'])), **DEMO)
    torch.testing.assert_close(model.conv1.weight, demo['model'].conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.fc.weight, demo['model'].fc.weight, rtol=0, atol=0)
