"""How the Triton launchers start a kernel, and a record of the launches they would make on a GPU."""
import contextlib
import os
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch


class TensorArg(NamedTuple):
    """A recorded tensor argument: what Triton specialises a pointer on (its dtype, its address modulo 16)."""
    dtype: torch.dtype
    offset_bytes: int  # from the start of its storage, which CUDA's allocator aligns to 512 bytes


class Launch(NamedTuple):
    """One kernel launch as a launcher made it: the kernel, its grid and all it was called with."""
    kernel: object  # triton.JITFunction
    grid: Tuple[int, ...]
    args: tuple  # tensors as TensorArg, numbers as they are
    kwargs: Tuple[Tuple[str, object], ...]  # constexprs, num_warps, num_stages


class _Recording(NamedTuple):
    launches: List[Launch]
    multi_processor_count: int


_recording: Optional[_Recording] = None


def _recorded(value):
    if isinstance(value, torch.Tensor):
        return TensorArg(value.dtype, value.storage_offset() * value.element_size())
    return value


class _RecordingKernel:
    """``kernel[grid](*args, **kwargs)`` appends a Launch instead of running."""

    def __init__(self, kernel, recording: _Recording):
        self.kernel, self.recording = kernel, recording

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.recording.launches.append(Launch(
                self.kernel, tuple(grid), tuple(map(_recorded, args)), tuple(sorted(kwargs.items()))))
        return launch


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, so that ``torch.compile`` traces the launch inside a ``triton_op``.

    Under Triton's interpreter (``TRITON_INTERPRET=1``: the CPU tests) the kernel itself: nothing traces it there,
    and torch before 2.14 refuses an interpreted kernel in ``wrap_triton``. Inside ``record_launches``, a kernel
    that records its launches.
    """
    if _recording is not None:
        return _RecordingKernel(kernel, _recording)
    if os.environ.get('TRITON_INTERPRET') == '1':
        return kernel
    return torch.library.wrap_triton(kernel)


def is_cuda(t: torch.Tensor) -> bool:
    """Whether the launchers treat ``t`` as a CUDA tensor: it is one, or launches are being recorded."""
    return t.is_cuda or _recording is not None


def multi_processor_count(device: torch.device) -> int:
    """The CUDA device's SM count; inside ``record_launches``, the recorded GPU's."""
    if _recording is not None:
        return _recording.multi_processor_count
    return torch.cuda.get_device_properties(device).multi_processor_count


@contextlib.contextmanager
def record_launches(multi_processor_count: int) -> Iterator[List[Launch]]:
    """Launches in this context are recorded in the yielded list instead of run, as if on a GPU with
    ``multi_processor_count`` SMs: the launchers take every tensor for a CUDA one (``is_cuda``) and choose as
    they do there. For tensors without data (``FakeTensorMode``, the meta device): no GPU needed."""
    global _recording
    assert _recording is None, 'record_launches does not nest'
    _recording = _Recording([], multi_processor_count)
    try:
        yield _recording.launches
    finally:
        _recording = None
