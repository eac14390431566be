"""docs/own-screen.md, run as written on a small TIFF screen with pycytominer-style metadata.

The commands and Python snippets are read from the page itself, so the page cannot drift from
what is tested. A screen of 4 plates x 6 wells x 2 sites (no batch column: plates are batches)
must train, embed and evaluate with every batch figure computed, from the command line and
from the Python API.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import cdcl
from test_api import BATCH_FIGURES, figure

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-screen.md"
CHANNELS = ("DNA", "Actin", "Tubulin")
COMPOUNDS = {
    "DMSO": "control",
    "cmpA": "tubulin",
    "cmpB": "tubulin",
    "cmpC": "actin",
    "cmpD": "actin",
}
WELLS = {"A01": "DMSO", "A02": "DMSO", "A03": "cmpA", "A04": "cmpB", "A05": "cmpC", "A06": "cmpD"}


def write_tiff_screen(root: Path, plates: int = 4, sites: int = 2, size: int = 32) -> pd.DataFrame:
    """TIFFs under root/images and root/metadata.csv with Metadata_* columns (no batch)."""
    import tifffile

    rng = np.random.default_rng(0)
    effect = {c: rng.normal(0, 300, len(CHANNELS)) for c in COMPOUNDS}
    effect["DMSO"] = np.zeros(len(CHANNELS))
    rows = []
    yy, xx = np.mgrid[:size, :size]
    for p in range(1, plates + 1):
        plate = f"P{p}"
        plate_gain = 1 + 0.1 * p  # a plate (batch) effect on every channel
        (root / "images" / plate).mkdir(parents=True, exist_ok=True)
        for well, compound in WELLS.items():
            for site in range(1, sites + 1):
                rows.append(
                    {
                        "Metadata_Plate": plate,
                        "Metadata_Well": well,
                        "Metadata_Site": site,
                        "Metadata_Compound": compound,
                        "Metadata_MoA": COMPOUNDS[compound],
                    }
                )
                cy, cx = rng.uniform(8, size - 8, 2)
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
                for k in range(len(CHANNELS)):
                    img = 1000 + 2000 * blob * (1 + k) + effect[compound][k]
                    img = img * plate_gain + rng.normal(0, 50, (size, size))
                    tifffile.imwrite(
                        root / "images" / plate / f"{well}_s{site}_w{k + 1}.tif",
                        np.clip(img, 0, 65535).astype(np.uint16),
                    )
    table = pd.DataFrame(rows)
    table.to_csv(root / "metadata.csv", index=False)
    return table


def doc_blocks(language: str) -> list[str]:
    """The fenced code blocks of docs/own-screen.md in one language, in page order."""
    text = DOC.read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def doc_commands() -> list[list[str]]:
    """The `cdcl ...` lines of the bash blocks under "The five commands", split as a shell would."""
    section = DOC.read_text().split("## The five commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [ln for block in blocks for ln in block.splitlines()]
    return [shlex.split(ln)[1:] for ln in lines if ln.startswith("cdcl ")]


def test_the_page_has_five_commands_and_a_python_session() -> None:
    commands = doc_commands()
    assert [c[0] for c in commands] == ["build", "info", "train", "embed", "evaluate"]
    assert any("cdcl.evaluate(" in b for b in doc_blocks("python"))


@pytest.mark.slow
def test_own_screen_from_the_command_line(tmp_path: Path) -> None:
    write_tiff_screen(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for args in doc_commands():
        proc = cdcl(*args, cwd=tmp_path, env=env)
        assert proc.returncode == 0, f"cdcl {' '.join(args)}\n{proc.stderr}"
        if args[0] == "build":
            assert "every plate (Metadata_Plate) is its own batch" in proc.stderr
        if args[0] in ("info", "train"):
            assert "warning" not in proc.stderr, proc.stderr  # the default fold is evaluable
        if args[0] == "train":
            assert "generic-cdcl sized for 48 images of 32x32 px" in proc.stderr
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["split"]["test_batches"] == ["P1", "P2"]  # two of the four plates
    for path in BATCH_FIGURES:
        assert math.isfinite(figure(results, "features", path)), path
    assert (tmp_path / "results" / "report.html").is_file()


@pytest.mark.slow
def test_own_screen_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiff_screen(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in doc_blocks("python"):
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the page's own code
    results = namespace["results"]
    assert results["split"]["test_batches"] == ["P1", "P2"]
    for path in BATCH_FIGURES:
        assert math.isfinite(figure(results, "features", path)), path
    # pycytominer's defaults found the features and kept them through every step.
    selected = namespace["selected"]
    assert len(selected) == 24 and selected.filter(like="Cells_Embedding_").shape[1] > 0
