"""Warm start: a GSoP-Net from a timm ResNet's weights through a backbone tag (``gsop_resnet50.a1_in1k_backbone``).

Never downloads: the "source" ResNets are built here with random weights and put in a Hugging Face cache under
tmp_path, read with the hub client offline (``HF_HUB_OFFLINE``), or given as a local file.
"""
import json
import logging
import random

import huggingface_hub.constants as hf_constants
import pytest
import safetensors.torch
import torch

import timm
import timm_gsop  # noqa: F401
from timm_gsop.hub import export_checkpoint
from timm_gsop.launcher.demo_data import CLASSES, render_shape
from timm_gsop.launcher.timm_scripts import LaunchError, check_args
from timm_gsop.models._checkpoint import CheckpointError

from export_helpers import batch, fast_card, make_model, write_run  # noqa: F401

_COMMIT = 'b' * 40
SMALL = dict(layers=(1, 1, 1, 1))  # the property holds at any depth; the source is timm's ResNet of these blocks


def _cache_source(cache, repo_id, state_dict):
    """``state_dict`` as ``repo_id``'s model.safetensors in a Hugging Face cache, as the hub client leaves it."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    (repo / 'snapshots' / _COMMIT).mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(_COMMIT)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()},
                                repo / 'snapshots' / _COMMIT / 'model.safetensors')


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub client whose cache holds a random timm resnet50 as timm/resnet50.a1_in1k."""
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)  # any HTTP request is refused
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    source = make_model('resnet50', 11)
    _cache_source(tmp_path / 'hub', 'timm/resnet50.a1_in1k', source.state_dict())
    return dict(cache=tmp_path / 'hub', source=source)


@pytest.fixture(scope='module')
def small_source(tmp_path_factory):
    """A timm ResNet of one bottleneck per stage: the backbone of gsop_resnet50(layers=(1, 1, 1, 1)), as a file."""
    source = make_model('resnet50', 5, **SMALL)
    path = tmp_path_factory.mktemp('src') / 'resnet.safetensors'
    safetensors.torch.save_file(source.state_dict(), path)
    return dict(path=str(path), source=source)


def _warm(name, path, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)


@pytest.mark.parametrize('name', ['gsop_resnet50.a1_in1k_backbone', 'gsop2_resnet50.a1_in1k_backbone'])
def test_backbone_tag_loads_the_source_from_the_hub_cache(hub_cache, name, caplog):
    torch.manual_seed(3)
    with caplog.at_level(logging.WARNING, logger='timm_gsop'):
        model = timm.create_model(name, pretrained=True)
    torch.manual_seed(3)
    fresh = timm.create_model(name.split('.')[0])
    src, own, init = hub_cache['source'].state_dict(), model.state_dict(), fresh.state_dict()
    net2 = name.startswith('gsop2')
    new = [k for k in own if '.attn.' in k or k.startswith('global_pool.') or (net2 and k.startswith('fc.'))]
    assert new and len(new) + len(src) - 2 * net2 == len(own)
    for k in own:  # the source's tensors bit for bit, everything else the model's own initialisation
        torch.testing.assert_close(own[k], init[k] if k in new else src[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(init[k], src[k]) for k in src if k in init)  # the seeds differ: a real test
    lines = [r.getMessage() for r in caplog.records if r.name.startswith('timm_gsop')]
    assert lines == [f'{name}: loaded {len(src) - 2 * net2} tensors of timm/resnet50.a1_in1k (stem, stages'
                     f'{"" if net2 else ", classifier"}); the model\'s own initialisation: '
                     f'{len(new) - 2 * net2} GSoP tensors{", the classifier (2)" if net2 else ""}']
    # the tag's preprocessing is the source's, as train.py / validate.py resolve it
    cfg = timm.data.resolve_data_config({}, model=model)
    src_cfg = timm.data.resolve_data_config({}, pretrained_cfg=timm.get_pretrained_cfg('resnet50.a1_in1k').to_dict())
    assert cfg == src_cfg and cfg['interpolation'] == 'bicubic' and cfg['crop_pct'] == 0.95
    assert model.pretrained_cfg['license'] == 'apache-2.0'


def test_tv2_tag_has_the_torchvision_preprocessing_and_licence():
    model = timm.create_model('gsop_resnet50.tv2_in1k_backbone', device='meta')
    src = timm.get_pretrained_cfg('resnet50.tv2_in1k')
    for key in ('input_size', 'test_input_size', 'crop_pct', 'test_crop_pct', 'interpolation', 'mean', 'std'):
        assert tuple(model.pretrained_cfg[key]) if isinstance(model.pretrained_cfg[key], tuple) else \
            model.pretrained_cfg[key] == getattr(src, key), key
    assert model.pretrained_cfg['input_size'] == (3, 176, 176) and model.pretrained_cfg['pool_size'] == (11, 11)
    assert model.pretrained_cfg['license'] == 'bsd-3-clause' == src.license
    assert model.pretrained_cfg['hf_hub_id'] == 'timm/resnet50.tv2_in1k'


def test_only_backbone_tags_load_partially(small_source):
    # the untagged name stays the default (no weights), and a ResNet file given to it is refused as ever
    assert sorted(timm.list_pretrained('gsop*')) == sorted(
        f'{n}_{d}.{t}_backbone' for n in ('gsop', 'gsop2') for d, ts in
        (('resnet50', ('a1_in1k', 'tv2_in1k')), ('resnet101', ('a1h_in1k',))) for t in ts)
    assert 'tag' not in timm.create_model('gsop_resnet50', device='meta').pretrained_cfg
    with pytest.raises(RuntimeError, match=r'No pretrained weights are published for gsop_resnet50: .* warm-start '
                                           r'it .*: gsop_resnet50.a1_in1k_backbone, gsop_resnet50.tv2_in1k_backbone'):
        timm.create_model('gsop_resnet50', pretrained=True)
    with pytest.raises(CheckpointError, match=r'does not fit this gsop_resnet50 model(.|\n)*missing keys \(56\)'):
        _warm('gsop_resnet50', small_source['path'], **SMALL)


def test_net1_classifier_loads_only_for_the_same_classes(small_source, caplog):
    src = small_source['source'].state_dict()
    model = _warm('gsop_resnet50.a1_in1k_backbone', small_source['path'], **SMALL)
    torch.testing.assert_close(model.fc.weight, src['fc.weight'], rtol=0, atol=0)
    with caplog.at_level(logging.WARNING, logger='timm_gsop'):
        tuned = _warm('gsop_resnet50.a1_in1k_backbone', small_source['path'], seed=4, num_classes=10, **SMALL)
    torch.manual_seed(4)
    fresh = timm.create_model('gsop_resnet50', num_classes=10, **SMALL)
    torch.testing.assert_close(tuned.fc.weight, fresh.fc.weight, rtol=0, atol=0)  # timm's new classifier
    torch.testing.assert_close(tuned.layer4[0].conv2.weight, src['layer4.0.conv2.weight'], rtol=0, atol=0)
    assert "GSoP tensors, the classifier (2)" in caplog.text
    # timm's own adaptations still apply: one input channel, no classifier
    gray = _warm('gsop_resnet50.a1_in1k_backbone', small_source['path'], in_chans=1, num_classes=0, **SMALL)
    torch.testing.assert_close(gray.conv1.weight, src['conv1.weight'].sum(1, keepdim=True), rtol=0, atol=0)


def test_plain_layout_gives_the_source_resnets_logits(small_source):
    model = _warm('gsop_resnet50.a1_in1k_backbone', small_source['path'], attn_mode='none', last_stride=2, **SMALL)
    x = batch(size=96)
    with torch.no_grad():
        got, want = model.eval()(x), small_source['source'].eval()(x)
    assert want.abs().max() > 1  # logits, not zeros
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the GSoP layout (stride-1 last stage, GSoP blocks) is another network on the same weights
    with torch.no_grad():
        assert not torch.allclose(_warm('gsop_resnet50.a1_in1k_backbone', small_source['path'], **SMALL).eval()(x),
                                  want, atol=1e-2)


@pytest.mark.parametrize('what', ['deeper', 'gsop_checkpoint', 'other_family', 'truncated', 'tiny_stem'])
def test_what_does_not_fit_is_refused(small_source, tmp_path, what):
    path = tmp_path / 'source.safetensors'
    if what == 'truncated':
        data = open(small_source['path'], 'rb').read()
        path.write_bytes(data[:len(data) // 2])
        with pytest.raises(Exception, match='deserializ|incomplete'):  # what timm's file loader says, as today
            _warm('gsop_resnet50.a1_in1k_backbone', str(path), **SMALL)
        return
    sd = {'deeper': lambda: timm.create_model('resnet50', layers=(1, 2, 1, 1)).state_dict(),
          'gsop_checkpoint': lambda: timm.create_model('gsop_resnet50', **SMALL).state_dict(),
          'other_family': lambda: timm.create_model('seresnet50', layers=(1, 1, 1, 1)).state_dict(),
          'tiny_stem': lambda: timm.create_model('resnet50d', layers=(1, 1, 1, 1)).state_dict()}[what]()
    safetensors.torch.save_file(sd, path)
    with pytest.raises(CheckpointError) as err:
        _warm('gsop_resnet50.a1_in1k_backbone', str(path), **SMALL)
    msg = str(err.value)
    assert msg.startswith('The checkpoint does not fit this gsop_resnet50 model.') and len(msg) < 3000
    assert {'deeper': 'Its backbone is a ResNet with layers=(1, 2, 1, 1)',
            'gsop_checkpoint': "It holds GSoP blocks: it is a GSoP-Net's checkpoint",
            'other_family': "Its parameters differ from the backbone's",
            'tiny_stem': "Its parameters differ from the backbone's"}[what] in msg
    if what == 'gsop_checkpoint':
        assert 'unexpected keys (64)' in msg


def test_resnet101_tag_refuses_resnet50_weights_naming_the_fitting_tags(hub_cache, tmp_path):
    _cache_source(hub_cache['cache'], 'timm/resnet101.a1h_in1k', hub_cache['source'].state_dict())
    with pytest.raises(CheckpointError, match=r'layers=\(3, 4, 6, 3\), the model\'s \(3, 4, 23, 3\): warm-start the '
                                              r'GSoP-Net of its depth \(gsop2_resnet50.a1_in1k_backbone, '
                                              r'gsop2_resnet50.tv2_in1k_backbone\)'):
        timm.create_model('gsop2_resnet101.a1h_in1k_backbone', pretrained=True, device='meta')


def test_launcher_accepts_backbone_tags_with_pretrained():
    check_args('train.py', ['--model', 'gsop_resnet50.a1_in1k_backbone', '--pretrained'])
    check_args('train.py', ['--model', 'gsop2_resnet101.a1h_in1k_backbone', '--pretrained', '--num-classes', '10'])
    with pytest.raises(LaunchError, match='no pretrained weights are published for gsop_resnet50'):
        check_args('train.py', ['--model', 'gsop_resnet50', '--pretrained'])
    with pytest.raises(LaunchError, match="unknown model 'gsop_resnet50.a1_in1k'"):
        check_args('train.py', ['--model', 'gsop_resnet50.a1_in1k', '--pretrained'])


def _shapes(n_per_class, seed, num_classes=4, size=64):
    rng = random.Random(seed)
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    xs, ys = [], []
    for c in range(num_classes):
        for _ in range(n_per_class):
            img = torch.frombuffer(bytearray(render_shape(CLASSES[c], rng, size).tobytes()), dtype=torch.uint8)
            xs.append((img.view(size, size, 3).permute(2, 0, 1).float() / 255 - mean) / std)
            ys.append(c)
    return torch.stack(xs), torch.tensor(ys)


def test_demo_shapes_fine_tune_from_a_source_trained_without_gsop(tmp_path):
    """The source is trained here as the backbone without GSoP blocks (attn_mode='none'), on 4 of the demo's
    shapes, then warm-starts a GSoP-Net that fine-tunes on them; a GSoP-Net from scratch gets the same steps."""
    x, y = _shapes(12, seed=1)
    xv, yv = _shapes(8, seed=2)

    def train(model, steps, lr):
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for step in range(steps):
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(step))[:16]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return (model(xv).argmax(1) == yv).float().mean().item()

    torch.manual_seed(0)
    source = timm.create_model('gsop_resnet50', attn_mode='none', num_classes=4, **SMALL)
    source_acc = train(source, 24, 1e-3)
    assert source_acc >= 0.4, source_acc  # 4 classes: chance is 0.25
    path = tmp_path / 'source.safetensors'
    safetensors.torch.save_file(source.state_dict(), path)  # a timm ResNet's keys

    warm = _warm('gsop_resnet50.a1_in1k_backbone', str(path), num_classes=4, **SMALL)
    torch.testing.assert_close(warm.fc.weight, source.fc.weight, rtol=0, atol=0)
    warm_acc = train(warm, 6, 3e-4)
    torch.manual_seed(0)
    scratch_acc = train(timm.create_model('gsop_resnet50', num_classes=4, **SMALL), 6, 3e-4)
    assert warm_acc >= 0.4 and warm_acc > scratch_acc, (source_acc, warm_acc, scratch_acc)
    assert all(torch.isfinite(p).all() for p in warm.parameters())


def test_export_card_of_a_warm_started_run(small_source, tmp_path, fast_card):
    model = make_model('gsop_resnet50', 2, num_classes=10, **SMALL)
    args = dict(model='gsop_resnet50.a1_in1k_backbone', model_kwargs={'layers': [1, 1, 1, 1]}, num_classes=10,
                pretrained=True, epochs=2, opt='sgd', lr=0.01, input_size=None, crop_pct=None, interpolation='')
    ckpt = write_run(tmp_path / 'run', model, args)
    out = export_checkpoint(ckpt, tmp_path / 'export', verbose=False)
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'gsop_resnet50' and 'tag' not in config['pretrained_cfg']
    pcfg = config['pretrained_cfg']  # what train.py used: the tag's, the source ResNet's
    assert (pcfg['interpolation'], pcfg['crop_pct']) == ('bicubic', 0.95)
    readme = (out / 'README.md').read_text()
    assert ('**Started from:** the weights of [timm/resnet50.a1_in1k](https://huggingface.co/timm/resnet50.a1_in1k) '
            '(licence `apache-2.0`), through the backbone tag `gsop_resnet50.a1_in1k_backbone`: its stem and stages '
            "started from them; the GSoP blocks and the classifier from the model's initialisation") in readme
    # the folder reloads whole (no backbone tag in it): a strict load
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    torch.testing.assert_close(reloaded.layer1[0].attn.channel_gate.fc.weight,
                               model.layer1[0].attn.channel_gate.fc.weight, rtol=0, atol=0)
    # a run that did not load the source says nothing about it
    ckpt = write_run(tmp_path / 'run2', model, dict(args, pretrained=False))
    assert 'Started from' not in (export_checkpoint(ckpt, tmp_path / 'export2', verbose=False) / 'README.md').read_text()
