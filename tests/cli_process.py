"""The real `cdcl` command line in a subprocess, and polling for what another process does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# A tiny network and head so that a training step takes a fraction of a second on one core:
# the one definition the tests share (add what a test needs: ``[*TINY_MODEL, "train.epochs=1"]``).
TINY_MODEL_VALUES: Mapping[str, int] = {
    "model.embed_dim": 32,
    "model.depth": 1,
    "model.num_heads": 2,
    "method.out_dim": 32,
    "method.hidden_dim": 32,
    "method.bottleneck_dim": 16,
}
TINY_MODEL: tuple[str, ...] = tuple(f"{k}={v}" for k, v in TINY_MODEL_VALUES.items())


def cdcl_env(**extra: str) -> dict[str, str]:
    """This environment with one thread and unbuffered output for a child process (plus ``extra``)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def cdcl_argv(*args: object) -> list[str]:
    """The argument vector of `python -m cdcl ARGS`."""
    return [sys.executable, "-m", "cdcl", *map(str, args)]


def cdcl(
    *args: object,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    input: str | None = None,  # noqa: A002 (subprocess.run's name)
    **popen: Any,
) -> subprocess.CompletedProcess:
    """Run `python -m cdcl ARGS` and capture its output (text).

    ``env`` defaults to :func:`cdcl_env` (one thread, unbuffered); other keyword arguments
    (``preexec_fn``...) go to :func:`subprocess.run` as they are.
    """
    return subprocess.run(
        cdcl_argv(*args),
        capture_output=True,
        text=True,
        env=cdcl_env() if env is None else dict(env),
        cwd=cwd,
        input=input,
        timeout=timeout,
        check=False,
        **popen,
    )


def wait_for(pred: Callable[[], object], what: str, timeout: float = 120) -> None:
    """Poll ``pred`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
