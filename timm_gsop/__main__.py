"""``python -m timm_gsop``: the ``timm-gsop`` command line."""
import sys

from .cli import main

sys.exit(main())
