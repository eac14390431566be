"""CellProfiler measurements of one field of view, through ``cp-measure``.

``cp-measure`` (the Carpenter–Singh lab's CellProfiler measurement modules as a Python library)
computes, for every labelled object of a mask, the features of a measurement family. Here each
object type (cells, nuclei) of a field is measured with the chosen families, channel by channel
for the families that read pixels, once per object type for the shape families. Pixels are the
raw stored values divided by the dtype's maximum (65535 for 16-bit images), which is how
CellProfiler loads an image.

Feature names follow CellProfiler: ``<Object>_<Family>_<Feature>[_<Channel>]``, e.g.
``Cells_Intensity_MeanIntensity_DNA`` or ``Nuclei_AreaShape_Area``. The position of an object in
the field (centre and bounding-box coordinates) is not a property of the cell and is left out,
as pycytominer's blocklist does.

The default families are chosen by their measured cost (``benchmarks/bench_cellprofiler.py``,
figures in ``docs/cellprofiler.md``): intensity and the three shape families (size and shape,
Zernike shape moments, Feret diameters) cost at most about as much as intensity on both the
simulated 64-px fields and a real 1080-px Cell Painting field. Texture (Haralick features,
about 30 ms per object over the channels: 20x intensity on the simulated fields), granularity
and the radial intensity distribution (10-15x intensity on the real field, where they work on
the whole image) and the radial Zernike moments (60 features per channel, half of them phases
that depend on the cell's orientation) are available with ``--families``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdcl.errors import CdclError

# family -> (reads pixels, CellProfiler module prefix added to cp-measure's keys)
FAMILIES: dict[str, tuple[bool, str]] = {
    "intensity": (True, ""),  # keys already start with Intensity_
    "granularity": (True, ""),  # Granularity_
    "radial_distribution": (True, ""),  # RadialDistribution_
    "radial_zernikes": (True, ""),  # RadialDistribution_Zernike...
    "texture": (True, "Texture_"),
    "sizeshape": (False, "AreaShape_"),
    "zernike": (False, "AreaShape_"),
    "feret": (False, "AreaShape_"),
}
SEGMENTATIONS = ("auto", "masks", "otsu")  # auto: stored masks when present, else otsu
NORMALIZATIONS = ("mad_robustize", "standardize", "none")  # pycytominer normalize methods
CHUNK_SIZE = 64  # fields per resumable part: a killed run loses at most this many fields' work
DEFAULT_FAMILIES = ("intensity", "sizeshape", "zernike", "feret")
# Where an object sits in the field, not what it looks like (pycytominer's blocklist drops these):
# the AreaShape centre and bounding box, and the intensity family's Location_* coordinates.
LOCATION_KEYS = frozenset(
    {
        "Center_X",
        "Center_Y",
        "BoundingBoxMinimum_X",
        "BoundingBoxMaximum_X",
        "BoundingBoxMinimum_Y",
        "BoundingBoxMaximum_Y",
    }
)


def is_location(key: str) -> bool:
    """Whether a cp-measure key is an object's position in the field."""
    return key in LOCATION_KEYS or key.startswith("Location_")


def parse_families(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Family names from ``"intensity,sizeshape"``, ``"all"`` or ``None`` (the default set)."""
    if spec is None:
        return DEFAULT_FAMILIES
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [p.strip().lower() for p in parts if p.strip()]
    if names == ["all"]:
        return tuple(FAMILIES)
    if names == ["default"]:
        return DEFAULT_FAMILIES
    bad = [n for n in names if n not in FAMILIES]
    if bad or not names:
        raise CdclError(
            f"--families {','.join(bad) or spec!r}: unknown feature family; choose from "
            f"{', '.join(FAMILIES)} (or all, default)"
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class CellProfilerOptions:
    """What determines the CellProfiler profiles besides the images."""

    families: tuple[str, ...] = DEFAULT_FAMILIES
    segmentation: str = "auto"  # auto: stored masks when the dataset has them, else otsu
    normalize: str = "mad_robustize"
    select: bool = True
    nucleus_diameter: float | None = None  # otsu: None = estimated per image

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", parse_families(list(self.families)))
        if self.segmentation not in SEGMENTATIONS:
            raise CdclError(
                f"--segmentation {self.segmentation}: choose from {', '.join(SEGMENTATIONS)}"
            )
        if self.normalize not in NORMALIZATIONS:
            raise CdclError(
                f"--normalize {self.normalize}: choose from {', '.join(NORMALIZATIONS)}"
            )
        if self.nucleus_diameter is not None and not self.nucleus_diameter > 0:
            raise CdclError(f"--nucleus-diameter {self.nucleus_diameter}: must be positive (px)")


def resolve_objects(dataset: Any, segmentation: str) -> tuple[str, list[str]]:
    """``("masks", stored object names)`` or ``("otsu", ["cells", "nuclei"])``."""
    from cdcl.data.segmentation import OBJECTS as SEGMENTED_OBJECTS

    stored = dataset.mask_objects
    if segmentation == "masks" and not stored:
        raise CdclError(
            f"{dataset.path}: no stored masks (masks.zarr); use --segmentation otsu or auto"
        )
    if segmentation in ("masks", "auto") and stored:
        return "masks", list(stored)
    return "otsu", list(SEGMENTED_OBJECTS)


def pixel_scale(dtype: Any) -> float:
    """The value CellProfiler divides stored pixels by: the integer dtype's maximum."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        return float(np.iinfo(dt).max)
    return 1.0


def _measure(fn: Any, labels: np.ndarray, pixels: np.ndarray | None) -> dict[str, np.ndarray]:
    """One cp-measure call; its warnings about degenerate objects (NaN features) silenced."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(labels, pixels)


def measure_objects(
    labels: np.ndarray,
    image: np.ndarray,
    channels: Sequence[str],
    families: Sequence[str] = DEFAULT_FAMILIES,
) -> tuple[np.ndarray, list[str]]:
    """Features (n_objects, F) float64 of the objects labelled 1..n in ``labels``, and names.

    ``image`` is (C, H, W) float in CellProfiler's 0..1 scale; rows follow the label numbers
    (``labels`` must be numbered 1..n without gaps). Names carry no object prefix.
    """
    from cp_measure.bulk import get_core_measurements

    n = int(labels.max(initial=0))
    if n == 0:  # nothing to measure; the caller knows the names from other fields
        return np.zeros((0, 0)), []
    core = get_core_measurements()
    columns: dict[str, np.ndarray] = {}
    for fam in families:
        reads_pixels, prefix = FAMILIES[fam]
        if reads_pixels:
            continue
        for key, values in _measure(core[fam], labels, None).items():
            if not is_location(key):
                columns[f"{prefix}{key}"] = np.asarray(values, dtype=np.float64)
    for c, channel in enumerate(channels):
        for fam in families:
            reads_pixels, prefix = FAMILIES[fam]
            if not reads_pixels:
                continue
            for key, values in _measure(core[fam], labels, image[c]).items():
                if not is_location(key):
                    columns[f"{prefix}{key}_{channel}"] = np.asarray(values, dtype=np.float64)
    names = list(columns)
    x = np.column_stack([columns[k].reshape(-1) for k in names])
    if x.shape[0] != n:
        raise RuntimeError(f"cp-measure returned {x.shape[0]} rows for {n} objects")
    return x, names


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in the order of their values (no gaps), as int32."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) and ids[-1] == len(ids):
        return labels.astype(np.int32, copy=False)
    lut = np.zeros(int(ids[-1]) + 1 if len(ids) else 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def measure_field(
    image: np.ndarray,
    masks: np.ndarray,
    channels: Sequence[str],
    families: Sequence[str] = DEFAULT_FAMILIES,
    scale: float | None = None,
) -> tuple[list[np.ndarray], list[str]]:
    """Per object type (one mask each): features (n_k, F) of one field, and the feature names.

    An object type without objects in the field gets a (0, 0) array; names are [] when the
    field has no object at all.

    ``image`` holds the stored pixels (C, H, W); they are divided by ``scale`` (default: the
    dtype's maximum, see :func:`pixel_scale`). ``masks`` is (M, H, W), one label mask per
    object type.
    """
    s = pixel_scale(image.dtype) if scale is None else float(scale)
    pixels = np.asarray(image, dtype=np.float64) / s
    out: list[np.ndarray] = []
    names: list[str] = []
    for m in range(masks.shape[0]):
        x, got = measure_objects(relabel(masks[m]), pixels, channels, families)
        out.append(x)
        names = got or names
    return out, names


def object_prefix(name: str) -> str:
    """CellProfiler's object name for a mask name: ``cells`` -> ``Cells``."""
    return name[:1].upper() + name[1:]


__all__ = [
    "CHUNK_SIZE",
    "CellProfilerOptions",
    "DEFAULT_FAMILIES",
    "NORMALIZATIONS",
    "SEGMENTATIONS",
    "FAMILIES",
    "LOCATION_KEYS",
    "is_location",
    "measure_field",
    "measure_objects",
    "object_prefix",
    "parse_families",
    "pixel_scale",
    "relabel",
    "resolve_objects",
]
