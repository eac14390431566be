"""Supervised baseline: cross-entropy on the treatment label; the backbone is evaluated."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdcl.methods.base import Method, MethodConfig, StepState


class Supervised(Method):
    """Backbone + linear classifier on one global view."""

    n_views = 1
    view_kind = "single"

    def __init__(
        self, cfg: MethodConfig, backbone: nn.Module, feat_dim: int, n_classes: int
    ) -> None:
        super().__init__(cfg, feat_dim, n_classes)
        self.backbone = backbone
        self.classifier = nn.Linear(feat_dim, max(n_classes, 1))
        self.cross_batch = bool(cfg.cross_batch)

    def student_modules(self) -> list[nn.Module]:
        """Backbone and classifier."""
        return [self.backbone, self.classifier]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features."""
        return self.backbone(images)

    def loss(self, batch: dict, step_state: StepState) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of the classifier on view A, plus the detached probe's loss."""
        x = batch["views"][0]
        labels = batch["label"]
        feats = self.backbone(x)
        logits = self.classifier(feats)
        main = F.cross_entropy(logits, labels)
        probe, logs = self.probe_step(feats, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        logs.update({"loss": float(main.detach()), "train_acc": float(acc)})
        return main + probe, logs
