"""Which metrics the evaluated profiles can support, and one line saying why when they cannot.

Each metric of :mod:`cdcl.metrics` needs a minimum design: kBET and the batch
silhouette need profiles from at least 2 batches, NSCB needs compounds measured in 2 batches,
replicate mAP needs replicates and controls, and so on. Checked before the metric runs, a
missing condition becomes a sentence that names the condition and what the data has, e.g.
``NSCB: needs treated profiles of >= 2 compounds in >= 2 batches; have 1 compound in 2 batches``,
instead of a scikit-learn exception or a silent empty cell.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cdcl.profiles.arrays import label_isin


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("ch") else f"{n} {word}s"


def unavailable(meta: pd.DataFrame, has_moa: bool) -> dict[str, str]:
    """Metric key -> why it cannot be computed on these profile rows (absent keys can be).

    Keys: ``kbet``, ``silhouette``, ``silhouette.treatment``, ``silhouette.moa``, ``grit``,
    ``map.replicate``, ``map.replicate_batch_aware``, ``map.moa``, ``map.moa_batch_aware``,
    ``moa_matching``, ``moa_matching.nscb``, ``batch_classifier``.
    """
    ctrl = meta["is_control"].to_numpy(bool)
    out = _batch_reasons(meta)
    treated = meta.loc[~ctrl]
    out.update(_treatment_reasons(treated, int(ctrl.sum())))
    if not has_moa:
        out.update(_no_moa_reasons(meta, treated))
        return out
    labelled = treated[treated["moa"].notna()]
    out.update(_moa_reasons(labelled))
    return out


def _batch_reasons(meta: pd.DataFrame) -> dict[str, str]:
    """Why kBET, the batch silhouette and the batch classifier cannot run (batch counts)."""
    out: dict[str, str] = {}
    n = len(meta)
    batch = meta["batch"].astype(str)
    n_batches = int(batch.nunique())
    have = f"have {_plural(n, 'profile')} in {_plural(n_batches, 'batch')}"
    if n < 3 or n_batches < 2:
        out["kbet"] = f"kBET: needs >= 3 profiles in >= 2 batches; {have}"
    if n_batches < 2 or n <= n_batches:
        out["silhouette"] = (
            f"batch silhouette: needs >= 2 batches and more profiles than batches; {have}"
        )
    smallest = int(batch.value_counts().min()) if n else 0
    if n_batches < 2 or smallest < 2:
        out["batch_classifier"] = (
            f"batch classifier: needs >= 2 profiles in each of >= 2 batches; {have} "
            f"(smallest batch: {smallest})"
        )
    return out


def _treatment_reasons(treated: pd.DataFrame, n_ctrl: int) -> dict[str, str]:
    """Why the treatment silhouette, GRIT and replicate mAP cannot run (treated rows)."""
    out: dict[str, str] = {}
    treat = treated["treatment"].astype(str)
    n_treat = int(treat.nunique())
    if not 2 <= n_treat <= len(treated) - 1:
        out["silhouette.treatment"] = (
            "treatment silhouette: needs >= 2 treatments and more treated profiles than "
            f"treatments; have {_plural(len(treated), 'treated profile')} of "
            f"{_plural(n_treat, 'treatment')}"
        )
    with_reps = int((treat.value_counts() >= 2).sum())
    if n_ctrl < 2 or with_reps == 0:
        out["grit"] = (
            "GRIT: needs >= 2 control profiles and a treatment with >= 2 replicate profiles; "
            f"have {n_ctrl} controls and {with_reps} such treatments"
        )
    if n_ctrl == 0 or with_reps == 0:
        out["map.replicate"] = (
            "replicate mAP: needs control profiles and a treatment with >= 2 replicate "
            f"profiles; have {n_ctrl} controls and {with_reps} such treatments"
        )
    across = int((treated.groupby(treat.to_numpy())["batch"].nunique() >= 2).sum())
    if n_ctrl == 0 or across == 0:
        out["map.replicate_batch_aware"] = (
            "replicate mAP, batch-aware: needs controls and a treatment present in >= 2 "
            f"batches; have {n_ctrl} controls and {across} such treatments"
        )
    return out


def _no_moa_reasons(meta: pd.DataFrame, treated: pd.DataFrame) -> dict[str, str]:
    """The MoA metrics' reasons when the profiles carry no usable MoA annotation."""
    reason = (
        "the profiles carry no MoA annotation (column `moa`)"
        if "moa" not in meta.columns
        else f"needs treated profiles with a MoA; have {int(treated['moa'].notna().sum())}"
    )
    out = {"moa_matching": f"NSC/NSCB: {reason}"}
    out["map.moa"] = out["map.moa_batch_aware"] = f"MoA mAP: {reason}"
    out["silhouette.moa"] = f"MoA silhouette: {reason}"
    return out


def _moa_reasons(labelled: pd.DataFrame) -> dict[str, str]:
    """Why NSC/NSCB, MoA mAP and the MoA silhouette cannot run (treated rows with a MoA)."""
    comp_col = "compound" if "compound" in labelled.columns else "treatment"
    n_comp = int(labelled[comp_col].astype(str).nunique())
    n_moa = int(labelled["moa"].astype(str).nunique())
    comp_per_moa = labelled.groupby(labelled["moa"].astype(str).to_numpy())[comp_col].nunique()
    moas_ok = int((comp_per_moa >= 2).sum())
    out = _matching_reasons(labelled, n_moa, n_comp, moas_ok)
    if n_moa < 2 or moas_ok == 0:
        out["map.moa"] = (
            "MoA mAP: needs >= 2 MoAs, one of them with >= 2 compounds; have "
            f"{_plural(n_moa, 'MoA')}, {moas_ok} with >= 2 compounds"
        )
        out["map.moa_batch_aware"] = out["map.moa"].replace("MoA mAP", "MoA mAP, batch-aware")
    moa_lab = labelled["moa"].astype(str)
    if not 2 <= int(moa_lab.nunique()) <= len(labelled) - 1:
        out["silhouette.moa"] = (
            "MoA silhouette: needs >= 2 MoAs and more profiles than MoAs; have "
            f"{_plural(len(labelled), 'profile')} of {_plural(n_moa, 'MoA')}"
        )
    return out


def _matching_reasons(
    labelled: pd.DataFrame, n_moa: int, n_comp: int, moas_ok: int
) -> dict[str, str]:
    """Why NSC/NSCB (``moa_matching``) or NSCB alone (``moa_matching.nscb``) cannot run."""
    if n_moa < 2 or n_comp < 2:
        return {
            "moa_matching": (
                "NSC/NSCB: needs treated profiles of >= 2 MoAs and >= 2 compounds; have "
                f"{_plural(n_moa, 'MoA')} and {_plural(n_comp, 'compound')}"
            )
        }
    if moas_ok == 0:
        # Every query's MoA has no other compound: no neighbour can match, NSC is 0 by design.
        return {
            "moa_matching": (
                "NSC/NSCB: not computable, because no MoA has a second compound (have "
                f"{_plural(n_moa, 'MoA')}, each with one compound): the nearest other compound "
                "can never share the query's MoA, so the score would be 0 whatever the profiles"
            )
        }
    comp_batches = int(labelled["batch"].astype(str).nunique())
    if comp_batches < 2:
        return {
            "moa_matching.nscb": (
                "NSCB: needs treated profiles of >= 2 compounds in >= 2 batches; have "
                f"{_plural(n_comp, 'compound')} in {_plural(comp_batches, 'batch')}"
            )
        }
    return {}


def classification_unavailable(
    meta: pd.DataFrame, train: np.ndarray, test: np.ndarray
) -> str | None:
    """Why the held-out treatment accuracy (logistic probe, kNN) cannot be computed, or None."""
    ctrl = meta["is_control"].to_numpy(bool)
    y = meta["treatment"].astype(str).to_numpy()
    tr, te = train & ~ctrl, test & ~ctrl
    if tr.sum() < 2 or te.sum() < 1 or np.unique(y[tr]).size < 2:
        return (
            "treatment accuracy (logistic, kNN): needs treated profiles of >= 2 treatments in "
            f"the training batches and some in the held-out batches; have {int(tr.sum())} "
            f"training ({np.unique(y[tr]).size} treatments) and {int(te.sum())} held-out"
        )
    known = label_isin(y[te], y[tr])
    if not known.any():
        return (
            "treatment accuracy (logistic, kNN): needs held-out treatments that the training "
            f"batches also carry; have 0 of {np.unique(y[te]).size}"
        )
    return None
