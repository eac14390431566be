"""Atomic file writes, and a failed write reported as one line naming the file.

Every output is written to a hidden temporary sibling (``.NAME.tmpPID``), flushed, fsynced and
renamed over the target only once complete, so a kill or a full disk leaves the previous file
exactly as it was. A write that fails for lack of space (ENOSPC, EDQUOT, or EFBIG from a
file-size limit) becomes a :class:`DiskFullError` naming the file; any other operating-system
failure (a read-only file system, a directory in the way, a missing folder) a
:class:`WriteError` naming it; the temporary file is removed. :func:`naming_failures` does the
same for writes that cannot be atomic (appending a log line).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cdcl.errors import CdclError

# errno -> the cause as a user reads it
DISK_FULL_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large: no space left under the file-size limit (ulimit -f)",
}


class DiskFullError(CdclError):
    """A file could not be written because the device (or a quota or size limit) is full."""


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The out-of-space OSError behind ``exc``, following ``__cause__``/``__context__``.

    Libraries that write through their own buffers (torch.save's zip writer) re-raise the
    failed ``write`` as a RuntimeError whose context is the OSError.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def disk_full_error(path: str | Path, cause: OSError, kept: str | None = None) -> DiskFullError:
    """The one-line error for ``path`` that could not be written (``cause`` from disk_full_cause).

    ``kept`` says what is still intact (default: the previous version of the file).
    """
    reason = DISK_FULL_ERRNOS.get(cause.errno or 0, cause.strerror or str(cause))
    kept = kept or f"the previous {Path(path).name} (if any) is unchanged"
    return DiskFullError(
        f"{path}: write failed, {reason}; {kept}. Free space on that device and rerun the same "
        "command"
    )


class WriteError(CdclError):
    """A file could not be written for a reason other than space (permissions, read-only, ...)."""


def os_error_cause(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or the cause of a library's wrapper), if any."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and not isinstance(e, CdclError):
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def write_error(path: str | Path, cause: OSError) -> WriteError:
    """The one-line error for ``path`` that could not be written (not for lack of space)."""
    reason = cause.strerror or str(cause) or type(cause).__name__
    return WriteError(
        f"{path}: write failed ({reason}); the previous {Path(path).name} (if any) is "
        "unchanged. Check that its folder exists and is writable, then rerun the same command"
    )


def failed_write(path: str | Path, exc: BaseException) -> CdclError | None:
    """The one-line error naming ``path`` for a write that raised ``exc`` (None: not an OS error)."""
    if isinstance(exc, CdclError):
        return None
    cause = disk_full_cause(exc)
    if cause is not None:
        return disk_full_error(path, cause)
    cause = os_error_cause(exc)
    return write_error(path, cause) if cause is not None else None


@contextmanager
def naming_failures(path: str | Path) -> Iterator[None]:
    """Re-raise an OS error of the ``with`` block (a write to ``path``) as one naming ``path``."""
    try:
        yield
    except Exception as e:
        err = failed_write(path, e)
        if err is None:
            raise
        raise err from e


def temp_sibling(path: Path) -> Path:
    """The hidden temporary file ``path`` is written to before the rename."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it over ``path``, else remove it.

    A failure for lack of space is re-raised as :class:`DiskFullError` naming ``path``, any
    other OS error as :class:`WriteError` naming it (not the temporary file, even when a
    writer inside already named that one). ``suffix`` ends the temporary file's name, for
    writers that choose the format by extension (``.png``, ``.h5ad``).
    """
    path = Path(path)
    tmp = temp_sibling(path)
    tmp = tmp.with_name(tmp.name + suffix) if suffix else tmp
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        named_tmp = isinstance(e, DiskFullError | WriteError) and str(tmp) in str(e)
        err = failed_write(path, e.__cause__ if named_tmp and e.__cause__ else e)
        if err is None:
            raise
        raise err from e
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file via a temporary sibling and rename, so readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode())
