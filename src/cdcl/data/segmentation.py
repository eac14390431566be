"""Classical segmentation of nuclei and cells for images that come without masks.

The usual first module of a CellProfiler pipeline, with scikit-image: nuclei are the Otsu
foreground of the smoothed DNA channel, split into touching nuclei by a watershed on the
distance transform (one seed per local maximum, CellProfiler's "shape" declumping); cells grow
from the nuclei by a watershed on the inverted cytoplasm intensity (the mean of the other
channels, each scaled by its 99th percentile), bounded by that image's own Otsu foreground (an
approximation of CellProfiler's "propagation"). With the DNA channel alone, cells are the
nuclei expanded by half a nuclear diameter.

The nuclear diameter sets the smoothing, the smallest nucleus kept and the distance between
seeds; by default it is estimated per image from the median area of the foreground's
connected components (touching nuclei make it an overestimate, which errs towards merging).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import label
from skimage.morphology import remove_small_objects
from skimage.segmentation import expand_labels, watershed

from cdcl.errors import CdclError

OBJECTS = ("cells", "nuclei")  # the order of the masks returned by segment_field


def _scaled(image: np.ndarray) -> np.ndarray:
    """An image as float64 divided by its 99.9th percentile (1 when that is 0)."""
    x = np.asarray(image, dtype=np.float64)
    top = float(np.percentile(x, 99.9))
    return x / top if top > 0 else x


def _otsu_foreground(x: np.ndarray) -> np.ndarray:
    """Pixels above Otsu's threshold (none when the image is flat)."""
    if float(x.max()) <= float(x.min()):
        return np.zeros(x.shape, dtype=bool)
    return x > threshold_otsu(x)


def estimate_nucleus_diameter(dna: np.ndarray) -> float:
    """Typical nuclear diameter (px): median equivalent diameter of the Otsu components."""
    fg = ndimage.binary_fill_holes(_otsu_foreground(gaussian(_scaled(dna), sigma=1.0)))
    areas = np.bincount(label(fg).ravel())[1:]
    areas = areas[areas >= 4]  # single noisy pixels are not nuclei
    if len(areas) == 0:
        return 0.0
    return 2.0 * math.sqrt(float(np.median(areas)) / math.pi)


def segment_nuclei(dna: np.ndarray, diameter: float | None = None) -> np.ndarray:
    """Nucleus labels (H, W) int32 from the DNA channel: Otsu + distance-transform watershed."""
    if dna.ndim != 2:
        raise CdclError(f"segment_nuclei: expected one 2-D DNA image, got shape {dna.shape}")
    d = estimate_nucleus_diameter(dna) if diameter is None else float(diameter)
    if d <= 0:
        return np.zeros(dna.shape, dtype=np.int32)
    smooth = gaussian(_scaled(dna), sigma=max(0.5, d / 12.0))
    fg = ndimage.binary_fill_holes(_otsu_foreground(smooth))
    fg = remove_small_objects(fg, max_size=max(1, int(math.pi * (d / 4.0) ** 2)))
    if not fg.any():
        return np.zeros(dna.shape, dtype=np.int32)
    dist = ndimage.distance_transform_edt(fg)
    dist = gaussian(dist, sigma=max(0.5, d / 12.0))
    components = label(fg)
    peaks = peak_local_max(
        dist,
        min_distance=max(1, int(round(d / 3.0))),
        labels=components,
        exclude_border=False,
    )
    markers = np.zeros(dna.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # Components without a peak (flat plateaus) still get one seed, at their deepest pixel.
    seeded = np.unique(components[markers > 0])
    for comp in np.setdiff1d(np.arange(1, components.max() + 1), seeded):
        where = np.flatnonzero(components.ravel() == comp)
        markers.ravel()[where[np.argmax(dist.ravel()[where])]] = markers.max() + 1
    return watershed(-dist, markers, mask=fg).astype(np.int32)


def segment_cells(nuclei: np.ndarray, cytoplasm: np.ndarray | None, diameter: float) -> np.ndarray:
    """Cell labels grown from the nuclei (same numbers) over the cytoplasm foreground."""
    if cytoplasm is None:
        return expand_labels(nuclei, distance=max(1.0, diameter / 2.0)).astype(np.int32)
    smooth = gaussian(cytoplasm, sigma=max(0.5, diameter / 12.0))
    region = _otsu_foreground(smooth) | (nuclei > 0)
    return watershed(-smooth, nuclei, mask=region).astype(np.int32)


def segment_field(
    image: np.ndarray, channels: list[str], diameter: float | None = None
) -> np.ndarray:
    """Cell and nucleus labels (2, H, W) of one field (C, H, W); ``DNA`` names the nuclear stain."""
    dna_index = next(
        (i for i, c in enumerate(channels) if c.upper() in ("DNA", "DAPI", "HOECHST")), None
    )
    if dna_index is None:
        raise CdclError(
            f"segmentation needs a DNA channel (named DNA, DAPI or Hoechst); the dataset has "
            f"{', '.join(channels)}"
        )
    dna = image[dna_index]
    d = estimate_nucleus_diameter(dna) if diameter is None else float(diameter)
    nuclei = segment_nuclei(dna, d)
    others = [i for i in range(len(channels)) if i != dna_index]
    cyto = np.mean([_scaled(image[i]) for i in others], axis=0) if others else None
    cells = segment_cells(nuclei, cyto, d) if d > 0 else nuclei
    return np.stack([cells, nuclei])


__all__ = [
    "OBJECTS",
    "estimate_nucleus_diameter",
    "segment_cells",
    "segment_field",
    "segment_nuclei",
]
