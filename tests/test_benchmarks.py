"""The benchmarks' naive reference must compute what our layers compute, or timing it means nothing.

No timing is asserted here: benchmarks are not tests.
"""
import importlib.util
import os
import sys

import pytest
import torch

from timm_gsop.layers import ATTN_MODES, GSoPAttn, IsqrtCovPool, covariance, position_covariance, \
    sqrtm_newton_schulz, triu_vec

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')


def _load(name):
    sys.path.insert(0, _BENCH)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(_BENCH, f'{name}.py'))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(_BENCH)


@pytest.fixture(scope='module')
def ops():
    return _load('bench_gsop_ops')


def _close(a, b):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * max(1.0, b.abs().max().item()))


def test_naive_operators_match_ours_float64(ops):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, 5, 7, generator=g, dtype=torch.float64).relu()
    _close(ops.naive_covariance(x), covariance(x))
    _close(ops.naive_position_covariance(x), position_covariance(x))
    cov = covariance(x)
    for num_iter in (2, 3, 5):
        _close(ops.naive_sqrtm(cov, num_iter), sqrtm_newton_schulz(cov, num_iter))
    _close(ops.naive_triu(cov), triu_vec(cov))
    _close(ops.naive_head_ops(x), ops.ours_head_ops(x))


@pytest.mark.parametrize('mode', ATTN_MODES)
@pytest.mark.parametrize('train', [False, True])
def test_naive_block_matches_ours_float64(ops, mode, train):
    torch.manual_seed(0)
    mod = GSoPAttn(128, attn_mode=mode, attn_dim=16, reduce_stride=2).double().train(train)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in mod.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(3, 128, 12, 10, dtype=torch.float64)
    sc = torch.randn_like(x)
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    ours = mod(x, sc)
    mod.load_state_dict(state)  # the same running statistics for the second pass in train mode
    naive = ops.naive_attn(mod, x, sc)
    _close(naive, ours)


def test_naive_gate_part_matches_ours_float64(ops):
    torch.manual_seed(0)
    gate = GSoPAttn(64, attn_dim=16).channel_gate.double().eval()
    x = torch.randn(3, 64, 6, 5, dtype=torch.float64)
    z = gate.act(gate.bn_reduce(gate.conv_reduce(torch.relu(x))))
    _close(ops.ours_gate_from_reduced(gate, z), gate(torch.relu(x)))  # the benchmark's "ours" is the module's maths
    _close(ops.naive_gate_from_reduced(gate, z), gate(torch.relu(x)))


def test_naive_head_matches_ours_float64(ops):
    torch.manual_seed(0)
    pool = IsqrtCovPool(64, cov_dim=24).double().eval()
    x = torch.randn(2, 64, 9, 9, dtype=torch.float64)
    _close(ops.naive_isqrt_head(pool, x), pool(x))


def test_benchmark_cases_build_on_cpu(ops):
    # The case list the benchmark times: ours and naive agree at the real shapes too (float32).
    for case in ops.build_cases(1, ['channel'], torch.device('cpu'), channels_last=False, quick=True):
        if case.module is not None:
            case.module.eval()
        with torch.no_grad():
            a, b = case.ours(*case.inputs), case.naive(*case.inputs)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * max(1.0, b.abs().max().item()))


@pytest.mark.skipif(torch.cuda.is_available(), reason='the guard is for machines without a GPU')
def test_gpu_checks_script_stops_cleanly_without_gpu(tmp_path):
    # The prepared GPU run must not start hour-long CPU benchmarks by mistake, nor leave a folder.
    import subprocess
    script = os.path.join(_BENCH, 'gpu_checks.sh')
    env = dict(os.environ, OUT=str(tmp_path / 'out'), PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get('PATH', ''))
    proc = subprocess.run(['bash', script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert 'no CUDA GPU' in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_traffic_count_counts_bytes_of_every_op_and_nothing_for_views():
    traffic = _load('traffic')
    a, b = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    with traffic.TrafficCount() as count:
        c = a + b  # reads 2 x 64 bytes, writes 64
        c.t()[:2].unsqueeze(0), c.view(-1)  # views: nothing moves
        c.float()  # reads 64, writes 128
    assert (count.ops, count.bytes) == (2, 3 * 64 + 64 + 128)
    assert dict(count.ops_by_op) == {'add': 1, '_to_copy': 1}


def test_traffic_extrapolation_is_linear_in_the_batch(monkeypatch):
    traffic = _load('traffic')
    fake = {1: (1000, 7), 2: (1500, 9)}  # 500 bytes a sample on 500 bytes of weights

    def count_step(make, train, batch, **kwargs):
        c = traffic.TrafficCount()
        c.bytes, c.ops = fake[batch]
        c.bytes_by_op.update(mul=c.bytes)
        return c

    monkeypatch.setattr(traffic, 'count_step', count_step)
    total, ops, by_op = traffic.count_at_batch(lambda: None, train=False, batch=128)
    assert total == 1000 + 127 * 500 and ops == 9 and by_op == {'mul': total}


def test_official_code_loader_applies_its_one_fix_and_leaves_torchvision_alone(tmp_path):
    # A stand-in laid out like the official repository: models as a package inside a 'torchvision' folder.
    official = _load('official')
    models = tmp_path / 'torchvision' / 'models'
    (models / 'MPNCOV' / 'python').mkdir(parents=True)
    (models / '__init__.py').write_text('from .resnet import *\n')
    (models / 'MPNCOV' / '__init__.py').write_text('')
    (models / 'MPNCOV' / 'python' / '__init__.py').write_text('')
    (models / 'MPNCOV' / 'python' / 'MPNCOV.py').write_text(
        'def shape(grad_output, index, i=0):\n    return grad_output[i,:].reshape(index.size(),1).shape\n')
    (models / 'resnet.py').write_text(
        'import torch\nfrom .MPNCOV.python import MPNCOV\n__all__ = ["resnet50", "MPNCOV"]\n'
        'def resnet50(att_position, att_dim, GSoP_mode):\n'
        '    return torch.nn.Linear(att_dim, 1 + sum(p == "1" for s in att_position for p in s) + 10 * GSoP_mode)\n')
    sys.modules.pop('gsop_official_models', None)
    try:
        nets = official.load_official_models(str(tmp_path))
        net1, net2 = nets['official gsop_resnet50'](), nets['official gsop2_resnet50']()
        assert (net1.out_features, net2.out_features) == (1 + 4 + 10, 1 + 3 + 20)  # a block a stage; Net2 not the last
        mpncov = sys.modules['gsop_official_models'].MPNCOV
        index = torch.arange(3).unsqueeze(1)
        assert mpncov.shape(torch.randn(1, 3), index) == (3, 1)
    finally:
        for name in [n for n in sys.modules if n.startswith('gsop_official_models')]:
            del sys.modules[name]
    import torchvision
    assert 'site-packages' in torchvision.__file__ or 'torchvision' in torchvision.__file__
    with pytest.raises(FileNotFoundError, match='No official GSoP code'):
        official.load_official_models(str(tmp_path / 'missing'))
