"""The main job: train DINO, DINO-CB, CDCL and a supervised baseline on one screen with the same
budget and seed, evaluate them next to the baselines, and write one comparison report.

Stages (each timed, each with its own progress bar): data → train per method → evaluate →
report. Everything is cached in the output directory: the dataset is reused when its build key
matches, a run is reused (or resumed) when its resolved config matches, and ``fresh`` rebuilds
everything.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cdcl._version import versions
from cdcl.config import load_config, with_defaults
from cdcl.data.dataset_dir import atomic_write_text, open_dataset, validate
from cdcl.data.montage import montage
from cdcl.data.splits import assign_split, half_of_treatments, treatment_paired_split
from cdcl.data.synthetic import build_key, generate, reusable
from cdcl.data.table import TableOptions, build_table
from cdcl.embed.baselines import IntensityFeatures
from cdcl.embed.inference import make_view_fn
from cdcl.embed.sources import random_like_run
from cdcl.errors import CdclError
from cdcl.evaluation.calibrated import apply_calibration
from cdcl.evaluation.calibration import calibrate
from cdcl.evaluation.run import CELLPROFILER_NAME, evaluate_images
from cdcl.metrics.design import design_facts
from cdcl.parquet import read_parquet
from cdcl.profiles.correction import TRANSDUCTIVE_NOTE
from cdcl.progress import keep_alive, working_on
from cdcl.report.chance import RANDOM_SETS, chance_warnings
from cdcl.report.design import design_banner, design_lines
from cdcl.report.html import (
    BASELINE_SETS,
    _calibration_html,
    _plt,
    _save,
    draw_umap_panels,
    greyed_columns,
    read_metrics_jsonl,
    stored_totals,
    summary_html,
    table_html,
    umap_frame,
)
from cdcl.report.markdown import frame_markdown, markdown_table
from cdcl.report.page import img_html, write_html
from cdcl.report.results import to_jsonable, write_results_text
from cdcl.schema import get_path
from cdcl.train.checkpoint import load_for_eval
from cdcl.train.configure import train_config
from cdcl.train.loop import train

# label -> (method key used in run dirs, preset suffix)
METHODS: dict[str, str] = {
    "supervised": "supervised",
    "DINO": "dino",
    "DINO-CB": "dino-cb",
    "CDCL": "cdcl",
    "CDCL-same-batch": "cdcl-same-batch",
}
BBBC021_METHODS = ("DINO", "CDCL")
# Trained only when named (DemoSpec.methods, `cdcl study --methods`), on either dataset: the
# pairing control CDCL-same-batch (CDCL with its partner from the image's own batch).
ON_REQUEST = ("CDCL-same-batch",)
DEMO_EPOCHS = {"synthetic": 10, "bbbc021": 12}
# A screen the user built (``cdcl study --data DIR``): trained with the generic presets, which
# size the network and the epochs from the dataset, and scored on its own held-out folds.
CUSTOM = "custom"
DATASETS = ("synthetic", "bbbc021", CUSTOM)
LEVELS = ("well", "image")
# The held-out plates the README's BBBC021 figures were measured on (one DMSO-only plate, one
# with cycloheximide at 15 and 50 µM). `DemoSpec.split = k` uses treatment-paired fold k instead.
BBBC021_TEST_PLATES = ("Week4_27542", "Week4_27821")
# Post-hoc corrections scored next to these feature sets (cdcl.profiles.correction).
CORRECTIONS = ("sphering", "harmony", "combat")
CORRECTED_SETS = ("DINO", "CDCL", "intensity stats")
# Headline columns of the comparison table: (label, path in a variant's results).
COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("treatment acc (logistic)", ("classification", "logistic", "accuracy")),
    ("treatment acc (kNN)", ("classification", "knn", "accuracy")),
    ("NSC", ("moa_matching", "nsc")),
    ("NSCB", ("moa_matching", "nscb")),
    ("replicate mAP (other batch)", ("map", "replicate_batch_aware", "map")),
    ("MoA mAP", ("map", "moa", "map")),
    ("kBET", ("kbet", "acceptance_rate")),
    ("kBET per treatment", ("mixing_per_treatment", "kbet")),
    ("iLISI per treatment", ("mixing_per_treatment", "ilisi")),
    ("batch 1-abs(sil) (scib)", ("silhouette", "batch_scib")),
    ("batch-classifier acc", ("batch_classifier", "accuracy")),
    # Batch endpoints that see batch effects left after per-plate standardisation.
    ("retrieval penalty (same − other batch)", ("batch_endpoints", "retrieval_penalty", "mean")),
    ("control kBET", ("control_mixing", "kbet")),
    ("control iLISI", ("control_mixing", "ilisi")),
    ("control batch-classifier acc", ("control_mixing", "batch_classifier", "accuracy")),
)
# What the methods train on: every compound, or the same seed-drawn half of them plus the
# controls (the held-out batches then hold compounds no method has seen).
TRAIN_TREATMENTS = ("all", "half")
HALF_SUBSET = "half_treatments_with_controls"
LOWER_IS_BETTER = {
    "batch-classifier acc",
    "retrieval penalty (same − other batch)",
    "control batch-classifier acc",
}
COLUMN_PATHS = {"online probe acc": ("online_probe", "accuracy"), **dict(COLUMNS)}


@dataclass
class DemoSpec:
    """What one demo run does."""

    out: Path
    dataset: str = "synthetic"  # synthetic | bbbc021
    quick: bool = False
    fresh: bool = False
    seed: int = 0
    epochs: int | None = None  # None: the demo's budget for the dataset
    # held-out-batch fold (BBBC021: the treatment-paired folds); None: the stored split
    split: int | None = None
    methods: tuple[str, ...] | None = None  # None: every method of the dataset
    data_dir: Path | None = None  # None: OUT/data (a study shares one dataset between runs)
    bbbc021_dir: Path | None = None
    progress: bool = True
    # simulated-screen overrides (e.g. test_batches, batch_strength); empty: the preset's
    screen: dict[str, Any] = field(default_factory=dict)
    calibrate: bool = False  # null + injected batch effects for the first method's profiles
    cellprofiler: bool = False  # add the CellProfiler row (cp-measure per cell) and its corrections
    # "all": train on every compound; "half": every method trains on the same half of the
    # compounds (drawn with each replicate's seed) plus the controls, and the other half is never seen
    train_treatments: str = "all"
    level: str | None = None  # well or image profiles; None: the dataset's (image on BBBC021)
    timings: dict[str, float] = field(default_factory=dict)


class Stage:
    """Times one stage into ``spec.timings`` and prints when it starts and ends."""

    def __init__(self, spec: Any, name: str, marker: str = "==") -> None:
        self.spec, self.name, self.marker = spec, name, marker

    def __enter__(self) -> Stage:
        print(f"{self.marker} {self.name}", flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        dt = time.perf_counter() - self.t0
        self.spec.timings[self.name] = round(dt, 2)
        if exc[0] is None:
            print(f"{' ' * len(self.marker)} {self.name}: {dt:.1f} s", flush=True)


def bbbc021_source(spec: DemoSpec) -> Path:
    """The folder of the BBBC021 week-4 crops the user named; the library never searches for it."""
    if spec.bbbc021_dir is None:
        raise CdclError(
            "--dataset bbbc021: pass --bbbc021-dir with the folder holding cells_subset.npz and "
            "metadata_subset.csv (in a checkout: ../shared/data/bbbc021_week4_singlecell)"
        )
    return Path(spec.bbbc021_dir)


# ---------------------------------------------------------------- data


def prepare_data(spec: DemoSpec) -> Path:
    """The demo's dataset directory, built or reused."""
    out = spec.data_dir or spec.out / "data"
    if spec.dataset == "synthetic":
        preset = "tiny" if spec.quick else "small"
        # Reuse the screen when it was built from the same preset and seed; rebuild otherwise.
        stale = out.exists() and not reusable(out, build_key(preset, spec.seed, **spec.screen))
        return generate(
            out,
            preset,
            seed=spec.seed,
            overwrite=spec.fresh or stale,
            progress=spec.progress,
            **spec.screen,
        )
    if spec.dataset == "bbbc021":
        return _build_bbbc021(spec, out)
    if spec.dataset == CUSTOM:
        return Path(out)  # built by the user (cdcl build table/rxrx1/cpg0004), used as it is
    raise CdclError(f"--dataset {spec.dataset}: unknown; choose synthetic or bbbc021")


def profile_level(spec: DemoSpec) -> str:
    """Well profiles, or image profiles on single-cell crops (BBBC021) or when asked."""
    if spec.level is not None:
        return spec.level
    return "image" if spec.dataset == "bbbc021" else "well"


def _build_bbbc021(spec: DemoSpec, out: Path) -> Path:

    src = bbbc021_source(spec)
    npz, csv = src / "cells_subset.npz", src / "metadata_subset.csv"
    for f in (npz, csv):
        if not f.is_file():
            raise CdclError(f"{f}: not found; pass --bbbc021-dir with the BBBC021 week-4 crops")
    table = pd.read_csv(csv)
    test_plates = bbbc021_test_plates(table, spec.split)
    if out.exists() and not spec.fresh:
        try:
            validate(out)
            built = read_parquet(out / "samples.parquet", columns=["plate", "split"])
            if set(built.loc[built["split"] == "test", "plate"].astype(str)) == test_plates:
                return out
            shutil.rmtree(out)  # built for another fold
        except CdclError:
            shutil.rmtree(out)
    elif out.exists():
        shutil.rmtree(out)
    table["split"] = np.where(table["plate"].isin(test_plates), "test", "train")
    out.parent.mkdir(parents=True, exist_ok=True)
    csv = out.parent / "bbbc021_samples.csv"
    table.to_csv(csv, index=False)
    options = TableOptions(
        split_col="split",
        batch_col="plate",
        plate_col="plate",
        well_col="well",
        site_col="site",
        treatment_col="compound",
        dose_col="concentration_uM",
        compound_col="compound",
        moa_col="moa",
        control_query='compound == "DMSO"',
    )
    build_table(
        csv,
        out,
        ["DNA", "Actin", "Tubulin"],
        options,
        npz=npz,
        npz_key="images",
        channel_axis=-1,
        name="bbbc021-week4",
    )
    return out


def bbbc021_test_plates(table: pd.DataFrame, split: int | None) -> set[str]:
    """Held-out plates: BBBC021_TEST_PLATES, or treatment-paired fold ``split`` of the plates.

    Either way one DMSO-only plate and one cycloheximide plate, so every held-out treatment was
    seen in training (only 3 of the 6 plates carry the compound).
    """
    if split is None:
        return set(BBBC021_TEST_PLATES)

    plates = pd.DataFrame(
        {"batch": table["plate"].astype(str), "is_control": table["compound"] == "DMSO"}
    )
    part = treatment_paired_split(plates, split)
    return set(plates.loc[part == "test", "batch"])


# ---------------------------------------------------------------- training


def method_labels(spec: DemoSpec) -> list[str]:
    """The methods a run trains: ``spec.methods`` or the dataset's (not those ON_REQUEST)."""
    # the generic presets (a user's screen) exist for DINO and CDCL, like BBBC021's
    default = BBBC021_METHODS if spec.dataset in ("bbbc021", CUSTOM) else METHODS
    allowed = [m for m in default if m not in ON_REQUEST] + list(ON_REQUEST)
    if spec.methods is None:
        return [m for m in default if m not in ON_REQUEST]
    bad = [m for m in spec.methods if m not in allowed]
    if bad or not spec.methods:
        raise CdclError(
            f"--methods {','.join(spec.methods)}: unknown on {spec.dataset}; "
            f"choose from {','.join(allowed)}"
        )
    return list(spec.methods)


def budget_overrides(spec: DemoSpec) -> list[str]:
    """Equal training budget for every method (epochs), plus the seed and data-loader workers."""
    if spec.epochs is not None:
        epochs: int | None = spec.epochs
    elif spec.quick:
        epochs = 2
    else:
        # ~2.5 CPU minutes per self-supervised method on 2 cores (docs/design.md §9's budget), so the
        # whole demo stays within 15 minutes. A user's screen: the generic preset's, sized from
        # the dataset and the same for every method.
        epochs = DEMO_EPOCHS.get(spec.dataset)
    # One loader process overlaps reading and views with the step (measured: the data wait
    # drops from ~27% of a CDCL step to under 1%); results do not depend on the worker count.
    over = [f"train.seed={spec.seed}", "data.num_workers=1"]
    if epochs is not None:
        over.insert(0, f"train.epochs={epochs}")
    if spec.split is not None:
        over.append(f"data.split={spec.split}")
    if spec.train_treatments == "half":
        over.append(f"data.subset={HALF_SUBSET}")
    if spec.quick:
        # The tiny screen has 32-px fields: a smaller network and batch keep it to a few minutes.
        over += [
            "train.batch_size=16",
            "train.warmup_epochs=1",
            "model.embed_dim=64",
            "model.depth=2",
            "model.num_heads=2",
            "model.patch_size=4",
        ]
    return over


def method_config(spec: DemoSpec, label: str, data: Path) -> tuple[str, Any]:
    """The preset and resolved configuration one method trains with on ``data``."""
    family = {"bbbc021": "bbbc021", CUSTOM: "generic"}.get(spec.dataset, "synthetic")
    preset = f"{family}-{METHODS[label]}"
    if spec.dataset == CUSTOM:
        # sized from the screen exactly as `cdcl train --preset generic-*` sizes it
        return preset, train_config(data, preset, overrides=budget_overrides(spec))[0]
    return preset, load_config(preset, [f"data.path={data.resolve()}", *budget_overrides(spec)])


def train_method(spec: DemoSpec, label: str, data: Path) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse, or resume) one method's run; returns the run dir and its train stats."""

    preset, cfg = method_config(spec, label, data)
    run = spec.out / "runs" / METHODS[label]
    same = trained_with(run / "config.yaml", cfg)
    if run.exists() and (spec.fresh or not same):
        shutil.rmtree(run)
    t0 = time.perf_counter()
    summary = train(cfg, run, resume=run.exists())
    wall = time.perf_counter() - t0
    return run, {"preset": preset, "wall_s": round(wall, 2), **_train_stats(run), **summary}


def trained_with(config_file: Path, cfg: Any) -> bool:
    """Whether a stored run's configuration is ``cfg``: the same text, or the same once the
    keys added to the configuration since it was written are filled in at their defaults (so
    a study's trained runs survive a new configuration key)."""
    if not config_file.is_file():
        return False
    text = config_file.read_text()
    if text == cfg.to_yaml():
        return True
    try:
        stored = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(stored, dict) and with_defaults(stored, str(config_file)) == cfg.to_dict()


def _train_stats(run: Path) -> dict[str, Any]:
    """Images/s and final loss from a run's metrics.jsonl."""

    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    df = read_metrics_jsonl(path)
    if df.empty or "images_per_s" not in df:
        return {}
    rows = df[df["images_per_s"].notna()]
    # The first window includes start-up (graph warm-up, first data loads): leave it out.
    steady = rows.iloc[1:] if len(rows) > 2 else rows
    return {
        "images_per_s": round(float(steady["images_per_s"].median()), 1),
        "final_loss": float(rows["loss"].iloc[-1]) if "loss" in rows else None,
    }


# ---------------------------------------------------------------- evaluation


def evaluate_runs(
    spec: DemoSpec, data: Path, runs: dict[str, Path]
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, pd.DataFrame]]]:
    """Score every run and the baselines on the held-out batches with the same code."""

    ds = open_dataset(data)
    split = assign_split(ds.samples, ds.info.source, spec.split)
    # What every evaluate_images call shares: null size, seed, profile level, compound groups.
    scoring: dict[str, Any] = {
        "null_size": 500 if spec.quick else 2000,
        "seed": spec.seed,
        "progress": spec.progress,
        # BBBC021 fields are single-cell crops: score cells, not the few wells per plate.
        "level": profile_level(spec),
        "compound_groups": compound_groups(spec, ds.samples),
    }
    results: dict[str, Any] = {}
    profiles: dict[str, tuple[np.ndarray, pd.DataFrame]] = {}
    reference = None
    for label, run in runs.items():
        em = load_for_eval(run, "last")
        reference = reference or em
        res, prof = _evaluate_run(ds, split, label, em, scoring)
        results.update(res)
        profiles.update(prof)
    if spec.calibrate and runs:
        label = next(iter(runs))
        wp, wmeta = profiles[label]
        results[label]["calibration"] = calibrate(
            wp, wmeta, eval_mask=(wmeta["split"] == "test").to_numpy(), seed=spec.seed, name=label
        )
    if reference is not None:
        res, prof = evaluate_images(
            ds,
            split,
            _baseline_sources(spec, reference, ds),
            make_view_fn(reference.views_cfg),
            corrections=CORRECTIONS,
            correct_on=(*CORRECTED_SETS, CELLPROFILER_NAME),
            **scoring,
        )
        results.update(res)
        profiles.update(prof)
    for res in results.values():
        if isinstance(res, dict) and res.get("calibration"):
            apply_calibration(results, res["calibration"])  # every set shares the design
    return results, profiles


def _evaluate_run(
    ds: Any, split: Any, label: str, em: Any, scoring: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, pd.DataFrame]]]:
    """One trained run's figures and profiles (its online probe, TVN for DINO, corrections)."""
    return evaluate_images(
        ds,
        split,
        {label: em.method.embed},
        make_view_fn(em.views_cfg),
        tvn_on=(label,) if label == "DINO" else (),
        corrections=CORRECTIONS if label in CORRECTED_SETS else (),
        online_probe={"set": label, "probe": em.probe, "label_of": em.label_of},
        **scoring,
    )


def _baseline_sources(spec: DemoSpec, reference: Any, ds: Any) -> dict[str, Callable[[Any], Any]]:
    """The baselines scored next to the runs: intensity statistics, a random network shaped
    like ``reference`` (a loaded run), and with ``spec.cellprofiler`` CellProfiler features."""
    baselines: dict[str, Callable[[Any], Any]] = {
        "intensity stats": IntensityFeatures(),
        "random network": random_like_run(reference, ds, seed=spec.seed),
    }
    if spec.cellprofiler:
        from cdcl.embed.cellprofiler import CellProfilerSource
        from cdcl.embed.cellprofiler_features import CellProfilerOptions

        # The segmentation a user would run (Otsu + watershed on the rendered DNA channel),
        # not the simulator's own masks, which are drawn before blur and noise.
        options = CellProfilerOptions(segmentation="otsu")
        baselines[CELLPROFILER_NAME] = CellProfilerSource(options)
    return baselines


def compound_groups(spec: DemoSpec, samples: pd.DataFrame) -> dict[str, set[str]] | None:
    """With half of the compounds trained on: ``{"seen": ..., "unseen": ...}`` treatment names."""
    if spec.train_treatments != "half":
        return None
    seen = half_of_treatments(samples, spec.seed)  # the draw training made (data.subset)
    treated = set(samples.loc[~samples["is_control"].to_numpy(bool), "treatment"].astype(str))
    return {"seen": seen, "unseen": treated - seen}


def tables_by_compounds(feature_sets: dict[str, Any]) -> dict[str, dict[str, pd.DataFrame]]:
    """``{group: {variant: table}}`` for the feature sets scored per compound group."""
    groups = sorted({g for fs in feature_sets.values() for g in (fs.get("compounds") or {})})
    return {
        g: {
            v: comparison_table(
                {
                    n: fs["compounds"][g]
                    for n, fs in feature_sets.items()
                    if g in fs.get("compounds", {})
                },
                v,
            )
            for v in ("plate_normalized", "raw")
        }
        for g in groups
    }


def comparison_table(feature_sets: dict[str, Any], variant: str) -> pd.DataFrame:
    """One row per feature set, one column per headline metric, for one profile variant."""
    rows = []
    for name, res in feature_sets.items():
        row: dict[str, Any] = {"features": name}
        if "online_probe" in res:
            row["online probe acc"] = get_path(res, ("online_probe", "accuracy"))
        for label, path in COLUMNS:
            v = get_path(res.get(variant, {}), path)
            row[label] = float(v) if isinstance(v, int | float) else None
        rows.append(row)
    df = pd.DataFrame(rows).set_index("features")
    cols = ["online probe acc"] if "online probe acc" in df else []
    return df[cols + [c for c, _ in COLUMNS]]


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table with 3 decimals (– for missing)."""
    return frame_markdown(df, _three_decimals)


def _three_decimals(v: Any) -> str:
    """A table figure with 3 decimals, – when it is missing."""
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def to_text(df: pd.DataFrame) -> str:
    """The table as aligned plain text for the terminal."""
    return df.to_string(float_format=lambda v: f"{v:.3f}", na_rep="–")


# ---------------------------------------------------------------- report


def figure1(
    profiles: dict[str, tuple[np.ndarray, pd.DataFrame]], names: list[str], path: Path, seed: int
) -> Path | None:
    """The paper's Figure 1: UMAP of well profiles, one row per method, by batch and treatment."""

    names = [n for n in names if n in profiles]
    if not names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 4.3 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        feats, meta = profiles[name]
        draw_umap_panels(row, umap_frame(feats, meta, seed=seed), name)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(runs: dict[str, Path], path: Path) -> Path | None:
    """Loss, teacher entropy and throughput of every run against the step, one line per method."""

    frames = {
        label: read_metrics_jsonl(run / "metrics.jsonl")
        for label, run in runs.items()
        if (run / "metrics.jsonl").is_file()
    }
    if not frames:
        return None
    keys = [
        k
        for k in ("loss", "dino_loss", "barlow_loss", "teacher_entropy", "images_per_s")
        if any(k in df for df in frames.values())
    ]
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (label, df) in enumerate(frames.items()):
            if key in df and "step" in df:
                ok = df[key].notna()
                # One colour per method in every panel, also where a method logs nothing.
                ax.plot(df.loc[ok, "step"], df.loc[ok, key], lw=1.2, label=label, color=f"C{i}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _calibration(spec: DemoSpec, data: Path) -> dict[str, Any] | None:
    """The simulated screen's calibration report (cached in the dataset), None for real data."""
    if spec.dataset != "synthetic":
        return None
    from cdcl.experiments.screen_calibration import dataset_calibration

    return dataset_calibration(data)


def calib_lines(calib: dict[str, Any], fenced: bool = False) -> list[str]:
    """How the screen's batch effect compares with BBBC021, as report lines."""
    from cdcl.experiments.screen_calibration import report_lines

    strength = calib.get("build", {}).get("overrides", {}).get("batch_strength", 1.0)
    return [
        f"Batch strength {strength:g} (1 = calibrated against BBBC021; docs/calibration.md). "
        "Measured on this screen's training batches, next to BBBC021:",
        "",
        *(["```", *report_lines(calib), "```"] if fenced else report_lines(calib)),
    ]


def write_outputs(
    spec: DemoSpec,
    data: Path,
    feature_sets: dict[str, Any],
    training: dict[str, Any],
    pictures: dict[str, Path | None],
    design: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """results.json, results.md and the self-contained report.html (``design``: what was scored)."""

    ds = open_dataset(data)
    calib = _calibration(spec, data)
    tables = {v: comparison_table(feature_sets, v) for v in ("plate_normalized", "raw")}
    by_group = tables_by_compounds(feature_sets)
    groups = compound_groups(spec, ds.samples)
    note = correction_note(feature_sets)
    title = f"cdcl demo: {spec.dataset}{' (quick)' if spec.quick else ''}"
    unit = "image profiles" if profile_level(spec) == "image" else "well profiles"
    results = {
        "kind": "demo",
        "dataset": {"path": str(data.resolve()), "name": ds.info.name, "n_images": len(ds)},
        "spec": _spec_record(spec),
        "budget": budget_overrides(spec),
        "training": training,
        "timings_s": spec.timings,
        "tables": _table_records(tables),
        **(
            {
                "tables_by_compounds": {g: _table_records(ts) for g, ts in by_group.items()},
                "compound_groups": {g: sorted(n) for g, n in groups.items()},
            }
            if by_group and groups
            else {}
        ),
        **({"design": design} if design else {}),
        "feature_sets": feature_sets,
        **({"calibration": calib} if calib else {}),
        "versions": versions(),
    }
    out = spec.out
    write_results_text(out / "results.json", json.dumps(to_jsonable(results), indent=2))
    intro = f"Dataset `{ds.info.name}` ({len(ds)} images); metrics on held-out batches, {unit}."
    md = [f"# {title}", "", intro, "", *([note, ""] if note else []), single_replicate_note(spec)]
    md += ["", *_calibration_markdown(calib), *_tables_markdown(tables, training, spec.timings)]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    sections = [
        ("One replicate", f"<p>{html.escape(single_replicate_note(spec))}</p>"),
        *_calibration_sections(calib),
        *_table_sections(tables, results, list(training), note),
        *(
            (f"Calibration of {name}", _calibration_html(res["calibration"]))
            for name, res in feature_sets.items()
            if isinstance(res, dict) and res.get("calibration")
        ),
        *_picture_sections(pictures, unit),
        ("Timings", _timings_html(spec.timings, training)),
    ]
    write_html(out / "report.html", title, sections)
    return {"json": out / "results.json", "md": out / "results.md", "html": out / "report.html"}


def _spec_record(spec: DemoSpec) -> dict[str, Any]:
    """The options results.json records (split and methods only when a study set them)."""
    return {
        "dataset": spec.dataset,
        "quick": spec.quick,
        "seed": spec.seed,
        # Only set by studies: a demo's results.json stays as it was.
        **({"split": spec.split} if spec.split is not None else {}),
        **({"methods": list(spec.methods)} if spec.methods is not None else {}),
    }


def _table_records(tables: dict[str, pd.DataFrame]) -> dict[str, list[dict[str, Any]]]:
    """Each variant's comparison table as JSON records, one per feature set."""
    return {v: t.reset_index().to_dict(orient="records") for v, t in tables.items()}


def _calibration_markdown(calib: dict[str, Any] | None) -> list[str]:
    """results.md's section on the simulated screen's batch effect (none for real data)."""
    if not calib:
        return []
    return [
        "## Batch effect of this screen against real references",
        "",
        *calib_lines(calib, fenced=True),
        "",
    ]


def _tables_markdown(
    tables: dict[str, pd.DataFrame], training: dict[str, Any], timings: dict[str, float]
) -> list[str]:
    """results.md's comparison tables (plate-normalised, raw), training table and stage times."""
    keys = ("epoch", "step", "images_per_s", "wall_s")
    runs = [[m, *(f"{t.get(k)}" for k in keys)] for m, t in training.items()]
    return [
        "## Profiles standardised per plate against its controls",
        "",
        to_markdown(tables["plate_normalized"]),
        "",
        "## Raw profiles",
        "",
        to_markdown(tables["raw"]),
        "",
        "## Training",
        "",
        markdown_table(["method", "epochs", "steps", "images/s", "wall s"], runs),
        "",
        "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
    ]


def _metrics_html(df: pd.DataFrame) -> str:
    """A comparison table as the report's metrics table (metrics as rows, best highlighted)."""
    t = df.T
    higher = {c: c not in LOWER_IS_BETTER for c in t.index}
    return table_html(t, higher)


def _calibration_sections(calib: dict[str, Any] | None) -> list[tuple[str, str]]:
    """report.html's section on the simulated screen's batch effect (none for real data)."""
    if not calib:
        return []
    text = "<pre>" + html.escape("\n".join(calib_lines(calib))) + "</pre>"
    return [("Batch effect of this screen against real references", text)]


def _table_sections(
    tables: dict[str, pd.DataFrame], results: dict[str, Any], learned: list[str], note: str
) -> list[tuple[str, str]]:
    """report.html's results figure with the plate-normalised metrics, then the raw metrics."""
    note_html = f'<p class="small">{note}</p>' if note else ""
    summary = _demo_summary(tables["plate_normalized"], results, learned, "plate_normalized")
    return [
        (
            "Results: held-out batches, profiles standardised per plate against controls",
            note_html
            + summary
            + "<h3>All metrics</h3>"
            + _metrics_html(tables["plate_normalized"]),
        ),
        ("Held-out batches, raw profiles", _metrics_html(tables["raw"])),
    ]


def _picture_sections(pictures: dict[str, Path | None], unit: str) -> list[tuple[str, str]]:
    """report.html's figures: the UMAPs, the training curves and the dataset montage."""
    return [
        (f"Figure 1: UMAP of {unit}", img_html(pictures.get("figure1"), "UMAP")),
        ("Training curves", img_html(pictures.get("curves"), "training curves")),
        ("Dataset", img_html(pictures.get("montage"), "montage")),
    ]


def _timings_html(timings: dict[str, float], training: dict[str, Any]) -> str:
    """Stage times and each method's training throughput."""
    stages = ", ".join(f"{k}: {v:.1f} s" for k, v in timings.items())
    speeds = ", ".join(f"{m}: {t.get('images_per_s')} images/s" for m, t in training.items())
    return f"<p>{stages}</p><p>{speeds}</p>"


def _demo_summary(
    frame: pd.DataFrame, results: dict[str, Any], learned: list[str], variant: str
) -> str:
    """The design, the results figure with the stored totals, greyed no-power columns, the
    banner when the design cannot separate the rows, and the chance warnings.

    ``variant``: the profile variant ``frame`` shows; its totals, its calibration's no-power
    verdicts and null spreads are the ones used (a metric can have power on raw profiles and
    none on plate-normalised ones).
    """
    banner = design_banner(frame, COLUMN_PATHS, results, variant)
    lines = design_lines(results)
    head = '<p class="design">' + "<br>".join(html.escape(ln) for ln in lines) + "</p>"
    return (head if lines else "") + summary_html(
        frame,
        COLUMN_PATHS,
        learned,
        tuple(b for b in BASELINE_SETS if b not in RANDOM_SETS),
        totals=stored_totals(results, variant),
        greyed=greyed_columns(results, COLUMN_PATHS, variant),
        warnings=[*([banner] if banner else []), *chance_warnings(results)],
    )


def demo_design(
    profiles: dict[str, tuple[np.ndarray, pd.DataFrame]], level: str
) -> dict[str, Any] | None:
    """The design the demo scored: the held-out rows of its first feature set's profiles."""
    if not profiles:
        return None
    meta = next(iter(profiles.values()))[1]
    test = (meta["split"] == "test").to_numpy()
    return design_facts(meta, (meta["split"] == "train").to_numpy(), test, test, level)


def correction_note(feature_sets: dict[str, Any]) -> str:
    """The transductive-fit statement when the table has post-hoc corrected rows, else ''."""
    if not any(name.rsplit("+", 1)[-1] in CORRECTIONS for name in feature_sets if "+" in name):
        return ""

    return TRANSDUCTIVE_NOTE


def single_replicate_note(spec: DemoSpec) -> str:
    """One line: these figures come from one seed and split; the study command gives CIs."""
    split = "the stored split" if spec.split is None else f"fold {spec.split}"
    quick = " --quick" if spec.quick else ""
    return (
        f"One replicate (seed {spec.seed}, {split}): no uncertainty. For means, 95% CIs and "
        f"paired tests across seeds and folds run `cdcl study --dataset {spec.dataset}{quick} "
        "--out study_out`."
    )


def _record_final_timings(results_json: Path, timings: dict[str, float]) -> None:
    """Put the report stage's own time into results.json once that stage has ended."""

    results = json.loads(results_json.read_text())
    results["timings_s"] = timings
    write_results_text(results_json, json.dumps(results, indent=2))


def check_custom_data(path: Path | None, split: int | None = None) -> None:
    """A user's dataset directory opens, has batches to hold out, and has fold ``split``."""
    if path is None:
        raise CdclError("--data: give the dataset directory (built by cdcl build)")
    if not Path(path).is_dir():
        raise CdclError(f"--data {path}: not a directory; build it with cdcl build table")
    ds = open_dataset(path)  # names the missing or damaged file itself
    if ds.samples["batch"].astype(str).nunique() < 2:
        raise CdclError(
            f"--data {path}: one batch only; held-out-batch folds need at least 2 (rebuild with "
            "--batch-col naming the plate or replicate column)"
        )
    assign_split(ds.samples, ds.info.source, split)  # an impossible fold fails here, not mid-run


def check_demo_spec(spec: DemoSpec) -> list[str]:
    """Validate every option before anything is built or trained; returns the method labels."""
    if spec.dataset not in DATASETS:
        raise CdclError(f"--dataset {spec.dataset}: unknown; choose synthetic or bbbc021")
    if spec.level is not None and spec.level not in LEVELS:
        raise CdclError(f"--level {spec.level}: choose {' or '.join(LEVELS)}")
    if spec.dataset == CUSTOM:
        check_custom_data(spec.data_dir, spec.split)
    if spec.epochs is not None and spec.epochs < 1:
        raise CdclError(f"--epochs {spec.epochs}: train at least 1 epoch")
    if spec.seed < 0:
        raise CdclError(f"seed {spec.seed}: seeds are non-negative integers")
    if spec.split is not None and spec.split < 1:
        raise CdclError(f"fold {spec.split}: folds are numbered from 1")
    if spec.out.exists() and not spec.out.is_dir():
        raise CdclError(f"--out {spec.out}: is a file; choose a directory")
    if spec.train_treatments not in TRAIN_TREATMENTS:
        raise CdclError(
            f"--train-treatments {spec.train_treatments}: unknown; choose "
            f"{' or '.join(TRAIN_TREATMENTS)}"
        )
    labels = method_labels(spec)
    if spec.dataset == "bbbc021":
        src = bbbc021_source(spec)
        for f in (src / "cells_subset.npz", src / "metadata_subset.csv"):
            if not f.is_file():
                raise CdclError(f"{f}: not found; pass --bbbc021-dir with the BBBC021 week-4 crops")
        table = pd.read_csv(src / "metadata_subset.csv", usecols=["plate", "compound"])
        bbbc021_test_plates(table, spec.split)  # an impossible fold fails here, not mid-run
    return labels


def _timed(spec: DemoSpec, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one step of a stage, naming it for the keep-alive and printing its time."""
    working_on(what)
    t0 = time.perf_counter()
    result = fn(*args)
    if spec.progress:
        print(f"   {what}: {time.perf_counter() - t0:.1f} s", flush=True)
    return result


def run_demo(spec: DemoSpec) -> dict[str, Any]:
    """Run every stage; returns the paths written and the plate-normalised table."""

    check_demo_spec(spec)
    spec.out.mkdir(parents=True, exist_ok=True)
    with Stage(spec, "data"):
        data = prepare_data(spec)
    labels = method_labels(spec)
    runs: dict[str, Path] = {}
    training: dict[str, Any] = {}
    for label in labels:
        with Stage(spec, f"train {label}"):
            runs[label], training[label] = train_method(spec, label, data)
    # Scoring and drawing run for tens of seconds without a line of their own: the keep-alive
    # says what is running after every 10 s of silence.
    with Stage(spec, "evaluate"), keep_alive(spec.progress, prefix="cdcl demo: "):
        feature_sets, profiles = evaluate_runs(spec, data, runs)
    with Stage(spec, "report"), keep_alive(spec.progress, prefix="cdcl demo: "):
        pictures = {
            "montage": _timed(
                spec, "montage", montage, open_dataset(data), spec.out / "montage.png"
            ),
            "figure1": _timed(
                spec,
                "UMAP figure",
                figure1,
                profiles,
                [n for n in ("DINO", "CDCL") if n in profiles],
                spec.out / "figure1_umap.png",
                spec.seed,
            ),
            "curves": _timed(
                spec, "training curves", training_curves, runs, spec.out / "training_curves.png"
            ),
        }
        paths = _timed(
            spec,
            "tables and report.html",
            write_outputs,
            spec,
            data,
            feature_sets,
            training,
            pictures,
            demo_design(profiles, profile_level(spec)),
        )
    _record_final_timings(paths["json"], spec.timings)
    table = comparison_table(feature_sets, "plate_normalized")
    return {"paths": paths, "table": table, "training": training, "timings": spec.timings}
