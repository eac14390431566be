"""Fields whose channels are packed in one RGB file (``--rgb-channels``), e.g. BBBC021 PNGs.

``--rgb-channels Actin,Tubulin,DNA`` names the file's planes in order (red, green, blue, then
alpha if named); ``--channels`` picks and orders the dataset's channels among those names.
PNG and JPEG are read with PIL (8 bit per plane), TIFF with tifffile (8 or 16 bit, planes
last or first).
"""

from __future__ import annotations

import os

import numpy as np
import tifffile
from PIL import Image

from cdcl.data.build import TIFF_SUFFIXES, Probe, Problem
from cdcl.errors import CdclError


def rgb_planes(rgb_channels: list[str], channels: list[str]) -> list[int]:
    """Index in the file of each dataset channel; one-line error naming an unknown one."""
    if len(set(rgb_channels)) != len(rgb_channels) or not 1 <= len(rgb_channels) <= 4:
        raise CdclError(
            f"--rgb-channels {','.join(rgb_channels)}: name the file's planes in order, "
            "up to 4 distinct names (red, green, blue, alpha), e.g. Actin,Tubulin,DNA"
        )
    unknown = [c for c in channels if c not in rgb_channels]
    if unknown:
        raise CdclError(
            f"--channels {','.join(channels)}: {', '.join(unknown)} not among --rgb-channels "
            f"{','.join(rgb_channels)}"
        )
    return [rgb_channels.index(c) for c in channels]


def _tiff_hwc(shape: tuple[int, ...]) -> tuple[int, int, int, bool]:
    """(H, W, planes, planes-first) of a TIFF page shape."""
    if len(shape) == 2:
        return shape[0], shape[1], 1, False
    if len(shape) == 3 and shape[-1] <= 4:
        return shape[0], shape[1], shape[2], False
    if len(shape) == 3 and shape[0] <= 4:
        return shape[1], shape[2], shape[0], True
    raise ValueError(f"shape {shape} is not one multi-channel plane")


def probe_rgb_file(path: str) -> tuple[tuple[int, int], int, str]:
    """(H, W), number of planes and dtype of a packed file from its header."""
    if path.lower().endswith(TIFF_SUFFIXES):
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            h, w, n, _ = _tiff_hwc(tuple(page.shape))
            return (h, w), n, str(page.dtype)
    with Image.open(path) as im:
        bands, (w, h), mode = len(im.getbands()), im.size, im.mode
        im.verify()
    if mode not in ("RGB", "RGBA", "L", "LA"):
        raise ValueError(f"pixel mode {mode} unsupported; use 8-bit RGB or RGBA")
    return (h, w), bands, "uint8"


def read_rgb_file(path: str) -> np.ndarray:
    """The planes of a packed file as (H, W, planes)."""
    if path.lower().endswith(TIFF_SUFFIXES):
        arr = tifffile.imread(path)
        if _tiff_hwc(arr.shape)[3]:
            arr = np.moveaxis(arr, 0, -1)
    else:
        with Image.open(path) as im:
            arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


class RgbFields:
    """A field = one file holding several channels as RGB(A) planes."""

    def __init__(self, paths: list[str], planes: list[int]) -> None:
        self.paths, self.planes = paths, planes

    def __len__(self) -> int:
        return len(self.paths)

    def probe(self, i: int) -> Probe | Problem:
        """Check that the file exists and holds the named planes at 8 or 16 bit."""
        p = self.paths[i]
        if not os.path.isfile(p):
            return Problem(i, p, "missing", "file not found")
        try:
            size, n, dtype = probe_rgb_file(p)
        except Exception as e:  # any decoder error means the file cannot be used
            return Problem(i, p, "unreadable", f"{type(e).__name__}: {e}".strip())
        if n <= max(self.planes):
            return Problem(i, p, "channels", f"holds {n} plane(s); --rgb-channels names more")
        if dtype not in ("uint8", "uint16"):
            return Problem(i, p, "depth", f"pixel type {dtype}; use 8- or 16-bit images")
        return Probe([size] * len(self.planes), dtype)

    def load(self, i: int) -> list[np.ndarray]:
        """The dataset's channels of row i, in order."""
        arr = read_rgb_file(self.paths[i])
        return [np.ascontiguousarray(arr[..., k]) for k in self.planes]

    def describe(self, i: int) -> str:
        """The file of row i, for messages."""
        return self.paths[i]

    def subset(self, rows: np.ndarray) -> RgbFields:
        """Restrict to rows."""
        return RgbFields([self.paths[int(r)] for r in rows], self.planes)
