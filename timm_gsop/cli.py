"""``timm-gsop`` command line. Its code is the top-level module ``timm_gsop_cli``, which imports no
torch until a command runs (importing this package does, to register the models)."""
import sys

from timm_gsop_cli import build_parser, main

__all__ = ['main', 'build_parser']

if __name__ == '__main__':
    sys.exit(main())
