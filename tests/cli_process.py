"""The real `cdcl` command line in a subprocess, and polling for what another process does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable


def cdcl_env() -> dict[str, str]:
    """This environment with one thread and unbuffered output for a child process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cdcl(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m cdcl ARGS` on one thread and capture its output."""
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
