"""Reproducer for the SIGABRT at interpreter exit after a Parquet read (and a loop that counts it).

``once`` runs one scenario whose *last statement* reads Parquet, so the read's Arrow threads
are still winding down while the interpreter finalises:

- ``cdcl``: commit a tiny dataset with ``DatasetWriter`` (its ``commit`` ends in ``validate``,
  the last read of every ``cdcl build``), then read samples.parquet through ``cdcl.parquet``;
- ``pandas``: ``DataFrame.to_parquet`` then ``pandas.read_parquet``, the pattern cdcl used to
  have (pandas hands pyarrow a Python file object); it aborts in about 2 % of runs.

``loop`` starts ``once`` in fresh interpreters and counts the runs that did not exit 0:

    python benchmarks/exit_abort.py loop --runs 300 --mode cdcl
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path


def once_cdcl(work: Path) -> None:
    """Commit a 12-image dataset and read its table back as the interpreter's last work."""
    import numpy as np
    import pandas as pd

    from cdcl.data.dataset_dir import DatasetInfo, DatasetWriter
    from cdcl.parquet import read_parquet

    n = 12
    samples = pd.DataFrame(
        {
            "image": np.arange(n),
            "batch": [f"b{i % 2}" for i in range(n)],
            "plate": [f"p{i % 2}" for i in range(n)],
            "well": [f"A{i:02d}" for i in range(n)],
            "site": np.zeros(n, dtype=np.int64),
            "treatment": ["DMSO" if i % 3 == 0 else f"t{i % 3}" for i in range(n)],
            "is_control": [i % 3 == 0 for i in range(n)],
        }
    )
    info = DatasetInfo(
        name="exit",
        source="test",
        channels=["a", "b"],
        dtype="uint8",
        image_size=[8, 8],
        n_images=n,
    )
    out = work / "ds"
    writer = DatasetWriter(out, info)
    writer.write(np.arange(n), np.full((n, 2, 8, 8), 7, dtype=np.uint8))
    writer.commit(samples)
    read_parquet(out / "samples.parquet")


def once_pandas(work: Path) -> None:
    """The old pattern: pandas writes, then pandas reads as the last statement."""
    import numpy as np
    import pandas as pd

    df = pd.DataFrame({"a": np.arange(2000), "b": np.arange(2000) * 0.5, "c": ["x"] * 2000})
    df.to_parquet(work / "t.parquet", index=False)
    pd.read_parquet(work / "t.parquet")


def loop(runs: int, mode: str) -> Counter[int]:
    """Run ``once`` in ``runs`` fresh interpreters; a Counter of their exit statuses."""
    codes: Counter[int] = Counter()
    for i in range(runs):
        work = Path(tempfile.mkdtemp(prefix="cdcl-exit-"))
        try:
            cmd = [sys.executable, __file__, "once", "--mode", mode, "--dir", str(work)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            codes[proc.returncode] += 1
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or [""])[-1]
                print(f"run {i}: exit {proc.returncode}: {tail}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return codes


def main() -> int:
    """Command line: ``once`` (one scenario) or ``loop`` (count failures over many runs)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("once", "loop"))
    p.add_argument("--mode", choices=("cdcl", "pandas"), default="cdcl")
    p.add_argument("--dir", type=Path, help="work directory of `once`")
    p.add_argument("--runs", type=int, default=300)
    a = p.parse_args()
    if a.action == "once":
        (once_cdcl if a.mode == "cdcl" else once_pandas)(a.dir)
        return 0
    codes = loop(a.runs, a.mode)
    failed = a.runs - codes[0]
    print(f"mode {a.mode}: {a.runs} runs, {failed} not exit 0, statuses {dict(codes)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
