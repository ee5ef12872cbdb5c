"""`python -m ds_dynrank ...`: the command-line tools (ds_dynrank/tools/cli.py)."""

import sys

from ds_dynrank.tools.cli import main

sys.exit(main())
