"""The training dataset: image A, its partner B and the random draws of their views.

Per item k (training row ``rows[k]``): a fresh RNG ``np.random.default_rng([seed, epoch, k])``
draws the partner (when ``cross_batch``: from another batch, or from A's own batch with
``pairing="same_batch"``, see ``cdcl.data.pairing``) and seeds a ``torch.Generator`` from which
every random choice of the item's views is drawn (``draw_view_params``), so a resumed run (same
seed, ``set_epoch(epoch)``) reproduces exactly the same partners and views, whatever the worker
count or order.

Items carry the raw pixels (A and B as stored, uint8/uint16), their plate control statistics
and the drawn parameters; :meth:`TrainingSet.collate` stacks a batch of them and the views are
then made for the whole batch at once (``batch_views``): in the collate step, i.e. in the
loader workers, when ``views_in_loader`` (training on the CPU: the views overlap with the step),
else by :meth:`TrainingSet.finish` on the training device.

Intensities: the views' jitter x_c <- a_c·x_c + b_c acts on pixels divided by the dtype maximum
(255 or 65535), b_c in units of the plate's control std by default (see
``ViewsConfig.jitter_offset_unit``); each view is then standardised with its own image's plate
control mean/std, so an unjittered full-image view equals ``Dataset.standardized``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import default_collate

from cdcl.data.pairing import PartnerIndex
from cdcl.data.views import VIEW_KINDS, ViewsConfig, batch_views, draw_view_params
from cdcl.errors import CdclError

# Raw fields of an item that the views are made from (dropped from a batch once they are).
RAW_KEYS = ("images", "plate_mean", "plate_std", "view_params")


class TrainingSet(TorchDataset):
    """Items {"images", "plate_mean", "plate_std", "view_params", "label", "batch_id", ...}.

    Batches from :meth:`collate` (then :meth:`finish`) carry "views" instead of the raw fields.
    """

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
        views_in_loader: bool = True,
        pairing: str = "cross_batch",
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
        self.cross_batch = bool(cross_batch)  # whether B is a partner image (else A itself)
        self.pairing = pairing  # which partner: cross_batch or same_batch (PAIRINGS)
        self.seed = int(seed)
        self.epoch = 0
        self.value_max = float(np.iinfo(np.dtype(dataset.info.dtype)).max)
        side = int(self.views_cfg.resize) if self.views_cfg.resize else None
        self.image_hw = (side, side) if side else tuple(int(v) for v in dataset.image_size)
        self.n_channels = len(dataset.channels)
        self.views_in_loader = bool(views_in_loader)
        self.partner_index = (
            PartnerIndex(self._treatment[self.rows], self._batch[self.rows], self.rows, pairing)
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
        """Partner draws that fell back in this process (sum 'fell_back' for all processes)."""
        return 0 if self.partner_index is None else self.partner_index.fallback_count

    @property
    def fallback_treatments(self) -> list[str]:
        """Treatments with an image that has no partner of the pairing's kind (see pairing)."""
        return [] if self.partner_index is None else list(self.partner_index.fallback_treatments)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = int(self.rows[k])
        rng = np.random.default_rng([self.seed, self.epoch, int(k)])
        j, fell_back = i, False
        if self.partner_index is not None:
            j, fell_back = self.partner_index.partner(i, rng)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        params = draw_view_params(
            self.views_cfg, self.view_kind, self.image_hw, self.n_channels, gen
        )
        if j == i:
            img = self.dataset.read(i)
            images = np.stack([img, img])
        else:
            images = self.dataset.read_many([i, j])
        mean, std = self.dataset.plate_mean_std([i, j])
        return {
            "images": images,
            "plate_mean": mean,
            "plate_std": std,
            "view_params": params,
            "label": int(self._label[i]),
            "batch_id": int(self._batch_id[i]),
            "partner_batch_id": int(self._batch_id[j]),
            "index": i,
            "partner_index": j,
            "fell_back": bool(fell_back),
        }

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack items into a batch; with ``views_in_loader``, make its views here (CPU)."""
        batch = default_collate(items)
        if self.views_in_loader:
            batch = self.finish(batch, torch.device("cpu"))
        return batch

    def finish(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The batch with its views made on ``device`` in place of the raw fields (no-op if made)."""
        if "views" in batch:
            return batch
        images = batch["images"].to(device, non_blocking=True)
        views = batch_views(
            images,
            batch["plate_mean"],
            batch["plate_std"],
            batch["view_params"],
            self.views_cfg,
            self.view_kind,
            self.value_max,
        )
        out = {k: v for k, v in batch.items() if k not in RAW_KEYS}
        out["views"] = views
        return out

    def batch(
        self, ks: list[int] | np.ndarray, device: torch.device | None = None
    ) -> dict[str, Any]:
        """Items ``ks`` as one finished batch (views on ``device``, default CPU)."""
        raw = default_collate([self[int(k)] for k in ks])
        return self.finish(raw, device or torch.device("cpu"))
