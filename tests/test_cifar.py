"""GSoP-Net ResNet-164 for CIFAR-100 (Net1 and Net2) at 32 px: shapes, grads, the timm contract."""
import re

import pytest
import torch

import timm
from timm.layers import DropPath, get_graph_node_names
from timm.models import group_parameters
from timm.models._features_fx import GraphExtractNet
from timm_gsop.layers import ATTN_MODES, GSoPAttn, IsqrtCovPool
from timm_gsop.models.gsop_resnet_cifar import CIFAR100_MEAN, CIFAR100_STD, GSoPResNetCifar

from checks import one_thread  # noqa: F401  the fixture

NAMES = ('gsop_resnet164_cifar', 'gsop2_resnet164_cifar')


# 32 px maps: one thread.
pytestmark = pytest.mark.usefixtures('one_thread')


def _x(batch=2, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _calibrate_bn(model):
    """BN running stats of one batch, so that eval outputs have the scale of a trained net, not ~1e5."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        model.train()(_x(8, seed=2))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    return {name: _calibrate_bn(timm.create_model(name)) for name in NAMES}


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def _stated_params(doc):
    m = re.search(r'([\d,]+) parameters', doc)
    assert m, f'no parameter count in {doc!r}'
    return int(m.group(1).replace(',', ''))


@pytest.mark.parametrize('name', NAMES)
def test_parameter_count_in_docstring(models, name):
    doc = timm.models.model_entrypoint(name).__doc__
    assert _num_params(models[name]) == _stated_params(doc)


def test_design_numbers_in_class_docstring(models):
    # The attn_dim / cov_dim rationale quotes parameter counts; they must be the model's.
    doc = GSoPResNetCifar.__doc__
    plain = _num_params(timm.create_model('gsop_resnet164_cifar', attn_mode='none'))
    wide = _num_params(timm.create_model('gsop_resnet164_cifar', attn_dim=128))
    net1, net2 = _num_params(models[NAMES[0]]), _num_params(models[NAMES[1]])
    for number in (plain, net1 - plain, wide - plain, models[NAMES[1]].fc.weight.numel()):
        assert f'{number:,}' in doc
    assert f'Net2 ({net2 / 1e6:.2f}M parameters)' in doc and f'Net1\n      ({net1 / 1e6:.2f}M)' in doc


@pytest.mark.parametrize('name', NAMES)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    x = _x().requires_grad_(True)
    out = model(x)
    assert out.shape == (2, 100)
    out.logsumexp(1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        assert p.grad is not None, f'{n} got no gradient'
        assert torch.isfinite(p.grad).all(), f'{n} has a non-finite gradient'
    attn = [m for m in model.modules() if isinstance(m, GSoPAttn)]
    assert len(attn) == (3 if name == NAMES[0] else 2)
    assert isinstance(model.global_pool, IsqrtCovPool) == (name == NAMES[1])


@pytest.mark.parametrize('name', NAMES)
def test_pretrained_cfg_and_input_size(models, name):
    model = models[name]
    cfg = model.pretrained_cfg
    assert cfg['num_classes'] == 100 and cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0
    assert tuple(cfg['mean']) == CIFAR100_MEAN and tuple(cfg['std']) == CIFAR100_STD
    assert cfg['min_input_size'] == (3, 32, 32) and not cfg.get('url') and not cfg.get('hf_hub_id')
    assert model.forward_features(_x()).shape[-2:] == tuple(cfg['pool_size']) == (8, 8)
    with pytest.raises(ValueError, match='at least 32 px'):
        model(_x(size=24))
    with pytest.raises(RuntimeError, match=f'No pretrained weights are published for {name}'):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize('name', NAMES)
def test_features_only(models, name):
    feat = timm.create_model(name, features_only=True).eval()
    assert feat.feature_info.reduction() == [1, 1, 2, 4]
    assert feat.feature_info.channels() == [16, 64, 128, 256]
    missing, _ = feat.load_state_dict(models[name].state_dict(), strict=False)
    assert not missing
    x = _x()
    with torch.no_grad():
        outs = feat(x)
        ref = models[name].forward_intermediates(x, norm=True, intermediates_only=True)
    assert [tuple(o.shape) for o in outs] == [(2, 16, 32, 32), (2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8)]
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r)
    assert (outs[-1] >= 0).all()  # the last feature is after the final BN-ReLU


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates_and_prune(models, name):
    model = models[name]
    x = _x()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(model.forward_head(final), model(x))
        assert model.forward_head(final, pre_logits=True).shape == (2, model.head_hidden_size)
        assert [tuple(t.shape[1:]) for t in inter] == [(16, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
        assert not torch.equal(inter[-1], final)  # norm=False: the stage output, before BN-ReLU
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last_two) == 2 and last_two[0].shape[1] == 128
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[1])

    pruned = timm.create_model(name).eval()
    pruned.load_state_dict(model.state_dict())
    assert pruned.prune_intermediate_layers(indices=[0, 1]) == [0, 1]
    assert _num_params(pruned.layer2) == _num_params(pruned.layer3) == 0
    assert isinstance(pruned.fc, torch.nn.Identity) and pruned.num_features == 64
    with torch.no_grad():
        got = pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    torch.testing.assert_close(got[1], inter[1])


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.filterwarnings('ignore:.*torch.jit.script.* is deprecated')
def test_torchscript_and_fx_equal_eager(models, name):
    model = models[name]
    x = _x()
    with torch.no_grad():
        ref = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), ref)
        _, eval_nodes = get_graph_node_names(model)
        fx_model = GraphExtractNet(model, [eval_nodes[-1]]).eval()
        torch.testing.assert_close(fx_model(x), ref)


def test_reset_classifier_net2_keeps_isqrt_pool(models):
    model = timm.create_model('gsop2_resnet164_cifar').eval()
    model.load_state_dict(models['gsop2_resnet164_cifar'].state_dict())
    pool = model.global_pool
    assert model.get_classifier() is model.fc and model.fc.in_features == 64 * 65 // 2
    model.reset_classifier(10)
    assert model.global_pool is pool and model.num_classes == 10
    assert model.fc.in_features == 2080 and model.fc.out_features == 10
    x = _x()
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        model.reset_classifier(0)
        assert model.global_pool is pool
        torch.testing.assert_close(model(x), models['gsop2_resnet164_cifar'].forward_head(
            models['gsop2_resnet164_cifar'].forward_features(x), pre_logits=True))
        model.reset_classifier(10, 'avg')
        assert not isinstance(model.global_pool, IsqrtCovPool) and model.fc.in_features == 256
        assert model(x).shape == (2, 10)


def test_attn_mode_choices():
    with pytest.raises(ValueError) as err:
        timm.create_model('gsop_resnet164_cifar', attn_mode='spatial')
    msg = str(err.value)
    assert "'spatial'" in msg and "'none'" in msg
    for mode in ATTN_MODES:
        assert repr(mode) in msg
    assert 'None' not in msg  # timm.create_model drops None arguments: 'none' is the spelling that reaches the model
    plain = timm.create_model('gsop_resnet164_cifar', attn_mode='none')
    assert plain.attn_mode == 'none' and not any(isinstance(m, GSoPAttn) for m in plain.modules())
    with pytest.raises(ValueError, match="pass attn_mode='none'"):
        timm.models.model_entrypoint('gsop_resnet164_cifar')(attn_mode=None)


@pytest.mark.parametrize('mode', ATTN_MODES[1:])
def test_other_attn_modes_forward(mode):
    # Position mode pools every stage's map (32, 16, 8 px) to 8x8.
    model = timm.create_model('gsop_resnet164_cifar', attn_mode=mode, layers=(1, 1, 1)).eval()
    with torch.no_grad():
        out = model(_x())
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    assert all(m.attn_mode == mode for m in model.modules() if isinstance(m, GSoPAttn))


def test_drop_path_drop_rate_checkpointing_channels_last(models):
    ref_model = models['gsop_resnet164_cifar']
    x = _x()
    with torch.no_grad():
        ref = ref_model(x)
    model = timm.create_model('gsop_resnet164_cifar', drop_path_rate=0.2, drop_rate=0.3).eval()
    assert sum(isinstance(m, DropPath) for m in model.modules()) == 53  # all blocks but the first
    model.load_state_dict(ref_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)  # eval: no drop, attn(x) + shortcut == fused add
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)
        model.set_grad_checkpointing(False)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)
    model.train()
    torch.manual_seed(0)
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(model.layer3[-1].attn.channel_gate.fc.weight.grad).all()
    # Grad checkpointing in training gives the same gradients.
    torch.manual_seed(0)
    model = timm.create_model('gsop_resnet164_cifar').train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        model(x).sum().backward()
        grads.append(model.conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_group_matcher(models):
    model = models['gsop_resnet164_cifar']
    groups = group_parameters(model, model.group_matcher())
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    group_list = list(groups.values())
    assert group_list[0] == ['conv1.weight']
    assert len(groups) == 1 + 54 + 1  # stem, blocks (the final norm joins the last one), head
    assert group_list[-2][0] == 'layer3.17.bn1.weight' and group_list[-2][-1] == 'norm.bias'
    assert group_list[-1] == ['fc.weight', 'fc.bias']
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 1 + 3 + 1
