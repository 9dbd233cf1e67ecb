"""Progress bars of long host work (preparing data, moving models): tqdm on stderr, redrawn
every half second on a terminal and at most every 30 s when stderr is a log file (a pod
worker's, a job's), so logs get a line now and then instead of thousands."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(items, desc: str, unit: str, enabled: bool, total: int | None = None):
    """A tqdm bar over `items` (None: updated by hand); bytes are shown scaled (kB, MB)."""
    return tqdm(items, desc=desc, unit=unit, total=total, disable=not enabled, unit_scale=unit == 'B',
                mininterval=0.5 if sys.stderr.isatty() else 30)
