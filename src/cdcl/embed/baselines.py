"""Baselines scored with the same code as the learned representations.

- ``intensity``: ten hand-crafted statistics per channel of the plate-standardised centre view
  (mean, std, percentiles 1/5/25/50/75/95/99, fraction of pixels more than 2 control standard
  deviations above the control mean). docs/design.md §9: on intensity-driven screens these beat many
  learned representations, so every report shows them.
- ``random``: the run's backbone architecture with fresh random weights (seeded): what the
  architecture alone gives.
- TVN on top of any embedding lives in :mod:`cdcl.profiles.columns`.
"""

from __future__ import annotations

import copy
from typing import Any

import timm
import torch

from cdcl.errors import CdclError

INTENSITY_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
INTENSITY_STATS = (
    "mean",
    "std",
    *(f"p{q}" for q in INTENSITY_PERCENTILES),
    "frac_above_2sd",
)


def intensity_feature_names(channels: list[str]) -> list[str]:
    """Names of the intensity features, channel-major (``DNA_mean``, ``DNA_std``, ...)."""
    return [f"{c}_{s}" for c in channels for s in INTENSITY_STATS]


class IntensityFeatures:
    """A backbone-like callable: images (n, C, H, W) -> (n, 10*C) per-channel statistics."""

    def __call__(self, images: Any) -> Any:
        """Per-channel mean, std, percentiles and bright-pixel fraction of each image."""

        x = images.float().flatten(2)  # (n, C, P)
        q = torch.tensor([p / 100 for p in INTENSITY_PERCENTILES], dtype=x.dtype)
        pct = torch.quantile(x, q, dim=2).permute(1, 2, 0)  # (n, C, 7)
        feats = torch.cat(
            [
                x.mean(2, keepdim=True),
                x.std(2, keepdim=True),
                pct,
                (x > 2.0).float().mean(2, keepdim=True),
            ],
            dim=2,
        )
        return feats.flatten(1)


def _reinit(module: Any, seed: int) -> Any:
    """Re-initialise every parameter of a module in place (its own init rules where it has them)."""

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if hasattr(module, "init_weights") and callable(module.init_weights):
            module.init_weights()  # timm ViTs: trunc-normal init as at construction
        for m in module.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
        for buf_name, buf in module.named_buffers():
            if buf_name.endswith("running_mean"):
                buf.zero_()
            elif buf_name.endswith("running_var"):
                buf.fill_(1.0)
    finally:
        torch.random.set_rng_state(gen_state)
    return module


def random_backbone_like(backbone: Any, seed: int = 0) -> Any:
    """A copy of ``backbone`` (an nn.Module) with randomly re-initialised weights."""
    return _reinit(copy.deepcopy(backbone), seed).eval()


def random_timm_backbone(
    arch: str, in_chans: int, img_size: int | None = None, seed: int = 0
) -> Any:
    """A randomly initialised timm network with ``in_chans`` inputs and no classifier head."""

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    if img_size is not None and ("vit" in arch or "deit" in arch):
        kwargs["img_size"] = img_size
    torch.manual_seed(seed)
    try:
        return timm.create_model(arch, **kwargs).eval()
    except Exception as e:  # unknown name or incompatible arguments: a user error
        raise CdclError(f"random:{arch}: cannot build this timm model ({e})") from None


def feature_names(n: int, prefix: str = "f") -> list[str]:
    """Generic feature names f0..f{n-1}."""
    return [f"{prefix}{i}" for i in range(n)]


__all__ = [
    "INTENSITY_STATS",
    "IntensityFeatures",
    "feature_names",
    "intensity_feature_names",
    "random_backbone_like",
    "random_timm_backbone",
]
