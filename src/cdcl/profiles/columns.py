"""Profile tables: metadata resolution, per-plate standardisation (against controls) and TVN.

Internally every profile set is ``(features float32 (n, d), meta DataFrame)`` where ``meta`` has
the canonical columns ``plate, well, batch, treatment, compound, moa, is_control`` (``compound``
and ``moa`` may be missing). :meth:`ColumnSpec.resolve` maps an arbitrary ``Metadata_*`` table
(CellProfiler, pycytominer, our own exports) onto those names.

TVN (typical variation normalisation; Ando et al., "Improving phenotypic measurements in
high-content imaging screens", bioRxiv 2017): the embedding is PCA-whitened with the
covariance of the negative-control profiles, so that directions along which controls vary
(plate, batch, staining noise) are shrunk and the remaining treatment signal is on a common
scale. The optional CORAL step (Sun et al., AAAI 2016) then whitens each batch with the
covariance of that batch's own controls (after the global whitening the target covariance is
the identity), aligning the second-order statistics of the batches.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from cdcl.data.columns import control_mask, find_column
from cdcl.errors import CdclError
from cdcl.profiles.arrays import _codes, _features, _labels
from cdcl.profiles.table import PAIRING_BATCH

CANONICAL = ("plate", "well", "batch", "treatment", "compound", "moa", "is_control")

# Each canonical field read from a column: its option, the columns tried when the option is not
# given, and whether a table must have one. Looked up in this order, so errors come in it too.
COLUMN_LOOKUP: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("plate", "--plate-col", ("Metadata_plate",), False),
    ("well", "--well-col", ("Metadata_well",), False),
    # A cdcl export whose own Metadata_Batch differs from the batch the run paired across keeps
    # the latter as Metadata_Pairing_Batch: the default judges by what the run paired.
    ("batch", "--batch-col", (PAIRING_BATCH, "Metadata_batch"), False),
    (
        "treatment",
        "--treatment-col",
        ("Metadata_treatment", "Metadata_pert_iname", "Metadata_broad_sample", "Metadata_compound"),
        True,
    ),
    ("compound", "--compound-col", ("Metadata_compound", "Metadata_pert_iname"), False),
    ("moa", "--moa-col", ("Metadata_moa", "Metadata_MoA", "Metadata_mechanism"), False),
)


def _locate(
    columns: list[str], spec: str | None, defaults: tuple[str, ...], option: str, required: bool
) -> list[str] | None:
    """The columns a field is read from: the user's (``A`` or ``A,B``) or the first default."""
    if spec:
        found = []
        for p in (p.strip() for p in spec.split(",")):
            if not p:
                continue
            c = find_column(columns, p) or find_column(columns, f"Metadata_{p}")
            if c is None:
                meta_cols = [x for x in columns if x.startswith("Metadata_")]
                if not meta_cols:
                    raise CdclError(
                        f"{option} {p}: no such column, and the table has no Metadata_* "
                        "columns to name; check that it is a profile table"
                    )
                raise CdclError(
                    f"{option} {p}: no such column; metadata columns are "
                    f"{', '.join(meta_cols)}; name one of them with {option}"
                )
            found.append(c)
        return found
    for d in defaults:
        c = find_column(columns, d)
        if c is not None:
            return [c]
    if required:
        raise CdclError(
            f"no {option.lstrip('-').replace('-col', '')} column found (looked for "
            f"{', '.join(defaults)}); name one with {option}"
        )
    return None


def _read(table: pd.DataFrame, found: list[str] | None) -> pd.Series | None:
    """The values of a located field: one column, or several joined with ``@`` per row."""
    if found is None:
        return None
    if len(found) == 1:
        return table[found[0]]
    return table[found].astype(str).agg("@".join, axis=1)


def _as_str(s: pd.Series) -> pd.Series:
    return s.astype(object).where(s.notna(), None).map(lambda v: None if v is None else str(v))


def judged_by(meta: pd.DataFrame, column: str) -> pd.DataFrame:
    """``meta`` whose ``batch`` (what mixing is judged by) is another metadata column's values.

    ``column`` is matched ignoring case, with or without ``Metadata_``; it must be known for
    every profile (per-well columns that vary between a well's images are not carried).
    """
    cols = [str(c) for c in meta.columns]
    # The input's own column first: `batch` means Metadata_Batch, not the pairing batch.
    found = find_column(cols, f"Metadata_{column}") or find_column(cols, column)
    if found is None:
        carried = [c for c in cols if c.startswith("Metadata_")]
        raise CdclError(
            f"--batch-col {column}: no such column among the profiles' metadata (have "
            f"{', '.join(carried) or 'none'}); a column that varies within a well is not "
            "carried into well profiles"
        )
    values = _as_str(meta[found])
    if values.isna().any():
        raise CdclError(f"--batch-col {column}: empty for {int(values.isna().sum())} profiles")
    out = meta.copy()
    out["pairing_batch"] = out["batch"]  # the held-out split still follows the run's batches
    out["batch"] = values.to_numpy()
    return out


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns of a ``Metadata_*`` profile table hold what; None = found by convention.

    What ``cdcl evaluate --features`` and ``cdcl.evaluate`` (and ``cdcl.correct``) take as
    ``--batch-col`` ... ``--control-query``: both build one ColumnSpec, so a table is read the
    same way by either. A ``*_col`` names a column exactly, ignoring case, or without its
    ``Metadata_`` prefix; ``treatment_col="A,B"`` joins several (e.g. compound and
    concentration). ``batch_pattern`` is a regular expression whose first group is taken from
    the batch column's values (``^(Week\\d+)`` turns BBBC021 plates into imaging weeks).
    ``control_query`` selects the negative controls (:mod:`cdcl.data.query`); without one,
    :func:`cdcl.data.columns.control_mask`'s conventions apply.
    """

    batch_col: str | None = None
    batch_pattern: str | None = None
    treatment_col: str | None = None
    compound_col: str | None = None
    moa_col: str | None = None
    plate_col: str | None = None
    well_col: str | None = None
    control_query: str | None = None

    def validate(self, columns: Sequence[str]) -> dict[str, list[str] | None]:
        """The columns each field is read from; a CdclError naming the option and the fix if not.

        Checks what needs no values: every named column exists (a treatment column is found
        too), and ``batch_pattern`` is a regular expression with a group.
        """
        cols = [str(c) for c in columns]
        found: dict[str, list[str] | None] = {}
        for name, option, defaults, required in COLUMN_LOOKUP:
            found[name] = _locate(cols, getattr(self, f"{name}_col"), defaults, option, required)
            if name == "batch" and self.batch_pattern:
                # Checked here so that errors keep their order: after the batch column's.
                _batch_regex(self.batch_pattern)
        return found

    def resolve(self, table: pd.DataFrame) -> pd.DataFrame:
        """Canonical metadata (see module doc) of a ``Metadata_*`` table; CdclError on bad input.

        The batch defaults to ``Metadata_Pairing_Batch`` (a cdcl export's pairing batch),
        ``Metadata_batch`` and then to the plate. Controls come from ``control_query``, else
        pycytominer's ``Metadata_control_type == "negcon"``, else a boolean
        ``Metadata_is_control`` column, else treatments/compounds named like DMSO
        (:data:`cdcl.data.columns.CONTROL_NAMES`).
        """
        t = table.reset_index(drop=True)
        found = self.validate(list(t.columns))
        out = pd.DataFrame(index=t.index)
        plate = _read(t, found["plate"])
        well = _read(t, found["well"])
        out["plate"] = _as_str(plate) if plate is not None else "plate0"
        out["well"] = _as_str(well) if well is not None else [str(i) for i in range(len(t))]
        batch = _read(t, found["batch"])
        out["batch"] = _as_str(batch) if batch is not None else out["plate"]
        if self.batch_pattern:
            out["batch"] = apply_batch_pattern(out["batch"], self.batch_pattern)
        treatment = _read(t, found["treatment"])
        assert treatment is not None  # required: validate refuses a table without one
        out["treatment"] = _as_str(treatment)
        for name in ("compound", "moa"):
            values = _read(t, found[name])
            if values is not None:
                out[name] = _as_str(values)
        out["is_control"] = control_mask(
            t, self.control_query, names=(out["treatment"], out.get("compound"))
        )
        for col in ("batch", "treatment"):
            missing = out[col].isna().to_numpy()
            if missing.any():
                raise CdclError(
                    f"profile table: `{col}` is empty in row {int(np.flatnonzero(missing)[0])}; "
                    "fill it or choose another column"
                )
        return out


def _batch_regex(pattern: str) -> re.Pattern[str]:
    """``--batch-pattern`` compiled; refused when invalid or without a group."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise CdclError(f"--batch-pattern {pattern!r}: invalid regular expression ({e})") from None
    if rx.groups == 0:
        raise CdclError(
            f"--batch-pattern {pattern!r}: the expression has no group; put the part of the "
            "value that names the batch in parentheses, e.g. '^(Week\\d+)' takes Week1 from "
            "Week1_22123"
        )
    return rx


def apply_batch_pattern(batch: pd.Series, pattern: str) -> pd.Series:
    """Each batch value replaced by the first group of ``pattern`` found in it (``--batch-pattern``).

    Refused in one line: an invalid expression, one without a group (``B0`` would turn B01, B02
    ... into the one batch "B0"), one that matches no value, and one that merges every batch
    into one. Values it does not match are kept as they are.
    """
    rx = _batch_regex(pattern)
    found = batch.map(lambda v: None if v is None else rx.search(v))
    if found.isna().all():
        first = next((v for v in batch if v is not None), None)
        raise CdclError(
            f"--batch-pattern {pattern!r}: matches none of the batch values (e.g. {first!r})"
        )
    picked = [v if m is None or m.group(1) is None else m.group(1) for v, m in zip(batch, found)]
    out = pd.Series(picked, index=batch.index, dtype=object)
    before = batch.dropna().unique()
    if len(before) > 1 and out.dropna().nunique() == 1:
        shown = ", ".join(map(str, before[:3])) + (", ..." if len(before) > 3 else "")
        raise CdclError(
            f"--batch-pattern {pattern!r}: turns all {len(before)} batch values ({shown}) into "
            f"the one batch {out.dropna().iloc[0]!r}; its first group should capture the part "
            "that differs between batches"
        )
    return out


def _is_constant(var: np.ndarray, mean: np.ndarray, n: int) -> np.ndarray:
    """Features indistinguishable from a constant (scikit-learn's ``StandardScaler`` rule).

    A variance below the rounding error of the two-pass algorithm (Chan, Golub & LeVeque),
    ``n eps var + (n mean eps)^2``, is zero for practical purposes.
    """
    eps = np.finfo(np.float64).eps
    return var <= n * eps * var + (n * mean * eps) ** 2


def standardize_per_plate(
    features: ArrayLike,
    plates: ArrayLike,
    is_control: ArrayLike,
    *,
    robust: bool = False,
    info: dict[str, Any] | None = None,
) -> np.ndarray:
    """Standardise each plate against its own negative controls (pycytominer's conventions).

    For every plate: ``(x - mean_c) / std_c`` where mean/std (ddof=0) are those of the plate's
    control rows, per feature: pycytominer ``normalize(method="standardize",
    samples=<controls>)`` applied plate by plate, i.e. scikit-learn's ``StandardScaler``. A
    feature whose controls do not vary on the plate (variance within rounding error of 0,
    scikit-learn's rule) gets scale 1: it is centred, not blown up. ``robust=True`` is
    pycytominer's ``mad_robustize``: ``(x - median_c) / (1.4826 MAD_c)``, MAD the median
    absolute deviation; where the controls' MAD is 0 the scale is 1 as well (pycytominer
    divides by its ``mad_robustize_epsilon``, 1e-18, there, which sends such a feature to
    about 1e18). A plate without control rows falls back to all its rows, with a
    ``warnings.warn`` naming the plate (never an error).

    ``info``: when given, receives ``zero_scale_pairs`` (plate x feature pairs that got scale
    1) and ``zero_scale_plates`` (plates with at least one).

    Returns:
        float32 array of the same shape as ``features``.
    """
    x = _features(features)
    n = x.shape[0]
    plate = _labels(plates, n, "plates")
    ctrl = np.asarray(is_control, dtype=bool)
    if ctrl.shape != (n,):
        raise ValueError(f"is_control must have {n} entries, got shape {ctrl.shape}")
    codes, uniq = _codes(plate, "plates")
    out = np.empty(x.shape, dtype=np.float32)
    zero_pairs = 0
    zero_plates = 0
    for p in range(uniq.size):
        rows = np.flatnonzero(codes == p)
        block = np.asarray(x[rows], dtype=np.float64)
        ref_mask = ctrl[rows]
        if not ref_mask.any():
            warnings.warn(
                f"plate {uniq[p]!r} has no control rows: standardised against all its "
                f"{rows.size} rows instead",
                stacklevel=2,
            )
            ref_mask = np.ones(rows.size, dtype=bool)
        ref = block[ref_mask]
        if robust:
            centre = np.median(ref, axis=0)
            scale = 1.4826 * np.median(np.abs(ref - centre), axis=0)
            zero = scale == 0
        else:
            centre = ref.mean(axis=0)
            var = ref.var(axis=0)
            zero = _is_constant(var, centre, ref.shape[0])
            scale = np.sqrt(var)
        scale = np.where(zero, 1.0, scale)
        zero_pairs += int(zero.sum())
        zero_plates += int(zero.any())
        out[rows] = ((block - centre) / scale).astype(np.float32)
    if info is not None:
        info["zero_scale_pairs"] = zero_pairs
        info["zero_scale_plates"] = zero_plates
    return out


ZERO_SCALE_NOTE = (
    "features whose control wells do not vary on a plate get scale 1 (centred only), "
    "pycytominer's and scikit-learn's convention"
)


def plate_normalize(
    features: np.ndarray,
    meta: pd.DataFrame,
    robust: bool = False,
    info: dict[str, Any] | None = None,
) -> np.ndarray:
    """Standardise each plate's profiles against that plate's control profiles.

    ``info`` receives the counts of :func:`standardize_per_plate` and a ``note`` stating the
    zero-variance convention.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plates without controls fall back to all rows
        out = standardize_per_plate(
            features,
            meta["plate"].astype(str).to_numpy(),
            meta["is_control"].to_numpy(bool),
            robust=robust,
            info=info,
        )
    if info is not None:
        info["note"] = ZERO_SCALE_NOTE
    return out


def covariance_eigh(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, eigenvalues (descending, >= 0) and eigenvectors (d, d) of the covariance of rows x.

    Each eigenvector's sign is fixed (largest-magnitude entry positive), so transforms built
    from it (TVN, sphering, the PCA before Harmony) do not depend on the LAPACK build.
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.maximum(vals[order], 0.0), vecs[:, order]
    if vecs.size:
        pivot = vecs[np.abs(vecs).argmax(axis=0), np.arange(vecs.shape[1])]
        vecs = vecs * np.where(pivot < 0, -1.0, 1.0)[None, :]
    return mean, vals, vecs


def _whitener(x: np.ndarray, eps: float, max_components: int | None = None) -> tuple[Any, Any]:
    """Mean and whitening matrix (d, k) of rows x: PCA with eigenvalues floored at eps*max."""
    mean, vals, vecs = covariance_eigh(x)
    if max_components is not None:
        vals, vecs = vals[:max_components], vecs[:, :max_components]
    floor = eps * max(float(vals[0]), 1e-12) if vals.size else eps
    return mean, vecs / np.sqrt(np.maximum(vals, floor))[None, :]


def tvn(
    features: np.ndarray,
    meta: pd.DataFrame,
    *,
    coral: bool = False,
    eps: float = 1e-2,
    coral_shrinkage: float = 0.1,
    fit_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Typical variation normalisation: PCA-whiten all profiles with the controls' covariance.

    ``fit_mask`` restricts the control rows the transform is fitted on (default: every control;
    controls carry no treatment label, so using those of held-out batches leaks nothing).
    Eigenvalues below ``eps`` times the largest are floored (so noise directions are not blown
    up); the output keeps ``min(d, n_controls - 1)`` components. With ``coral=True`` each batch
    is then re-whitened with its own controls' covariance, shrunk towards the identity by
    ``coral_shrinkage`` (few controls per batch give a singular covariance).
    """
    x = np.asarray(features, dtype=np.float64)
    ctrl = meta["is_control"].to_numpy(bool)
    if fit_mask is not None:
        ctrl = ctrl & np.asarray(fit_mask, bool)
    if ctrl.sum() < 3:
        raise CdclError(f"TVN needs at least 3 control profiles, found {int(ctrl.sum())}")
    k = min(x.shape[1], int(ctrl.sum()) - 1)
    mean, w = _whitener(x[ctrl], eps, max_components=k)
    out = (x - mean) @ w
    if coral:
        batch = meta["batch"].astype(str).to_numpy()
        for b in np.unique(batch):
            rows = batch == b
            c_rows = rows & ctrl
            if c_rows.sum() < 2:
                continue  # too few controls to estimate this batch's covariance: leave as is
            xc = out[c_rows]
            mu = xc.mean(axis=0)
            cov = np.cov(xc, rowvar=False).reshape(out.shape[1], out.shape[1])
            cov = (1 - coral_shrinkage) * cov + coral_shrinkage * np.eye(out.shape[1])
            vals, vecs = np.linalg.eigh(cov)
            inv_sqrt = vecs @ np.diag(1.0 / np.sqrt(np.maximum(vals, 1e-6))) @ vecs.T
            out[rows] = (out[rows] - mu) @ inv_sqrt
    return out.astype(np.float32)
