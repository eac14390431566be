"""Shared fixtures: tiny dataset directories built in tmp_path."""

from __future__ import annotations

import os

# Under pytest-xdist (`make test` runs one worker per core) each worker and the commands its
# tests spawn use one thread: two workers with a thread per core each would oversubscribe the
# cores. Set before numpy/torch are imported so their thread pools start at one thread.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from cdcl.data.dataset_dir import DatasetInfo, DatasetWriter  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PANDAS_COPY_ON_WRITE = pd.options.mode.copy_on_write


@pytest.fixture(autouse=True, scope="session")
def _study_looks_in_a_temporary_ledger(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Studies record their looks in a ledger outside their folder: keep the tests' out of
    the user's own (~/.local/state/cdcl), in one folder per test session and worker."""
    if not os.environ.get("CDCL_STATE_DIR"):
        os.environ["CDCL_STATE_DIR"] = str(tmp_path_factory.mktemp("cdcl_state"))


@pytest.fixture(autouse=True)
def _pandas_options_as_installed() -> None:
    """Each test starts with pandas' copy-on-write as installed.

    Importing pycytominer turns it on for the whole process; with xdist a test file that imports
    it would otherwise change how every later file on the same worker runs.
    """
    pd.options.mode.copy_on_write = PANDAS_COPY_ON_WRITE


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


def profile_design(
    n_batches: int, moas: dict[str, str | None], wells: int, control_wells: int
) -> pd.DataFrame:
    """Profile metadata: batches x 2 plates x treatments (``moas`` order), ``wells`` wells each.

    DMSO, the negative control, gets ``control_wells`` wells per plate instead.
    """
    rows = []
    for b in range(n_batches):
        for p in range(2):
            for name, moa in moas.items():
                for w in range(control_wells if name == "DMSO" else wells):
                    rows.append(
                        {
                            "plate": f"B{b}P{p}",
                            "well": f"{name}_{w}",
                            "batch": f"B{b}",
                            "treatment": name,
                            "compound": name,
                            "moa": moa,
                            "is_control": name == "DMSO",
                        }
                    )
    return pd.DataFrame(rows)


@pytest.fixture
def random_dataset(tmp_path: Path) -> Path:
    """A committed random dataset directory."""
    return write_random_dataset(tmp_path / "ds")
