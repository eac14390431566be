"""Single-cell crops around nucleus centres listed in one CSV per field (``--crops-from``).

Crop = field[y0 : y0 + S, x0 : x0 + S] with x0 = floor(center_x + 0.5) - S // 2 (same for y),
so the centre lands on pixel (S // 2, S // 2); X is the column and Y the row, as in
CellProfiler's ``Nuclei_Location_Center_X/Y``. Nuclei whose crop would leave the field are
skipped. With a per-well cap N, one generator ``numpy.random.default_rng(seed)`` visits the
wells in sorted (plate, well) order and permutes each well's crops (ordered by site, then row in
the nuclei file); the first N of the permutation are kept. Crops stay in field order, then
nucleus order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cdcl.data.build import MAX_LISTED, FieldSource, Probe, Problem, _parallel_map, _probe_task
from cdcl.errors import CdclError

CENTER_COLUMNS = ("Nuclei_Location_Center_X", "Nuclei_Location_Center_Y")
# Columns each crop adds to its field's metadata.
NUCLEUS_INDEX, CENTER_X, CENTER_Y, CROP_X0, CROP_Y0 = (
    "Metadata_Nucleus_Index",  # 0-based row of the nucleus in its field's nuclei file
    "Metadata_Nucleus_Center_X",
    "Metadata_Nucleus_Center_Y",
    "Metadata_Crop_X0",
    "Metadata_Crop_Y0",
)


@dataclass
class CropSpec:
    """What ``--crops-from``, ``--crop-size``, ``--crops-per-well``, ``--crop-seed`` ask for."""

    template: str
    size: int
    per_well: int | None = None
    seed: int = 0
    columns: tuple[str, str] = CENTER_COLUMNS


def crop_origin(center: np.ndarray, size: int) -> np.ndarray:
    """Top-left pixel of the crop of each centre: floor(center + 0.5) - size // 2."""
    return np.floor(center + 0.5).astype(np.int64) - size // 2


def read_centres(path: str, columns: tuple[str, str]) -> np.ndarray:
    """(n, 2) nucleus centres (x, y) of one nuclei file; CdclError naming the file."""
    try:
        table = pd.read_csv(path)
    except FileNotFoundError:
        raise CdclError(f"{path}: nuclei file not found") from None
    except Exception as e:
        raise CdclError(f"{path}: unreadable nuclei file ({type(e).__name__})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CdclError(
            f"{path}: no column {', '.join(missing)} (columns: {', '.join(map(str, table.columns[:8]))}); "
            "name the centre columns with --crop-columns X,Y"
        )
    return table[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)


class CropFields:
    """A crop = a square of a field of another source, cut at a given top-left pixel."""

    def __init__(
        self,
        base: FieldSource,
        field_of: np.ndarray,
        origins: np.ndarray,
        size: int,
        field_probes: list[Probe | Problem],
    ) -> None:
        self.base, self.field_of, self.origins, self.size = base, field_of, origins, size
        self.field_probes = field_probes
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.field_of)

    def probe(self, i: int) -> Probe | Problem:
        """The field's probe, as a crop: its problem, or S x S planes of its dtype."""
        p = self.field_probes[int(self.field_of[i])]
        if isinstance(p, Problem):
            return Problem(i, p.file, p.kind, p.reason)
        return Probe([(self.size, self.size)] * len(p.shapes), p.dtype)

    def load(self, i: int) -> list[np.ndarray]:
        """The planes of crop i (the last field read is kept for the next crop)."""
        f = int(self.field_of[i])
        if self._cache is None or self._cache[0] != f:
            self._cache = (f, self.base.load(f))
        x0, y0 = (int(v) for v in self.origins[i])
        s = self.size
        return [plane[y0 : y0 + s, x0 : x0 + s] for plane in self._cache[1]]

    def describe(self, i: int) -> str:
        """Field file and crop origin, for messages."""
        x0, y0 = self.origins[i]
        return f"{self.base.describe(int(self.field_of[i]))} (crop at x={x0}, y={y0})"  # type: ignore[attr-defined]

    def subset(self, rows: np.ndarray) -> CropFields:
        """Restrict to rows."""
        rows = np.asarray(rows, dtype=np.int64)
        return CropFields(
            self.base, self.field_of[rows], self.origins[rows], self.size, self.field_probes
        )


def _read_all(
    files: list[str], columns: tuple[str, str], skip_bad: bool
) -> tuple[list[np.ndarray], list[str]]:
    """Centres of every field (empty for a bad file when skipping) and notes."""
    centres, bad = [], []
    for path in files:
        try:
            centres.append(read_centres(path, columns))
        except CdclError as e:
            if not skip_bad:
                raise CdclError(f"--crops-from: {e}; fix the template or pass --skip-bad") from None
            bad.append(path)
            centres.append(np.empty((0, 2)))
    notes = []
    if bad:
        notes.append(
            f"--crops-from: {len(bad)} field(s) without a readable nuclei file left out "
            f"({', '.join(bad[:MAX_LISTED])}{', ...' if len(bad) > MAX_LISTED else ''})"
        )
    return centres, notes


def sample_per_well(crops: pd.DataFrame, per_well: int, seed: int) -> np.ndarray:
    """Mask of the crops kept by the per-well cap (see the module docstring)."""
    order = crops.sort_values(
        ["plate", "well", "site", "_field", NUCLEUS_INDEX], kind="stable"
    ).index.to_numpy()
    ordered = crops.loc[order]
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(crops), dtype=bool)
    for _, pos in ordered.groupby(["plate", "well"], sort=True).indices.items():
        members = order[pos]
        keep[members[rng.permutation(len(members))[:per_well]]] = True
    return keep


def _check_spec(spec: CropSpec) -> None:
    """A positive crop size and per-well cap."""
    if spec.size < 1:
        raise CdclError(f"--crop-size {spec.size}: must be a positive number of pixels")
    if spec.per_well is not None and spec.per_well < 1:
        raise CdclError(f"--crops-per-well {spec.per_well}: must be at least 1")


def _stack_nuclei(centres: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every nucleus of every field: its field, its row in the field's file, its centre."""
    none = [np.empty(0, dtype=np.int64)]
    field_of = np.concatenate(
        [np.full(len(c), f, dtype=np.int64) for f, c in enumerate(centres)] or none
    )
    index = np.concatenate([np.arange(len(c), dtype=np.int64) for c in centres] or none)
    xy = np.concatenate(centres or [np.empty((0, 2))])
    return field_of, index, xy


def _field_heights_widths(probes: list[Probe | Problem]) -> np.ndarray:
    """(fields, 2) height and width of each field (its smallest plane)."""
    big = np.iinfo(np.int64).max // 4
    return np.array(
        [
            (min(s[0] for s in p.shapes), min(s[1] for s in p.shapes))
            if isinstance(p, Probe)
            else (big, big)  # size unknown: the build reports the bad field
            for p in probes
        ],
        dtype=np.int64,
    ).reshape(-1, 2)


def _crop_table(
    samples: pd.DataFrame,
    field_of: np.ndarray,
    index: np.ndarray,
    xy: np.ndarray,
    origin: np.ndarray,
    fits: np.ndarray,
) -> pd.DataFrame:
    """One row per fitting crop: its field's metadata and the nucleus columns."""
    crops = samples.iloc[field_of[fits]].reset_index(drop=True)
    crops["_field"] = field_of[fits]
    crops[NUCLEUS_INDEX] = index[fits]
    crops[CENTER_X] = xy[fits, 0]
    crops[CENTER_Y] = xy[fits, 1]
    crops[CROP_X0] = origin[fits, 0]
    crops[CROP_Y0] = origin[fits, 1]
    return crops


def nucleus_crops(
    samples: pd.DataFrame,
    fields: FieldSource,
    nuclei_files: list[str],
    spec: CropSpec,
    *,
    workers: int = 1,
    skip_bad: bool = False,
) -> tuple[pd.DataFrame, CropFields, list[str]]:
    """One row per crop that fits in its field (field metadata + nucleus columns), its pixels, notes."""
    _check_spec(spec)
    centres, notes = _read_all(nuclei_files, spec.columns, skip_bad)
    probes = list(
        _parallel_map(_probe_task, list(range(len(fields))), workers, (fields, None, None))
    )
    field_of, index, xy = _stack_nuclei(centres)
    finite = np.isfinite(xy).all(axis=1)
    origin = crop_origin(np.where(finite[:, None], xy, 0.0), spec.size)
    hw = _field_heights_widths(probes)
    h, w = hw[field_of, 0], hw[field_of, 1]
    fits = (
        finite
        & (origin >= 0).all(axis=1)
        & (origin[:, 0] + spec.size <= w)
        & (origin[:, 1] + spec.size <= h)
    )
    if len(xy) and not fits.all():
        notes.append(
            f"{int((~fits).sum())} of {len(xy)} nuclei left out: their {spec.size} x {spec.size} "
            "crop would leave the field"
        )
    crops = _crop_table(samples, field_of, index, xy, origin, fits)
    if len(crops) == 0:
        raise CdclError(
            f"--crops-from: no {spec.size} x {spec.size} crop fits inside its field "
            f"({len(xy)} nuclei listed); check the nuclei files and --crop-size"
        )
    if spec.per_well is not None:
        keep = sample_per_well(crops, spec.per_well, spec.seed)
        notes.append(
            f"--crops-per-well {spec.per_well}: kept {int(keep.sum())} of {len(crops)} crops "
            f"(seed {spec.seed})"
        )
        crops = crops.loc[keep].reset_index(drop=True)
    source = CropFields(
        fields,
        crops["_field"].to_numpy(),
        crops[[CROP_X0, CROP_Y0]].to_numpy(),
        spec.size,
        probes,
    )
    return crops.drop(columns="_field"), source, notes
