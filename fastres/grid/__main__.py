"""`python -m fastres.grid`."""

import sys

from fastres.grid.command import main

sys.exit(main())
