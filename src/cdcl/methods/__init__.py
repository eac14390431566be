"""Methods: networks + loss behind one interface (see ``base.Method``)."""

from __future__ import annotations

from dataclasses import replace

import torch

from cdcl.errors import ConfigError
from cdcl.methods.base import METHOD_NAMES, Method, MethodConfig, StepState
from cdcl.methods.byol import BYOL
from cdcl.methods.dino import DINO
from cdcl.methods.supervised import Supervised
from cdcl.models.backbones import ModelConfig, build_backbone

__all__ = ["METHOD_NAMES", "Method", "MethodConfig", "StepState", "build_method"]


def build_method(
    cfg: MethodConfig,
    model_cfg: ModelConfig,
    *,
    in_chans: int,
    img_size: int,
    n_classes: int,
    n_batches: int,
    batch_shares: torch.Tensor | None = None,
    n_local: int = 3,
) -> Method:
    """Build the method named by cfg.name with its backbone(s) and heads.

    ``batch_shares`` (n_batches,): fraction of training images in each training batch (CDCL's
    r_d); None = uniform. ``n_local``: local crops per image (sets ``n_views`` of the DINO family).
    """

    cfg = cfg.resolved()
    student, feat_dim = build_backbone(model_cfg, in_chans, img_size)
    if cfg.name == "supervised":
        return Supervised(cfg, student, feat_dim, n_classes)
    # The EMA copy gets no drop-path and no weights file (it copies the student's weights).
    teacher, _ = build_backbone(replace(model_cfg, drop_path=0.0, weights=None), in_chans, img_size)
    if cfg.name in ("byol", "byol_cb"):
        return BYOL(cfg, student, teacher, feat_dim, n_classes)
    n_batches = max(int(n_batches), 1)
    if batch_shares is None:
        shares = torch.full((n_batches,), 1.0 / n_batches)
    else:
        shares = torch.as_tensor(batch_shares, dtype=torch.float32).flatten()
        if shares.numel() != n_batches or bool((shares <= 0).any()):
            raise ConfigError(
                f"batch_shares: expected {n_batches} positive shares, got {shares.tolist()}"
            )
        shares = shares / shares.sum()
    return DINO(cfg, student, teacher, feat_dim, n_classes, n_batches, shares, n_local=n_local)
