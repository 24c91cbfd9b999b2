"""Checks that more than one test file makes."""
import importlib.metadata
import importlib.util

import pytest
import torch

# Triton 3.7's interpreter (torch 2.12's) cannot run float64 dot products; the GSoP ops keep float64 eager anyway.
_FLOAT64_INTERPRETED = importlib.util.find_spec('triton') is not None and tuple(
    int(v) for v in importlib.metadata.version('triton').split('.')[:2]) >= (3, 8)


def interpreter_case_ids(cases):
    """pytest params of Triton-interpreter case ids; float64 ('f64') cases skip where the interpreter lacks it."""
    return [pytest.param(c, marks=pytest.mark.skipif(
        'f64' in c and not _FLOAT64_INTERPRETED, reason="Triton < 3.8's interpreter has no float64 dot product"))
        for c in cases]


def assert_hooks_fire_on_every_module_with_parameters(model, size):
    """Forward hooks of every module that holds parameters fire, in training and in eval: the registered graph
    is the one that runs. Returns the names of those modules."""
    with_params = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    fired = set()
    for n, m in model.named_modules():
        if n in with_params:
            m.register_forward_hook(lambda mod, args, out, n=n: fired.add(n))
    for train in (True, False):
        fired.clear()
        model.train(train)(torch.randn(2, 3, size, size))
        assert fired == with_params, sorted(with_params - fired)
    return with_params


@pytest.fixture(scope='module')
def one_thread():
    """Small maps run faster on one thread than on OpenMP threads fighting a busy CPU. Use it in a test module as
    ``pytestmark = pytest.mark.usefixtures('one_thread')`` after importing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
