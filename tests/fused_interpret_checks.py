"""The Triton kernels on the CPU through Triton's interpreter, against the ops' eager kernels.

Run by tests/test_fused.py in a subprocess with TRITON_INTERPRET=1 (Triton reads it when the kernels are
defined, so it must be set before this process imports them). Exits non-zero with the first failed check.
"""
import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get('TRITON_INTERPRET') == '1', 'run with TRITON_INTERPRET=1'

import timm  # noqa: E402
import timm_gsop  # noqa: E402,F401
from timm_gsop.layers import fused_ops, set_fused_gsop  # noqa: E402
from timm_gsop.layers.triton_gate import gate_product_bwd, gate_product_fwd  # noqa: E402


def eager_gate_product(x, gate, shortcut, relu):
    out = x.float() * gate.float() + (0 if shortcut is None else shortcut.float())
    return out.relu() if relu else out


def check_gate_kernels():
    # Odd sizes: H*W not a multiple of the 64-wide block, channels not a power of two nor of the 32-wide block.
    cases = [((1, 45, 7, 9), torch.float32), ((2, 70, 5, 13), torch.float32), ((2, 33, 3, 5), torch.bfloat16),
             ((1, 96, 17, 17), torch.bfloat16)]
    for (b, c, h, w), dtype in cases:
        for channels_last in (False, True):
            for relu in (False, True):
                for with_shortcut in (False, True):
                    torch.manual_seed(0)
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    x = torch.randn(b, c, h, w).to(dtype).contiguous(memory_format=fmt)
                    shortcut = torch.randn(b, c, h, w).to(dtype) if with_shortcut else None
                    gate = torch.rand(b, c, 1, 1).to(dtype)
                    out = gate_product_fwd(x, gate, shortcut, relu)
                    ref = eager_gate_product(x, gate, shortcut, relu)
                    tol = 0 if dtype == torch.float32 else 1e-2 * ref.abs().max().item()
                    assert out.dtype == dtype and out.shape == x.shape
                    assert out.is_contiguous(memory_format=fmt), 'the output keeps the input layout'
                    torch.testing.assert_close(out.float(), ref, rtol=1e-6 if tol == 0 else 1e-2, atol=tol + 1e-6)
                    grad = torch.randn(b, c, h, w).to(dtype)
                    grad_x, grad_gate, grad_sc = gate_product_bwd(grad, x, gate, out, relu)
                    g = grad.float() * (out.float() > 0) if relu else grad.float()
                    assert grad_gate.dtype == torch.float32, 'the gate gradient is summed in float32'
                    sum_ref = (g * x.float()).sum((2, 3))
                    torch.testing.assert_close(grad_gate, sum_ref, rtol=1e-5, atol=1e-5 * sum_ref.abs().max().item())
                    torch.testing.assert_close(grad_x.float(), g * gate.float().view(b, c, 1, 1),
                                               rtol=1e-2 if tol else 1e-6, atol=tol + 1e-6)
                    assert (grad_sc is None) == (not relu)
                    if relu:
                        torch.testing.assert_close(grad_sc.float(), g, rtol=0, atol=0)


def check_gate_product_op_uses_triton():
    # Under the interpreter the CPU op runs the Triton kernel; forward and backward as the eager definition.
    torch.manual_seed(0)
    x = torch.randn(2, 40, 6, 7, requires_grad=True)
    gate = torch.rand(2, 40, 1, 1, requires_grad=True)
    shortcut = torch.randn(2, 40, 6, 7, requires_grad=True)
    assert fused_ops._kernels('triton_gate', x) is not None
    out = fused_ops.gate_product(x, gate, shortcut, True)
    out.square().sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in (x, gate, shortcut)]
    torch.addcmul(leaves[2], leaves[0], leaves[1]).relu().square().sum().backward()
    for got, ref in zip((x, gate, shortcut), leaves):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-5)


def check_model_switch():
    # Whole models on the three Triton kernels against the float64 truth, at points shown well-posed in float64 (a
    # comparison with the eager float32 run alone would ride on ReLU inputs within rounding of zero, and its verdict
    # on the machine's summation order): a CIFAR GSoP-Net1 at batch 2 in training mode (batch statistics).
    from test_fused_truth import CASES, _assert_float32_close, _setup
    probe = torch.empty(1)
    for name in ('triton_relu_reduce', 'triton_bn_relu_cov', 'triton_gate'):
        assert fused_ops._kernels(name, probe) is not None, name
    for case_id in ('cifar1-d8-b2-train',):
        case = CASES[case_id]
        eager, fused, x, truth = _setup(case_id)
        _assert_float32_close(case_id, fused, eager, [x], truth, case.training, case.channels_last)


def _non_finite(t):
    """Where ``t`` is NaN, +inf and -inf: the positions a non-finite input must reach."""
    return torch.isnan(t), t == float('inf'), t == -float('inf')


def _assert_same_non_finite(got, ref, what):
    for kind, g, r in zip(('NaN', '+inf', '-inf'), _non_finite(got), _non_finite(ref)):
        assert torch.equal(g, r), f'{what}: {kind} at {int(g.sum())} positions, {int(r.sum())} with the switch off'


def check_ops_keep_non_finite_values():
    # Each fused op, forward and backward, on Triton's kernels against the same maths in torch's own ops (what the
    # switch-off path runs): a NaN, +inf or -inf in the map or the incoming gradient lands where torch puts it.
    from timm_gsop.layers.covariance import covariance
    torch.manual_seed(0)
    for value in (float('nan'), float('inf'), -float('inf')):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 24, 5, 6).to(dtype)
            x[0, 3, 2, 1] = value
            grad = torch.randn(2, 24, 5, 6).to(dtype)
            grad[1, 5, 0, 0] = value
            gate, shortcut = torch.rand(2, 24, 1, 1).to(dtype), torch.randn(2, 24, 5, 6).to(dtype)
            weight, bias = torch.randn(16, 24, 1, 1), torch.randn(16)
            bn_weight, bn_bias = torch.rand(16) + 0.5, torch.randn(16)
            for stride in (1, 2):
                leaves = [t.detach().clone().requires_grad_() for t in (x, gate, shortcut, weight, bias)]
                ref = [t.detach().clone().requires_grad_() for t in (x, gate, shortcut, weight, bias)]
                y = fused_ops.relu_reduce(leaves[0], leaves[3], leaves[4], stride)
                y_ref = F.conv2d(F.relu(ref[0][:, :, ::stride, ::stride]), ref[3].to(dtype), ref[4].to(dtype))
                _assert_same_non_finite(y, y_ref, f'relu_reduce {value} {dtype} s={stride}')
                for training in (True, False):
                    stats = [torch.zeros(16), torch.ones(16), torch.zeros((), dtype=torch.long)]
                    stats_ref = [t.clone() for t in stats]
                    ya, yr = y.float(), y_ref.float()
                    if training:
                        mean, var = fused_ops.batch_norm_stats_(ya, *stats, 0.1)
                    else:
                        mean, var = stats[0], stats[1]
                    cov = fused_ops.bn_relu_cov(ya, mean, var, bn_weight, bn_bias, 1e-5, training)
                    cov_ref = covariance(F.batch_norm(yr, stats_ref[0], stats_ref[1], bn_weight, bn_bias,
                                                      training, 0.1, 1e-5).relu())
                    _assert_same_non_finite(cov, cov_ref, f'bn_relu_cov {value} {dtype} s={stride} {training}')
                    _assert_same_non_finite(stats[1], stats_ref[1], f'running_var {value} {dtype} {training}')
                    g = torch.sigmoid(cov.sum(2)).to(dtype)[..., None, None].expand(2, 16, 1, 1)
                    g_ref = torch.sigmoid(cov_ref.sum(2)).to(dtype)[..., None, None].expand(2, 16, 1, 1)
                    gate_in = g.repeat(1, 2, 1, 1)[:, :24] * leaves[1]
                    gate_ref = g_ref.repeat(1, 2, 1, 1)[:, :24] * ref[1]
                    for relu in (True, False):
                        out = fused_ops.gate_product(leaves[0], gate_in, leaves[2], relu)
                        out_ref = torch.addcmul(ref[2], ref[0], gate_ref)
                        out_ref = out_ref.relu() if relu else out_ref
                        what = f'{value} {dtype} s={stride} training={training} relu={relu}'
                        _assert_same_non_finite(out, out_ref, 'gate_product ' + what)
                        got = torch.autograd.grad(out, leaves, grad, retain_graph=True)
                        want = torch.autograd.grad(out_ref, ref, grad, retain_graph=True)
                        for name, a, b in zip(('x', 'gate', 'shortcut', 'weight', 'bias'), got, want):
                            _assert_same_non_finite(a, b, f'grad {name} ' + what)


def check_model_keeps_non_finite_values():
    # A NaN, +inf or -inf pixel in image 0: logits, gradients and running statistics non-finite where the switch-off
    # model has them, eval and training, float32 and bfloat16 autocast, GSoP-Net1 and Net2.
    cases = [('gsop_resnet50', float('nan'), True, False), ('gsop_resnet50', float('inf'), False, True),
             ('gsop2_resnet50', -float('inf'), True, True), ('gsop2_resnet50', float('nan'), False, False)]
    for name, value, training, bf16 in cases:
        results = []
        for fused in (False, True):
            set_fused_gsop(fused)
            torch.manual_seed(0)
            model = timm.create_model(name, layers=(1, 1, 1, 1), attn_dim=16, num_classes=10).train(training)
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
            x[0, 1, 5, 7] = value
            x.requires_grad_()
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            out.float().square().sum().backward()
            results.append([('logits', out), ('x', x.grad)] + [(n, p.grad) for n, p in model.named_parameters()]
                           + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()])
        assert not torch.isfinite(results[0][0][1]).all(), 'the switch-off model must see the bad pixel'
        for (what, got), (_, ref) in zip(results[1], results[0]):
            _assert_same_non_finite(got, ref, f'{name} {value} training={training} bf16={bf16}: {what}')


def check_bf16_overflow_is_found_by_grad_scaler():
    # A map near bfloat16's largest value overflows the reduction's sums: the gradients are non-finite and
    # GradScaler skips the step (and lowers its scale), with the switch on as off.
    from timm_gsop.layers import GSoPAttn
    for fused in (False, True):
        set_fused_gsop(fused)
        torch.manual_seed(0)
        attn = GSoPAttn(32, attn_dim=16)
        before = {k: v.clone() for k, v in attn.state_dict().items()}
        opt = torch.optim.SGD(attn.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 8)
        x = torch.randn(2, 32, 6, 6).abs().mul(2. ** 126).requires_grad_()  # bfloat16 holds up to about 2 ** 128
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = attn(x.to(torch.bfloat16), None, True).float().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() < 2. ** 8, f'fused={fused}: GradScaler found no overflow'
        assert all(torch.equal(attn.state_dict()[k], v) for k, v in before.items() if v.is_floating_point()
                   and 'running' not in k), f'fused={fused}: the step was not skipped'


if __name__ == '__main__':
    for check in (check_gate_kernels, check_gate_product_op_uses_triton, check_model_switch,
                  check_ops_keep_non_finite_values, check_model_keeps_non_finite_values,
                  check_bf16_overflow_is_found_by_grad_scaler):
        check()
        print(check.__name__, 'ok')
    sys.exit(0)
