"""Validation during training: the online probe's accuracy on the validation images.

The probe (a linear classifier trained alongside the method on detached features) is scored on
plate-standardised centre views of the validation split, sharded over processes; the best score
selects ``best.pt``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cdcl.data.dataset_dir import Dataset
from cdcl.train import distributed as D
from cdcl.train.checkpoint import BEST, LAST
from cdcl.train.data import RunData, eval_images
from cdcl.train.run_state import Run


def validate(run: Run) -> list[str]:
    """Probe accuracy on the val split; returns the checkpoints to write (best if improved)."""
    p = run.progress
    if len(run.data.val_rows) == 0:
        return [LAST]
    acc = probe_accuracy(
        run.method,
        run.data.ds,
        run.data,
        run.views_cfg,
        run.cfg.train.batch_size,
        run.device,
        run.use_amp,
    )
    p.last_val = {
        "step": p.step,
        "epoch": p.epoch,
        "probe_acc": acc,
        "n_val": len(run.data.val_rows),
    }
    run.metrics.write({"kind": "val", **p.last_val})
    if p.best is None or acc > p.best:
        p.best, p.best_step = acc, p.step
        return [LAST, BEST]
    return [LAST]


@torch.no_grad()
def probe_accuracy(
    method: torch.nn.Module,
    ds: Dataset,
    data: RunData,
    views_cfg: object,
    batch_size: int,
    device: torch.device,
    use_amp: bool,
) -> float:
    """Online-probe accuracy on the validation images (sharded over processes, then summed)."""
    rows = data.val_rows[D.rank() :: D.world_size()]
    treat = ds.samples["treatment"].astype(str).to_numpy()
    labels = np.array([data.label_of[t] for t in treat[rows]], dtype=np.int64)
    method.eval()
    correct = 0
    try:
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            x = eval_images(ds, idx, views_cfg).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = method.probe(method.embed(x).float())
            pred = logits.argmax(1).cpu().numpy()
            correct += int((pred == labels[start : start + batch_size]).sum())
    finally:
        method.train()
    c, n = D.all_reduce_sum([correct, len(rows)], device)
    return c / n if n else math.nan
