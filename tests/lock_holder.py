"""A separate process that holds an output lock until killed, for the lock tests."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from cli_process import cdcl_env, wait_for

# Takes OUT's lock, says so by writing READY, then sleeps until killed.
HOLD = """
import sys, time
from pathlib import Path
from cdcl.locking import output_lock
with output_lock(sys.argv[1], "test holder"):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(600)
"""


def start_holder(out: Path, tmp_path: Path) -> subprocess.Popen:
    """A separate process holding OUT's lock until killed."""
    ready = tmp_path / f"ready{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(ready)], env=cdcl_env())
    wait_for(lambda: ready.exists() or proc.poll() is not None, "the holder")
    assert proc.poll() is None, "the holder could not take a free lock"
    return proc
