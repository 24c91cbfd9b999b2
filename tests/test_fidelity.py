"""Fidelity to the official GSoP code: its checkpoints load through the model's filter and give its logits.

``official_reference`` builds state dicts with the official parameter names and shapes and runs the
official network's forward pass in its own (textbook) formulation; nothing of the official code is used.
"""
import pytest
import torch

import timm
import timm_gsop  # noqa: F401
from timm_gsop.layers import ATTN_MODES

from official_reference import official_forward, official_state_dict, save_official_checkpoint

TINY_ARGS = dict(layers=(1, 1, 1, 1), attn_dim=16)
NAMES = {(50, 1): 'gsop_resnet50', (101, 1): 'gsop_resnet101', (50, 2): 'gsop2_resnet50', (101, 2): 'gsop2_resnet101'}


def _rel_max_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('mode', ATTN_MODES)
@pytest.mark.parametrize('depth,net', [(50, 1), (50, 2), (101, 1), (101, 2)])
def test_official_checkpoint_gives_official_logits(tmp_path, depth, net, mode):
    sd = official_state_dict(depth, net, mode, attn_dim=32, num_classes=10, seed=depth + net)
    path = tmp_path / 'net-epoch-1.pth.tar'
    save_official_checkpoint(path, sd, arch=f'resnet{depth}')
    model = timm.create_model(
        NAMES[(depth, net)], pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        attn_mode=mode, attn_dim=32, num_classes=10).eval()
    # Size is free (the official Net1 takes 224 only, the reference pools by a global mean).
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        ref = official_forward(sd, x, depth, net, mode)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    assert _rel_max_diff(ours, ref) < 1e-4


def test_official_checkpoint_at_224_default_width():
    sd = official_state_dict(50, 2, 'fusion_concat', attn_dim=128, num_classes=1000, seed=3)
    model = timm.create_model('gsop2_resnet50', attn_mode='fusion_concat').eval()
    model.load_state_dict(timm_gsop.checkpoint_filter_fn(sd, model))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel_max_diff(model(x), official_forward(sd, x, 50, 2, 'fusion_concat')) < 1e-4


def test_checkpoint_for_another_architecture_names_the_keys(tmp_path):
    sd = official_state_dict(50, 1, 'channel', attn_dim=32, num_classes=10)
    path = tmp_path / 'ckpt.pth.tar'
    save_official_checkpoint(path, sd)
    with pytest.raises(ValueError) as err:
        timm.create_model('gsop_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                          attn_mode='position', attn_dim=32, num_classes=10)
    msg = str(err.value)
    assert "checkpoint: layers=(3, 4, 6, 3), attn_mode='channel', attn_dim=32, num_classes=10" in msg
    assert "model:      layers=(3, 4, 6, 3), attn_mode='position', attn_dim=32" in msg
    assert "timm.create_model('gsop_resnet50', attn_mode='channel', ...)" in msg
    assert 'missing keys (' in msg and 'layer1.2.attn.position_gate' in msg
    assert 'unexpected keys (' in msg and 'layer1.2.attn.channel_gate' in msg
    with pytest.raises(ValueError, match='shape mismatches .*layer1.2.attn.channel_gate.conv_reduce.weight'):
        timm.create_model('gsop_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                          attn_dim=16, num_classes=10)
    with pytest.raises(ValueError, match=r"(?s)checkpoint: layers=\(3, 4, 6, 3\).*model: +layers=\(3, 4, 23, 3\)"
                                         r".*timm.create_model\('gsop_resnet50', \.\.\.\)"):
        timm.create_model('gsop_resnet101', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                          attn_dim=32, num_classes=10)


def test_filter_keeps_native_names_and_fills_pytorch_040_counters(tmp_path):
    model = timm.create_model('gsop_resnet50', attn_mode='fusion_concat', **TINY_ARGS).eval()
    native = model.state_dict()
    assert timm_gsop.checkpoint_filter_fn(dict(native), model).keys() == native.keys()
    # The official code ran on PyTorch 0.4.0: its BatchNorms saved no num_batches_tracked.
    sd = official_state_dict(50, 2, 'position', attn_dim=16, num_classes=5)
    old = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
    path = tmp_path / 'old.pth.tar'
    save_official_checkpoint(path, old)
    x = torch.randn(1, 3, 64, 64)
    for kwargs in (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5)),
                   dict(checkpoint_path=str(path))):  # plain load_state_dict converts too
        net = timm.create_model('gsop2_resnet50', attn_mode='position', attn_dim=16, num_classes=5, **kwargs).eval()
        with torch.no_grad():
            assert _rel_max_diff(net(x), official_forward(sd, x, 50, 2, 'position')) < 1e-4
