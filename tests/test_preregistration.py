"""Pre-registered study designs: endpoints, hash, tests by the declared rule, looks, groups."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_process import cdcl

from cdcl.errors import CdclError
from cdcl.experiments import preregistration as pr
from cdcl.experiments.demo import DemoSpec, compound_groups
from cdcl.experiments.study import StudySpec, fix_design, read_design, study_plan

DECISIVE = {
    "methods": ["DINO", "CDCL", "CDCL-same-batch"],
    "references": ["DINO", "CellProfiler+sphering"],
    "strengths": [0.0, 2.0],
    "train_treatments": "half",
}


def _endpoints() -> list[dict]:
    return pr.default_endpoints(
        DECISIVE["methods"],
        DECISIVE["references"],
        DECISIVE["strengths"],
        DECISIVE["train_treatments"],
    )


def test_default_endpoints_of_the_decisive_design() -> None:
    eps = {e["id"]: e for e in _endpoints()}
    primary = [e for e in eps.values() if e["role"] == "primary"]
    assert len(primary) == 1 and primary[0]["id"] == "E1"
    p = primary[0]
    assert p["metric"] == "replicate mAP (other batch)" and p["variant"] == "plate_normalized"
    assert p["terms"] == [
        {"sign": 1, "row": "CDCL", "compounds": "unseen", "strength": 2.0},
        {"sign": -1, "row": "DINO", "compounds": "unseen", "strength": 2.0},
    ]
    labels = [e["label"] for e in eps.values()]
    # the interaction is within seed: four cells, signs summing to zero
    inter = next(e for e in eps.values() if e["label"].startswith("strength interaction"))
    assert sorted((t["sign"], t["row"], t["strength"]) for t in inter["terms"]) == [
        (-1, "CDCL", 0.0),
        (-1, "DINO", 2.0),
        (1, "CDCL", 2.0),
        (1, "DINO", 0.0),
    ]
    use = next(e for e in eps.values() if e["label"].startswith("label use"))
    assert {t["compounds"] for t in use["terms"]} == {"seen", "unseen"}
    assert sum(t["sign"] for t in use["terms"]) == 0
    assert any("CDCL − CDCL-same-batch" in lb for lb in labels)
    assert any("CDCL − CellProfiler+sphering" in lb for lb in labels)
    # control wells belong to no compound group
    for e in eps.values():
        if e["metric"].startswith("control "):
            assert all(t["compounds"] == "all" for t in e["terms"])
    assert eps["E1"]["lower_is_better"] is False
    penalty = next(e for e in eps.values() if e["metric"].startswith("retrieval penalty"))
    assert penalty["lower_is_better"] is True


def test_without_half_or_curve_the_endpoints_read_all_compounds_and_no_contrasts() -> None:
    eps = pr.default_endpoints(["DINO", "CDCL"], ["DINO"], None, "all")
    assert all(t["compounds"] == "all" and t["strength"] is None for e in eps for t in e["terms"])
    assert not any(e["label"].startswith(("strength", "label use")) for e in eps)
    assert pr.default_endpoints(["DINO"], ["DINO"], None, "all") == []  # no CDCL, nothing declared


def test_the_primary_metric_can_be_chosen_and_is_checked(tmp_path: Path) -> None:
    eps = pr.default_endpoints(["DINO", "CDCL"], ["DINO"], None, "all", "treatment acc (logistic)")
    assert eps[0]["role"] == "primary" and eps[0]["metric"] == "treatment acc (logistic)"
    metrics = [e["metric"] for e in eps]
    assert len(metrics) == len(set(metrics)) and "replicate mAP (other batch)" in metrics[1:]
    assert all(e["label"].endswith("control wells") for e in eps if "control " in e["metric"])
    proc = cdcl("study", "--quick", "--primary-metric", "NSCX", "--out", str(tmp_path / "s"))
    assert proc.returncode != 0 and "--primary-metric NSCX: unknown" in proc.stderr
    assert not (tmp_path / "s" / "design.json").exists()


def test_design_is_fixed_with_its_hash_and_edits_are_refused(tmp_path: Path) -> None:
    spec = StudySpec(
        out=tmp_path / "s", methods=("DINO", "CDCL"), seeds=(0, 1), references=("DINO",),
        train_treatments="half", batch_strength=2.0, note="n = 2 for a test",
    )  # fmt: skip
    plan = study_plan(spec)
    design = fix_design(spec.out, ["seed0", "seed1"], plan)
    on_disk = json.loads((spec.out / "design.json").read_text())
    assert on_disk == design and design["hash"] == pr.design_hash(design)
    for key in ("methods", "references", "endpoints", "alpha", "rule", "family", "primary"):
        assert key in design, key
    assert design["note"] == "n = 2 for a test" and design["strengths"] == [2.0]
    assert all(not b.startswith("train.seed=") for b in design["budget"])
    # A second run keeps the fixed design whatever it is asked now.
    other = study_plan(StudySpec(out=spec.out, methods=("DINO", "CDCL"), seeds=(0,)))
    assert fix_design(spec.out, ["seed0"], other) == design
    # The hash does not depend on where the study is written.
    copy = fix_design(tmp_path / "elsewhere", ["seed0", "seed1"], plan)
    assert copy["hash"] == design["hash"]
    # An endpoint changed after the fact is refused with one line naming the file.
    on_disk["alpha"] = 0.1
    (spec.out / "design.json").write_text(json.dumps(on_disk))
    with pytest.raises(CdclError, match=r"design\.json: changed after the design was fixed"):
        read_design(spec.out / "design.json")


def _records(gains: dict[tuple[str, float], list[float]], base: float = 0.4) -> dict:
    """Replicate records at strengths 0 and 2 where CDCL − DINO is ``gains[(group, s)][i]``."""
    out: dict[float, list[dict]] = {}
    for s in (0.0, 2.0):
        recs = []
        for i in range(6):
            by_group = {}
            for g in ("seen", "unseen"):
                gain = gains[(g, s)][i]
                rows = [
                    {"features": "DINO", "replicate mAP (other batch)": base + 0.01 * i},
                    {"features": "CDCL", "replicate mAP (other batch)": base + 0.01 * i + gain},
                ]
                by_group[g] = {"plate_normalized": rows}
            recs.append({"name": f"seed{i}", "tables": {}, "tables_by_compounds": by_group})
        out[s] = recs
    return out


def test_endpoints_are_contrasts_within_seed_tested_by_the_rule() -> None:
    rng = np.random.default_rng(0)
    noise = {k: rng.normal(0, 0.005, 6) for k in ("a", "b", "c", "d")}
    gains = {
        ("unseen", 2.0): list(0.05 + noise["a"]),
        ("unseen", 0.0): list(0.05 + noise["b"]),  # the same gain without a batch effect
        ("seen", 2.0): list(0.10 + noise["c"]),  # a larger gain on the compounds paired on
        ("seen", 0.0): list(0.10 + noise["d"]),
    }
    design = {
        "alpha": 0.05,
        "endpoints": [
            e
            for e in _endpoints()
            if e["metric"] == "replicate mAP (other batch)" and "CellProfiler" not in e["label"]
            and "same-batch" not in e["label"]
        ],
    }  # fmt: skip
    names = [f"seed{i}" for i in range(6)]
    rows = {r["label"].split(":")[0]: r for r in pr.test_endpoints(
        design, pr.table_lookup(_records(gains), names))}  # fmt: skip
    primary = next(r for r in rows.values() if r["role"] == "primary")
    assert primary["values"] == pytest.approx(gains[("unseen", 2.0)])
    assert primary["verdict"] == "better" and primary["p"] < 1e-4
    assert primary["p_signflip"] == pytest.approx(2 / 2**6)  # every difference is positive
    assert "p_holm" not in primary  # the primary is tested alone
    inter = rows["strength interaction"]
    want = np.array(gains[("unseen", 2.0)]) - np.array(gains[("unseen", 0.0)])
    assert inter["values"] == pytest.approx(list(want))
    assert inter["verdict"] == "no detectable difference"
    use = rows["label use"]
    assert use["mean_diff"] == pytest.approx(0.05, abs=0.01)
    assert use["verdict"] == "better"
    # Holm over the two secondaries: each adjusted p is at least its raw p
    for r in (inter, use):
        assert r["p_holm"] >= r["p"]
    assert min(inter["p_holm"], use["p_holm"]) == pytest.approx(2 * min(inter["p"], use["p"]))


def test_a_missing_cell_leaves_that_unit_out() -> None:
    gains = {(g, s): [0.02] * 6 for g in ("seen", "unseen") for s in (0.0, 2.0)}
    records = _records(gains)
    del records[2.0][3]  # seed3 was not reported at strength 2
    design = {"alpha": 0.05, "endpoints": _endpoints()[:1]}
    names = [f"seed{i}" for i in range(6)]
    (row,) = pr.test_endpoints(design, pr.table_lookup(records, names))
    assert row["n"] == 5 and math.isnan(row["values"][3])


def test_looks_are_counted_by_design_hash_across_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cdcl.experiments.study import design_look_note

    monkeypatch.setenv(pr.LEDGER_ENV, str(tmp_path / "state"))
    first = pr.record_look("abc", tmp_path / "a", ["seed0", "seed1"], {"E1": "better"})
    again = pr.record_look("abc", tmp_path / "a", ["seed0", "seed1"], {"E1": "better"})
    assert len(first) == len(again) == 1 and design_look_note(again) is None
    moved = pr.record_look("abc", tmp_path / "b", ["seed0", "seed1"], {"E1": "better"})
    assert [lk["look"] for lk in moved] == [1, 2]
    note = design_look_note(moved)
    assert note and note.startswith("Look 2") and str((tmp_path / "a").resolve()) in note
    more = pr.record_look("abc", tmp_path / "b", ["seed0", "seed1", "seed2"], {"E1": "better"})
    assert [lk["look"] for lk in more] == [1, 2, 3]
    assert pr.record_look("other", tmp_path / "b", ["seed0"], {}) [0]["look"] == 1  # fmt: skip


def test_seen_compounds_are_the_ones_training_used(tmp_path: Path) -> None:
    from cdcl.config import load_config
    from cdcl.data.dataset_dir import open_dataset
    from cdcl.data.synthetic import generate
    from cdcl.experiments.demo import budget_overrides
    from cdcl.train.data import prepare_data

    data = generate(tmp_path / "tiny", "tiny", seed=0, progress=False)
    samples = open_dataset(data).samples
    for seed in (0, 3):
        spec = DemoSpec(out=tmp_path / "o", quick=True, seed=seed, train_treatments="half")
        cfg = load_config("synthetic-dino", [f"data.path={data}", *budget_overrides(spec)])
        trained = set(prepare_data(cfg).label_of)
        groups = compound_groups(spec, samples)
        controls = set(samples.loc[samples["is_control"], "treatment"].astype(str))
        assert trained - controls == groups["seen"]
        assert groups["seen"].isdisjoint(groups["unseen"]) and groups["unseen"]
    assert compound_groups(DemoSpec(out=tmp_path / "o"), samples) is None


@pytest.mark.slow
def test_preregistered_curve_end_to_end(tmp_path: Path) -> None:
    """The real command: design before training, seen/unseen tables, endpoints, a second look."""
    out = tmp_path / "curve"
    cmd = [
        "study", "--quick", "--methods", "DINO,CDCL", "--reference", "DINO", "--epochs", "1",
        "--seeds", "0", "--batch-strength", "0,2", "--train-treatments", "half",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", pr.LEDGER_ENV: str(tmp_path / "state")}
    proc = cdcl(*cmd, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    design = json.loads((out / "design.json").read_text())
    assert proc.stdout.index(f"design {design['hash'][:16]}") < proc.stdout.index("== train")
    assert design["train_treatments"] == "half" and design["primary"] == "E1"
    curve = json.loads((out / "curve.json").read_text())
    pre = curve["preregistered"]
    assert pre["design"] == design["hash"]
    assert [r["id"] for r in pre["endpoints"]] == [e["id"] for e in design["endpoints"]]
    assert all("p_signflip" in r and "p" in r for r in pre["endpoints"])
    study = json.loads((out / "bs2" / "study.json").read_text())
    groups = study["replicates"][0]["tables_by_compounds"]
    assert set(groups) == {"seen", "unseen"}
    rows = {r["features"] for r in groups["unseen"]["plate_normalized"]}
    assert {"DINO", "CDCL"} <= rows
    rep = json.loads((out / "bs2" / "replicates" / "seed0" / "results.json").read_text())
    assert set(rep["compound_groups"]) == {"seen", "unseen"}
    assert "## Pre-registered endpoints" in (out / "curve.md").read_text()
    # The same design reported from another folder is a second look, and says so.
    shutil.copytree(out, tmp_path / "copy")
    cmd[cmd.index("--out") + 1] = str(tmp_path / "copy")
    again = cdcl(*cmd, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "copy" / "curve.json").read_text())
    assert [lk["look"] for lk in second["preregistered"]["looks"]] == [1, 2]
    assert "Look 2 at this design" in (tmp_path / "copy" / "curve.md").read_text()
