"""The optimisers of a run and what happens between a loss and the next step.

AdamW over the method's parameter groups (weight decay only where the group asks for it),
the online probe on its own optimiser (its gradients never reach the backbone), gradients
averaged over processes, clipping of the student's gradients, and the DINO head's last layer
frozen while the schedule says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cdcl.config import TrainConfig
from cdcl.train import distributed as D


@dataclass
class Optimizers:
    """The method's optimiser, the probe's, and the parameter lists a step needs."""

    main: torch.optim.Optimizer
    probe: torch.optim.Optimizer
    student_params: list[torch.nn.Parameter]  # clipped
    last_layer: list[torch.nn.Parameter]  # frozen early on
    all_params: list[torch.nn.Parameter]  # averaged over processes

    def set_schedule(self, values: dict[str, Any]) -> None:
        """Learning rate and weight decay of this step (decay only on groups that take it)."""
        for g in self.main.param_groups:
            g["lr"] = values["lr"]
            g["weight_decay"] = values["wd"] if g.get("decay", True) else 0.0

    def zero_grad(self) -> None:
        """Drop the gradients of both optimisers."""
        self.main.zero_grad(set_to_none=True)
        self.probe.zero_grad(set_to_none=True)

    def step(self, clip_grad: float | None, freeze_last_layer: bool) -> float | None:
        """Average gradients over processes, clip, freeze, step; returns the pre-clip norm."""
        D.all_reduce_mean_grads(self.all_params)
        grad_norm = None
        if clip_grad:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student_params, clip_grad))
        if freeze_last_layer:
            for p in self.last_layer:
                p.grad = None
        self.main.step()
        self.probe.step()
        return grad_norm


def build_optimizers(method: torch.nn.Module, t: TrainConfig) -> Optimizers:
    """AdamW over the method's groups (probe excluded) and the probe's SGD or AdamW."""
    probe_params = list(method.probe.parameters())
    probe_ids = {id(p) for p in probe_params}
    groups = []
    for g in method.param_groups(t.weight_decay):
        params = [p for p in g["params"] if id(p) not in probe_ids and p.requires_grad]
        if params:
            decay = float(g.get("weight_decay", 0.0)) > 0
            groups.append({**g, "params": params, "decay": decay})
    main = torch.optim.AdamW(groups, lr=t.lr)
    if t.probe_optimizer == "sgd":
        probe: torch.optim.Optimizer = torch.optim.SGD(probe_params, lr=t.probe_lr, momentum=0.9)
    else:
        probe = torch.optim.AdamW(probe_params, lr=t.probe_lr, weight_decay=0.0)
    return Optimizers(
        main=main,
        probe=probe,
        student_params=[p for p in method.student_parameters() if p.requires_grad],
        last_layer=list(method.last_layer_parameters()),
        all_params=[p for p in method.parameters() if p.requires_grad],
    )
