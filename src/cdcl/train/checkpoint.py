"""Checkpoints: atomic, resumable, loadable with ``torch.load(weights_only=True)`` (docs/design.md §6).

A checkpoint is a dict of tensors and plain containers only (no pickled objects): the method's
state dict (student, teacher, heads, centres, probe), both optimisers, the step counters, every
RNG state, the resolved config and the label/batch index. ``RUN/checkpoints/last.pt`` is written
at every save; ``best.pt`` whenever the online probe's validation accuracy improves.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdcl.atomic import atomic_path
from cdcl.config import config_from_dict
from cdcl.errors import CdclError
from cdcl.methods import build_method

FORMAT = "cdcl-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temporary sibling, fsync, rename) so a kill never truncates it.

    A full disk raises :class:`cdcl.atomic.DiskFullError` naming the file; the previous
    checkpoint stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a cdcl checkpoint with weights only; CdclError naming the file if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CdclError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed globals: all unusable
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CdclError(
            f"{path}: not a readable cdcl checkpoint ({type(e).__name__}: {reason}); "
            "it may be truncated or corrupted: retrain, or point at another checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CdclError(
            f"{path}: not a cdcl checkpoint (no `format: {FORMAT}` marker); "
            "cdcl reads only checkpoints written by `cdcl train`"
        )
    if int(ckpt.get("version", 0)) > VERSION:
        raise CdclError(
            f"{path}: checkpoint format version {ckpt.get('version')} is newer than this cdcl "
            f"({VERSION}); upgrade cdcl"
        )
    missing = [k for k in ("method", "config", "label_of", "batch_of", "build") if k not in ckpt]
    if missing:
        raise CdclError(f"{path}: checkpoint lacks `{missing[0]}`; it is incomplete, retrain")
    return ckpt


# ---------------------------------------------------------------- RNG states as plain data


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states as tensors and plain containers."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss": gauss},
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npd = state["numpy"]
    np.random.set_state(
        (
            npd["name"],
            npd["keys"].numpy().astype(np.uint32),
            npd["pos"],
            npd["has_gauss"],
            npd["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- evaluation loading


def find_checkpoint(path_or_run: Path, which: str = "best") -> Path:
    """The checkpoint file meant by a file path or a run directory (best.pt, else last.pt)."""
    p = Path(path_or_run)
    if p.is_file():
        return p
    if not p.exists():
        raise CdclError(f"{p}: no such run directory or checkpoint file")
    if which not in ("best", "last"):
        raise CdclError(f"checkpoint choice `{which}`: use best or last")
    d = p / CHECKPOINT_DIR
    order = [BEST, LAST] if which == "best" else [LAST]
    for name in order:
        if (d / name).is_file():
            return d / name
    raise CdclError(
        f"{p}: no checkpoint in {d} (looked for {' or '.join(order)}); train with `cdcl train --out {p}`"
    )


@dataclass
class EvalModel:
    """A trained method restored for evaluation: call ``method.embed(images)``."""

    method: torch.nn.Module
    config: Any  # cdcl.config.Config
    label_of: dict[str, int]
    batch_of: dict[str, int]
    probe: torch.nn.Module
    views_cfg: Any  # resolved cdcl.data.views.ViewsConfig
    path: Path
    step: int
    epoch: int
    dataset: dict[str, Any] = field(default_factory=dict)
    feature_dim: int | None = None
    val: dict[str, Any] = field(default_factory=dict)


def build_method_from_checkpoint(ckpt: dict[str, Any], path: Path) -> tuple[Any, torch.nn.Module]:
    """(Config, Method with the checkpoint's weights loaded) from a loaded checkpoint dict."""

    cfg = config_from_dict(ckpt["config"], where=f"{path} (stored config)")
    b = ckpt["build"]
    method = build_method(
        cfg.method,
        cfg.model,
        in_chans=int(b["in_chans"]),
        img_size=int(b["img_size"]),
        n_classes=int(b["n_classes"]),
        n_batches=int(b["n_batches"]),
        batch_shares=[float(x) for x in b["batch_shares"]],
        n_local=int(b.get("n_local", cfg.views.n_local)),
    )
    try:
        method.load_state_dict(ckpt["method"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CdclError(
            f"{path}: weights do not fit the model its config describes ({first}); "
            "the checkpoint comes from an incompatible cdcl version"
        ) from None
    return cfg, method


def load_for_eval(path_or_run: Path, which: str = "best", device: str = "cpu") -> EvalModel:
    """Restore a run's method in eval mode (run dir: best.pt if present, else last.pt)."""
    path = find_checkpoint(Path(path_or_run), which)
    ckpt = load_checkpoint(path)
    cfg, method = build_method_from_checkpoint(ckpt, path)
    method.to(device).eval()
    views = cfg.views
    if hasattr(views, "resolved"):
        views = views.resolved(int(ckpt["dataset"]["image_size"][0]))
    return EvalModel(
        method=method,
        config=cfg,
        label_of=dict(ckpt["label_of"]),
        batch_of=dict(ckpt["batch_of"]),
        probe=method.probe,
        views_cfg=views,
        path=path,
        step=int(ckpt.get("step", 0)),
        epoch=int(ckpt.get("epoch", 0)),
        dataset=dict(ckpt.get("dataset", {})),
        feature_dim=ckpt.get("feature_dim"),
        val=dict(ckpt.get("val") or {}),
    )
