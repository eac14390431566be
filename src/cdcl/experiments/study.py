"""A study: the demo's comparison repeated over seeds and held-out-batch folds, then aggregated.

Every replicate is one demo run (cdcl.experiments.demo) with its own seed and/or fold, written to
``OUT/replicates/seed<S>[_fold<F>]/`` (its own results.json, results.md and report.html). The
study then summarises every figure of the demo's comparison tables across replicates (mean,
standard deviation, 95% t-interval), pairs every row with the reference rows (default DINO) by
replicate (difference, 95% CI, paired t-test), and gives a verdict per metric. Outputs:
``study.json``, ``study.md`` and a self-contained ``report.html`` with forest plots.

Caching: a finished replicate leaves ``replicate.json`` (the key it was run with) next to its
results.json and is reused when the key matches; an unfinished one is rerun through the demo,
which itself reuses the dataset and resumes the training runs. So a killed study continues
where it stopped when the same command is run again.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cdcl import schema as sc
from cdcl._version import versions
from cdcl.data.dataset_dir import atomic_write_text, open_dataset
from cdcl.data.splits import assign_split
from cdcl.errors import CdclError
from cdcl.evaluation.calibration import CALIBRATED, pooled_power
from cdcl.experiments import statistics as st
from cdcl.experiments.demo import (
    BBBC021_METHODS,
    COLUMN_PATHS,
    CUSTOM,
    DATASETS,
    LOWER_IS_BETTER,
    METHODS,
    DemoSpec,
    Stage,
    budget_overrides,
    check_demo_spec,
    method_labels,
    prepare_data,
    run_demo,
    train_method,
)
from cdcl.experiments.preregistration import (
    DESIGN_VERSION,
    design_hash,
    endpoint_markdown,
    preregistration,
    record_look,
    table_lookup,
    test_endpoints,
)
from cdcl.experiments.preregistration import (
    PRIMARY_METRIC as PRIMARY_ENDPOINT_METRIC,
)
from cdcl.report.html import _plt, _save
from cdcl.report.markdown import frame_markdown, markdown_table
from cdcl.report.page import frame_html, img_html, write_html
from cdcl.report.results import read_results, to_jsonable
from cdcl.schema import get_path

VARIANTS = ("plate_normalized", "raw")  # the profile variants in display order: the verdicts' first
VARIANT_TITLES = {
    "plate_normalized": "profiles standardised per plate against controls",
    "raw": "raw profiles",
}
PRIMARY_VARIANT = "plate_normalized"
HEADLINE_METHOD = "CDCL"
DEFAULT_REFERENCES = ("DINO", "DINO+harmony")
# The metrics named on the Studies page (docs/studies.md) before any study was run ("what 'CDCL is better' means").
PRIMARY_METRICS = ("treatment acc (logistic)", "NSCB", "replicate mAP (other batch)")
# Per-treatment mixing columns (kBET / iLISI computed within treatment) count as primary too,
# whatever their exact label.
_PER_TREATMENT_MIXING = re.compile(r"(kbet|ilisi).*(treat|within)|(treat|within).*(kbet|ilisi)")
TRANSDUCTIVE_NOTE = (
    "Rows ending in +harmony or +combat are corrected by a model fitted on the evaluated profiles "
    "themselves (all of them, held-out batches included, with their batch labels): they are "
    "transductive, unlike CDCL, which never sees the held-out batches."
)
ZERO_VARIANCE_NOTE = (
    "† the same difference in every replicate: the t statistic is infinite and p = 0 by "
    "scipy's convention, which overstates the evidence; more replicates are needed."
)
NO_POWER = "no power in this design"  # the calibration's verdict (cdcl.report.calibration)
SYMBOL = {
    st.BETTER: "▲",
    st.WORSE: "▼",
    st.NO_DIFFERENCE: "·",
    st.TOO_FEW: "?",
    st.NOT_COMPUTABLE: "–",
    NO_POWER: "∅",
}


def is_primary(metric: str) -> bool:
    """Whether ``metric`` is one of the pre-declared metrics of the Studies page (docs/studies.md)."""
    return metric in PRIMARY_METRICS or bool(_PER_TREATMENT_MIXING.search(metric.lower()))


@dataclass
class StudySpec:
    """What one study runs."""

    out: Path
    dataset: str = "synthetic"
    methods: tuple[str, ...] | None = None  # None: every method of the dataset
    seeds: tuple[int, ...] = (0, 1, 2)
    folds: tuple[int, ...] | None = None  # None: the dataset's stored split
    references: tuple[str, ...] = DEFAULT_REFERENCES
    epochs: int | None = None
    quick: bool = False
    fresh: bool = False
    bbbc021_dir: Path | None = None
    progress: bool = True
    alpha: float = st.ALPHA
    test_batches: int | None = None  # simulated screen: held-out batches (None: the preset's)
    batch_strength: float | None = None  # simulated screen: batch effect (None: calibrated, 1)
    cellprofiler: bool = False  # every replicate adds the CellProfiler row and its corrections
    calibrate: bool = False  # every replicate calibrates its design (metrics without power)
    train_treatments: str = "all"  # "half": every method trains on the same half of the compounds
    data: Path | None = None  # a screen the user built (dataset "custom"): its directory
    level: str | None = None  # well or image profiles (None: the dataset's)
    note: str | None = None  # the design's rationale, stored in design.json (e.g. why this n)
    primary_metric: str = PRIMARY_ENDPOINT_METRIC  # the primary endpoint's metric
    in_curve: bool = False  # one strength of a batch-strength curve (the curve holds the design)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Replicate:
    """One seed and one fold (None: the stored split)."""

    seed: int
    fold: int | None

    @property
    def name(self) -> str:
        """The replicate's directory name, e.g. ``seed0_fold2``."""
        return f"seed{self.seed}" + (f"_fold{self.fold}" if self.fold is not None else "")


def parse_ints(text: str | None, option: str) -> tuple[int, ...] | None:
    """``"0,1,2"`` -> (0, 1, 2); None or empty -> None; CdclError naming the option otherwise."""
    if text is None or not str(text).strip():
        return None
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise CdclError(f"{option} {text}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(set(values)) != len(values):
        raise CdclError(f"{option} {text}: a value is repeated")
    return values


def replicates(spec: StudySpec) -> list[Replicate]:
    """Every (seed, fold) of the study, seeds outermost."""
    folds: tuple[int | None, ...] = spec.folds or (None,)
    return [Replicate(s, f) for s in spec.seeds for f in folds]


def check_spec(spec: StudySpec) -> list[str]:
    """Validate the options before anything runs; returns the method labels."""
    if spec.dataset not in DATASETS:
        raise CdclError(f"--dataset {spec.dataset}: unknown; choose synthetic or bbbc021")
    if (spec.dataset == CUSTOM) != (spec.data is not None):
        raise CdclError("--data DIR: give the dataset directory (and no --dataset) for your screen")
    if not spec.seeds:
        raise CdclError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    for option, values in (("--seeds", spec.seeds), ("--folds", spec.folds or ())):
        if len(set(values)) != len(values):  # two replicates of one seed are one replicate
            raise CdclError(f"{option} {','.join(map(str, values))}: a value is repeated")
    if spec.folds is not None and any(f < 1 for f in spec.folds):
        folds = ",".join(map(str, spec.folds))
        raise CdclError(f"--folds {folds}: folds are numbered from 1")
    if spec.primary_metric not in COLUMN_PATHS:
        raise CdclError(
            f"--primary-metric {spec.primary_metric}: unknown; choose one of the comparison "
            f"table's metrics: {', '.join(COLUMN_PATHS)}"
        )
    if not 0 < spec.alpha < 1:
        raise CdclError(f"--alpha {spec.alpha}: must lie between 0 and 1")
    if screen_overrides(spec):
        if spec.dataset != "synthetic":
            raise CdclError(
                "--test-batches/--batch-strength: only for the simulated screen (--dataset synthetic)"
            )
        from cdcl.data.synthetic import resolve_config

        resolve_config("tiny" if spec.quick else "small", **screen_overrides(spec))
    if any(s < 0 for s in spec.seeds):
        raise CdclError(f"--seeds {','.join(map(str, spec.seeds))}: seeds are non-negative")
    if spec.out.exists() and not spec.out.is_dir():
        raise CdclError(f"--out {spec.out}: is a file; choose a directory")
    # Every replicate's options (epochs, methods, BBBC021 files and folds) before any work.
    labels = check_demo_spec(_demo_spec(spec, Replicate(spec.seeds[0], None)))
    for fold in spec.folds or ():
        check_demo_spec(_demo_spec(spec, Replicate(spec.seeds[0], fold)))
    if not spec.references:
        raise CdclError("--reference: name at least one row, e.g. --reference DINO")
    known = set(METHODS) | set(BBBC021_METHODS)
    first = spec.references[0]
    if first in known and first not in labels:
        raise CdclError(
            f"--reference {first}: not among --methods {','.join(labels)}; add it or pick another"
        )
    return labels


def screen_overrides(spec: StudySpec) -> dict[str, Any]:
    """The simulated screen's overrides a study asks for (empty: the preset as it is)."""
    out: dict[str, Any] = {}
    if spec.test_batches is not None:
        out["test_batches"] = int(spec.test_batches)
    if spec.batch_strength is not None:
        out["batch_strength"] = float(spec.batch_strength)
    return out


def data_dir(spec: StudySpec, rep: Replicate) -> Path:
    """The dataset a replicate uses: one per screen seed (synthetic) or one for all (BBBC021)."""
    if spec.dataset == "synthetic":
        over = screen_overrides(spec)
        suffix = "".join(
            f"-{'tb' if k == 'test_batches' else 'bs'}{v:g}" for k, v in sorted(over.items())
        )
        return spec.out / "data" / f"{'tiny' if spec.quick else 'small'}-seed{rep.seed}{suffix}"
    if spec.dataset == CUSTOM:
        return Path(spec.data)  # type: ignore[arg-type]
    return spec.out / "data" / "bbbc021"


def _demo_spec(spec: StudySpec, rep: Replicate) -> DemoSpec:
    return DemoSpec(
        out=spec.out / "replicates" / rep.name,
        dataset=spec.dataset,
        quick=spec.quick,
        seed=rep.seed,
        epochs=spec.epochs,
        split=rep.fold,
        methods=spec.methods,
        data_dir=data_dir(spec, rep),
        bbbc021_dir=spec.bbbc021_dir,
        progress=spec.progress,
        screen=screen_overrides(spec) if spec.dataset == "synthetic" else {},
        cellprofiler=spec.cellprofiler,
        calibrate=spec.calibrate,
        train_treatments=spec.train_treatments,
        level=spec.level,
    )


def replicate_key(spec: StudySpec, rep: Replicate) -> dict[str, Any]:
    """Everything a replicate's figures depend on; a finished replicate is reused when it matches."""
    demo = _demo_spec(spec, rep)
    return {
        "dataset": spec.dataset,
        "quick": spec.quick,
        "seed": rep.seed,
        "fold": rep.fold,
        "methods": method_labels(demo),
        "budget": budget_overrides(demo),
        # relative to the study's folder: a study copied or moved elsewhere stays reusable;
        # a user's screen by its content, wherever it lies
        "data": _relative(demo.data_dir, spec.out)
        if spec.dataset != CUSTOM
        else _data_fingerprint(demo.data_dir),
        **({"level": spec.level} if spec.level else {}),
        "bbbc021_dir": str(Path(spec.bbbc021_dir).resolve()) if spec.bbbc021_dir else None,
        # only when set, so that replicates of earlier studies stay reusable
        **({"screen": demo.screen} if demo.screen else {}),
        **({"cellprofiler": True} if spec.cellprofiler else {}),
        **({"calibrate": True} if spec.calibrate else {}),
    }


def _data_fingerprint(path: Path | None) -> str:
    """A built dataset's identity: the hash of its metadata files (cdcl embed's fingerprint)."""
    from cdcl.embed.to_file import dataset_fingerprint

    return str(dataset_fingerprint(open_dataset(path))["sha256"])


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else absolute."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


KEY_FILE = "replicate.json"


def held_out_batches(spec: StudySpec, rep: Replicate) -> list[str]:
    """The batches a replicate evaluates on (its test part)."""
    ds = open_dataset(data_dir(spec, rep))
    split = assign_split(ds.samples, ds.info.source, rep.fold)
    return sorted(ds.samples.loc[(split == "test").to_numpy(), "batch"].astype(str).unique())


def run_replicate(spec: StudySpec, rep: Replicate) -> tuple[dict[str, Any], bool]:
    """The replicate's results.json content, reused when finished with the same key, else run."""
    demo = _demo_spec(spec, rep)
    key = replicate_key(spec, rep)
    key_file, results_file = demo.out / KEY_FILE, demo.out / "results.json"
    if key_file.is_file() and results_file.is_file():
        try:
            same = json.loads(key_file.read_text()) == key
        except (ValueError, RecursionError):
            same = False  # a damaged key file: run the replicate again
        if same:
            return read_replicate_results(results_file), True
    key_file.unlink(missing_ok=True)
    run_demo(demo)
    # The key is written last: its presence says the replicate's results are complete.
    atomic_write_text(key_file, json.dumps(key, indent=2))
    return read_replicate_results(results_file), False


def replicate_done(spec: StudySpec, rep: Replicate) -> bool:
    """Whether the replicate finished with the key ``spec`` gives it (its results are reused)."""
    out = _demo_spec(spec, rep).out
    key_file = out / KEY_FILE
    if not (key_file.is_file() and (out / "results.json").is_file()):
        return False
    try:
        return json.loads(key_file.read_text()) == replicate_key(spec, rep)
    except (ValueError, RecursionError):
        return False


def train_replicate(spec: StudySpec, rep: Replicate) -> None:
    """Build a replicate's screen and train its methods (reused or resumed), without scoring.

    A study trains every replicate before it scores any: training is the long, fixed part,
    and scoring afterwards means every replicate is scored by the same code.
    """
    if replicate_done(spec, rep):
        return
    demo = _demo_spec(spec, rep)
    demo.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(demo)
    for label in method_labels(demo):
        with Stage(spec, f"train {rep.name} {label}"):
            train_method(demo, label, data)


def read_replicate_results(path: Path) -> dict[str, Any]:
    """A replicate's results.json, checked (cdcl.report.results) and holding its tables."""
    hint = f"remove {path.parent} to run that replicate again"
    results = read_results(path, hint=hint)
    if not results.get("tables"):
        raise sc.SchemaError("tables", "is missing or empty", "the demo's tables").located(
            str(path), hint
        )
    return results


def metrics_without_power(
    results: list[dict[str, Any]], variant: str = PRIMARY_VARIANT
) -> dict[str, str]:
    """Study metrics without power on the profiles the verdicts compare: ``{metric: reason}``.

    Power is decided once per study from every replicate's calibration (``cdcl study
    --calibrate``), pooled (:func:`cdcl.evaluation.calibration.pooled_power`), on ``variant``
    (the plate-normalised profiles the verdicts use), so one replicate cannot change the
    family on its own.
    """
    column_of = {path: label for label, path in COLUMN_PATHS.items()}
    cals = [
        fs["calibration"]
        for res in results
        for fs in (res.get("feature_sets") or {}).values()
        if isinstance(fs, dict) and fs.get("calibration")
    ]
    if not cals:
        return {}
    pooled = pooled_power(cals)
    records = pooled["variants"].get(variant) or pooled["variants"].get("raw") or {}
    # A calibration written before per-variant records may list a label without its record.
    listed = {lb for c in cals if "variants" not in c for lb in c.get("no_power", [])}
    out: dict[str, str] = {}
    for label, path, _ in CALIBRATED:
        column = column_of.get(path)
        rec = records.get(label) or ({"power": False} if label in listed else None)
        if column is None or rec is None or rec.get("power"):
            continue
        reason = rec.get("reason") or NO_POWER
        out[column] = f"{reason} (pooled over {pooled['n_replicates']} replicate calibrations)"
    return out


def replicate_figures(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{variant: {row: {metric: value}}}`` from a demo's results.json tables."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, records in results.get("tables", {}).items():
        out[variant] = {
            str(r["features"]): {k: v for k, v in r.items() if k != "features"} for r in records
        }
    return out


# Metrics whose per-query outcomes a replicate keeps: (path to the outcomes, their kind).
OUTCOME_SOURCES = {
    "NSC": (("moa_matching", "queries", "nsc"), "queries"),
    "NSCB": (("moa_matching", "queries", "nscb"), "queries"),
    "treatment acc (logistic)": (("classification", "logistic", "per_label"), "labels"),
}


def replicate_outcomes(
    results: dict[str, Any],
) -> dict[str, dict[str, dict[str, dict[str, tuple[float, float]]]]]:
    """``{variant: {row: {metric: {compound: (correct, answered)}}}}`` from a results.json.

    The probe's outcomes are per treatment (its label); metrics without stored outcomes (an
    older results.json) are left out.
    """
    out: dict[str, dict[str, dict[str, dict[str, tuple[float, float]]]]] = {}
    for row, res in (results.get("feature_sets") or {}).items():
        for variant in VARIANTS:
            for metric, (path, kind) in OUTCOME_SOURCES.items():
                node = get_path(res, (variant, *path))
                if not isinstance(node, dict):
                    continue
                if kind == "queries" and "compound" in node:
                    counts = st.per_compound(node["compound"], node["hit"])
                elif kind == "labels" and "label" in node:
                    counts = st.per_compound(node["label"], node["correct"], node["n"])
                else:
                    continue
                out.setdefault(variant, {}).setdefault(str(row), {})[metric] = counts
    return out


def add_compound_intervals(
    diffs: list[dict[str, Any]],
    outcomes: list[dict[str, dict[str, dict[str, dict[str, tuple[float, float]]]]]],
    fixed_compounds: bool = True,
) -> None:
    """Add a bootstrap-over-compounds CI to the differences whose outcomes every replicate kept.

    It becomes the displayed interval (``interval``: "compounds") when every replicate evaluated
    the same compounds (``fixed_compounds``, and the same compound names everywhere): then the
    replicates share them and an interval over replicates leaves out the variation from which
    compounds the screen happens to hold. Otherwise (e.g. the simulated screen, whose compounds
    are drawn anew per seed) the t-interval over units stays the displayed one (``"t"``).
    """
    for d in diffs:
        d["interval"] = "t"
        if d["metric"] not in OUTCOME_SOURCES:
            continue
        m, r = [], []
        for rep in outcomes:
            rows = rep.get(d["variant"], {})
            a = rows.get(d["features"], {}).get(d["metric"])
            b = rows.get(d["reference"], {}).get(d["metric"])
            if a is None or b is None:
                break
            m.append(a)
            r.append(b)
        else:
            if not m:
                continue
            boot = st.compound_bootstrap_difference(m, r)
            d["bootstrap"] = boot
            sets = {frozenset(x) for x in (*m, *r)}
            if fixed_compounds and len(sets) == 1:
                d["interval"] = "compounds"


def aggregate_study(
    figures: list[dict[str, dict[str, dict[str, Any]]]],
    references: tuple[str, ...],
    alpha: float = st.ALPHA,
    lower_is_better: set[str] | frozenset[str] = frozenset(LOWER_IS_BETTER),
    units: list[Any] | None = None,
    outcomes: list[dict[str, Any]] | None = None,
    fixed_compounds: bool = True,
    no_power: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Summaries, differences and verdicts per profile variant, plus the headline verdicts.

    ``outcomes`` (one :func:`replicate_outcomes` per replicate) adds bootstrap-over-compounds
    intervals (:func:`add_compound_intervals`).

    ``units`` (one per replicate, e.g. its held-out fold): replicates sharing a unit are averaged
    before testing. The pre-declared metrics of each (variant, row, reference) form one family
    whose p-values are Holm-adjusted; their verdicts use the adjusted p-values.

    ``no_power`` (``{metric: reason}``, from the replicates' calibration) names pre-declared
    metrics that cannot move on this design: they are reported but left out of the Holm
    families and the verdicts.
    """
    no_power = no_power or {}
    variants = [v for v in VARIANTS if any(v in f for f in figures)]
    variants += sorted({v for f in figures for v in f} - set(variants))
    summary: list[dict[str, Any]] = []
    diffs: list[dict[str, Any]] = []
    for variant in variants:
        s, d = st.aggregate(
            [f.get(variant, {}) for f in figures], references, lower_is_better, alpha, units
        )
        summary += [{"variant": variant, **r} for r in s]
        diffs += [{"variant": variant, **r} for r in d]
    adjust_primary_family(diffs, alpha, set(no_power))
    add_compound_intervals(diffs, outcomes or [], fixed_compounds)
    rows = {r["features"] for r in summary}
    return {
        "summary": summary,
        "differences": diffs,
        "references_present": [r for r in references if r in rows],
        "references_missing": [r for r in references if r not in rows],
        "headline": headline(diffs, references, alpha, no_power),
        "no_power": dict(no_power),
    }


def adjust_primary_family(
    diffs: list[dict[str, Any]], alpha: float = st.ALPHA, no_power: set[str] | None = None
) -> None:
    """Add Holm-adjusted p-values over the pre-declared metrics, per (variant, row, reference).

    The pre-declared metrics' verdicts then use the adjusted p (the raw verdict is kept as
    ``verdict_raw``); other metrics are exploratory: ``p_holm`` is None and the verdict raw.
    Pre-declared metrics in ``no_power`` get the verdict "no power in this design".
    """
    no_power = no_power or set()
    families: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for d in diffs:
        d["verdict_raw"] = d["verdict"]
        d["p_holm"] = None
        if is_primary(d["metric"]) and d["metric"] in no_power:
            d["verdict"] = NO_POWER
        elif is_primary(d["metric"]):
            families.setdefault((d["variant"], d["features"], d["reference"]), []).append(d)
    for family in families.values():
        for d, p_adj in zip(family, st.holm([d["p"] for d in family])):
            d["p_holm"] = p_adj
            d["verdict"] = st.verdict(
                d["mean_diff"], p_adj, d["n"], bool(d["lower_is_better"]), alpha
            )


def headline(
    diffs: list[dict[str, Any]],
    references: tuple[str, ...],
    alpha: float = st.ALPHA,
    no_power: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """CDCL against each reference on the pre-declared metrics, with the overall rule of the Studies page.

    Overall: ``better`` when at least one pre-declared metric is better and none worse, ``worse``
    in the mirror case, ``mixed`` when some are better and some worse, else ``no detectable
    difference``.
    """
    out = []
    for ref in references:
        rows = [
            d
            for d in diffs
            if d["variant"] == PRIMARY_VARIANT
            and d["features"] == HEADLINE_METHOD
            and d["reference"] == ref
            and is_primary(d["metric"])
        ]
        if not rows:
            continue
        verdicts = [d["verdict"] for d in rows if d["metric"] not in (no_power or {})]
        better, worse = st.BETTER in verdicts, st.WORSE in verdicts
        overall = (
            "mixed"
            if better and worse
            else st.BETTER
            if better
            else st.WORSE
            if worse
            else st.NO_DIFFERENCE
        )
        out.append(
            {
                "method": HEADLINE_METHOD,
                "reference": ref,
                "variant": PRIMARY_VARIANT,
                "alpha": alpha,
                "metrics": {d["metric"]: d["verdict"] for d in rows},
                "left_out": {m: r for m, r in (no_power or {}).items() if is_primary(m)},
                "overall": overall,
            }
        )
    return out


# ---------------------------------------------------------------- formatting


def _num(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _mean_ci(r: dict[str, Any], n_total: int) -> str:
    if r["n"] < 2:
        text = _num(r["mean"])
    else:
        text = f"{_num(r['mean'])} ± {(r['ci_high'] - r['ci_low']) / 2:.3f}"
    return text + (f" (n={r['n']})" if r["n"] != n_total else "")


def _p(p: Any) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "–"
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def _diff_cell(d: dict[str, Any]) -> str:
    mark = "†" if d.get("zero_variance") else ""
    return f"{_num(d['mean_diff'], True)} {SYMBOL[d['verdict']]} (p {_p(d['p'])}{mark})"


def _ci(d: dict[str, Any]) -> str:
    if d.get("interval") == "compounds":
        b = d["bootstrap"]
        return f"[{_num(b['ci_low'], True)}, {_num(b['ci_high'], True)}] (compounds)"
    return f"[{_num(d['ci_low'], True)}, {_num(d['ci_high'], True)}] (t)"


def _metric_label(metric: str) -> str:
    return metric + (" ↓" if metric in LOWER_IS_BETTER else "")


def summary_frame(summary: list[dict[str, Any]], variant: str, n_total: int) -> pd.DataFrame:
    """Rows: feature sets; columns: metrics; cells: mean ± CI half-width."""
    recs = [r for r in summary if r["variant"] == variant]
    rows = list(dict.fromkeys(r["features"] for r in recs))
    cols = list(dict.fromkeys(r["metric"] for r in recs))
    df = pd.DataFrame("–", index=pd.Index(rows, name="features"), columns=cols)
    for r in recs:
        df.loc[r["features"], r["metric"]] = _mean_ci(r, n_total)
    return df.rename(columns=_metric_label)


def _headline_first(rows: list[str]) -> list[str]:
    return sorted(rows, key=lambda r: r != HEADLINE_METHOD)


def metric_order(summary: list[dict[str, Any]], variant: str) -> list[str]:
    """The metrics of one variant in table order (first appearance in the summary)."""
    return list(dict.fromkeys(r["metric"] for r in summary if r["variant"] == variant))


def difference_frame(
    diffs: list[dict[str, Any]], variant: str, reference: str, metric_order: list[str]
) -> pd.DataFrame:
    """Rows: feature sets; columns: metrics; cells: difference from the reference, verdict, p."""
    recs = [d for d in diffs if d["variant"] == variant and d["reference"] == reference]
    rows = _headline_first(list(dict.fromkeys(d["features"] for d in recs)))
    cols = [m for m in metric_order if any(d["metric"] == m for d in recs)]
    df = pd.DataFrame("–", index=pd.Index(rows, name=f"− {reference}"), columns=cols)
    for d in recs:
        df.loc[d["features"], d["metric"]] = _diff_cell(d)
    return df.rename(columns=_metric_label)


def headline_rows(agg: dict[str, Any], reference: str, n_total: int) -> list[list[str]]:
    """Rows of the headline table: metric, CDCL, reference, difference, CI, n, p, verdict."""
    means = {
        (r["features"], r["metric"]): r for r in agg["summary"] if r["variant"] == PRIMARY_VARIANT
    }
    out = []
    for d in agg["differences"]:
        if (
            d["variant"] != PRIMARY_VARIANT
            or d["features"] != HEADLINE_METHOD
            or d["reference"] != reference
            or not is_primary(d["metric"])
        ):
            continue
        m, r = means.get((HEADLINE_METHOD, d["metric"])), means.get((reference, d["metric"]))
        out.append(
            [
                _metric_label(d["metric"]),
                _mean_ci(m, n_total) if m else "–",
                _mean_ci(r, n_total) if r else "–",
                _num(d["mean_diff"], True),
                _ci(d),
                str(d["n"]),
                _p(d["p"]) + ("†" if d.get("zero_variance") else ""),
                _p(d.get("p_holm")),
                _p(d.get("p_signflip")),
                _num(d.get("min_detectable_diff")),
                d["verdict"],
            ]
        )
    return out


HEADLINE_COLUMNS = [
    "metric",
    HEADLINE_METHOD,
    "reference",
    "difference",
    "95% CI",
    "n",
    "p",
    "p (Holm)",
    "p (sign-flip)",
    "detectable ±",
    "verdict",
]
HEADLINE_NOTE = (
    "n: independent units (folds when seeds share held-out plates, else replicates). "
    "p (Holm): Holm-adjusted across the pre-declared metrics for this reference; the verdict "
    "uses it. 95% CI: (t) over units, (compounds) a bootstrap over compounds, used where "
    "every replicate evaluates the same compounds. detectable ±: the smallest difference the design could detect at this n "
    "(α two-sided, power 0.8; noncentral t from the observed sd of the paired differences). "
    "p (sign-flip): exact sign-flip test over the same units, no normality assumed, not "
    "adjusted and not used by the verdict; it cannot fall below 2/2^n (0.25 at n = 3)."
)


def headline_tests(study: dict[str, Any], reference: str) -> str:
    """The test(s) behind a headline table, e.g. 'paired t on fold means …'."""
    tests = {
        d.get("test", st.PAIRED_TEST)
        for d in study["differences"]
        if d["variant"] == PRIMARY_VARIANT
        and d["features"] == HEADLINE_METHOD
        and d["reference"] == reference
        and is_primary(d["metric"])
    }
    return "; ".join(sorted(tests))


def n_units(study: dict[str, Any]) -> int:
    """The number of independent units of a study (folds when seeds share them, else replicates)."""
    return int(study.get("n_units", len(study["replicates"])))


def _look_suffix(study: dict[str, Any]) -> str:
    looks = study.get("looks", [])
    if len(looks) < 2:
        return ""
    return (
        f" (look {len(looks)} of a study planned with {len(study['design']['replicates'])} "
        "replicates: not corrected for the repeated look, see the notes)"
    )


def second_look_note(study: dict[str, Any]) -> str | None:
    """The note that a study was extended after an earlier look at its results, or None."""
    looks = study.get("looks", [])
    if len(looks) < 2:
        return None
    planned = study["design"]["replicates"]
    earlier = "; ".join(
        f"look {lk['look']}: {len(lk['replicates'])} replicates, overall "
        + (", ".join(f"vs {r} {v}" for r, v in lk.get("overall", {}).items()) or "–")
        for lk in looks[:-1]
    )
    return (
        f"Look {len(looks)}: this study was planned with {len(planned)} replicates "
        f"({', '.join(planned)}) and its results were reported before the replicates changed to "
        f"{len(looks[-1]['replicates'])}. Each look tested at α adds to the chance of a false "
        "'better' or 'worse' (two looks at 0.05 give about 0.08); the verdicts here are not "
        f"corrected for it. Earlier looks: {earlier}."
    )


SIGNFLIP_FLOOR_NOTE = (
    "With n = {n} units the sign-flip p cannot be below 2/2^{n} = {floor:.3g}, above α: "
    "only the t-test, which assumes normally distributed differences, can call a difference "
    "here. Take its verdicts as provisional and add units to have one that needs no such "
    "assumption."
)


def _notes(study: dict[str, Any]) -> list[str]:
    notes = []
    look = second_look_note(study)
    if look:
        notes.append(look)
    design_look = design_look_note((study.get("preregistered") or {}).get("looks") or [])
    if design_look:
        notes.append(design_look)
    rows = {r["features"] for r in study["summary"]}
    if any(("+harmony" in r or "+combat" in r) for r in rows):
        notes.append(TRANSDUCTIVE_NOTE)
    missing = study["references_missing"]
    if missing:
        notes.append(
            f"Reference rows not present in these results, left out: {', '.join(missing)}."
        )
    if any(d.get("zero_variance") for d in study["differences"]):
        notes.append(ZERO_VARIANCE_NOTE)
    if len(study["replicates"]) < 2:
        notes.append("One replicate only: no interval or test can be computed.")
    elif 2 / 2 ** n_units(study) > study["config"]["alpha"]:
        notes.append(SIGNFLIP_FLOOR_NOTE.format(n=n_units(study), floor=2 / 2 ** n_units(study)))
    for metric, reason in sorted((study.get("no_power") or {}).items()):
        if is_primary(metric):
            notes.append(f"{metric}: left out of the verdicts, {reason}.")
    return notes


def design_look_note(looks: list[dict[str, Any]]) -> str | None:
    """A warning when the same pre-registered design has been reported before (any folder)."""
    if len(looks) < 2:
        return None
    last = looks[-1]
    earlier = sorted({lk["out"] for lk in looks[:-1]})
    return (
        f"Look {last['look']} at this design: it was reported before from "
        f"{', '.join(earlier)}. Its alpha holds for the first look only; a verdict that "
        "appears at a later look may be chance from looking again."
    )


def _held_out_line(study: dict[str, Any]) -> str:
    parts = [
        f"{r['name']} ({', '.join(r['held_out'])})"
        for r in study["replicates"]
        if r.get("held_out")
    ]
    return "Held-out batches: " + "; ".join(parts) + "." if parts else ""


def write_markdown(study: dict[str, Any], path: Path) -> Path:
    """study.md: what was run, the headline verdicts, means ± CI and differences per variant."""
    cfg, n_total = study["config"], n_units(study)
    md = [f"# cdcl study: {cfg['dataset']}{' (quick)' if cfg['quick'] else ''}", ""]
    md += _intro_markdown(study)
    if study.get("preregistered"):
        md += [endpoint_markdown(study["preregistered"]["endpoints"], study["design"])]
    md += compound_group_markdown(study)
    for ref in study["references_present"]:
        md += _headline_markdown(study, ref, n_total)
    for variant in [v for v in VARIANTS if any(r["variant"] == v for r in study["summary"])]:
        md += _variant_markdown(study, variant, n_total)
    md += [
        "## Time",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in study["timings_s"].items()),
        "",
    ]
    atomic_write_text(path, "\n".join(md))
    return path


def _intro_markdown(study: dict[str, Any]) -> list[str]:
    """study.md's opening: the replicates and methods, held-out batches, the tests, the notes."""
    cfg = study["config"]
    return [
        f"{len(study['replicates'])} replicates "
        f"({', '.join(r['name'] for r in study['replicates'])}); "
        f"methods {', '.join(cfg['methods'])}; {study['replicate_definition']}",
        "",
        _held_out_line(study),
        "",
        f"Intervals: {st.CI_METHOD} (over units). Test: {study['test']['paired']}, pairing "
        f"replicates by seed and fold; α = {cfg['alpha']}; {st.HOLM}. Verdict per metric: better / worse / no detectable "
        "difference (direction-aware: ↓ marks lower-is-better metrics). "
        f"{st.WILCOXON_TEST} in study.json.",
        "",
        *(f"> {n}\n" for n in study["notes"]),
    ]


def _headline_markdown(study: dict[str, Any], ref: str, n_total: int) -> list[str]:
    """study.md's headline table against ``ref`` and its overall verdict (none without rows)."""
    rows = headline_rows(study, ref, n_total)
    if not rows:
        return []
    h = next((x for x in study["headline"] if x["reference"] == ref), None)
    return [
        f"## {HEADLINE_METHOD} vs {ref} on the pre-declared metrics "
        f"({VARIANT_TITLES[PRIMARY_VARIANT]})",
        "",
        markdown_table(_headline_columns(ref), rows),
        "",
        f"Test: {headline_tests(study, ref)}. {HEADLINE_NOTE}",
        "",
        f"Overall (the rule of the Studies page, docs/studies.md): **{h['overall'] if h else '–'}**"
        f"{_look_suffix(study)}.",
        "",
    ]


def _headline_columns(ref: str) -> list[str]:
    """The headline table's columns, the reference's named after it."""
    return [c if c != "reference" else ref for c in HEADLINE_COLUMNS]


def _variant_markdown(study: dict[str, Any], variant: str, n_total: int) -> list[str]:
    """study.md's means ± CI on one profile variant, then the differences from each reference."""
    title = VARIANT_TITLES.get(variant, variant)
    md = [
        f"## Mean ± 95% CI half-width, {title}",
        "",
        frame_markdown(summary_frame(study["summary"], variant, n_total)),
        "",
    ]
    order = metric_order(study["summary"], variant)
    for ref in study["references_present"]:
        md += [
            f"## Difference from {ref}, {title}",
            "",
            "Cell: mean paired difference (row − reference), ▲ better / ▼ worse / · no "
            "detectable difference, paired t-test p († see the notes above).",
            "",
            frame_markdown(difference_frame(study["differences"], variant, ref, order)),
            "",
        ]
    return md


def compound_group_markdown(study: dict[str, Any]) -> list[str]:
    """CDCL − each reference on every compound, on the seen and on the unseen ones."""
    groups = study.get("by_compounds") or {}
    if not groups:
        return []
    parts = {"all compounds": study, **{f"{g} compounds": agg for g, agg in groups.items()}}
    md: list[str] = []
    for ref in study["references_present"]:
        cells: dict[str, dict[str, str]] = {}
        for part, agg in parts.items():
            for d in agg["differences"]:
                if (d["variant"], d["features"], d["reference"]) == (
                    PRIMARY_VARIANT,
                    HEADLINE_METHOD,
                    ref,
                ):
                    cells.setdefault(d["metric"], {})[part] = _diff_cell(d)
        if not cells:
            continue
        md += [
            f"## {HEADLINE_METHOD} − {ref} on seen and unseen compounds "
            f"({VARIANT_TITLES[PRIMARY_VARIANT]})",
            "",
            "The methods trained on the seen compounds (and the controls) only. Cell: mean "
            "paired difference, verdict symbol (Holm-adjusted within each column's family) and "
            "the unadjusted paired-t p.",
            "",
            markdown_table(
                ["metric", *parts],
                [[m, *(row.get(p, "–") for p in parts)] for m, row in cells.items()],
            ),
            "",
        ]
    return md


def forest_plot(
    diffs: list[dict[str, Any]], variant: str, reference: str, path: Path
) -> Path | None:
    """Difference from the reference per metric with its 95% CI, one panel per feature set."""

    recs = [d for d in diffs if d["variant"] == variant and d["reference"] == reference]
    rows = _headline_first(list(dict.fromkeys(d["features"] for d in recs)))
    metrics = list(dict.fromkeys(d["metric"] for d in recs))
    if not rows:
        return None
    plt = _plt()
    ncols = min(3, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(4.2 * ncols, 0.32 * len(metrics) * nrows + 0.9 * nrows),
        squeeze=False,
        sharey=True,
    )
    colour = {st.BETTER: "tab:green", st.WORSE: "tab:red"}
    y_of = {m: len(metrics) - 1 - i for i, m in enumerate(metrics)}
    for ax, row in zip(axes.flat, rows):
        for d in (d for d in recs if d["features"] == row):
            y, x = y_of[d["metric"]], d["mean_diff"]
            c = colour.get(d["verdict"], "0.35")
            if all(isinstance(v, float) and math.isfinite(v) for v in (d["ci_low"], d["ci_high"])):
                ax.plot([d["ci_low"], d["ci_high"]], [y, y], color=c, lw=1.6)
            ax.plot([x], [y], "o", color=c, ms=4)
        ax.axvline(0.0, color="0.6", lw=0.8, ls="--")
        ax.set_title(f"{row} − {reference}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks(range(len(metrics)))
        ax.set_yticklabels([_metric_label(m) for m in reversed(metrics)], fontsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.suptitle(
        f"{VARIANT_TITLES.get(variant, variant)}: difference from {reference}, 95% CI "
        "(green better, red worse, grey no detectable difference)",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, path)


def write_html_report(study: dict[str, Any], path: Path, pictures: dict[str, Path | None]) -> Path:
    """The self-contained report.html: headline, forest plots, tables, replicates, times."""

    cfg, n_total = study["config"], n_units(study)
    sections: list[tuple[str, str]] = [("Study", _intro_html(study))]
    for ref in study["references_present"]:
        sections += _headline_sections(study, ref, n_total)
    for key, pic in pictures.items():
        sections.append((f"Forest plot: {key}", img_html(pic, key)))
    for variant in [v for v in VARIANTS if any(r["variant"] == v for r in study["summary"])]:
        sections += _variant_sections(study, variant, n_total)
    sections.append(("Replicates", _replicates_html(study)))
    timings = ", ".join(f"{html.escape(k)}: {v:.1f} s" for k, v in study["timings_s"].items())
    sections.append(("Timings", f"<p>{timings}</p>"))
    title = f"cdcl study: {cfg['dataset']}{' (quick)' if cfg['quick'] else ''}"
    return write_html(path, title, sections)


def _intro_html(study: dict[str, Any]) -> str:
    """report.html's opening: the replicates, held-out batches, the tests, the notes."""
    return (
        f"<p>{len(study['replicates'])} replicates "
        f"({html.escape(', '.join(r['name'] for r in study['replicates']))}"
        f"); {html.escape(study['replicate_definition'])}</p>"
        f"<p>{html.escape(_held_out_line(study))}</p><p>Intervals: "
        f"{html.escape(st.CI_METHOD)} (over units). Test: {html.escape(study['test']['paired'])}"
        f"; α = {study['config']['alpha']}; {html.escape(st.HOLM)}."
        "</p>" + "".join(f"<p><b>Note.</b> {html.escape(n)}</p>" for n in study["notes"])
    )


def _headline_sections(study: dict[str, Any], ref: str, n_total: int) -> list[tuple[str, str]]:
    """report.html's headline table against ``ref`` and its overall verdict (none without rows)."""
    rows = headline_rows(study, ref, n_total)
    if not rows:
        return []
    h = next((x for x in study["headline"] if x["reference"] == ref), None)
    table = pd.DataFrame(rows, columns=_headline_columns(ref)).set_index("metric")
    body = (
        frame_html(table)
        + f"<p>Test: {html.escape(headline_tests(study, ref))}. {html.escape(HEADLINE_NOTE)}</p>"
        + f"<p>Overall: <b>{html.escape(h['overall'] if h else '–')}</b>"
        f"{html.escape(_look_suffix(study))}</p>"
    )
    return [(f"{HEADLINE_METHOD} vs {ref}: pre-declared metrics", body)]


def _variant_sections(study: dict[str, Any], variant: str, n_total: int) -> list[tuple[str, str]]:
    """report.html's means ± CI on one profile variant, then the differences from each reference."""
    title = VARIANT_TITLES.get(variant, variant)
    sections = [
        (
            f"Mean ± 95% CI half-width, {title}",
            frame_html(summary_frame(study["summary"], variant, n_total)),
        )
    ]
    order = metric_order(study["summary"], variant)
    for ref in study["references_present"]:
        diffs = difference_frame(study["differences"], variant, ref, order)
        sections.append((f"Difference from {ref}, {title}", frame_html(diffs)))
    return sections


def _replicates_html(study: dict[str, Any]) -> str:
    """A link to each replicate's own report, marking the reused ones."""
    items = "".join(
        f'<li><a href="replicates/{html.escape(r["name"])}/report.html">'
        f"{html.escape(r['name'])}</a>{' (reused)' if r.get('reused') else ''}</li>"
        for r in study["replicates"]
    )
    return f"<ul>{items}</ul>"


# ---------------------------------------------------------------- the study


def _replicate_definition(spec: StudySpec) -> str:
    what = (
        "a replicate is a screen seed and training seed together (the simulated screen is "
        "regenerated per seed)"
        if spec.dataset == "synthetic"
        else "a replicate is a training seed"
    )
    if spec.dataset == CUSTOM:
        what += f" on the screen in {spec.data}"
    folds = (
        f" and a held-out-batch fold ({', '.join(map(str, spec.folds))})"
        if spec.folds
        else ", on the dataset's stored held-out batches"
    )
    unit = (
        "; seeds evaluated on the same fold share its held-out plates, so the fold is the unit "
        "of replication: figures are averaged within a fold and tested on fold means (n = folds)"
        if spec.folds and len(spec.seeds) > 1
        else ""
    )
    return what + folds + unit + "."


DESIGN_FILE = "design.json"
# The keys a pre-registered design.json holds besides its replicates (preregistration()).
PREREGISTERED_KEYS = (
    "dataset",
    "methods",
    "references",
    "seeds",
    "folds",
    "strengths",
    "screen",
    "train_treatments",
    "budget",
    "alpha",
    "rule",
    "test",
    "endpoints",
    "primary",
    "family",
    "quick",
    "cellprofiler",
    "note",
    "data",
    "level",
)


def fix_design(out: Path, names: list[str], plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The study's design: read from ``OUT/design.json``, written there if absent.

    The design is fixed the first time a study runs in ``out``, before any training: the
    planned replicates and, with ``plan`` (:func:`cdcl.experiments.preregistration.
    preregistration`), the methods, references, endpoints, alpha, rule and Holm family, with
    their hash. A study.json of an older version without a design counts as the plan it
    reported. Later runs with other replicates are extensions of the design, not a new one.
    """
    path = out / DESIGN_FILE
    if path.is_file():
        return read_design(path)
    old = _previous_study(out)
    planned = (
        old["design"]["replicates"]
        if old and "design" in old
        else [r["name"] for r in old["replicates"]]
        if old
        else names
    )
    design: dict[str, Any] = {"replicates": list(planned), "n": len(planned)}
    if plan is not None and old is None:
        design = {**plan, **design}
        design["hash"] = design_hash(design)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(design, indent=2) + "\n")
    return design


def study_plan(spec: StudySpec, strengths: tuple[float, ...] | None = None) -> dict[str, Any]:
    """What the study pre-registers (cdcl.experiments.preregistration) for ``spec``."""
    labels = check_spec(spec)
    if strengths is None and spec.dataset == "synthetic":
        strengths = (spec.batch_strength,) if spec.batch_strength is not None else None
    screen = {k: v for k, v in screen_overrides(spec).items() if k != "batch_strength"}
    return preregistration(
        dataset=spec.dataset,
        methods=labels,
        references=spec.references,
        seeds=spec.seeds,
        folds=spec.folds,
        strengths=strengths,
        screen=screen,
        train_treatments=spec.train_treatments,
        budget=budget_overrides(_demo_spec(spec, Replicate(spec.seeds[0], None))),
        alpha=spec.alpha,
        note=spec.note,
        primary_metric=spec.primary_metric,
        extra={
            "quick": spec.quick,
            "cellprofiler": spec.cellprofiler,
            **({"data": _data_fingerprint(spec.data)} if spec.data is not None else {}),
            **({"level": spec.level} if spec.level else {}),
        },
    )


def announce_design(design: dict[str, Any], path: Path) -> None:
    """Print the design's hash and primary endpoint before anything is trained."""
    if "hash" not in design:
        return
    primary = next((e for e in design["endpoints"] if e["role"] == "primary"), None)
    print(f"design {design['hash'][:16]} ({path}), fixed before training", flush=True)
    if primary is not None:
        print(f"  primary endpoint: {primary['label']}", flush=True)
    print(f"  secondary endpoints (Holm): {len(design['family'])}", flush=True)


_REPLICATES = sc.ListOf(sc.Name(), min_len=1, unique=True)
# The plan of a study (design.json, and study.json's `design`); a newer format is refused.
DESIGN_SCHEMA = sc.Obj(
    required={"replicates": _REPLICATES, "n": sc.Int(min=1)},
    optional={
        "format_version": sc.Version(known=(1, DESIGN_VERSION)),
        "hash": sc.Str(nonempty=True),
        **{k: sc.Any() for k in PREREGISTERED_KEYS},
    },
)
# What a study reads back from an earlier study.json: its plan, replicates and looks.
STUDY_SCHEMA = sc.Obj(
    required={"replicates": sc.ListOf(sc.Obj(required={"name": sc.Name()}), min_len=1)},
    optional={
        "format_version": sc.Version(known=(1,)),
        "kind": sc.Str(choices=("study",)),
        "design": DESIGN_SCHEMA,
        "looks": sc.Nullable(
            sc.ListOf(
                sc.Obj(
                    required={
                        "look": sc.Int(min=1),
                        "replicates": _REPLICATES,
                        "overall": sc.MapOf(sc.Any()),
                    }
                )
            )
        ),
        "headline": sc.ListOf(
            sc.Obj(required={"reference": sc.Str(nonempty=True), "overall": sc.Any()})
        ),
    },
)


def _check_design(design: dict[str, Any], where: str, prefix: str, hint: str) -> None:
    """Refuse a plan whose count ``n`` is not its number of replicates."""
    n, names = design["n"], design["replicates"]
    if n != len(names):
        raise sc.SchemaError(
            f"{prefix}n",
            f"is {n} for {len(names)} replicates",
            "the number of replicates",
        ).located(where, hint)


def read_design(path: Path) -> dict[str, Any]:
    """``OUT/design.json``, checked: distinct, safe replicate names and their count."""
    hint = "restore it, or remove it to fix the present replicates as the plan"
    design = sc.read_json(path, DESIGN_SCHEMA, hint)
    _check_design(design, str(path), "", hint)
    if "hash" in design and design_hash(design) != design["hash"]:
        raise CdclError(
            f"{path}: changed after the design was fixed (its content no longer matches its "
            "hash); restore it, or start the study in a new --out"
        )
    return design


def _previous_study(out: Path) -> dict[str, Any] | None:
    """The earlier study.json of ``out`` (its plan and looks), checked; None when absent."""
    path = out / "study.json"
    if not path.is_file():
        return None
    hint = "restore it, or remove it (the looks it recorded are then forgotten)"
    study = sc.read_json(path, STUDY_SCHEMA, hint)
    if "design" in study:
        _check_design(study["design"], str(path), "design.", hint)
    return study


def study_looks(
    out: Path, names: list[str], headline_: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every look at the study's results so far: earlier ones from study.json, then this one.

    Running the same replicates again is the same look; a different set of replicates after a
    reported study (more seeds into the same --out) is a new look.
    """
    old = _previous_study(out)
    looks: list[dict[str, Any]] = []
    if old is not None:
        looks = old.get("looks") or [
            {
                "look": 1,
                "replicates": [r["name"] for r in old["replicates"]],
                "overall": {h["reference"]: h["overall"] for h in old.get("headline", [])},
            }
        ]
    overall = {h["reference"]: h["overall"] for h in headline_}
    if looks and looks[-1]["replicates"] == names:
        looks[-1] = {**looks[-1], "overall": overall}
    else:
        looks.append({"look": len(looks) + 1, "replicates": names, "overall": overall})
    return looks


def run_study(spec: StudySpec) -> dict[str, Any]:
    """Run (or reuse) every replicate, aggregate, write study.json, study.md and report.html."""
    labels = check_spec(spec)
    if spec.fresh:
        for sub in ("replicates", "data"):
            shutil.rmtree(spec.out / sub, ignore_errors=True)
    spec.out.mkdir(parents=True, exist_ok=True)
    reps = replicates(spec)
    # The design is fixed before any replicate runs.
    design = fix_design(
        spec.out, [r.name for r in reps], None if spec.in_curve else study_plan(spec)
    )
    announce_design(design, spec.out / DESIGN_FILE)
    for i, rep in enumerate(reps, 1):
        with Stage(spec, f"train replicate {rep.name} ({i}/{len(reps)})", marker="==="):
            train_replicate(spec, rep)
    records: list[dict[str, Any]] = []
    figures: list[dict[str, dict[str, dict[str, Any]]]] = []
    outcomes: list[dict[str, Any]] = []
    all_results: list[dict[str, Any]] = []
    for i, rep in enumerate(reps, 1):
        with Stage(spec, f"replicate {rep.name} ({i}/{len(reps)})", marker="==="):
            results, reused = run_replicate(spec, rep)
            if reused:
                print(f"    reused replicates/{rep.name}/results.json", flush=True)
        all_results.append(results)
        figures.append(replicate_figures(results))
        outcomes.append(replicate_outcomes(results))
        records.append(
            {
                "name": rep.name,
                "seed": rep.seed,
                "fold": rep.fold,
                "dir": f"replicates/{rep.name}",
                "held_out": held_out_batches(spec, rep),
                "reused": reused,
                "timings_s": results.get("timings_s", {}),
                "training": {
                    m: {k: t.get(k) for k in ("epoch", "step", "images_per_s", "wall_s")}
                    for m, t in results.get("training", {}).items()
                },
                "tables": results.get("tables", {}),
                **(
                    {"tables_by_compounds": results["tables_by_compounds"]}
                    if results.get("tables_by_compounds")
                    else {}
                ),
            }
        )
    return finish_study(
        spec, labels, records, figures, outcomes, metrics_without_power(all_results)
    )


def finish_study(
    spec: StudySpec,
    labels: list[str],
    records: list[dict[str, Any]],
    figures: list[dict[str, dict[str, dict[str, Any]]]],
    outcomes: list[dict[str, Any]] | None = None,
    no_power: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Aggregate the replicates' figures and write study.json, study.md and report.html."""
    reps = [Replicate(r["seed"], r["fold"]) for r in records]
    names = [r.name for r in reps]
    spec.out.mkdir(parents=True, exist_ok=True)
    design = fix_design(spec.out, names)
    # Seeds evaluated on the same held-out fold share its plates: the fold is the unit.
    units: list[Any] | None = [r.fold for r in reps] if spec.folds else None
    with Stage(spec, "aggregate", marker="==="):
        agg = aggregate_study(
            figures,
            spec.references,
            spec.alpha,
            units=units,
            outcomes=outcomes,
            # the simulated screen draws its compounds anew per seed; BBBC021's are fixed
            fixed_compounds=spec.dataset != "synthetic",
            no_power=no_power,
        )
    looks = study_looks(spec.out, names, agg["headline"])
    first = _demo_spec(spec, reps[0])
    shared = st.shares_units(units)
    study: dict[str, Any] = {
        "kind": "study",
        "config": _study_config(spec, labels, first),
        "replicate_definition": _replicate_definition(spec),
        "design": design,
        "looks": looks,
        "n_units": len(set(units)) if shared else len(reps),
        "unit": "fold" if shared else "replicate",
        "test": _study_tests(spec, agg, shared),
        "replicates": records,
        **agg,
        "timings_s": spec.timings,
        "versions": versions(),
    }
    by_compounds = _aggregate_by_compounds(spec, records, units)
    if by_compounds:
        study["by_compounds"] = by_compounds
    if "endpoints" in design:
        strength = spec.batch_strength if spec.dataset == "synthetic" else None
        study["preregistered"] = analyse_design(
            design, spec.out, {strength: records}, units if shared else None
        )
    study["notes"] = _notes(study)
    with Stage(spec, "report", marker="==="):
        _write_reports(spec, study, agg)
    # Record the report stage's own time once it has ended.
    study["timings_s"] = dict(spec.timings)
    _write_json(study, spec.out / "study.json")
    return {"study": study, "paths": _study_paths(spec.out)}


def _study_paths(out: Path) -> dict[str, Path]:
    """Where a study's outputs are: study.json, study.md and report.html in ``out``."""
    return {"json": out / "study.json", "md": out / "study.md", "html": out / "report.html"}


def _study_config(spec: StudySpec, labels: list[str], first: DemoSpec) -> dict[str, Any]:
    """study.json's ``config``: the options every replicate ran with (``first``'s budget)."""
    return {
        "dataset": spec.dataset,
        **({"data": str(spec.data)} if spec.data is not None else {}),
        **({"level": spec.level} if spec.level else {}),
        "quick": spec.quick,
        "methods": labels,
        "seeds": list(spec.seeds),
        "folds": list(spec.folds) if spec.folds else None,
        "references": list(spec.references),
        "epochs": spec.epochs,
        "screen": screen_overrides(spec),
        "cellprofiler": spec.cellprofiler,
        "calibrate": spec.calibrate,
        "train_treatments": spec.train_treatments,
        "budget": budget_overrides(first),
        "alpha": spec.alpha,
    }


def _study_tests(spec: StudySpec, agg: dict[str, Any], shared_units: bool) -> dict[str, Any]:
    """study.json's ``test``: every method behind the intervals, tests and verdicts."""
    return {
        "paired": st.UNIT_TEST if shared_units else st.PAIRED_TEST,
        "multiplicity": st.HOLM,
        "power": st.MDD_METHOD,
        "compound_interval": st.BOOTSTRAP_METHOD.format(n_boot=2000),
        "ci": st.CI_METHOD,
        "wilcoxon": st.WILCOXON_TEST,
        "signflip": st.SIGNFLIP_TEST,
        "alpha": spec.alpha,
        "difference": "row − reference, per replicate, complete pairs only",
        "lower_is_better": sorted(LOWER_IS_BETTER),
        "primary_variant": PRIMARY_VARIANT,
        "primary_metrics": sorted(
            {d["metric"] for d in agg["differences"] if is_primary(d["metric"])}
        ),
    }


def _aggregate_by_compounds(
    spec: StudySpec, records: list[dict[str, Any]], units: list[Any] | None
) -> dict[str, Any]:
    """The study aggregated on each compound group (seen, unseen) the replicates scored."""
    groups = sorted({g for r in records for g in r.get("tables_by_compounds") or {}})
    return {
        g: aggregate_study(
            [
                replicate_figures({"tables": get_path(r, ("tables_by_compounds", g)) or {}})
                for r in records
            ],
            spec.references,
            spec.alpha,
            units=units,
            fixed_compounds=spec.dataset != "synthetic",
        )
        for g in groups
    }


def _write_reports(spec: StudySpec, study: dict[str, Any], agg: dict[str, Any]) -> None:
    """The forest plots against the first reference, study.json, study.md and report.html."""
    pictures: dict[str, Path | None] = {}
    ref = agg["references_present"][0] if agg["references_present"] else None
    if ref is not None:
        for variant in VARIANTS:
            pictures[f"{VARIANT_TITLES[variant]} vs {ref}"] = forest_plot(
                agg["differences"], variant, ref, spec.out / f"forest_{variant}.png"
            )
    _write_json(study, spec.out / "study.json")
    write_markdown(study, spec.out / "study.md")
    write_html_report(study, spec.out / "report.html", pictures)


def analyse_design(
    design: dict[str, Any],
    out: Path,
    records: dict[float | None, list[dict[str, Any]]],
    units: list[Any] | None = None,
) -> dict[str, Any]:
    """Test the design's endpoints on the replicates' tables and record this look at it.

    Returns ``{"design": hash, "endpoints": [...], "looks": [...]}``; the looks come from the
    ledger kept across output folders, so reporting the same design again elsewhere is seen.
    """
    # every replicate reported, in the order of the records (which ``units`` follows)
    reported = list(dict.fromkeys(r["name"] for recs in records.values() for r in recs))
    rows = test_endpoints(design, table_lookup(records, reported), units)
    outcome = {r["id"]: r["verdict"] for r in rows}
    looks = record_look(design["hash"], out, reported, outcome)
    return {"design": design["hash"], "endpoints": rows, "looks": looks}


def _write_json(study: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(study), indent=2, allow_nan=False) + "\n")


def headline_text(study: dict[str, Any]) -> str:
    """The headline tables as plain text for the terminal."""
    n_total = n_units(study)
    parts = []
    for ref in study["references_present"]:
        rows = headline_rows(study, ref, n_total)
        if not rows:
            continue
        h = next((x for x in study["headline"] if x["reference"] == ref), None)
        df = pd.DataFrame(rows, columns=_headline_columns(ref)).set_index("metric")
        parts.append(
            f"{HEADLINE_METHOD} vs {ref} ({VARIANT_TITLES[PRIMARY_VARIANT]}):\n"
            f"{df.to_string()}\ntest: {headline_tests(study, ref)}\n"
            f"overall: {h['overall'] if h else '–'}{_look_suffix(study)}"
        )
    return "\n\n".join(parts) if parts else "(no headline: CDCL or the reference is missing)"
