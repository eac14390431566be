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

from cdcl import schema
from cdcl.atomic import atomic_path
from cdcl.config import config_from_dict
from cdcl.errors import CdclError
from cdcl.methods import build_method

FORMAT = "cdcl-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


class Tensor(schema.Spec):
    """A torch tensor (a schema spec for the weights and RNG states in a checkpoint)."""

    expected = "a tensor"

    def _check(self, value: object, path: str) -> None:
        if not isinstance(value, torch.Tensor):
            raise self.fail(value, path)


DAMAGED_HINT = (
    "the checkpoint is damaged or was not written by `cdcl train`: retrain, or point at "
    "another checkpoint"
)
_COUNT = schema.Int(min=0)
_INDEX = schema.MapOf(schema.Int(min=0))  # label or batch name -> its index
_IMAGE_SIZE = schema.ListOf(schema.Int(min=1), min_len=2, max_len=2)
# build: what rebuilds the method (loop._build_info); evaluation needs all of it.
_BUILD_FOR_EVAL = {
    "n_classes": _COUNT,
    "n_batches": _COUNT,
    "batch_shares": schema.ListOf(schema.Float(min=0)),
}
# What `cdcl train` writes (run_state._state); everything read back is checked before use.
CHECKPOINT_SCHEMA = schema.Obj(
    required={
        "version": schema.Version(known=(VERSION,)),
        "method": schema.MapOf(Tensor()),
        "config": schema.MapOf(schema.Any()),  # checked field by field by config_from_dict
        "label_of": _INDEX,
        "batch_of": _INDEX,
        "build": schema.Obj(
            required={"in_chans": schema.Int(min=1), "img_size": schema.Int(min=1)},
            optional={**_BUILD_FOR_EVAL, "n_local": _COUNT},
        ),
    },
    optional={
        "optimizer": schema.MapOf(schema.Any()),
        "probe_optimizer": schema.MapOf(schema.Any()),
        "step": _COUNT,
        "epoch": _COUNT,
        "step_in_epoch": _COUNT,
        "steps_per_epoch": schema.Int(min=1),
        "world_size": schema.Int(min=1),
        "best_metric": schema.Nullable(schema.Float()),
        "best_step": schema.Nullable(_COUNT),
        "rng": schema.Obj(
            optional={
                "python": schema.Obj(
                    required={
                        "version": schema.Int(),
                        "state": schema.ListOf(schema.Int(min=0)),
                        "gauss": schema.Nullable(schema.Float()),
                    }
                ),
                "numpy": schema.Obj(
                    required={
                        "name": schema.Str(),
                        "keys": Tensor(),
                        "pos": _COUNT,
                        "has_gauss": _COUNT,
                        "cached_gaussian": schema.Float(finite=False),
                    }
                ),
                "torch": Tensor(),
                "torch_per_rank": schema.ListOf(Tensor(), min_len=1),
                "cuda": schema.ListOf(Tensor()),
            }
        ),
        "dataset": schema.Obj(
            optional={
                "path": schema.Str(),
                "name": schema.Str(),
                "source": schema.Str(),
                "channels": schema.ListOf(schema.Str()),
                "image_size": _IMAGE_SIZE,
            }
        ),
        "views": schema.MapOf(schema.Any()),
        "feature_dim": schema.Nullable(schema.Int(min=1)),
        "val": schema.Nullable(schema.MapOf(schema.Any())),
        "metrics_lines": _COUNT,
    },
)
# Evaluation rebuilds the method: everything it needs must be there.
EVAL_SCHEMA = schema.Obj(
    required={
        "build": schema.Obj(required=_BUILD_FOR_EVAL),
        "dataset": schema.Obj(required={"image_size": _IMAGE_SIZE}),
    }
)


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
    schema.check(ckpt, CHECKPOINT_SCHEMA, str(path), DAMAGED_HINT)
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


def check_finite_weights(ckpt: dict[str, Any], path: Path) -> None:
    """CdclError naming the checkpoint and the first weight holding NaN or infinity.

    Such weights would turn every profile into NaN; training never saves them (run_state.save
    refuses), so the file was damaged or edited.
    """
    for name, t in ckpt["method"].items():
        if torch.is_floating_point(t) or torch.is_complex(t):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CdclError(
                    f"{path}: weight `{name}` holds {bad} NaN or infinite value(s) of "
                    f"{t.numel()}; every profile would be NaN: use another checkpoint "
                    "(e.g. checkpoints/last.pt or best.pt of a good run) or retrain"
                )


def load_for_eval(path_or_run: Path, which: str = "best", device: str = "cpu") -> EvalModel:
    """Restore a run's method in eval mode (run dir: best.pt if present, else last.pt)."""
    path = find_checkpoint(Path(path_or_run), which)
    ckpt = load_checkpoint(path)
    schema.check(ckpt, EVAL_SCHEMA, str(path), DAMAGED_HINT)
    check_finite_weights(ckpt, path)
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
