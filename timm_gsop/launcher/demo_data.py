"""A small generated image set for the CPU demo and tests: 10 classes of shapes as an ImageFolder.

Nothing is downloaded: every image is drawn with Pillow from a seeded RNG, so the same arguments
give the same files. Shape, not colour, gives the class (colours, size, position, rotation and
noise are random), which a GSoP-Net learns to well above chance in a few CPU epochs.

    python -m timm_gsop.launcher.demo_data OUT_DIR [--train-per-class N] [--val-per-class N] [--size PX]

writes ``OUT_DIR/train/<class>/*.png`` and ``OUT_DIR/validation/<class>/*.png``, the layout that
timm's ImageFolder reader (``--data-dir OUT_DIR``) expects.
"""
import argparse
import json
import math
import os
import random
import shutil
from typing import Callable, Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['CLASSES', 'make_demo_dataset', 'render_shape']

_Point = Tuple[float, float]
_SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges


def _polygon(cx: float, cy: float, r: float, n: int, angle: float, inner: float = 1.0) -> List[_Point]:
    """Regular polygon (or star when ``inner`` < 1: every other vertex at ``inner * r``)."""
    pts = []
    count = n * 2 if inner < 1.0 else n
    for i in range(count):
        rr = r * (inner if inner < 1.0 and i % 2 else 1.0)
        a = angle + 2 * math.pi * i / count - math.pi / 2
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _rotated_rect(cx: float, cy: float, w: float, h: float, angle: float) -> List[_Point]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in ((-w, -h), (w, -h), (w, h), (-w, h))]


def _circle(d, cx, cy, r, a, fg, bg):
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)


def _ring(d, cx, cy, r, a, fg, bg):
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    d.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=bg)


def _square(d, cx, cy, r, a, fg, bg):
    d.polygon(_rotated_rect(cx, cy, 0.8 * r, 0.8 * r, a), fill=fg)


def _triangle(d, cx, cy, r, a, fg, bg):
    d.polygon(_polygon(cx, cy, r, 3, a), fill=fg)


def _star(d, cx, cy, r, a, fg, bg):
    d.polygon(_polygon(cx, cy, r, 5, a, inner=0.45), fill=fg)


def _plus(d, cx, cy, r, a, fg, bg):
    d.polygon(_rotated_rect(cx, cy, r, 0.25 * r, a), fill=fg)
    d.polygon(_rotated_rect(cx, cy, 0.25 * r, r, a), fill=fg)


def _cross(d, cx, cy, r, a, fg, bg):
    _plus(d, cx, cy, r, a + math.pi / 4, fg, bg)


def _stripes(d, cx, cy, r, a, fg, bg, vertical: bool = False):
    # Three bars inside the shape's box; orientation is the class.
    for k in (-1, 0, 1):
        off = k * 0.66 * r
        if vertical:
            d.polygon(_rotated_rect(cx + off, cy, 0.18 * r, r, a), fill=fg)
        else:
            d.polygon(_rotated_rect(cx, cy + off, r, 0.18 * r, a), fill=fg)


def _hstripes(d, cx, cy, r, a, fg, bg):
    _stripes(d, cx, cy, r, a, fg, bg, vertical=False)


def _vstripes(d, cx, cy, r, a, fg, bg):
    _stripes(d, cx, cy, r, a, fg, bg, vertical=True)


def _checker(d, cx, cy, r, a, fg, bg):
    q = r / 2  # 4 x 4 cells over the shape's box
    for i in range(4):
        for j in range(4):
            if (i + j) % 2 == 0:
                d.polygon(_rotated_rect(cx - r + (i + 0.5) * q, cy - r + (j + 0.5) * q, q / 2, q / 2, 0.0), fill=fg)


_DRAW: Dict[str, Callable] = {
    'circle': _circle,
    'ring': _ring,
    'square': _square,
    'triangle': _triangle,
    'star': _star,
    'plus': _plus,
    'cross': _cross,
    'hstripes': _hstripes,
    'vstripes': _vstripes,
    'checker': _checker,
}
CLASSES: Tuple[str, ...] = tuple(_DRAW)


def _color(rng: random.Random) -> Tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))


def _contrast(a: Tuple[int, ...], b: Tuple[int, ...]) -> float:
    return abs(sum(a) - sum(b)) / 3


def render_shape(cls: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One RGB image of class ``cls``: random colours, scale, position, small rotation, noise."""
    big = size * _SUPERSAMPLE
    bg = _color(rng)
    fg = _color(rng)
    while _contrast(fg, bg) < 60:  # keep the shape visible
        fg = _color(rng)
    img = Image.new('RGB', (big, big), bg)
    r = big * rng.uniform(0.22, 0.36)
    cx = big / 2 + rng.uniform(-1, 1) * (big / 2 - r) * 0.6
    cy = big / 2 + rng.uniform(-1, 1) * (big / 2 - r) * 0.6
    angle = math.radians(rng.uniform(-15, 15))  # small: stripes keep their orientation
    _DRAW[cls](ImageDraw.Draw(img), cx, cy, r, angle, fg, bg)
    img = img.resize((size, size), Image.BILINEAR)
    noise = np.random.default_rng(rng.randrange(2 ** 32)).normal(0, 12, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_demo_dataset(
        root: str,
        train_per_class: int = 60,
        val_per_class: int = 20,
        size: int = 64,
        seed: int = 0,
        num_classes: int = len(CLASSES),
) -> str:
    """Write the shapes ImageFolder under ``root`` (train/ and validation/) and return ``root``.

    ``num_classes`` takes the first classes of ``CLASSES`` (tests use 2 or 3 for speed).

    A complete set with the same arguments is reused, a demo set with others is replaced, and a
    folder that holds anything else is refused. Files are written to a temporary folder first, so
    an interrupted run never leaves a partial set behind.
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f'num_classes must be 1 .. {len(CLASSES)}, got {num_classes}')
    classes = CLASSES[:num_classes]
    spec = dict(classes=list(classes), train_per_class=train_per_class, val_per_class=val_per_class,
                size=size, seed=seed, version=1)
    marker = os.path.join(root, 'demo_dataset.json')
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return root
    if os.path.lexists(root) and not os.path.isfile(marker) and (not os.path.isdir(root) or os.listdir(root)):
        raise ValueError(f'{root} is not empty and holds no demo set (no {marker}): choose another folder')
    tmp = root.rstrip('/\\') + f'.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    for split, per_class, split_seed in (('train', train_per_class, seed), ('validation', val_per_class, seed + 1)):
        rng = random.Random(split_seed)
        for cls in classes:
            folder = os.path.join(tmp, split, cls)
            os.makedirs(folder)
            for i in range(per_class):
                render_shape(cls, rng, size).save(os.path.join(folder, f'{cls}_{i:04d}.png'))
    with open(os.path.join(tmp, 'demo_dataset.json'), 'w') as f:
        json.dump(spec, f)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    os.replace(tmp, root)
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write the generated shapes ImageFolder (no download).')
    parser.add_argument('root', help='output folder (gets train/ and validation/)')
    parser.add_argument('--train-per-class', type=int, default=60)
    parser.add_argument('--val-per-class', type=int, default=20)
    parser.add_argument('--size', type=int, default=64, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-classes', type=int, default=len(CLASSES))
    args = parser.parse_args(argv)
    try:
        print(make_demo_dataset(
            args.root, args.train_per_class, args.val_per_class, args.size, args.seed, args.num_classes))
    except (ValueError, OSError) as e:
        parser.exit(2, f'demo_data: {e}\n')


if __name__ == '__main__':
    main()
