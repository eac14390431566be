"""Partner index for -CB methods, CDCL and its same-batch control (docs/design.md §5).

Two pairing modes (``PAIRINGS``):

- ``cross_batch`` (-CB methods, CDCL): for a training image A (treatment t, batch b) the partner
  B is drawn uniformly among the training images with treatment t in a batch other than b
  (uniform over images, so batches with more images of t are drawn more often). When t has no
  image outside b, B falls back to another image of the same batch (A itself only when it is the
  only image of t) and the fallback is counted.
- ``same_batch`` (CDCL-same-batch, the control that isolates the cross-batch constraint): B is
  drawn uniformly among the *other* training images with treatment t in batch b. When A is the
  only image of t in b, B is A itself and the fallback is counted.

Controls pair with controls like any other treatment.

Everything is precomputed once: training rows are sorted by (treatment, batch), so the images
of a treatment and, within it, those of a batch are contiguous ranges; a draw is then one
uniform integer over the treatment's range with the own batch's range cut out (cross-batch), or
over the own batch's range with the image cut out (same-batch). No table scans.
"""

from __future__ import annotations

import numpy as np

PAIRINGS = ("cross_batch", "same_batch")


class PartnerIndex:
    """treatment → batch → image indices over the training rows, for O(1) partner draws."""

    def __init__(
        self,
        treatments: np.ndarray,
        batches: np.ndarray,
        indices: np.ndarray,
        pairing: str = "cross_batch",
    ) -> None:
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing `{pairing}` unknown; use one of {', '.join(PAIRINGS)}")
        self.pairing = pairing
        treatments = np.asarray(treatments).astype(str)
        batches = np.asarray(batches).astype(str)
        indices = np.asarray(indices, dtype=np.int64)
        if not (len(treatments) == len(batches) == len(indices)):
            raise ValueError("treatments, batches and indices must have the same length")
        t_names, t_code = np.unique(treatments, return_inverse=True)
        b_names, b_code = np.unique(batches, return_inverse=True)
        order = np.lexsort((indices, b_code, t_code))
        self.sorted_images = indices[order]
        t_sorted, b_sorted = t_code[order], b_code[order]
        n = len(indices)
        # Position of every image in the sorted order (image index -> position).
        size = int(indices.max()) + 1 if n else 0
        self._pos = np.full(size, -1, dtype=np.int64)
        self._pos[self.sorted_images] = np.arange(n)
        # Range of each image's treatment [t_start, t_end) and of its (treatment, batch) group.
        pos = np.arange(n)
        t_change = np.r_[True, t_sorted[1:] != t_sorted[:-1]] if n else np.zeros(0, bool)
        g_change = t_change | np.r_[True, b_sorted[1:] != b_sorted[:-1]] if n else np.zeros(0, bool)
        t_starts = np.flatnonzero(t_change)
        g_starts = np.flatnonzero(g_change)
        self._t_start = t_starts[np.searchsorted(t_starts, pos, side="right") - 1]
        self._t_end = np.r_[t_starts[1:], n][np.searchsorted(t_starts, pos, side="right") - 1]
        gi = np.searchsorted(g_starts, pos, side="right") - 1
        self._g_start = g_starts[gi]
        self._g_end = np.r_[g_starts[1:], n][gi]
        self.treatment_names = t_names
        self.batch_names = b_names
        n_other = (self._t_end - self._t_start) - (self._g_end - self._g_start)
        alone = (self._g_end - self._g_start) == 1
        # Treatments with some image that has no partner of the pairing's kind.
        no_partner = alone if pairing == "same_batch" else n_other == 0
        self.fallback_treatments: list[str] = sorted(set(t_names[t_sorted[no_partner]].tolist()))
        self.fallback_count = 0
        self.n_draws = 0

    def __len__(self) -> int:
        return len(self.sorted_images)

    def _positions(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        bad = (idx < 0) | (idx >= len(self._pos))
        pos = np.where(bad, -1, self._pos[np.clip(idx, 0, max(len(self._pos) - 1, 0))])
        if (pos < 0).any():
            raise KeyError(f"image {int(idx[np.argmax(pos < 0)])} is not a training row")
        return pos

    def partners(self, idx: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised draw: partner image indices and a fell-back mask for image indices idx."""
        pos = self._positions(idx)
        ts, te, gs, ge = self._t_start[pos], self._t_end[pos], self._g_start[pos], self._g_end[pos]
        n_before = gs - ts
        n_other = (te - ts) - (ge - gs)
        n_same = ge - gs
        # Same-batch pairing falls back (to the image itself) only when the image is alone.
        fell_back = n_same == 1 if self.pairing == "same_batch" else n_other == 0
        u = rng.random(len(pos))
        # Cross-batch: uniform over the treatment's range with the own group's range removed.
        k = np.floor(u * np.maximum(n_other, 1)).astype(np.int64)
        cross = np.where(k < n_before, ts + k, ge + (k - n_before))
        # Same batch (the fallback, or the pairing): the own group without the image itself
        # (itself if alone).
        k2 = np.floor(u * np.maximum(n_same - 1, 1)).astype(np.int64)
        same = gs + k2
        same = np.where((n_same > 1) & (same >= pos), same + 1, same)
        same = np.where(n_same > 1, same, pos)
        out = same if self.pairing == "same_batch" else np.where(fell_back, same, cross)
        self.fallback_count += int(fell_back.sum())
        self.n_draws += len(pos)
        return self.sorted_images[out], fell_back

    def partner(self, i: int, rng: np.random.Generator) -> tuple[int, bool]:
        """Partner image index of image i and whether it fell back (see the module docstring)."""
        j, fb = self.partners(np.array([i]), rng)
        return int(j[0]), bool(fb[0])
