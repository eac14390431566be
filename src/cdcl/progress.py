"""Progress lines of a long evaluation on stderr, with no silent stretch longer than ~10 s.

Stages and metrics print a line when they finish (:func:`say`). While one runs, a daemon
thread (:func:`keep_alive`) prints ``still working on <what> (T s)`` after every 10 s without
a line, so that a long UMAP or mAP never looks like a hang.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

GAP_S = 10.0
_lock = threading.Lock()
_state = {"last": time.monotonic(), "what": "", "since": time.monotonic()}
_depth = [0]  # nested keep_alive blocks: only the outermost runs a thread


def say(line: str) -> None:
    """Print one progress line to stderr and restart the silence clock."""
    with _lock:
        print(line, file=sys.stderr, flush=True)
        _state["last"] = time.monotonic()


def working_on(what: str) -> None:
    """Name the step now running (shown by the keep-alive line)."""
    with _lock:
        _state["what"] = what
        _state["since"] = time.monotonic()


@contextlib.contextmanager
def keep_alive(on: bool, prefix: str = "cdcl evaluate: ") -> Iterator[None]:
    """While the block runs (and ``on``), print a line after every 10 s of silence.

    Nested blocks share the outer block's thread (one line per silence, not one per level).
    """
    if not on or _depth[0] > 0:
        yield
        return
    stop = threading.Event()
    # The stream at entry: a step that silences its own output (redirect_stderr, as the
    # calibration does) must not silence the keep-alive too.
    stream = sys.stderr

    def beat() -> None:
        while not stop.wait(1.0):
            with _lock:
                now = time.monotonic()
                what, since = _state["what"], _state["since"]
                if now - _state["last"] >= GAP_S and not stop.is_set():
                    line = f"{prefix}still working on {what or 'the evaluation'}"
                    print(f"{line} ({now - since:.0f} s)", file=stream, flush=True)
                    _state["last"] = now

    with _lock:
        _state["last"] = time.monotonic()
    thread = threading.Thread(target=beat, name="cdcl-keep-alive", daemon=True)
    thread.start()
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        stop.set()
        thread.join(timeout=2.0)


def end_progress_lines() -> None:
    """Close every open progress bar (tqdm), so that the next line starts on a line of its own.

    A command that fails or is interrupted mid-bar would otherwise print its error after the
    bar's text; each bar is left showing where it stopped.
    """
    module = sys.modules.get("tqdm")
    if module is None:  # no bar was ever made
        return
    bars = list(getattr(module.tqdm, "_instances", ()))
    for bar in sorted(bars, key=lambda b: -abs(getattr(b, "pos", 0) or 0)):
        if getattr(bar, "disable", True):
            continue
        bar.leave = True
        try:
            bar.close()
        except Exception:  # a bar on a closed stream: nothing to end
            continue
