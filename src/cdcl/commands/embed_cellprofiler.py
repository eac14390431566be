"""`cdcl embed --features cellprofiler`: CellProfiler profiles of a dataset (no model needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdcl.embed.cellprofiler_features import (
    DEFAULT_FAMILIES,
    FAMILIES,
    NORMALIZATIONS,
    SEGMENTATIONS,
)


def add_cellprofiler_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--features cellprofiler` options of `cdcl embed`."""
    g = parser.add_argument_group("CellProfiler features (--features cellprofiler)")
    g.add_argument(
        "--features",
        choices=("cellprofiler",),
        help="hand-crafted features instead of a network: segment, measure every cell with "
        "cp-measure, median per well, normalise per plate against controls, select features",
    )
    g.add_argument(
        "--families",
        help=f"comma-separated cp-measure families out of {', '.join(FAMILIES)}, or all "
        f"(default {','.join(DEFAULT_FAMILIES)}: the cheapest, see docs/cellprofiler.md)",
    )
    g.add_argument(
        "--segmentation",
        choices=SEGMENTATIONS,
        default="auto",
        help="masks: the cell masks stored with the dataset (the simulated screen's); otsu: "
        "Otsu + watershed on the DNA channel; auto (default): masks when stored, else otsu",
    )
    g.add_argument(
        "--nucleus-diameter",
        type=float,
        help="typical nuclear diameter in px for otsu (default: estimated per image)",
    )
    g.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default="mad_robustize",
        help="per-plate normalisation against the controls, pycytominer's (default mad_robustize)",
    )
    g.add_argument(
        "--no-select",
        action="store_true",
        help="keep every feature (no pycytominer feature selection, missing values kept)",
    )


def run_cellprofiler(args: argparse.Namespace) -> int:
    """Measure (resumable), aggregate, normalise, select and write the profiles."""
    import shutil
    import time

    import numpy as np

    from cdcl.data.dataset_dir import open_dataset
    from cdcl.data.splits import assign_split
    from cdcl.embed.cellprofiler_features import (
        CHUNK_SIZE,
        CellProfilerOptions,
        parse_families,
        resolve_objects,
    )
    from cdcl.embed.to_file import output_path
    from cdcl.errors import CdclError
    from cdcl.locking import command_lock

    if args.features is None:
        args.features = "cellprofiler"
    if args.source not in (None, "cellprofiler"):
        raise CdclError(f"{args.source}: --features cellprofiler takes no run or checkpoint")
    if args.data is None:
        raise CdclError("--features cellprofiler needs --data DIR (the dataset to measure)")
    chunk = CHUNK_SIZE if args.chunk_size is None else args.chunk_size
    if chunk < 1:
        raise CdclError(f"--chunk-size {chunk}: use a positive number of images")
    workers = 1 if args.workers is None else args.workers
    if workers < 1:
        raise CdclError(f"--workers {workers}: CellProfiler needs at least 1 measuring process")
    options = CellProfilerOptions(
        families=parse_families(args.families),
        segmentation=args.segmentation,
        normalize=args.normalize,
        select=not args.no_select,
        nucleus_diameter=args.nucleus_diameter,
    )
    out = output_path(Path(args.out), args.format)
    ds = open_dataset(args.data)
    samples = ds.samples
    if args.split == "all":
        idx = np.arange(len(samples))
    else:
        if args.split not in ("train", "val", "test"):
            raise CdclError(f"--split {args.split}: use all, train, val or test")
        split = assign_split(samples, ds.info.source, args.split_number)
        idx = np.flatnonzero((split == args.split).to_numpy())
        if len(idx) == 0:
            raise CdclError(f"--split {args.split}: no images in that part of the split")
    resolve_objects(ds, options.segmentation)  # no masks where asked for: say so before any work
    # Heavy imports (torch through the profile writers, pycytominer) only once the input is good.
    from cdcl.embed.cellprofiler import cellprofiler_profiles, write_named_profiles
    from cdcl.profiles.table import image_meta

    meta = image_meta(samples, idx)
    work = out.parent / f".{out.name}.cellprofiler"
    key = f"{Path(ds.path).resolve()}|{_fingerprint(ds)}|{args.split}|{args.split_number}"
    with command_lock(out, "cdcl embed --features cellprofiler"):
        t0 = time.perf_counter()
        res, _job = cellprofiler_profiles(
            ds,
            idx,
            meta,
            level=args.level,
            options=options,
            work_dir=work,
            key=key,
            chunk_size=chunk,
            workers=workers,
            progress=not args.no_progress,
        )
        cost = res.info["measured_now"]
        if cost["fields"]:
            per_field = 1000 * cost["seconds"] / cost["fields"]
            per_obj = 1000 * cost["seconds"] / max(cost["objects"], 1)
            print(
                f"measured {cost['fields']} fields ({cost['objects']} objects) in "
                f"{cost['seconds']:.1f} s: {per_field:.0f} ms per field, {per_obj:.1f} ms per "
                f"object ({', '.join(options.families)}; segmentation {res.info['segmentation']})"
            )
        wall = round(time.perf_counter() - t0, 2)
        prov = {"source": res.info, "data": key, "split": args.split, "wall_s": wall}
        path = write_named_profiles(res.features, res.meta, res.names, out, prov)
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{len(res.features)} {args.level} profiles x {len(res.names)} CellProfiler features "
        f"(kept of {res.info['features_measured']} measured) -> {path}"
    )
    return 0


def _fingerprint(ds: object) -> str:
    """A short hash of the dataset's small metadata files (a rebuilt dataset is measured anew)."""
    import hashlib

    from cdcl.data.dataset_dir import INFO_FILE, SAMPLES_FILE

    h = hashlib.sha256()
    for name in (INFO_FILE, SAMPLES_FILE):
        h.update((ds.path / name).read_bytes())
    return h.hexdigest()[:16]
