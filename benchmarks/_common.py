"""Shared helpers of the benchmark scripts: machine description, models, FLOPs, memory, output."""
import argparse
import os
import platform
import statistics
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import timm
import timm_gsop  # noqa: F401  (registers the gsop models)


# (row label, timm model name, create_model kwargs, label of the row it is compared with)
# The GSoP overhead of a model is measured over "its own backbone": the same model with
# attn_mode='none' (same trunk, same head; timm.create_model drops kwargs that are None, so the
# string is needed). GSoP-Net2 is also compared with the plain trunk
# (Net1's backbone, average pooling), which shows what its blocks *and* its iSQRT-COV head cost.
ModelSpec = Tuple[str, str, dict, Optional[str]]


def model_specs(depths: Sequence[int] = (50, 101), timm_baselines: bool = True) -> List[ModelSpec]:
    specs: List[ModelSpec] = []
    for depth in depths:
        n1, n2 = f'gsop_resnet{depth}', f'gsop2_resnet{depth}'
        specs += [
            (f'{n1} (attn_mode=none)', n1, dict(attn_mode='none'), None),
            (n1, n1, {}, f'{n1} (attn_mode=none)'),
            (f'{n2} (attn_mode=none)', n2, dict(attn_mode='none'), f'{n1} (attn_mode=none)'),
            (n2, n2, {}, f'{n2} (attn_mode=none)'),
        ]
    if timm_baselines:
        specs += [
            ('resnet50 (timm)', 'resnet50', {}, None),
            ('seresnet50 (timm)', 'seresnet50', {}, 'resnet50 (timm)'),
            ('ecaresnet50d (timm)', 'ecaresnet50d', {}, None),
        ]
    return specs


def create(name: str, kwargs: dict) -> nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, img_size: int = 224) -> int:
    """FLOPs of one eval-mode forward of one image, as torch.utils.flop_counter counts them.

    FlopCounterMode counts 2 FLOPs per multiply-add of conv / (b)mm / addmm / baddbmm and nothing
    for norms, activations, pooling or other elementwise ops; GMACs = GFLOPs / 2.
    """
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, img_size, img_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops()


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device, threads: Optional[int] = None) -> str:
    if device.type == 'cuda':
        dev = f'GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host CPU {cpu_name()}'
    else:
        dev = f'CPU {cpu_name()}, {os.cpu_count()} logical CPUs, {threads or torch.get_num_threads()} torch threads'
    return (f'{dev}; torch {torch.__version__}, timm {timm.__version__}, timm_gsop {timm_gsop.__version__}, '
            f'Python {platform.python_version()}')


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def cpu_step_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes allocated by torch's CPU allocator while ``fn`` runs and not yet freed.

    Uses the profiler's memory events (profile_memory=True): each allocation or free reports the
    allocator's running total of the bytes it has seen allocated and not freed. That total is
    process-wide (it keeps what earlier profiled regions left behind), so the peak is taken
    relative to its value just before the first event. Tensors that existed before ``fn``
    (parameters, optimizer state) are not included; their frees inside ``fn`` are not subtracted.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch._C._profiler import _EventType
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, int(e.extra_fields.total_allocated), int(e.extra_fields.alloc_size)))
        stack.extend(e.children)
    if not events:
        return 0
    events.sort()
    base = events[0][1] - events[0][2]
    return max(0, max(total for _, total, _ in events) - base)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def add_device_args(parser) -> None:
    """--device, --threads, --batch, --amp, --channels-last: the settings both benchmarks share."""
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: all cores)')
    parser.add_argument('--batch', type=int, default=None, help='default: 8 on CPU, 128 on GPU')
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                        help='bf16 autocast (default: on for GPU, off for CPU)')
    parser.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                        help='channels_last inputs and weights (default: on for GPU, off for CPU)')


def resolve_device_args(args):
    """(device, gpu, threads, batch, amp, channels_last) from ``add_device_args``; sets torch's threads."""
    device = torch.device(args.device)
    gpu = device.type == 'cuda'
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    batch = args.batch or (128 if gpu else 8)
    amp = gpu if args.amp is None else args.amp
    channels_last = gpu if args.channels_last is None else args.channels_last
    if gpu:
        torch.backends.cudnn.benchmark = True
    return device, gpu, threads, batch, amp, channels_last


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> str:
    align = align or 'l' + 'r' * (len(header) - 1)
    sep = ['---:' if a == 'r' else ':---' for a in align]
    lines = ['| ' + ' | '.join(header) + ' |', '| ' + ' | '.join(sep) + ' |']
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(lines)


def fmt(x: Optional[float], digits: int = 1, signed: bool = False) -> str:
    if x is None:
        return '–'
    return f'{x:+.{digits}f}' if signed else f'{x:.{digits}f}'


def spec_map(specs: List[ModelSpec]) -> Dict[str, ModelSpec]:
    return {s[0]: s for s in specs}
