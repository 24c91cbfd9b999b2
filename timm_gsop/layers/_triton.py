"""How the Triton launchers start a kernel."""
import os

import torch


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, so that ``torch.compile`` traces the launch inside a ``triton_op``.

    Under Triton's interpreter (``TRITON_INTERPRET=1``: the CPU tests) the kernel itself: nothing traces it there,
    and torch before 2.14 refuses an interpreted kernel in ``wrap_triton``.
    """
    if os.environ.get('TRITON_INTERPRET') == '1':
        return kernel
    return torch.library.wrap_triton(kernel)
