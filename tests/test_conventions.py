"""timm 1.0.31's conventions, on both model classes and the layers: factory keywords, layers by name,
every parameterised module called in forward, a classifier reset that keeps device, dtype and mode,
and argument errors that name the argument."""
import pytest
import torch
from torch import nn

import timm
import timm_gsop  # noqa: F401  registers the models
from timm.models._manipulate import reinit_non_persistent_buffers
from timm_gsop.layers import ATTN_MODES, GSoPAttn, IsqrtCovPool

from checks import assert_hooks_fire_on_every_module_with_parameters

TINY = dict(layers=(1, 1, 1, 1), attn_dim=16)
TINY_CIFAR = dict(layers=(1, 1, 1), attn_dim=8)
# (model name, small kwargs, input size): every class, Net1 and Net2.
CASES = [
    ('gsop_resnet50', TINY, 64),
    ('gsop2_resnet50', TINY, 64),
    ('gsop_resnet164_cifar', TINY_CIFAR, 32),
    ('gsop2_resnet164_cifar', TINY_CIFAR, 32),
]
IDS = [c[0] for c in CASES]


def _tensors(model):
    return [*model.named_parameters(), *model.named_buffers()]


@pytest.mark.parametrize('name,kwargs,size', CASES, ids=IDS)
def test_meta_device_allocates_nothing(name, kwargs, size):
    model = timm.create_model(name, attn_mode='fusion_concat', device='meta', **kwargs)
    assert {t.device.type for _, t in _tensors(model)} == {'meta'}
    # The model still runs there (shapes only), as timm's own cfg test does.
    assert model(torch.randn(1, 3, size, size, device='meta')).shape == (1, model.num_classes)


def test_meta_model_materialises_with_its_computed_buffers():
    # The iSQRT-COV triangle index is computed, not saved: init_non_persistent_buffers rebuilds it.
    model = timm.create_model('gsop2_resnet50', device='meta', **TINY)
    model = model.to_empty(device='cpu')
    reinit_non_persistent_buffers(model)
    reference = timm.create_model('gsop2_resnet50', **TINY)
    assert torch.equal(model.global_pool.index, reference.global_pool.index)


@pytest.mark.parametrize('name,kwargs,size', CASES, ids=IDS)
def test_dtype_makes_every_floating_tensor_that_dtype(name, kwargs, size):
    model = timm.create_model(name, dtype=torch.bfloat16, **kwargs).eval()
    floating = {t.dtype for _, t in _tensors(model) if t.is_floating_point()}
    assert floating == {torch.bfloat16}
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize('name,kwargs,size', CASES, ids=IDS)
def test_act_and_norm_layers_by_name(name, kwargs, size):
    model = timm.create_model(name, act_layer='silu', norm_layer='batchnorm2d', **kwargs)
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    # Every activation takes the named layer, but for the iSQRT-COV head's ReLU (documented).
    relus = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert all(n.startswith('global_pool.') for n in relus), relus
    model(torch.randn(2, 3, size, size)).sum().backward()


def test_gsop_layer_takes_act_and_norm_by_name():
    attn = GSoPAttn(32, attn_mode='fusion_concat', attn_dim=8, act_layer='silu', norm_layer='batchnorm2d')
    assert isinstance(attn.channel_gate.act, nn.SiLU) and isinstance(attn.position_gate.act, nn.SiLU)
    assert isinstance(attn.fuse_bn, nn.BatchNorm2d)
    pool = IsqrtCovPool(32, cov_dim=8, act_layer='silu', norm_layer='batchnorm2d')
    assert isinstance(pool.act, nn.SiLU)
    assert attn(torch.randn(2, 32, 9, 9)).shape == (2, 32, 9, 9)


@pytest.mark.parametrize('mode', ATTN_MODES)
@pytest.mark.parametrize('name,kwargs,size', CASES, ids=IDS)
def test_forward_hooks_fire_on_every_module_with_parameters(name, kwargs, size, mode):
    # What hooks, module swaps, pruning and quantisation tools rely on: the registered graph is the one that runs.
    model = timm.create_model(name, attn_mode=mode, **kwargs)
    with_params = assert_hooks_fire_on_every_module_with_parameters(model, size)
    assert any('row_conv' in n for n in with_params) and any('conv_reduce' in n for n in with_params)


def test_module_swap_changes_the_output():
    # A module replaced from outside is the module that runs (here: the stage-1 gate's row conv, and its fc).
    model = timm.create_model('gsop_resnet50', **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        gate = model.layer1[0].attn.channel_gate
        gate.row_conv = nn.Conv2d(16, 64, (16, 1), groups=16)  # fresh weights, same shapes
        assert not torch.allclose(model(x), ref)
        gate.fc = nn.Identity()  # an fc of another shape now fails: the fc is called, not read
        with pytest.raises(RuntimeError):
            model(x)


@pytest.mark.parametrize('name,kwargs,size', CASES, ids=IDS)
def test_reset_classifier_keeps_device_dtype_and_mode(name, kwargs, size):
    model = timm.create_model(name, **kwargs).to(torch.float64).eval()
    pool = model.global_pool
    model.reset_classifier(3)
    fc = model.get_classifier()
    assert all(p.dtype == torch.float64 for p in fc.parameters())
    assert not fc.training and not model.global_pool.training
    assert (model.global_pool is pool) == isinstance(pool, IsqrtCovPool)  # a trained iSQRT-COV pool stays
    model.reset_classifier(4, global_pool='avg')
    assert not any(m.training for m in model.modules())
    assert all(p.dtype == torch.float64 for p in model.get_classifier().parameters())
    out = model(torch.randn(2, 3, size, size, dtype=torch.float64))
    assert out.shape == (2, 4) and out.dtype == torch.float64
    model.train().reset_classifier(5)
    assert model.get_classifier().training


BAD_ARGS = [
    (dict(attn_dim=True), 'attn_dim'),
    (dict(attn_dim=2.5), 'attn_dim'),
    (dict(attn_dim=0), 'attn_dim'),
    (dict(num_classes=-1), 'num_classes'),
    (dict(num_classes=2.0), 'num_classes'),
    (dict(in_chans=0), 'in_chans'),
    (dict(layers=(3, 4, 6)), 'layers'),
    (dict(layers=(3, 4, 0, 3)), r'layers\[2\]'),
    (dict(attn_stages=(1, 1, 1, 1)), 'attn_stages'),
    (dict(last_stride=3), 'last_stride'),
    (dict(global_pool='mean'), "global_pool.*valid: 'avg'"),
    (dict(drop_rate=1.5), 'drop_rate'),
    (dict(drop_path_rate=-0.1), 'drop_path_rate'),
    (dict(min_input_size=0), 'min_input_size'),
    (dict(zero_init_last='yes'), 'zero_init_last'),
    (dict(attn_mode='chanel'), "valid: 'channel', 'position'.*or 'none' for the backbone"),
    (dict(last_stride=2.0), 'last_stride must be 1 or 2'),
    (dict(act_layer='foo'), "act_layer='foo' is not a layer class or one of timm's names: .*relu"),
    (dict(norm_layer='foo'), "norm_layer='foo' is not a layer class or one of timm's names: .*batchnorm"),
    (dict(act_layer=3), 'act_layer=3'),
    # What no GSoP-Net is, refused before anything is allocated:
    (dict(attn_dim=30000), r"attn_dim must be an integer in \[1, 2048\] \(the widest stage's channels\)"),
    (dict(layers=(1000000, 1, 1, 1)), r'layers\[0\] must be an integer in \[1, 1000\]'),
    (dict(num_classes=10 ** 11), r'num_classes must be an integer in \[0, 1000000\]'),
    (dict(num_classes=1e11), 'num_classes'),
    (dict(in_chans=10 ** 6), r'in_chans must be an integer in \[1, 4096\]'),
    (dict(global_pool='isqrt', cov_dim=10 ** 5), r'cov_dim must be an integer in \[1, 2048\]'),
    (dict(global_pool='isqrt', sqrt_iters=10 ** 6), r'sqrt_iters must be an integer in \[1, 100\]'),
    # Arguments the model would ignore:
    (dict(cov_dim=128), "cov_dim sets the iSQRT-COV pool.*no effect with global_pool='avg'"),
    (dict(sqrt_iters=5), "sqrt_iters sets the iSQRT-COV pool"),
    (dict(attn_mode='none', attn_dim=64), 'attn_dim has no effect on a model without GSoP blocks'),
]


@pytest.mark.parametrize('kwargs,message', BAD_ARGS, ids=[next(iter(k)) + f'-{i}' for i, (k, _) in enumerate(BAD_ARGS)])
def test_bad_model_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model('gsop_resnet50', device='meta', **kwargs)


def test_bad_net2_and_cifar_arguments_name_the_argument():
    for kwargs, message in ((dict(cov_dim=2.5), 'cov_dim'), (dict(sqrt_iters=0), 'sqrt_iters')):
        with pytest.raises(ValueError, match=message):
            timm.create_model('gsop2_resnet50', device='meta', **kwargs)
    with pytest.raises(ValueError, match='stem_chs'):
        timm.create_model('gsop_resnet164_cifar', device='meta', stem_chs=0)
    with pytest.raises(ValueError, match=r"attn_dim must be an integer in \[1, 256\]"):  # CIFAR's widest stage
        timm.create_model('gsop_resnet164_cifar', device='meta', attn_dim=512)
    with pytest.raises(ValueError, match='3 stages'):
        timm.create_model('gsop_resnet164_cifar', device='meta', layers=(18, 18, 18, 18))
    # The values each model does use are accepted, and stored where the classifier reset finds them.
    net2 = timm.create_model('gsop2_resnet50', device='meta', cov_dim=64, sqrt_iters=5, attn_dim=32)
    assert (net2.global_pool.cov_dim, net2.global_pool.num_iter, net2.attn_dim) == (64, 5, 32)


def test_forward_code_is_written_once():
    # The two families share the forward passes and the bottleneck's residual end (in _base.py), and the CIFAR
    # file uses nothing of the ImageNet file.
    import ast
    import inspect
    from timm_gsop.models import GSoPBottleneck, GSoPPreActBottleneck, GSoPResNet, GSoPResNetCifar, gsop_resnet_cifar
    shared = ('forward', 'forward_features', 'forward_intermediates', 'prune_intermediate_layers', 'forward_head')
    for cls in (GSoPResNet, GSoPResNetCifar):
        assert not set(shared) & set(vars(cls)), cls
        assert set(vars(cls)) >= {'forward_stem', '__init__', 'group_matcher'}
    for cls in (GSoPBottleneck, GSoPPreActBottleneck):
        assert 'add_shortcut' not in vars(cls) and 'init_residual' not in vars(cls)
    tree = ast.parse(inspect.getsource(gsop_resnet_cifar))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert 'gsop_resnet' not in imported and not any(m and m.endswith('.gsop_resnet') for m in imported)
