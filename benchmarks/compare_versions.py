"""Did a code change move the demo's figures? Paired differences of two sets of replicates.

Each side is a list of directories holding a demo's ``results.json`` (``cdcl demo --seed N``
or a study's ``replicates/<name>``), given in the same replicate order (e.g. seeds 0, 1, 2 on
both sides). For every row present on both sides (DINO, CDCL, ...) and every metric column
the two versions share, prints after − before with its 95% t confidence interval and the
paired t-test's p-value (``cdcl.experiments.statistics.paired_difference``, as ``cdcl study``).

Used for the move of the views to whole batches (issue 10):

    python benchmarks/compare_versions.py --rows DINO,CDCL \\
        --before old/seed0 old/seed1 old/seed2 \\
        --after study/replicates/seed0 study/replicates/seed1 study/replicates/seed2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cdcl.experiments import statistics as st
from cdcl.experiments.study import LOWER_IS_BETTER, replicate_figures

VARIANT = "plate_normalized"


def load(dirs: list[Path], variant: str) -> list[dict[str, dict[str, object]]]:
    """``[{row: {metric: value}}]`` of one variant, one entry per replicate directory."""
    out = []
    for d in dirs:
        path = d / "results.json"
        if not path.is_file():
            sys.exit(f"{path}: not found (expected a demo's or a study replicate's results.json)")
        out.append(replicate_figures(json.loads(path.read_text())).get(variant, {}))
    return out


def _ci_verdict(d: dict[str, object]) -> str:
    """Whether the 95% CI of the difference holds 0 (identical figures count as holding it)."""
    if d["mean_diff"] == 0 and (d["n"] < 2 or d["sd_diff"] == 0):
        return "identical"
    if d["n"] < 2:
        return "n < 2"
    return "CI holds 0" if d["ci_low"] <= 0 <= d["ci_high"] else "CI excludes 0"


def compare(
    before: list[dict[str, dict[str, object]]],
    after: list[dict[str, dict[str, object]]],
    rows: list[str],
) -> list[list[str]]:
    """One line per (row, shared metric): before, after, difference, CI, p, verdict."""
    lines = []
    for row in rows:
        b_rows = [rep.get(row, {}) for rep in before]
        a_rows = [rep.get(row, {}) for rep in after]
        metrics = [m for m in a_rows[0] if all(m in r for r in b_rows + a_rows)]
        for m in metrics:
            b = [r[m] for r in b_rows]
            a = [r[m] for r in a_rows]
            d = st.paired_difference(a, b, lower_is_better=m in LOWER_IS_BETTER)
            sb, sa = st.summarise(b), st.summarise(a)
            lines.append(
                [
                    row,
                    m,
                    f"{sb['mean']:.3f} ± {sb['sd']:.3f}",
                    f"{sa['mean']:.3f} ± {sa['sd']:.3f}",
                    f"{d['mean_diff']:+.3f}",
                    f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
                    f"{d['p']:.2g}",
                    _ci_verdict(d),
                ]
            )
    return lines


def main() -> None:
    """Parse the arguments and print the comparison as a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, nargs="+", required=True)
    ap.add_argument("--after", type=Path, nargs="+", required=True)
    ap.add_argument("--rows", default="DINO,CDCL", help="comma-separated rows (features)")
    ap.add_argument("--variant", default=VARIANT, choices=("raw", "plate_normalized"))
    args = ap.parse_args()
    if len(args.before) != len(args.after):
        sys.exit(f"--before has {len(args.before)} replicates, --after {len(args.after)}")
    lines = compare(
        load(args.before, args.variant), load(args.after, args.variant), args.rows.split(",")
    )
    head = ["row", "metric", "before", "after", "after − before", "95% CI", "p (paired t)", ""]
    print(f"{len(args.before)} paired replicates, {args.variant} profiles")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for line in lines:
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
