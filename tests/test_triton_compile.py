"""The fused ops' Triton kernels as a GPU compiles them, without a GPU: every launch that GSoP-Net1 and Net2 make on
CUDA, taken from the launchers and compiled for sm_80 and sm_90 (``benchmarks/compile_table.py``, whose table the
README shows). A spill or a register-starved memory-bound kernel is slow on every GPU; nothing on the CPU shows it.

The script runs in a process of its own (Triton must not be in interpreter mode there) with an empty Triton cache,
so every kernel is compiled here.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
try:
    import compile_table
finally:
    sys.path.pop(0)

KERNELS = {'_relu_reduce_fwd_kernel', '_relu_reduce_bwd_data_kernel', '_relu_reduce_bwd_weight_kernel',
           '_channel_stats_kernel', '_bn_relu_cov_fwd_kernel', '_bn_relu_cov_bwd_kernel',
           '_gate_product_fwd_kernel', '_gate_product_bwd_kernel'}


@pytest.fixture(scope='module')
def rows(tmp_path_factory):
    if importlib.util.find_spec('triton') is None:
        pytest.skip('triton is not installed')
    from triton.backends import backends
    if 'nvidia' not in backends:
        pytest.skip("triton has no 'nvidia' backend (its compiler and ptxas)")
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env.update(TRITON_CACHE_DIR=str(tmp_path_factory.mktemp('triton_cache')),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'compile_table.py'), '--json'],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout)


def _show(rows):
    return '\n' + compile_table.markdown(rows)


def test_every_kernel_compiles_for_both_targets_in_both_dtypes(rows):
    for target in compile_table.TARGETS:
        for dtype in ('fp32', 'bf16'):
            compiled = {r['kernel'] for r in rows if r['target'] == target.name and r['dtype'] == dtype}
            assert compiled == KERNELS, (target.name, dtype, KERNELS - compiled)


def test_no_launch_spills(rows):
    spilling = [r for r in rows if r['stack'] > 0]
    assert not spilling, _show(spilling)


def test_shared_memory_within_the_targets_limit(rows):
    over = [r for r in rows if r['shared'] > r['shared_limit']]
    assert not over, _show(over)


def test_memory_bound_kernels_leave_registers_for_warps(rows):
    starved = [r for r in rows if r['kernel'] in compile_table.MEMORY_BOUND
               and r['registers'] > compile_table.MEMORY_BOUND_MAX_REGISTERS]
    assert not starved, _show(starved)
