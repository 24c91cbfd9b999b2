"""Helpers shared by the export tests: models with non-trivial weights, fake train.py runs, folder checks."""
import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import pytest
import torch
import yaml

import timm
import timm_gsop  # noqa: F401  (registers the models)
from timm_gsop.hub import ALLOWED_FILES, card

PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.pickle', '.tar', '.ckpt')
FAKE_MACS = 1_234_000_000


def make_model(name: str, seed: int, **kwargs) -> torch.nn.Module:
    """A model with random weights and non-trivial BN statistics (so that buffers matter)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
    return model.eval()


def batch(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(123))


def logits(model: torch.nn.Module, size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch(size=size))


def write_run(folder: Path, model: torch.nn.Module, args: Dict[str, Any], summary: Optional[str] = None,
              ema: Optional[torch.nn.Module] = None, epoch: int = 1, metric: float = 50.0) -> Path:
    """What train.py leaves in its output folder: model_best.pth.tar (args stored), args.yaml, summary.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = {'epoch': epoch, 'arch': args.get('model'), 'state_dict': model.state_dict(),
                  'optimizer': {}, 'args': argparse.Namespace(**args), 'metric': metric, 'version': 2}
    if ema is not None:
        checkpoint['state_dict_ema'] = ema.state_dict()
    torch.save(checkpoint, folder / 'model_best.pth.tar')
    with open(folder / 'args.yaml', 'w') as f:
        yaml.safe_dump(args, f)
    if summary is not None:
        (folder / 'summary.csv').write_text(summary)
    return folder / 'model_best.pth.tar'


def assert_publishable(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {'model.safetensors', 'config.json', 'README.md'} <= names
    assert names <= set(ALLOWED_FILES), names
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f'.{folder.name}.')]  # nothing staged left


def leftovers(out_dir: Path) -> Sequence[Path]:
    """Staged folders of exports to ``out_dir`` still beside it."""
    return sorted(p for p in Path(out_dir).parent.iterdir() if p.name.startswith(f'.{Path(out_dir).name}.'))


@pytest.fixture
def fast_card(monkeypatch):
    """A fixed MAC count where a test does not need the real one (counting builds a second model)."""
    monkeypatch.setattr(card, 'measure', lambda *args: (FAKE_MACS, (2048, 14, 14)))
