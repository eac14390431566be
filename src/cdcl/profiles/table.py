"""Profile tables: well profiles, and export as Parquet / AnnData / CSV and back.

Exported tables follow the profiling conventions of pycytominer and copairs: metadata columns
are ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``, ``Metadata_Batch``, ... and the
features are named ``Cells_Embedding_0000`` onwards. pycytominer infers features by their
compartment prefix (``Cells_``, ``Nuclei_``, ``Cytoplasm_``), so ``aggregate``, ``normalize`` and
``feature_select`` find them with their default arguments. AnnData files keep the features in
``X`` (and ``obsm["X_cdcl"]``), the metadata in ``obs`` (named ``<plate>_<well>[_<site>]``),
the feature names in ``var`` and the provenance in ``uns["cdcl"]``. Older exports
(``Metadata_plate``, ``f0`` ...) are still read.

This module does not import torch (embedding lives in :mod:`cdcl.embed.inference`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cdcl.atomic import atomic_path
from cdcl.errors import CdclError
from cdcl.parquet import read_parquet, write_parquet
from cdcl.profiles.checks import check_column_names, check_feature_values, sniff_csv

if TYPE_CHECKING:  # anndata takes a second to import; only .h5ad files need it
    import anndata as ad

# Metadata carried from samples.parquet into profiles, in export order.
META_COLUMNS = (
    "plate",
    "well",
    "site",
    "batch",
    "treatment",
    "moa",
    "compound",
    "dose",
    "is_control",
    "cell_type",
    "split",
)
METADATA_PREFIX = "Metadata_"
# The batch a run paired across, exported under this name when the input table's own
# Metadata_Batch (e.g. the acquisition batch of a screen paired by plate) holds other values.
PAIRING_BATCH = "Metadata_Pairing_Batch"
OBSM_KEY = "X_cdcl"
UNS_KEY = "cdcl"
FEATURE_PREFIX = "Cells_Embedding_"  # a compartment prefix pycytominer's infer_cp_features finds
# Exported names of the metadata columns (pycytominer / CellProfiler capitalisation).
EXPORT_NAMES = {
    "image": "Metadata_Image",
    "plate": "Metadata_Plate",
    "well": "Metadata_Well",
    "site": "Metadata_Site",
    "batch": "Metadata_Batch",
    "treatment": "Metadata_Treatment",
    "moa": "Metadata_MoA",
    "compound": "Metadata_Compound",
    "dose": "Metadata_Dose",
    "is_control": "Metadata_Is_Control",
    "cell_type": "Metadata_Cell_Type",
    "split": "Metadata_Split",
    "n_sites": "Metadata_N_Sites",
}


def carried_columns(columns: Any) -> list[str]:
    """The input table's own ``Metadata_*`` columns, carried into every profile."""
    return [str(c) for c in columns if str(c).startswith(METADATA_PREFIX)]


def image_meta(samples: pd.DataFrame, indices: np.ndarray | None = None) -> pd.DataFrame:
    """Metadata rows of the given images, in that order: ``image``, the known metadata columns
    and every ``Metadata_*`` column of the input table (samples.parquet keeps them)."""
    s = samples if indices is None else samples.iloc[np.asarray(indices)]
    cols = ["image"] + [c for c in META_COLUMNS if c in s.columns]
    return s[cols + carried_columns(s.columns)].reset_index(drop=True)


def constant_within(meta: pd.DataFrame, codes: np.ndarray, columns: list[str]) -> list[str]:
    """The ``columns`` whose value is the same for every row of each group (``codes``)."""
    if not columns:
        return []
    # Missing values count as one value: a column empty for a whole well is still constant.
    filled = meta[columns].astype(object).where(meta[columns].notna(), "\x00<NA>")
    n = filled.astype(str).groupby(codes).nunique()
    return [c for c in columns if bool((n[c] <= 1).all())]


class WellAccumulator:
    """Streaming mean over sites per (plate, well): float64 group sums and counts.

    Built from the image metadata (one row per image, in feature-row order); feature rows are
    added block by block, so image-level features never need to be held all at once.
    """

    def __init__(self, samples: pd.DataFrame) -> None:
        s = samples.reset_index(drop=True)
        keys = s["plate"].astype(str) + "\x00" + s["well"].astype(str)
        self.codes, uniq = pd.factorize(keys, sort=True)
        self.n_wells = len(uniq)
        self.counts = np.bincount(self.codes, minlength=self.n_wells)
        first = pd.Series(np.arange(len(s))).groupby(self.codes).first().to_numpy()
        cols = [c for c in META_COLUMNS if c in s.columns and c != "site"]
        # The input's own columns describe the well only where its images agree on them.
        cols += constant_within(s, self.codes, carried_columns(s.columns))
        self.meta = s.iloc[first][cols].reset_index(drop=True)
        self.meta["n_sites"] = self.counts.astype(np.int64)
        self.sums: np.ndarray | None = None
        self.n_added = 0

    def add(self, start: int, features: np.ndarray) -> None:
        """Add feature rows ``start .. start + len(features)`` (row numbers of ``samples``)."""
        if self.sums is None:
            self.sums = np.zeros((self.n_wells, features.shape[1]), dtype=np.float64)
        np.add.at(self.sums, self.codes[start : start + len(features)], features.astype(np.float64))
        self.n_added += len(features)

    def result(self) -> tuple[np.ndarray, pd.DataFrame]:
        """Float32 well profiles and one metadata row per well (``site`` becomes ``n_sites``)."""
        if self.n_added != len(self.codes):
            raise ValueError(f"{self.n_added} feature rows added but {len(self.codes)} expected")
        sums = self.sums if self.sums is not None else np.zeros((self.n_wells, 0))
        return (sums / self.counts[:, None]).astype(np.float32), self.meta.copy()


def well_profiles(
    features: np.ndarray, samples: pd.DataFrame, chunk: int = 65536
) -> tuple[np.ndarray, pd.DataFrame]:
    """Mean over sites per (plate, well): float32 profiles and one metadata row per well.

    ``samples`` holds one row per feature row (same order). Metadata that is constant within
    a well is kept; ``site`` becomes ``n_sites``.
    """
    if len(samples) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(samples)} metadata rows")
    acc = WellAccumulator(samples)
    for a in range(0, len(features), chunk):  # chunked so a float64 copy never exceeds a block
        acc.add(a, np.asarray(features[a : a + chunk]))
    return acc.result()


def export_name(column: str) -> str:
    """``plate`` -> ``Metadata_Plate``; unknown names get the prefix; prefixed ones are kept."""
    c = str(column)
    if c.startswith(METADATA_PREFIX):
        return c
    return EXPORT_NAMES.get(c, f"{METADATA_PREFIX}{c}")


def _same_values(a: pd.Series, b: pd.Series) -> bool:
    """Whether two columns hold the same values (compared as text; missing equals missing)."""

    def text(s: pd.Series) -> pd.Series:
        return s.astype(object).where(s.notna(), None).map(lambda v: None if v is None else str(v))

    return bool(text(a).reset_index(drop=True).equals(text(b).reset_index(drop=True)))


def to_metadata_frame(meta: pd.DataFrame) -> pd.DataFrame:
    """Metadata columns under their exported ``Metadata_*`` names (see ``EXPORT_NAMES``).

    The input table's own ``Metadata_*`` columns keep their names and values. Where a known
    column's exported name is one of them, the two are one column when they hold the same
    values; otherwise the known one is renamed: the batch to ``PAIRING_BATCH``, others to
    ``Metadata_cdcl_<name>``.
    """
    own = set(carried_columns(meta.columns))
    names: dict[str, str] = {}
    drop = []
    for c in meta.columns:
        name = export_name(c)
        if c in own or name not in own:
            names.setdefault(c, name)
        elif _same_values(meta[c], meta[name]):
            drop.append(name)  # the same column twice: kept once, in the known column's place
            names[c] = name
        else:
            names[c] = PAIRING_BATCH if c == "batch" else f"{METADATA_PREFIX}cdcl_{c}"
    return meta.drop(columns=drop).rename(columns=names).reset_index(drop=True)


def feature_names(dim: int) -> list[str]:
    """Exported feature column names: ``Cells_Embedding_0000`` ... (zero-padded, sortable)."""
    return [f"{FEATURE_PREFIX}{i:04d}" for i in range(int(dim))]


def profile_table(
    features: np.ndarray, meta: pd.DataFrame, names: list[str] | None = None
) -> pd.DataFrame:
    """One table: ``Metadata_*`` columns then the feature columns (default ``feature_names``)."""
    if len(meta) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(meta)} metadata rows")
    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    feats = pd.DataFrame(x, columns=names if names is not None else feature_names(x.shape[1]))
    return pd.concat([to_metadata_frame(meta), feats], axis=1)


def profile_ids(meta: pd.DataFrame) -> list[str]:
    """Readable unique row names: ``<plate>_<well>_<site>`` (``<plate>_<well>`` for wells)."""
    m = meta.reset_index(drop=True)

    def col(*names: str) -> pd.Series | None:
        for n in names:
            if n in m.columns:
                return m[n].astype(str)
        return None

    plate = col("plate", "Metadata_Plate", "Metadata_plate")
    well = col("well", "Metadata_Well", "Metadata_well")
    site = col("site", "Metadata_Site", "Metadata_site")
    if plate is None or well is None:
        return [str(i) for i in range(len(m))]
    ids = plate + "_" + well + ("_" + site if site is not None else "")
    dup = ids.duplicated(keep=False).to_numpy()
    if dup.any():  # e.g. several crops per site: number them in table order
        k = ids.groupby(ids).cumcount().astype(str)
        ids = ids.where(~dup, ids + "_" + k)
    return ids.tolist()


def _anndata(
    x: np.ndarray, meta: pd.DataFrame, names: list[str], provenance: dict[str, Any] | None
) -> ad.AnnData:
    """AnnData with ``X`` = features, ``obs`` = ``Metadata_*`` metadata, ``var`` = names."""
    import anndata as ad

    obs = to_metadata_frame(meta).copy()
    for c in obs.columns:  # h5ad wants plain strings/numbers; mixed object columns become str
        if obs[c].dtype == object:
            obs[c] = obs[c].map(lambda v: "" if v is None or v != v else str(v)).astype(str)
    obs.index = pd.Index(profile_ids(meta), dtype=str)
    x = np.asarray(x, dtype=np.float32).reshape(len(obs), -1)
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(names, dtype=str)))
    adata.obsm[OBSM_KEY] = x
    if provenance:
        adata.uns[UNS_KEY] = uns_provenance(provenance)
    return adata


def frame_to_anndata(table: pd.DataFrame, provenance: dict[str, Any] | None = None) -> ad.AnnData:
    """An AnnData of a profile table (``X``, ``obs``, ``var``; provenance in ``uns["cdcl"]``)."""
    x, meta, names = split_table(table)
    return _anndata(x, meta, names, provenance)


def anndata_to_frame(adata: ad.AnnData) -> pd.DataFrame:
    """A profile table of an AnnData: ``obs`` as ``Metadata_*`` columns, then the features."""
    x = adata.obsm[OBSM_KEY] if OBSM_KEY in adata.obsm else adata.X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)
    names = None
    if x.shape[1] == adata.n_vars and not adata.var_names.astype(str).str.isdigit().all():
        names = [str(v) for v in adata.var_names]
    return profile_table(x, adata.obs.reset_index(drop=True), names)


def uns_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """Provenance as h5ad can store it: plain strings, with nested values as JSON text."""
    import json

    out: dict[str, Any] = {}
    for k, v in provenance.items():
        if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()):
            out[str(k)] = {str(a): b for a, b in v.items()}
        elif isinstance(v, str | int | float | bool) and v is not None:
            out[str(k)] = v
        else:
            out[str(k)] = json.dumps(v, default=str, sort_keys=True)
    return out


def to_parquet(features: np.ndarray, meta: pd.DataFrame, path: str | Path) -> Path:
    """Write profiles as Parquet with ``Metadata_*`` columns (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_parquet(profile_table(features, meta), tmp)
    return path


def to_csv(features: np.ndarray, meta: pd.DataFrame, path: str | Path) -> Path:
    """Write profiles as CSV (gzip when the name ends in .gz) with ``Metadata_*`` columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comp = "gzip" if path.suffix == ".gz" else None
    with atomic_path(path) as tmp:
        profile_table(features, meta).to_csv(tmp, index=False, compression=comp)
    return path


def to_anndata(
    features: np.ndarray,
    meta: pd.DataFrame,
    path: str | Path,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write profiles as .h5ad (see :func:`frame_to_anndata`), provenance in ``uns["cdcl"]``."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.asarray(features, dtype=np.float32).reshape(len(meta), -1)
    adata = _anndata(x, meta, feature_names(x.shape[1]), provenance)
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return path


def write_profiles(
    features: np.ndarray,
    meta: pd.DataFrame,
    path: str | Path,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write by file extension: .parquet, .h5ad (with provenance), .csv or .csv.gz."""
    name = str(path).lower()
    if name.endswith(".parquet"):
        return to_parquet(features, meta, path)
    if name.endswith(".h5ad"):
        return to_anndata(features, meta, path, provenance)
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        return to_csv(features, meta, path)
    raise CdclError(f"{path}: unknown profile format; use a .parquet, .h5ad, .csv or .csv.gz name")


def read_profile_table(path: str | Path) -> pd.DataFrame:
    """Read a profile table (.parquet, .csv, .csv.gz, .tsv or .h5ad) into one DataFrame.

    Its column names are checked (:mod:`cdcl.profiles.checks`: no repeats, features and
    metadata both present); a CSV or TSV separated by semicolons or tabs is read with the
    separator its header uses.
    """
    path = Path(path)
    if not path.exists():
        raise CdclError(f"{path}: file not found")
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            check_column_names(list(pq.read_schema(path).names), str(path))
            table = read_parquet(path)
        elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")):
            table = _read_delimited(path, "," if name.endswith((".csv", ".csv.gz")) else "\t")
        elif name.endswith(".h5ad"):
            import anndata as ad

            table = anndata_to_frame(ad.read_h5ad(path))
        else:
            raise CdclError(f"{path}: unknown format; use .parquet, .csv, .csv.gz, .tsv or .h5ad")
    except CdclError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CdclError(f"{path}: unreadable profile table ({type(e).__name__}: {first})") from None
    check_column_names([str(c) for c in table.columns], str(path))
    return table


def _read_delimited(path: Path, sep: str) -> pd.DataFrame:
    """A CSV/TSV table, with the separator (and decimal mark) its header and first row use."""
    sep, decimal, names = sniff_csv(path, sep)
    # pandas renames a repeated header to NAME.1: the raw header is checked instead.
    check_column_names(names, str(path))
    if sep == ";":
        mark = " and decimal commas" if decimal == "," else ""
        print(f"note: {path}: read as semicolon-separated{mark}", file=sys.stderr)
    return pd.read_csv(path, sep=sep, decimal=decimal)


def _check_table(table: pd.DataFrame, where: str) -> None:
    """Column names (no repeats, features and metadata both present) and feature magnitudes."""
    check_column_names([str(c) for c in table.columns], where)
    for i, name in enumerate(table.columns):
        col = table.iloc[:, i]
        if str(name).startswith(METADATA_PREFIX) or pd.api.types.is_bool_dtype(col):
            continue
        if pd.api.types.is_numeric_dtype(col):
            values = col.to_numpy(dtype=np.float64, na_value=np.nan)
            check_feature_values(values, str(name), where)


def split_table(
    table: pd.DataFrame, where: str = "profile table"
) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """Split a profile table into (features float32, Metadata_* frame, feature names).

    The table is checked first: its column names, and feature values small enough for float32
    arithmetic (:mod:`cdcl.profiles.checks`); ``where`` names the table in errors.
    """
    _check_table(table, where)
    meta_cols = [c for c in table.columns if str(c).startswith(METADATA_PREFIX)]
    feat_cols = [c for c in table.columns if not str(c).startswith(METADATA_PREFIX)]
    non_numeric = [c for c in feat_cols if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        raise CdclError(
            f"{where}: feature column `{non_numeric[0]}` is not numeric; "
            "prefix metadata columns with `Metadata_`"
        )
    x = table[feat_cols].to_numpy(dtype=np.float32)
    return x, table[meta_cols].reset_index(drop=True), [str(c) for c in feat_cols]


def parquet_shape(path: str | Path) -> tuple[int, int] | None:
    """(rows, feature columns) of a Parquet profile table from its footer; None otherwise."""
    if not str(path).lower().endswith(".parquet") or not Path(path).is_file():
        return None
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except Exception:
        return None  # unreadable: the loader reports it
    names = meta.schema.to_arrow_schema().names
    return meta.num_rows, sum(not n.startswith(METADATA_PREFIX) for n in names)


def read_parquet_profiles(path: str | Path) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """As ``split_table(read_profile_table(path))`` for Parquet, streaming the features.

    The features are copied record batch by record batch into one float32 array, so loading
    needs about one copy of the table instead of three (Arrow table, DataFrame, array).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise CdclError(f"{path}: file not found")
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        check_column_names(list(schema.names), str(path))
        meta_cols = [n for n in schema.names if n.startswith(METADATA_PREFIX)]
        feat_cols = [n for n in schema.names if not n.startswith(METADATA_PREFIX)]
        for c in feat_cols:
            t = schema.field(c).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
                raise CdclError(
                    f"profile table: feature column `{c}` is not numeric; "
                    "prefix metadata columns with `Metadata_`"
                )
        n = pf.metadata.num_rows
        x = np.empty((n, len(feat_cols)), dtype=np.float32)
        pool = pa.default_memory_pool()
        a = 0
        for group in range(pf.num_row_groups):
            batches = pf.iter_batches(
                batch_size=16_384, row_groups=[group], columns=feat_cols, use_threads=False
            )
            for batch in batches:
                b = a + batch.num_rows
                for j, col in enumerate(batch.columns):
                    values = col.to_numpy(zero_copy_only=False)
                    check_feature_values(values, feat_cols[j], str(path), first_row=a)
                    x[a:b, j] = values
                a = b
            # Arrow's allocator keeps freed decode buffers for reuse; handed back per row
            # group, they would otherwise add gigabytes to the peak of a large table's load
            # and stay resident through the whole evaluation.
            del batches
            pool.release_unused()
        meta = pf.read(columns=meta_cols).to_pandas() if meta_cols else pd.DataFrame(index=range(n))
        pool.release_unused()
    except CdclError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CdclError(f"{path}: unreadable profile table ({type(e).__name__}: {first})") from None
    return x, meta.reset_index(drop=True), [str(c) for c in feat_cols]
