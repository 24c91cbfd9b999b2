"""``timm-gsop`` command line: export GSoP-Net checkpoints as Hugging Face Hub folders, and push them.

    timm-gsop export CHECKPOINT OUT_DIR --model NAME [--model-kwargs k=v ...] [--force]
    timm-gsop push CHECKPOINT REPO_ID --model NAME [--model-kwargs k=v ...] [--private]
                   [--revision R] [--create-pr] [--commit-message M]

Progress goes to stderr; the result (the folder, the commit URL) to stdout.
"""
import argparse
import sys
from typing import List, Optional

__all__ = ['main', 'build_parser']


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', required=True, metavar='NAME',
                   help='model name, e.g. gsop_resnet50, gsop2_resnet50, gsop_resnet101, gsop2_resnet101')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='model arguments, e.g. attn_mode=position attn_dim=64 (values are Python literals). '
                        'By default num_classes, attn_dim and attn_mode are read from the weights and from the '
                        'model_kwargs train.py stored in the checkpoint')
    p.add_argument('--license', default=None, help='license in the model card (default: the model\'s, mit)')
    p.add_argument('-q', '--quiet', action='store_true', help='no progress output')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-gsop',
        description='Export GSoP-Net checkpoints (timm train.py or official GSoP code) as folders that '
                    "timm.create_model('local-dir:FOLDER' / 'hf-hub:USER/REPO', pretrained=True) loads, "
                    'and push them to the Hugging Face Hub.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='{export,push}')

    exp = sub.add_parser('export', help='write model.safetensors, config.json and a model card to a folder')
    exp.add_argument('checkpoint', help='timm train.py checkpoint (EMA weights used when present), official '
                                        'GSoP checkpoint, state dict or .safetensors file')
    exp.add_argument('out_dir', help='folder to create')
    _add_common(exp)
    exp.add_argument('--force', action='store_true', help='replace OUT_DIR if it exists')
    exp.add_argument('--repo-id', default=None, metavar='USER/REPO',
                     help='Hub repo id to name in the model card\'s usage code')

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
    args = parser.parse_args(argv)
    from .hub import ExportError, export_checkpoint, parse_model_kwargs, push_checkpoint
    try:
        kwargs = parse_model_kwargs(args.model_kwargs)
        if args.command == 'export':
            out = export_checkpoint(
                args.checkpoint, args.out_dir, args.model, kwargs, force=args.force, repo_id=args.repo_id,
                license=args.license, verbose=not args.quiet)
            print(out)
        else:
            info = push_checkpoint(
                args.checkpoint, args.repo_id, args.model, kwargs, private=args.private, revision=args.revision,
                create_pr=args.create_pr, commit_message=args.commit_message, license=args.license,
                verbose=not args.quiet)
            print(getattr(info, 'pr_url', None) or getattr(info, 'commit_url', None) or info)
    except ExportError as e:
        print(f'timm-gsop {args.command}: error: {e}', file=sys.stderr)
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
