"""The Python API: one verb per step of a screen, for notebooks and scripts.

Every command of the ``cdcl`` command line parses its arguments, calls one of these functions
and prints what it returns, so a notebook and a shell script run the same code with the same
defaults and the same checks of their arguments::

    import cdcl

    data = cdcl.synth("screen", preset="tiny")              # or cdcl.build_table(...)
    run = cdcl.train(data, "runs/cdcl", preset="synthetic-cdcl", overrides={"train.epochs": 1})
    profiles = cdcl.embed(run)                              # a Metadata_* DataFrame
    results = cdcl.evaluate(profiles)                       # DataFrame, AnnData, file or run
    cdcl.metrics(results)                                   # one row per feature set

The verb of each command:

- ``cdcl synth``: `synth`
- ``cdcl build table``, ``rxrx1``, ``cpg0004``: `build_table`, `build_rxrx1`, `build_cpg0004`
- ``cdcl info``: `info`
- ``cdcl train``: `train` (``--list-presets``: `presets`)
- ``cdcl embed``: `embed` (``--features cellprofiler``: ``features="cellprofiler"``)
- ``cdcl evaluate``: `evaluate` (a run directory, or a profile table with ``--features``)
- ``cdcl compare``: `compare`
- ``cdcl demo``: `demo`
- ``cdcl study``: `study`

Heavy libraries (torch, timm, scanpy) are imported inside the verbs, so ``import cdcl`` is fast.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover - imported for annotations only
    from contextlib import AbstractContextManager

    import anndata
    import pandas as pd

    from cdcl.config import Config
    from cdcl.data.crops import CropSpec
    from cdcl.data.dataset_dir import Dataset
    from cdcl.profiles.columns import ColumnSpec

__all__ = [
    "build_cpg0004",
    "build_rxrx1",
    "build_table",
    "compare",
    "correct",
    "demo",
    "embed",
    "evaluate",
    "info",
    "metrics",
    "open_dataset",
    "presets",
    "study",
    "synth",
    "train",
]

PathLike = str | os.PathLike
_Spec = TypeVar("_Spec")


def synth(
    out: PathLike,
    preset: str = "small",
    *,
    seed: int = 0,
    overwrite: bool = False,
    calibration: bool = True,
    montage: PathLike | None = None,
    progress: bool = False,
    verbose: bool = False,
    **overrides: Any,
) -> Path:
    """Render the built-in simulated Cell Painting screen into a dataset directory.

    Parameters
    ----------
    out
        Dataset directory to write. A directory already holding the same screen (same preset,
        seed and overrides) is reused as it is.
    preset
        ``"tiny"``: 96 images of 32 px (tests); ``small``: 2016 images of 64 px (the demo);
        ``medium``: 8064 images with three doses (benchmarks).
    seed
        Random seed of the design and the pixels.
    overwrite
        Replace a different dataset already at ``out``.
    calibration
        Measure the screen's batch effect against the real references into
        ``calibration.json`` (kept until the screen changes), as ``cdcl synth`` does without
        ``--no-calibration``.
    montage
        Also save a PNG montage here (one row per batch).
    progress
        Show a progress bar on stderr.
    verbose
        Print the summary ``cdcl synth`` prints (design, split, speed, calibration, paths).
    **overrides
        Fields of the screen's configuration, e.g. ``batches=4``, ``sites=2``,
        ``image_size=48``, ``test_batches=1`` (the options of ``cdcl synth``).

    Returns
    -------
    pathlib.Path
        The dataset directory.
    """
    import time

    from cdcl.data import synthetic
    from cdcl.locking import command_lock

    out = Path(out)
    synthetic.resolve_config(preset, **overrides)  # every option, before the lock
    with command_lock(out, "cdcl synth"):
        reused = not overwrite and synthetic.reusable(
            out, synthetic.build_key(preset, seed, **overrides)
        )
        if reused and verbose:
            print(
                f"cdcl synth: {out} already holds this screen (preset {preset}, seed "
                f"{seed}); reusing it (--overwrite rebuilds)"
            )
        start = time.perf_counter()
        if not reused:
            synthetic.generate(
                out, preset, seed, overwrite=overwrite, progress=progress, **overrides
            )
        elapsed = None if reused else time.perf_counter() - start
        lines = _synth_lines(out, preset, seed, overrides, elapsed, montage, calibration)
    if verbose:
        print("\n".join(lines))
    return out


def _synth_lines(
    out: Path,
    preset: str,
    seed: int,
    overrides: dict[str, Any],
    elapsed: float | None,
    montage: PathLike | None,
    calibration: bool,
) -> list[str]:
    """The summary of a rendered screen; draws the montage and measures the calibration."""
    from cdcl.data import synthetic
    from cdcl.data.dataset_dir import open_dataset

    cfg = synthetic.resolve_config(preset, **overrides)
    ds = open_dataset(out)
    s = ds.samples
    parts = s.groupby("split")["batch"].unique()
    split = "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in sorted(parts.items()))
    n_t = s.loc[~s["is_control"], "treatment"].nunique()
    n_m = s.loc[~s["is_control"], "moa"].nunique()
    lines = [
        f"screen   preset {preset}, seed {seed}: {cfg.batches} batches x {cfg.plates} "
        f"plates x {cfg.n_wells} wells x {cfg.sites} sites",
        f"images   {len(s)} ({cfg.image_size}x{cfg.image_size} px, 5 channels "
        f"{', '.join(ds.channels)}, uint16)",
        f"design   {n_t} treatments in {n_m} MoAs + control {synthetic.CONTROL} on every plate",
        f"split    {split}",
    ]
    if elapsed is not None:
        lines.append(f"speed    {len(s) / max(elapsed, 1e-9):.0f} images/s ({elapsed:.1f} s)")
    if montage is not None:
        from cdcl.data.montage import montage as draw_montage

        lines.append(f"montage  {draw_montage(ds, Path(montage))}")
    lines.append(f"strength batch effect x {cfg.batch_strength:g} (1 = calibrated)")
    if calibration:
        from cdcl.experiments.screen_calibration import (
            CALIBRATION_FILE,
            dataset_calibration,
            report_lines,
        )

        lines.extend(report_lines(dataset_calibration(out)))
        lines.append(f"calib    {out / CALIBRATION_FILE}")
    lines.append(f"truth    {out / synthetic.GROUND_TRUTH_FILE}")
    lines.append(f"dataset  {out}")
    return lines


def build_table(
    samples: pd.DataFrame | PathLike,
    out: PathLike,
    channels: Sequence[str] | str,
    *,
    path_template: str | None = None,
    npz: PathLike | None = None,
    npz_key: str | None = None,
    channel_axis: int = -1,
    root: PathLike | None = None,
    control_query: str | None = None,
    batch_col: str | None = None,
    plate_col: str | None = None,
    well_col: str | None = None,
    site_col: str | None = None,
    treatment_col: str | None = None,
    dose_col: str | None = None,
    compound_col: str | None = None,
    moa_col: str | None = None,
    cell_type_col: str | None = None,
    control_treatment: str | None = None,
    split_col: str | None = None,
    fold_col: str | None = None,
    no_controls: bool = False,
    rgb_channels: Sequence[str] | str | None = None,
    crops_from: str | None = None,
    crop_size: int | None = None,
    crops_per_well: int | None = None,
    crop_seed: int = 0,
    crop_columns: Sequence[str] | str | None = None,
    image_size: int | None = None,
    name: str | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    verbose: bool = True,
    lock: bool = True,
) -> Path:
    """Build a dataset directory from a metadata table with one row per image.

    Columns named as pycytominer and CellProfiler name them (``Metadata_Plate``,
    ``Metadata_Well``, ``Metadata_Site``, ``Metadata_Batch``, ``Metadata_Compound`` or
    ``Metadata_Treatment``, ``Metadata_Dose``, ``Metadata_MoA``, ...) or in plain lower case
    (``plate``, ``well``, ...) are found without the ``*_col`` arguments; those arguments name
    other columns. Without a batch column every plate is its own batch.

    Parameters
    ----------
    samples
        The table (a DataFrame, or a CSV, TSV or Parquet file).
    out
        Dataset directory to write (resumed when a build with the same inputs was killed).
    channels
        Channel names in order (``["DNA", "ER", "RNA"]`` or ``"DNA,ER,RNA"``).
    path_template
        One file per channel, e.g. ``"images/{Metadata_Plate}/{Metadata_Well}_s{Metadata_Site}_w{channel_index}.tif"``;
        placeholders are any column, ``{channel}`` and ``{channel_index}`` (1-based).
    npz
        Instead of files: one ``.npz``/``.npy`` array holding all images in table order.
    npz_key
        The array's name inside an ``.npz`` file (default: its only array).
    channel_axis
        The axis of ``npz``'s arrays that holds the channels.
    root
        Base of relative paths (default: the table's folder, or the working directory for a
        DataFrame).
    control_query
        A control query selecting the negative-control rows, e.g.
        ``"Metadata_Compound == 'DMSO'"``: cdcl's own condition language (column
        comparisons, ``in [...]``, ``&``, ``|``, ``~``), parsed and never run as Python;
        not a pandas query (see the Reliability page for what it accepts).
        Default: the rows whose ``Metadata_control_type`` is ``negcon``, else treatments
        named like DMSO.
    batch_col
        The batch column (default: ``Metadata_Batch`` or ``batch``; without one, each plate
        is its own batch).
    plate_col
        The plate column (default: ``Metadata_Plate`` or ``plate``).
    well_col
        The well column (default: ``Metadata_Well`` or ``well``).
    site_col
        The site (field of view) column (default: ``Metadata_Site``, ``site`` or
        ``Metadata_Field``; ``""`` when there is one image per well).
    treatment_col
        The treatment column (default: ``Metadata_Treatment``, ``treatment``,
        ``Metadata_Compound`` or ``compound``).
    dose_col
        The dose column; the treatment becomes ``<treatment>@<dose>``.
    compound_col
        The compound column (default: ``Metadata_Compound`` or ``compound``).
    moa_col
        The mechanism-of-action column (default: ``Metadata_MoA`` or ``moa``).
    cell_type_col
        The cell-type column (default: ``Metadata_Cell_Type``).
    control_treatment
        Treatment label of the controls (default: their compound).
    split_col
        Column with the screen's own ``train``/``val``/``test`` assignment.
    fold_col
        Column whose values define the held-out folds: fold k holds out the k-th of its sorted
        values (``Metadata_Plate``: leave-one-plate-out; a replicate column:
        leave-one-replicate-out). Each batch must lie within one value.
    no_controls
        The screen has no negative controls: plate statistics use all images of each plate.
    rgb_channels
        One RGB file per row holding these channels as its planes (red, green, blue);
        ``channels`` picks and orders the dataset's channels among them.
    crops_from
        Template of one nuclei CSV per row, e.g.
        ``"fields/{Metadata_Plate}/{Metadata_Well}-{Metadata_Site}-Nuclei.csv"``: store one
        ``crop_size`` crop per nucleus centre instead of the whole field.
    crop_size
        Side of the crops in pixels (required with ``crops_from``).
    crops_per_well
        Keep at most this many crops per well (default: all).
    crop_seed
        Seed of the draw that keeps ``crops_per_well`` crops.
    crop_columns
        The centre columns of the nuclei files (default
        ``Nuclei_Location_Center_X,Nuclei_Location_Center_Y``).
    image_size
        Resize every image to N x N pixels (default: keep the native size).
    name
        Dataset name recorded in ``dataset.json``.
    workers
        Reader processes.
    skip_bad
        Drop images with missing or unreadable files (listed in ``skipped.csv``).
    verbose
        Print the build's warnings and its one-line summary.
    lock
        Hold ``out``'s lock while building (off only when the caller holds it).

    Returns
    -------
    pathlib.Path
        The dataset directory.
    """
    from cdcl.data.table import TableOptions
    from cdcl.data.table import build_table as _build

    _check_workers(workers)
    names = _names(channels)
    crops = _crop_spec(crops_from, crop_size, crops_per_well, crop_seed, crop_columns)
    opts = _from_arguments(TableOptions, locals())
    with _locked(out, lock, "cdcl build table"):
        pixels = dict(path_template=path_template, npz_key=npz_key, channel_axis=channel_axis)
        pixels.update(root=_optional_path(root), npz=_optional_path(npz), image_size=image_size)
        rep = _build(
            samples,
            Path(out),
            names,
            opts,
            **pixels,
            name=name,
            workers=workers,
            skip_bad=skip_bad,
            rgb_channels=_names(rgb_channels) if rgb_channels is not None else None,
            crops=crops,
        )
    return _built(rep, verbose)


def _locked(out: PathLike, lock: bool, command: str) -> AbstractContextManager[Any]:
    """``out``'s lock for ``command``, or none when the caller already holds it."""
    import contextlib

    from cdcl.locking import command_lock

    return command_lock(Path(out), command) if lock else contextlib.nullcontext()


def _optional_path(value: PathLike | None) -> Path | None:
    """A path, or None for None."""
    return Path(value) if value is not None else None


def _names(value: Sequence[str] | str) -> list[str]:
    """A list or a comma-separated string of names, each stripped."""
    return [c.strip() for c in (value.split(",") if isinstance(value, str) else value)]


def _crop_spec(
    crops_from: str | None,
    crop_size: int | None,
    crops_per_well: int | None,
    crop_seed: int,
    crop_columns: Sequence[str] | str | None,
) -> CropSpec | None:
    """`build_table`'s crop arguments as one CropSpec (None without ``crops_from``)."""
    from cdcl.data.crops import CENTER_COLUMNS, CropSpec
    from cdcl.errors import CdclError

    if crops_from is None:
        if crop_size is not None or crops_per_well is not None or crop_columns is not None:
            raise CdclError("--crop-size, --crops-per-well and --crop-columns need --crops-from")
        return None
    if crop_size is None:
        raise CdclError("--crops-from needs --crop-size N, the side of the crops in pixels")
    xy = _names(crop_columns) if crop_columns is not None else list(CENTER_COLUMNS)
    if len(xy) != 2:
        raise CdclError(f"--crop-columns {','.join(xy)}: give two columns, X,Y")
    return CropSpec(crops_from, int(crop_size), crops_per_well, int(crop_seed), (xy[0], xy[1]))


def _from_arguments(spec: type[_Spec], arguments: Mapping[str, Any]) -> _Spec:
    """A column spec (TableOptions, ColumnSpec) filled from a verb's arguments of the same names.

    The verbs name their column arguments as the specs name their fields, so the command line
    and Python build one spec the same way; a field the verb does not take keeps its default.
    """
    import dataclasses

    names = [f.name for f in dataclasses.fields(spec)]  # type: ignore[arg-type]
    return spec(**{n: arguments[n] for n in names if n in arguments})


def _check_workers(workers: int) -> None:
    """A build reads with at least one process."""
    from cdcl.errors import CdclError

    if workers < 1:
        raise CdclError(f"--workers {workers}: must be at least 1")


def _built(rep: Any, verbose: bool) -> Path:
    """The built directory, after printing the build's warnings and summary when ``verbose``."""
    if verbose:
        for w in rep.warnings:
            print(f"cdcl build: warning: {w}", file=sys.stderr)
        resumed = f", resumed after {rep.resumed_from} finished" if rep.resumed_from else ""
        print(
            f"built {rep.path}: {rep.n_images} images ({rep.n_written} written{resumed}, "
            f"{rep.n_skipped} skipped) in {rep.seconds:.1f} s"
        )
    return Path(rep.path)


def build_rxrx1(
    root: PathLike,
    out: PathLike,
    *,
    cell_type: str = "HUVEC",
    image_size: int | None = 256,
    workers: int = 1,
    skip_bad: bool = False,
    name: str | None = None,
    verbose: bool = True,
) -> Path:
    """Build a dataset directory from an RxRx1 release (``metadata.csv`` and ``images/``).

    Parameters
    ----------
    root
        The RxRx1 folder holding ``metadata.csv`` and ``images/<experiment>/Plate<n>/``.
    out
        Dataset directory to write (resumed when a build with the same inputs was killed).
    cell_type
        The cell type to keep: ``"HUVEC"`` (as in the paper), ``"RPE"``, ``"HEPG2"``,
        ``"U2OS"`` or ``"all"``.
    image_size
        Resize every image to N x N pixels (anti-aliased; None keeps the native size).
    workers
        Reader processes.
    skip_bad
        Drop images with missing or unreadable files (listed in ``skipped.csv``).
    name
        Dataset name recorded in ``dataset.json``.
    verbose
        Print the build's warnings and its one-line summary.

    Returns
    -------
    pathlib.Path
        The dataset directory.
    """
    from cdcl.data.rxrx1 import build_rxrx1 as _build
    from cdcl.locking import command_lock

    _check_workers(workers)
    with command_lock(Path(out), "cdcl build rxrx1"):
        rep = _build(
            Path(root),
            Path(out),
            cell_type=cell_type,
            image_size=image_size,
            workers=workers,
            skip_bad=skip_bad,
            name=name,
        )
    return _built(rep, verbose)


def build_cpg0004(
    root: PathLike,
    out: PathLike,
    *,
    load_data: str = "**/load_data.csv",
    platemaps: Sequence[PathLike] | None = None,
    moa: PathLike | None = None,
    batch_column: str = "plate",
    remap_prefix: Sequence[str] | Mapping[str, str] = (),
    image_size: int | None = 256,
    workers: int = 1,
    skip_bad: bool = False,
    name: str | None = None,
    verbose: bool = True,
) -> Path:
    """Build a dataset directory from cpg0004 (LINCS Cell Painting) load_data files.

    Parameters
    ----------
    root
        Folder with the per-plate ``load_data.csv`` files.
    out
        Dataset directory to write (resumed when a build with the same inputs was killed).
    load_data
        Glob of the load_data files under ``root``.
    platemaps
        Folders with ``barcode_platemap.csv`` and ``platemap/*.txt`` (default: found under
        ``root``).
    moa
        ``repurposing_info_external_moa_map_resolved.tsv`` (MoA per broad_sample).
    batch_column
        What a batch is: ``"plate"`` (as in the paper), ``"Batch_Number"`` or ``"Batch_Date"``.
    remap_prefix
        Rewrite image paths or URLs starting with OLD to start with NEW: ``["OLD=NEW"]`` or
        ``{"OLD": "NEW"}``.
    image_size
        Resize every image to N x N pixels (anti-aliased; None keeps the native size).
    workers
        Reader processes.
    skip_bad
        Drop images with missing or unreadable files (listed in ``skipped.csv``).
    name
        Dataset name recorded in ``dataset.json``.
    verbose
        Print the build's warnings and its one-line summary.

    Returns
    -------
    pathlib.Path
        The dataset directory.
    """
    from cdcl.data.cellpainting import build_cpg0004 as _build
    from cdcl.locking import command_lock

    _check_workers(workers)
    remaps = _remaps(remap_prefix)
    with command_lock(Path(out), "cdcl build cpg0004"):
        rep = _build(
            Path(root),
            Path(out),
            platemaps=[Path(p) for p in platemaps] if platemaps else None,
            moa=Path(moa) if moa is not None else None,
            batch_column=batch_column,
            load_data=load_data,
            remaps=remaps,
            image_size=image_size,
            workers=workers,
            skip_bad=skip_bad,
            name=name,
        )
    return _built(rep, verbose)


def _remaps(values: Sequence[str] | Mapping[str, str]) -> list[tuple[str, str]]:
    """``["OLD=NEW", ...]`` or ``{"OLD": "NEW"}`` as (old, new) pairs."""
    from cdcl.errors import CdclError

    if isinstance(values, Mapping):
        return [(str(k), str(v)) for k, v in values.items()]
    out = []
    for v in values:
        if "=" not in v:
            raise CdclError(f"--remap-prefix {v}: expected OLD=NEW")
        old, new = v.split("=", 1)
        out.append((old, new))
    return out


def open_dataset(path: PathLike) -> Dataset:
    """Open a dataset directory (validated) for reading.

    Parameters
    ----------
    path
        A directory written by `synth`, `build_table` or ``cdcl build``.

    Returns
    -------
    cdcl.data.dataset_dir.Dataset
        ``.samples`` (one metadata row per image), ``.channels``, ``.image_size``, and
        ``.read_many(indices)`` / ``.standardized(indices)`` for pixels.
    """
    from cdcl.data.dataset_dir import open_dataset as _open

    return _open(Path(path))


def info(path: PathLike, *, deep: bool = False, verbose: bool = False) -> str:
    """A readable summary of a dataset directory (the text ``cdcl info`` prints).

    When the default split's held-out batches cannot be (fully) evaluated, a warning naming the
    fix goes to stderr.

    Parameters
    ----------
    path
        Dataset directory.
    deep
        Also decode every image chunk.
    verbose
        Also print the summary (on stdout, before any warning).

    Returns
    -------
    str
        Design, channels, held-out batches of the default split and the validation result.
    """
    from cdcl.data.summary import split_warnings, summarize

    text = summarize(Path(path), deep=deep)
    if verbose:
        print(text)
    for problem in split_warnings(Path(path)):
        print(f"cdcl info: warning: {problem}", file=sys.stderr)
    return text


def presets() -> list[str]:
    """The names of the training presets (``cdcl train --list-presets``).

    Returns
    -------
    list of str
        Preset names, for `train`'s ``preset``.
    """
    from cdcl.config import preset_names

    return list(preset_names())


def train_config(
    data: PathLike,
    preset: str | PathLike = "generic-cdcl",
    *,
    split: int | None = None,
    subset: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> tuple[Config, list[str], list[str], list[str]]:
    """The resolved config of `train`, all its overrides, the user's, and notices."""
    from cdcl.train.configure import train_config as _resolve

    return _resolve(data, preset, split=split, subset=subset, overrides=overrides)


def train(
    data: PathLike,
    out: PathLike,
    preset: str | PathLike = "generic-cdcl",
    *,
    split: int | None = None,
    subset: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    resume: bool = False,
) -> Path:
    """Train a representation on a dataset directory into a run directory.

    Parameters
    ----------
    data
        Dataset directory.
    out
        Run directory (checkpoints, ``config.yaml``, ``metrics.jsonl``).
    preset
        Preset name or a YAML file (``cdcl train --list-presets``). For your own screen,
        ``generic-cdcl`` or ``generic-dino``: sized from the dataset (image size, number of
        images, images seen); ``synthetic-*``, ``bbbc021-*``, ``rxrx1-*`` and ``cpg0004-*``
        reproduce the settings used for those datasets.
    split
        Held-out-batch fold (default: the dataset's stored split, else fold 1).
    subset
        Training-subset strategy, e.g. ``only_controls``.
    overrides
        Config values, ``{"train.epochs": 1}`` or ``["train.epochs=1"]``.
    resume
        Continue from ``out/checkpoints/last.pt``.

    Returns
    -------
    pathlib.Path
        The run directory.

    Notes
    -----
    Prints a warning when the held-out batches of the chosen fold leave some figures empty
    (too few held-out batches, or no treatments shared with training), naming a fold that
    fixes it. Works under ``torchrun`` (only rank 0 writes).
    """
    from cdcl.locking import command_lock
    from cdcl.train.loop import prepare_data
    from cdcl.train.loop import train as _train
    from cdcl.train.preflight import fit_batch, split_problems

    cfg, all_overrides, user, notes = train_config(
        data, preset, split=split, subset=subset, overrides=overrides
    )
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with command_lock(Path(out), "cdcl train"):
        run_data = prepare_data(cfg)
        if rank0:
            for note in notes:
                print(f"cdcl train: notice: {note}", file=sys.stderr)
            for problem in split_problems(run_data.ds, cfg):
                print(f"cdcl train: warning: {problem}", file=sys.stderr)
        cfg = fit_batch(
            cfg, preset, all_overrides, Path(data), len(run_data.train_rows), user_overrides=user
        )
        _train(cfg, Path(out), resume=resume)
    return Path(out)


def embed(
    source: PathLike | None = None,
    data: PathLike | None = None,
    *,
    out: PathLike | None = None,
    fmt: str | None = None,
    checkpoint: str = "best",
    split: str = "all",
    fold: int | None = None,
    level: str = "well",
    batch_size: int = 64,
    workers: int | None = None,
    chunk_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    features: str | None = None,
    families: Sequence[str] | str | None = None,
    segmentation: str = "auto",
    nucleus_diameter: float | None = None,
    normalize: str = "mad_robustize",
    select: bool = True,
    progress: bool = False,
    as_anndata: bool = False,
    read_back: bool = True,
) -> pd.DataFrame | anndata.AnnData | Path | None:
    """Embed a dataset with a run's backbone (or a baseline) into image or well profiles.

    With ``features="cellprofiler"`` the profiles are hand-crafted instead: every cell
    segmented and measured with cp-measure, the median per well, normalised per plate against
    the controls and feature-selected (docs/cellprofiler.md); no run is needed.

    Parameters
    ----------
    source
        Run directory, checkpoint file, ``"random:<timm arch>"`` or ``"intensity"`` (None, or
        ``"cellprofiler"``, with ``features="cellprofiler"``).
    data
        Dataset directory (default: the run's; required for baselines and CellProfiler).
    out
        Also write the profiles to this ``.parquet``, ``.h5ad`` or ``.csv`` file (resumable:
        a killed job redoes at most one part); held under a lock while it is written.
    fmt
        The file format, ``"parquet"``, ``"h5ad"`` or ``"csv"`` (default: from ``out``'s
        extension, else parquet, whose extension is then added).
    checkpoint
        Which checkpoint of a run: ``"best"`` or ``"last"``.
    split
        Which images to embed (``"all"``, ``"train"``, ``"val"`` or ``"test"``); every
        profile carries ``Metadata_Split``, the part of the run's held-out-batch split it
        belongs to.
    fold
        Held-out-batch fold (default: the run's).
    level
        ``"well"``: well profiles (mean over sites; the median of the cells for CellProfiler);
        ``"image"``: one profile per image.
    batch_size
        Images per forward pass.
    workers
        Loader processes (default: 4 with CUDA, 0 on the CPU); for CellProfiler, processes
        measuring cells (default 1).
    chunk_size
        Images per resumable part of ``out`` (default 4096; 64 for CellProfiler).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    seed
        Seed of a random backbone.
    features
        ``"cellprofiler"`` for CellProfiler features; None for a network or a baseline.
    families
        CellProfiler: the cp-measure feature families, a list or comma-separated, or
        ``"all"`` (default: the cheapest, see docs/cellprofiler.md).
    segmentation
        CellProfiler: ``"masks"`` (the cell masks stored with the dataset), ``"otsu"`` (Otsu
        and watershed on the DNA channel) or ``"auto"`` (masks when stored, else otsu).
    nucleus_diameter
        CellProfiler with otsu: the typical nuclear diameter in pixels (default: estimated per
        image).
    normalize
        CellProfiler: pycytominer's per-plate normalisation against the controls.
    select
        CellProfiler: pycytominer's feature selection (False keeps every feature and
        missing values).
    progress
        Show a progress bar on stderr.
    as_anndata
        Return an AnnData (features in ``X``, metadata in ``obs``, provenance in ``uns``)
        instead of a DataFrame.
    read_back
        With ``out``: return the profiles read back from the file; False returns the file's
        path instead (for tables larger than memory, as ``cdcl embed`` does).

    Returns
    -------
    pandas.DataFrame or anndata.AnnData or pathlib.Path
        ``Metadata_*`` columns (``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Batch``, ...)
        and feature columns that pycytominer infers (the written file without
        ``read_back``); None on non-zero torchrun ranks.
    """
    cellprofiler = _embed_kind(source, features, data, checkpoint, device, read_back, out)
    common = dict(split=split, split_number=fold, level=level, fmt=fmt, workers=workers)
    common.update(progress=progress)
    if cellprofiler:
        from cdcl.embed.cellprofiler_features import CellProfilerOptions, parse_families
        from cdcl.embed.to_file import cellprofiler_to_file

        options = CellProfilerOptions(  # checked before anything is read
            families=parse_families(families),
            segmentation=segmentation,
            normalize=normalize,
            select=select,
            nucleus_diameter=nucleus_diameter,
        )

        def write(path: Path, quiet: bool) -> Path | None:
            dataset = Path(str(data))  # _embed_kind refused None
            return cellprofiler_to_file(
                dataset, path, options, chunk_size=chunk_size, quiet=quiet, **common
            )
    else:
        network = dict(checkpoint=checkpoint, batch_size=batch_size, device=device, seed=seed)
        network.update(chunk_size=4096 if chunk_size is None else chunk_size)

        def write(path: Path, quiet: bool) -> Path | None:
            return _network_to_file(str(source), path, data, quiet=quiet, **common, **network)

    def embed_into(path: Path, quiet: bool) -> Any:
        written = write(path, quiet)
        if written is None or not read_back:
            return written
        return _read_profiles(written, as_anndata)

    if out is not None:
        return embed_into(Path(out), quiet=False)
    with tempfile.TemporaryDirectory(prefix="cdcl-embed-") as tmp:
        name = "profiles.h5ad" if as_anndata else "profiles.parquet"
        return embed_into(Path(tmp) / name, quiet=True)


def _network_to_file(source: str, path: Path, data: PathLike | None, **options: Any) -> Path | None:
    """A network's (or a baseline's) profiles written to ``path`` under its lock."""
    from cdcl.embed.to_file import embed_to_file, output_path
    from cdcl.locking import command_lock

    with command_lock(output_path(path, options.get("fmt")), "cdcl embed"):
        return embed_to_file(source, path, data=Path(data) if data is not None else None, **options)


def _embed_kind(
    source: PathLike | None,
    features: str | None,
    data: PathLike | None,
    checkpoint: str,
    device: str,
    read_back: bool,
    out: PathLike | None,
) -> bool:
    """Check what `embed` is asked to do; True for CellProfiler features, False for a network."""
    from cdcl.errors import CdclError

    if features not in (None, "cellprofiler"):
        raise CdclError(f"--features {features}: the only hand-crafted features are cellprofiler")
    if checkpoint not in ("best", "last"):
        raise CdclError(f"--checkpoint {checkpoint}: use best or last")
    if device not in ("auto", "cpu", "cuda"):
        raise CdclError(f"--device {device}: use auto, cpu or cuda")
    cellprofiler = features == "cellprofiler" or str(source) == "cellprofiler"
    if source is None and not cellprofiler:
        raise CdclError("give a SOURCE (run, checkpoint, random:<arch>, intensity) or --features")
    if cellprofiler and source not in (None, "cellprofiler"):
        raise CdclError(f"{source}: --features cellprofiler takes no run or checkpoint")
    if cellprofiler and data is None:
        raise CdclError("--features cellprofiler needs --data DIR (the dataset to measure)")
    if not read_back and out is None:
        raise CdclError("read_back=False returns the written file: give out=PATH")
    return cellprofiler


def _read_profiles(path: Path, as_anndata: bool) -> pd.DataFrame | anndata.AnnData:
    """A written profile file, in memory, as a DataFrame or an AnnData."""
    from cdcl.profiles.table import frame_to_anndata, read_profile_table

    if str(path).lower().endswith(".h5ad") and as_anndata:
        import anndata as ad

        return ad.read_h5ad(path)  # fully in memory (not backed), so the file may go
    table = read_profile_table(path)
    return frame_to_anndata(table) if as_anndata else table


def _profile_frame(profiles: Any) -> pd.DataFrame | None:
    """A profile DataFrame from a DataFrame or an AnnData; None for anything else."""
    import pandas as pd

    if isinstance(profiles, pd.DataFrame):
        return profiles
    if type(profiles).__name__ == "AnnData":
        from cdcl.profiles.table import anndata_to_frame

        return anndata_to_frame(profiles)
    return None


def evaluate(
    profiles: pd.DataFrame | anndata.AnnData | PathLike,
    out: PathLike | None = None,
    *,
    fold: int | None = None,
    batch_col: str | None = None,
    batch_pattern: str | None = None,
    treatment_col: str | None = None,
    compound_col: str | None = None,
    moa_col: str | None = None,
    plate_col: str | None = None,
    well_col: str | None = None,
    control_query: str | None = None,
    eval_on: str | None = None,
    tvn: bool = False,
    variants: Sequence[str] | str = ("raw", "plate_normalized"),
    name: str | None = None,
    corrections: Sequence[str] | str = (),
    checkpoint: str = "best",
    data: PathLike | None = None,
    level: str = "well",
    baselines: bool = True,
    cellprofiler: bool = False,
    batch_size: int = 64,
    null_size: int = 2000,
    seed: int = 0,
    calibrate: bool | None = None,
    umap: bool = True,
    plot_sample: int = 20_000,
    progress: bool = False,
) -> dict[str, Any]:
    """Score profiles (or a run) with every metric: batch mixing, biology, retrieval.

    ``cdcl evaluate RUN`` and ``cdcl evaluate --features FILE`` call this function with the
    same defaults, so a table scores the same here and on the command line. Every option is
    checked, and ``out`` too, before anything is loaded; a feature set whose every metric
    came out empty is refused (CdclError) before anything is written.

    Parameters
    ----------
    profiles
        A profile table with ``Metadata_*`` columns (as `embed` returns, or
        pycytominer's output), an AnnData (metadata in ``obs``), a ``.parquet`` / ``.csv`` /
        ``.h5ad`` file, or a run directory (then the run is embedded with its baselines).
    out
        Directory for ``results.json``, ``report.html`` and plots (default: a temporary one
        for tables, the run directory for runs); held under a lock while it is written. An
        existing file (the input table, say) is refused at once.
    fold
        Held-out-batch fold for the classification probes. Default: the table's
        ``Metadata_Split`` column (what the run held out) when it has one, else fold 1.
    batch_col
        The batch column (default: ``Metadata_Batch``; without one, each plate is its own
        batch). Names are matched ignoring case, with or without ``Metadata_``. For a run,
        any ``Metadata_*`` column of its dataset: mixing is judged by it, the held-out plates
        stay the run's (pair by plate, judge by acquisition batch).
    batch_pattern
        A regular expression applied to the batch column; its first group is the batch
        (e.g. ``^(Week\\d+)``).
    treatment_col
        The treatment column, or several joined with commas (default: ``Metadata_Treatment``,
        ``Metadata_pert_iname``, ``Metadata_broad_sample`` or ``Metadata_Compound``).
    compound_col
        The compound column (default: ``Metadata_Compound`` or ``Metadata_pert_iname``).
    moa_col
        The mechanism-of-action column (default: ``Metadata_MoA``).
    plate_col
        The plate column (default: ``Metadata_Plate``).
    well_col
        The well column (default: ``Metadata_Well``).
    control_query
        A control query selecting the negative-control rows, e.g.
        ``"Metadata_Compound == 'DMSO'"``: cdcl's own condition language (column
        comparisons, ``in [...]``, ``&``, ``|``, ``~``), parsed and never run as Python;
        not a pandas query (see the Reliability page for what it accepts).
        Default: the rows whose ``Metadata_control_type`` is ``negcon``, else a True/False
        ``Metadata_is_control`` column, else treatments or compounds named like DMSO.
    eval_on
        Rows for the unsupervised metrics of a table: ``"all"`` or ``"test"``. Default: the
        held-out (``test``) rows when the table has a ``Metadata_Split`` column, as for a run,
        else all rows.
    tvn
        Also score the table after typical variation normalisation (a run's own feature set
        always gets its ``+tvn`` row).
    variants
        For a table: the profile variants to score, ``raw`` and ``plate_normalized`` (a
        list or comma-separated; ``"raw"`` alone needs one copy of the table less).
    name
        For a table: the feature set's name in the results (default: ``features``).
    corrections
        Also score after post-hoc corrections: ``sphering``, ``harmony``, ``combat``.
    checkpoint
        For a run directory: which checkpoint, ``"best"``, ``"last"`` or the path of a
        checkpoint file.
    data
        For a run directory: the dataset to embed (default: the run's).
    level
        For a run directory: ``"well"`` or ``"image"`` profiles.
    baselines
        For a run directory: also score the intensity and random-network baselines.
    cellprofiler
        For a run directory: also score CellProfiler features of its images (cp-measure on
        every cell, median per well, normalised and feature-selected), with the
        ``corrections`` rows.
    batch_size
        For a run directory: images per forward pass.
    null_size
        Size of the mAP null distribution.
    seed
        Seed of the baselines, the null distributions, kBET and UMAP.
    calibrate
        Also score the main feature set's design under a null (profiles permuted within
        treatment) and injected batch effects; metrics that cannot see the strongest are
        marked "no power" and left out of the aggregate. Default (None): on small designs
        (under 50 evaluated profiles per batch) only; False never.
    umap
        Draw UMAP plots into the report: on by default, here and in ``cdcl evaluate``
        (``--no-umap``). Without ``out`` a table's report is temporary and no plots are drawn.
    plot_sample
        UMAPs draw a seeded sample of at most this many rows, stratified by batch and
        treatment (0: every row); the metrics always use every row.
    progress
        Show progress bars on stderr.

    Returns
    -------
    dict
        The contents of ``results.json``; `metrics` turns it into a table.
    """
    from cdcl.evaluation.checks import check_options, check_out, parse_variants
    from cdcl.profiles.columns import ColumnSpec
    from cdcl.profiles.correction import parse_corrections

    # One spec for the command line and Python alike: the same checks, the same reading.
    columns = _from_arguments(ColumnSpec, locals())
    frame, is_run = _profiles_input(profiles)
    check_options(
        level=level,
        eval_on=eval_on,
        plot_sample=plot_sample,
        table=not is_run,
        cellprofiler=cellprofiler,
    )
    # Checked before any loading: a typo costs no embedding time.
    corr = parse_corrections(corrections) if corrections else ()
    chosen = parse_variants(variants)
    check_out(out, Path(profiles) if frame is None and not is_run else None)
    options = dict(null_size=null_size, seed=seed, umap=umap, calibrate=calibrate)
    options.update(plot_sample=plot_sample, corrections=corr, progress=progress)
    if is_run:
        run = dict(checkpoint=checkpoint, data=data, fold=fold, level=level, batch_size=batch_size)
        # A run's batch_col only says which column mixing is judged by.
        run.update(baselines=_baselines(baselines, cellprofiler), batch_col=columns.batch_col)
        return _evaluate_run(Path(profiles), out, **run, **options)
    table = frame if frame is not None else Path(profiles)
    settings = dict(split_number=fold, eval_on=eval_on, tvn=tvn, name=name, variants=chosen)
    return _evaluate_table(table, out, columns, {**settings, **options})


def _profiles_input(profiles: Any) -> tuple[pd.DataFrame | None, bool]:
    """`evaluate`'s input: a DataFrame (None for a file or a run) and whether it is a run."""
    frame = _profile_frame(profiles)
    is_run = frame is None and Path(profiles).is_dir()
    if frame is None and not is_run and not Path(profiles).is_file():
        from cdcl.errors import CdclError

        raise CdclError(f"{profiles}: no such run directory or profile table")
    return frame, is_run


def _baselines(baselines: bool, cellprofiler: bool) -> tuple[str, ...]:
    """The feature sets a run is scored against besides its own."""
    extra = ("cellprofiler",) if cellprofiler else ()
    return (("intensity", "random") if baselines else ()) + extra


def _evaluate_run(run: Path, out: PathLike | None, **options: Any) -> dict[str, Any]:
    """`evaluate` of a run directory under its output's lock; the results."""
    from cdcl.evaluation.checks import refuse_empty
    from cdcl.evaluation.run import evaluate_run  # models and views: runs only
    from cdcl.locking import command_lock
    from cdcl.progress import keep_alive
    from cdcl.report.results import read_results

    level = options["level"]
    options["split_number"] = options.pop("fold")
    # Embedding, scoring and drawing: a line per stage, and one after every 10 s of silence.
    with command_lock(Path(out) if out is not None else run, "cdcl evaluate"):
        with keep_alive(options["progress"]):
            path = evaluate_run(
                run,
                out=out,
                before_write=lambda res: refuse_empty(res, table=False, level=level),
                **options,
            )
    return read_results(path)


BIG_TABLE_BYTES = 64 * 2**20  # a profile table this large prints progress from the start


def _evaluate_table(
    table: pd.DataFrame | Path,
    out: PathLike | None,
    columns: ColumnSpec,
    options: dict[str, Any],
) -> dict[str, Any]:
    """`evaluate` of a profile table under its output's lock (or in a temporary directory)."""
    from cdcl.locking import command_lock
    from cdcl.progress import keep_alive, say
    from cdcl.report.results import read_results

    options = dict(options)
    progress = options.pop("progress")

    def score(where: Path) -> dict[str, Any]:
        from cdcl.evaluation.checks import refuse_empty
        from cdcl.evaluation.table_file import evaluate_table

        def before_write(res: dict[str, Any]) -> None:
            refuse_empty(res, table=True, level="well")

        path = evaluate_table(table, where, columns=columns, **options, before_write=before_write)
        return read_results(path)

    if out is None:
        options["umap"] = False  # the report is temporary: nothing would see the plots
        with tempfile.TemporaryDirectory(prefix="cdcl-evaluate-") as tmp:
            return score(Path(tmp))
    with command_lock(Path(out), "cdcl evaluate"):
        # Importing the metric libraries takes seconds (tens on a busy machine): a large table
        # gets a first line and the keep-alive before them, not after.
        big = progress and isinstance(table, Path) and table.stat().st_size > BIG_TABLE_BYTES
        if big:
            say("cdcl evaluate: loading the evaluation libraries ...")
        with keep_alive(big):
            return score(Path(out))


def metrics(results: Mapping[str, Any] | PathLike) -> pd.DataFrame:
    """The headline metrics of `evaluate`'s results: one row per feature set.

    Parameters
    ----------
    results
        What `evaluate` returned, or a ``results.json`` file (or its directory).

    Returns
    -------
    pandas.DataFrame
        Columns are metrics (batch mixing, biology, retrieval); NaN where a metric could not
        be computed (``results["feature_sets"][name]["unavailable"]`` says why).
    """
    from cdcl.report.html import metrics_table
    from cdcl.report.results import read_results

    res = read_results(Path(results)) if not isinstance(results, Mapping) else dict(results)
    import pandas as pd

    return metrics_table(res).apply(pd.to_numeric)


def correct(
    profiles: pd.DataFrame | anndata.AnnData | PathLike,
    method: str = "harmony",
    *,
    batch_col: str | None = None,
    plate_col: str | None = None,
    treatment_col: str | None = None,
    control_query: str | None = None,
    seed: int = 0,
) -> pd.DataFrame | anndata.AnnData:
    """Post-hoc batch correction of a profile table: sphering, Harmony or ComBat.

    Parameters
    ----------
    profiles
        Profiles with ``Metadata_*`` columns (or ``obs``).
    method
        ``"harmony"`` (harmonypy) and ``"combat"`` (scanpy) are fitted on these profiles with
        their batch labels; ``"sphering"`` whitens with the controls' covariance.
    batch_col
        The batch column, as in `evaluate`.
    plate_col
        The plate column, as in `evaluate`.
    treatment_col
        The treatment column, as in `evaluate`.
    control_query
        The negative controls, as in `evaluate` (sphering needs them).
    seed
        Seed of Harmony's clustering.

    Returns
    -------
    pandas.DataFrame or anndata.AnnData
        The same metadata with corrected features (an AnnData when given one).
    """
    from cdcl.profiles.columns import ColumnSpec
    from cdcl.profiles.correction import apply_corrections, parse_corrections
    from cdcl.profiles.table import frame_to_anndata, profile_table, read_profile_table, split_table

    columns = _from_arguments(ColumnSpec, locals())
    (name,) = parse_corrections(method)
    frame = _profile_frame(profiles)
    was_anndata = frame is not None and type(profiles).__name__ == "AnnData"
    if frame is None:
        frame = read_profile_table(Path(profiles))
    x, meta_table, _ = split_table(frame)
    meta = columns.resolve(meta_table)
    fixed = apply_corrections(
        x, meta["batch"].to_numpy(), meta["is_control"].to_numpy(bool), [name], seed=seed
    )[name]
    table = profile_table(fixed, meta_table)
    if was_anndata:
        out = frame_to_anndata(table)
        out.uns.update(dict(profiles.uns))  # type: ignore[union-attr]
        out.uns.setdefault("cdcl", {})["correction"] = name
        return out
    return table


def compare(
    runs: Sequence[PathLike],
    out: PathLike,
    *,
    names: Sequence[str] | str | None = None,
) -> Path:
    """Put the results of several runs (or evaluated tables) side by side.

    Parameters
    ----------
    runs
        Directories holding ``results.json`` (or the files themselves).
    out
        Output directory for ``comparison.csv``, ``umap_grid.png`` and ``compare.html``;
        held under a lock while it is written.
    names
        Display names, one per run (a list or comma-separated; default: from the paths).

    Returns
    -------
    pathlib.Path
        The comparison page (``compare.html``).
    """
    from cdcl.errors import CdclError
    from cdcl.locking import command_lock
    from cdcl.report.html import compare as _compare

    dirs = [Path(r) for r in runs]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    if names is not None and len(names) != len(dirs):
        raise CdclError(f"--names has {len(names)} names for {len(dirs)} runs")
    if Path(out).exists() and not Path(out).is_dir():
        raise CdclError(f"--out {out}: is a file; give a directory for the comparison")
    with command_lock(Path(out), "cdcl compare"):
        return _compare(dirs, Path(out), names=list(names) if names else None)


def demo(
    out: PathLike = "demo_out",
    *,
    dataset: str = "synthetic",
    bbbc021_dir: PathLike | None = None,
    quick: bool = False,
    fresh: bool = False,
    seed: int = 0,
    epochs: int | None = None,
    calibrate: bool = False,
    cellprofiler: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """The paper's central comparison: DINO, DINO-CB, CDCL and a supervised baseline.

    Trains every method with one budget on the simulated screen (or the BBBC021 week-4 crops),
    evaluates them with the baselines on held-out batches and writes ``report.html``,
    ``results.md`` and ``results.json``. Every option is checked before anything is written.

    Parameters
    ----------
    out
        Output directory (finished steps are reused); held under a lock while it runs.
    dataset
        ``"synthetic"``: the built-in ``small`` screen; ``"bbbc021"``: the real week-4 crops
        (DINO and CDCL on 4 plates, evaluated on the 2 held-out plates).
    bbbc021_dir
        The folder with ``cells_subset.npz`` (for ``dataset="bbbc021"``).
    quick
        The tiny screen and two epochs per method: a check that everything runs, not a result.
    fresh
        Rebuild the data and retrain everything.
    seed
        Random seed.
    epochs
        Training epochs per method (default: the budget).
    calibrate
        Also score the first method's held-out design under a null and injected batch
        effects (see `evaluate`).
    cellprofiler
        Add the CellProfiler row and its +sphering/+harmony/+combat rows.
    progress
        Show progress bars and a line per step.

    Returns
    -------
    dict
        ``{"table": ..., "timings": {stage: seconds}, "paths": {"html", "md", ...}}``.
    """
    import torch

    from cdcl.experiments.demo import DemoSpec, check_demo_spec, run_demo
    from cdcl.locking import command_lock

    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = DemoSpec(
        out=Path(out),
        dataset=dataset,
        quick=quick,
        fresh=fresh,
        seed=seed,
        epochs=epochs,
        bbbc021_dir=Path(bbbc021_dir) if bbbc021_dir is not None else None,
        progress=progress,
        calibrate=calibrate,
        cellprofiler=cellprofiler,
    )
    check_demo_spec(spec)  # every option, before the lock or any file exists
    with command_lock(spec.out, "cdcl demo"):
        return run_demo(spec)


def study(
    out: PathLike = "study_out",
    *,
    dataset: str = "synthetic",
    methods: Sequence[str] | str | None = None,
    seeds: Sequence[int] | str | None = None,
    folds: Sequence[int] | str | None = None,
    references: Sequence[str] | str | None = None,
    epochs: int | None = None,
    quick: bool = False,
    fresh: bool = False,
    bbbc021_dir: PathLike | None = None,
    alpha: float = 0.05,
    test_batches: int | None = None,
    batch_strength: float | Sequence[float] | str | None = None,
    cellprofiler: bool = False,
    calibrate: bool = False,
    train_treatments: str = "all",
    note: str | None = None,
    data: PathLike | None = None,
    level: str | None = None,
    primary_metric: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Replicated comparison of methods (seeds x folds) with paired statistics.

    Every option is checked before anything is written (a repeated seed or fold, say).

    Parameters
    ----------
    out
        Study directory (``study.json``, ``study.md``, ``report.html``, one folder per
        replicate; finished replicates are reused); held under a lock while it runs.
    dataset
        What to train and evaluate on: ``"synthetic"`` (the ``small`` screen, regenerated per
        seed) or ``"bbbc021"`` (the real week-4 crops).
    methods
        Methods to compare, a list or comma-separated (default: every method of the dataset;
        ``CDCL-same-batch``, the pairing control, only when named).
    seeds
        Replicates: every seed on every fold, a list or comma-separated (default ``0,1,2``;
        with ``quick``, ``0,1``). On the simulated screen the seed sets both the screen and
        the training.
    folds
        Held-out-batch folds, a list or comma-separated (default: the stored split).
    references
        Rows every other row is compared with, a list or comma-separated; rows not present
        are skipped (default ``DINO,DINO+harmony``; with ``cellprofiler`` also
        ``CellProfiler+harmony``).
    epochs
        Training epochs per replicate (default: the demo's).
    quick
        The tiny screen, two replicates and the demo's quick budget, to check the set-up.
    fresh
        Rerun every replicate instead of reusing finished ones.
    bbbc021_dir
        The BBBC021 folder (for ``dataset="bbbc021"``).
    alpha
        Level of the paired tests.
    test_batches
        Simulated screen: held-out batches, added after the training batches (default: the
        preset's).
    batch_strength
        Simulated screen: batch-effect multiplier (0 none, 1 calibrated). Several (a list or
        ``"0,0.5,1,2"``) run one study per strength in ``OUT/bs<s>/`` and write the curve
        of CDCL - reference against strength (``curve.md``, ``curve.json``, ``curve.png``).
    cellprofiler
        Add the CellProfiler row and its corrected rows to every replicate.
    calibrate
        Calibrate every replicate's design; pre-declared metrics without power are reported
        and left out of the verdicts.
    train_treatments
        ``"all"`` (default): the methods train on every compound. ``"half"``: every method
        trains on the same half of the compounds (drawn with each replicate's seed) plus the controls, and
        every metric is also reported on the seen and on the unseen compounds.
    note
        The design's rationale (why these seeds, say), stored in ``design.json`` with the
        endpoints when the design is fixed; ignored once it is.
    data
        A screen you built (``cdcl build table``, ``build rxrx1``, ``build cpg0004``): the
        methods train with the ``generic-*`` presets on its training batches, and ``folds``
        are its held-out-batch folds (``--split N`` of training). Leave-one-plate-out or
        leave-one-replicate-out come from building it with that column as the batch.
    level
        ``"well"`` or ``"image"`` profiles (default: the dataset's; image on BBBC021).
    primary_metric
        The metric of the pre-registered primary endpoint (CDCL − the first reference), one
        of the comparison table's (default: replicate mAP across batches, which needs two
        held-out batches per fold).
    progress
        Show progress bars and a line per step.

    Returns
    -------
    dict
        ``{"study": ..., "paths": {"json", "md", "html"}}``; with several batch strengths
        ``{"curve": ..., "studies": ..., "paths": {"json", "md", "png"}}``.
    """
    import torch

    from cdcl.experiments.curve import check_curve, parse_strengths, run_curve
    from cdcl.experiments.study import StudySpec, check_spec, run_study
    from cdcl.locking import command_lock

    torch.set_num_threads(max(1, torch.get_num_threads()))
    strengths = parse_strengths(_joined(batch_strength))
    spec = StudySpec(
        out=Path(out),
        dataset=_study_dataset(dataset, data),
        data=Path(data) if data is not None else None,
        level=level,
        **({"primary_metric": primary_metric} if primary_metric is not None else {}),
        methods=_words(methods),
        seeds=_ints(seeds, "--seeds") or ((0, 1) if quick else (0, 1, 2)),
        folds=_ints(folds, "--folds"),
        references=_study_references(references, cellprofiler),
        epochs=epochs,
        quick=quick,
        fresh=fresh,
        bbbc021_dir=Path(bbbc021_dir) if bbbc021_dir is not None else None,
        progress=progress,
        alpha=alpha,
        test_batches=test_batches,
        batch_strength=strengths[0] if strengths and len(strengths) == 1 else None,
        cellprofiler=cellprofiler,
        calibrate=calibrate,
        train_treatments=train_treatments,
        note=note,
    )
    curve = strengths is not None and len(strengths) > 1
    # every option, before the lock or any file exists
    check_curve(spec, strengths) if curve else check_spec(spec)  # type: ignore[arg-type]
    with command_lock(spec.out, "cdcl study"):
        return run_curve(spec, strengths) if curve else run_study(spec)  # type: ignore[arg-type]


def _study_dataset(dataset: str, data: PathLike | None) -> str:
    """The study's dataset: ``"custom"`` for a screen given with ``data``."""
    if data is not None and dataset != "synthetic":
        from cdcl.errors import CdclError

        raise CdclError("--data DIR: your screen replaces --dataset; give one of them")
    return dataset if data is None else "custom"


def _study_references(
    references: Sequence[str] | str | None, cellprofiler: bool
) -> tuple[str, ...]:
    """The rows a study compares every other row with (the defaults when not named)."""
    from cdcl.experiments.curve import CURVE_REFERENCES
    from cdcl.experiments.study import DEFAULT_REFERENCES

    if references is None:
        return CURVE_REFERENCES if cellprofiler else DEFAULT_REFERENCES
    return _words(references) or ()


def _joined(value: float | Sequence[Any] | str | None) -> str | None:
    """A number, a list or a comma-separated string as one comma-separated string."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return ",".join(str(v) for v in value)


def _words(value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """A list or a comma-separated string of names as a tuple (None when empty)."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    names = tuple(str(v).strip() for v in parts if str(v).strip())
    return names or None


def _ints(value: Sequence[int] | str | None, option: str) -> tuple[int, ...] | None:
    """A list or a comma-separated string of integers as a tuple (None when empty)."""
    from cdcl.experiments.study import parse_ints

    return parse_ints(_joined(value), option)
