"""Benchmark: CellProfiler features (cp-measure) per object and per field, by feature family.

Run: ``.venv/bin/python benchmarks/bench_cellprofiler.py [--fields 16] [--crops 24]``.
Prints figures (nothing is asserted). Three kinds of field, each with its own objects:

- ``small``: fields of the simulated ``small`` screen (64 px, 5 channels), with the cell and
  nucleus masks the simulator exports;
- ``bbbc021``: BBBC021 single-cell crops (68 px, 3 channels), Otsu + watershed segmentation;
- ``cellpainting``: one real Cell Painting field (1080 px; DNA, ER, AGP), Otsu + watershed.

For every family the time of measuring every object type of a field (cells and nuclei) is
summed over the fields, after one warm-up call; channel families are measured on every channel,
shape families once per object type. Each family's time is also given as a multiple of the
intensity family's in the same run (ratios are stable under load; absolute times are not).
The last lines give the segmentation time and the default families' cost per field, and what
the default would cost on the demo's screen (2016 fields).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

from cdcl.data import synthetic
from cdcl.data.segmentation import segment_field
from cdcl.embed.cellprofiler_features import DEFAULT_FAMILIES, FAMILIES, measure_objects, relabel

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def small_fields(n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The first ``n`` fields of the small screen and their exported masks."""
    images, masks = synthetic.render_masks("small", 0, np.arange(n))
    return list(images), list(masks), list(synthetic.CHANNELS)


def bbbc021_fields(n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]] | None:
    """``n`` BBBC021 crops spread over the subset, segmented with Otsu + watershed."""
    path = SHARED / "bbbc021_week4_singlecell" / "cells_subset.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        crops = z["images"]
    crops = np.moveaxis(crops[:: max(1, len(crops) // n)][:n], -1, 1)
    channels = ["DNA", "Actin", "Tubulin"]
    return list(crops), [segment_field(c, channels) for c in crops], channels


def cellpainting_field() -> tuple[list[np.ndarray], list[np.ndarray], list[str]] | None:
    """The pediatric-cancer-atlas Cell Painting field (DNA, ER, AGP), Otsu + watershed."""
    from PIL import Image

    folder = SHARED / "cellpainting_fovs" / "pediatric_cancer_atlas_profiling" / "images" / "orig"
    if not folder.is_dir():
        return None
    channels = {"DNA": 5, "ER": 2, "AGP": 3}
    image = np.stack(
        [
            np.asarray(Image.open(folder / f"r03c03f03p01-ch{k}sk1fk1fl1.tiff"))
            for k in channels.values()
        ]
    )
    return [image], [segment_field(image, list(channels))], list(channels)


def time_family(
    family: str, images: list[np.ndarray], masks: list[np.ndarray], channels: list[str]
) -> float:
    """Seconds to measure ``family`` on every object type of every field."""
    total = 0.0
    for image, mask in zip(images, masks):
        pixels = image.astype(np.float64) / np.iinfo(image.dtype).max
        for m in mask:
            labels = relabel(m)
            t = time.perf_counter()
            measure_objects(labels, pixels, channels, (family,))
            total += time.perf_counter() - t
    return total


def report(name: str, data: tuple | None, families: list[str]) -> None:
    """Print one table: per family, ms per object, per field and as a multiple of intensity."""
    if data is None:
        print(f"\n{name}: data not found, skipped")
        return
    images, masks, channels = data
    n_fields = len(images)
    n_objects = int(sum(int(relabel(m).max()) for mask in masks for m in mask))
    h, w = images[0].shape[1:]
    print(
        f"\n{name}: {n_fields} fields of {h}x{w} px, {len(channels)} channels, "
        f"{n_objects} objects (cells + nuclei), {n_objects / n_fields:.1f} per field"
    )
    # warm-up: first calls import and compile
    time_family("intensity", images[:1], masks[:1], channels[:1])
    for fam in families:
        time_family(fam, images[:1], masks[:1], channels[:1])
    t0 = time.perf_counter()
    for image in images:
        segment_field(image, channels)
    seg = time.perf_counter() - t0
    times = {fam: time_family(fam, images, masks, channels) for fam in families}
    base = times.get("intensity") or 1.0
    print(f"{'family':22s} {'ms/object':>10s} {'ms/field':>10s} {'x intensity':>12s}  kind")
    for fam, t in times.items():
        kind = "per channel" if FAMILIES[fam][0] else "shape, once"
        print(
            f"{fam:22s} {1000 * t / n_objects:10.2f} {1000 * t / n_fields:10.1f} "
            f"{t / base:12.2f}  {kind}"
        )
    default = sum(times[f] for f in DEFAULT_FAMILIES if f in times)
    print(
        f"default families ({','.join(DEFAULT_FAMILIES)}): {1000 * default / n_fields:.0f} ms "
        f"per field, {1000 * default / n_objects:.1f} ms per object; all families "
        f"{1000 * sum(times.values()) / n_fields:.0f} ms per field"
    )
    print(f"Otsu + watershed segmentation: {1000 * seg / n_fields:.1f} ms per field")
    if name == "small":
        print(
            f"the demo's screen (2016 fields): {2016 * default / n_fields / 60:.1f} min with the "
            f"default families on one core, {2016 * sum(times.values()) / n_fields / 60:.1f} min "
            "with all"
        )


def main() -> None:
    """Parse options and print the three tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=16, help="small-screen fields to measure")
    ap.add_argument("--crops", type=int, default=24, help="BBBC021 crops to measure")
    ap.add_argument("--families", default=",".join(FAMILIES), help="families to time")
    ap.add_argument("--skip-cellpainting", action="store_true", help="skip the 1080-px field")
    args = ap.parse_args()
    families = [f for f in args.families.split(",") if f]
    warnings.simplefilter("ignore")
    report("small", small_fields(args.fields), families)
    report("bbbc021", bbbc021_fields(args.crops), families)
    if not args.skip_cellpainting:
        report("cellpainting", cellpainting_field(), families)


if __name__ == "__main__":
    main()
