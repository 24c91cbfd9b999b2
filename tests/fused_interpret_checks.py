"""The Triton kernels on the CPU through Triton's interpreter, against the ops' eager kernels.

Run by tests/test_fused.py in a subprocess with TRITON_INTERPRET=1 (Triton reads it when the kernels are
defined, so it must be set before this process imports them). Exits non-zero with the first failed check.
"""
import os
import sys

import torch

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
    # The whole model (training mode: batch statistics; stage 1 reduces every second pixel) on the three Triton
    # kernels against the eager ops.
    probe = torch.empty(1)
    for name in ('triton_relu_reduce', 'triton_bn_relu_cov', 'triton_gate'):
        assert fused_ops._kernels(name, probe) is not None, name
    results = []
    for fused in (False, True):
        set_fused_gsop(fused)
        torch.manual_seed(0)
        model = timm.create_model('gsop_resnet50', layers=(1, 1, 1, 1), attn_dim=16, num_classes=10)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad))
    for got, ref in zip(*results[::-1]):
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-3 * ref.abs().max().item())


if __name__ == '__main__':
    for check in (check_gate_kernels, check_gate_product_op_uses_triton, check_model_switch):
        check()
        print(check.__name__, 'ok')
    sys.exit(0)
