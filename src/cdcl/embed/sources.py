"""What `cdcl embed` and `cdcl evaluate` embed with: a run, a checkpoint or a baseline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cdcl.embed.baselines import IntensityFeatures, random_backbone_like, random_timm_backbone
from cdcl.embed.inference import make_view_fn
from cdcl.errors import CdclError
from cdcl.hashing import file_sha256
from cdcl.models.backbones import build_backbone
from cdcl.train.checkpoint import load_for_eval


class Source:
    """What ``cdcl embed`` / ``cdcl evaluate`` embed with: a run, a checkpoint or a baseline."""

    def __init__(
        self,
        name: str,
        backbone: Callable[[Any], Any],
        view_fn: Callable[[Any], Any] | None,
        provenance: dict[str, Any],
        model: Any = None,
    ) -> None:
        self.name = name
        self.backbone = backbone
        self.view_fn = view_fn
        self.provenance = provenance
        self.model = model  # the EvalModel of a run/checkpoint, else None


def resolve_source(spec: str, which: str = "best", dataset: Any = None, seed: int = 0) -> Source:
    """A run directory, a checkpoint file, ``random:<timm arch>`` or ``intensity``.

    Baselines need ``dataset`` (channel count and image size); a run's evaluation view is the
    trainer's ``center_view`` with the run's resolved views config.
    """

    if spec == "intensity":
        return Source("intensity", IntensityFeatures(), None, {"baseline": "intensity"})
    if spec.startswith("random:"):
        if dataset is None:
            raise CdclError(f"{spec}: a random backbone needs --data")
        arch = spec.split(":", 1)[1]
        h, _ = dataset.image_size
        net = random_timm_backbone(arch, len(dataset.channels), img_size=h, seed=seed)
        return Source(f"random_{arch}", net, None, {"baseline": spec, "seed": seed})
    path = Path(spec)
    if not path.exists():
        raise CdclError(
            f"{spec}: no such run directory or checkpoint (or use random:<timm arch> / intensity)"
        )

    em = load_for_eval(path, which=which)
    method_name = str(getattr(getattr(em.config, "method", None), "name", "model"))
    prov = {
        "run": str(path.resolve()) if path.is_dir() else str(path.resolve().parent.parent),
        "checkpoint": str(Path(em.path).resolve()),
        "checkpoint_sha256": file_sha256(em.path),
        "checkpoint_step": em.step,
        "checkpoint_epoch": em.epoch,
        "method": method_name,
    }
    return Source(method_name, em.method.embed, make_view_fn(em.views_cfg), prov, model=em)


def random_like_run(em: Any, dataset: Any, seed: int = 0) -> Callable[[Any], Any]:
    """A randomly initialised backbone of the run's architecture (the ``random`` baseline)."""

    try:
        torch.manual_seed(seed)
        h, _ = dataset.image_size
        size = int(getattr(em.views_cfg, "global_size", None) or h)
        net, _ = build_backbone(
            replace(em.config.model, weights=None, drop_path=0.0), len(dataset.channels), size
        )
        return net.eval()
    except (ImportError, AttributeError, TypeError):
        # No model factory / config: re-initialise a copy of the whole method instead.
        return random_backbone_like(em.method, seed=seed).embed


def check_channels(source: Source, dataset: Any, where: str) -> None:
    """Refuse a trained model on a dataset with another number of channels (one line)."""
    if source.model is None:
        return
    trained = source.model.dataset.get("channels")
    if not isinstance(trained, list) or len(trained) == len(dataset.channels):
        return
    raise CdclError(
        f"{where}: the checkpoint was trained on {len(trained)} channels ({', '.join(trained)}) "
        f"but {dataset.path} has {len(dataset.channels)} ({', '.join(dataset.channels)}); "
        "embed a dataset with the channels the model was trained on"
    )
