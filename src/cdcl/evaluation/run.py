"""Evaluating a run: embed its held-out images (and the baselines') and score every feature set."""

from __future__ import annotations

import json
from collections.abc import Callable
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
    corrected_sets,
    evaluate_features,
    online_probe_scores,
    protocol_with,
    split_masks,
)
from cdcl.profiles.columns import judged_by, tvn
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

    def score(x: np.ndarray, wmeta: pd.DataFrame, name: str) -> dict[str, Any]:
        train = (wmeta["split"] == "train").to_numpy()
        test = (wmeta["split"] == "test").to_numpy()
        kw = {"k": k, "null_size": null_size, "seed": seed, "timer": timer, "name": name}
        res = evaluate_features(x, wmeta, train, test, **kw)
        if compound_groups:
            res["compounds"] = {
                g: evaluate_features(
                    x, wmeta, train & keep, test & keep, eval_mask=test & keep, **kw
                )
                for g, keep in _group_masks(wmeta, compound_groups).items()
            }
        return res

    timer = timer or Timer()
    samples = dataset.samples
    sp = split.astype(str).reset_index(drop=True)
    idx = np.flatnonzero(sp.isin(["train", "test"]).to_numpy())
    if not (sp.iloc[idx] == "test").any():
        raise CdclError("the split has no test batches; choose another --split")
    img_meta = image_meta(samples, idx)
    img_meta["split"] = sp.iloc[idx].to_numpy()
    results: dict[str, Any] = {}
    profiles: dict[str, tuple[np.ndarray, pd.DataFrame]] = {}
    jobs = []
    for name, backbone in backbones.items():
        if hasattr(backbone, "profiles"):
            # A profiling pipeline (CellProfiler): measures cells and aggregates them itself.
            with timer(f"embed.{name}"):
                wp, wmeta, job = backbone.profiles(
                    dataset,
                    idx,
                    img_meta,
                    level,
                    Path(work_dir) if work_dir is not None else None,
                    f"{cache_key}/{name}",
                    progress,
                    desc=name,
                )
                jobs.append(job)
            feats = None
        else:
            with timer(f"embed.{name}"):
                feats, job = embed_resumable(
                    backbone,
                    dataset,
                    idx,
                    view_fn,
                    work_dir,
                    f"{cache_key}/{name}",
                    batch_size=batch_size,
                    progress=progress,
                    desc=name,
                )
                jobs.append(job)
            if level == "image":
                wp, wmeta = feats, img_meta.reset_index(drop=True)
            else:
                wp, wmeta = well_profiles(feats, img_meta)
        if judge_col:
            wmeta = judged_by(wmeta, judge_col)
        profiles[name] = (wp, wmeta)
        res = score(wp, wmeta, name)
        if online_probe is not None and online_probe.get("set") == name and feats is not None:
            with timer(f"{name}.online_probe"):
                mask = (img_meta["split"] == "test").to_numpy() & ~img_meta["is_control"].to_numpy(
                    bool
                )
                res["online_probe"] = online_probe_scores(
                    online_probe["probe"],
                    feats,
                    img_meta["treatment"].to_numpy(),
                    online_probe["label_of"],
                    mask,
                )
                if "note" in res["online_probe"]:
                    res.setdefault("unavailable", {})["online_probe"] = res["online_probe"]["note"]
        results[name] = res
        if name in tvn_on:
            tname = f"{name}+tvn"
            with timer(f"{tname}.fit"):
                tp = tvn(wp, wmeta)
            profiles[tname] = (tp, wmeta)
            results[tname] = score(tp, wmeta, tname)
        if correct_on is None or name in correct_on:
            for cname, cp in corrected_sets(
                wp, wmeta, corrections, seed=seed, timer=timer, name=name
            ).items():
                profiles[cname] = (cp, wmeta)
                results[cname] = score(cp, wmeta, cname)
    for job in jobs:  # every feature set is scored: the embedding parts are no longer needed
        if job is not None:
            job.remove()
    return results, profiles


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
    if checkpoint not in ("best", "last"):
        check_checkpoint_owner(run, Path(checkpoint), out)
    spec = checkpoint if checkpoint not in ("best", "last") else str(run)
    which = checkpoint if checkpoint in ("best", "last") else "best"
    with timer("load"):
        src = resolve_source(spec, which=which)
    em = src.model
    data_path = data or em.dataset.get("path") or getattr(em.config.data, "path", None)
    if not data_path:
        raise CdclError(f"{run}: the checkpoint names no dataset; pass --data DIR")
    if not Path(data_path).exists():
        raise CdclError(f"{data_path}: dataset not found; pass --data DIR")
    ds = open_dataset(data_path)
    check_channels(src, ds, str(run))
    number = split_number if split_number is not None else getattr(em.config.data, "split", None)
    split = assign_split(ds.samples, ds.info.source, number)
    backbones: dict[str, Callable[[Any], Any]] = {src.name: src.backbone}
    if "intensity" in baselines:
        backbones["intensity"] = IntensityFeatures()
    if "random" in baselines:
        backbones["random"] = random_like_run(em, ds, seed=seed)
    if "cellprofiler" in baselines:
        from cdcl.embed.cellprofiler import CellProfilerSource

        backbones[CELLPROFILER_NAME] = CellProfilerSource()
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
    wp, wmeta = profiles[src.name]
    train, test = (wmeta["split"] == "train").to_numpy(), (wmeta["split"] == "test").to_numpy()
    if should_calibrate(calibrate, wmeta, test):
        with timer("calibration"):
            calibrate_sets(results_sets, src.name, wp, wmeta, test, seed=seed)
    results = base_results(
        "run",
        source={
            **src.provenance,
            "dataset": str(Path(data_path).resolve()),
            "dataset_name": ds.info.name,
            "n_images": ds.info.n_images,
        },
        config=_config_dict(em.config),
        protocol=protocol_with(corrections),
        split={"number": number, **split_masks(ds.samples, split)},
        level=level,
        design=design_facts(wmeta, train, test, test, level),
        feature_sets=results_sets,
    )
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
    if before_write is not None:
        before_write(results)
    if umap and profiles:
        meta0 = next(iter(profiles.values()))[1]
        rows = stratified_plot_rows(meta0, plot_sample, seed)
        results["plots"] = plot_sample_info(len(meta0), rows, plot_sample, seed)
        timer.echo = progress or len(meta0) > EXACT_MAX
    with timer("plots"):
        if umap or run.is_dir():
            make_plots(
                out_dir,
                profiles if umap else None,
                metrics_jsonl=run / "metrics.jsonl" if run.is_dir() else None,
                seed=seed,
                plot_sample=plot_sample,
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
