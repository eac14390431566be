"""Content hashes of files, recorded as provenance (checkpoints, profile tables)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, n_hex: int = 16) -> str:
    """First ``n_hex`` hex digits of a file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n_hex]
