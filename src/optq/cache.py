"""Where optq keeps what it computes once per machine: native kernel builds, kernel choices, the model's own
chat answers for calibration. $OPTQ_CACHE, else $XDG_CACHE_HOME/optq, else ~/.cache/optq."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("OPTQ_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                        "optq")
    return Path(root)
