"""``timm-gsop`` (also ``python -m timm_gsop``): the package's command line.

    timm-gsop train [--recipe NAME] [--nproc-per-node N ...] [--dry-run] [train.py arguments]
    timm-gsop validate --checkpoint RUN/model_best.pth.tar [validate.py arguments]
    timm-gsop benchmark [benchmark.py arguments]
    timm-gsop export CHECKPOINT OUT_DIR [--model NAME] [--model-kwargs k=v ...] [--force] [options]
    timm-gsop push CHECKPOINT REPO_ID [--model NAME] [--private] [--revision R] [--create-pr] [options]

train, validate and benchmark run timm's scripts (``timm_gsop.launcher``); export and push write and upload Hub
folders (``timm_gsop.hub``). Progress goes to stderr, results (the folder, the commit URL, a dry run's command) to
stdout. A refusal is one ``timm-gsop COMMAND: error: ...`` line: exit status 2 for the command line and the
launcher's checks, 1 for an export or push that failed.
"""
import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

from .launcher import launch
from .launcher.timm_scripts import LaunchError, TimmScriptNotFound

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
    from .hub import ExportError
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


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, naming the valid choices, in place of a usage block."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (--help lists the options)\n')


SCRIPT_COMMANDS = ('train', 'validate', 'benchmark')  # the rest of their arguments go to timm's script


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog='timm-gsop', allow_abbrev=False,
        description="GSoP-Net with timm: train, validate and benchmark with timm's reference scripts; export "
                    "checkpoints as folders that timm.create_model('local-dir:FOLDER' / 'hf-hub:USER/REPO', "
                    'pretrained=True) loads, and push them to the Hugging Face Hub.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='{train,validate,benchmark,export,push}')
    # allow_abbrev=False: an abbreviation of a launcher option may be a train.py option, which passes through
    launch.add_train_arguments(sub.add_parser(
        'train', help="train with timm's train.py: the demo, recipes, torchrun", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter))
    launch.add_script_arguments(sub.add_parser(
        'validate', help="timm's validate.py; --checkpoint RUN/ckpt takes the rest from the run's args.yaml",
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter), 'validate')
    launch.add_script_arguments(sub.add_parser(
        'benchmark', help="timm's benchmark.py", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter), 'benchmark')
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
    parser = build_parser()
    args, script_args = parser.parse_known_args(argv)
    if args.command in SCRIPT_COMMANDS:
        try:
            if args.command == 'train':
                return launch.train(args, script_args)
            return launch.run_timm_script(args.command, args, script_args)
        except LaunchError as e:
            print(f'timm-gsop {args.command}: error: {e}', file=sys.stderr)
        except TimmScriptNotFound as e:  # the lines that say how to get the script
            print(f'timm-gsop {args.command}: {e}', file=sys.stderr)
        except OSError as e:  # writing the demo's dataset
            print(f'timm-gsop {args.command}: error: {_os_error(e)}', file=sys.stderr)
        return 2
    if script_args:
        parser.error(f'unrecognized arguments: {" ".join(script_args)}')
    return _export_or_push(args)


def _export_or_push(args: argparse.Namespace) -> int:
    from .hub import ExportError, export_checkpoint, push_checkpoint

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
        print(f'timm-gsop {args.command}: error: {_os_error(e)}', file=sys.stderr)
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



def _os_error(e: OSError) -> str:
    return f'{e.strerror or e}: {e.filename}' if e.filename else f'{e.strerror or e}'
