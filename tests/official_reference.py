"""Independent reference for the original GSoP-Net (Gao et al., CVPR 2019).

This is a test helper for fidelity tests, not a model implementation. It was written
from scratch from the semantics of the network released by the paper's authors
(their modified ``torchvision/models/resnet.py`` plus the ``MPNCOV`` covariance /
Newton-Schulz / triangle-vectorisation operators, wired up by their ``main.py``).
No original code is included here; the behaviour was re-derived and then checked
numerically against the original network outside this repository.

It provides:

* :func:`official_state_dict` - a random state dict whose keys and shapes are exactly
  those of the original ``resnet50`` / ``resnet101`` GSoP model for a given
  GSoP mode (Net1 or Net2) and attention mode.
* :func:`official_forward` - a purely functional, eval-mode forward pass of that
  network (``torch.nn.functional`` only, per-sample loops, written for clarity).
* :func:`save_official_checkpoint` - writes a checkpoint laid out like the training
  script's ``save_checkpoint`` output (``module.``-prefixed ``state_dict`` etc.).

Original parameter-name scheme (torchvision-ResNet style)::

    conv1.weight, bn1.*                                  stem (7x7/2 conv, BN)
    layer{1..4}.{b}.conv{1,2,3}.weight, .bn{1,2,3}.*       bottleneck convs / BNs
    layer{s}.0.downsample.0.weight, .downsample.1.*        projection shortcut (first block)
    # channel branch (modes channel / fusion_*), d = attn_dim:
    .conv_for_DR.{weight,bias}          1x1 conv C->d (stride 2 when planes == 64)
    .bn_for_DR.*                        BN(d)
    .row_bn.*                           BN(d) over the rows of the d x d covariance
    .row_conv_group.{weight,bias}       (4d, 1, d, 1), groups=d: row-wise conv
    .fc_adapt_channels.{weight,bias}    (C, 4d, 1, 1)
    # position branch (modes position / fusion_*), 8x8 grid -> 64 positions:
    .conv_for_DR_spatial.{weight,bias}  1x1 conv C->d
    .bn_for_DR_spatial.*                BN(d)
    .row_bn_for_spatial.*               BN(64)
    .row_conv_group_for_spatial.{weight,bias}      (256, 1, 64, 1), groups=64
    .fc_adapt_channels_for_spatial.{weight,bias}   (64, 256, 1, 1)
    # fusion_concat only:
    .dilate_conv_for_concat{1,2}.{weight,bias}     (C, 64, k, 1), groups=C/64
    .bn_for_concat.*                               BN(C)
    # head
    fc.{weight,bias}                                 Net1: Linear(2048, classes)
    layer_reduce.weight, layer_reduce_bn.*, fc.*     Net2: 1x1 conv 2048->256, BN,
                                                     Linear(256*257/2, classes)

``.*`` on a BN stands for ``weight, bias, running_mean, running_var,
num_batches_tracked``. Within each bottleneck the original module registration order
is: convs/BNs, channel branch, position branch, concat convs, then ``downsample``.

Attention placement (as the training script does it): the last bottleneck of every
stage carries the attention module; for Net2 the last stage has none. The original
code names the modes by one-character codes, see :data:`ATTN_CODES`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTN_CODES",
    "official_attention_layout",
    "official_state_dict",
    "official_forward",
    "save_official_checkpoint",
]

# attention mode name (training script flag) -> one-character code used in the model
ATTN_CODES = {
    "channel": "1",
    "position": "2",
    "fusion_avg": "+",
    "fusion_max": "M",
    "fusion_concat": "&",
}
_CHANNEL_CODES = {"1", "+", "M", "&"}
_POSITION_CODES = {"2", "+", "M", "&"}

_STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_STAGE_PLANES = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 1)  # NB: the last stage keeps stride 1 (14x14 at 224 px)
_EXPANSION = 4
_POS_GRID = 8  # position branch pools to an 8x8 grid -> 64 positions
_ROW_CONV_MULT = 4  # each row-wise conv group emits 4 channels
_NET2_DIM = 256  # Net2 head reduces to 256 channels before covariance pooling
_NS_ITERS = 3  # Newton-Schulz iterations in the Net2 head
_BN_EPS = 1e-5


# --------------------------------------------------------------------------------------
# architecture description
# --------------------------------------------------------------------------------------


def _check_args(depth: int, net: int, attn_mode: str) -> None:
    if depth not in _STAGE_DEPTHS:
        raise ValueError(f"depth must be 50 or 101, got {depth}")
    if net not in (1, 2):
        raise ValueError(f"net (GSoP mode) must be 1 or 2, got {net}")
    if attn_mode not in ATTN_CODES:
        raise ValueError(f"attn_mode must be one of {sorted(ATTN_CODES)}, got {attn_mode!r}")


def official_attention_layout(depth: int, net: int, attn_mode: str) -> List[List[str]]:
    """Per stage, per block attention code ('0' = plain bottleneck), as the script sets it."""
    _check_args(depth, net, attn_mode)
    code = ATTN_CODES[attn_mode]
    layout = [["0"] * (n - 1) + [code] for n in _STAGE_DEPTHS[depth]]
    if net == 2:
        layout[-1][-1] = "0"
    return layout


def _concat_conv_geometry(channels: int):
    """Groups, kernel height and padding of the concat-fusion (k, 1) convolutions."""
    groups = channels // 64
    factor = (32 // groups).bit_length() - 1  # log2(32 / groups): 3, 2, 1, 0 per stage
    kernel = 2 * factor + 5
    padding = factor + 2  # keeps the height unchanged
    return groups, kernel, padding


# --------------------------------------------------------------------------------------
# random state dict
# --------------------------------------------------------------------------------------


class _Filler:
    """Appends randomly initialised entries to an ordered dict, original naming."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.sd: "OrderedDict[str, Tensor]" = OrderedDict()

    def _normal(self, shape, std: float) -> Tensor:
        return torch.randn(shape, generator=self.gen) * std

    def _uniform(self, shape, lo: float, hi: float) -> Tensor:
        return torch.rand(shape, generator=self.gen) * (hi - lo) + lo

    def conv(self, name: str, c_out: int, c_in_per_group: int, kh: int, kw: int,
             bias: bool, gain: float = 2.0) -> None:
        fan_in = c_in_per_group * kh * kw
        self.sd[f"{name}.weight"] = self._normal((c_out, c_in_per_group, kh, kw),
                                                 math.sqrt(gain / fan_in))
        if bias:
            self.sd[f"{name}.bias"] = self._normal((c_out,), 0.05)

    def linear(self, name: str, c_out: int, c_in: int, gain: float = 1.0) -> None:
        self.sd[f"{name}.weight"] = self._normal((c_out, c_in), math.sqrt(gain / c_in))
        self.sd[f"{name}.bias"] = self._normal((c_out,), 0.05)

    def bn(self, name: str, c: int, w_lo: float = 0.5, w_hi: float = 1.5) -> None:
        self.sd[f"{name}.weight"] = self._uniform((c,), w_lo, w_hi)
        self.sd[f"{name}.bias"] = self._normal((c,), 0.1)
        self.sd[f"{name}.running_mean"] = self._normal((c,), 0.1)
        self.sd[f"{name}.running_var"] = self._uniform((c,), 0.5, 1.5)
        steps = int(torch.randint(1, 100000, (1,), generator=self.gen))
        self.sd[f"{name}.num_batches_tracked"] = torch.tensor(steps, dtype=torch.int64)


def official_state_dict(depth: int, net: int, attn_mode: str, attn_dim: int = 128,
                        num_classes: int = 1000, seed: int = 0) -> Dict[str, Tensor]:
    """Random weights with exactly the original model's state-dict names and shapes.

    Scales are chosen so an eval-mode forward stays finite and non-degenerate through
    50/101 layers: He-normal convs, BN weights U(0.5, 1.5) except the BN closing each
    residual branch (``bn3`` / ``bn_for_concat``: U(0.1, 0.3) * sqrt(3 / blocks in the
    stage)), small biases and running means, running variances U(0.5, 1.5), int64 scalar
    ``num_batches_tracked``. A few attention layers get adjusted gains so that their
    sigmoid gates land mostly inside (0, 1) rather than saturating.
    """
    _check_args(depth, net, attn_mode)
    layout = official_attention_layout(depth, net, attn_mode)
    d = attn_dim
    n_pos = _POS_GRID * _POS_GRID
    f = _Filler(seed)

    f.conv("conv1", 64, 3, 7, 7, bias=False)
    f.bn("bn1", 64)
    in_ch = 64
    for s, (planes, codes) in enumerate(zip(_STAGE_PLANES, layout)):
        out_ch = planes * _EXPANSION
        # shrink residual branches in long stages so the stream does not drift upwards
        branch_scale = math.sqrt(3.0 / len(codes))
        for b, code in enumerate(codes):
            p = f"layer{s + 1}.{b}"
            f.conv(f"{p}.conv1", planes, in_ch, 1, 1, bias=False)
            f.bn(f"{p}.bn1", planes)
            f.conv(f"{p}.conv2", planes, planes, 3, 3, bias=False)
            f.bn(f"{p}.bn2", planes)
            f.conv(f"{p}.conv3", out_ch, planes, 1, 1, bias=False)
            f.bn(f"{p}.bn3", out_ch, 0.1 * branch_scale, 0.3 * branch_scale)
            if code in _CHANNEL_CODES:
                f.conv(f"{p}.conv_for_DR", d, out_ch, 1, 1, bias=True)
                f.bn(f"{p}.bn_for_DR", d)
                f.bn(f"{p}.row_bn", d)
                f.conv(f"{p}.row_conv_group", _ROW_CONV_MULT * d, 1, d, 1, bias=True)
                f.conv(f"{p}.fc_adapt_channels", out_ch, _ROW_CONV_MULT * d, 1, 1,
                       bias=True, gain=16.0)
            if code in _POSITION_CODES:
                f.conv(f"{p}.conv_for_DR_spatial", d, out_ch, 1, 1, bias=True)
                f.bn(f"{p}.bn_for_DR_spatial", d)
                f.bn(f"{p}.row_bn_for_spatial", n_pos)
                f.conv(f"{p}.row_conv_group_for_spatial", _ROW_CONV_MULT * n_pos, 1,
                       n_pos, 1, bias=True, gain=0.1)
                f.conv(f"{p}.fc_adapt_channels_for_spatial", n_pos,
                       _ROW_CONV_MULT * n_pos, 1, 1, bias=True, gain=1.0)
            if code == "&":
                groups, k, _ = _concat_conv_geometry(out_ch)
                f.conv(f"{p}.dilate_conv_for_concat1", out_ch, out_ch // groups, k, 1,
                       bias=True, gain=1.0)
                f.conv(f"{p}.dilate_conv_for_concat2", out_ch, out_ch // groups, k, 1,
                       bias=True, gain=1.0)
                f.bn(f"{p}.bn_for_concat", out_ch, 0.1 * branch_scale, 0.3 * branch_scale)
            if b == 0:  # every stage starts with a projection shortcut
                f.conv(f"{p}.downsample.0", out_ch, in_ch, 1, 1, bias=False)
                f.bn(f"{p}.downsample.1", out_ch)
            in_ch = out_ch

    if net == 1:
        f.linear("fc", num_classes, in_ch)
    else:
        f.conv("layer_reduce", _NET2_DIM, in_ch, 1, 1, bias=False)
        f.bn("layer_reduce_bn", _NET2_DIM)
        # the square-rooted covariance entries are small: a larger gain gives O(1) logits
        f.linear("fc", num_classes, _NET2_DIM * (_NET2_DIM + 1) // 2, gain=100.0)
    return dict(f.sd)


# --------------------------------------------------------------------------------------
# functional forward
# --------------------------------------------------------------------------------------


def _bn(sd: Dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    """Eval-mode BatchNorm with running statistics."""
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                        sd[f"{name}.weight"], sd[f"{name}.bias"], training=False,
                        momentum=0.0, eps=_BN_EPS)


def _conv(sd: Dict[str, Tensor], name: str, x: Tensor, stride=1, padding=0,
          groups: int = 1) -> Tensor:
    return F.conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), stride=stride,
                    padding=padding, groups=groups)


def _centring_matrix(size: int, m: int, like: Tensor) -> Tensor:
    """The (size x size) matrix (1/m) I - (1/m^2) 1 1^T.

    Normally size == m (the number of samples being centred). The original position
    branch builds it with size = channel count but m = number of positions; that
    arithmetic is reproduced by passing both explicitly.
    """
    eye = torch.eye(size, dtype=like.dtype, device=like.device)
    ones = torch.ones(size, size, dtype=like.dtype, device=like.device)
    return (-1.0 / m / m) * ones + (1.0 / m) * eye


def _channel_covariance(feat: Tensor) -> Tensor:
    """(d, h, w) -> (d, d) covariance of the d channels over M = h*w positions.

    Computed as X I_hat X^T with the M x M centring matrix I_hat, as in the original.
    """
    d = feat.shape[0]
    m = feat.shape[1] * feat.shape[2]
    x = feat.reshape(d, m)
    i_hat = _centring_matrix(m, m, x)
    return (x @ i_hat) @ x.t()


def _position_gram(feat: Tensor) -> Tensor:
    """(d, h, w) -> (M, M) position-by-position matrix of the original position branch.

    X^T I_hat X with X the (d, M) feature matrix and I_hat the *d x d* matrix
    (1/M) I - (1/M^2) 1 1^T, i.e. centred over channels but normalised with the number
    of positions M instead of d (original arithmetic, kept on purpose).
    """
    d = feat.shape[0]
    m = feat.shape[1] * feat.shape[2]
    x = feat.reshape(d, m)
    i_hat = _centring_matrix(d, m, x)
    return (x.t() @ i_hat) @ x


def _row_wise_conv(rows: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Row-wise convolution over a batch of (R, R) matrices.

    ``weight`` has the grouped-conv shape (4R, 1, R, 1): output channel 4*i + k is a dot
    product of row i with filter weight[4*i + k]. Returns (N, 4R).
    """
    n, r, length = rows.shape
    w = weight.reshape(r, _ROW_CONV_MULT, length)
    out = torch.einsum("nil,ikl->nik", rows, w).reshape(n, r * _ROW_CONV_MULT)
    return out + bias


def _bn_rows(sd: Dict[str, Tensor], name: str, mats: Tensor) -> Tensor:
    """BatchNorm whose channels are the rows of each (R, R) matrix."""
    return _bn(sd, name, mats.unsqueeze(-1)).squeeze(-1)


def _pointwise(sd: Dict[str, Tensor], name: str, v: Tensor) -> Tensor:
    """A 1x1 conv applied to a (N, C_in) vector (a 1x1 spatial map)."""
    w = sd[f"{name}.weight"]
    return v @ w.reshape(w.shape[0], w.shape[1]).t() + sd[f"{name}.bias"]


def _channel_gate(sd: Dict[str, Tensor], p: str, y: Tensor, planes: int) -> Tensor:
    """Channel attention weights (N, C, 1, 1) computed from the pre-attention tensor y."""
    z = F.relu(y)
    z = _conv(sd, f"{p}.conv_for_DR", z, stride=2 if planes == 64 else 1)
    z = F.relu(_bn(sd, f"{p}.bn_for_DR", z))
    cov = torch.stack([_channel_covariance(z[i]) for i in range(z.shape[0])])  # N,d,d
    cov = _bn_rows(sd, f"{p}.row_bn", cov)
    g = _row_wise_conv(cov, sd[f"{p}.row_conv_group.weight"], sd[f"{p}.row_conv_group.bias"])
    # no non-linearity between the row-wise conv and the channel adapter here
    g = _pointwise(sd, f"{p}.fc_adapt_channels", g)
    return torch.sigmoid(g)[:, :, None, None]


def _position_gate(sd: Dict[str, Tensor], p: str, y: Tensor) -> Tensor:
    """Position attention weights (N, 1, H, W) computed from the pre-attention tensor y."""
    h, w = y.shape[-2:]
    z = F.relu(y)
    z = _conv(sd, f"{p}.conv_for_DR_spatial", z)
    z = _bn(sd, f"{p}.bn_for_DR_spatial", z)  # no ReLU after this BN
    z = F.adaptive_avg_pool2d(z, (_POS_GRID, _POS_GRID))
    gram = torch.stack([_position_gram(z[i]) for i in range(z.shape[0])])  # N,64,64
    gram = _bn_rows(sd, f"{p}.row_bn_for_spatial", gram)
    g = _row_wise_conv(gram, sd[f"{p}.row_conv_group_for_spatial.weight"],
                       sd[f"{p}.row_conv_group_for_spatial.bias"])
    g = F.relu(g)  # the position branch does have a ReLU here
    g = torch.sigmoid(_pointwise(sd, f"{p}.fc_adapt_channels_for_spatial", g))
    att = g.reshape(g.shape[0], 1, _POS_GRID, _POS_GRID)  # row-major over the grid
    return F.adaptive_avg_pool2d(att, (h, w))  # "unpool" back to H x W


def _bottleneck(sd: Dict[str, Tensor], p: str, x: Tensor, planes: int, stride: int,
                has_shortcut_proj: bool, code: str) -> Tensor:
    out = F.relu(_bn(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", x)))
    out = F.relu(_bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", out, stride=stride, padding=1)))
    out = _bn(sd, f"{p}.bn3", _conv(sd, f"{p}.conv3", out))
    if has_shortcut_proj:
        shortcut = _bn(sd, f"{p}.downsample.1", _conv(sd, f"{p}.downsample.0", x, stride=stride))
    else:
        shortcut = x

    if code != "0":
        y = out  # pre-attention tensor: bn3 output, no ReLU
        ch = _channel_gate(sd, p, y, planes) if code in _CHANNEL_CODES else None
        pos = _position_gate(sd, p, y) if code in _POSITION_CODES else None
        if code == "1":
            out = y * ch
        elif code == "2":
            out = F.relu(y * pos)
        elif code == "+":  # "average" fusion is an un-halved sum
            out = y * ch + F.relu(y * pos)
        elif code == "M":
            out = torch.maximum(y * ch, F.relu(y * pos))
        elif code == "&":
            groups, _, pad = _concat_conv_geometry(y.shape[1])
            a = _conv(sd, f"{p}.dilate_conv_for_concat1", y * ch, padding=(pad, 0), groups=groups)
            b = _conv(sd, f"{p}.dilate_conv_for_concat2", F.relu(y * pos), padding=(pad, 0),
                      groups=groups)
            out = _bn(sd, f"{p}.bn_for_concat", a + b)
        else:  # pragma: no cover
            raise ValueError(code)
    return F.relu(out + shortcut)


def _newton_schulz_sqrt(a: Tensor, iters: int = _NS_ITERS) -> Tensor:
    """Approximate square root of an SPD matrix (coupled Newton-Schulz iteration).

    Pre-normalise by the trace, run ``iters`` iterations (the last one only forms Y),
    post-compensate by sqrt(trace).
    """
    if iters < 2:
        raise ValueError("the reference only covers iters >= 2")
    n = a.shape[0]
    i3 = 3.0 * torch.eye(n, dtype=a.dtype, device=a.device)
    trace = a.diagonal().sum()
    a_n = a / trace
    z = 0.5 * (i3 - a_n)
    y = a_n @ z
    for _ in range(iters - 2):
        t = 0.5 * (i3 - z @ y)
        y, z = y @ t, t @ z
    y = 0.5 * (y @ (i3 - z @ y))
    return y * torch.sqrt(trace)


def _triangle_vector(s: Tensor) -> Tensor:
    """Vectorise an (n, n) symmetric matrix into n(n+1)/2 entries in the original order.

    The original keeps the entries s[r, c] with c <= r, scanned row-major, i.e.
    (0,0), (1,0), (1,1), (2,0), (2,1), (2,2), ... -- equivalently the upper triangle
    read column by column. This is NOT torch.triu_indices' row-major order.
    """
    r, c = torch.tril_indices(s.shape[0], s.shape[1], device=s.device)
    return s[r, c]


def _strip_module_prefix(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


@torch.no_grad()
def official_forward(sd: Dict[str, Tensor], x: Tensor, depth: int, net: int,
                     attn_mode: str) -> Tensor:
    """Eval-mode logits of the original GSoP network with weights ``sd``.

    ``sd`` may carry the ``module.`` prefix; floating tensors are cast to ``x.dtype``.
    Net1 pools by a global mean over positions; the original's AvgPool2d(14) gives the
    same result only at 224 px input (a 14x14 final map), which is what it was built for.
    """
    _check_args(depth, net, attn_mode)
    sd = _strip_module_prefix(sd)
    sd = {k: (v.to(device=x.device, dtype=x.dtype) if v.is_floating_point() else v)
          for k, v in sd.items()}
    layout = official_attention_layout(depth, net, attn_mode)

    h = F.relu(_bn(sd, "bn1", _conv(sd, "conv1", x, stride=2, padding=3)))
    h = F.max_pool2d(h, kernel_size=3, stride=2, padding=1)
    for s, (planes, stride, codes) in enumerate(zip(_STAGE_PLANES, _STAGE_STRIDES, layout)):
        for b, code in enumerate(codes):
            h = _bottleneck(sd, f"layer{s + 1}.{b}", h, planes,
                            stride=stride if b == 0 else 1,
                            has_shortcut_proj=(b == 0), code=code)

    if net == 1:
        feat = h.mean(dim=(2, 3))
    else:
        h = F.relu(_bn(sd, "layer_reduce_bn", _conv(sd, "layer_reduce", h)))
        feats = []
        for i in range(h.shape[0]):
            cov = _channel_covariance(h[i])
            feats.append(_triangle_vector(_newton_schulz_sqrt(cov, _NS_ITERS)))
        feat = torch.stack(feats)
    return F.linear(feat, sd["fc.weight"], sd["fc.bias"])


# --------------------------------------------------------------------------------------
# checkpoint writer
# --------------------------------------------------------------------------------------

_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


def save_official_checkpoint(path, sd: Dict[str, Tensor], arch: str = "resnet50", *,
                             epoch: int = 95, best_prec1: Optional[float] = 77.98,
                             drop_num_batches_tracked: bool = False) -> None:
    """Write ``sd`` the way the original training script's ``save_checkpoint`` does.

    Layout: ``{'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}`` where
    ``state_dict`` keys carry the ``module.`` prefix added by ``nn.DataParallel``.
    ``best_prec1`` is stored as a 1-element float tensor, which is what the script's
    accuracy meter yields. ``optimizer`` imitates an SGD state dict (momentum 0.9,
    weight decay 1e-4) with an empty ``state``; its ``params`` are id()-like integers, as
    PyTorch 0.4 optimizers recorded them, one per parameter (buffers excluded).
    ``drop_num_batches_tracked=True`` mimics checkpoints saved by PyTorch 0.4.0, whose
    BatchNorm had no such buffer. Everything loads with ``torch.load(weights_only=True)``.
    """
    sd = _strip_module_prefix(sd)
    state_dict = OrderedDict()
    for k, v in sd.items():
        if drop_num_batches_tracked and k.endswith(".num_batches_tracked"):
            continue
        state_dict[f"module.{k}"] = v.detach().clone()
    n_params = sum(1 for k in sd if not k.endswith(_BUFFER_SUFFIXES))
    param_ids = [140_000_000_000_000 + 4096 * i for i in range(n_params)]
    optimizer = {
        "state": {},
        "param_groups": [{
            "lr": 0.1,
            "momentum": 0.9,
            "dampening": 0,
            "weight_decay": 1e-4,
            "nesterov": False,
            "params": param_ids,
        }],
    }
    checkpoint = {
        "epoch": int(epoch),
        "arch": arch,
        "state_dict": state_dict,
        "best_prec1": None if best_prec1 is None else torch.tensor([float(best_prec1)]),
        "optimizer": optimizer,
    }
    torch.save(checkpoint, path)
