"""A readable summary of a dataset directory (what `cdcl info` prints and `cdcl.info` returns)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdcl.errors import CdclError


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summarize(path: Path, deep: bool = False) -> str:
    """The text `cdcl info` prints; raises DatasetError when the directory is invalid."""
    from cdcl.data.dataset_dir import IMAGES_DIR, has_checksums, open_dataset, validate
    from cdcl.data.design import design_summary
    from cdcl.data.split_check import split_summary

    info = validate(path, deep=deep)
    ds = open_dataset(path, validate_on_open=False)
    s = ds.samples
    ctrl = s[s["is_control"]]
    lines = [
        f"dataset     {info.name}  (source: {info.source}, {path})",
        f"images      {len(s)}  ({info.image_size[0]}x{info.image_size[1]} px, {info.dtype})",
        f"channels    {len(info.channels)}: {', '.join(info.channels)}",
        f"batches     {s['batch'].nunique()}",
        f"plates      {s['plate'].nunique()}",
        f"wells       {s.groupby(['plate', 'well']).ngroups}",
        f"sites/well  {s.groupby(['plate', 'well']).size().median():g} (median)",
        f"treatments  {s.loc[~s['is_control'], 'treatment'].nunique()} (+ {ctrl['treatment'].nunique()} control)",
    ]
    if "moa" in s.columns and s["moa"].notna().any():
        lines.append(f"MoAs        {s.loc[~s['is_control'], 'moa'].dropna().nunique()}")
    per_plate = (
        ctrl.groupby("plate")["well"].nunique().reindex(sorted(s["plate"].unique()), fill_value=0)
    )
    lines.append(
        f"controls    {per_plate.min()}-{per_plate.max()} control wells per plate"
        + (
            ""
            if per_plate.min() > 0
            else f"  (plates without controls: {', '.join(per_plate[per_plate == 0].index)})"
        )
    )
    if "split" in s.columns:
        parts = s.groupby("split")["batch"].unique()
        lines.append(
            "split       " + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in parts.items())
        )
    try:
        lines.append(f"held out    {split_summary(s, default_split(ds))} (the default split)")
    except CdclError as e:  # e.g. a single batch: nothing can be held out
        lines.append(f"held out    none ({e})")
    lines.append(f"store       {_store_bytes(path / IMAGES_DIR) / 2**20:.1f} MiB in {IMAGES_DIR}")
    if has_checksums(ds.array):
        lines.append(
            "checksums   crc32c per image chunk, verified on every read"
            + (" (all verified)" if deep else "")
        )
    else:
        lines.append(
            "checksums   none (store written before chunk checksums): a changed byte may decode "
            "to wrong pixels unnoticed; rebuild the dataset to add them"
        )
    lines.append("")
    lines.append(design_summary(ds))
    lines.append("")
    lines.append(
        "validation  OK"
        + (" (every image decoded)" if deep else " (use --deep to decode every image)")
    )
    return "\n".join(lines)


def default_split(ds: Any) -> Any:
    """The split `cdcl train` uses without --split (the stored one, else fold 1)."""
    from cdcl.data.splits import assign_split

    return assign_split(ds.samples, ds.info.source, None)


def split_warnings(path: Path) -> list[str]:
    """Why the default split's held-out batches cannot be (fully) evaluated, with the fixes."""
    from cdcl.data.dataset_dir import open_dataset
    from cdcl.data.split_check import few_heldout_batches, heldout_problem

    ds = open_dataset(path, validate_on_open=False)
    try:
        split = default_split(ds)
    except CdclError:  # already said in the summary's `held out` line
        return []
    what = "the default split"
    # One warning: a fold with nothing to score first, else one with a single held-out batch.
    problem = heldout_problem(ds.samples, split, ds.info.source, what) or few_heldout_batches(
        ds.samples, split, ds.info.source, what
    )
    return [problem] if problem else []
