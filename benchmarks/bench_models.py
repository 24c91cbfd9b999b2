"""Whole-model benchmark of GSoP-Net: parameters, GFLOPs, throughput, peak memory, GSoP overhead.

    python benchmarks/bench_models.py [--device cpu|cuda] [--threads N] [--batch B] [--reps R]
                                      [--depths 50,101] [--nets 1,2] [--no-timm] [--official DIR]
                                      [--quick] [--out FILE]

Rows: GSoP-Net1 / GSoP-Net2 (``gsop_resnet*`` / ``gsop2_resnet*``), the same models with
``attn_mode='none'`` (their own backbones: same trunk and head, no GSoP block), and timm's
``resnet50``, ``seresnet50``, ``ecaresnet50d`` for reference. With ``--official DIR`` (a checkout of the
official GSoP repository, see ``official.py``) the official ResNet-50 GSoP-Net1 and GSoP-Net2 join
the same interleaved runs, and a table compares them with ours.

* Inference: one forward of a batch in eval mode under ``torch.inference_mode``.
* Training step: forward in train mode, cross-entropy, backward, SGD (momentum) step.
* Timings interleave the models: every repetition runs each model once, in an order reversed on
  every other repetition, so a model and its backbone are measured side by side; the table gives
  medians. The overhead of a GSoP model is the median over repetitions of
  (time of the model / time of its backbone measured in the same repetition) - 1; the quartiles
  of those ratios show how noisy it is.
* GSoP-Net2's classifier (32,896 inputs) is also timed alone against the trunk's (2048 inputs),
  interleaved the same way, so that its share of Net2's training step is not taken for GSoP maths.
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step (after the timed
  runs' warm-up, so it includes parameters, buffers, optimizer state and the input batch); on CPU
  the same sum computed as parameters + buffers + input batch (+ optimizer state for the training
  step) plus the peak of what torch's CPU allocator holds on top of them during one step
  (profiler memory events).
* On CUDA (default there): batch 128, bf16 autocast, channels_last, torch.compile of each model
  (``--no-compile``, ``--no-amp``, ``--no-channels-last`` turn them off). On CPU (default there):
  batch 8, float32, eager, all cores (``--threads``).
* Targets, read on a GPU at those defaults: GSoP-Net1 costs at most +15 % over its backbone eager and
  +8 % compiled, in inference and in a training step; ours at least as fast as the official code in
  every column. Elsewhere the table shows the same figures without a verdict.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from _common import (add_device_args, count_flops, count_params, cpu_step_peak_bytes, create, fmt, machine_line,  # noqa: E402
                     markdown_table, resolve_device_args, median, model_specs, tensor_bytes, write_atomic)
from official import load_official_models  # noqa: E402

#: GSoP-Net1's largest overhead over its backbone on a GPU (%), eager and compiled: eager GSoP ops, fused GSoP ops.
GPU_TARGETS = {False: 15.0, True: 8.0}
FUSED_GPU_TARGETS = {False: 8.0, True: 5.0}


def create_fused(name: str, kwargs: dict) -> nn.Module:
    """The model built with the fused GSoP ops (``TIMM_GSOP_FUSED=1``)."""
    from timm_gsop.layers import set_fused_gsop, use_fused_gsop
    saved = use_fused_gsop()
    set_fused_gsop(True)
    try:
        return create(name, kwargs)
    finally:
        set_fused_gsop(saved)


class Runner:
    """One model with its optimizer, input batch and the two timed steps."""

    def __init__(self, label: str, model: nn.Module, x: Tensor, ref: Optional[str], device: torch.device,
                 amp: bool, compile_model: bool):
        self.label, self.ref = label, ref
        self.device, self.amp = device, amp
        self.model = model.to(device)
        self.fwd = torch.compile(model) if compile_model else model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        self.x = x.to(device)
        self.y = torch.randint(0, 1000, (x.shape[0],), generator=gen).to(device)
        self.t_infer: List[float] = []
        self.t_train: List[float] = []
        self.mem_infer = self.mem_train = None

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def _sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def infer(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self._autocast():
            self.fwd(self.x)

    def train_step(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss = F.cross_entropy(self.fwd(self.x), self.y)
        loss.backward()
        self.opt.step()

    def timed(self, fn) -> float:
        self._sync()
        t0 = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - t0

    def static_bytes(self) -> int:
        state = [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return tensor_bytes(list(self.model.parameters()) + list(self.model.buffers()) + state)

    def measure_memory(self) -> None:
        if self.device.type == 'cuda':
            for attr, fn in (('mem_infer', self.infer), ('mem_train', self.train_step)):
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                fn()
                torch.cuda.synchronize(self.device)
                setattr(self, attr, torch.cuda.max_memory_allocated(self.device))
        else:
            weights = tensor_bytes(list(self.model.parameters()) + list(self.model.buffers()) + [self.x, self.y])
            self.mem_infer = weights + cpu_step_peak_bytes(self.infer)
            self.mem_train = self.static_bytes() + tensor_bytes([self.x, self.y]) + cpu_step_peak_bytes(self.train_step)


def model_runner(label: str, make: Callable[[], nn.Module], ref: Optional[str], device: torch.device, batch: int,
                 img_size: int, amp: bool, channels_last: bool, compile_model: bool) -> Runner:
    with contextlib.redirect_stdout(sys.stderr):  # the official code prints as it builds
        model = make()
    params, flops = count_params(model), count_flops(model, img_size)
    fmt_ = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    runner = Runner(label, model.to(memory_format=fmt_), x.contiguous(memory_format=fmt_), ref, device, amp,
                    compile_model)
    runner.params, runner.flops = params, flops
    return runner


def paired_overhead(a: List[float], b: List[float]) -> float:
    """Median over repetitions of a_r / b_r - 1, in %."""
    return 100.0 * median([x / y - 1.0 for x, y in zip(a, b)])


def paired_spread(a: List[float], b: List[float]) -> str:
    """Lower and upper quartile of a_r / b_r - 1 over repetitions, in %: how noisy the median is."""
    ratios = [100.0 * (x / y - 1.0) for x, y in zip(a, b)]
    if len(ratios) < 2:
        return '–'
    lo, _, hi = statistics.quantiles(ratios, n=4, method='inclusive')
    return f'{lo:+.1f} .. {hi:+.1f}'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_device_args(parser)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--reps', type=int, default=None, help='timed repetitions (default: 5 on CPU, 20 on GPU)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed repetitions (default: 1 on CPU, 3 on GPU)')
    parser.add_argument('--depths', default='50,101', help='GSoP-Net depths (default: 50,101; 50 with --quick)')
    parser.add_argument('--nets', default='1,2', help='GSoP-Nets to run: 1, 2 or 1,2 (default)')
    parser.add_argument('--official', metavar='DIR', default=os.environ.get('GSOP_OFFICIAL_DIR'),
                        help='checkout of the official GSoP code: its ResNet-50 nets join the runs '
                             '(default: $GSOP_OFFICIAL_DIR)')
    parser.add_argument('--no-timm', action='store_true', help="leave out timm's resnet50 / seresnet50 / ecaresnet50d")
    parser.add_argument('--no-train', action='store_true', help='inference only')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                        help='torch.compile each model (default: on for GPU, off for CPU)')
    parser.add_argument('--quick', action='store_true',
                        help='ResNet-50 GSoP models only, 2 repetitions, no timm models, no memory')
    parser.add_argument('--fused', action='store_true',
                        help='also each GSoP model built with the fused GSoP ops (rows "... (fused)")')
    parser.add_argument('--out', help='also write the tables to this file (atomically)')
    args = parser.parse_args(argv)

    device, gpu, threads, batch, amp, channels_last = resolve_device_args(args)
    compile_model = gpu if args.compile is None else args.compile
    reps = args.reps or (2 if args.quick else (20 if gpu else 5))
    warmup = args.warmup if args.warmup is not None else (3 if gpu or compile_model else 1)
    depths = [int(d) for d in ('50' if args.quick else args.depths).split(',')]
    timm_baselines = not (args.no_timm or args.quick)
    measure_mem = not (args.no_memory or args.quick)
    train = not args.no_train

    t_start = time.time()
    torch.manual_seed(0)
    nets = {int(n) for n in args.nets.split(',')}

    def net_of(name: str) -> Optional[int]:  # 1 or 2 for a GSoP model (official or ours), else None
        name = name.replace('official ', '')
        return 2 if name.startswith('gsop2_') else 1 if name.startswith('gsop_') else None

    specs = [spec for spec in model_specs(depths, timm_baselines) if net_of(spec[1]) in nets | {None}]
    makers = [(label, lambda name=name, kw=kw: create(name, kw), ref) for label, name, kw, ref in specs]
    if args.fused:
        makers += [(f'{label} (fused)', lambda name=name, kw=kw: create_fused(name, kw), ref)
                   for label, name, kw, ref in specs if net_of(name) and 'attn_mode' not in label]
    if args.official and 50 in depths:
        makers += [(label, make, None) for label, make in load_official_models(args.official).items()
                   if net_of(label) in nets]
    runners = [model_runner(label, make, ref, device, batch, args.img_size, amp, channels_last, compile_model)
               for label, make, ref in makers]
    # GSoP-Net2's classifier reads 32,896 features instead of 2048: timed alone (forward, backward,
    # SGD step on random features), that part of Net2's cost is told apart from the GSoP maths.
    classifiers = [Runner(f'Linear({n}, 1000)', nn.Linear(n, 1000), torch.randn(batch, n), None, device, amp, False)
                   for n in (2048, 256 * 257 // 2)] if train and nets == {1, 2} else []
    by_label: Dict[str, Runner] = {r.label: r for r in runners}
    for r in runners:  # torch's FLOP counter does not see into the fused ops: the same maths as the eager model's
        if r.label.endswith(' (fused)') and r.label[:-len(' (fused)')] in by_label:
            r.flops = by_label[r.label[:-len(' (fused)')]].flops

    def log(msg):
        print(f'[{time.time() - t_start:6.0f} s] {msg}', file=sys.stderr, flush=True)

    sync_note = ''
    if gpu:
        # No host synchronisation inside the forward pass: an eager forward of each GSoP model with
        # CUDA's sync debug mode set to raise on any synchronising call.
        bad = []
        for r in runners:
            if r.label.startswith('gsop'):
                r.model.eval()
                torch.cuda.set_sync_debug_mode('error')
                try:
                    with torch.inference_mode(), r._autocast():
                        r.model(r.x)
                except RuntimeError as e:
                    bad.append(f'{r.label}: {str(e).splitlines()[0]}')
                finally:
                    torch.cuda.set_sync_debug_mode('default')
        sync_note = ('No host synchronisation in the eager forward of the GSoP models (CUDA sync debug mode).'
                     if not bad else 'Host synchronisation in the forward pass: ' + '; '.join(bad))
        log(sync_note)
    log(f'{len(runners)} models built; warm-up x{warmup}')
    for _ in range(warmup):
        for r in runners:
            r.infer()
            if train:
                r.train_step()
        for c in classifiers:
            c.train_step()
    if measure_mem:
        for r in runners:
            r.measure_memory()
        log('memory measured')
    for rep in range(reps):
        order = runners if rep % 2 == 0 else runners[::-1]
        for r in order:
            r.t_infer.append(r.timed(r.infer))
            if train:
                r.t_train.append(r.timed(r.train_step))
        for c in (classifiers if rep % 2 == 0 else classifiers[::-1]):
            c.t_train.append(c.timed(c.train_step))
        log(f'repetition {rep + 1}/{reps}: ' + ', '.join(
            f'{r.label.split(" ")[0]}{"*" if "none" in r.label else ""} {r.t_infer[-1]:.2f}/'
            f'{r.t_train[-1] if train else 0:.2f}' for r in runners))

    rows = []
    for r in runners:
        ref = by_label.get(r.ref) if r.ref else None
        rows.append([
            f'`{r.label}`', fmt(r.params / 1e6, 2), fmt(r.flops / 1e9, 2),
            fmt(batch / median(r.t_infer), 1),
            fmt(batch / median(r.t_train), 1) if train else '–',
            fmt(r.mem_infer / 2 ** 20, 0) if r.mem_infer else '–',
            fmt(r.mem_train / 2 ** 20, 0) if r.mem_train else '–',
            fmt(paired_overhead(r.t_infer, ref.t_infer), 1, signed=True) if ref else '',
            fmt(paired_overhead(r.t_train, ref.t_train), 1, signed=True) if ref and train else '',
            f'`{r.ref}`' if ref else '',
        ])
    header = ['Model', 'Params (M)', f'GFLOPs @ {args.img_size}', 'Infer (img/s)', 'Train step (img/s)',
              'Peak mem infer (MiB)', 'Peak mem train (MiB)', 'Overhead infer (%)', 'Overhead train (%)',
              'Overhead measured over']
    table = markdown_table(header, rows)

    # GSoP's cost over its own backbone, with the GPU targets of GSoP-Net1.
    on_target_settings = gpu and amp and channels_last and batch == 128
    trows = []
    for depth, n, fused in ((d, n, f) for d in depths for n in (1, 2) for f in (False, True)):
        net = f'gsop_resnet{depth}' if n == 1 else f'gsop2_resnet{depth}'
        label = f'{net} (fused)' if fused else net
        if n not in nets or label not in by_label:
            continue
        limit = (FUSED_GPU_TARGETS if fused else GPU_TARGETS)[compile_model]
        r, base = by_label[label], by_label[f'{net} (attn_mode=none)']
        for kind, a, b in (('inference', r.t_infer, base.t_infer), ('training step', r.t_train, base.t_train)):
            if not a:
                continue
            ov = paired_overhead(a, b)
            target = f'<= {limit:.0f}' if n == 1 else ''
            result = ('met' if ov <= limit else 'NOT met') if n == 1 and on_target_settings else ''
            trows.append([f'`{label}`', kind, fmt(ov, 1, signed=True), paired_spread(a, b),
                          fmt(100.0 * (r.flops - base.flops) / base.flops, 1, signed=True), target, result])
    ttable = markdown_table(['Model', 'Step', 'Added time over its backbone (%)', 'Quartiles (%)',
                             'Added GFLOPs (%)', f'Target on a GPU, {"compiled" if compile_model else "eager"} (%)',
                             'Result'], trows, 'llrrrrl')

    official_table = ''
    orows = []
    for label in ('gsop_resnet50', 'gsop2_resnet50'):
        theirs = by_label.get(f'official {label}')
        if theirs is None or label not in by_label:
            continue
        ours = by_label[label]
        for kind, a, b in (('inference', ours.t_infer, theirs.t_infer), ('training step', ours.t_train, theirs.t_train)):
            if not a:
                continue
            faster = -paired_overhead(a, b)  # % less time than the official code
            orows.append([f'`{label}`', kind, fmt(batch / median(a), 1), fmt(batch / median(b), 1),
                          fmt(median([y / x for x, y in zip(a, b)]), 2) + 'x',
                          ('met' if faster >= 0 else 'NOT met') if on_target_settings else ''])
    if orows:
        official_table = ('\nOurs against the official code (same runs, interleaved): img/s and the median of the '
                          'per-repetition speed ratios; target on a GPU: at least as fast.\n\n' + markdown_table(
                              ['Model', 'Step', 'Ours (img/s)', 'Official (img/s)', 'Speed-up', 'Result'],
                              orows, 'llrrrl') + '\n')

    classifier_note = ''
    if classifiers:
        small, large = classifiers
        extra = [a - b for a, b in zip(large.t_train, small.t_train)]
        trunks = {d: by_label[f'gsop_resnet{d} (attn_mode=none)'].t_train for d in depths}
        shares = ', '.join(f'{100.0 * median([e / t for e, t in zip(extra, trunks[d])]):+.1f} % '
                           f'of the ResNet-{d} trunk\'s' for d in depths)
        classifier_note = (
            f'\nPart of GSoP-Net2\'s training-step cost is its classifier, not GSoP maths: a training step of '
            f'`{large.label}` alone (forward, backward, SGD, batch {batch}) takes {1e3 * median(extra):.1f} ms more '
            f'than one of the trunk\'s `{small.label}` ({shares} step, median over repetitions).\n')

    settings = (f'batch {batch} @ {args.img_size} px, float32{" + bf16 autocast" if amp else ""}'
                f'{", channels_last" if channels_last else ""}{", torch.compile" if compile_model else ", eager"}, '
                f'{warmup} warm-up + {reps} timed repetitions, models interleaved, medians; '
                f'wall time {time.time() - t_start:.0f} s')
    text = (f'Machine: {machine_line(device, threads)}\n'
            f'Settings: {settings}.\n\n{table}\n\n'
            f'GSoP\'s cost: medians of the per-repetition ratios model / backbone, and their quartiles:\n\n{ttable}\n'
            + official_table + classifier_note + (f'\n{sync_note}\n' if sync_note else ''))
    print(text, end='')
    if args.out:
        write_atomic(args.out, text)


if __name__ == '__main__':
    main()
