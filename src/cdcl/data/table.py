"""Adapter for any screen described by a metadata table (`cdcl build table`).

Each table row is one image (a field of view or a single-cell crop). Columns are mapped by
options (batch, plate, well, site, treatment, dose, MoA, ...); controls are the rows matching a
control query (e.g. ``compound == "DMSO"``, grammar in cdcl.data.query). Pixels come either from one file per channel, found
through a path template such as ``images/{plate}/{well}_s{site}_w{channel_index}.png``
(placeholders: any column, ``{channel}`` = the channel's name, ``{channel_index}`` = its
1-based position), or from one multi-channel array file (``--npz``) whose rows follow the
table's order.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cdcl.data.build import ArrayFields, BuildReport, FileFields, build_dataset, jsonable
from cdcl.data.columns import control_mask, default_control_query, find_column
from cdcl.data.crops import CropSpec, nucleus_crops
from cdcl.data.phenix import WELL_FIELDS, well_fields
from cdcl.data.rgb import RgbFields, rgb_planes
from cdcl.data.splits import FOLD_GROUP
from cdcl.errors import CdclError
from cdcl.parquet import read_parquet


def read_table(path: Path, sep: str | None = None) -> pd.DataFrame:
    """Read a CSV / TSV / Parquet metadata table, with a one-line error when it cannot."""
    path = Path(path)
    if not path.is_file():
        raise CdclError(f"{path}: file not found; pass the samples table with --samples")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return read_parquet(path)
        if sep is None:
            sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
        return pd.read_csv(path, sep=sep, low_memory=False)
    except Exception as e:
        raise CdclError(
            f"{path}: unreadable table ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def require_columns(df: pd.DataFrame, columns: list[str], where: str, why: str = "") -> None:
    """Raise naming the first missing column and the columns that exist."""
    for c in columns:
        if c not in df.columns:
            have = ", ".join(map(str, df.columns[:12])) + (", ..." if len(df.columns) > 12 else "")
            raise CdclError(f"{where}: column `{c}` missing{why} (columns: {have})")


def format_treatment(compound: Any, dose: Any) -> str:
    """Treatment label compound@dose, e.g. ``cycloheximide@5.0`` (dose to 6 significant digits)."""
    if dose is None or (isinstance(dose, float) and np.isnan(dose)):
        return str(compound)
    # 6 significant digits: 9.99999999999999999 and 10.0 in two platemaps are the same dose.
    return f"{compound}@{float(f'{float(dose):.6g}')}"


CHANNEL_FIELDS = ("channel", "channel_index")


def template_fields(template: str, option: str = "--path-template") -> list[str]:
    """The placeholder names used by a path template; one-line error when it is malformed."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise CdclError(
            f"{option} {template!r}: malformed ({e}); placeholders look like {{Metadata_Plate}}"
        ) from None
    if any(n == "" or n.isdigit() for n in names):
        raise CdclError(
            f"{option} {template!r}: every placeholder needs a column name, e.g. "
            "{Metadata_Well}; write {{ and }} for literal braces"
        )
    return names


def expand_paths(
    df: pd.DataFrame,
    template: str,
    channels: list[str] | None,
    root: Path,
    well_col: str | None = None,
    option: str = "--path-template",
) -> list[list[str]]:
    """One path per channel for every row (one per row when ``channels`` is None).

    Placeholders are columns, ``{channel}``, ``{channel_index}`` (1-based) and, from the well
    name, ``{well_row}`` and ``{well_column}`` (1-based; Opera Phenix names). Relative paths
    start at ``root``.
    """
    names = list(dict.fromkeys(template_fields(template, option)))
    if channels is None and any(n in CHANNEL_FIELDS for n in names):
        raise CdclError(
            f"{option} {template!r}: one file holds every channel here, so the template "
            "cannot use {channel} or {channel_index}"
        )
    derived = [n for n in names if n in WELL_FIELDS and n not in df.columns]
    cols = [n for n in names if n not in CHANNEL_FIELDS and n not in derived]
    require_columns(df, cols, option, " (a placeholder of the template)")
    values = df[cols]
    if derived:
        if well_col is None or well_col not in df.columns:
            raise CdclError(f"{option}: {{well_row}}/{{well_column}} need a well column")
        values = pd.concat([values, well_fields(df[well_col], well_col)[derived]], axis=1)
    out = []
    for i, rec in enumerate(values.to_dict("records")):
        row = []
        for k, ch in enumerate(channels or [""]):
            try:
                p = Path(template.format(**rec, channel=ch, channel_index=k + 1))
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                raise CdclError(
                    f"{option} {template!r}: cannot fill it for row {i} ({type(e).__name__}: {e})"
                ) from None
            row.append(str(p if p.is_absolute() else root / p))
        out.append(row)
    return out


@dataclass
class TableOptions:
    """Column mapping of `cdcl build table`; None = found by convention (``CONVENTIONS``).

    ``site_col=""`` means the table has no site column.
    """

    batch_col: str | None = None
    plate_col: str | None = None
    well_col: str | None = None
    site_col: str | None = None
    treatment_col: str | None = None
    dose_col: str | None = None
    compound_col: str | None = None
    moa_col: str | None = None
    cell_type_col: str | None = None
    control_query: str | None = None
    control_treatment: str | None = None
    split_col: str | None = None  # the user's own train/val/test assignment, kept as `split`
    # held-out folds by this column's values (leave-one-plate-out, -replicate-out), as fold_group
    fold_col: str | None = None
    no_controls: bool = False  # the screen has no negative controls (plate stats use all images)


# Field -> (column names tried in order, case-insensitively; the flag that names another column).
# pycytominer / CellProfiler names first, then plain lower-case ones.
CONVENTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "plate": (("Metadata_Plate", "plate", "Image_Metadata_Plate"), "--plate-col"),
    "well": (("Metadata_Well", "well", "Image_Metadata_Well"), "--well-col"),
    "site": (
        ("Metadata_Site", "site", "Metadata_Field", "field", "Image_Metadata_Site"),
        "--site-col",
    ),
    "batch": (("Metadata_Batch", "batch"), "--batch-col"),
    "treatment": (
        (
            "Metadata_Treatment",
            "treatment",
            "Metadata_Compound",
            "compound",
            "Metadata_pert_iname",
            "Metadata_broad_sample",
        ),
        "--treatment-col",
    ),
    "compound": (("Metadata_Compound", "compound", "Metadata_pert_iname"), "--compound-col"),
    "dose": (("Metadata_Dose", "dose", "Metadata_Concentration", "concentration"), "--dose-col"),
    "moa": (("Metadata_MoA", "moa", "Metadata_Mechanism"), "--moa-col"),
    "cell_type": (("Metadata_Cell_Type", "Metadata_CellType", "cell_type"), "--cell-type-col"),
}
REQUIRED = ("plate", "well", "treatment")
METADATA_PREFIX = "Metadata_"  # columns kept as they are in the samples table


def _given_columns(opt: TableOptions) -> dict[str, str | None]:
    """The column each conventional field was named as (None: find it; "": there is none)."""
    return {field_name: getattr(opt, f"{field_name}_col") for field_name in CONVENTIONS}


def _find_columns(
    cols: list[str], given: dict[str, str | None]
) -> tuple[dict[str, str | None], list[str]]:
    """Each conventional field's column (None when it has none) and the problems found."""
    found: dict[str, str | None] = {}
    problems: list[str] = []
    for field_name, (names, flag) in CONVENTIONS.items():
        name = given[field_name]
        if name == "":  # explicitly none
            found[field_name] = None
        elif name is not None:
            found[field_name] = name if name in cols else None
            if name not in cols:
                problems.append(f"column `{name}` missing (given as {flag} {name})")
        else:
            found[field_name] = find_column(cols, *names)
            if found[field_name] is None and field_name in REQUIRED:
                problems.append(
                    f"no {field_name} column (looked for {', '.join(names[:4])}); "
                    f"name it with {flag} COLUMN"
                )
    return found, problems


def _site_problems(
    df: pd.DataFrame, given: dict[str, str | None], found: dict[str, str | None]
) -> list[str]:
    """A site column is needed when a well holds several images and none was found."""
    if (
        found["site"] is None
        and given["site"] is None
        and found["plate"]
        and found["well"]
        and df.duplicated([found["plate"], found["well"]]).any()
    ):
        names, flag = CONVENTIONS["site"]
        return [
            f"no site column although wells hold several images (looked for "
            f"{', '.join(names[:4])}); name it with {flag} COLUMN"
        ]
    return []


def _split_and_fold_problems(cols: list[str], opt: TableOptions) -> list[str]:
    """The --split-col and --fold-col columns must exist."""
    problems = []
    if opt.split_col and opt.split_col not in cols:
        problems.append(f"column `{opt.split_col}` missing (given as --split-col {opt.split_col})")
    if opt.fold_col and opt.fold_col not in cols:
        problems.append(f"column `{opt.fold_col}` missing (given as --fold-col {opt.fold_col})")
    return problems


def _control_query(
    df: pd.DataFrame, opt: TableOptions, found: dict[str, str | None]
) -> tuple[str | None, list[str]]:
    """The control query (the given one, else found by convention) and its problems."""
    control_query = opt.control_query
    problems = []
    if opt.no_controls and control_query is not None:
        problems.append("give --control-query or --no-controls, not both")
    if control_query is None and found["treatment"] and not opt.no_controls:
        # Compound before treatment: the compound column names the substance itself.
        control_query = default_control_query(df, (found["compound"], found["treatment"]))
        if control_query is None:
            problems.append(
                "no negative controls found (no Metadata_control_type == negcon, no treatment "
                "named DMSO); say which rows they are with --control-query, e.g. "
                "\"Metadata_Compound == 'DMSO'\", or pass --no-controls"
            )
    return control_query, problems


def _default_batch_and_dose(
    found: dict[str, str | None], given: dict[str, str | None], cols: list[str]
) -> list[str]:
    """Plates as batches when there is no batch column; notices of what was assumed."""
    notes = []
    if found["batch"] is None:
        found["batch"] = found["plate"]
        notes.append(
            f"no batch column (Metadata_Batch): every plate ({found['plate']}) is its own "
            "batch; name one with --batch-col"
        )
    if found["dose"] and given["dose"] is None and given["treatment"] is None:
        if find_column(cols, "Metadata_Treatment", "treatment") is not None:
            found["dose"] = None  # a treatment column names the treatment, dose included
    return notes


def resolve_options(
    df: pd.DataFrame, opt: TableOptions, where: str
) -> tuple[TableOptions, list[str]]:
    """Fill unnamed columns from the conventions; one CdclError listing everything missing.

    Returns the options with every column named, and notices (e.g. plates used as batches).
    """
    cols = [str(c) for c in df.columns]
    given = _given_columns(opt)
    found, problems = _find_columns(cols, given)
    problems += _site_problems(df, given, found)
    problems += _split_and_fold_problems(cols, opt)
    control_query, control_problems = _control_query(df, opt, found)
    problems += control_problems
    if problems:
        have = ", ".join(cols[:12]) + (", ..." if len(cols) > 12 else "")
        raise CdclError(f"{where}: {'; '.join(problems)} (columns: {have})")
    notes = _default_batch_and_dose(found, given, cols)
    named = {f"{field_name}_col": column for field_name, column in found.items()}
    return replace(opt, control_query=control_query, **named), notes


def _check_filled(df: pd.DataFrame, columns: list[str], where: str) -> None:
    """Every row needs its batch, plate, well and treatment."""
    for c in columns:
        empty = df[c].isna().to_numpy()
        if empty.any():
            raise CdclError(
                f"{where}: column `{c}` is empty in row {int(np.flatnonzero(empty)[0])}"
            )


def _sites(df: pd.DataFrame, site_col: str | None, where: str) -> np.ndarray:
    """Integer sites (0 for every row without a site column)."""
    if not site_col:
        return np.zeros(len(df), dtype=np.int64)
    site = pd.to_numeric(df[site_col], errors="coerce")
    if site.isna().any():
        row = int(np.flatnonzero(site.isna().to_numpy())[0])
        raise CdclError(f"{where}: column `{site_col}` is not an integer in row {row}")
    return site.astype(np.int64).to_numpy()


def _control_rows(df: pd.DataFrame, opt: TableOptions, where: str) -> np.ndarray:
    """Mask of the negative-control rows (none with --no-controls)."""
    if opt.control_query:
        return control_mask(df, opt.control_query, option=f"--control-query (on {where})")
    if opt.no_controls:
        return np.zeros(len(df), dtype=bool)
    raise CdclError(
        "--control-query missing; say which rows are negative controls, e.g. 'compound == \"DMSO\"'"
    )


def _treatment_labels(
    df: pd.DataFrame, opt: TableOptions, dose: np.ndarray | None, ctrl: np.ndarray
) -> np.ndarray:
    """Treatment labels (compound@dose with a dose column); the controls share one label."""
    assert opt.treatment_col
    if dose is not None:
        treat = [format_treatment(t, d) for t, d in zip(df[opt.treatment_col].astype(str), dose)]
    else:
        treat = df[opt.treatment_col].astype(str).tolist()
    labels = np.asarray(treat, dtype=object)
    # All negative-control rows share one label so that they pair with each other across batches.
    ctrl_label = opt.control_treatment
    if ctrl_label is None and ctrl.any():
        ctrl_label = str(df[opt.compound_col or opt.treatment_col].astype(str)[ctrl].mode().iloc[0])
    labels[ctrl] = ctrl_label
    return labels


def _add_split_and_fold(out: pd.DataFrame, df: pd.DataFrame, opt: TableOptions, where: str) -> None:
    """The user's own split (train/val/test) and fold groups, checked."""
    if opt.split_col:
        require_columns(df, [opt.split_col], where)
        split = df[opt.split_col].astype(str).str.strip().str.lower()
        bad = sorted(set(split) - {"train", "val", "test"})
        if bad:
            raise CdclError(
                f"{where}: column `{opt.split_col}` has values {bad[:3]}; use train, val or test"
            )
        out["split"] = split.to_numpy()
    if opt.fold_col:
        values = df[opt.fold_col]
        if values.isna().any():
            raise CdclError(
                f"{where}: column `{opt.fold_col}` (--fold-col) is empty in "
                f"{int(values.isna().sum())} rows; every image needs its fold group"
            )
        out[FOLD_GROUP] = values.astype(str).str.strip().to_numpy()


def _carry_metadata(out: pd.DataFrame, df: pd.DataFrame) -> None:
    """The table's own Metadata_* columns travel with each image."""
    for c in df.columns:
        if str(c).startswith(METADATA_PREFIX) and str(c) not in out.columns:
            col = df[c]
            out[str(c)] = (
                col.astype(str).where(col.notna(), None) if col.dtype == object else col
            ).to_numpy()


def samples_from_table(df: pd.DataFrame, opt: TableOptions, where: str) -> pd.DataFrame:
    """Map a user's table onto the dataset schema (no image column yet)."""
    opt, _ = resolve_options(df, opt, where)
    assert opt.batch_col and opt.plate_col and opt.well_col and opt.treatment_col
    _check_filled(df, [opt.batch_col, opt.plate_col, opt.well_col, opt.treatment_col], where)
    out = pd.DataFrame(
        {
            "batch": df[opt.batch_col].astype(str).to_numpy(),
            "plate": df[opt.plate_col].astype(str).to_numpy(),
            "well": df[opt.well_col].astype(str).to_numpy(),
        }
    )
    out["site"] = _sites(df, opt.site_col, where)
    compound = df[opt.compound_col or opt.treatment_col].astype(str).to_numpy()
    ctrl = _control_rows(df, opt, where)
    dose = None
    if opt.dose_col:
        dose = pd.to_numeric(df[opt.dose_col], errors="coerce").to_numpy(np.float64)
        out["dose"] = dose
    out["treatment"] = _treatment_labels(df, opt, dose, ctrl)
    out["is_control"] = ctrl
    out["compound"] = compound
    if opt.moa_col:
        out["moa"] = df[opt.moa_col].where(df[opt.moa_col].notna(), None).to_numpy()
    if opt.cell_type_col:
        out["cell_type"] = df[opt.cell_type_col].astype(str).to_numpy()
    _add_split_and_fold(out, df, opt, where)
    _carry_metadata(out, df)
    out["source_row"] = np.arange(len(df), dtype=np.int64)
    return out


def _check_channels(channels: list[str]) -> None:
    """Channel names are given, non-blank and unique."""
    if not channels or any(not c.strip() for c in channels):
        raise CdclError(
            "--channels: give the channel names in order, e.g. --channels DNA,Actin,Tubulin"
        )
    if len(set(channels)) != len(channels):
        raise CdclError(f"--channels {','.join(channels)}: channel names must be unique")


def _read_samples(
    samples_file: Path | pd.DataFrame, root: Path | None
) -> tuple[pd.DataFrame, str, str, Any, Path]:
    """The table, its name in messages, the default dataset name, its record, the path base."""
    if isinstance(samples_file, pd.DataFrame):
        df = samples_file.reset_index(drop=True)
        digest = pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes()
        origin = f"DataFrame sha256:{hashlib.sha256(digest).hexdigest()[:16]}"
        base_dir = Path(root) if root is not None else Path.cwd()
        return df, "samples table", "samples", origin, base_dir
    samples_file = Path(samples_file)
    df = read_table(samples_file)
    base_dir = Path(root) if root is not None else samples_file.parent
    return df, str(samples_file), samples_file.stem, samples_file, base_dir


@dataclass
class _PixelSource:
    """Where `build_table` reads the pixels from, and at what size (recorded with the build)."""

    path_template: str | None
    root: Path | None
    npz: Path | None
    npz_key: str | None
    channel_axis: int
    image_size: int | None
    rgb_channels: list[str] | None
    crops: CropSpec | None

    def check(self) -> None:
        """Exactly one source, and crops or RGB planes only from image files."""
        if (self.path_template is None) == (self.npz is None):
            raise CdclError("give exactly one image source: --path-template TEMPLATE or --npz FILE")
        if self.npz is not None and (self.rgb_channels is not None or self.crops is not None):
            raise CdclError("--rgb-channels and --crops-from read image files: use --path-template")

    def fields(
        self,
        df: pd.DataFrame,
        where: str,
        channels: list[str],
        base_dir: Path,
        well_col: str | None,
    ) -> Any:
        """The whole fields of the table's rows, in table order."""
        if self.npz is not None:
            fields = ArrayFields(str(self.npz), self.npz_key, self.channel_axis, len(channels))
            if len(fields) != len(df):
                raise CdclError(
                    f"{self.npz}: {len(fields)} images but {where} has {len(df)} rows; "
                    "the table must list the array's images in order"
                )
            return fields
        template = self.path_template or ""
        if self.rgb_channels is not None:
            planes = rgb_planes(self.rgb_channels, channels)
            paths = expand_paths(df, template, None, base_dir, well_col)
            return RgbFields([p[0] for p in paths], planes)
        return FileFields(expand_paths(df, template, channels, base_dir, well_col))

    def recorded(self) -> dict[str, Any]:
        """The build arguments that describe the pixels, as dataset.json records them."""
        crops = self.crops
        crop_args = {**vars(crops), "columns": list(crops.columns)} if crops else None
        return {**vars(self), "crops": crop_args}


def _cut_crops(
    df: pd.DataFrame,
    samples: pd.DataFrame,
    fields: Any,
    crops: CropSpec,
    base_dir: Path,
    well_col: str | None,
    workers: int,
    skip_bad: bool,
) -> tuple[pd.DataFrame, Any, list[str]]:
    """Single-cell crops around the nuclei of each field (`nucleus_crops`)."""
    nuclei = expand_paths(df, crops.template, None, base_dir, well_col, "--crops-from")
    return nucleus_crops(
        samples, fields, [p[0] for p in nuclei], crops, workers=workers, skip_bad=skip_bad
    )


def build_table(
    samples_file: Path | pd.DataFrame,
    out: Path,
    channels: list[str],
    options: TableOptions,
    *,
    path_template: str | None = None,
    root: Path | None = None,
    npz: Path | None = None,
    npz_key: str | None = None,
    channel_axis: int = -1,
    image_size: int | None = None,
    name: str | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    rgb_channels: list[str] | None = None,
    crops: CropSpec | None = None,
    extra_args: dict[str, Any] | None = None,
) -> BuildReport:
    """Build a dataset from any metadata table plus per-channel files or one array file.

    ``rgb_channels`` names the planes of one packed RGB file per row (the template then has no
    channel placeholder); ``crops`` cuts single-cell crops around nucleus centres instead of
    storing whole fields (see cdcl.data.crops).
    """
    _check_channels(channels)
    pixels = _PixelSource(
        path_template, root, npz, npz_key, channel_axis, image_size, rgb_channels, crops
    )
    pixels.check()
    df, where, stem, origin, base_dir = _read_samples(samples_file, root)
    options, notes = resolve_options(df, options, where)
    samples = samples_from_table(df, options, where)
    fields = pixels.fields(df, where, channels, base_dir, options.well_col)
    if crops is not None:
        samples, fields, crop_notes = _cut_crops(
            df, samples, fields, crops, base_dir, options.well_col, workers, skip_bad
        )
        notes += crop_notes
    recorded = {"samples": origin, "channels": list(channels), **pixels.recorded()}
    args = jsonable({**recorded, **vars(options), **(extra_args or {})})
    report = build_dataset(
        Path(out),
        samples,
        fields,
        name=name or stem,
        source_name="table",
        channels=list(channels),
        image_size=image_size,
        build_args=args,
        workers=workers,
        skip_bad=skip_bad,
    )
    report.warnings[:0] = notes
    return report
