"""BYOL and BYOL-CB (Grill et al. 2020); BYOL-CB takes view 1 from the cross-batch partner.

As in the reference implementation, each view goes through the networks on its own, so every BatchNorm (backbone,
projector, predictor) normalises one view's images: in BYOL-CB the A- and B-views (different
batches) are never mixed in one set of BN statistics.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from cdcl.methods.base import Method, MethodConfig, StepState, ema_update
from cdcl.methods.losses import byol_loss
from cdcl.models.heads import MLP


class BYOL(Method):
    """Online backbone + projector + predictor; target = EMA of backbone + projector."""

    n_views = 2
    view_kind = "byol"

    def __init__(
        self,
        cfg: MethodConfig,
        online_backbone: nn.Module,
        target_backbone: nn.Module,
        feat_dim: int,
        n_classes: int,
    ) -> None:
        super().__init__(cfg, feat_dim, n_classes)
        self.cross_batch = bool(cfg.cross_batch)
        self.online_backbone = online_backbone
        self.projector = MLP(feat_dim, cfg.byol_proj_hidden, cfg.byol_proj_dim, out_bn=True)
        self.predictor = MLP(cfg.byol_proj_dim, cfg.byol_pred_hidden, cfg.byol_proj_dim)
        self.target_backbone = target_backbone
        self.target_backbone.load_state_dict(online_backbone.state_dict())
        self.target_projector = copy.deepcopy(self.projector)
        for p in [*self.target_backbone.parameters(), *self.target_projector.parameters()]:
            p.requires_grad_(False)

    def student_modules(self) -> list[nn.Module]:
        """Online backbone, projector and predictor."""
        return [self.online_backbone, self.projector, self.predictor]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Online backbone features (docs/design.md §7)."""
        return self.online_backbone(images)

    def loss(self, batch: dict, step_state: StepState) -> tuple[torch.Tensor, dict[str, float]]:
        """Symmetric BYOL loss over views 0 (A) and 1 (B), mean over images."""
        views = batch["views"][:2]
        h = [self.online_backbone(x) for x in views]  # one pass per view: per-view BN statistics
        p = [self.predictor(self.projector(hv)) for hv in h]
        with torch.no_grad():
            z = [self.target_projector(self.target_backbone(x)) for x in views]
        main = byol_loss(p[0], p[1], z[0], z[1])
        # The probe learns on what embed() returns: online features of view A, detached.
        probe, logs = self.probe_step(h[0], batch["label"])
        logs["loss"] = float(main.detach())
        return main + probe, logs

    @torch.no_grad()
    def after_step(self, step_state: StepState) -> None:
        """EMA of the online backbone and projector into the target."""
        ema_update(self.target_backbone, self.online_backbone, step_state.ema_momentum)
        ema_update(self.target_projector, self.projector, step_state.ema_momentum)
