"""The checks of an evaluation: its options before any work, its results before any write."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from cdcl.errors import CdclError
from cdcl.profiles.variants import VARIANTS

LEVELS = ("well", "image")
EVAL_ON = ("all", "test")


def parse_variants(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The profile variants to score (``"raw,plate_normalized"`` or a sequence), checked."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(str(v).strip() for v in parts if str(v).strip()))
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        text = value if isinstance(value, str) else ",".join(map(str, value))
        raise CdclError(f"--variants {text}: use a comma-separated list of {', '.join(VARIANTS)}")
    return names


def check_options(
    *, level: str, eval_on: str | None, plot_sample: int | None, table: bool, cellprofiler: bool
) -> None:
    """Refuse option values no evaluation accepts, before anything is loaded."""
    if level not in LEVELS:
        raise CdclError(f"--level {level}: use well or image")
    if eval_on is not None and eval_on not in EVAL_ON:
        raise CdclError(f"--eval-on {eval_on}: use all or test")
    if plot_sample is not None and plot_sample < 0:
        raise CdclError(f"--plot-sample {plot_sample}: give a row count >= 0 (0 = every row)")
    if table and cellprofiler:
        raise CdclError(
            "--cellprofiler measures a run's images; for a table, make one with "
            "`cdcl embed --features cellprofiler` and score it with --features"
        )


def check_out(out: str | Path | None, table: str | Path | None = None) -> None:
    """Refuse an output directory that is an existing file (the input table, say) at once."""
    if out is None or not Path(out).exists() or Path(out).is_dir():
        return
    same = table is not None and Path(table).exists() and Path(out).samefile(table)
    what = "is the input table" if same else "is a file"
    raise CdclError(f"--out {out}: {what}; give a directory for results.json and the report")


def why_missing(results: dict[str, Any]) -> list[str]:
    """The distinct one-line reasons of metrics not computed or failed, in first-seen order."""
    lines: dict[str, None] = {}
    for res in (results.get("feature_sets") or {}).values():
        for text in (res.get("unavailable") or {}).values():
            lines[str(text)] = None
        for name, text in (res.get("errors") or {}).items():
            metric = name.split(".", 1)[-1]
            lines[f"{metric}: failed ({text})"] = None
    return list(lines)


def any_figure(results: dict[str, Any]) -> bool:
    """True when at least one headline metric of any feature set is a number."""
    from cdcl.report.html import metrics_long

    long = metrics_long(results)
    # The batch classifier's chance level depends on the labels only: not a figure of the features.
    long = long[long["metric"] != "batch classifier chance"]
    return any(isinstance(v, int | float) and math.isfinite(v) for v in long["value"])


def refuse_empty(results: dict[str, Any], *, table: bool, level: str) -> None:
    """Raise (after printing why on stderr) when no metric of any feature set is a number.

    Called before anything is written, so an earlier results.json in the output stays intact.
    """
    if any_figure(results):
        return
    lines = why_missing(results)
    for line in lines:
        print(f"cdcl evaluate: note: {line}", file=sys.stderr)
    first = lines[0] if lines else "every metric came out empty"
    hint = "" if table or level == "image" else "; or --level image"
    raise CdclError(
        f"no metric could be computed on the held-out profiles ({first}); evaluate a fold "
        f"whose held-out batches carry treatments the training batches have (--split N){hint}"
        "; nothing was written"
    )
