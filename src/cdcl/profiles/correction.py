"""Post-hoc batch correction of a profile matrix, given batch labels and a control mask.

These are the corrections a profiling scientist applies to any feature set after the fact, so
every learned representation is also scored after them (rows such as ``DINO+harmony``):

- ``sphering``: ZCA whitening fitted on the negative-control profiles and applied to all
  (Kessy, Lewin & Strimmer 2018, "Optimal whitening and decorrelation", Am Stat 72:309),
  regularised relative to the largest control eigenvalue; pycytominer's ``Spherize`` with
  ``method="ZCA"`` is available as ``sphering(..., convention="pycytominer")``;
- ``harmony``: Harmony (Korsunsky et al. 2019, Nat Methods 16:1289) on a PCA of the
  standardised profiles, through ``harmonypy`` 2.x;
- ``combat``: ComBat, the empirical-Bayes location/scale adjustment of Johnson, Li & Rabinovic
  (2007, Biostatistics 8:118), through ``scanpy.pp.combat``.

Arevalo et al. (2024, Nat Commun 15:6516) benchmarked ten such methods on JUMP Cell Painting
profiles; Harmony was among the top three in every scenario, and sphering and ComBat are the
simple baselines of that study. Their code ran ComBat with ``scanpy.pp.combat``, Harmony with
``harmonypy`` and sphering with pycytominer, so these rows are comparable with theirs.

Why scanpy for ComBat: it is maintained by scverse (regular releases), it is the
implementation Arevalo et al. used, and here it adds only scanpy itself (5 MB) and seaborn to
the environment (numba, anndata, statsmodels, umap-learn and the rest are already
dependencies). The alternatives: ``inmoose`` (the maintained successor of pyComBat) gives the
same corrected values on a 10,000 × 384 toy with 20 batches (largest difference 3e-4 on
values up to 8, the empirical-Bayes iterations' tolerance) but is a 33 MB install of ports of edgeR/DESeq2 plus fastcluster; ``neuroCombat`` and
``combat``/``pycombat`` on PyPI have had no release for years.

Harmony and ComBat are fitted on the profiles they correct, using only their batch labels
(transductive: every evaluated batch, held-out ones included, shapes the correction), unlike
CDCL, which is trained on the training batches and embeds held-out batches it never saw.
Sphering, like TVN, is fitted on the control profiles of all evaluated rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cdcl.errors import CdclError
from cdcl.profiles.columns import covariance_eigh

CORRECTIONS = ("sphering", "harmony", "combat")
# Added to every spanned control eigenvalue, as a fraction of the smallest spanned one: the
# controls keep variance >= 1 / (1 + 1e-3) in every direction they span (see sphering()).
SPHERING_EPSILON = 1e-3
HARMONY_COMPONENTS = 50
TRANSDUCTIVE_NOTE = (
    "Post-hoc corrections: +harmony and +combat are fitted on the evaluated profiles themselves "
    "(all rows, held-out batches included, using their batch labels), i.e. transductively, "
    "unlike CDCL, which never sees the held-out batches; +sphering is ZCA whitening fitted on "
    "the control profiles of all evaluated rows, as TVN."
)


def parse_corrections(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Correction names from ``"harmony,combat"`` (or a list); CdclError naming the valid ones."""
    if spec is None:
        return ()
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = tuple(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    bad = [n for n in names if n not in CORRECTIONS]
    if bad or not names:
        raise CdclError(
            f"--correct {','.join(bad) or repr(spec)}: unknown correction; choose from "
            f"{', '.join(CORRECTIONS)}"
        )
    return names


def sphering(
    features: np.ndarray,
    is_control: np.ndarray,
    *,
    epsilon: float = SPHERING_EPSILON,
    convention: str = "relative",
) -> np.ndarray:
    """ZCA whitening fitted on the control profiles and applied to every profile.

    With ``μ`` and ``Σ = U Λ Uᵀ`` the mean and covariance (n − 1 denominator) of the controls,
    each profile ``x`` becomes ``W (x − μ)`` with ``W = U D Uᵀ`` (ZCA: the whitening closest
    to the original coordinates, Kessy et al. 2018).

    ``convention="relative"`` (default): ``D = (Λ + ε)^(-1/2)`` on the ``r`` directions the
    controls span, ``ε = epsilon × λ_r`` (``epsilon`` = 1e-3, ``λ_r`` the smallest spanned
    eigenvalue), so the sphered controls have variance ``λ / (λ + ε)`` ≥ 0.999 in every
    spanned direction. Spanned = singular values of the centred controls above numpy's
    ``matrix_rank`` tolerance computed at the input's precision (``s_max · max(n, d) · eps``,
    eps of float32 for float32 profiles, whose rounding would otherwise pass for signal).
    Directions the controls do not span (fewer controls than features, as on a held-out
    plate) get the scale of the smallest spanned one, as pycytominer does. Why relative to
    ``λ_r``: measured on BBBC021's CellProfiler profiles (330 DMSO wells x 189 features) and
    the simulated screen's intensity statistics (96 x 50), control eigenvalues span 1.2e-7
    and 3.6e-7 of the largest while the controls have full rank; an ε relative to the mean
    (1e-2, the former rule) or to the largest eigenvalue (1e-6) exceeds the smallest ones
    and leaves the controls' variance at 0.48 / 0.43 and 0.89 / 0.89 on average.

    ``convention="pycytominer"``: pycytominer 1.7.1 ``Spherize(method="ZCA", center=True,
    epsilon=epsilon)`` (use ``epsilon=1e-6``, its default; ``ε`` absolute): ``ε`` is added to the singular
    values ``s`` of the centred controls, ``D = √(n − 1) / (s + ε)``, with the same fill for
    unspanned directions.

    ZCA and TVN's PCA whitening differ by the rotation ``U``, to which every metric of this
    package is invariant; their rows differ through the regulariser and TVN's truncation to
    ``n_controls − 1`` components.
    """
    if convention not in ("relative", "pycytominer"):
        raise ValueError(f"convention must be 'relative' or 'pycytominer', got {convention!r}")
    x = np.asarray(features, dtype=np.float64)
    ctrl = np.asarray(is_control, dtype=bool)
    if ctrl.sum() < 2:
        raise CdclError(f"sphering needs at least 2 control profiles, found {int(ctrl.sum())}")
    n_c, d = int(ctrl.sum()), x.shape[1]
    mean = x[ctrl].mean(axis=0)
    # SVD of the centred controls (not eigh of their covariance, which squares the condition
    # number and would make the null directions of a rank-deficient set look spanned).
    # full_matrices only when n_c <= d: then V must be completed to d directions.
    _, sing, vt = np.linalg.svd(x[ctrl] - mean, full_matrices=n_c <= d)
    if sing.size == 0 or sing[0] <= 0:
        raise CdclError("sphering: every control profile is identical; nothing to whiten with")
    src = np.asarray(features).dtype
    precision = np.finfo(src if np.issubdtype(src, np.floating) else np.float64).eps
    rank = int((sing > sing[0] * max(n_c, d) * precision).sum())
    if convention == "pycytominer":  # numpy's matrix_rank on the float64 copy, as pycytominer
        rank = int((sing > sing[0] * max(n_c, d) * np.finfo(np.float64).eps).sum())
    sing = np.concatenate([sing[:rank], np.repeat(sing[rank - 1], d - rank)])
    if convention == "relative":
        vals = sing**2 / (n_c - 1)
        scale = 1.0 / np.sqrt(vals + epsilon * float(vals[rank - 1]))
    else:
        scale = np.sqrt(n_c - 1) / (sing + epsilon)
    vecs = vt.T
    w = (vecs * scale[None, :]) @ vecs.T
    return ((x - mean) @ w).astype(np.float32)


def _check_batches(batch: np.ndarray, n: int, method: str, min_size: int) -> np.ndarray:
    """Batch labels as strings; CdclError for a length mismatch, one batch or tiny batches."""
    b = pd.Series(np.asarray(batch)).astype(str).to_numpy()
    if b.shape[0] != n:
        raise ValueError(f"{n} profiles but {b.shape[0]} batch labels")
    counts = pd.Series(b).value_counts()
    if len(counts) < 2:
        raise CdclError(f"{method} needs at least 2 batches, found {len(counts)}")
    small = counts[counts < min_size]
    if len(small):
        raise CdclError(
            f"{method} needs at least {min_size} profiles per batch; batch {small.index[0]!r} "
            f"has {int(small.iloc[0])} (merge it into another batch or drop it)"
        )
    return b


def default_nclust(n: int) -> int:
    """harmonypy's default number of clusters, min(N/30, 100) rounded, but at least 2."""
    return int(min(max(round(n / 30.0), 2), 100))


def harmony(
    features: np.ndarray,
    batch: np.ndarray,
    *,
    n_components: int | None = HARMONY_COMPONENTS,
    theta: float = 2.0,
    sigma: float = 0.1,
    nclust: int | None = None,
    tau: float = 0.0,
    block_size: float = 0.05,
    max_iter_harmony: int = 20,
    max_iter_kmeans: int = 4,
    epsilon_cluster: float = 1e-3,
    epsilon_harmony: float = 1e-2,
    alpha: float = 0.2,
    seed: int = 0,
    ncores: int = 0,
) -> np.ndarray:
    """Harmony (Korsunsky et al. 2019) on the first PCs of the standardised profiles.

    Each feature is standardised over all rows (mean 0, variance 1, so that no feature's unit
    dominates the PCA), the rows are projected on the top ``min(n_components, d, n − 1)``
    principal components (50, as scanpy's ``harmony_integrate`` and Seurat do; ``None`` keeps
    every component, a rotation of the full space), and Harmony iterates soft k-means
    clustering with a batch-diversity penalty (``theta``) and per-cluster linear removal of the
    batch effect (ridge penalty estimated from ``alpha``, harmonypy 2.x's default) until its
    objective changes by less than ``epsilon_harmony`` or ``max_iter_harmony`` rounds. The
    other arguments are harmonypy's defaults, passed explicitly; ``nclust`` defaults to
    :func:`default_nclust`. The output has ``k`` dimensions (the corrected PCs). Deterministic
    for a fixed ``seed`` (harmonypy's results do not depend on ``ncores``; 0 = one thread per
    physical core).
    """
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    b = _check_batches(batch, n, "Harmony", 1)
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    k = min(d, n - 1) if n_components is None else min(n_components, d, n - 1)
    mean, _, vecs = covariance_eigh(z)
    pcs = (z - mean) @ vecs[:, :k]
    clusters = default_nclust(n) if nclust is None else int(nclust)
    # Passed as k × n: harmonypy reads an array whose second axis has N entries as PCs × cells,
    # which is unambiguous even when n == k.
    import harmonypy  # imported here: scanpy and harmonypy take seconds to load

    result = harmonypy.run_harmony(
        np.ascontiguousarray(pcs.T),
        pd.DataFrame({"batch": b}),
        "batch",
        theta=theta,
        lamb=None,
        sigma=sigma,
        nclust=clusters,
        tau=tau,
        block_size=block_size,
        max_iter_harmony=max_iter_harmony,
        max_iter_kmeans=max_iter_kmeans,
        epsilon_cluster=epsilon_cluster,
        epsilon_harmony=epsilon_harmony,
        alpha=alpha,
        batch_prop_cutoff=1e-5,
        verbose=False,
        random_state=seed,
        ncores=ncores,
    )
    out = np.asarray(result.Z_corr)
    # harmonypy >= 0.1 (2.x pinned here) returns cells × dims; 0.0.x returned dims × cells.
    assert out.shape == (n, k), f"harmonypy Z_corr has shape {out.shape}, expected {(n, k)}"
    return out.astype(np.float32)


def combat(features: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """ComBat (Johnson et al. 2007): empirical-Bayes per-batch location and scale adjustment.

    Each feature is standardised with the pooled mean and variance; per batch, an additive
    shift ``γ`` and a multiplicative scale ``δ`` are estimated and shrunk towards priors shared
    by all features (normal for ``γ``, inverse gamma for ``δ``, parametric empirical Bayes),
    then removed: ``x* = (z − γ*) / √δ* `` mapped back to the feature's pooled scale, so every
    batch ends with the same mean and variance per feature. No covariates are protected
    (Arevalo et al.'s setting): a treatment confined to one batch is corrected away with it.
    Computed by ``scanpy.pp.combat``; features constant over all rows are returned unchanged.
    ComBat is affine per batch and feature, so where batches are whole plates, standardising
    each plate against its controls afterwards gives back the uncorrected plate-normalised
    profiles.
    """
    import anndata
    import scanpy

    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    b = _check_batches(batch, n, "ComBat", 2)
    out = x.copy()
    varying = x.std(axis=0) > 0
    if varying.any():
        adata = anndata.AnnData(np.ascontiguousarray(x[:, varying]))
        adata.obs["batch"] = pd.Categorical(b)
        # scanpy's convergence test divides by the previous estimate, which is exactly 0 for a
        # feature whose batch mean equals the pooled mean: a harmless divide-by-zero warning.
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, varying] = scanpy.pp.combat(adata, key="batch", inplace=False)
    if not np.isfinite(out).all():
        raise CdclError(
            "ComBat produced non-finite values (a feature constant within a batch?); "
            "drop constant features before correcting"
        )
    return out.astype(np.float32)


def apply_corrections(
    features: np.ndarray,
    batch: np.ndarray,
    is_control: np.ndarray,
    corrections: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Each named correction (``sphering``, ``harmony``, ``combat``) of one profile matrix.

    Returns ``{name: corrected (n, d') float32}`` in the order given; each correction starts
    from the uncorrected profiles (they are alternatives, not a chain). Deterministic for a
    fixed ``seed`` (only Harmony's k-means initialisation is random).
    """
    out: dict[str, np.ndarray] = {}
    for name in parse_corrections(list(corrections)):
        if name == "sphering":
            out[name] = sphering(features, is_control)
        elif name == "harmony":
            out[name] = harmony(features, batch, seed=seed)
        else:
            out[name] = combat(features, batch)
    return out


__all__ = [
    "CORRECTIONS",
    "SPHERING_EPSILON",
    "TRANSDUCTIVE_NOTE",
    "apply_corrections",
    "combat",
    "default_nclust",
    "harmony",
    "parse_corrections",
    "sphering",
]
