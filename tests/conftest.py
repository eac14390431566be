"""Shared fixtures: tiny dataset directories built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cdcl.data.dataset_dir import DatasetInfo, DatasetWriter

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_random_dataset(
    out: Path,
    n_batches: int = 3,
    wells_per_treatment: int = 1,
    sites: int = 2,
    size: int = 16,
    channels: tuple[str, ...] = ("DNA", "ER", "RNA", "AGP", "Mito"),
    seed: int = 0,
) -> Path:
    """A small random dataset: every batch has one plate with 4 treatments and a control."""
    rng = np.random.default_rng(seed)
    rows = []
    treatments = ["DMSO", "t0", "t1", "t2", "t3"]
    moas = {"DMSO": "control", "t0": "m0", "t1": "m0", "t2": "m1", "t3": "m1"}
    for b in range(n_batches):
        well = 0
        for t in treatments:
            for _ in range(wells_per_treatment):
                for s in range(sites):
                    rows.append(
                        {
                            "batch": f"b{b}",
                            "plate": f"b{b}_p1",
                            "well": f"A{well:02d}",
                            "site": s,
                            "treatment": t,
                            "compound": t,
                            "moa": moas[t],
                            "is_control": t == "DMSO",
                        }
                    )
                well += 1
    samples = pd.DataFrame(rows)
    samples.insert(0, "image", np.arange(len(samples)))
    info = DatasetInfo(
        name="random",
        source="test",
        channels=list(channels),
        dtype="uint8",
        image_size=[size, size],
        n_images=len(samples),
    )
    w = DatasetWriter(out, info)
    images = rng.integers(0, 255, size=(len(samples), len(channels), size, size), dtype=np.uint8)
    w.write(np.arange(len(samples)), images)
    return w.commit(samples)


@pytest.fixture
def random_dataset(tmp_path: Path) -> Path:
    """A committed random dataset directory."""
    return write_random_dataset(tmp_path / "ds")
