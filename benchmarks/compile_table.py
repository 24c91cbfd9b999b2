"""The fused GSoP ops' Triton kernels as a GPU would compile them, on a machine without one.

    python benchmarks/compile_table.py [--json] [--out FILE]

* The launches: GSoP-Net1 and Net2 (ImageNet at 224 px, CIFAR at 32 px) with the fused ops, batch 1 and 128,
  training step and inference, float32 and bf16 autocast, NCHW and channels_last, run on tensors without data
  (``FakeTensorMode``) inside ``record_launches``: the launchers choose blocks, warps and stages as on CUDA and
  record each launch instead of running it. The fake tensors are CPU ones (autograd's engine runs no backward on
  fake CUDA tensors without a GPU), and CUDA's autocast needs a GPU to turn on, so bf16 is the CPU's autocast,
  which casts what CUDA's does in these models: convolutions and linear layers to bf16, BatchNorm and the fused
  ops as they come, the gate's and the head's second-order maths in float32 with autocast off.
* Each distinct launch, as Triton's JIT specialises it (argument types, 16-byte alignment and divisibility, ones),
  is compiled once per target with Triton's compiler and ptxas; ``cuobjdump -res-usage`` (both in Triton's wheel)
  reads registers per thread and stack (local memory: spills), Triton's metadata the dynamic shared memory.
* Blocks per SM: the fewest that registers (65536 per SM, allocated per warp in units of 256), shared memory
  (the SM's, with 1 KiB the system keeps per block), warps (64 per SM) and the 32-block limit allow.

``tests/test_triton_compile.py`` runs this and checks the table: no stack anywhere, shared memory within the
target's limit, and at most 128 registers per thread in the memory-bound kernels.
"""
import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterator, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import markdown_table, write_atomic  # noqa: E402
from timm_gsop.layers._triton import Launch, TensorArg  # noqa: E402


class Target(NamedTuple):
    name: str
    capability: int
    multi_processors: int  # of the data-centre GPU: the launchers size some grids by it
    shared_per_block: int  # the most a block may use (opt-in), bytes
    shared_per_sm: int


TARGETS = (Target('sm_80', 80, 108, 166912, 167936),  # A100
           Target('sm_90', 90, 132, 232448, 233472))  # H100
REGISTERS_PER_SM, REGISTER_UNIT, WARPS_PER_SM, BLOCKS_PER_SM, RESERVED_SHARED = 65536, 256, 64, 32, 1024

# The models and their input size; what each is run in.
MODELS = {'gsop_resnet50': 224, 'gsop2_resnet50': 224, 'gsop_resnet164_cifar': 32, 'gsop2_resnet164_cifar': 32}
BATCHES = (1, 128)
DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = (torch.contiguous_format, torch.channels_last)

# Kernels that exist to stream a map at the memory's bandwidth: they need many loads in flight, so many warps.
MEMORY_BOUND = ('_gate_product_fwd_kernel', '_gate_product_bwd_kernel', '_channel_stats_kernel')
MEMORY_BOUND_MAX_REGISTERS = 128


def _model_steps(name: str, size: int) -> Iterator[str]:
    """Runs every step of model ``name`` on fake CPU tensors, yielding a label after each."""
    import timm
    import timm_gsop  # noqa: F401  registers the models
    from timm_gsop.layers import set_fused_gsop, use_fused_gsop

    saved = use_fused_gsop()
    set_fused_gsop(True)
    try:
        model = timm.create_model(name)
    finally:
        set_fused_gsop(saved)
    for layout in LAYOUTS:
        for p in model.parameters():  # Module.to(memory_format) swaps fake parameters, which FakeTensorMode refuses
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=layout)
        for batch in BATCHES:
            x = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
            for train in (True, False):
                model.train(train)
                for dtype in DTYPES:
                    with torch.set_grad_enabled(train), torch.autocast(
                            'cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                        out = model(x)
                    if train:
                        F.cross_entropy(out, torch.zeros(batch, dtype=torch.long)).backward()
                        model.zero_grad(set_to_none=True)
                    yield f'{name} {layout} batch {batch} {"train" if train else "infer"} {dtype}'


def record(name: str) -> List[Launch]:
    """Every launch of every step of model ``name``, its kernel named by module and name (to pass between
    processes). One SM count serves every target: it sizes the weight gradient's row splits, which changes that
    grid and a split's row count, a multiple of the row block either way: Triton specialises both targets alike."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from timm_gsop.layers._triton import record_launches

    with FakeTensorMode(), record_launches(TARGETS[-1].multi_processors) as launches:
        for label in _model_steps(name, MODELS[name]):
            print(f'recorded {label}', file=sys.stderr, flush=True)
    return [l._replace(kernel=f'{l.kernel.fn.__module__}:{l.kernel.fn.__name__}') for l in launches]


class _Pointer:
    """A tensor argument as Triton's specialisation sees it: dtype and address (a 512-byte aligned storage)."""

    def __init__(self, dtype: torch.dtype, offset_bytes: int):
        self.dtype, self._offset = dtype, offset_bytes

    def data_ptr(self) -> int:
        return 512 + self._offset


def _kernel(name: str):
    module, attr = name.split(':')
    return getattr(importlib.import_module(module), attr)


def _specialise(launch: Launch, backend) -> Tuple[tuple, dict]:
    """(key, what to compile) of a launch: Triton's JIT binder specialises its arguments as at a real launch."""
    from triton.runtime.jit import create_function_from_signature

    kernel = _kernel(launch.kernel)
    args = [_Pointer(*a) if isinstance(a, TensorArg) else a for a in launch.args]
    kwargs = dict(launch.kwargs, debug=False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return (launch.kernel, repr(specialization), repr(options)), dict(
        signature=signature, constexprs=constexprs, attrs=attrs, options=options.__dict__)


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the cubin's one function, from ``cuobjdump -res-usage``."""
    import triton
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, '-res-usage', f.name], check=True, capture_output=True, text=True).stdout
    usage = re.search(r'REG:\d+.*', text)
    assert usage, text
    return {k: int(v) for k, v in re.findall(r'(\w+)(?:\[\d+\])?:(\d+)', usage.group(0))}


def blocks_per_sm(registers: int, shared: int, num_warps: int, target: Target) -> int:
    warp_registers = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTERS_PER_SM // warp_registers // num_warps
    by_shared = target.shared_per_sm // (shared + RESERVED_SHARED)
    return min(by_registers, by_shared, WARPS_PER_SM // num_warps, BLOCKS_PER_SM)


_DTYPE_NAMES = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16', torch.float64: 'fp64'}


def compile_row(launch: Launch, target: Target) -> dict:
    """What ptxas makes of ``launch`` for ``target``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    gpu = GPUTarget('cuda', target.capability, 32)
    kernel, kwargs = _kernel(launch.kernel), dict(launch.kwargs)
    _, spec = _specialise(launch, make_backend(gpu))
    compiled = triton.compile(ASTSource(kernel, spec['signature'], spec['constexprs'], spec['attrs']),
                              target=gpu, options=spec['options'])
    usage = _resource_usage(compiled.asm['cubin'])
    shared = compiled.metadata.shared + usage['SHARED']
    num_warps = spec['options']['num_warps']
    # The map's dtype: the narrowest of the tensors'.
    dtype = min((a.dtype for a in launch.args if isinstance(a, TensorArg)), key=lambda d: d.itemsize)
    return dict(
        kernel=launch.kernel.split(':')[1], target=target.name, dtype=_DTYPE_NAMES[dtype],
        blocks='x'.join(str(kwargs[k]) for k in kernel.arg_names if k.startswith('BLOCK_')),
        warps=num_warps, stages=spec['options']['num_stages'], registers=usage['REG'], stack=usage['STACK'],
        shared=shared, shared_limit=target.shared_per_block,
        blocks_per_sm=blocks_per_sm(usage['REG'], shared, num_warps, target))


def _compile_task(task: Tuple[Launch, Target]) -> dict:
    return compile_row(*task)


def compile_rows(workers: int = os.cpu_count() or 1) -> List[dict]:
    """One row per distinct launch and target, recorded and compiled in ``workers`` processes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'))
    with pool:
        # The CIFAR models first: their 164 layers take longest.
        launches = [l for ls in pool.map(record, sorted(MODELS, key=MODELS.get)) for l in ls]
        tasks = []
        for target in TARGETS:
            backend = make_backend(GPUTarget('cuda', target.capability, 32))
            distinct = {_specialise(l, backend)[0]: l for l in launches}
            tasks += [(l, target) for l in distinct.values()]
        print(f'{len(launches)} launches, {len(tasks)} distinct compiles', file=sys.stderr, flush=True)
        return list(pool.map(_compile_task, tasks))


def markdown(rows: List[dict]) -> str:
    """One line per kernel, target, dtype and launch configuration: the worst of its launches."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r['kernel'], r['target'], r['dtype'], r['blocks'], r['warps'], r['stages']), []).append(r)
    lines = [(f'`{k[0]}`', *map(str, k[1:]), str(len(g)), str(max(r['registers'] for r in g)),
              str(max(r['stack'] for r in g)), str(max(r['shared'] for r in g)), str(min(r['blocks_per_sm'] for r in g)))
             for k, g in sorted(groups.items())]
    header = ['Kernel', 'Target', 'Dtype', 'Blocks', 'Warps', 'Stages', 'Launches', 'Registers', 'Stack (B)',
              'Shared (B)', 'Blocks/SM']
    return markdown_table(header, lines, align='llllrrrrrrr')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--json', action='store_true', help='print every distinct launch as JSON instead of the table')
    p.add_argument('--out', help='also write the output to this file')
    args = p.parse_args(argv)
    rows = compile_rows()
    out = json.dumps(rows) if args.json else markdown(rows)
    print(out)
    if args.out:
        write_atomic(args.out, out + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
