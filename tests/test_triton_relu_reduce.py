"""The reduction's Triton kernels against eager torch, on the CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` only takes effect if set before triton is first imported, and another test in
this process may have imported it already. So one subprocess, started with the variable set, runs
every case (this file as a script) and reports each one's errors; the tests here check them.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checks import interpreter_case_ids

_MARKER = 'RELU_REDUCE_RESULTS '

# id: (dtype, batch, channels, attn_dim, height, width, stride, layouts, bias); layouts name the memory
# format of (x, grad_y, grad_x): 'cl' channels_last, 'nchw' contiguous. Blocks are 16 under the
# interpreter, so 24, 40 channels and 12, 20 output channels leave partial blocks, and 20 two of them.
CASES = {
    'f32_nchw_s1': ('float32', 2, 24, 12, 9, 7, 1, ('nchw', 'nchw', 'nchw'), True),
    'f32_cl_s2_odd': ('float32', 2, 24, 12, 9, 7, 2, ('cl', 'cl', 'cl'), True),
    'f32_mixed_layouts_s2': ('float32', 2, 24, 12, 7, 5, 2, ('cl', 'nchw', 'nchw'), True),
    'f32_batch1_no_bias': ('float32', 1, 40, 20, 5, 11, 2, ('nchw', 'cl', 'cl'), False),
    'bf16_nchw_s1': ('bfloat16', 2, 24, 12, 6, 6, 1, ('nchw', 'nchw', 'nchw'), True),
    'bf16_cl_s2_batch1': ('bfloat16', 1, 24, 12, 7, 9, 2, ('cl', 'cl', 'cl'), True),
    'f16_nchw_s2': ('float16', 2, 24, 12, 6, 5, 2, ('nchw', 'cl', 'nchw'), True),
    'f64_cl_s2': ('float64', 2, 24, 12, 5, 5, 2, ('cl', 'cl', 'nchw'), True),
}
# Largest error allowed, relative to the largest reference value. The reference computes in float64 from
# the operands the kernels see (the map in its dtype, the weight rounded to it), so what is left is the
# order of the float32 sums and a 16-bit output's rounding; the interpreter truncates float32 to bfloat16
# (a GPU rounds to nearest), the weight's tiles too: up to 2**-8 of a value per cast, 8e-3 seen.
TOLERANCE = {'float32': 1e-4, 'bfloat16': 2e-2, 'float16': 2e-3, 'float64': 1e-12}
OUTPUTS = ('y', 'grad_x', 'grad_weight', 'grad_bias')


def _layout(t, name):
    return t.contiguous(memory_format=torch.channels_last if name == 'cl' else torch.contiguous_format)


def reference(x, weight, bias, stride, grad_y):
    """Eager ``conv2d(relu(x[..., ::s, ::s]), weight.to(x.dtype), bias)`` and its autograd gradients, in float64."""
    weight = weight.detach().to(x.dtype).double().requires_grad_()
    x = x.detach().double().requires_grad_()
    bias = bias.detach().double().requires_grad_() if bias is not None else None
    y = F.conv2d(F.relu(x[:, :, ::stride, ::stride]), weight[:, :, None, None], bias)
    y.backward(grad_y.double())
    return y.detach(), x.grad, weight.grad, bias.grad if bias is not None else None


def run_case(dtype_name, batch, channels, dim, height, width, stride, layouts, use_bias):
    """Errors of the launchers against ``reference``, and the exactness checks, as plain numbers."""
    from timm_gsop.layers.triton_relu_reduce import relu_reduce_bwd, relu_reduce_fwd

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(channels * 100 + height * 10 + width)
    x = _layout(torch.randn(batch, channels, height, width, generator=gen).to(dtype), layouts[0])
    # The weight and bias stay float32 for a 16-bit map, as under autocast.
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.randn(dim, channels, generator=gen).to(param_dtype) / channels ** 0.5
    bias = torch.randn(dim, generator=gen).to(param_dtype) if use_bias else None
    h_out, w_out = -(-height // stride), -(-width // stride)
    grad_y = _layout(torch.randn(batch, dim, h_out, w_out, generator=gen).to(dtype), layouts[1])
    grad_x0 = _layout(torch.randn(batch, channels, height, width, generator=gen).to(dtype), layouts[2])

    y = relu_reduce_fwd(x, weight, bias, stride)
    grad_in = grad_x0.clone()
    grad_x, grad_weight, grad_bias = relu_reduce_bwd(grad_in, grad_y, x, weight, stride)
    grad_x_alone = relu_reduce_bwd(None, grad_y, x, weight, stride)[0]

    ref_y, ref_grad_x, ref_grad_weight, ref_grad_bias = reference(x, weight, bias, stride, grad_y)
    ref_grad_bias = ref_grad_bias if use_bias else grad_y.double().sum((0, 2, 3))
    ref_grad_x = grad_x0.double() + ref_grad_x

    def rel_err(out, ref):
        return ((out.double() - ref).abs().max() / ref.abs().max()).item()

    # Positions the data gradient must not touch: off the stride grid, or where x <= 0.
    on_grid = torch.zeros(batch, channels, height, width, dtype=torch.bool)
    on_grid[:, :, ::stride, ::stride] = True
    untouched = ~(on_grid & (x > 0))
    return {
        'y': rel_err(y, ref_y),
        'grad_x': rel_err(grad_x, ref_grad_x),
        'grad_weight': rel_err(grad_weight, ref_grad_weight),
        'grad_bias': rel_err(grad_bias, ref_grad_bias),
        'untouched_exact': bool(torch.equal(grad_x[untouched], grad_x0[untouched])),
        'untouched_count': int(untouched.sum()),
        'y_shape': list(y.shape),
        'y_channels_last': y.is_contiguous(memory_format=torch.channels_last),
        'dtypes': [str(t.dtype) for t in (y, grad_x, grad_weight, grad_bias)],
        'grad_x_layout_kept': grad_x.stride() == grad_x0.stride(),
        'grad_in_unchanged': bool(torch.equal(grad_in, grad_x0)),
        'grad_x_alone': rel_err(grad_x_alone, ref_grad_x - grad_x0.double()),
    }


def run_errors():
    """The launchers' argument errors: each message names what was expected."""
    from timm_gsop.layers.triton_relu_reduce import relu_reduce_bwd, relu_reduce_fwd

    x = torch.randn(1, 4, 3, 3)
    bad = {
        'weight_channels': lambda: relu_reduce_fwd(x, torch.randn(2, 5), None, 1),
        'stride': lambda: relu_reduce_fwd(x, torch.randn(2, 4), None, 0),
        'bias_shape': lambda: relu_reduce_fwd(x, torch.randn(2, 4), torch.randn(3), 1),
        'grad_y_shape': lambda: relu_reduce_bwd(torch.zeros_like(x), torch.randn(1, 2, 3, 3), x, torch.randn(2, 4), 2),
        'dtype': lambda: relu_reduce_fwd(x.to(torch.int32), torch.randn(2, 4), None, 1),
    }
    messages = {}
    for name, call in bad.items():
        try:
            call()
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    return messages


def compile_for_sm90():
    """Compiles the kernels as the launchers would for a bfloat16 map (the AMP path) on sm_90: no GPU needed.

    The interpreter runs none of the GPU compiler; this catches what only it rejects. Returns each
    kernel's shared memory in bytes, or {'skip': why}.
    """
    import triton
    from triton.backends import backends

    if 'nvidia' not in backends:
        return {'skip': "triton has no 'nvidia' backend"}
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from timm_gsop.layers import triton_relu_reduce as ops

    dim, channels, rows = 128, 256, 128 * 28 * 28  # stage 1 of a ResNet-50 at 224 px, batch 128
    common = {'ACC_FP64': False, 'INPUT_PRECISION': ops._input_precision(torch.bfloat16), 'UPCAST_DOT': False}
    kernels = {
        ops._relu_reduce_fwd_kernel: (
            {'x_ptr': '*bf16', 'w_ptr': '*fp32', 'bias_ptr': '*fp32', 'y_ptr': '*bf16'},
            dict(common, HAS_BIAS=True), ('BLOCK_M', 'BLOCK_N', 'BLOCK_K'), (rows, dim, channels)),
        ops._relu_reduce_bwd_data_kernel: (
            {'gy_ptr': '*bf16', 'w_ptr': '*fp32', 'x_ptr': '*bf16', 'gx_in_ptr': '*bf16', 'gx_ptr': '*bf16'},
            dict(common, HAS_GRAD_IN=True), ('BLOCK_M', 'BLOCK_N', 'BLOCK_K'), (rows, channels, dim)),
        ops._relu_reduce_bwd_weight_kernel: (
            {'gy_ptr': '*bf16', 'x_ptr': '*bf16', 'gw_ptr': '*fp32', 'gb_ptr': '*fp32'},
            common, ('BLOCK_D', 'BLOCK_C', 'BLOCK_M'), (dim, channels, rows)),
    }
    shared = {}
    for kernel, (pointers, constants, block_names, gemm) in kernels.items():
        *blocks, num_warps, num_stages = ops._gemm_blocks(True, torch.bfloat16, *gemm)
        constants = dict(constants, **dict(zip(block_names, blocks)))
        signature = {name: 'constexpr' if name in constants else pointers.get(name, 'i32') for name in kernel.arg_names}
        compiled = triton.compile(
            ASTSource(kernel, signature, constants), target=GPUTarget('cuda', 90, 32),
            options={'num_warps': num_warps, 'num_stages': num_stages})
        shared[kernel.__name__] = compiled.metadata.shared
    return shared


def _main():
    if sys.argv[1:] == ['compile']:
        print(_MARKER + json.dumps(compile_for_sm90()))
        return
    results = {}
    for case_id, args in CASES.items():
        try:
            results[case_id] = run_case(*args)
        except Exception as e:  # reported per case, so one failure does not hide the others
            results[case_id] = {'exception': f'{type(e).__name__}: {e}'}
    results['errors'] = run_errors()
    print(_MARKER + json.dumps(results))


def _start_script(*args, **env_vars):
    """This file as a script in a fresh process (both runs start at once: they take a core each)."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env.update(env_vars)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (repo, env.get('PYTHONPATH')) if p)
    return subprocess.Popen(
        [sys.executable, __file__, *args], env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _report(proc):
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    lines = [line for line in stdout.splitlines() if line.startswith(_MARKER)]
    assert proc.returncode == 0 and lines, f'script failed:\n{stdout[-3000:]}\n{stderr[-3000:]}'
    return json.loads(lines[-1][len(_MARKER):])


@pytest.fixture(scope='module')
def scripts(request, tmp_path_factory):
    if importlib.util.find_spec('triton') is None:
        pytest.skip('triton is not installed')
    selected = {item.originalname for item in request.session.items}
    procs = {}
    if selected & {'test_matches_eager', 'test_grad_x_adds_only_where_relu_passes_and_reads_grad_in',
                   'test_argument_errors_name_the_expected'}:
        procs['interpret'] = _start_script(TRITON_INTERPRET='1')
    if 'test_kernels_compile_for_sm90' in selected:
        procs['compile'] = _start_script('compile', TRITON_CACHE_DIR=str(tmp_path_factory.mktemp('triton_cache')))
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope='module')
def results(scripts):
    return _report(scripts['interpret'])


@pytest.mark.parametrize('case_id', interpreter_case_ids(CASES))
def test_matches_eager(results, case_id):
    dtype_name, batch, channels, dim, height, width, stride, _, _ = CASES[case_id]
    res = results[case_id]
    assert 'exception' not in res, res.get('exception')
    errors = {k: res[k] for k in OUTPUTS}
    assert max(errors.values()) < TOLERANCE[dtype_name], errors
    assert res['y_shape'] == [batch, dim, -(-height // stride), -(-width // stride)]
    assert res['y_channels_last']
    acc = 'torch.float64' if dtype_name == 'float64' else 'torch.float32'
    assert res['dtypes'] == [f'torch.{dtype_name}', f'torch.{dtype_name}', acc, acc]


@pytest.mark.parametrize('case_id', interpreter_case_ids(CASES))
def test_grad_x_adds_only_where_relu_passes_and_reads_grad_in(results, case_id):
    res = results[case_id]
    assert 'exception' not in res, res.get('exception')
    assert res['untouched_count'] > 0  # else the check below proves nothing
    assert res['untouched_exact']
    assert res['grad_x_layout_kept']
    assert res['grad_in_unchanged'], 'the gradient it adds to is read, never written'
    assert res['grad_x_alone'] < TOLERANCE[res['dtypes'][0].split('.')[1]]


def test_argument_errors_name_the_expected(results):
    messages = results['errors']
    assert messages['weight_channels'] is not None and '(d, C) with C = 4' in messages['weight_channels']
    assert messages['stride'] is not None and 'positive int' in messages['stride']
    assert messages['bias_shape'] is not None and '(2,)' in messages['bias_shape']
    assert messages['grad_y_shape'] is not None and '(1, 2, 2, 2)' in messages['grad_y_shape']
    assert messages['dtype'] is not None and all(name in messages['dtype'] for name in ('torch.bfloat16', 'torch.int32'))



def test_kernels_compile_for_sm90(scripts):
    shared = _report(scripts['compile'])
    if 'skip' in shared:
        pytest.skip(shared['skip'])
    assert set(shared) == {'_relu_reduce_fwd_kernel', '_relu_reduce_bwd_data_kernel', '_relu_reduce_bwd_weight_kernel'}
    # Within the 99 KiB a block may use on consumer GPUs (sm_86, sm_89), not only on data-centre ones.
    assert max(shared.values()) <= 99 * 1024, shared


if __name__ == '__main__':
    _main()
