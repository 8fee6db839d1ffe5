"""Where a run keeps its artifacts (outside the repository)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pinlab.images.cache import cache_root


def run_dir(kind: str) -> Path:
    """A fresh directory under ``$PINLAB_RESULTS`` (default ``$PINLAB_CACHE/runs``)."""
    base = Path(os.environ.get("PINLAB_RESULTS") or cache_root() / "runs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = base / (f"{kind}-{stamp}" + (f"-{i}" if i else ""))
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run directory under {base}")
