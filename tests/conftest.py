"""Setup for the whole test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# DeepSpeed builds its CPU ops (the shared-memory collective) on first use into a cache shared by every
# process and keyed by the build command, which depends on the `ninja` found first on PATH. Where the
# environment's ninja and a system one are both present, processes that find different ones rebuild the
# op by turns (20-70 s each on 2 cores): this environment's executables go first on PATH for the test
# process and for every process it starts.
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")
