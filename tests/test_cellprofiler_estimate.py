"""The CellProfiler baseline prices itself after the first fields and flags downsampled nuclei."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from cli_process import cdcl

from cdcl.data import synthetic as S
from cdcl.embed.cellprofiler import (
    MIN_NUCLEUS_DIAMETER_PX,
    check_nucleus_size,
    estimate_line,
    nucleus_diameters,
)
from cdcl.embed.cellprofiler_features import CellProfilerOptions
from cdcl.embed.job import META_KEY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENDS = re.compile(r"ends about (\w{3} )?\d\d:\d\d")


class _Discs:
    """A dataset without masks whose fields hold a grid of bright discs of one diameter."""

    mask_objects: list[str] = []
    channels = ["DNA", "AGP"]
    path = "discs"

    def __init__(self, size: int, diameter: float) -> None:
        yy, xx = np.mgrid[:size, :size]
        dna = np.full((size, size), 500, np.uint16)
        step = int(diameter * 2)
        for cy in range(step // 2, size - step // 2 + 1, step):
            for cx in range(step // 2, size - step // 2 + 1, step):
                dna[(yy - cy) ** 2 + (xx - cx) ** 2 <= (diameter / 2) ** 2] = 30000
        agp = np.full((size, size), 800, np.uint16)
        self.image = np.stack([dna, agp])

    def read(self, i: int) -> np.ndarray:
        return self.image


def test_nucleus_diameters_are_equivalent_diameters() -> None:
    labels = np.zeros((40, 40), np.int32)
    labels[:10, :10] = 1  # area 100
    labels[20:24, 20:24] = 3  # area 16, label 2 absent
    np.testing.assert_allclose(nucleus_diameters(labels), 2 * np.sqrt(np.array([100, 16]) / np.pi))


def test_small_nuclei_warn_and_large_nuclei_do_not() -> None:
    options = CellProfilerOptions(segmentation="otsu")
    small, warning = check_nucleus_size(_Discs(64, 6), np.arange(2), options)
    assert small < MIN_NUCLEUS_DIAMETER_PX and warning is not None
    assert "look downsampled" in warning and "64x64-px" in warning and "--image-size" in warning
    assert f"{small:.1f} px across" in warning
    large, warning = check_nucleus_size(_Discs(256, 28), np.arange(2), options)
    assert abs(large - 28) < 4 and warning is None


def test_estimate_line_names_rate_fields_left_total_and_end() -> None:
    line = estimate_line("cellprofiler", 3, 180, 60.0)
    assert line.startswith("cellprofiler: 20 s a field, 177 of 180 fields left; about 1 h in all")
    assert ENDS.search(line)


def test_embed_prints_an_estimate_and_records_the_small_nuclei_warning(tmp_path: Path) -> None:
    # The simulated screen rendered at 32 px: nuclei a few pixels across, like a 256-px build.
    screen = S.generate(
        tmp_path / "screen", "tiny", seed=3, batches=4, sites=1, cells_per_field=4.0, image_size=32
    )
    out = tmp_path / "cp.parquet"
    r = cdcl(
        "embed", "--features", "cellprofiler", "--data", str(screen), "--out", str(out),
        "--families", "intensity,sizeshape", "--no-progress", env=ENV,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    estimate = [ln for ln in r.stderr.splitlines() if "fields left" in ln]
    assert len(estimate) == 1 and "a field" in estimate[0] and ENDS.search(estimate[0])
    warned = [ln for ln in r.stderr.splitlines() if "look downsampled" in ln]
    assert len(warned) == 1 and "32x32-px" in warned[0] and "native resolution" in warned[0]
    prov = json.loads(pq.read_schema(out).metadata[META_KEY])
    assert prov["source"]["warnings"] == [warned[0].split("warning: ", 1)[1]]
    assert prov["source"]["median_nucleus_diameter_px"] < MIN_NUCLEUS_DIAMETER_PX
