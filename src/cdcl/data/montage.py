"""A PNG montage of a dataset: one row per batch, colour composites on one fixed scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdcl.atomic import atomic_path
from cdcl.data.dataset_dir import Dataset, open_dataset

# channel name -> RGB contribution; unknown channels are spread evenly over R, G, B
COLOURS = {
    "DNA": (0.0, 0.0, 1.0),
    "ER": (0.0, 0.5, 0.0),
    "RNA": (0.0, 0.5, 0.0),
    "AGP": (0.5, 0.0, 0.0),
    "Mito": (0.5, 0.0, 0.0),
}


def _colour_weights(channels: list[str]) -> np.ndarray:
    """(C, 3) weights mapping channels onto RGB."""
    w = np.zeros((len(channels), 3))
    spare = [i for i, c in enumerate(channels) if c not in COLOURS]
    for i, c in enumerate(channels):
        if c in COLOURS:
            w[i] = COLOURS[c]
    for j, i in enumerate(spare):
        w[i, j % 3] = 1.0
    return w / np.maximum(w.sum(axis=0, keepdims=True), 1e-9)


def composite(
    images: np.ndarray, channels: list[str], lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """RGB float images (n, H, W, 3) in [0, 1] from (n, C, H, W) with per-channel limits."""
    x = (images.astype(np.float32) - lo[None, :, None, None]) / (hi - lo)[None, :, None, None]
    x = np.clip(x, 0.0, 1.0)
    rgb = np.einsum("nchw,ck->nhwk", x, _colour_weights(channels).astype(np.float32))
    return np.clip(rgb, 0.0, 1.0)


def montage(dataset: Dataset | str | Path, out_png: str | Path, per_batch: int = 4) -> Path:
    """Save a PNG grid: one row per batch, ``per_batch`` images each, on one fixed scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    s = ds.samples
    batches = sorted(s["batch"].astype(str).unique())
    picks = []
    for b in batches:
        rows = s.index[s["batch"].astype(str) == b].to_numpy()
        # evenly spaced through the batch: a mix of plates, wells and treatments
        take = np.linspace(0, len(rows) - 1, num=min(per_batch, len(rows))).round().astype(int)
        picks.append(s.loc[rows[take], "image"].to_numpy())
    idx = np.concatenate(picks)
    imgs = ds.read_many(idx)
    # One intensity scale for every tile, so batch differences stay visible.
    lo = np.percentile(imgs, 1.0, axis=(0, 2, 3))
    hi = np.maximum(np.percentile(imgs, 99.5, axis=(0, 2, 3)), lo + 1.0)
    rgb = composite(imgs, ds.channels, lo, hi)
    n_cols = max(len(p) for p in picks)
    fig, axes = plt.subplots(
        len(batches), n_cols, figsize=(1.6 * n_cols + 0.6, 1.6 * len(batches)), squeeze=False
    )
    k = 0
    for r, b in enumerate(batches):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(picks[r]):
                ax.imshow(rgb[k], interpolation="nearest")
                row = s.loc[s["image"] == idx[k]].iloc[0]
                ax.set_title(str(row["treatment"]), fontsize=6)
                k += 1
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(b, fontsize=9)
    names = ", ".join(ds.channels)
    fig.suptitle(f"{ds.info.name}: one row per batch ({names}; fixed scale)", fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out_png, suffix=".png") as tmp:  # a failed write names out_png
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out_png
