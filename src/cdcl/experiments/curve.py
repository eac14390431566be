"""The batch-strength curve: one study per strength of the simulated batch effect.

``cdcl study --batch-strength 0,0.5,1,2`` runs a full study (``OUT/bs<strength>/``, with its own
study.json, study.md and report.html) at each strength, then writes ``curve.json``, ``curve.md``
and ``curve.png`` in ``OUT``: for each strength, the difference CDCL − reference on every
pre-declared metric, with its 95% CI, n, Holm-adjusted p and verdict, for the references
DINO, DINO+harmony and CellProfiler+harmony (those present). It answers: at what strength of
batch effect does CDCL pay off, and against which alternative?
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from cdcl.data.dataset_dir import atomic_write_text
from cdcl.errors import CdclError
from cdcl.experiments.demo import Stage
from cdcl.experiments.preregistration import endpoint_markdown
from cdcl.experiments.study import (
    DESIGN_FILE,
    HEADLINE_METHOD,
    PRIMARY_VARIANT,
    StudySpec,
    analyse_design,
    announce_design,
    check_spec,
    design_look_note,
    fix_design,
    is_primary,
    replicates,
    run_study,
    study_plan,
    train_replicate,
)
from cdcl.report.html import _plt, _save
from cdcl.report.markdown import markdown_table
from cdcl.report.results import to_jsonable

CURVE_REFERENCES = ("DINO", "DINO+harmony", "CellProfiler+harmony")


def parse_strengths(text: str | None) -> tuple[float, ...] | None:
    """``"0,0.5,1,2"`` -> (0.0, 0.5, 1.0, 2.0); None/empty -> None; CdclError otherwise."""
    if text is None or not str(text).strip():
        return None
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise CdclError(f"--batch-strength {text}: expected numbers, e.g. 1 or 0,0.5,1,2") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise CdclError(f"--batch-strength {text}: strengths are finite and >= 0")
    if len(set(values)) != len(values):
        raise CdclError(f"--batch-strength {text}: a strength is repeated")
    return values


def strength_dir(out: Path, strength: float) -> Path:
    """Where the study at one strength lives, e.g. ``OUT/bs0.5``."""
    return Path(out) / f"bs{strength:g}"


def sub_spec(spec: StudySpec, strength: float) -> StudySpec:
    """The study at one strength: the same options in its own folder."""
    return replace(
        spec,
        out=strength_dir(spec.out, strength),
        batch_strength=strength,
        in_curve=True,
        timings={},
    )


def check_curve(spec: StudySpec, strengths: tuple[float, ...]) -> None:
    """Validate every strength's study before anything runs."""
    if spec.dataset != "synthetic":
        raise CdclError("--batch-strength: only for the simulated screen (--dataset synthetic)")
    for s in strengths:
        check_spec(sub_spec(spec, s))


def curve_rows(studies: dict[float, dict[str, Any]]) -> list[dict[str, Any]]:
    """CDCL − reference per strength, reference and pre-declared metric (primary variant)."""
    rows = []
    for strength, study in sorted(studies.items()):
        for d in study["differences"]:
            if (
                d["variant"] != PRIMARY_VARIANT
                or d["features"] != HEADLINE_METHOD
                or d["reference"] not in CURVE_REFERENCES
                or not is_primary(d["metric"])
            ):
                continue
            rows.append(
                {
                    "batch_strength": strength,
                    "reference": d["reference"],
                    "metric": d["metric"],
                    "lower_is_better": bool(d.get("lower_is_better")),
                    **{
                        k: d.get(k)
                        for k in ("mean_diff", "ci_low", "ci_high", "n", "p", "p_holm", "verdict")
                    },
                }
            )
    return rows


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:+.3f}" if signed else (f"{v:.2g}" if v < 0.01 else f"{v:.3f}")


def curve_markdown(rows: list[dict[str, Any]], studies: dict[float, dict[str, Any]]) -> str:
    """One table per reference: metric × strength, difference [95% CI] (verdict)."""
    lines = [
        "# Batch-strength curve",
        "",
        f"{HEADLINE_METHOD} − reference on the pre-declared metrics (profiles standardised per "
        "plate against controls), per strength of the simulated batch effect (0 none, 1 "
        "calibrated). Each cell: mean difference [95% CI], Holm-adjusted p, verdict; n = "
        "independent replicates at that strength. Each strength's full tables are in "
        "`bs<strength>/study.md`.",
        "",
    ]
    df = pd.DataFrame(rows)
    if df.empty:
        return "\n".join([*lines, "(no CDCL − reference differences: is CDCL among the methods?)"])
    strengths = sorted(studies)
    header = ["metric", *(f"strength {s:g}" for s in strengths)]
    for ref in [r for r in CURVE_REFERENCES if r in set(df["reference"])]:
        sub = df[df["reference"] == ref]
        metric_rows = [
            [f"{metric}", *(_strength_cell(sub, metric, s) for s in strengths)]
            for metric in dict.fromkeys(sub["metric"])
        ]
        lines += [f"## {HEADLINE_METHOD} − {ref}", "", markdown_table(header, metric_rows), ""]
    lines.append("Overall verdict per strength (the study's rule, Holm-adjusted):")
    lines.append("")
    for s in strengths:
        verdicts = ", ".join(
            f"vs {h['reference']}: **{h['overall']}**" for h in studies[s].get("headline", [])
        )
        lines.append(f"- strength {s:g}: {verdicts or '–'}")
    return "\n".join(lines) + "\n"


def _strength_cell(sub: pd.DataFrame, metric: str, strength: float) -> str:
    """One cell of curve.md: difference [95% CI], Holm p, verdict and n at one strength."""
    hit = sub[(sub["metric"] == metric) & (sub["batch_strength"] == strength)]
    if hit.empty:
        return "–"
    r = hit.iloc[0]
    return (
        f"{_fmt(r['mean_diff'], True)} [{_fmt(r['ci_low'], True)}, "
        f"{_fmt(r['ci_high'], True)}] p {_fmt(r['p_holm'])} {r['verdict']} "
        f"(n {int(r['n']) if r['n'] == r['n'] else 0})"
    )


def curve_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per metric: CDCL − reference with 95% CI against batch strength."""
    df = pd.DataFrame(rows)
    if df.empty:
        return None
    plt = _plt()
    metrics = list(dict.fromkeys(df["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), squeeze=False)
    refs = [r for r in CURVE_REFERENCES if r in set(df["reference"])]
    for ax, metric in zip(axes[0], metrics):
        for j, ref in enumerate(refs):
            sub = df[(df["metric"] == metric) & (df["reference"] == ref)].sort_values(
                "batch_strength"
            )
            x = sub["batch_strength"].to_numpy(dtype=float) + (j - (len(refs) - 1) / 2) * 0.04
            y = sub["mean_diff"].to_numpy(dtype=float)
            lo = y - sub["ci_low"].to_numpy(dtype=float)
            hi = sub["ci_high"].to_numpy(dtype=float) - y
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=f"− {ref}")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("batch strength")
    axes[0][0].set_ylabel(f"{HEADLINE_METHOD} − reference (95% CI)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def run_curve(spec: StudySpec, strengths: tuple[float, ...]) -> dict[str, Any]:
    """Run (or reuse) the study at every strength, then write curve.json, curve.md, curve.png."""
    check_curve(spec, strengths)
    reps = replicates(spec)
    design = fix_design(Path(spec.out), [r.name for r in reps], study_plan(spec, strengths))
    announce_design(design, Path(spec.out) / DESIGN_FILE)
    # Every replicate's training first, seed by seed across strengths: an interrupted curve
    # leaves whole seeds trained, and the scoring below runs on the same code for all.
    for rep in reps:
        for s in strengths:
            with Stage(spec, f"train {rep.name} at strength {s:g}", marker="==="):
                train_replicate(sub_spec(spec, s), rep)
    studies: dict[float, dict[str, Any]] = {}
    for s in strengths:
        print(f"==== batch strength {s:g}", flush=True)
        sub = sub_spec(spec, s)
        studies[s] = run_study(sub)["study"]
        spec.timings[f"strength {s:g}"] = round(sum(sub.timings.values()), 1)
    rows = curve_rows(studies)
    pre = None
    if "endpoints" in design:
        pre = analyse_design(
            design, Path(spec.out), {s: studies[s]["replicates"] for s in strengths}
        )
    curve = {
        "kind": "batch_strength_curve",
        "method": HEADLINE_METHOD,
        "references": [r for r in CURVE_REFERENCES if any(x["reference"] == r for x in rows)],
        "variant": PRIMARY_VARIANT,
        "strengths": list(strengths),
        "studies": {f"{s:g}": str(strength_dir(spec.out, s).name) for s in strengths},
        "n_units": {f"{s:g}": studies[s].get("n_units") for s in strengths},
        "headline": {f"{s:g}": studies[s].get("headline", []) for s in strengths},
        "rows": rows,
        **({"design": design, "preregistered": pre} if pre else {}),
        "timings_s": spec.timings,
    }
    out = Path(spec.out)
    atomic_write_text(
        out / "curve.json", json.dumps(to_jsonable(curve), indent=2, allow_nan=False) + "\n"
    )
    md = curve_markdown(rows, studies)
    if pre:
        note = design_look_note(pre["looks"])
        md = (
            endpoint_markdown(pre["endpoints"], design)
            + (f"\n> {note}\n" if note else "")
            + "\n"
            + md
        )
    atomic_write_text(out / "curve.md", md)
    figure = curve_figure(rows, out / "curve.png")
    return {
        "curve": curve,
        "studies": studies,
        "paths": {"json": out / "curve.json", "md": out / "curve.md", "png": figure},
    }
