"""What only a CUDA GPU can show: CUDA equals CPU, bf16 autocast + channels_last, no host sync, compile.

Skipped without a GPU (the CPU suite covers the same contract on CPU). On a GPU machine
``benchmarks/gpu_checks.sh`` runs this file first, then the benchmarks.
"""
import contextlib

import pytest
import torch
import timm

import timm_gsop  # noqa: F401  (registers the models)
from timm_gsop.layers import GSoPAttn, covariance, sqrtm_newton_schulz

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

DEVICE = 'cuda'
MODELS = ['gsop_resnet50', 'gsop2_resnet50']


@contextlib.contextmanager
def _exact_float32():
    # TF32 (on by default for cuDNN convs) would blur a float32 comparison with the CPU.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _logits_and_input_grad(model, x, device):
    x = x.to(device).requires_grad_()
    out = model.to(device)(x)
    out.square().sum().backward()
    return out.detach().cpu(), x.grad.cpu()


def _rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('name', MODELS)
def test_cuda_equals_cpu_in_float64(name):
    # In float64 the kernels' different summation orders leave ~1e-14 (measured on an H200: 2e-14).
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).double().eval()
    x = torch.randn(2, 3, 160, 160, dtype=torch.float64)
    ref = _logits_and_input_grad(model, x, 'cpu')
    out = _logits_and_input_grad(model, x, DEVICE)
    for got, want in zip(out, ref):
        assert _rel_diff(got, want) < 1e-10


@pytest.mark.parametrize('name', MODELS)
def test_cuda_float32_differs_from_cpu_as_the_backbone_does(name):
    # In float32 a deep ResNet's input gradients differ between CUDA and CPU by ~5e-3 with no GSoP
    # block at all (measured on an H200): the GSoP model may differ by at most 10x its own backbone.
    errors = {}
    for mode in ('none', 'channel'):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, attn_mode=mode).eval()
        x = torch.randn(2, 3, 160, 160)
        ref = _logits_and_input_grad(model, x, 'cpu')
        with _exact_float32():
            out = _logits_and_input_grad(model, x, DEVICE)
        errors[mode] = [_rel_diff(got, want) for got, want in zip(out, ref)]
    for ours, backbone in zip(errors['channel'], errors['none']):
        assert ours <= 10 * backbone + 1e-5, errors


@pytest.mark.parametrize('name', MODELS)
def test_bf16_autocast_channels_last_train_step(name):
    # The GPU recipe's settings: bf16 autocast + channels_last. Logits stay near float32's and a
    # training step gives finite gradients everywhere.
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).to(DEVICE).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224, device=DEVICE).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad(), _exact_float32():
        ref = model(x)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(x)
    rel = (out.float() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and rel < 0.05, rel
    model.train()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(8, device=DEVICE) % 10)
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad


def test_second_order_ops_stay_float32_under_cuda_autocast():
    # Float32 maths inside bf16 autocast: the results match the plain float32 ones to float32
    # rounding (a bf16 product would be off by about 1e-2), and are float32 even for a bf16 input.
    x = torch.randn(4, 64, 14, 14, device=DEVICE).relu()
    with _exact_float32():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            cov = covariance(x)
            root = sqrtm_newton_schulz(cov)
        cov_ref = covariance(x)
        root_ref = sqrtm_newton_schulz(cov_ref)
    assert cov.dtype == torch.float32 and root.dtype == torch.float32
    assert covariance(x.bfloat16()).dtype == torch.float32
    torch.testing.assert_close(cov, cov_ref, rtol=1e-5, atol=1e-6 * cov_ref.abs().max().item())
    torch.testing.assert_close(root, root_ref, rtol=1e-5, atol=1e-6 * root_ref.abs().max().item())


@pytest.mark.parametrize('name', MODELS)
def test_forward_and_backward_make_no_host_sync(name):
    model = timm.create_model(name).to(DEVICE)
    x = torch.randn(4, 3, 224, 224, device=DEVICE)
    model.train()
    model(x).sum().backward()  # warm-up: cuDNN / cuBLAS set-up may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')  # any synchronising call now raises
    try:
        with torch.no_grad():
            model.eval()(x)
        model.train()(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')


@pytest.mark.parametrize('mode', ['channel', 'fusion_concat'])
def test_compiled_block_equals_eager_on_cuda(mode):
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = GSoPAttn(512, attn_mode=mode).to(DEVICE).train()
    x, shortcut = torch.randn(8, 512, 28, 28, device=DEVICE), torch.randn(8, 512, 28, 28, device=DEVICE)
    compiled = torch.compile(block, fullgraph=True)  # inductor; fullgraph: a graph break is an error
    with _exact_float32():
        xs = [x.clone().requires_grad_() for _ in range(2)]
        state = {k: v.clone() for k, v in block.state_dict().items()}
        out_eager = block(xs[0], shortcut)
        out_eager.square().sum().backward()
        block.load_state_dict(state)  # same BN running statistics for the compiled pass
        out_compiled = compiled(xs[1], shortcut)
        out_compiled.square().sum().backward()
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-3, atol=1e-3 * xs[0].grad.abs().max().item())


def _build(name, fused, **kwargs):
    from timm_gsop.layers import set_fused_gsop, use_fused_gsop
    saved = use_fused_gsop()
    set_fused_gsop(fused)
    try:
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=10, **kwargs)
    finally:
        set_fused_gsop(saved)


@pytest.mark.parametrize('name', MODELS)
def test_fused_ops_equal_eager_ops_on_cuda(name):
    # The Triton kernels (those present) against the eager ops, both on CUDA: float32 logits and gradients within
    # 2e-3 of the largest value; then the GPU recipe (bf16 autocast, channels_last) within 5 % of each other.
    models = [_build(name, fused).to(DEVICE).train() for fused in (False, True)]
    x = torch.randn(4, 3, 160, 160, device=DEVICE)
    results = []
    with _exact_float32():
        for model in models:
            xi = x.clone().requires_grad_()
            out = model(xi)
            out.square().sum().backward()
            results.append([out.detach(), xi.grad] + [p.grad for p in model.parameters()])
    scale = max(t.abs().max().item() for t in results[0][2:])
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-3 * max(ref.abs().max().item(), scale))
    x = x.contiguous(memory_format=torch.channels_last)
    outs = []
    for model in models:
        model = model.eval().to(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            outs.append(model(x).float())
    assert (outs[1] - outs[0]).norm() / outs[0].norm() < 0.05


def test_fused_gate_kernel_on_cuda_odd_sizes():
    from timm_gsop.layers.triton_gate import gate_product_bwd, gate_product_fwd
    for (b, c, h, w), dtype in (((1, 45, 7, 9), torch.float32), ((3, 70, 13, 13), torch.bfloat16)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(b, c, h, w, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
            shortcut, gate = torch.randn_like(x), torch.rand(b, c, 1, 1, device=DEVICE).to(dtype)
            out = gate_product_fwd(x, gate, shortcut, True)
            ref = (x.float() * gate.float() + shortcut.float()).relu()
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
            grad = torch.randn_like(x)
            grad_x, grad_gate, grad_sc = gate_product_bwd(grad, x, gate, out, True)
            g = grad.float() * (out.float() > 0)
            want = (g * x.float()).sum((2, 3))
            torch.testing.assert_close(grad_gate, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            torch.testing.assert_close(grad_sc.float(), g, rtol=0, atol=0)


def test_fused_block_compiles_on_cuda():
    import torch._dynamo
    torch._dynamo.reset()
    from timm_gsop.layers import set_fused_gsop, use_fused_gsop
    saved = use_fused_gsop()
    set_fused_gsop(True)
    try:
        block = GSoPAttn(512, reduce_stride=2).to(DEVICE).eval()
    finally:
        set_fused_gsop(saved)
    x, shortcut = torch.randn(8, 512, 28, 28, device=DEVICE), torch.randn(8, 512, 28, 28, device=DEVICE)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad(), _exact_float32():
        torch.testing.assert_close(compiled(x, shortcut, True), block(x, shortcut, True), rtol=1e-4, atol=1e-4)
