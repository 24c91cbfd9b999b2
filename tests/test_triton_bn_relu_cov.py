"""The Triton BN + ReLU + covariance kernels against float64 PyTorch, on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before ``triton`` is first imported, and other test files may import it
earlier in this process: every case runs in one child process started with the interpreter on (this
file, run as a script), which reports each case's errors as JSON; the tests here assert on them.
"""
import importlib.util
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checks import interpreter_case_ids

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='needs triton')

EPS = 1e-5
# id: (batch, channels, H, W, dtype, channels_last, training, variant, launcher keywords)
CASES = {
    'f32_nchw_d24_7x5_b3_train': (3, 24, 7, 5, 'float32', False, True, None, {}),
    'f32_cl_d24_11x9_b3_eval': (3, 24, 11, 9, 'float32', True, False, None, {}),
    'f32_nchw_d12_11x9_b1_train': (1, 12, 11, 9, 'float32', False, True, None, {}),
    'f32_cl_d12_7x5_b1_eval': (1, 12, 7, 5, 'float32', True, False, None, {}),
    'bf16_cl_d24_11x9_b3_train': (3, 24, 11, 9, 'bfloat16', True, True, None, {}),
    'bf16_nchw_d12_7x5_b3_eval': (3, 12, 7, 5, 'bfloat16', False, False, None, {}),
    'f64_cl_d12_7x5_b3_train': (3, 12, 7, 5, 'float64', True, True, None, {}),
    'f16_cl_d12_7x5_b1_train': (1, 12, 7, 5, 'float16', True, True, None, {}),
    # BatchNorm without affine parameters: weight and bias None (their gradients are still returned).
    'f32_nchw_d12_7x5_b1_eval_no_affine': (1, 12, 7, 5, 'float32', False, False, 'no_affine', {}),
    # Two channel tiles with a partial second one, and positions in several blocks.
    'f32_cl_d24_7x5_b1_train_tiles16': (1, 24, 7, 5, 'float32', True, True, None, dict(block_d=16)),
    # Slices: H and W do not merge into one stride; the covariance's gradient is strided too.
    'f32_strided_d12_7x5_b3_train': (3, 12, 7, 5, 'float32', False, True, 'strided', {}),
    'f32_nchw_d12_7x5_b3_train_dead_channel': (3, 12, 7, 5, 'float32', False, True, 'dead_channel', {}),
    # z's mean 100x its spread (a Gram minus the outer product of means would cancel most digits), y's 600x.
    'f32_cl_d12_7x5_b3_eval_large_mean': (3, 12, 7, 5, 'float32', True, False, 'large_mean', {}),
    'f32_nchw_d12_7x5_b3_train_constant': (3, 12, 7, 5, 'float32', False, True, 'constant', {}),
}
# Relative error bound (of the largest reference value) per dtype. The interpreter computes the
# products exactly; bfloat16 / float16 maps round grad_y to their dtype.
TOLERANCE = {'float32': 1e-4, 'bfloat16': 2e-2, 'float16': 5e-3, 'float64': 1e-10}
OUTPUTS = ('mean', 'var', 'cov', 'zmean', 'grad_y', 'grad_weight', 'grad_bias')


def _make_case(batch, channels, h, w, dtype, channels_last, training, variant):
    gen = torch.Generator().manual_seed(batch * 1000 + channels * 10 + h)
    y = torch.randn(batch, channels, h, w, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    weight = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=gen, dtype=torch.float64) * 0.5
    running_mean = torch.randn(channels, generator=gen, dtype=torch.float64) * 0.3 + 0.5
    running_var = torch.rand(channels, generator=gen, dtype=torch.float64) + 1.5
    grad_cov = torch.randn(batch, channels, channels, generator=gen, dtype=torch.float64)
    if variant == 'dead_channel':
        bias[3] = -50.  # the ReLU zeroes channel 3 everywhere
    elif variant == 'large_mean':
        weight.fill_(0.01)
        bias.fill_(1.)
        # A map far from zero too: E[y^2] - E[y]^2 in float32 would lose the variance.
        y += 1000.
        running_mean += 1000.
    elif variant == 'constant':
        y = torch.full_like(y, 0.75)
    elif variant == 'no_affine':
        weight.fill_(1.)
        bias.zero_()
    y = y.to(getattr(torch, dtype))
    if variant == 'strided':
        y = torch.cat([y, y], dim=3)[:, :, :, ::2]
    elif channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y, weight, bias, running_mean, running_var, grad_cov


def _reference(y, weight, bias, running_mean, running_var, grad_cov, training):
    """Float64 batch norm (batch or running statistics) + ReLU + centred Gram, and autograd's gradients."""
    y = y.detach().to(torch.float64).requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    a = F.batch_norm(y, None if training else running_mean, None if training else running_var,
                     weight, bias, training=training, eps=EPS)
    a.retain_grad()
    z = a.relu().flatten(2)
    zmean = z.mean(2)
    zc = z - zmean.unsqueeze(2)
    cov = zc @ zc.transpose(1, 2) / z.shape[2]
    cov.backward(grad_cov)
    var, mean = torch.var_mean(y.detach(), dim=(0, 2, 3), unbiased=False)
    return dict(mean=mean, var=var, cov=cov.detach(), zmean=zmean.detach(),
                grad_y=y.grad, grad_weight=weight.grad, grad_bias=bias.grad,
                grad_a_abs_sum=a.grad.abs().sum((0, 2, 3)).max().item())


def _run_case(case_id):
    from timm_gsop.layers.triton_bn_relu_cov import bn_relu_cov_bwd, bn_relu_cov_fwd, channel_stats

    batch, channels, h, w, dtype, channels_last, training, variant, keywords = CASES[case_id]
    y, weight, bias, running_mean, running_var, grad_cov = _make_case(
        batch, channels, h, w, dtype, channels_last, training, variant)
    ref = _reference(y, weight, bias, running_mean, running_var, grad_cov, training)
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    weight, bias = weight.to(compute), bias.to(compute)
    mean, var = channel_stats(y)
    if training:
        stat_mean, invstd = mean, (var + EPS).rsqrt()
    else:
        stat_mean, invstd = running_mean.to(compute), (running_var.to(compute) + EPS).rsqrt()
    if variant == 'no_affine':
        weight = bias = None
    cov, zmean = bn_relu_cov_fwd(y, stat_mean, invstd, weight, bias, **keywords)
    grad_cov = grad_cov.to(compute)
    if variant == 'strided':
        grad_cov = torch.stack([grad_cov, torch.full_like(grad_cov, float('nan'))], dim=3).flatten(2)[:, :, ::2]
    grad_y, grad_weight, grad_bias = bn_relu_cov_bwd(
        grad_cov, y, zmean, stat_mean, invstd, weight, bias, training, **keywords)
    out = dict(mean=mean, var=var, cov=cov, zmean=zmean, grad_y=grad_y, grad_weight=grad_weight, grad_bias=grad_bias)
    report = {'finite': all(bool(t.isfinite().all()) for t in out.values())}
    for name in OUTPUTS:
        err = (out[name].to(torch.float64) - ref[name]).abs().max().item()
        scale = ref[name].abs().max().item()
        report[name] = dict(abs=err, rel=err / scale if scale > 0 else None, dtype=str(out[name].dtype))
    report['grad_y_strides'] = [list(grad_y.stride()), list(y.stride())]
    report['grad_y_dtype'] = str(grad_y.dtype)
    report['grad_a_abs_sum'] = ref['grad_a_abs_sum']
    if variant == 'dead_channel':
        report['dead_channel'] = [cov[:, 3].abs().max().item(), cov[:, :, 3].abs().max().item(),
                                  grad_weight[3].item(), grad_bias[3].item()]
    if variant == 'constant':
        report['constant_cov_max'] = cov.abs().max().item()
    return report


def _worker():
    results = {}
    for case_id in CASES:
        try:
            results[case_id] = _run_case(case_id)
        except Exception as e:  # report each case on its own
            results[case_id] = {'error': f'{type(e).__name__}: {e}'}
    results['interpreter'] = os.environ.get('TRITON_INTERPRET') == '1'
    print('RESULTS ' + json.dumps(results))


@lru_cache(maxsize=None)
def _results():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=os.pathsep.join(
        [str(root), *filter(None, [os.environ.get('PYTHONPATH')])]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULTS ')]
    assert proc.returncode == 0 and lines, f'worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}'
    return json.loads(lines[-1][len('RESULTS '):])


def test_worker_ran_under_the_interpreter():
    assert _results()['interpreter'] is True


@pytest.mark.parametrize('case_id', interpreter_case_ids(CASES))
def test_kernels_match_float64_reference(case_id):
    report = _results()[case_id]
    assert 'error' not in report, report.get('error')
    assert report['finite']
    dtype, training, variant = CASES[case_id][4], CASES[case_id][6], CASES[case_id][7]
    tolerance = TOLERANCE[dtype]
    for name in OUTPUTS:
        entry = report[name]
        if variant == 'constant' and entry['rel'] is None:
            # A constant map: zero variance, covariance and gradients, without a NaN from the zero spread.
            assert entry['abs'] < 1e-6, (name, entry)
        elif variant == 'large_mean' and name == 'grad_bias':
            # No ReLU clips there, and the centred map sums to zero over positions: grad_bias is 0 up to
            # the rounding of a sum of grad_a, so the bound is relative to that sum's terms.
            assert entry['abs'] < tolerance * report['grad_a_abs_sum'], (name, entry, report['grad_a_abs_sum'])
        else:
            assert entry['rel'] is not None and entry['rel'] < tolerance, (name, entry)
        if name != 'grad_y':
            expected = 'torch.float64' if dtype == 'float64' else 'torch.float32'
            assert entry['dtype'] == expected, (name, entry)
    # grad_y in y's dtype; in y's layout where y is dense (NCHW, channels_last), else contiguous.
    assert report['grad_y_dtype'] == f'torch.{dtype}'
    grad_strides, y_strides = report['grad_y_strides']
    if variant == 'strided':
        batch, channels, h, w = CASES[case_id][:4]
        assert grad_strides == [channels * h * w, h * w, w, 1]
    else:
        assert grad_strides == y_strides
    if variant == 'dead_channel':
        assert report['dead_channel'] == [0.0, 0.0, 0.0, 0.0]
    if variant == 'constant':
        assert report['constant_cov_max'] < 1e-6

if __name__ == '__main__':
    _worker()
