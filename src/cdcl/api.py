"""The Python API: one verb per step of a screen, for notebooks and scripts.

Every command of the ``cdcl`` command line calls one of these functions, so a notebook and a
shell script run the same code::

    import cdcl

    data = cdcl.synth("screen", preset="tiny")              # or cdcl.build_table(...)
    run = cdcl.train(data, "runs/cdcl", preset="synthetic-cdcl", overrides={"train.epochs": 1})
    profiles = cdcl.embed(run)                              # a Metadata_* DataFrame
    results = cdcl.evaluate(profiles)                       # DataFrame, AnnData, file or run
    cdcl.metrics(results)                                   # one row per feature set

Heavy libraries (torch, timm, scanpy) are imported inside the verbs, so ``import cdcl`` is fast.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - imported for annotations only
    import anndata
    import pandas as pd

    from cdcl.config import Config
    from cdcl.data.dataset_dir import Dataset

__all__ = [
    "build_table",
    "correct",
    "embed",
    "evaluate",
    "info",
    "metrics",
    "open_dataset",
    "study",
    "synth",
    "train",
]

PathLike = str | os.PathLike


def synth(
    out: PathLike,
    preset: str = "small",
    *,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
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
    progress
        Show a progress bar on stderr.
    **overrides
        Fields of the screen's configuration, e.g. ``batches=4``, ``sites=2``,
        ``image_size=48``, ``test_batches=1`` (the options of ``cdcl synth``).

    Returns
    -------
    pathlib.Path
        The dataset directory.
    """
    from cdcl.data.synthetic import generate
    from cdcl.locking import command_lock

    with command_lock(Path(out), "cdcl synth"):
        return generate(
            Path(out), preset, seed, overwrite=overwrite, progress=progress, **overrides
        )


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
    import contextlib

    from cdcl.data.crops import CENTER_COLUMNS, CropSpec
    from cdcl.data.table import TableOptions
    from cdcl.data.table import build_table as _build
    from cdcl.errors import CdclError
    from cdcl.locking import command_lock

    def _names(value: Sequence[str] | str) -> list[str]:
        return [c.strip() for c in (value.split(",") if isinstance(value, str) else value)]

    names = _names(channels)
    crops = None
    if crops_from is not None:
        if crop_size is None:
            raise CdclError("--crops-from needs --crop-size N, the side of the crops in pixels")
        xy = _names(crop_columns) if crop_columns is not None else list(CENTER_COLUMNS)
        if len(xy) != 2:
            raise CdclError(f"--crop-columns {','.join(xy)}: give two columns, X,Y")
        crops = CropSpec(crops_from, int(crop_size), crops_per_well, int(crop_seed), (xy[0], xy[1]))
    elif crop_size is not None or crops_per_well is not None or crop_columns is not None:
        raise CdclError("--crop-size, --crops-per-well and --crop-columns need --crops-from")
    opts = TableOptions(
        batch_col=batch_col,
        plate_col=plate_col,
        well_col=well_col,
        site_col=site_col,
        treatment_col=treatment_col,
        dose_col=dose_col,
        compound_col=compound_col,
        moa_col=moa_col,
        cell_type_col=cell_type_col,
        control_query=control_query,
        control_treatment=control_treatment,
        split_col=split_col,
        no_controls=no_controls,
    )
    guard = command_lock(Path(out), "cdcl build table") if lock else contextlib.nullcontext()
    with guard:
        rep = _build(
            samples,
            Path(out),
            names,
            opts,
            path_template=path_template,
            root=Path(root) if root is not None else None,
            npz=Path(npz) if npz is not None else None,
            npz_key=npz_key,
            channel_axis=channel_axis,
            image_size=image_size,
            name=name,
            workers=workers,
            skip_bad=skip_bad,
            rgb_channels=_names(rgb_channels) if rgb_channels is not None else None,
            crops=crops,
        )
    if verbose:
        for w in rep.warnings:
            print(f"cdcl build: warning: {w}", file=sys.stderr)
        resumed = f", resumed after {rep.resumed_from} finished" if rep.resumed_from else ""
        print(
            f"built {rep.path}: {rep.n_images} images ({rep.n_written} written{resumed}, "
            f"{rep.n_skipped} skipped) in {rep.seconds:.1f} s"
        )
    return Path(rep.path)


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
        ``.images(indices)`` / ``.standardized(indices)`` for pixels.
    """
    from cdcl.data.dataset_dir import open_dataset as _open

    return _open(Path(path))


def info(path: PathLike) -> str:
    """A readable summary of a dataset directory (the text ``cdcl info`` prints).

    Parameters
    ----------
    path
        Dataset directory.

    Returns
    -------
    str
        Design, channels, held-out batches of the default split and the validation result.
    """
    from cdcl.data.summary import summarize

    return summarize(Path(path))


def _override_list(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"train.epochs": 1}`` or ``["train.epochs=1"]`` as ``KEY=VALUE`` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        # JSON is YAML: numbers, lists, null and quoted strings parse back to what was given.
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return [str(o) for o in overrides]


def train_config(
    data: PathLike,
    preset: str | PathLike = "generic-cdcl",
    *,
    split: int | None = None,
    subset: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> tuple[Config, list[str], list[str], list[str]]:
    """The resolved config of `train`, all its overrides, the user's, and notices.

    A ``generic-*`` preset is sized from the dataset first (`cdcl.presets.sizing`): the
    network and crops from its images, the batch and epochs from the training images of the
    split. The user's overrides, then ``split`` and ``subset``, win over it.
    """
    from cdcl.config import load_config
    from cdcl.presets.sizing import (
        SCHEDULE_KEYS,
        as_overrides,
        is_generic,
        sized_overrides,
        sized_schedule,
        sizing_note,
        warmup_epochs,
    )
    from cdcl.train.data import prepare_data

    notes: list[str] = []
    user = _override_list(overrides)
    flags = [f"data.path={Path(data).resolve()}"]
    if split is not None:
        flags.append(f"data.split={int(split)}")
    if subset is not None:
        flags.append(f"data.subset={subset}")
    if not is_generic(preset):
        all_overrides = [*user, *flags]
        return load_config(preset, all_overrides), all_overrides, user, notes
    ds = open_dataset(data)
    base = [o for o in sized_overrides(ds, preset) if o.split("=", 1)[0] not in SCHEDULE_KEYS]
    cfg = load_config(preset, [*base, *user, *flags])
    # The schedule from the training images of the split, keeping what the user set.
    n_train = len(prepare_data(cfg).train_rows)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    user_keys = {o.split("=", 1)[0] for o in user}
    batch = cfg.train.batch_size if "train.batch_size" in user_keys else None
    schedule = sized_schedule(n_train, world, batch)
    if "train.epochs" in user_keys:
        schedule.pop("train.epochs")
        schedule["train.warmup_epochs"] = warmup_epochs(cfg.train.epochs)
    all_overrides = [*base, *as_overrides(schedule), *user, *flags]
    cfg = load_config(preset, all_overrides)
    notes.append(sizing_note(ds, preset, cfg, n_train, world, sorted(user_keys)))
    return cfg, all_overrides, user, notes


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
    source: PathLike,
    data: PathLike | None = None,
    *,
    out: PathLike | None = None,
    checkpoint: str = "best",
    split: str = "all",
    fold: int | None = None,
    level: str = "well",
    batch_size: int = 64,
    workers: int | None = None,
    chunk_size: int = 4096,
    device: str = "auto",
    seed: int = 0,
    progress: bool = False,
    as_anndata: bool = False,
) -> pd.DataFrame | anndata.AnnData | None:
    """Embed a dataset with a run's backbone (or a baseline) into image or well profiles.

    Parameters
    ----------
    source
        Run directory, checkpoint file, ``"random:<timm arch>"`` or ``"intensity"``.
    data
        Dataset directory (default: the run's).
    out
        Also write the profiles to this ``.parquet``, ``.h5ad`` or ``.csv`` file (resumable:
        a killed job redoes at most one part).
    checkpoint
        Which checkpoint of a run: ``"best"`` or ``"last"``.
    split
        Which images to embed (``"all"``, ``"train"``, ``"val"`` or ``"test"``); every profile carries ``Metadata_Split``, the part of the
        run's held-out-batch split it belongs to.
    fold
        Held-out-batch fold (default: the run's).
    level
        ``"well"``: well profiles (mean over sites); ``"image"``: one profile per image.
    batch_size
        Images per forward pass.
    workers
        Loader processes (default: chosen from the CPUs).
    chunk_size
        Images per resumable part of ``out``.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    seed
        Seed of a random backbone.
    progress
        Show a progress bar on stderr.
    as_anndata
        Return an AnnData (features in ``X``, metadata in ``obs``, provenance in ``uns``)
        instead of a DataFrame.

    Returns
    -------
    pandas.DataFrame or anndata.AnnData
        ``Metadata_*`` columns (``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Batch``, ...)
        and feature columns that pycytominer infers; None on non-zero torchrun ranks.
    """
    from cdcl.embed.to_file import embed_to_file

    def embed_into(path: Path, quiet: bool) -> pd.DataFrame | anndata.AnnData | None:
        written = embed_to_file(
            source,
            path,
            data=Path(data) if data is not None else None,
            checkpoint=checkpoint,
            split=split,
            split_number=fold,
            level=level,
            batch_size=batch_size,
            workers=workers,
            chunk_size=chunk_size,
            device=device,
            seed=seed,
            progress=progress,
            quiet=quiet,
        )
        return None if written is None else _read_profiles(written, as_anndata)

    if out is not None:
        return embed_into(Path(out), quiet=False)
    with tempfile.TemporaryDirectory(prefix="cdcl-embed-") as tmp:
        name = "profiles.h5ad" if as_anndata else "profiles.parquet"
        return embed_into(Path(tmp) / name, quiet=True)


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
    eval_on: str = "all",
    tvn: bool = False,
    corrections: Sequence[str] | str = (),
    checkpoint: str = "best",
    data: PathLike | None = None,
    level: str = "well",
    baselines: bool = True,
    batch_size: int = 64,
    null_size: int = 2000,
    seed: int = 0,
    umap: bool = False,
    name: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score profiles (or a run) with every metric: batch mixing, biology, retrieval.

    Parameters
    ----------
    profiles
        A profile table with ``Metadata_*`` columns (as `embed` returns, or
        pycytominer's output), an AnnData (metadata in ``obs``), a ``.parquet`` / ``.csv`` /
        ``.h5ad`` file, or a run directory (then the run is embedded with its baselines).
    out
        Directory for ``results.json``, ``report.html`` and plots (default: a temporary one
        for tables, the run directory for runs).
    fold
        Held-out-batch fold for the classification probes. Default: the table's
        ``Metadata_Split`` column (what the run held out) when it has one, else fold 1.
    batch_col
        The batch column (default: ``Metadata_Batch``; without one, each plate is its own
        batch). Names are matched ignoring case, with or without ``Metadata_``.
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
        Rows for the unsupervised metrics of a table: ``"all"`` or ``"test"``.
    tvn
        Also score the table after typical variation normalisation.
    corrections
        Also score after post-hoc corrections: ``sphering``, ``harmony``, ``combat``.
    checkpoint
        For a run directory: which checkpoint, ``"best"`` or ``"last"``.
    data
        For a run directory: the dataset to embed (default: the run's).
    level
        For a run directory: ``"well"`` or ``"image"`` profiles.
    baselines
        For a run directory: also score the intensity and random-network baselines.
    batch_size
        For a run directory: images per forward pass.
    null_size
        Size of the mAP null distribution.
    seed
        Seed of the baselines, the null distributions, kBET and UMAP.
    umap
        Also draw UMAP plots.
    name
        The feature set's name in the results (default: ``features``).
    progress
        Show progress bars on stderr.

    Returns
    -------
    dict
        The contents of ``results.json``; `metrics` turns it into a table.
    """
    from cdcl.profiles.correction import parse_corrections
    from cdcl.report.results import read_results

    corr = parse_corrections(corrections) if corrections else ()
    frame = _profile_frame(profiles)
    if frame is None and Path(profiles).is_dir():
        from cdcl.evaluation.run import evaluate_run

        path = evaluate_run(
            Path(profiles),
            checkpoint=checkpoint,
            data=data,
            split_number=fold,
            out=out,
            baselines=("intensity", "random") if baselines else (),
            corrections=corr,
            batch_size=batch_size,
            null_size=null_size,
            seed=seed,
            umap=umap,
            progress=progress,
            level=level,
        )
        return read_results(path)
    from cdcl.evaluation.table_file import evaluate_table

    columns = dict(
        batch_col=batch_col,
        batch_pattern=batch_pattern,
        treatment_col=treatment_col,
        compound_col=compound_col,
        moa_col=moa_col,
        plate_col=plate_col,
        well_col=well_col,
        control_query=control_query,
    )
    options = dict(
        split_number=fold,
        eval_on=eval_on,
        tvn=tvn,
        corrections=corr,
        null_size=null_size,
        seed=seed,
        umap=umap,
        name=name,
    )
    table = frame if frame is not None else Path(profiles)
    if out is not None:
        return read_results(evaluate_table(table, Path(out), **columns, **options))
    with tempfile.TemporaryDirectory(prefix="cdcl-evaluate-") as tmp:
        return read_results(evaluate_table(table, Path(tmp), **columns, **options))


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
    from cdcl.profiles.columns import resolve_table_meta
    from cdcl.profiles.correction import apply_corrections, parse_corrections
    from cdcl.profiles.table import frame_to_anndata, profile_table, read_profile_table, split_table

    (name,) = parse_corrections(method)
    frame = _profile_frame(profiles)
    was_anndata = frame is not None and type(profiles).__name__ == "AnnData"
    if frame is None:
        frame = read_profile_table(Path(profiles))
    x, meta_table, _ = split_table(frame)
    meta = resolve_table_meta(
        meta_table,
        batch_col=batch_col,
        plate_col=plate_col,
        treatment_col=treatment_col,
        control_query=control_query,
    )
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


def study(
    out: PathLike,
    *,
    dataset: str = "synthetic",
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    folds: Sequence[int] | None = None,
    references: Sequence[str] | None = None,
    epochs: int | None = None,
    quick: bool = False,
    fresh: bool = False,
    bbbc021_dir: PathLike | None = None,
    progress: bool = False,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Replicated comparison of methods (seeds x folds) with paired statistics.

    Parameters
    ----------
    out
        Study directory (``study.json``, ``study.md``, ``report.html``, one folder per
        replicate; finished replicates are reused).
    dataset
        What to train and evaluate on: ``"synthetic"`` or ``"bbbc021"``.
    methods
        Methods to compare (default: every method of the dataset; ``CDCL-same-batch``, the
        pairing control, only when named).
    seeds
        Replicates: every seed on every fold.
    folds
        Held-out-batch folds (default: the stored split).
    references
        Rows every method is compared against (default: the study's own).
    epochs
        Training epochs per replicate (default: the presets').
    quick
        Short settings (a tiny screen, two epochs) to check the set-up.
    fresh
        Rerun every replicate instead of reusing finished ones.
    bbbc021_dir
        The BBBC021 folder (for ``dataset="bbbc021"``).
    progress
        Print progress lines on stderr.
    alpha
        Level of the paired tests.

    Returns
    -------
    dict
        ``{"study": ..., "paths": {"json", "md", "html"}}``.
    """
    from cdcl.experiments.study import DEFAULT_REFERENCES, StudySpec, run_study

    spec = StudySpec(
        out=Path(out),
        dataset=dataset,
        methods=tuple(methods) if methods else None,
        seeds=tuple(int(s) for s in seeds),
        folds=tuple(int(f) for f in folds) if folds else None,
        references=tuple(references) if references else DEFAULT_REFERENCES,
        epochs=epochs,
        quick=quick,
        fresh=fresh,
        bbbc021_dir=Path(bbbc021_dir) if bbbc021_dir is not None else None,
        progress=progress,
        alpha=alpha,
    )
    return run_study(spec)
