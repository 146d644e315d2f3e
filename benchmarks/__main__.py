"""`python -m benchmarks core|zero ...` from the repository root."""

import sys

from benchmarks.core import main

sys.exit(main())
