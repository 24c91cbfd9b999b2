"""Markdown table of the registered GSoP-Net models: parameters and FLOPs at 224 px.

    python benchmarks/model_table.py [--img-size 224] [--no-timm] [--cifar] [--out FILE]

FLOPs are what torch.utils.flop_counter.FlopCounterMode counts for one image in eval mode:
2 FLOPs per multiply-add of convolutions and matrix products (conv, mm, addmm, bmm, baddbmm);
norms, activations, pooling and other elementwise ops count 0. timm's own tables give GMACs,
which are GFLOPs / 2 here. No timing is involved: the numbers are exact and machine-independent.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import count_flops, count_params, create, fmt, markdown_table, model_specs, write_atomic  # noqa: E402


def build_table(img_size: int = 224, timm_baselines: bool = True) -> str:
    specs = model_specs((50, 101), timm_baselines=timm_baselines)
    rows, results = [], {}
    for label, name, kwargs, ref in specs:
        model = create(name, kwargs)
        params, flops = count_params(model), count_flops(model, img_size)
        results[label] = (params, flops)
        del model
        added = None
        if ref is not None:
            added = (flops - results[ref][1]) / 1e9
        pct = None if ref is None else 100.0 * (flops - results[ref][1]) / results[ref][1]
        rows.append([
            f'`{label}`', fmt(params / 1e6, 2), fmt(flops / 1e9, 2), fmt(flops / 2e9, 2),
            '' if ref is None else f'{fmt(added, 3, signed=True)} ({fmt(pct, 1, signed=True)} %) vs `{ref}`',
        ])
    header = ['Model', 'Params (M)', f'GFLOPs @ {img_size}', f'GMACs @ {img_size}', 'Added GFLOPs']
    notes = (
        f'FLOPs of one {img_size} x {img_size} image, eval mode, counted by `torch.utils.flop_counter.FlopCounterMode` '
        f'(torch {torch.__version__}): 2 FLOPs per multiply-add of conv / mm / bmm; norms, activations and pooling '
        'count 0. GMACs = GFLOPs / 2 (timm\'s tables use GMACs). The GSoP models keep stride 1 in the last stage '
        '(14 x 14 at 224 px), as the official code does, so their backbone costs more than timm\'s `resnet50`.')
    return markdown_table(header, rows) + '\n\n' + notes + '\n'


def build_cifar_table() -> str:
    """The CIFAR-100 models at their own 32 px input."""
    rows = []
    for name, kwargs in (('gsop_resnet164_cifar', {}), ('gsop2_resnet164_cifar', {}),
                         ('gsop_resnet164_cifar', dict(attn_mode='none'))):
        model = create(name, kwargs)
        label = name + (' (attn_mode=none)' if kwargs else '')
        rows.append([f'`{label}`', fmt(count_params(model) / 1e6, 2), fmt(count_flops(model, 32) / 1e9, 3)])
    return markdown_table(['Model', 'Params (M)', 'GFLOPs @ 32'], rows) + '\n'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--no-timm', action='store_true', help="leave out timm's resnet50 / seresnet50 / ecaresnet50d")
    parser.add_argument('--cifar', action='store_true', help='the CIFAR-100 ResNet-164 models at 32 px instead')
    parser.add_argument('--out', help='also write the table to this file (atomically)')
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    text = build_cifar_table() if args.cifar else build_table(args.img_size, not args.no_timm)
    print(text, end='')
    if args.out:
        write_atomic(args.out, text)


if __name__ == '__main__':
    main()
