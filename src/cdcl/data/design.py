"""The experimental design of a dataset, as text for `cdcl info`."""

from __future__ import annotations

from typing import Any

import pandas as pd

MAX_ROWS = 12  # batches / plates listed before eliding
MAX_NAMES = 5  # treatment names listed per line


def _samples(dataset: Any) -> pd.DataFrame:
    return dataset if isinstance(dataset, pd.DataFrame) else dataset.samples


def _names(values: list[str]) -> str:
    head = ", ".join(values[:MAX_NAMES])
    return head + (f", ... (+{len(values) - MAX_NAMES})" if len(values) > MAX_NAMES else "")


def design_summary(dataset: Any) -> str:
    """Treatments per batch, controls per plate and which treatments pair across batches."""
    s = _samples(dataset)
    treated = s[~s["is_control"]]
    ctrl = s[s["is_control"]]
    lines = ["design"]

    lines.append("  treatments per batch (images, plates):")
    per_batch = (
        s.groupby("batch")
        .agg(images=("image", "size"), plates=("plate", "nunique"))
        .join(treated.groupby("batch")["treatment"].nunique().rename("treatments"))
        .join(ctrl.groupby("batch")["image"].size().rename("controls"))
        .fillna(0)
    )
    for b, r in list(per_batch.iterrows())[:MAX_ROWS]:
        lines.append(
            f"    {b}: {int(r.treatments)} treatments, {int(r.controls)} control images, "
            f"{int(r.images)} images on {int(r.plates)} plate(s)"
        )
    if len(per_batch) > MAX_ROWS:
        lines.append(f"    ... {len(per_batch) - MAX_ROWS} more batches")

    lines.append("  controls per plate (wells, images):")
    plates = sorted(s["plate"].astype(str).unique())
    cw = ctrl.groupby(ctrl["plate"].astype(str))["well"].nunique()
    ci = ctrl.groupby(ctrl["plate"].astype(str)).size()
    for p in plates[:MAX_ROWS]:
        n = int(cw.get(p, 0))
        note = "" if n else "  <- no controls: plate statistics use all its images"
        lines.append(f"    {p}: {n} wells, {int(ci.get(p, 0))} images{note}")
    if len(plates) > MAX_ROWS:
        missing = [p for p in plates[MAX_ROWS:] if int(cw.get(p, 0)) == 0]
        lines.append(
            f"    ... {len(plates) - MAX_ROWS} more plates"
            + (f" ({len(missing)} without controls)" if missing else "")
        )

    nb = treated.groupby("treatment")["batch"].nunique()
    paired = sorted(nb.index[nb >= 2].astype(str))
    single = sorted(nb.index[nb < 2].astype(str))
    lines.append("  cross-batch pairing:")
    lines.append(
        f"    {len(paired)} of {len(nb)} treatments appear in 2+ batches and can be paired"
        + (f" (median {nb[nb >= 2].median():g} batches each)" if paired else "")
    )
    if single:
        lines.append(
            f"    {len(single)} appear in one batch only (pair within their batch): {_names(single)}"
        )
    n_ctrl_batches = ctrl["batch"].nunique()
    lines.append(f"    controls appear in {n_ctrl_batches} of {s['batch'].nunique()} batches")
    if "moa" in s.columns and treated["moa"].notna().any():
        moa_n = treated.groupby("moa")["treatment"].nunique()
        lines.append(
            f"  MoAs: {len(moa_n)} ({int((moa_n >= 2).sum())} with 2+ treatments, usable for MoA matching); "
            f"{int(treated['moa'].isna().sum())} treated images without MoA"
        )
    if "compound" in s.columns and "dose" in s.columns and treated["dose"].notna().any():
        doses = treated.groupby("compound")["dose"].nunique()
        lines.append(f"  compounds: {len(doses)} ({int((doses > 1).sum())} at several doses)")
    return "\n".join(lines)
