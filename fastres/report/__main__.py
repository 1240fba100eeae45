"""`python -m fastres.report`."""

import sys

from fastres.report.command import main

sys.exit(main())
