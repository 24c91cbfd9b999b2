"""The fused GSoP path in float32 and bfloat16 against the float64 eager truth: logits and every gradient.

A ReLU whose input lies within float32 rounding of zero makes the gradient discontinuous there: which side a float32
run lands on depends on its summation order (threads, SIMD, kernels), the flipped element moves a weight's gradient by
O(1), and a per-tensor max error of tens of percent then says nothing about the fused ops. So each test point is first
shown well-posed in float64 alone: nudging every module's output by +-NUDGE of its largest value (antithetic: a ReLU
input within the nudge of zero flips in one of the two runs) must barely move the truth. Only then is float32 held to
it; CASES names, for each configuration, a seed where that holds.
"""
import copy
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Tuple

import pytest
import torch

import timm
import timm_gsop  # noqa: F401  registers the models
from timm_gsop.layers import GSoPAttn, GSoPChannelGate, set_fused_gsop, use_fused_gsop

from checks import one_thread  # noqa: F401  the fixture

# Relative to each module output's largest value. Measured on gsop_resnet50 at 64 px: at every BatchNorm output and
# gate, the float32 forward's deviation from float64 is (rms) a seventh to a tenth of this nudge's; at 1e-7 the probe
# missed a tie that both float32 paths flipped.
NUDGE = 3e-7
# At the seeds below the nudges move the truth by 3e-5..8.4e-5, smoothly (in proportion to NUDGE); a flipped ReLU
# moves it by as much as 0.6. Three times the smooth part, and a third of FLOAT32_TOL: a flip the probe lets pass cannot
# fail the float32 check by itself.
STABLE = 3e-4
FLOAT32_TOL = 1e-3
# A gradient's error is relative to its largest value, floored at this share of the model's largest gradient: a conv
# bias before a train-mode BatchNorm has a zero gradient, and float32 leaves it ~1e-7 of the BatchNorm's own gradients.
FLOOR = 1e-3
# Fused float32 against eager float32, tensor by tensor: at most a digit worse, or under this.
FLOAT32_NOISE = 1e-4


@dataclass(frozen=True)
class Case:
    model: str
    size: int
    batch: int
    training: bool
    channels_last: bool
    seed: int  # the weights'; the input's is seed + 1, the calibration batch's seed + 2
    kwargs: Tuple[Tuple[str, object], ...] = ()


def _case(model, size, batch, mode, layout, seed, **kwargs):
    layers = (1, 1, 1) if 'cifar' in model else (1, 1, 1, 1)
    kwargs = dict(layers=layers, num_classes=10, **kwargs)
    return Case(model, size, batch, mode == 'train', layout == 'cl', seed, tuple(sorted(kwargs.items())))


# Seeds searched from 0: one in 2 to one in 43 was well-posed. Batch 4, and batch 2 in train mode on
# gsop_resnet50 (and on CIFAR Net2 with attn_dim 32), were ill-posed at every seed tried (35 to 90): batch 4 is
# the GSoPAttn cases' below.
CASES: Dict[str, Case] = {
    'net1-d8-b1-eval-cl-stride2': _case('gsop_resnet50', 64, 1, 'eval', 'cl', 1, attn_dim=8, last_stride=2),
    'net1-d256-b1-train': _case('gsop_resnet50', 64, 1, 'train', 'nchw', 42, attn_dim=256),
    'net2-d128-b2-eval': _case('gsop2_resnet50', 64, 2, 'eval', 'nchw', 1, attn_dim=128, cov_dim=32),
    'net2-d16-b1-train-cl': _case('gsop2_resnet50', 64, 1, 'train', 'cl', 26, attn_dim=16, cov_dim=32),
    'cifar1-d8-b2-train': _case('gsop_resnet164_cifar', 32, 2, 'train', 'nchw', 38, attn_dim=8),
    'cifar1-d64-b1-eval-cl': _case('gsop_resnet164_cifar', 32, 1, 'eval', 'cl', 1, attn_dim=64),
    'cifar1-d256-b1-train-cl': _case('gsop_resnet164_cifar', 32, 1, 'train', 'cl', 12, attn_dim=256),
    'cifar2-d16-b2-eval': _case('gsop2_resnet164_cifar', 32, 2, 'eval', 'nchw', 4, attn_dim=16, cov_dim=32),
    'cifar2-d32-b2-eval-cl': _case('gsop2_resnet164_cifar', 32, 2, 'eval', 'cl', 11, attn_dim=32, cov_dim=32),
    'cifar2-d128-b1-train-cl': _case('gsop2_resnet164_cifar', 32, 1, 'train', 'cl', 3, attn_dim=128, cov_dim=32),
}
BFLOAT16_CASES = ['net1-d8-b1-eval-cl-stride2', 'net2-d16-b1-train-cl', 'cifar1-d8-b2-train', 'cifar2-d16-b2-eval']

# GSoPAttn alone on the smallest maps (a 2x2 map at reduce_stride 2 gives a one-position covariance):
# (channels, attn_dim, reduce_stride, map side, batch, mode, layout, with shortcut, relu, seed).
ATTN_CASES = {
    'attn-1x1-d16-b2-train-shortcut-relu': (64, 16, 1, 1, 2, 'train', 'nchw', True, True, 0),
    'attn-1x1-d8-b1-eval': (32, 8, 1, 1, 1, 'eval', 'nchw', False, False, 0),
    'attn-2x2-d64-b4-train-cl-stride2-shortcut-relu': (128, 64, 2, 2, 4, 'train', 'cl', True, True, 0),
    'attn-2x2-d256-b2-train-shortcut': (256, 256, 1, 2, 2, 'train', 'nchw', True, False, 0),
    'attn-2x2-d128-b1-eval-cl-relu': (128, 128, 1, 2, 1, 'eval', 'cl', False, True, 0),
}


# One thread (4x faster here on 2 shared cores); the verdict does not depend on it: at a well-posed point
# no float32 summation order flips a ReLU.
pytestmark = pytest.mark.usefixtures('one_thread')


def _max_errors(got, truth, floor=FLOOR):
    """max|g - t| / max|t| per tensor, a gradient's denominator floored at ``floor`` x the largest gradient's."""
    scale = max(t.abs().max().item() for name, t in truth.items() if name != 'logits')
    return {name: (got[name] - t).abs().max().item()
            / max(t.abs().max().item(), 0. if name == 'logits' else floor * scale) for name, t in truth.items()}


def _norm_errors(got, truth, floor):
    """||g - t|| / ||t|| per tensor, a gradient's denominator floored at ``floor`` x the largest gradient's norm."""
    scale = max(t.norm().item() for name, t in truth.items() if name != 'logits')
    return {name: (got[name] - t).norm().item()
            / max(t.norm().item(), 0. if name == 'logits' else floor * scale) for name, t in truth.items()}


def _worst(errors):
    name = max(errors, key=errors.get)
    return f'{errors[name]:.2e} ({name})'


def _run(model, inputs, training, channels_last, nudge=0., bf16=False, **call_kwargs):
    """Logits and the gradients of ``out.square().sum()`` w.r.t. the inputs and parameters, as float64, by name.

    Runs a copy of ``model``: one run's BatchNorm statistics never reach the next. ``nudge`` adds
    ``nudge * s * max|out|`` to the output of every leaf module, channel gate and GSoP block, s a fixed +-1 pattern.
    """
    model = copy.deepcopy(model).train(training)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    inputs = [t.detach().contiguous(memory_format=memory_format).requires_grad_() for t in inputs]
    if nudge:
        generator = torch.Generator().manual_seed(0)  # modules run in the same order: the same s for +nudge and -nudge

        def add_nudge(module, args, out):
            sign = torch.randint(0, 2, out.shape, generator=generator, dtype=out.dtype).mul_(2).sub_(1)
            return out + sign * (nudge * out.detach().abs().max())  # no gradient through the max

        for m in model.modules():
            if m is not model and (not list(m.children()) or isinstance(m, (GSoPAttn, GSoPChannelGate))):
                m.register_forward_hook(add_nudge)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        out = model(*inputs, **call_kwargs)
    (out.float() if bf16 else out).square().sum().backward()
    tensors = {'logits': out.detach(), **{f'input{i}': t.grad for i, t in enumerate(inputs)}}
    tensors.update((name, p.grad) for name, p in model.named_parameters())
    return {name: t.double().contiguous() for name, t in tensors.items()}


def _well_posed_truth(label, model64, inputs, training, channels_last, **call_kwargs):
    """The float64 truth, after asserting that the +-NUDGE runs stay within STABLE of it."""
    truth = _run(model64, inputs, training, channels_last, **call_kwargs)
    for nudge in (NUDGE, -NUDGE):
        errors = _max_errors(_run(model64, inputs, training, channels_last, nudge, **call_kwargs), truth)
        assert max(errors.values()) < STABLE, (
            f'{label}: ill-posed test point, a {nudge:+g} nudge moves the float64 truth by {_worst(errors)} '
            f'(a ReLU input within rounding of zero): pick another seed')
    return truth


def _assert_float32_close(label, fused, eager, inputs, truth, training, channels_last, **call_kwargs):
    errors = {}
    for path, model in (('fused', fused), ('eager', eager)):
        errors[path] = _max_errors(_run(model, inputs, training, channels_last, **call_kwargs), truth)
        assert max(errors[path].values()) < FLOAT32_TOL, f'{label}: {path} float32 {_worst(errors[path])}'
    # At a well-posed point both errors are rounding, ~1e-5, and smooth in the weights: a fused op losing more than a
    # digit shows here before it reaches FLOAT32_TOL.
    worse = {name: (f'{e:.1e}', f"{errors['eager'][name]:.1e}") for name, e in errors['fused'].items()
             if e > max(10 * errors['eager'][name], FLOAT32_NOISE)}
    assert not worse, f'{label}: fused float32 error a digit above the eager one (fused, eager): {worse}'


def _create(factory, fused_on, seed, *args, **kwargs):
    saved = use_fused_gsop()
    set_fused_gsop(fused_on)
    try:
        torch.manual_seed(seed)
        return factory(*args, **kwargs)
    finally:
        set_fused_gsop(saved)


def _fused_copy(factory, eager, *args, **kwargs):
    """``factory`` built with the fused ops, holding exactly ``eager``'s values (float64 holds every float32)."""
    fused = _create(factory, True, 0, *args, **kwargs)
    fused.load_state_dict(eager.state_dict())
    gates = [[m for m in model.modules() if isinstance(m, GSoPChannelGate)] for model in (fused, eager)]
    assert gates[0] and all(g.fusable() for g in gates[0]) and not any(g.fused for g in gates[1])
    eager64 = copy.deepcopy(eager).double()
    sd, sd64 = fused.state_dict(), eager64.state_dict()
    assert list(sd) == list(sd64) and all(torch.equal(sd[k].to(sd64[k].dtype), sd64[k]) for k in sd64)
    return fused, eager64


def _calibrate(model, size, seed):
    """BatchNorm running statistics of one batch: eval-mode maps at a trained net's scale, not the init's ~1e5."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(seed + 2)))
    for bn in bns:
        bn.momentum = 0.1


@lru_cache(maxsize=None)
def _setup(case_id):
    """(eager float32, fused float32 with the same values, input, well-posed float64 truth) of a model case."""
    case = CASES[case_id]
    kwargs = dict(case.kwargs)
    eager = _create(timm.create_model, False, case.seed, case.model, **kwargs)
    if not case.training:
        _calibrate(eager, case.size, case.seed)
    fused, eager64 = _fused_copy(timm.create_model, eager, case.model, **kwargs)
    x = torch.randn(case.batch, 3, case.size, case.size, generator=torch.Generator().manual_seed(case.seed + 1))
    truth = _well_posed_truth(case_id, eager64, [x.double()], case.training, case.channels_last)
    return eager, fused, x, truth


@pytest.mark.parametrize('case_id', list(CASES))
def test_float32_matches_the_float64_truth(case_id):
    case = CASES[case_id]
    eager, fused, x, truth = _setup(case_id)
    _assert_float32_close(case_id, fused, eager, [x], truth, case.training, case.channels_last)


@pytest.mark.parametrize('case_id', ATTN_CASES)
def test_attn_on_the_smallest_maps_matches_the_float64_truth(case_id):
    channels, attn_dim, stride, side, batch, mode, layout, shortcut, relu, seed = ATTN_CASES[case_id]
    kwargs = dict(attn_dim=attn_dim, reduce_stride=stride)
    eager = _create(GSoPAttn, False, seed, channels, **kwargs)
    fused, eager64 = _fused_copy(GSoPAttn, eager, channels, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = [torch.randn(batch, channels, side, side, generator=generator) for _ in range(1 + shortcut)]
    training, channels_last = mode == 'train', layout == 'cl'
    truth = _well_posed_truth(case_id, eager64, [t.double() for t in inputs], training, channels_last, relu=relu)
    _assert_float32_close(case_id, fused, eager, inputs, truth, training, channels_last, relu=relu)


# bfloat16 keeps 8 bits: ReLU inputs within its rounding of zero are everywhere, so a max error shows flips only.
# Norm-wise per tensor instead, floored at 1% of the largest gradient's norm (a BatchNorm's weight and bias gradients
# are sums that cancel), and held to eager bfloat16, whose flips land elsewhere: per tensor the two errors are
# independent draws. Measured at BFLOAT16_CASES, 1 and 2 threads: both paths up to 0.38 on a tensor and 0.03 on the
# logits; fused up to 2.2x eager on a tensor, 0.81 of twice eager plus 2**-8.
BFLOAT16_FLOOR = 1e-2
BFLOAT16_TOL = 0.75
BFLOAT16_LOGITS_TOL = 2 ** -4


@pytest.mark.parametrize('case_id', BFLOAT16_CASES)
def test_bfloat16_autocast_matches_the_float64_truth_as_eager_does(case_id):
    case = CASES[case_id]
    eager, fused, x, truth = _setup(case_id)
    errors = {path: _norm_errors(_run(model, [x], case.training, case.channels_last, bf16=True), truth, BFLOAT16_FLOOR)
              for path, model in (('fused', fused), ('eager', eager))}
    for path, e in errors.items():
        assert e['logits'] < BFLOAT16_LOGITS_TOL and max(e.values()) < BFLOAT16_TOL, f'{path} bfloat16 {_worst(e)}'
    worse = {name: (f'{e:.1e}', f"{errors['eager'][name]:.1e}") for name, e in errors['fused'].items()
             if e > 3 * errors['eager'][name] + 2 ** -8}
    assert not worse, f'fused bfloat16 error above three times the eager one (fused, eager): {worse}'


def test_the_reported_tie_is_ill_posed():
    # gsop_resnet50 at 64 px, batch 2, train, seed 0: a layer4 ReLU input 1.1e-6 from zero; float32 runs land on
    # either side of it (0.27 off on layer4.0.downsample.0.weight). The precondition has to refuse it.
    eager = _create(timm.create_model, False, 0, 'gsop_resnet50', layers=(1, 1, 1, 1), attn_dim=16, num_classes=10)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError, match='ill-posed'):
        _well_posed_truth('reported', eager.double(), [x.double()], True, False)
