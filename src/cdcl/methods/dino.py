"""DINO, DINO-CB, CDCL and CDCL-same-batch: one class, three switches (docs/design.md §5).

- DINO: one centre (1, K), cross-entropy over (teacher global i, student view v ≠ i) pairs.
- DINO-CB: DINO with cross-batch pairing (``cross_batch``: view B comes from a partner image
  of the same treatment in another batch; that happens in the data, the loss is DINO's).
- CDCL: DINO-CB + per-batch centres (teacher row of view A centred with the centre of
  ``batch_id``, view B with that of ``partner_batch_id``) + the Barlow term; total
  (1−w)·L_dino/log K + w·L_bt. Plain DINO's loss is L_dino/log K.
- CDCL-same-batch: CDCL whose partner B is another image of the same treatment from A's *own*
  batch (``pairing="same_batch"``, drawn in the data); the loss is CDCL's. The control that
  isolates the cross-batch constraint from the use of the treatment label.

Centres are buffers updated inside ``loss()`` after the forward pass (no_grad, training mode
only) from the raw (uncentred) teacher logits of both global views.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from cdcl.methods.base import Method, MethodConfig, StepState, ema_update
from cdcl.methods.losses import (
    barlow_loss,
    dino_cross_entropy,
    dino_pairs,
    teacher_temperature,
    update_batch_centers,
    update_center,
)
from cdcl.models.heads import DINOHead


class DINO(Method):
    """Student/teacher ViT or ResNet with DINO heads; CDCL when its switches are on."""

    view_kind = "dino"

    def __init__(
        self,
        cfg: MethodConfig,
        student_backbone: nn.Module,
        teacher_backbone: nn.Module,
        feat_dim: int,
        n_classes: int,
        n_batches: int,
        batch_shares: torch.Tensor,
        n_local: int = 3,
    ) -> None:
        super().__init__(cfg, feat_dim, n_classes)
        self.n_views = 2 + 2 * int(n_local)
        self.cross_batch = bool(cfg.cross_batch)
        self.per_batch_centering = bool(cfg.per_batch_centering)
        self.use_barlow = bool(cfg.barlow)
        k = int(cfg.out_dim)
        self.student_backbone = student_backbone
        self.student_head = DINOHead(
            feat_dim, k, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_bn, cfg.norm_last_layer
        )
        self.teacher_backbone = teacher_backbone
        self.teacher_backbone.load_state_dict(student_backbone.state_dict())
        self.teacher_head = copy.deepcopy(self.student_head)
        for p in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, k))
        self.register_buffer("batch_centers", torch.zeros(max(int(n_batches), 1), k))
        self.register_buffer("batch_shares", batch_shares.detach().float().clone())

    def student_modules(self) -> list[nn.Module]:
        """Student backbone and head."""
        return [self.student_backbone, self.student_head]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The student head's weight-normalised last layer."""
        return [p for p in self.student_head.last_layer.parameters() if p.requires_grad]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher backbone features (docs/design.md §7)."""
        return self.teacher_backbone(images)

    def teacher_temp(self, step_state: StepState) -> float:
        """τ_t for this step: the trainer's value, else the schedule at step_state.epoch."""
        if step_state.teacher_temp is not None:
            return float(step_state.teacher_temp)
        c = self.cfg
        return teacher_temperature(
            step_state.epoch, c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs
        )

    def _student_logits(self, views: list[torch.Tensor]) -> torch.Tensor:
        # Same-resolution views share one backbone call (globals, then locals), like DINO's
        # multi-crop wrapper; the head sees all of them at once.
        b = views[0].shape[0]
        feats = [self.student_backbone(torch.cat(views[:2]))]
        if len(views) > 2:
            feats.append(self.student_backbone(torch.cat(views[2:])))
        logits = self.student_head(torch.cat(feats))
        return logits.view(len(views), b, -1)

    def loss(self, batch: dict, step_state: StepState) -> tuple[torch.Tensor, dict[str, float]]:
        """DINO/CDCL loss on the views; updates the centre(s) in training mode."""
        views = batch["views"]
        b = views[0].shape[0]
        cfg = self.cfg
        with torch.no_grad():
            t_feat = self.teacher_backbone(torch.cat(views[:2]))
            t_logits = self.teacher_head(t_feat).view(2, b, -1)
        s_logits = self._student_logits(views)
        if self.per_batch_centering:
            ids = torch.stack([batch["batch_id"], batch["partner_batch_id"]]).to(t_logits.device)
            centre = self.batch_centers[ids]  # (2, B, K): each row its own image's batch centre
        else:
            centre = self.center
        t_centered = t_logits - centre
        tau_t = self.teacher_temp(step_state)
        pairs = dino_pairs(len(views), cfg.only_cross_domain)
        ce, q = dino_cross_entropy(s_logits, t_centered, cfg.student_temp, tau_t, pairs)
        log_k = math.log(cfg.out_dim)
        dino_term = ce / log_k
        logs: dict[str, float] = {"dino_loss": float(dino_term.detach()), "teacher_temp": tau_t}
        if self.use_barlow:
            bt = barlow_loss(
                t_centered, s_logits, cfg.student_temp, tau_t, pairs, cfg.barlow_lambda
            )
            w = cfg.barlow_weight
            main = (1 - w) * dino_term + w * bt
            logs["barlow_loss"] = float(bt.detach())
        else:
            main = dino_term
        if self.training:
            m = cfg.center_momentum
            flat = t_logits.reshape(2 * b, -1)
            if self.per_batch_centering:
                self.batch_centers.copy_(
                    update_batch_centers(
                        self.batch_centers, flat, ids.reshape(-1), m, self.batch_shares
                    )
                )
            else:
                self.center.copy_(update_center(self.center, flat, m))
        with torch.no_grad():
            ent = -(q * torch.log(q.clamp_min(1e-30))).sum(-1).mean()
        logs["teacher_entropy"] = float(ent)
        logs["teacher_entropy_rel"] = float(ent) / log_k
        probe, probe_logs = self.probe_step(t_feat[:b], batch["label"])
        logs.update(probe_logs)
        logs["loss"] = float(main.detach())
        return main + probe, logs

    @torch.no_grad()
    def after_step(self, step_state: StepState) -> None:
        """EMA of the student into the teacher with step_state.ema_momentum."""
        ema_update(self.teacher_backbone, self.student_backbone, step_state.ema_momentum)
        ema_update(self.teacher_head, self.student_head, step_state.ema_momentum)
