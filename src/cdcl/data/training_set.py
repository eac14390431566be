"""The training dataset: image A, its cross-batch partner B and their augmented views.

Per item k (training row ``rows[k]``): a fresh RNG ``np.random.default_rng([seed, epoch, k])``
draws the partner (when ``cross_batch``) and seeds a ``torch.Generator`` for the views, so a
resumed run (same seed, ``set_epoch(epoch)``) reproduces exactly the same partners and views,
whatever the worker count or order.

Intensities: pixels are divided by the dtype maximum (255 or 65535) to [0, 1]; the views'
jitter x_c <- a_c·x_c + b_c acts there (b_c in units of the plate's control std by default,
see ``ViewsConfig.jitter_offset_unit``); each view is then standardised with its own image's
plate control mean/std divided by the same maximum, i.e. (x' - mean/M) / (std/M), which for an
unjittered view equals ``Dataset.standardized``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from cdcl.data.pairing import PartnerIndex
from cdcl.data.views import VIEW_KINDS, ViewsConfig, make_views
from cdcl.errors import CdclError


class TrainingSet(TorchDataset):
    """Items {"views", "label", "batch_id", "partner_batch_id", "index", "fell_back"}."""

    def __init__(
        self,
        dataset: Any,
        rows: np.ndarray,
        label_of: dict[str, int],
        batch_of: dict[str, int],
        views_cfg: ViewsConfig,
        view_kind: str,
        cross_batch: bool,
        seed: int,
    ) -> None:
        if view_kind not in VIEW_KINDS:
            raise CdclError(f"view kind `{view_kind}` unknown; use one of {', '.join(VIEW_KINDS)}")
        self.dataset = dataset
        self.rows = np.asarray(rows, dtype=np.int64)
        if len(self.rows) == 0:
            raise CdclError("training set is empty: no image has split `train`")
        s = dataset.samples
        self._treatment = s["treatment"].astype(str).to_numpy()
        self._batch = s["batch"].astype(str).to_numpy()
        missing_t = sorted(set(self._treatment[self.rows]) - set(label_of))
        if missing_t:
            raise CdclError(f"treatment `{missing_t[0]}` of a training image has no class label")
        missing_b = sorted(set(self._batch[self.rows]) - set(batch_of))
        if missing_b:
            raise CdclError(f"batch `{missing_b[0]}` of a training image has no batch index")
        # Per-image label and batch ids as arrays: no dict/pandas work per item.
        n = len(s)
        self._label = np.full(n, -1, dtype=np.int64)
        self._batch_id = np.full(n, -1, dtype=np.int64)
        self._label[self.rows] = [label_of[t] for t in self._treatment[self.rows]]
        self._batch_id[self.rows] = [batch_of[b] for b in self._batch[self.rows]]
        size = dataset.image_size[0]
        self.views_cfg = views_cfg.resolved(views_cfg.resize or size)
        self.view_kind = view_kind
        self.cross_batch = bool(cross_batch)
        self.seed = int(seed)
        self.epoch = 0
        self.scale = float(np.iinfo(np.dtype(dataset.info.dtype)).max)
        self.partner_index = (
            PartnerIndex(self._treatment[self.rows], self._batch[self.rows], self.rows)
            if self.cross_batch
            else None
        )

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose partners and views items are drawn from."""
        self.epoch = int(epoch)

    @property
    def fallback_count(self) -> int:
        """Partner draws that fell back to the same batch in this process (sum 'fell_back' for all)."""
        return 0 if self.partner_index is None else self.partner_index.fallback_count

    @property
    def fallback_treatments(self) -> list[str]:
        """Treatments that cannot be paired across batches (present in one batch only)."""
        return [] if self.partner_index is None else list(self.partner_index.fallback_treatments)

    def _load(self, i: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        img = torch.from_numpy(self.dataset.read(i).astype(np.float32)) / self.scale
        mean, std = self.dataset.plate_mean_std([i])
        norm = (
            torch.from_numpy(mean[0].astype(np.float32)) / self.scale,
            torch.from_numpy(std[0].astype(np.float32)) / self.scale,
        )
        return img, norm

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(self.rows[k])
        rng = np.random.default_rng([self.seed, self.epoch, int(k)])
        j, fell_back = i, False
        if self.partner_index is not None:
            j, fell_back = self.partner_index.partner(i, rng)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        img_a, norm_a = self._load(i)
        img_b, norm_b = (img_a, norm_a) if j == i else self._load(j)
        views = make_views(
            img_a, img_b, self.views_cfg, self.view_kind, gen, norm_a=norm_a, norm_b=norm_b
        )
        return {
            "views": views,
            "label": int(self._label[i]),
            "batch_id": int(self._batch_id[i]),
            "partner_batch_id": int(self._batch_id[j]),
            "index": i,
            "partner_index": j,
            "fell_back": bool(fell_back),
        }
