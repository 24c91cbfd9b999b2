"""The second-order maths against their definitions, in float64, and the GSoP block's behaviour."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import timm
from timm_gsop.layers.gate_ops import _relu_copy, scale_add
from timm_gsop.layers import (
    ATTN_MODES, GSoPAttn, IsqrtCovPool, covariance, position_covariance, sqrtm_newton_schulz, triu_indices, triu_vec)

torch.manual_seed(0)


def _textbook_covariance(x):
    """(1/M) X I_hat X^T with the M x M centring matrix I_hat = I/M ... per sample, as papers write it."""
    b, c = x.shape[:2]
    x = x.reshape(b, c, -1)
    m = x.shape[2]
    i_hat = torch.eye(m, dtype=x.dtype) / m - torch.ones(m, m, dtype=x.dtype) / (m * m)
    return torch.stack([xi @ i_hat @ xi.T for xi in x])


def _spd(batch, dim, lo=1.0, hi=2.0):
    q, _ = torch.linalg.qr(torch.randn(batch, dim, dim, dtype=torch.float64))
    lam = torch.rand(batch, dim, dtype=torch.float64) * (hi - lo) + lo
    return q @ torch.diag_embed(lam) @ q.transpose(1, 2), q @ torch.diag_embed(lam.sqrt()) @ q.transpose(1, 2)


def test_covariance_equals_definition():
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64) * 2 + 1.5  # non-zero mean: centring matters
    cov = covariance(x)
    assert cov.shape == (3, 5, 5)
    torch.testing.assert_close(cov, _textbook_covariance(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov[1], torch.cov(x[1].reshape(5, -1), correction=0), rtol=1e-12, atol=1e-12)


def test_position_covariance_equals_official_definition():
    # Official: X^T I_hat X with a d x d I_hat built from the position count M.
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64) + 0.7
    d, m = 6, 9
    i_hat = torch.eye(d, dtype=x.dtype) / m - torch.ones(d, d, dtype=x.dtype) / (m * m)
    flat = x.reshape(2, d, m)
    expected = flat.transpose(1, 2) @ i_hat @ flat
    torch.testing.assert_close(position_covariance(x), expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_covariance_ops():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(covariance, (x,))
    assert gradcheck(position_covariance, (x,))
    # The covariance's own backward (one product) must also be differentiable.
    assert gradgradcheck(covariance, (x,))


@pytest.mark.filterwarnings('ignore:.*torch.jit.script.* is deprecated')
def test_scripted_covariance_matches_eager_value_and_gradient():
    # TorchScript takes the plain-autograd branch; both must give the same covariance and gradient.
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 6, dtype=torch.float64)
    scripted = torch.jit.script(covariance)
    ours, ref = covariance(x), scripted(x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (grad_ours,), (grad_ref,) = torch.autograd.grad(ours, x, g), torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('num_iter', [1, 2, 3, 5])
def test_gradcheck_sqrtm(num_iter):
    a, _ = _spd(2, 5)
    a.requires_grad_(True)
    assert gradcheck(lambda t: sqrtm_newton_schulz(t, num_iter), (a,))


def test_gradcheck_triu_vec():
    a = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(triu_vec, (a,))


def test_sqrtm_converges_to_eigendecomposition_root():
    # Well conditioned SPD (eigenvalues in [1, 2]). Newton-Schulz after trace normalisation converges
    # quadratically once started: stated tolerances are relative Frobenius errors.
    a, root = _spd(4, 8)
    errors = {n: ((sqrtm_newton_schulz(a, n) - root).norm() / root.norm()).item() for n in (3, 5, 10)}
    assert errors[3] > errors[5] > errors[10]
    assert errors[5] < 5e-3
    assert errors[10] < 1e-12


def test_sqrtm_three_iterations_matches_written_out_iteration():
    # iSQRT-COV's 3-iteration form written out step by step (float64, one sample at a time).
    a, _ = _spd(2, 6)
    out = sqrtm_newton_schulz(a, 3)
    eye = torch.eye(6, dtype=torch.float64)
    for i in range(2):
        tr = torch.trace(a[i])
        an = a[i] / tr
        y0 = an @ (0.5 * (3 * eye - an))
        z0 = 0.5 * (3 * eye - an)
        t = 0.5 * (3 * eye - z0 @ y0)
        y1, z1 = y0 @ t, t @ z0
        expected = 0.5 * y1 @ (3 * eye - z1 @ y1) * tr.sqrt()
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)


def test_triu_vec_order_and_size():
    # iSQRT-COV order: lower triangle row by row == upper triangle column by column.
    dim = 256
    index = triu_indices(dim)
    assert index.numel() == 32896
    mask = torch.ones(dim, dim).triu().t().reshape(-1)
    torch.testing.assert_close(index, mask.nonzero().squeeze(1))
    sym = torch.arange(16.).reshape(4, 4)
    sym = sym + sym.T
    vec = triu_vec(sym.unsqueeze(0))[0]
    expected = torch.tensor([sym[r, c] for r in range(4) for c in range(r + 1)])
    torch.testing.assert_close(vec, expected)


def test_zero_and_constant_maps_stay_finite():
    pool = IsqrtCovPool(32, cov_dim=16).train()
    for x in (torch.zeros(2, 32, 4, 4), torch.full((2, 32, 4, 4), 3.0)):
        x = x.requires_grad_(True)
        out = pool(x)
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert torch.isfinite(x.grad).all()
    # The trace floor: a zero covariance gives a zero root, not 0/0.
    assert torch.equal(sqrtm_newton_schulz(torch.zeros(2, 5, 5)), torch.zeros(2, 5, 5))
    for mode in ATTN_MODES:
        attn = GSoPAttn(64, attn_mode=mode, attn_dim=16).eval()
        assert torch.isfinite(attn(torch.full((2, 64, 8, 8), 0.5))).all(), mode


def test_second_order_ops_run_float32_under_autocast():
    x = torch.randn(2, 16, 7, 7) + 1.0
    a, _ = _spd(2, 16)
    a = a.float()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cov_ac = covariance(x)
        pos_ac = position_covariance(x)
        root_ac = sqrtm_newton_schulz(a)
        cov_bf = covariance(x.bfloat16())
    # float32 in, float32 out, bit-identical to the computation without autocast (a bf16 bmm is not).
    assert cov_ac.dtype == torch.float32 and root_ac.dtype == torch.float32
    assert torch.equal(cov_ac, covariance(x))
    assert torch.equal(pos_ac, position_covariance(x))
    assert torch.equal(root_ac, sqrtm_newton_schulz(a))
    # bf16 in: computed and returned in float32, as if the bf16 values had been given in float32.
    assert cov_bf.dtype == torch.float32
    torch.testing.assert_close(cov_bf, covariance(x.bfloat16().float()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('mode', ATTN_MODES)
def test_fused_shortcut_equals_separate_add(mode):
    # Forward and backward: the fused / in-place residual add must not change values or gradients.
    attn = GSoPAttn(128, attn_mode=mode, attn_dim=16).train().double()
    x = torch.randn(2, 128, 10, 10, dtype=torch.float64, requires_grad=True)
    shortcut = torch.randn(2, 128, 10, 10, dtype=torch.float64, requires_grad=True)
    grads = []
    for fused in (True, False):
        out = attn(x, shortcut) if fused else attn(x) + shortcut
        params = [x, shortcut, *attn.parameters()]
        grads.append((out, torch.autograd.grad((out * out.detach().sin()).sum(), params)))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('with_shortcut', [False, True])
def test_scale_add_gradients(channels_last, with_shortcut):
    # The gate product has its own backward (a dot product per channel, or a product and a sum where
    # the map is not NCHW-contiguous): first and second derivatives against finite differences.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    gate = torch.rand(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    args = (x, gate)
    if with_shortcut:
        args += (torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_(),)
    assert gradcheck(scale_add, args)
    assert gradgradcheck(scale_add, args)


@pytest.mark.parametrize('channels_last', [False, True])
def test_scale_add_under_bf16_autocast_matches_float32(channels_last):
    # Under autocast the map is bf16 while gate and shortcut may be float32 (the result then too):
    # the backward must cope with the mixed dtypes and give each input its own dtype back.
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, gate, shortcut = torch.randn(2, 8, 6, 6), torch.rand(2, 8, 1, 1), torch.randn(2, 8, 6, 6)
    x, shortcut = x.contiguous(memory_format=fmt), shortcut.contiguous(memory_format=fmt)
    leaves = [t.clone().requires_grad_() for t in (x.bfloat16(), gate, shortcut)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = scale_add(*leaves)
    out.float().square().sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x.bfloat16().float(), gate, shortcut)]
    torch.addcmul(ref_leaves[2], ref_leaves[0], ref_leaves[1]).square().sum().backward()
    for got, ref in zip(leaves, ref_leaves):
        assert got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.float(), ref.grad, rtol=2e-2, atol=2e-2 * ref.grad.abs().max().item())


@pytest.mark.parametrize('stride', [1, 2, 3])
@pytest.mark.parametrize('channels_last', [False, True])
def test_relu_copy_gradients(stride, channels_last):
    # Both outputs' gradients reach the map in one backward (in place into the product's gradient, or
    # out of place under create_graph): against finite differences, first and second order.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    gate = torch.rand(2, 3, 1, 1, dtype=torch.float64)

    def block(t):
        t, rectified = _relu_copy(t, stride)
        return scale_add(t, gate), rectified.sin()  # the map feeds a product, as in GSoPAttn

    assert gradcheck(block, (x,))
    assert gradgradcheck(block, (x,))
    scaled, rectified = block(x)
    (scaled.square().sum() + rectified.sum()).backward()
    ref = x.detach().clone().requires_grad_()
    sub = F.relu(ref[:, :, ::stride, ::stride])
    ((ref * gate).square().sum() + sub.sin().sum()).backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_relu_copy_leaves_gradients_it_does_not_own_alone():
    # The in-place add is kept to the gradient scale_add makes: a gradient shared with another branch, a
    # caller's grad_outputs and an expanded gradient each get an out-of-place sum.
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.ones(2, 3, 4, 4, requires_grad=True)
    a, r = _relu_copy(x)
    y = w * 2
    (((a + y) * 1.0).sum() + r.sum()).backward()  # a's and y's gradients are one tensor
    assert (w.grad == 2).all()
    torch.testing.assert_close(x.grad, 1 + (x > 0).float())
    a, r = _relu_copy(x)
    (a.sum() + r.sum()).backward()  # an expanded gradient
    ga, gr = torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    a, r = _relu_copy(x)
    got, = torch.autograd.grad((a, r), x, (ga, gr))
    assert (ga == 1).all() and (gr == 1).all()
    torch.testing.assert_close(got, 1 + (x > 0).float())


def test_channel_and_position_gates_scale_as_defined():
    attn = GSoPAttn(64, attn_mode='channel', attn_dim=16).eval()
    x = torch.randn(2, 64, 9, 9)
    with torch.no_grad():
        gate = attn.channel_gate(F.relu(x))  # a gate reads the block's ReLU copy
        assert gate.shape == (2, 64, 1, 1) and (gate > 0).all() and (gate < 1).all()
        torch.testing.assert_close(attn(x), x * gate)
    attn = GSoPAttn(64, attn_mode='position', attn_dim=16).eval()
    with torch.no_grad():
        gate = attn.position_gate(F.relu(x))
        assert gate.shape == (2, 1, 9, 9)
        torch.testing.assert_close(attn(x), F.relu(x * gate))


def test_strided_reduction_equals_the_official_stride_2_conv():
    # Stage 1 reduces with a stride-2 1x1 conv; the block takes every second pixel for its ReLU copy
    # and the gate runs the conv at stride 1: the same reduced map, from a quarter of the copy.
    attn = GSoPAttn(32, attn_dim=8, reduce_stride=2).double().eval()
    x = torch.randn(2, 32, 11, 10, dtype=torch.float64)
    conv = attn.channel_gate.conv_reduce
    official = F.conv2d(F.relu(x), conv.weight, conv.bias, stride=2)
    seen = []
    conv.register_forward_hook(lambda mod, args, out: seen.append(out))
    attn(x)
    assert seen[0].shape == official.shape == (2, 8, 6, 5)
    torch.testing.assert_close(seen[0], official, rtol=1e-12, atol=1e-12)


def test_concat_fusion_kernel_follows_official_rule():
    # groups = C/64, kernel (2f+5, 1) with f = log2(32/groups), padding f+2; map size kept.
    for channels, groups, k in ((256, 4, 11), (512, 8, 9), (1024, 16, 7), (2048, 32, 5)):
        attn = GSoPAttn(channels, attn_mode='fusion_concat', attn_dim=8)
        assert attn.fuse_channel.groups == groups
        assert attn.fuse_channel.kernel_size == (k, 1)
        assert attn.fuse_channel.padding == ((k - 1) // 2, 0)


def test_bad_arguments_name_valid_choices():
    with pytest.raises(ValueError, match="'channel', 'position', 'fusion_avg', 'fusion_max', 'fusion_concat'"):
        GSoPAttn(64, attn_mode='spatial')
    with pytest.raises(ValueError, match='attn_dim must be a positive integer'):
        GSoPAttn(64, attn_dim=0)
    with pytest.raises(ValueError, match='num_iter must be a positive integer'):
        IsqrtCovPool(64, num_iter=0)
    with pytest.raises(ValueError, match='cov_dim must be a positive integer'):
        IsqrtCovPool(64, cov_dim=-1)


def test_gsop_attn_serves_timm_resnet_as_attn_layer():
    from functools import partial
    model = timm.create_model(
        'resnet50', num_classes=5, zero_init_last=False, block_args=dict(attn_layer=partial(GSoPAttn, attn_dim=16)))
    blocks = [m for m in model.modules() if isinstance(m, GSoPAttn)]
    assert len(blocks) == 16  # timm puts its attn_layer in every bottleneck
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    for attn in blocks:
        assert attn.channel_gate.row_conv.weight.grad.abs().sum() > 0
