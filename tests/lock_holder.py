"""Real second processes for the lock tests: the command line, and a process holding a lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Takes OUT's lock, says so by writing READY, then sleeps until killed.
HOLD = """
import sys, time
from pathlib import Path
from cdcl.locking import output_lock
with output_lock(sys.argv[1], "test holder"):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(600)
"""


def cdcl_env() -> dict[str, str]:
    """This environment with one thread and unbuffered output for a child process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cdcl(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "cdcl", *map(str, args)],
        capture_output=True,
        text=True,
        env=cdcl_env(),
        timeout=timeout,
    )


def wait_for(pred: Callable[[], object], what: str, timeout: float = 120) -> None:
    """Poll ``pred`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def start_holder(out: Path, tmp_path: Path) -> subprocess.Popen:
    """A separate process holding OUT's lock until killed."""
    ready = tmp_path / f"ready{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(ready)], env=cdcl_env())
    wait_for(lambda: ready.exists() or proc.poll() is not None, "the holder")
    assert proc.poll() is None, "the holder could not take a free lock"
    return proc
