"""``timm-gsop`` command line: export GSoP-Net checkpoints as Hugging Face Hub folders, and push them.

    timm-gsop export CHECKPOINT OUT_DIR [--model NAME] [--model-kwargs k=v ...] [--force] [options]
    timm-gsop push CHECKPOINT REPO_ID [--model NAME] [--private] [--revision R] [--create-pr] [options]

This module lives outside the ``timm_gsop`` package because importing that package registers the
models, which imports torch and timm: the console script answers ``--help`` and argument errors at
once, and imports them only to run a command (``timm_gsop.cli`` is the same module inside the package).
Progress goes to stderr; the result (the folder, the commit URL) to stdout; errors are one
``timm-gsop COMMAND: error: ...`` line and exit status 1.
"""
import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

__all__ = ['main', 'build_parser']


def _key_value(item: str) -> Tuple[str, Any]:
    """``'attn_dim=64'`` -> ``('attn_dim', 64)``: values are Python literals where they parse."""
    key, sep, value = item.partition('=')
    key = key.strip().replace('-', '_')
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f'{item!r} is not of the form key=value')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return key, value


def read_label_names(path: str) -> List[str]:
    """Class names from a file: a JSON list, or one name a line (as timm's ``.txt`` class maps)."""
    from timm_gsop.hub import ExportError
    try:
        text = Path(path).read_text(encoding='utf-8')
        names = json.loads(text) if path.endswith('.json') else [n.strip() for n in text.splitlines() if n.strip()]
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ExportError(f'cannot read the label names file {path}: {getattr(e, "strerror", None) or e}') from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ExportError(f'{path} must hold a JSON list of class names (strings)')
    return names


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', default=None, metavar='NAME',
                   help="model name, e.g. gsop_resnet50 or gsop2_resnet101 (default: the run's --model, from "
                        'args.yaml beside the checkpoint)')
    p.add_argument('--model-kwargs', nargs='*', type=_key_value, default=[], metavar='KEY=VALUE',
                   help='model arguments, e.g. attn_mode=position attn_dim=64 (values are Python literals). '
                        'By default num_classes, attn_dim and attn_mode are read from the weights, and the '
                        'others from the --model-kwargs of the training run')
    p.add_argument('--license', default=None, metavar='ID',
                   help='licence of the weights, a Hub licence id such as apache-2.0 or cc-by-4.0 (default: none)')
    p.add_argument('--dataset-name', default=None, metavar='TEXT',
                   help="the training set's name on the card (default: train.py's --dataset, or the "
                        "--data-dir folder's name)")
    p.add_argument('--label-names', default=None, metavar='FILE',
                   help="class names in the classifier's order: a JSON list or one a line (default: the names "
                        "of the class folders of the run's training set, in timm's order, when it is readable)")
    p.add_argument('--install', default=None, metavar='COMMAND',
                   help="the card's install line, e.g. 'pip install git+https://...' (default: the package's "
                        'source URL from its metadata, else a note to install it from its source)')
    pre = p.add_argument_group(
        'preprocessing', "config.json's pretrained_cfg is what the run validated with (train.py's args.yaml "
                         "beside the checkpoint); these override it")
    pre.add_argument('--img-size', type=int, nargs='+', default=None, metavar='PX', help='input size: N, or H W')
    pre.add_argument('--crop-pct', type=float, default=None, help='center crop fraction, in (0, 1]')
    pre.add_argument('--crop-mode', default=None, help='center, squash or border')
    pre.add_argument('--interpolation', default=None, help='bilinear, bicubic, ...')
    pre.add_argument('--mean', type=float, nargs='+', default=None)
    pre.add_argument('--std', type=float, nargs='+', default=None)
    pre.add_argument('--test-img-size', type=int, nargs='+', default=None, metavar='PX',
                     help='recommended test-time input size (test_input_size): N, or H W')
    pre.add_argument('--test-crop-pct', type=float, default=None, help='crop fraction at the test-time size')
    p.add_argument('-q', '--quiet', action='store_true', help='no progress output (warnings still show)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-gsop',
        description='Export GSoP-Net checkpoints (timm train.py or official GSoP code) as folders that '
                    "timm.create_model('local-dir:FOLDER' / 'hf-hub:USER/REPO', pretrained=True) loads, "
                    'and push them to the Hugging Face Hub.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='{export,push}')
    exp = sub.add_parser('export', help='write model.safetensors, config.json and a model card to a new folder')
    exp.add_argument('checkpoint', help='timm train.py checkpoint (EMA weights used when present), official '
                                        'GSoP checkpoint, state dict or .safetensors file')
    exp.add_argument('out_dir', help='folder to create')
    _add_common(exp)
    exp.add_argument('--force', action='store_true',
                     help='replace OUT_DIR if it holds an unchanged previous export (anything else is never replaced)')
    exp.add_argument('--repo-id', default=None, metavar='USER/REPO', help="Hub repo id for the card's usage code")
    push = sub.add_parser('push', help='export to a temporary folder and upload it to a Hub model repo')
    push.add_argument('checkpoint', help='as for export')
    push.add_argument('repo_id', metavar='REPO_ID', help='USER/NAME or ORG/NAME; created if missing')
    _add_common(push)
    push.add_argument('--private', action='store_true', help='create the repo as private (if it is new)')
    push.add_argument('--revision', default=None, help='branch to upload to (created if missing)')
    push.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    push.add_argument('--commit-message', default=None, metavar='M', help='commit message')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from timm_gsop.hub import ExportError, export_checkpoint, push_checkpoint

    def size(value):
        return None if value is None else value[0] if len(value) == 1 else tuple(value)
    try:
        options = dict(
            license=args.license, dataset=args.dataset_name, install=args.install, verbose=not args.quiet,
            label_names=read_label_names(args.label_names) if args.label_names else None,
            preprocessing=dict(img_size=size(args.img_size), test_img_size=size(args.test_img_size),
                               **{k: getattr(args, k) for k in ('crop_pct', 'crop_mode', 'interpolation', 'mean',
                                                                'std', 'test_crop_pct')}))
        kwargs = dict(args.model_kwargs)
        if args.command == 'export':
            print(export_checkpoint(args.checkpoint, args.out_dir, args.model, kwargs, force=args.force,
                                    repo_id=args.repo_id, **options))
        else:
            info = push_checkpoint(
                args.checkpoint, args.repo_id, args.model, kwargs, private=args.private, revision=args.revision,
                create_pr=args.create_pr, commit_message=args.commit_message, **options)
            print(getattr(info, 'pr_url', None) or getattr(info, 'commit_url', None) or info)
    except ExportError as e:
        print(f'timm-gsop {args.command}: error: {e}', file=sys.stderr)
        return 1
    except OSError as e:  # a read-only or full disk, a path through a file: one line, no traceback
        where = f': {e.filename}' if e.filename else ''
        print(f'timm-gsop {args.command}: error: {e.strerror or e}{where}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'timm-gsop {args.command}: interrupted', file=sys.stderr)
        return 130
    except Exception as e:  # network / Hub errors: say what failed, without a traceback
        if args.command != 'push':
            raise
        print(f'timm-gsop push: error: {type(e).__name__}: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
