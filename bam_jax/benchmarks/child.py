"""What the I/O benchmarks share: a row run in a fresh interpreter, and its memory peaks.

Each row runs a benchmark module's `_child` in its own subprocess (JAX_PLATFORMS=cpu; os.sync()
first, so none pays for another's write-back), which prints one JSON line. Memory is read by the
child itself from /proc/self/status: getrusage's ru_maxrss is no use, as Linux carries the
parent's peak into a child across fork and exec.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

ANON_SAMPLE_S = 0.005


def run(module: str, *args: str) -> dict:
    """Runs `python -m module args...`; its JSON result plus 'wall_seconds' (the whole subprocess
    as the parent sees it: interpreter start, imports, work)."""
    os.sync()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f'benchmark subprocess {module} {args[:1]} failed:\n{done.stderr[-4000:]}')
    return {**json.loads(done.stdout.strip().splitlines()[-1]), 'wall_seconds': wall}


def status_bytes(field: str) -> int:
    """A field of /proc/self/status (given in kB there) in bytes."""
    with open('/proc/self/status') as status:
        line = next(line for line in status if line.startswith(f'{field}:'))
    return int(line.split()[1]) * 1024


def sample_anon_peak() -> dict:
    """Starts a daemon thread that keeps the largest RssAnon (the process's own allocations, not
    the pages of mapped files) it sees in the returned {'peak': bytes}."""
    seen = {'peak': status_bytes('RssAnon')}

    def sample() -> None:
        while True:
            seen['peak'] = max(seen['peak'], status_bytes('RssAnon'))
            time.sleep(ANON_SAMPLE_S)

    threading.Thread(target=sample, daemon=True).start()
    return seen


def peaks(anon: dict) -> dict:
    """The child's peak resident set and peak anonymous memory, for its JSON result."""
    return {'peak_rss_bytes': status_bytes('VmHWM'), 'peak_anon_bytes': max(anon['peak'], status_bytes('RssAnon'))}


def file_bytes(directory: pathlib.Path, pattern: str = '*') -> int:
    return sum(p.stat().st_size for p in directory.rglob(pattern) if p.is_file())
