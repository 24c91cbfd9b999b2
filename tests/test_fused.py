"""The fused GSoP ops (TIMM_GSOP_FUSED=1 / set_fused_gsop): each op's eager kernel against its definition in float64
with gradcheck, the whole model with the switch on against off, hooks, state dicts, scripting, fx, compile and ONNX
with the switch on; the Triton kernels on the CPU through Triton's interpreter (a subprocess: TRITON_INTERPRET must
be set before Triton is imported)."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import timm
import timm_gsop  # noqa: F401  registers the models
from timm_gsop.layers import ATTN_MODES, GSoPAttn, set_fused_gsop, use_fused_gsop
from timm_gsop.layers import fused_ops
from timm_gsop.layers.gsop import BatchNormReluCov2d, ReluConv2d

from checks import assert_hooks_fire_on_every_module_with_parameters

TINY = dict(layers=(1, 1, 1, 1), attn_dim=16, num_classes=10)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fused():
    saved = use_fused_gsop()
    set_fused_gsop(True)
    yield
    set_fused_gsop(saved)


def _build(name, fused_on, seed=0, **kwargs):
    saved = use_fused_gsop()
    set_fused_gsop(fused_on)
    try:
        torch.manual_seed(seed)
        return timm.create_model(name, **{**TINY, **kwargs})
    finally:
        set_fused_gsop(saved)


def test_switch_reads_the_environment_and_the_setter():
    env = {**os.environ, 'TIMM_GSOP_FUSED': '1', 'PYTHONPATH': ROOT}
    code = 'from timm_gsop.layers import use_fused_gsop; print(use_fused_gsop())'
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'True'
    env['TIMM_GSOP_FUSED'] = '0'
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'False'
    saved = use_fused_gsop()
    try:
        set_fused_gsop(True)
        assert GSoPAttn(32, attn_dim=8).channel_gate.fused
        set_fused_gsop(False)
        assert not GSoPAttn(32, attn_dim=8).channel_gate.fused
    finally:
        set_fused_gsop(saved)


# ---- each op's eager kernel against its definition, float64, and gradcheck ----

def test_relu_reduce_matches_its_definition_and_gradcheck():
    torch.manual_seed(0)
    for stride in (1, 2):
        x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 5, 1, 1, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        ref = F.conv2d(F.relu(x[:, :, ::stride, ::stride]), w, b)
        torch.testing.assert_close(fused_ops.relu_reduce(x, w, b, stride), ref, rtol=1e-12, atol=1e-12)
        assert gradcheck(lambda *t: fused_ops.relu_reduce(*t, stride), (x, w, b))
        # Through the join: the gradient added in place into the gate product's equals autograd's sum.
        gate = torch.rand(2, 5, 1, 1, dtype=torch.float64)

        def joined(x, w, b):
            xj = fused_ops.join_reduction(x, w, b, stride)
            return fused_ops.gate_product(xj, gate, None, True), fused_ops.relu_reduce(xj, w, b, stride).sin()

        def plain(x, w, b):
            return F.relu(x * gate), F.conv2d(F.relu(x[:, :, ::stride, ::stride]), w, b).sin()

        got = torch.autograd.grad([t.square().sum() for t in joined(x, w, b)], (x, w, b))
        want = torch.autograd.grad([t.square().sum() for t in plain(x, w, b)], (x, w, b))
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('training', [True, False])
def test_bn_relu_cov_matches_batch_norm_relu_covariance(training):
    torch.manual_seed(0)
    y = torch.randn(3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    running_mean, running_var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def fused_fn(y, weight, bias):
        if training:
            mean, var = fused_ops.batch_norm_stats_(
                y, running_mean.clone(), running_var.clone(), torch.zeros((), dtype=torch.long), 0.1)
        else:
            mean, var = running_mean, running_var
        return fused_ops.bn_relu_cov(y, mean, var, weight, bias, 1e-5, training)

    def reference(y, weight, bias):
        z = F.relu(F.batch_norm(y, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-5))
        z = z.flatten(2) - z.flatten(2).mean(2, keepdim=True)
        return z @ z.transpose(1, 2) / z.shape[2]

    torch.testing.assert_close(fused_fn(y, weight, bias), reference(y, weight, bias), rtol=1e-12, atol=1e-12)
    assert gradcheck(fused_fn, (y, weight, bias))


def test_batch_norm_stats_update_running_statistics_as_batch_norm():
    torch.manual_seed(0)
    y = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3 + 1
    bn = torch.nn.BatchNorm2d(6, momentum=0.3).double().train()
    bn(y)
    rm, rv, n = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64), torch.zeros((), dtype=torch.long)
    mean, var = fused_ops.batch_norm_stats_(y, rm, rv, n, 0.3)
    torch.testing.assert_close(mean, y.mean((0, 2, 3)))
    torch.testing.assert_close(var, y.var((0, 2, 3), unbiased=False))
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)
    assert n.item() == bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize('relu', [False, True])
def test_gate_product_matches_its_definition_and_gradcheck(relu):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(2, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    shortcut = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.addcmul(shortcut, x, gate)
    ref = ref.relu() if relu else ref
    torch.testing.assert_close(fused_ops.gate_product(x, gate, shortcut, relu), ref, rtol=1e-14, atol=1e-14)
    assert gradcheck(lambda *t: fused_ops.gate_product(*t, relu), (x, gate, shortcut))
    assert gradcheck(lambda x, g: fused_ops.gate_product(x, g, None, relu), (x, gate))


def test_ops_run_on_the_meta_device():
    x = torch.randn(2, 8, 6, 6, device='meta')
    y = fused_ops.relu_reduce(x, torch.randn(4, 8, 1, 1, device='meta'), None, 2)
    assert y.shape == (2, 4, 3, 3)
    assert fused_ops.gate_product(x, torch.randn(2, 8, 1, 1, device='meta'), x, True).shape == x.shape


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip('triton')
    env = {**os.environ, 'TRITON_INTERPRET': '1', 'PYTHONPATH': ROOT}
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'fused_interpret_checks.py')],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


# ---- the models: switch on against off ----

# In float64: the same maths to rounding. Float32 is held to the float64 truth in test_fused_truth.py, at points shown
# well-posed; float32 on against float32 off would ride on ReLU inputs within rounding of zero.
@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50', 'gsop_resnet164_cifar'])
@pytest.mark.parametrize('dtype', [torch.float64])
def test_model_switch_on_equals_off(name, dtype):
    size = 32 if 'cifar' in name else 64
    kwargs = dict(layers=(1, 1, 1), attn_dim=8) if 'cifar' in name else {}
    models = [_build(name, f, **kwargs).to(dtype) for f in (False, True)]
    assert any(isinstance(m, ReluConv2d) for m in models[1].modules())
    assert not any(isinstance(m, ReluConv2d) for m in models[0].modules())
    sd = [m.state_dict() for m in models]
    assert list(sd[0]) == list(sd[1]) and all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    x = torch.randn(2, 3, size, size, dtype=dtype)
    results = []
    for m in models:
        xi = x.clone().requires_grad_()
        out = m.train()(xi)
        out.square().sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad for p in m.parameters()]
                       + [b.clone() for b in m.buffers() if b.is_floating_point()])
    tol = 1e-10
    # A conv bias before a train-mode BN has a zero gradient up to rounding: every comparison at the largest
    # gradient's scale.
    scale = max(t.abs().max().item() for t in results[0][2:])
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=0, atol=tol * max(ref.abs().max().item(), scale if got.dim() else 0))
    with torch.no_grad():
        eval_out = [m.eval()(x) for m in models]
    torch.testing.assert_close(eval_out[1], eval_out[0], rtol=0, atol=tol * eval_out[0].abs().max().item())


def test_fused_parts_replace_the_channel_gate_modules_only(fused):
    model = timm.create_model('gsop_resnet50', attn_mode='fusion_avg', **TINY)
    assert not any(isinstance(m, (ReluConv2d, BatchNormReluCov2d)) for n, m in model.named_modules()
                   if 'position_gate' in n)
    attn = GSoPAttn(32, attn_dim=8, act_layer='silu')
    assert not attn.channel_gate.fused and not isinstance(attn.channel_gate.conv_reduce, ReluConv2d)


@pytest.mark.parametrize('mode', ['channel', 'fusion_max'])
def test_hooks_fire_with_the_switch_on(fused, mode):
    model = timm.create_model('gsop_resnet50', attn_mode=mode, **TINY)
    assert_hooks_fire_on_every_module_with_parameters(model, 64)


def test_a_swapped_batch_norm_falls_back_to_the_eager_ops(fused):
    # SyncBatchNorm / FrozenBatchNorm conversions replace the gate's BatchNorm: the gate then runs eagerly.
    attn = GSoPAttn(32, attn_dim=8).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        ref = attn(x)
        bn = torch.nn.BatchNorm2d(8)
        bn.load_state_dict(attn.channel_gate.bn_reduce.state_dict())
        attn.channel_gate.bn_reduce = bn.eval()
        assert not attn.channel_gate.fusable()
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('stride', [1, 2])
def test_backward_never_changes_a_gradient_it_handed_out(fused, stride):
    # The map's gradient reaches a hook (and retain_grad) between the gate product's backward and the reduction's:
    # what they keep must be what autograd handed them, and the map's gradient still the sum of both uses.
    attn = GSoPAttn(32, attn_dim=8, reduce_stride=stride)
    x, shortcut = torch.randn(2, 32, 7, 6, requires_grad=True), torch.randn(2, 32, 7, 6)
    kept, maps = [], []

    def keep(module, args):
        map_, = args[:1]
        map_.register_hook(lambda g: kept.append((g, g.clone())))
        map_.retain_grad()
        maps.append(map_)

    attn.channel_gate.register_forward_pre_hook(keep)
    attn(x, shortcut, True).square().sum().backward()
    assert len(kept) == 1 and maps[0] is not x  # the gate's input is the block's own map, not the leaf
    for grad, copy in kept + [(maps[0].grad, copy) for _, copy in kept]:
        assert torch.equal(grad, copy)
    ref = [t.detach().clone().requires_grad_() for t in (x, shortcut)]
    saved = use_fused_gsop()
    set_fused_gsop(False)
    eager = GSoPAttn(32, attn_dim=8, reduce_stride=stride)
    set_fused_gsop(saved)
    eager.load_state_dict(attn.state_dict())
    eager(ref[0], ref[1], True).square().sum().backward()
    torch.testing.assert_close(x.grad, ref[0].grad, rtol=1e-4, atol=1e-5 * ref[0].grad.abs().max().item())
    assert not torch.equal(x.grad, kept[0][1]), 'the reduction added its gradient to the map\'s'


def test_double_backward_is_refused_in_one_line(fused):
    model = timm.create_model('gsop_resnet50', **TINY)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match='no double backward') as err:
        torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    assert '\n' not in str(err.value) and 'set_fused_gsop(False)' in str(err.value)


# ---- defects: the position block as timm's attn_layer ----

@pytest.mark.parametrize('fused_on', [False, True])
@pytest.mark.parametrize('mode', ATTN_MODES)
@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_every_mode_backpropagates_as_timm_attn_layer(arch, mode, fused_on):
    from functools import partial
    saved = use_fused_gsop()
    set_fused_gsop(fused_on)
    try:
        model = timm.create_model(arch, num_classes=5, block_args=dict(
            attn_layer=partial(GSoPAttn, attn_mode=mode, attn_dim=8)))
    finally:
        set_fused_gsop(saved)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    model(x).square().sum().backward()  # timm adds the shortcut in place to the layer's output
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---- scripting, fx, compile, ONNX with the switch on ----

@pytest.mark.filterwarnings('ignore:.*torch.jit.script.* is deprecated')
def test_torchscript_with_the_switch_on(fused):
    model = timm.create_model('gsop_resnet50', **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


def test_fx_with_the_switch_on(fused):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    model = timm.create_model('gsop_resnet50', **TINY).eval()
    kw = dict(leaf_modules=timm.models.get_notrace_modules(), autowrap_functions=timm.models.get_notrace_functions(),
              param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    fx_model = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tuple(fx_model(x).values())[0], model(x))
    fx_model.train()
    tuple(fx_model(x).values())[0].mean().backward()
    assert all(p.grad is not None for p in fx_model.parameters())


def test_block_compiles_fullgraph_with_the_switch_on(fused):
    import torch._dynamo
    torch._dynamo.reset()
    attn = GSoPAttn(64, attn_dim=16, reduce_stride=2)
    x, shortcut = torch.randn(2, 64, 9, 9), torch.randn(2, 64, 9, 9)
    compiled = torch.compile(attn, backend='aot_eager', fullgraph=True)
    with torch.no_grad():
        attn.eval()
        torch.testing.assert_close(compiled(x, shortcut, True), attn(x, shortcut, True))
    attn.train()
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    leaves = (x, shortcut.requires_grad_(), *attn.parameters())
    grads = [torch.autograd.grad(f(x, shortcut, True).square().sum(), leaves) for f in (compiled, attn)]
    scale = max(g.abs().max().item() for g in grads[1])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize('fused_on', [False, True])
def test_onnx_export(fused_on, tmp_path):
    onnx = pytest.importorskip('onnx')
    pytest.importorskip('onnxscript')
    model = _build('gsop_resnet50', fused_on).eval()
    path = tmp_path / 'model.onnx'
    x = torch.randn(1, 3, 64, 64)
    torch.onnx.export(model, (x,), str(path))
    proto = onnx.load(str(path))
    graph = proto.graph
    from onnx.reference import ReferenceEvaluator
    (logits,) = ReferenceEvaluator(proto).run(None, {graph.input[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-4)
    # Export takes the eager ops: standard ONNX nodes only, no custom timm_gsop op.
    assert graph.node and not [n for n in graph.node if n.domain.startswith('timm_gsop') or 'gsop' in n.op_type]
    assert any(n.op_type == 'Sigmoid' for n in graph.node)  # the gates are in the graph
