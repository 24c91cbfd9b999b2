"""Micro-benchmark of GSoP's own parts, ours vs a naive textbook reference, at ResNet-50's shapes.

    python benchmarks/bench_gsop_ops.py [--device cpu|cuda] [--threads N] [--batch B] [--reps R] [--quick]
                                        [--modes channel,position,...] [--out FILE]

Cases (224 px input, as GSoP-Net on ResNet-50 feeds them; stride-1 last stage):

* the GSoP block at the end of each of the four stages (channel mode unless ``--modes`` says
  otherwise), input (B, 256, 56, 56), (B, 512, 28, 28), (B, 1024, 14, 14), (B, 2048, 14, 14);
* GSoP-Net2's iSQRT-COV head on (B, 2048, 14, 14): 1x1 conv to 256 + BN + ReLU, 256 x 256
  covariance, 3 Newton-Schulz iterations, upper triangle (32,896 values);
* the second-order parts alone, without the reduction convs both sides share: the block after its
  reduction conv (covariance -> row BN -> row-wise conv -> fc -> sigmoid) on a stage's reduced map,
  the channel covariance alone at both map sizes, and the head's covariance, Newton-Schulz square
  root and triangle, each alone and chained.

Each case runs "forward" (inference mode) and "fwd+bwd" (train mode, forward and backward to the
input and the parameters, from a dense gradient of ones at the output). Ours and the naive
reference share their parameters (the naive one calls our modules' convs and norms) and alternate
within each repetition; times are medians. The last column gives the FLOPs of one forward +
backward of each side, as ``torch.utils.flop_counter`` counts them (matrix products and convs
only): where the two are equal, a speed-up can only come from fewer memory passes or less
per-call overhead.

The naive reference is the textbook formulation, written here from the paper's equations in the
way the official code computes them:

* covariance as X I_hat X^T with the M x M centring matrix I_hat = I/M - 1 1^T / M^2, one copy
  per sample (B x M x M, as the official ``Covpool`` repeats it), position statistic likewise with
  its d x d matrix;
* Newton-Schulz square root in a Python loop over the samples, I3 = 3 I built per sample;
* triangle vectorisation in a Python loop over the samples (boolean mask of the triangle);
* the row-wise convolution as the grouped convolution of the official code; backward by autograd.

``naive_attn`` / ``naive_isqrt_head`` compute the same values as ``GSoPAttn`` / ``IsqrtCovPool``
(tests/test_benchmarks.py checks this in float64), so the comparison is between two ways of doing
the same arithmetic. Under ``--amp`` (bf16 autocast) the naive reference's matrix products run in
bf16 while ours keep the second-order maths in float32, which favours the naive side.
"""
import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from timm_gsop.layers import GSoPAttn, IsqrtCovPool, covariance, sqrtm_newton_schulz, triu_vec  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Naive reference (textbook / official formulation)
# ---------------------------------------------------------------------------------------------


def centring_matrix(size: int, m: int, like: Tensor) -> Tensor:
    """(size x size) matrix I/m - 1 1^T / m^2 (size == m for a covariance over m samples)."""
    eye = torch.eye(size, dtype=like.dtype, device=like.device)
    ones = torch.ones(size, size, dtype=like.dtype, device=like.device)
    return eye / m - ones / (m * m)


def naive_covariance(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C, C): X I_hat X^T with a B x M x M stack of centring matrices."""
    b, c = x.shape[:2]
    xf = x.reshape(b, c, -1)
    m = xf.shape[2]
    i_hat = centring_matrix(m, m, xf).unsqueeze(0).repeat(b, 1, 1)
    return xf.bmm(i_hat).bmm(xf.transpose(1, 2))


def naive_position_covariance(x: Tensor) -> Tensor:
    """(B, d, h, w) -> (B, M, M): X^T I_hat X with the official d x d matrix I/M - 1 1^T/M^2."""
    b, d = x.shape[:2]
    xf = x.reshape(b, d, -1)
    m = xf.shape[2]
    i_hat = centring_matrix(d, m, xf).unsqueeze(0).repeat(b, 1, 1)
    return xf.transpose(1, 2).bmm(i_hat).bmm(xf)


def naive_sqrtm(a: Tensor, num_iter: int = 3, eps: float = 1e-5) -> Tensor:
    """Coupled Newton-Schulz square root, one sample at a time (num_iter >= 2)."""
    out = []
    for i in range(a.shape[0]):
        s = a[i]
        n = s.shape[0]
        i3 = 3.0 * torch.eye(n, dtype=s.dtype, device=s.device)
        trace = s.diagonal().sum().clamp_min(eps)
        s_n = s / trace
        z = 0.5 * (i3 - s_n)
        y = s_n @ z
        for _ in range(num_iter - 2):
            t = 0.5 * (i3 - z @ y)
            y, z = y @ t, t @ z
        y = 0.5 * (y @ (i3 - z @ y))
        out.append(y * trace.sqrt())
    return torch.stack(out)


def naive_triu(a: Tensor) -> Tensor:
    """Lower triangle row by row (= upper triangle column by column), one sample at a time."""
    n = a.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool, device=a.device).tril()
    return torch.stack([a[i][mask] for i in range(a.shape[0])])


def _row_conv(conv: nn.Conv2d, mats: Tensor) -> Tensor:
    """The official row-wise convolution: grouped conv with a (R, 1) kernel on (B, R, R, 1)."""
    return F.conv2d(mats, conv.weight, conv.bias, groups=conv.groups)


def naive_channel_gate(g, x: Tensor, stride: int = 1) -> Tensor:
    z = g.act(g.bn_reduce(F.conv2d(F.relu(x), g.conv_reduce.weight, g.conv_reduce.bias, stride=stride)))
    cov = naive_covariance(z).unsqueeze(-1)
    v = _row_conv(g.row_conv, g.row_bn(cov))
    return torch.sigmoid(F.conv2d(v, g.fc.weight, g.fc.bias))


def naive_position_gate(g, x: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    z = g.bn_reduce(g.conv_reduce(F.relu(x)))
    z = F.adaptive_avg_pool2d(z, g.pool_size)
    gram = naive_position_covariance(z).unsqueeze(-1)
    v = F.relu(_row_conv(g.row_conv, g.row_bn(gram)))
    att = torch.sigmoid(F.conv2d(v, g.fc.weight, g.fc.bias)).reshape(x.shape[0], 1, g.pool_size, g.pool_size)
    return F.adaptive_avg_pool2d(att, (h, w))


def naive_attn(mod: GSoPAttn, x: Tensor, shortcut: Optional[Tensor] = None) -> Tensor:
    """What ``mod(x, shortcut)`` computes, the naive way (same parameters)."""
    ch = naive_channel_gate(mod.channel_gate, x, mod.reduce_stride) if mod.channel_gate is not None else None
    pos = naive_position_gate(mod.position_gate, x) if mod.position_gate is not None else None
    if pos is None:
        out = x * ch
    elif ch is None:
        out = F.relu(x * pos)
    elif mod.attn_mode == 'fusion_avg':
        out = x * ch + F.relu(x * pos)
    elif mod.attn_mode == 'fusion_max':
        out = torch.maximum(x * ch, F.relu(x * pos))
    else:
        out = mod.fuse_bn(mod.fuse_channel(x * ch) + mod.fuse_position(F.relu(x * pos)))
    return out if shortcut is None else out + shortcut


def naive_isqrt_head(pool: IsqrtCovPool, x: Tensor) -> Tensor:
    """What ``pool(x)`` computes, the naive way (same parameters)."""
    z = pool.act(pool.bn(pool.conv_reduce(x)))
    return naive_triu(naive_sqrtm(naive_covariance(z), pool.num_iter, pool.eps))


def naive_gate_from_reduced(g, z: Tensor) -> Tensor:
    """The channel gate after its reduction conv (the second-order part), the naive way."""
    v = _row_conv(g.row_conv, g.row_bn(naive_covariance(z).unsqueeze(-1)))
    return torch.sigmoid(F.conv2d(v, g.fc.weight, g.fc.bias))


def ours_gate_from_reduced(g, z: Tensor) -> Tensor:
    """The same with our pieces (what GSoPChannelGate.forward runs after its reduction conv)."""
    return g._gate(covariance(z), z.dtype)


def naive_head_ops(z: Tensor, num_iter: int = 3) -> Tensor:
    return naive_triu(naive_sqrtm(naive_covariance(z), num_iter))


def ours_head_ops(z: Tensor, num_iter: int = 3) -> Tensor:
    return triu_vec(sqrtm_newton_schulz(covariance(z), num_iter))


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------

# (stage, channels, side) of the GSoP block inputs in GSoP-Net on ResNet-50 at 224 px.
STAGES = ((1, 256, 56), (2, 512, 28), (3, 1024, 14), (4, 2048, 14))


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Case:
    def __init__(self, name: str, shape_desc: str, ours: Callable, naive: Callable, module: Optional[nn.Module],
                 inputs: List[Tensor]):
        self.name, self.shape_desc = name, shape_desc
        self.ours, self.naive, self.module, self.inputs = ours, naive, module, inputs


def build_cases(batch: int, modes: List[str], device: torch.device, channels_last: bool, quick: bool) -> List[Case]:
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).contiguous(memory_format=fmt) if len(shape) == 4 \
            else torch.randn(*shape, generator=gen).to(device)

    cases = []
    stages = STAGES[1:3] if quick else STAGES
    for mode in modes:
        for stage, c, s in stages:
            mod = GSoPAttn(c, attn_mode=mode, reduce_stride=2 if stage == 1 else 1).to(device, memory_format=fmt)
            x, sc = rand(batch, c, s, s), rand(batch, c, s, s)
            cases.append(Case(f'GSoP block, {mode}, stage {stage}', f'{c}x{s}x{s}',
                              lambda x, sc, m=mod: m(x, sc), lambda x, sc, m=mod: naive_attn(m, x, sc), mod, [x, sc]))
    head = IsqrtCovPool(2048).to(device, memory_format=fmt)
    cases.append(Case('iSQRT-COV head (Net2)', '2048x14x14 -> 32896', head, lambda x, m=head: naive_isqrt_head(m, x),
                      head, [rand(batch, 2048, 14, 14)]))
    # The second-order operators alone, on the maps the convs hand them (ReLU'd, as they are).
    for side, stages_desc in ((28, 'stages 1-2'), (14, 'stages 3-4')):
        cases.append(Case(f'covariance alone ({stages_desc})', f'128x{side}x{side} -> 128x128', covariance,
                          naive_covariance, None, [rand(batch, 128, side, side).relu()]))
    for (stage, c, s_), side in ((STAGES[1], 28), (STAGES[3], 14)):
        gate = GSoPAttn(c).channel_gate.to(device)
        cases.append(Case(f'block after its reduction conv, stage {stage}', f'128x{side}x{side} -> {c}',
                          lambda z, g=gate: ours_gate_from_reduced(g, z),
                          lambda z, g=gate: naive_gate_from_reduced(g, z), gate, [rand(batch, 128, side, side).relu()]))
    z2 = rand(batch, 256, 14, 14).relu()
    cov2 = covariance(z2)
    cases += [
        Case('covariance alone (head)', '256x14x14 -> 256x256', covariance, naive_covariance, None, [z2]),
        Case('square root alone (head)', '256x256, 3 iterations', sqrtm_newton_schulz, naive_sqrtm, None, [cov2]),
        Case('triangle alone (head)', '256x256 -> 32896', triu_vec, naive_triu, None, [sqrtm_newton_schulz(cov2)]),
        Case('cov + sqrtm + triu (head)', '256x14x14 -> 32896', ours_head_ops, naive_head_ops, None, [z2]),
    ]
    return cases


def _forward_backward(fn: Callable, leaves: List[Tensor], autocast) -> None:
    # Backward from a dense gradient of ones, as a network hands one back (not sum()'s stride-0 one).
    with autocast:
        out = fn(*leaves)
    out.backward(torch.ones_like(out))


def _time_once(fn: Callable, inputs: List[Tensor], train: bool, module: Optional[nn.Module], device: torch.device,
               amp: bool) -> float:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    if module is not None:
        module.train(train)
    if train:
        ins = [t.detach().requires_grad_() for t in inputs]
        if module is not None:
            module.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        _forward_backward(fn, ins, autocast)
        _sync(device)
        return time.perf_counter() - t0
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast:
        fn(*inputs)
    _sync(device)
    return time.perf_counter() - t0


def _train_flops(fn: Callable, inputs: List[Tensor], module: Optional[nn.Module]) -> int:
    """FLOPs of one forward + backward (train mode), as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    if module is not None:
        module.train(True)
    ins = [t.detach().requires_grad_() for t in inputs]
    counter = FlopCounterMode(display=False)
    with counter:
        _forward_backward(fn, ins, contextlib.nullcontext())
    if module is not None:
        module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run(batch: int, reps: int, modes: List[str], device: torch.device, amp: bool, channels_last: bool,
        quick: bool, compile_ours: bool = False) -> Tuple[List[List[str]], Dict[str, Tuple[float, float, float, float]]]:
    cases = build_cases(batch, modes, device, channels_last, quick)
    results = {}
    rows = []
    for case in cases:
        ours = torch.compile(case.ours) if compile_ours else case.ours
        times = {('ours', False): [], ('naive', False): [], ('ours', True): [], ('naive', True): []}
        for train in (False, True):
            for impl, fn in (('ours', ours), ('naive', case.naive)):  # warm-up
                _time_once(fn, case.inputs, train, case.module, device, amp)
            for r in range(reps):
                order = (('ours', ours), ('naive', case.naive))
                for impl, fn in (order if r % 2 == 0 else order[::-1]):
                    times[(impl, train)].append(_time_once(fn, case.inputs, train, case.module, device, amp))
        med = {k: sorted(v)[len(v) // 2] if len(v) % 2 else sum(sorted(v)[len(v) // 2 - 1:len(v) // 2 + 1]) / 2
               for k, v in times.items()}
        of, nf, ot, nt = med[('ours', False)], med[('naive', False)], med[('ours', True)], med[('naive', True)]
        results[case.name] = (of, nf, ot, nt)
        flops = [_train_flops(fn, case.inputs, case.module) / 1e9 for fn in (case.ours, case.naive)]
        rows.append([case.name, case.shape_desc, f'{of * 1e3:.2f}', f'{nf * 1e3:.2f}', f'{nf / of:.1f}x',
                     f'{ot * 1e3:.2f}', f'{nt * 1e3:.2f}', f'{nt / ot:.1f}x', f'{flops[0]:.2f} / {flops[1]:.2f}'])
        print(f'  {case.name}: forward {of * 1e3:.2f} / {nf * 1e3:.2f} ms, fwd+bwd {ot * 1e3:.2f} / {nt * 1e3:.2f} ms',
              file=sys.stderr, flush=True)
    return rows, results


def main(argv=None) -> None:
    from _common import add_device_args, machine_line, markdown_table, resolve_device_args, write_atomic
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_device_args(parser)
    parser.add_argument('--reps', type=int, default=None, help='timed repetitions per case (default 11; 5 with --quick)')
    parser.add_argument('--modes', default='channel', help="comma-separated attn modes, or 'all'")
    parser.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                        help='torch.compile our implementation (the naive one stays eager)')
    parser.add_argument('--quick', action='store_true', help='stages 2-3 only and fewer repetitions')
    parser.add_argument('--out', help='also write the table to this file (atomically)')
    args = parser.parse_args(argv)

    device, gpu, threads, batch, amp, channels_last = resolve_device_args(args)
    reps = args.reps or (5 if args.quick else 11)
    modes = ['channel', 'position', 'fusion_avg', 'fusion_max', 'fusion_concat'] if args.modes == 'all' \
        else args.modes.split(',')
    torch.manual_seed(0)

    t0 = time.time()
    compile_note = ''
    if args.compile:
        # torch.compile must see the GSoP block as one graph (no graph break).
        from torch import _dynamo
        blk = GSoPAttn(512).to(device)
        x = torch.randn(2, 512, 28, 28, device=device)
        explanation = _dynamo.explain(blk)(x, x)
        compile_note = (f'torch.compile of a GSoP block (channel mode): {explanation.graph_count} graph(s), '
                        f'{explanation.graph_break_count} graph break(s).\n')
        _dynamo.reset()
    rows, _ = run(batch, reps, modes, device, amp, channels_last, args.quick, args.compile)
    header = ['Case', 'Input', 'Ours fwd (ms)', 'Naive fwd (ms)', 'Speed-up fwd',
              'Ours fwd+bwd (ms)', 'Naive fwd+bwd (ms)', 'Speed-up fwd+bwd', 'Fwd+bwd GFLOPs, ours / naive']
    settings = (f'batch {batch}, float32{" + bf16 autocast" if amp else ""}'
                f'{", channels_last" if channels_last else ""}{", torch.compile (ours)" if args.compile else ""}, '
                f'median of {reps} interleaved repetitions after 1 warm-up, wall time {time.time() - t0:.0f} s')
    text = (f'GSoP ops micro-benchmark, {machine_line(device, threads)}\n'
            f'Settings: {settings}.\n{compile_note}\n' + markdown_table(header, rows, 'll' + 'r' * 7) + '\n')
    print(text, end='')
    if args.out:
        write_atomic(args.out, text)


if __name__ == '__main__':
    main()
