"""Atomic file writes, and a full disk reported as one line naming the file.

Every output is written to a hidden temporary sibling (``.NAME.tmpPID``), flushed, fsynced and
renamed over the target only once complete, so a kill or a full disk leaves the previous file
exactly as it was. A write that fails for lack of space (ENOSPC, EDQUOT, or EFBIG from a
file-size limit) becomes a :class:`DiskFullError` naming the file; the temporary file is removed.
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


def temp_sibling(path: Path) -> Path:
    """The hidden temporary file ``path`` is written to before the rename."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it over ``path``, else remove it.

    A failure for lack of space is re-raised as :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        cause = disk_full_cause(e)
        if cause is not None:
            raise disk_full_error(path, cause) from e
        raise
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
