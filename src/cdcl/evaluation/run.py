"""Evaluating a run: embed its held-out images (and the baselines') and score every feature set."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cdcl.data.dataset_dir import open_dataset
from cdcl.data.splits import assign_split
from cdcl.embed.baselines import IntensityFeatures
from cdcl.embed.job import embed_resumable
from cdcl.embed.sources import check_channels, random_like_run, resolve_source
from cdcl.errors import CdclError
from cdcl.evaluation.calibrated import calibrate_sets, should_calibrate
from cdcl.metrics.design import design_facts
from cdcl.metrics.score import (
    EXACT_MAX,
    Timer,
    base_results,
    evaluate_features,
    online_probe_scores,
    protocol_with,
    split_masks,
)
from cdcl.profiles.columns import judged_by, tvn
from cdcl.profiles.correction import apply_corrections
from cdcl.profiles.table import image_meta, well_profiles
from cdcl.report.html import announce, make_plots, render_report
from cdcl.report.plot_sample import (
    DEFAULT_PLOT_SAMPLE,
    plot_sample_info,
    stratified_plot_rows,
)
from cdcl.report.results import RESULTS_FILE, to_jsonable, write_results

CELLPROFILER_NAME = "CellProfiler"  # the feature set's name in results and reports


def evaluate_images(
    dataset: Any,
    split: pd.Series,
    backbones: dict[str, Callable[[Any], Any]],
    view_fn: Callable[[Any], Any] | None = None,
    *,
    tvn_on: tuple[str, ...] = (),
    corrections: tuple[str, ...] = (),
    correct_on: tuple[str, ...] | None = None,
    online_probe: dict[str, Any] | None = None,
    batch_size: int = 64,
    k: int = 10,
    null_size: int = 2000,
    seed: int = 0,
    progress: bool = True,
    timer: Timer | None = None,
    level: str = "well",
    work_dir: str | Path | None = None,
    cache_key: str = "",
    judge_col: str | None = None,
    compound_groups: dict[str, set[str]] | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, pd.DataFrame]]]:
    """Embed train and test images with each backbone, then score every feature set.

    ``level="well"`` scores well profiles (mean over sites, the default); ``"image"`` scores
    every image on its own (single-cell crops, where a "well" holds few profiles).

    ``online_probe`` = ``{"set": name, "probe": nn.Module, "label_of": {...}}`` scores the
    checkpoint's probe on that set's test-image features. ``tvn_on`` names feature sets that
    also get a ``<name>+tvn`` variant; ``corrections`` (names from
    :mod:`cdcl.profiles.correction`) add a ``<name>+<correction>`` set for every feature set in
    ``correct_on`` (default: all), fitted on that set's train + test profiles. Returns
    ``(feature_sets results, {name: (profiles, meta)})`` with well profiles of train + test
    batches (meta has a ``split`` column). With ``work_dir``, embeddings go through resumable
    parts there (keyed by ``cache_key`` and the feature set's name), so a killed evaluation
    skips the finished ones when rerun. ``judge_col`` (a metadata column of the samples)
    replaces the batch the metrics judge mixing by; the split is kept. ``compound_groups``
    (``{group: treatment names}``, e.g. the compounds the methods trained on and the others)
    scores every feature set again on each group's treatments plus the controls, after the
    same normalisation of all rows, into ``results[name]["compounds"][group]``.
    """
    timer = timer or Timer()
    idx, img_meta = _images_to_evaluate(dataset.samples, split)
    score = _SetScorer(k, null_size, seed, timer, compound_groups)
    embed = _SetEmbedder(dataset, idx, img_meta, view_fn, level, work_dir, cache_key)
    results: dict[str, Any] = {}
    profiles: dict[str, tuple[np.ndarray, pd.DataFrame]] = {}
    jobs = []
    for name, backbone in backbones.items():
        wp, wmeta, feats, job = embed(name, backbone, batch_size, progress, timer)
        jobs.append(job)
        if judge_col:
            wmeta = judged_by(wmeta, judge_col)
        profiles[name] = (wp, wmeta)
        res = score(wp, wmeta, name)
        if online_probe is not None and online_probe.get("set") == name and feats is not None:
            with timer(f"{name}.online_probe"):
                _add_online_probe(res, online_probe, feats, img_meta)
        results[name] = res
        with_corrections = correct_on is None or name in correct_on
        for dname, dp in _derived_profiles(
            name, wp, wmeta, name in tvn_on, corrections if with_corrections else (), seed, timer
        ):
            profiles[dname] = (dp, wmeta)
            results[dname] = score(dp, wmeta, dname)
    for job in jobs:  # every feature set is scored: the embedding parts are no longer needed
        if job is not None:
            job.remove()
    return results, profiles


def _images_to_evaluate(samples: pd.DataFrame, split: pd.Series) -> tuple[np.ndarray, pd.DataFrame]:
    """The train and test images' rows and their metadata (with a ``split`` column)."""
    sp = split.astype(str).reset_index(drop=True)
    idx = np.flatnonzero(sp.isin(["train", "test"]).to_numpy())
    if not (sp.iloc[idx] == "test").any():
        raise CdclError("the split has no test batches; choose another --split")
    img_meta = image_meta(samples, idx)
    img_meta["split"] = sp.iloc[idx].to_numpy()
    return idx, img_meta


@dataclass(frozen=True)
class _SetScorer:
    """Scores one feature set's profiles (train/test from their ``split``), per compound group."""

    k: int
    null_size: int
    seed: int
    timer: Timer
    compound_groups: dict[str, set[str]] | None

    def __call__(self, x: np.ndarray, wmeta: pd.DataFrame, name: str) -> dict[str, Any]:
        """``evaluate_features`` of ``x``, plus ``compounds`` per group when groups are given."""
        train = (wmeta["split"] == "train").to_numpy()
        test = (wmeta["split"] == "test").to_numpy()
        kw: dict[str, Any] = {"k": self.k, "null_size": self.null_size, "seed": self.seed}
        kw.update(timer=self.timer, name=name)
        res = evaluate_features(x, wmeta, train, test, **kw)
        if self.compound_groups:
            res["compounds"] = {
                g: evaluate_features(
                    x, wmeta, train & keep, test & keep, eval_mask=test & keep, **kw
                )
                for g, keep in _group_masks(wmeta, self.compound_groups).items()
            }
        return res


@dataclass(frozen=True)
class _SetEmbedder:
    """Embeds the evaluated images with one backbone into well (or image) profiles."""

    dataset: Any
    idx: np.ndarray
    img_meta: pd.DataFrame
    view_fn: Callable[[Any], Any] | None
    level: str
    work_dir: str | Path | None
    cache_key: str

    def __call__(
        self, name: str, backbone: Any, batch_size: int, progress: bool, timer: Timer
    ) -> tuple[np.ndarray, pd.DataFrame, np.ndarray | None, Any]:
        """(profiles, their metadata, image features or None, the job holding the parts)."""
        key = f"{self.cache_key}/{name}"
        if hasattr(backbone, "profiles"):
            # A profiling pipeline (CellProfiler): measures cells and aggregates them itself.
            work_dir = Path(self.work_dir) if self.work_dir is not None else None
            with timer(f"embed.{name}"):
                wp, wmeta, job = backbone.profiles(
                    self.dataset, self.idx, self.img_meta, self.level, work_dir, key, progress,
                    desc=name,
                )  # fmt: skip
            return wp, wmeta, None, job
        with timer(f"embed.{name}"):
            feats, job = embed_resumable(
                backbone, self.dataset, self.idx, self.view_fn, self.work_dir, key,
                batch_size=batch_size, progress=progress, desc=name,
            )  # fmt: skip
        if self.level == "image":
            return feats, self.img_meta.reset_index(drop=True), feats, job
        wp, wmeta = well_profiles(feats, self.img_meta)
        return wp, wmeta, feats, job


def _add_online_probe(
    res: dict[str, Any], online_probe: dict[str, Any], feats: np.ndarray, img_meta: pd.DataFrame
) -> None:
    """The checkpoint's probe scored on the treated test images, into ``res``."""
    mask = (img_meta["split"] == "test").to_numpy() & ~img_meta["is_control"].to_numpy(bool)
    res["online_probe"] = online_probe_scores(
        online_probe["probe"],
        feats,
        img_meta["treatment"].to_numpy(),
        online_probe["label_of"],
        mask,
    )
    if "note" in res["online_probe"]:
        res.setdefault("unavailable", {})["online_probe"] = res["online_probe"]["note"]


def _derived_profiles(
    name: str,
    wp: np.ndarray,
    wmeta: pd.DataFrame,
    with_tvn: bool,
    corrections: tuple[str, ...],
    seed: int,
    timer: Timer,
) -> Iterator[tuple[str, np.ndarray]]:
    """``<name>+tvn`` (if asked), then each ``<name>+<correction>``, as they are fitted.

    A generator, so that each set is scored before the next one is fitted. A transform the
    design cannot fit (TVN or sphering without negative controls, ComBat with a one-profile
    batch) is left out with a note giving its own reason, and the others still run.
    """
    fits: list[tuple[str, Callable[[], np.ndarray]]] = []
    if with_tvn:
        fits.append((f"{name}+tvn", lambda: tvn(wp, wmeta)))
    for c in corrections:
        fits.append((f"{name}+{c}", partial(_corrected, wp, wmeta, c, seed)))
    for dname, fit in fits:
        try:
            with timer(f"{dname}.fit"):
                fitted = fit()
        except CdclError as e:
            print(f"note: {dname} not computed: {e}", file=sys.stderr)
            continue
        yield dname, fitted


def _corrected(wp: np.ndarray, wmeta: pd.DataFrame, correction: str, seed: int) -> np.ndarray:
    """One post-hoc correction of a feature set's profiles."""
    batch = wmeta["batch"].astype(str).to_numpy()
    is_control = wmeta["is_control"].to_numpy(bool)
    return apply_corrections(wp, batch, is_control, (correction,), seed=seed)[correction]


def _group_masks(meta: pd.DataFrame, groups: dict[str, set[str]]) -> dict[str, np.ndarray]:
    """Per group, its treatments' rows plus every control row (the metrics' reference)."""
    ctrl = meta["is_control"].to_numpy(bool)
    treat = meta["treatment"].astype(str)
    return {g: ctrl | treat.isin(sorted(names)).to_numpy() for g, names in groups.items()}


def _config_dict(cfg: Any) -> Any:
    if cfg is None:
        return None
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return to_jsonable(cfg)


def evaluate_run(
    run: str | Path,
    *,
    checkpoint: str = "best",
    data: str | Path | None = None,
    split_number: int | None = None,
    out: str | Path | None = None,
    baselines: tuple[str, ...] = ("intensity", "random"),
    tvn: bool = True,
    corrections: tuple[str, ...] = (),
    batch_size: int = 64,
    null_size: int = 2000,
    seed: int = 0,
    umap: bool = True,
    progress: bool = True,
    level: str = "well",
    before_write: Callable[[dict[str, Any]], None] | None = None,
    calibrate: bool | None = None,
    plot_sample: int | None = DEFAULT_PLOT_SAMPLE,
    batch_col: str | None = None,
) -> Path:
    """``cdcl evaluate RUN``: embed, score the run and the baselines, write results + report.

    ``level="well"`` scores well profiles (mean over sites); ``"image"`` scores every image
    (single-cell crops such as BBBC021's, where a well holds one profile per plate).
    ``before_write`` sees the results before anything but the embedding cache is written and
    may refuse them (raise). A checkpoint file of another run is refused unless ``out`` says
    where its results go (they would otherwise land in ``run``).
    ``calibrate`` adds the run's null and injected-batch-effect scores on its held-out
    profiles (:func:`cdcl.evaluation.calibration.calibrate`) under ``calibration``; None (the
    default) calibrates small designs only (:func:`cdcl.evaluation.calibrated.should_calibrate`).
    ``batch_col`` judges batch mixing by another ``Metadata_*`` column of the dataset (e.g.
    the acquisition batch of a run paired by plate); the held-out split stays the run's.
    UMAPs are drawn on a stratified sample of at most ``plot_sample`` rows (None or 0: all).
    """

    timer = Timer(echo=progress)  # a line per stage and metric, with its time
    run = Path(run)
    src = _load_source(run, checkpoint, out, timer)
    em = src.model
    data_path, ds = _run_dataset(run, data, src)
    number = split_number if split_number is not None else getattr(em.config.data, "split", None)
    split = assign_split(ds.samples, ds.info.source, number)
    backbones = _backbones(src, ds, baselines, seed)
    out_dir = Path(out) if out else run
    # What determines the embeddings besides the images: resumable parts are keyed by it.
    cache_key = json.dumps([src.provenance, str(Path(data_path).resolve()), number, seed])
    results_sets, profiles = evaluate_images(
        ds,
        split,
        backbones,
        src.view_fn,
        tvn_on=(src.name,) if tvn else (),
        corrections=corrections,
        online_probe={"set": src.name, "probe": em.probe, "label_of": em.label_of},
        batch_size=batch_size,
        null_size=null_size,
        seed=seed,
        progress=progress,
        timer=timer,
        work_dir=out_dir,
        cache_key=cache_key,
        level=level,
        judge_col=batch_col,
    )
    _calibrate_run(results_sets, profiles, src.name, calibrate, seed, timer)
    split_info = {"number": number, **split_masks(ds.samples, split)}
    results = _run_results(
        src, ds, data_path, split_info, corrections, level, results_sets, profiles[src.name][1]
    )
    _finish_results(results, backbones, level, batch_col)
    if before_write is not None:
        before_write(results)
    plots = _PlotOptions(umap, plot_sample, seed, progress)
    return _plot_and_write(results, profiles, run, out_dir, plots, timer)


def _load_source(run: Path, checkpoint: str, out: str | Path | None, timer: Timer) -> Any:
    """The run's ``best`` / ``last`` checkpoint, or a checkpoint file (refused when another run's)."""
    if checkpoint not in ("best", "last"):
        check_checkpoint_owner(run, Path(checkpoint), out)
    spec = checkpoint if checkpoint not in ("best", "last") else str(run)
    which = checkpoint if checkpoint in ("best", "last") else "best"
    with timer("load"):
        return resolve_source(spec, which=which)


def _run_dataset(run: Path, data: str | Path | None, src: Any) -> tuple[str | Path, Any]:
    """The dataset to evaluate on (``data``, else the checkpoint's), opened and checked."""
    em = src.model
    data_path = data or em.dataset.get("path") or getattr(em.config.data, "path", None)
    if not data_path:
        raise CdclError(f"{run}: the checkpoint names no dataset; pass --data DIR")
    if not Path(data_path).exists():
        raise CdclError(f"{data_path}: dataset not found; pass --data DIR")
    ds = open_dataset(data_path)
    check_channels(src, ds, str(run))
    return data_path, ds


def _backbones(
    src: Any, ds: Any, baselines: tuple[str, ...], seed: int
) -> dict[str, Callable[[Any], Any]]:
    """The run's backbone, then the baselines asked for, by feature set name."""
    backbones: dict[str, Callable[[Any], Any]] = {src.name: src.backbone}
    if "intensity" in baselines:
        backbones["intensity"] = IntensityFeatures()
    if "random" in baselines:
        backbones["random"] = random_like_run(src.model, ds, seed=seed)
    if "cellprofiler" in baselines:
        from cdcl.embed.cellprofiler import CellProfilerSource

        backbones[CELLPROFILER_NAME] = CellProfilerSource()
    return backbones


def _calibrate_run(
    results_sets: dict[str, Any],
    profiles: dict[str, tuple[np.ndarray, pd.DataFrame]],
    name: str,
    calibrate: bool | None,
    seed: int,
    timer: Timer,
) -> None:
    """Calibrate the run's set on its held-out profiles when asked (or, by default, small)."""
    wp, wmeta = profiles[name]
    test = (wmeta["split"] == "test").to_numpy()
    if should_calibrate(calibrate, wmeta, test):
        with timer("calibration"):
            calibrate_sets(results_sets, name, wp, wmeta, test, seed=seed)


def _run_results(
    src: Any,
    ds: Any,
    data_path: str | Path,
    split_info: dict[str, Any],
    corrections: tuple[str, ...],
    level: str,
    results_sets: dict[str, Any],
    wmeta: pd.DataFrame,
) -> dict[str, Any]:
    """The run's results: its source, config, protocol, split, design and scored feature sets."""
    train, test = (wmeta["split"] == "train").to_numpy(), (wmeta["split"] == "test").to_numpy()
    return base_results(
        "run",
        source={
            **src.provenance,
            "dataset": str(Path(data_path).resolve()),
            "dataset_name": ds.info.name,
            "n_images": ds.info.n_images,
        },
        config=_config_dict(src.model.config),
        protocol=protocol_with(corrections),
        split=split_info,
        level=level,
        design=design_facts(wmeta, train, test, test, level),
        feature_sets=results_sets,
    )


def _finish_results(
    results: dict[str, Any],
    backbones: dict[str, Callable[[Any], Any]],
    level: str,
    batch_col: str | None,
) -> None:
    """Add what judged mixing, the input's warnings, the announced warnings, the profile level."""
    if batch_col:
        results["design"]["judged_by"] = batch_col
    # What a baseline found wrong with the images (CellProfiler: nuclei too small to measure).
    input_warnings = [w for b in backbones.values() for w in getattr(b, "warnings", [])]
    if input_warnings:
        results["input_warnings"] = input_warnings
    results["warnings"] = announce(results)
    if level == "image":
        results["protocol"] = {
            **results["protocol"],
            "profiles": "image level: one profile per image",
        }


@dataclass(frozen=True)
class _PlotOptions:
    """What ``cdcl evaluate`` draws: UMAPs or not, their row sample, seed, and verbosity."""

    umap: bool
    plot_sample: int | None
    seed: int
    progress: bool


def _plot_and_write(
    results: dict[str, Any],
    profiles: dict[str, tuple[np.ndarray, pd.DataFrame]],
    run: Path,
    out_dir: Path,
    opts: _PlotOptions,
    timer: Timer,
) -> Path:
    """UMAPs and the run's training curves, then results.json and the report in ``out_dir``."""
    if opts.umap and profiles:
        meta0 = next(iter(profiles.values()))[1]
        rows = stratified_plot_rows(meta0, opts.plot_sample, opts.seed)
        results["plots"] = plot_sample_info(len(meta0), rows, opts.plot_sample, opts.seed)
        timer.echo = opts.progress or len(meta0) > EXACT_MAX
    with timer("plots"):
        if opts.umap or run.is_dir():
            make_plots(
                out_dir,
                profiles if opts.umap else None,
                metrics_jsonl=run / "metrics.jsonl" if run.is_dir() else None,
                seed=opts.seed,
                plot_sample=opts.plot_sample,
                timer=timer,
            )
    with timer("write results + report"):
        results["timings_s"] = timer.times
        write_results(results, out_dir)
        render_report(results, out_dir)
    return out_dir / RESULTS_FILE


def check_checkpoint_owner(run: Path, checkpoint: Path, out: str | Path | None) -> None:
    """Refuse writing results of a checkpoint from another run into ``run`` (without --out)."""
    if not checkpoint.is_file():
        raise CdclError(f"--checkpoint {checkpoint}: no such file (or use best / last)")
    inside = checkpoint.resolve().is_relative_to(run.resolve())
    if inside or out is not None:
        return
    raise CdclError(
        f"--checkpoint {checkpoint} is not a checkpoint of {run}; its results would be written "
        f"into {run}. Evaluate its own run (cdcl evaluate RUN_OF_THAT_CHECKPOINT --checkpoint "
        "PATH), or pass --out DIR for its results"
    )
