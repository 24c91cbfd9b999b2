"""Memory traffic and op count of one step, GSoP models against their backbones: the cost to optimise on a CPU.

    python benchmarks/traffic.py [--models gsop_resnet50,gsop2_resnet50] [--batch 128] [--no-channels-last]
                                 [--no-amp] [--by-op] [--no-timm] [--out FILE]

Method (deterministic: the same figures on any machine, run after run):

* A ``TorchDispatchMode`` sees every aten op of one step. Each op that is not a view or an allocation
  (view, reshape, expand, transpose, slice, select, empty, ...: ``FREE`` below) counts once, and adds
  the bytes of all its tensor inputs and outputs (numel x element size; a tensor passed twice counts
  twice). On a GPU most of GSoP's ops are memory-bound, so these bytes follow its kernel time (measured
  on an H200 for GSoP-Net1's training step: +16 to +19 % bytes, +17.7 % kernel time) and the op count
  its launches.
* The step: inference (eval, ``no_grad``) or training (train mode, cross-entropy, backward; the
  optimizer step is left out), on CPU under bf16 autocast with channels_last model and input, at
  224 px, after one warm-up step, with the gradients set to None before the counted one.
* Counted at batch 1 and 2, extrapolated linearly to ``--batch`` (weights count once, activations per
  image): bytes(B) = bytes(1) + (B - 1) * (bytes(2) - bytes(1)). The op count is batch 2's.
* A GSoP model is compared with the same model at ``attn_mode='none'`` (its own backbone: same trunk and
  head); timm's ``seresnet50`` over ``resnet50`` is shown for reference.

The targets are read with this same count; besides the added bytes and ops this script prints the
absolute figures and, with ``--by-op``, where the added bytes go.
"""
import argparse
import collections
import contextlib
import os
import sys
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from _common import create, markdown_table, write_atomic  # noqa: E402
from timm_gsop.layers import use_fused_gsop  # noqa: E402

#: Ops that move no data: views, reshapes of a view and allocations.
FREE = frozenset({
    'view', 'reshape', '_unsafe_view', 'expand', 'permute', 'transpose', 't', 'as_strided', 'slice', 'select',
    'unsqueeze', 'squeeze', 'detach', 'alias', 'split', 'split_with_sizes', 'chunk', 'unbind', 'diagonal',
    'narrow', 'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided', 'lift_fresh', 'set_',
    'resize_', 'view_as', 'expand_as', 'flatten', 'unflatten', 'movedim'})

#: Targets: at most (added bytes, added ops) over the model's own backbone, per (model, training step?).
TARGETS = {
    ('gsop_resnet50', False): (0.07, 60), ('gsop_resnet50', True): (0.12, 160),
    ('gsop2_resnet50', False): (0.05, 45), ('gsop2_resnet50', True): (0.09, 120),
}
#: The same with the fused GSoP ops (``TIMM_GSOP_FUSED=1``; each fused op counts as one op reading its inputs and
#: writing its outputs once, what its kernel moves).
FUSED_TARGETS = {
    ('gsop_resnet50', False): (0.03, 32), ('gsop_resnet50', True): (0.06, 100),
    ('gsop2_resnet50', False): (0.025, 24), ('gsop2_resnet50', True): (0.05, 75),
}


class TrafficCount(TorchDispatchMode):
    """Bytes read and written and the number of ops, per op name, of everything run under it."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0
        self.bytes_by_op: Dict[str, int] = collections.Counter()
        self.ops_by_op: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in FREE:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            self.bytes += nbytes
            self.ops += 1
            self.bytes_by_op[name] += nbytes
            self.ops_by_op[name] += 1
        return out


def count_step(make: Callable[[], torch.nn.Module], train: bool, batch: int, amp: bool = True,
               channels_last: bool = True, size: int = 224) -> TrafficCount:
    """The traffic of one step of a fresh model (seeded), after a warm-up step."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = make().train(train).to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, model.num_classes, (batch,))
    autocast = torch.autocast('cpu', dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def step():
        if train:
            with autocast:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        else:
            with torch.no_grad(), autocast:
                model(x)

    step()
    model.zero_grad(set_to_none=True)
    with TrafficCount() as count:
        step()
    return count


def count_at_batch(make: Callable[[], torch.nn.Module], train: bool, batch: int = 128, **kwargs) -> Tuple[
        float, int, Dict[str, float]]:
    """(bytes, ops, bytes by op) of one step at ``batch``, extrapolated from batches 1 and 2."""
    one, two = count_step(make, train, 1, **kwargs), count_step(make, train, 2, **kwargs)
    extrapolate = lambda b1, b2: b1 + (b2 - b1) * (batch - 1)  # noqa: E731
    by_op = {op: extrapolate(one.bytes_by_op.get(op, 0), two.bytes_by_op.get(op, 0))
             for op in set(one.bytes_by_op) | set(two.bytes_by_op)}
    return extrapolate(one.bytes, two.bytes), two.ops, by_op


def comparisons(models: List[str], timm_baselines: bool) -> List[Tuple[str, str, dict, str, dict]]:
    """(model label, model name, kwargs, baseline name, baseline kwargs) per row pair."""
    rows = [(name, name, {}, name, dict(attn_mode='none')) for name in models]
    if timm_baselines:
        rows.append(('seresnet50 (timm)', 'seresnet50', {}, 'resnet50', {}))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', default='gsop_resnet50,gsop2_resnet50', help='comma-separated GSoP model names')
    p.add_argument('--batch', type=int, default=128, help='batch the counts are extrapolated to (default 128)')
    p.add_argument('--no-channels-last', dest='channels_last', action='store_false')
    p.add_argument('--no-amp', dest='amp', action='store_false', help='float32 instead of bf16 autocast')
    p.add_argument('--no-timm', dest='timm_baselines', action='store_false', help='leave out seresnet50 over resnet50')
    p.add_argument('--by-op', action='store_true', help='also list the added bytes and ops by aten op')
    p.add_argument('--out', help='also write the tables to this file')
    args = p.parse_args(argv)
    models = [m for m in args.models.split(',') if m]
    kwargs = dict(amp=args.amp, channels_last=args.channels_last)

    mib = 2 ** 20
    rows, by_op_rows = [], []
    for label, name, model_kwargs, base_name, base_kwargs in comparisons(models, args.timm_baselines):
        for train in (False, True):
            step = 'train' if train else 'infer'
            b, ops, by_op = count_at_batch(lambda: create(name, model_kwargs), train, args.batch, **kwargs)
            pb, pops, base_by_op = count_at_batch(lambda: create(base_name, base_kwargs), train, args.batch, **kwargs)
            targets = FUSED_TARGETS if use_fused_gsop() else TARGETS
            target = targets.get((name, train)) if not model_kwargs else None
            added, added_ops = b / pb - 1, ops - pops
            result = ''
            if target and args.batch == 128 and args.amp and args.channels_last:
                result = 'met' if added <= target[0] and added_ops <= target[1] else 'NOT met'
            rows.append([
                f'`{label}`', step, f'`{base_name}`' + (' (attn_mode=none)' if base_kwargs else ''),
                f'{pb / args.batch / mib:.1f}', f'{b / args.batch / mib:.1f}', f'{added:+.1%}', f'{added_ops:+d}',
                f'<= {target[0]:.0%}, {target[1]}' if target else '', result])
            if args.by_op:
                for op in sorted(set(by_op) | set(base_by_op), key=lambda o: -(by_op.get(o, 0) - base_by_op.get(o, 0))):
                    delta = by_op.get(op, 0) - base_by_op.get(op, 0)
                    if abs(delta) >= 0.0005 * pb:
                        by_op_rows.append([f'`{label}`', step, op, f'{delta / pb:+.2%}', f'{delta / args.batch / mib:+.2f}'])

    settings = (f'batch {args.batch} (extrapolated from 1 and 2), 224 px, '
                f"{'bf16 autocast' if args.amp else 'float32'}, {'channels_last' if args.channels_last else 'NCHW'}, "
                f'torch {torch.__version__}')
    text = [f'Memory traffic of one step ({settings}); MiB per image:', '', markdown_table(
        ['Model', 'Step', 'Compared with', 'Backbone (MiB/img)', 'Model (MiB/img)', 'Added bytes', 'Added ops',
         'Target', 'Result'], rows, align='llrrrrrlr')]
    if by_op_rows:
        text += ['', 'Where the added bytes go (aten ops, model minus backbone; 0.05 % and more):', '', markdown_table(
            ['Model', 'Step', 'Op', 'Added bytes', 'MiB/img'], by_op_rows, align='lllrr')]
    out = '\n'.join(text)
    print(out)
    if args.out:
        write_atomic(args.out, out + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
