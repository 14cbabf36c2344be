"""`python -m kvzoo ...`: the same as the `kvzoo` command."""

import sys

from kvzoo.cli import main

sys.exit(main())
