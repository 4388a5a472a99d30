"""`python -m rlr_fast ...` is the `rlr-fast` command."""

import sys

from .cli import main

sys.exit(main())
