"""The method interface the trainer uses, without knowing which method it runs.

A method owns its networks and its loss. The trainer:

    main_loss, logs = method.loss(batch, step_state)   # includes the probe's loss (see below)
    main_loss.backward()
    if step_state.freeze_last_layer: zero grads of method.last_layer_parameters()
    clip + step the main optimiser over method.param_groups(wd) (= student_parameters())
    step the probe optimiser over method.probe.parameters()
    method.after_step(step_state)                      # EMA teacher update

Online probe: ``nn.Linear(D, n_classes)`` trained on *detached* ``embed`` features of view A
(teacher backbone for the DINO family, online backbone for BYOL, the backbone for supervised)
with the treatment label. Its cross-entropy is added to the returned loss so one backward
serves both optimisers; because its input is detached, no gradient reaches any backbone
(tested). Logs report the main loss alone as "loss" and the probe's as "probe_loss".

Centres (DINO family) are updated inside ``loss()`` after the forward pass, under no_grad, and
only in training mode (``method.train()``); they are buffers, so ``state_dict()`` holds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdcl.errors import ConfigError

METHOD_NAMES = ("supervised", "dino", "byol", "dino_cb", "byol_cb", "cdcl", "cdcl_same_batch")
# name -> (cross_batch, per_batch_centering, barlow); cross_batch: view B from a partner image.
_DEFAULT_FLAGS = {
    "supervised": (False, False, False),
    "dino": (False, False, False),
    "byol": (False, False, False),
    "dino_cb": (True, False, False),
    "byol_cb": (True, False, False),
    "cdcl": (True, True, True),
    "cdcl_same_batch": (True, True, True),
}
# Which partner (cdcl.data.pairing.PAIRINGS) a method draws by default: another batch, except
# for CDCL-same-batch, the control that draws it from the image's own batch.
_DEFAULT_PAIRING = {"cdcl_same_batch": "same_batch"}


@dataclass
class MethodConfig:
    """Method name and loss/head settings; the switches and the pairing default from the name."""

    name: str = "dino"
    out_dim: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_bn: bool = False
    norm_last_layer: bool = True
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 10
    center_momentum: float = 0.9
    barlow_weight: float = 0.75
    barlow_lambda: float = 0.95
    only_cross_domain: bool = False
    per_batch_centering: bool | None = None
    barlow: bool | None = None
    cross_batch: bool | None = None  # view B from a partner image (which one: ``pairing``)
    # cross_batch: the partner is from another batch; same_batch: from the image's own batch
    pairing: Literal["cross_batch", "same_batch"] | None = None
    byol_proj_hidden: int = 4096
    byol_proj_dim: int = 256
    byol_pred_hidden: int = 4096

    def resolved(self) -> MethodConfig:
        """A copy with the switches (cross_batch, per_batch_centering, barlow, pairing) filled."""
        if self.name not in METHOD_NAMES:
            raise ConfigError(
                f"method.name `{self.name}` unknown; use one of {', '.join(METHOD_NAMES)}"
            )
        cb, pbc, bt = _DEFAULT_FLAGS[self.name]
        cross_batch = cb if self.cross_batch is None else bool(self.cross_batch)
        pairing = self.pairing or _DEFAULT_PAIRING.get(self.name, "cross_batch")
        if pairing == "same_batch" and not cross_batch:
            raise ConfigError(
                "method.pairing `same_batch` needs a partner image: set method.cross_batch=true"
            )
        return replace(
            self,
            cross_batch=cross_batch,
            pairing=pairing,
            per_batch_centering=pbc
            if self.per_batch_centering is None
            else bool(self.per_batch_centering),
            barlow=bt if self.barlow is None else bool(self.barlow),
        )


@dataclass
class StepState:
    """What the trainer tells the method each step.

    ``teacher_temp`` None: the method computes τ_t from ``epoch`` (pure schedule
    ``losses.teacher_temperature``); a float overrides it.
    """

    step: int = 0
    epoch: float = 0.0
    ema_momentum: float = 0.996
    freeze_last_layer: bool = False
    teacher_temp: float | None = None


class Method(nn.Module):
    """Base class: networks + loss. Subclasses set n_views, view_kind, probe and implement loss."""

    n_views: int = 1
    view_kind: str = "single"
    cross_batch: bool = False

    def __init__(self, cfg: MethodConfig, feat_dim: int, n_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        # Which partner the data draws when cross_batch (cdcl.data.pairing.PAIRINGS).
        self.pairing: str = cfg.pairing or "cross_batch"
        self.feat_dim = int(feat_dim)
        self.n_classes = int(n_classes)
        self.probe = nn.Linear(self.feat_dim, max(self.n_classes, 1))

    # --- interface -------------------------------------------------------------------------
    def loss(
        self, batch: dict, step_state: StepState
    ) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover - abstract
        """Main loss (+ the detached probe's loss) and scalar logs."""
        raise NotImplementedError

    def forward(self, batch: dict, step_state: StepState) -> tuple[torch.Tensor, dict[str, float]]:
        """Same as :meth:`loss`, so the method can be wrapped in DistributedDataParallel."""
        return self.loss(batch, step_state)

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Backbone features (N, D) used for evaluation (never the projection head)."""
        raise NotImplementedError

    def student_modules(self) -> list[nn.Module]:  # pragma: no cover - abstract
        """Modules trained by the main optimiser."""
        raise NotImplementedError

    def student_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the main optimiser (never the probe or an EMA teacher)."""
        for m in self.student_modules():
            for p in m.parameters():
                if p.requires_grad:
                    yield p

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weights decayed; biases and 1-d (norm, gain) parameters not."""
        decay, no_decay = [], []
        for m in self.student_modules():
            for name, p in m.named_parameters():
                if not p.requires_grad:
                    continue
                (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
        return [
            {"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients the trainer zeroes while freeze_last_layer (epoch 1)."""
        return []

    def after_step(self, step_state: StepState) -> None:
        """Post-optimiser-step work (EMA teacher update); nothing by default."""

    # --- helpers ---------------------------------------------------------------------------
    def probe_step(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Probe cross-entropy on detached features (no gradient can reach the backbone)."""
        logits = self.probe(features.detach().float())
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"probe_loss": float(loss.detach()), "probe_acc": float(acc)}


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1−m)·student over matching parameters (buffers are left alone)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
