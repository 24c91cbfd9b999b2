"""The official GSoP-Net code as a benchmark baseline, loaded from a checkout of its repository.

The official repository (ZilinGao/Global-Second-order-Pooling-Convolutional-Networks) ships its models
as a modified copy of torchvision (``torchvision/models/resnet.py`` and ``MPNCOV``). This package carries
none of it: ``load_official_models(DIR)`` imports that ``models`` folder from a checkout at DIR under a
name of its own (the real torchvision stays importable) and builds the networks its ``main.py`` trains:
a GSoP block (channel mode, 128 channels) in the last bottleneck of each stage, GSoP-Net2 without the
last stage's block.

The code was written for PyTorch 0.4. One expression of its triangle's backward no longer runs
(``Tensor.reshape`` of a ``torch.Size`` and an int, in ``MPNCOV.py``): it is given the shape it meant,
(n, 1), as the module is loaded. Nothing else is changed, so the loops and M x M matrices it times
are the official ones.
"""
import importlib.util
import os
import sys
import types
from typing import Callable, Dict

from torch import nn

__all__ = ['load_official_models']

# The one expression PyTorch >= 1.0 rejects, and what it meant (index is an (n, 1) tensor of positions).
_OLD_RESHAPE = 'grad_output[i,:].reshape(index.size(),1)'
_NEW_RESHAPE = 'grad_output[i,:].reshape(index.size(0), 1)'


def _load_patched_mpncov(package: str, models_dir: str) -> None:
    path = os.path.join(models_dir, 'MPNCOV', 'python', 'MPNCOV.py')
    module = types.ModuleType(f'{package}.MPNCOV.python.MPNCOV')
    module.__file__ = path
    with open(path) as f:
        source = f.read().replace(_OLD_RESHAPE, _NEW_RESHAPE)
    exec(compile(source, path, 'exec'), module.__dict__)
    sys.modules[module.__name__] = module  # found there by the models' relative import


def load_official_models(checkout: str) -> Dict[str, Callable[[], nn.Module]]:
    """{'official gsop_resnet50': factory, 'official gsop2_resnet50': factory} from the checkout at ``checkout``."""
    models_dir = os.path.join(checkout, 'torchvision', 'models')
    init = os.path.join(models_dir, '__init__.py')
    if not os.path.isfile(os.path.join(models_dir, 'resnet.py')):
        raise FileNotFoundError(
            f'No official GSoP code at {checkout!r} (looked for torchvision/models/resnet.py there). Give a '
            f'checkout of ZilinGao/Global-Second-order-Pooling-Convolutional-Networks.')
    name = 'gsop_official_models'
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[models_dir])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        _load_patched_mpncov(name, models_dir)
        spec.loader.exec_module(module)
    official = sys.modules[name]
    channel = '1'  # the official code's name for channel mode; '0' is no block

    def build(net: int) -> nn.Module:
        positions = [['0'] * 2 + [channel], ['0'] * 3 + [channel], ['0'] * 5 + [channel], ['0'] * 2 + [channel]]
        if net == 2:
            positions[-1][-1] = '0'
        return official.resnet50(att_position=positions, att_dim=128, GSoP_mode=net)

    return {'official gsop_resnet50': lambda: build(1), 'official gsop2_resnet50': lambda: build(2)}
