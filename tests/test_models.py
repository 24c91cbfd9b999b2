"""timm's model contract for the GSoP-Net family, at small input sizes (224 px only where the cfg needs it)."""
import warnings

import pytest
import torch

import timm
import timm_gsop  # noqa: F401  registers the models
from timm_gsop.layers import ATTN_MODES, GSoPAttn, IsqrtCovPool
from timm_gsop.models.gsop_resnet import gsop_resnet50

NET1, NET2 = 'gsop_resnet50', 'gsop2_resnet50'
MODELS = ('gsop_resnet50', 'gsop_resnet101', 'gsop2_resnet50', 'gsop2_resnet101')
SMALL = 64
TINY = dict(layers=(1, 1, 1, 1), attn_dim=16)  # one bottleneck a stage: same GSoP layout, a fraction of the cost
torch.manual_seed(0)


def _x(size=SMALL, batch=2, chans=3):
    return torch.randn(batch, chans, size, size)


def test_registered_with_architecture_only_cfgs():
    assert set(MODELS) <= set(timm.list_models('gsop*'))
    for name in MODELS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875 and cfg.interpolation == 'bilinear'
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
        assert cfg.first_conv == 'conv1' and cfg.classifier == 'fc'
        assert not (cfg.url or cfg.hf_hub_id or cfg.file), 'no tag may claim weights that do not exist'


@pytest.mark.parametrize('name,params_m', [('gsop_resnet50', 28.29), ('gsop2_resnet50', 58.28)])
def test_parameter_count_matches_official_network(name, params_m):
    model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m


def test_gsop_blocks_sit_in_last_bottleneck_of_each_stage():
    for name, stages in ((NET1, 4), (NET2, 3)):
        model = timm.create_model(name, attn_dim=8)
        where = [n for n, m in model.named_modules() if isinstance(m, GSoPAttn)]
        assert where == ['layer1.2.attn', 'layer2.3.attn', 'layer3.5.attn', 'layer4.2.attn'][:stages]
        assert model.layer1[2].attn.reduce_stride == 2  # stage 1 (planes 64), as in the official code
        assert model.layer2[3].attn.reduce_stride == 1
    net2 = timm.create_model(NET2, attn_dim=8)
    assert isinstance(net2.global_pool, IsqrtCovPool) and net2.global_pool.out_features == 32896
    assert net2.global_pool.cov_dim == 256 and net2.global_pool.num_iter == 3


@pytest.mark.parametrize('name', [NET1, NET2])
def test_default_cfg_contract_at_224(name):
    # What timm's own test_model_default_cfgs checks for every model.
    model = timm.create_model(name, attn_dim=16).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape[-2:] == cfg['pool_size'] == (14, 14)  # last stage stride 1
        assert feats.shape[1] == model.num_features == 2048
        assert pre.shape[1] == model.head_hidden_size == (32896 if name == NET2 else 2048)
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert model(x).shape == pre.shape
        model.reset_classifier(0, '')
        assert model(x).shape[-2:] == (14, 14)
    model = timm.create_model(name, num_classes=0, global_pool='', attn_dim=16).eval()
    with torch.no_grad():
        assert model(x).shape == (1, 2048, 14, 14)
    state_dict = model.state_dict()
    assert 'conv1.weight' in state_dict


@pytest.mark.parametrize('mode', ATTN_MODES + ('none',))
@pytest.mark.parametrize('name', [NET1, NET2])
def test_forward_backward_every_mode(name, mode):
    kwargs = dict(TINY, attn_dim=None) if mode == 'none' else TINY  # attn_dim without GSoP blocks is an error
    model = timm.create_model(name, attn_mode=mode, num_classes=7, **kwargs)
    model.train()
    out = model(_x())
    assert out.shape == (2, 7)
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without gradient: {no_grad[:5]}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    has_attn = any(isinstance(m, GSoPAttn) for m in model.modules())
    assert has_attn == (mode != 'none')


def test_attn_mode_none_is_the_plain_backbone():
    # One spelling of the ablation baseline, 'none': create_model drops None arguments (None there keeps
    # 'channel'), so None is refused where it arrives, with the spelling that works.
    a = timm.create_model(NET1, attn_mode='none')
    ref = timm.create_model('resnet50')
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in ref.parameters())
    assert [k for k in a.state_dict()] == [k for k in ref.state_dict()]
    with pytest.raises(ValueError, match="attn_mode=None: pass attn_mode='none'"):
        gsop_resnet50(attn_mode=None)


@pytest.mark.parametrize('size', [(64, 64), (96, 128), (100, 77), (160, 160)])
def test_any_input_size_from_64(size):
    model = timm.create_model(NET2, attn_mode='fusion_concat', num_classes=3, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_small_input_is_a_clear_error():
    model = timm.create_model(NET1, attn_dim=16).eval()
    with pytest.raises(ValueError, match='at least 64 px'):
        model(torch.randn(1, 3, 63, 80))


def test_in_chans_and_num_classes():
    model = timm.create_model(NET2, in_chans=1, num_classes=4, attn_dim=16).eval()
    assert model.conv1.in_channels == 1
    assert model(_x(chans=1)).shape == (2, 4)


def test_bad_model_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="valid: 'channel', 'position'"):
        timm.create_model(NET1, attn_mode='chanel')
    with pytest.raises(ValueError, match=r'attn_dim must be an integer in \[1, 2048\]'):
        timm.create_model(NET1, attn_dim=0)


def test_pretrained_without_weights_says_how_to_load_a_file():
    with pytest.raises(RuntimeError, match=r"No pretrained weights are published.*pretrained_cfg_overlay=dict\(file="):
        timm.create_model(NET1, pretrained=True)


def test_features_only_and_feature_info():
    model = timm.create_model(NET1, features_only=True, attn_dim=16).eval()
    assert model.feature_info.reduction() == [2, 4, 8, 16, 16]
    assert model.feature_info.channels() == [64, 256, 512, 1024, 2048]
    with torch.no_grad():
        feats = model(_x(128, batch=1))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 64, 64), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 8, 8)]
    model = timm.create_model(NET2, features_only=True, out_indices=(2, 4), attn_dim=16)
    assert model.feature_info.reduction() == [8, 16]


def test_forward_intermediates():
    model = timm.create_model(NET2, attn_dim=16).eval()
    x = _x(96, batch=1)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 5
        assert [f.shape[1] for f in inter] == [64, 256, 512, 1024, 2048]
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        torch.testing.assert_close(only[1], inter[3])
        kept = model.prune_intermediate_layers(indices=[1, 2])
        assert kept == [1, 2] and isinstance(model.layer3, torch.nn.Sequential) and len(model.layer3) == 0
        assert len(model.forward_intermediates(x, intermediates_only=True, indices=[1, 2])) == 2


def test_reset_classifier_net2_keeps_the_isqrt_pool():
    model = timm.create_model(NET2, attn_dim=16).eval()
    pool = model.global_pool
    model.reset_classifier(10)
    assert model.global_pool is pool
    assert model.get_classifier().in_features == 32896 and model.get_classifier().out_features == 10
    assert model(_x()).shape == (2, 10)
    model.reset_classifier(5, global_pool='avg')
    assert model.head_hidden_size == 2048 and model(_x()).shape == (2, 5)
    assert model.get_classifier(name_only=True) == 'fc'


def test_group_matcher_covers_every_parameter():
    model = timm.create_model(NET2, **TINY)
    groups = timm.models.group_parameters(model, model.group_matcher())
    names = [n for group in groups.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    ordered = list(groups.values())
    assert 'conv1.weight' in ordered[0]
    assert {'fc.weight', 'global_pool.conv_reduce.weight'} <= set(ordered[-1])  # the head is the last group
    assert len(groups) == 1 + 4 + 1  # stem, one block per stage, head


def test_grad_checkpointing_same_output_and_grads():
    model = timm.create_model(NET1, attn_mode='fusion_avg', **TINY).eval()
    x = _x()
    out_ref = model(x)
    out_ref.sum().backward()
    grads_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip((p.grad for p in model.parameters()), grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name,mode', [(NET1, 'fusion_concat'), (NET2, 'fusion_max'), (NET2, 'position')])
def test_torchscript_equals_eager(name, mode):
    model = timm.create_model(name, attn_mode=mode, **TINY).eval()
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def _fx_model(model):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    kw = dict(leaf_modules=timm.models.get_notrace_modules(), autowrap_functions=timm.models.get_notrace_functions(),
              param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw)


@pytest.mark.parametrize('name,mode', [(NET1, 'channel'), (NET2, 'fusion_concat'), (NET1, 'fusion_avg')])
def test_fx_equals_eager_forward_and_backward(name, mode):
    model = timm.create_model(name, attn_mode=mode, **TINY).eval()
    x = _x()
    fx_model = _fx_model(model)
    with torch.no_grad():
        assert torch.equal(tuple(fx_model(x).values())[0], model(x))
    fx_model.train()
    out = tuple(fx_model(x).values())[0]
    out.mean().backward()
    assert all(p.grad is not None for p in fx_model.parameters())
    # The input size check survives tracing as a call, not as a baked-in branch.
    with pytest.raises(ValueError, match='at least 64 px'):
        fx_model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize('mode', ATTN_MODES)
def test_gsop_block_compiles_without_graph_breaks(mode):
    import torch._dynamo
    torch._dynamo.reset()
    attn = GSoPAttn(256, attn_mode=mode, attn_dim=32, reduce_stride=2).eval()
    x, shortcut = torch.randn(2, 256, 14, 14), torch.randn(2, 256, 14, 14)
    compiled = torch.compile(attn, backend='aot_eager', fullgraph=True)  # fullgraph: a break is an error
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, shortcut), attn(x, shortcut))
    # Training, channels_last: the compiled backward (the block's own autograd Functions) equals eager.
    attn.train()
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    shortcut.requires_grad_()
    leaves = (x, shortcut, *attn.parameters())
    grads = [torch.autograd.grad(f(x, shortcut).square().sum(), leaves) for f in (compiled, attn)]
    for got, ref in zip(*grads):
        # A conv bias before a train-mode BN has a zero gradient up to rounding: compare at the grads' scale.
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * max(g.abs().max().item() for g in grads[1]))


def test_whole_model_compiles_without_graph_breaks():
    import torch._dynamo
    torch._dynamo.reset()
    model = timm.create_model(NET2, attn_mode='fusion_concat', **TINY).eval()
    x = _x()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_channels_last_matches():
    model = timm.create_model(NET2, attn_mode='fusion_avg', **TINY).eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', [NET1, NET2])
def test_bf16_autocast_logits_within_5_percent(name):
    model = timm.create_model(name, attn_mode='fusion_concat', attn_dim=32).eval()
    x = _x(96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    rel = (out.float() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and rel < 0.05, rel


def test_net2_zero_image_is_finite():
    # The official Net2 returns NaN here (0/0 in the trace normalisation).
    model = timm.create_model(NET2, **TINY).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, SMALL, SMALL))
    assert torch.isfinite(out).all()
    model.train()
    x = torch.zeros(2, 3, SMALL, SMALL, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()
