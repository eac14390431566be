"""One writer per output directory: a lock that a dead process cannot leave stuck.

``cdcl train``, ``cdcl build`` and ``cdcl synth`` hold :func:`output_lock` on their output
directory while they run, so a second command aimed at the same directory stops at once with
one line naming the directory and the process (pid, host) that holds it.

The lock is a POSIX record lock (``fcntl.lockf``) on a hidden sibling file ``.NAME.lock``:
- the kernel releases it when the holding process dies, even by SIGKILL, so no stale lock
  ever has to be cleaned by hand (a file left behind by a killed holder is simply reused);
- it belongs to the process, not to a file descriptor, so forked data-loader workers do not
  inherit it and cannot keep it alive after their parent is gone;
- it sits next to the directory, not inside it, because builds write ``.NAME.partial`` and
  rename it over ``NAME`` when done;
- it also works on NFS (lockd), where ``flock`` is emulated with the same record locks.
The holder writes its pid, host, command and start time into the file for the message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cdcl.errors import CdclError

# Lock files this process holds: POSIX locks never conflict within one process, so a second
# lock of the same directory here must be refused by hand.
_HELD: set[Path] = set()
# Every output directory this process has locked, in order (kept after release): after an
# interrupt the command line says what each holds (cdcl.cli).
_LOCKED: list[Path] = []


class LockedError(CdclError):
    """The output directory is being written by another running command."""


def lock_file(out: str | Path) -> Path:
    """The lock file of output directory ``out`` (a hidden sibling ``.NAME.lock``)."""
    out = Path(out).absolute()
    resolved = out.parent.resolve() / out.name
    return resolved.parent / f".{resolved.name}.lock"


def _read_holder(path: Path) -> dict[str, object]:
    """The holder's record, waiting briefly for a holder that has just locked to write it."""
    for _ in range(20):
        try:
            text = path.read_text()
            if text.strip():
                return dict(json.loads(text))
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def _locked_message(out: Path, path: Path) -> str:
    h = _read_holder(path)
    if h:
        who = f"{h.get('command', 'a cdcl command')} (pid {h.get('pid')} on host {h.get('host')}"
        who += f", since {h['since']})" if h.get("since") else ")"
    else:
        who = "another process"
    return (
        f"{out}: in use by {who}; wait for it to finish (or stop it), or choose another "
        f"output directory. Lock file: {path}"
    )


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fs = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fs.st_dev, fs.st_ino)


@contextmanager
def output_lock(out: str | Path, command: str) -> Iterator[Path]:
    """Hold the lock of output directory ``out`` for the ``with`` block; LockedError if taken.

    Never waits: a second command fails at once. The lock file is removed on a normal exit;
    after a kill it stays, unlocked, and the next command takes it over.
    """
    path = lock_file(out)
    if path in _HELD:
        raise LockedError(f"{out}: already locked by this process ({command})")
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CdclError(
                f"{out}: cannot create its lock file {path} ({e.strerror}); choose an output "
                "directory in a writable place"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LockedError(_locked_message(Path(out), path)) from None
        # The previous holder may have removed the file between our open and our lock: then
        # we hold a lock on an orphaned inode and must start over on the new file.
        if _same_file(fd, path):
            break
        os.close(fd)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "directory": str(Path(out).absolute()),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _HELD.add(path)
    _LOCKED.append(Path(out).absolute())
    try:
        yield path
    finally:
        _HELD.discard(path)
        # Remove while still locked, so nobody can lock the file we are about to delete
        # without noticing (see the inode check above); closing releases the lock.
        if _same_file(fd, path):
            path.unlink(missing_ok=True)
        os.close(fd)


def locked_outputs() -> list[Path]:
    """The output directories this process has locked so far, in order (released ones too)."""
    return list(_LOCKED)


def is_main_process() -> bool:
    """True unless this is a non-zero rank under torchrun (only rank 0 takes output locks)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def command_lock(out: str | Path | None, command: str) -> Iterator[None]:
    """:func:`output_lock` on rank 0 (or a single process); nothing on the other ranks."""
    if out is None or not is_main_process():
        yield
        return
    with output_lock(out, command):
        yield
