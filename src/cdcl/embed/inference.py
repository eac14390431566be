"""Backbone embeddings of the evaluation (centre) view of a dataset's images.

Any backbone that maps a float tensor (n, C, H, W) to vectors (n, D) can be embedded: a trained
method's ``embed``, a randomly initialised timm network, or a hand-crafted feature function.
Images are read in batches with their plate's control standardisation (``Dataset.standardized``),
cropped to the evaluation view and embedded under ``torch.inference_mode``; features are float32.
The features become profile tables with :mod:`cdcl.profiles.table`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cdcl.data.views import center_view

ViewFn = Callable[[Any], Any]  # Tensor (C, H, W) or (n, C, H, W) -> same, cropped/resized


def center_crop_batch(images: Any, size: int | None) -> Any:
    """Centre crop of a batch (n, C, H, W) to ``size`` x ``size`` (no-op when None or too big)."""
    if size is None:
        return images
    h, w = images.shape[-2:]
    if size >= h and size >= w:
        return images
    top = max(0, (h - size) // 2)
    left = max(0, (w - size) // 2)
    return images[..., top : top + size, left : left + size]


def make_view_fn(views_cfg: Any | None = None, size: int | None = None) -> ViewFn:
    """The evaluation view applied to a batch (n, C, H, W).

    With a views config, ``cdcl.data.views.center_view`` (the trainer's evaluation view:
    optional resize, then centre crop) is applied; without one, a plain centre crop to ``size``.
    """
    if views_cfg is not None:
        return lambda batch: center_view(batch, views_cfg)  # handles (n, C, H, W)
    return lambda batch: center_crop_batch(batch, size)


def _as_module_callable(backbone: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Put nn.Modules in eval mode (BatchNorm/Dropout) before embedding."""
    if hasattr(backbone, "eval") and callable(backbone.eval):
        backbone.eval()
    return backbone


class _BatchReader(torch.utils.data.Dataset):
    """Loader items = whole batches: one vectorised store read + plate standardisation each.

    On the CPU the evaluation view is applied here too, so that loader workers overlap it with
    inference; on an accelerator the view runs on the device after the copy.
    """

    def __init__(self, dataset: Any, batches: list[np.ndarray], view_fn: ViewFn | None) -> None:
        self.dataset = dataset
        self.batches = batches
        self.view_fn = view_fn

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self.dataset.standardized(self.batches[i]))
        return self.view_fn(x) if self.view_fn is not None else x


def _loader(
    dataset: Any,
    batches: list[np.ndarray],
    view_fn: ViewFn | None,
    workers: int,
    pin: bool,
) -> torch.utils.data.DataLoader:
    """An in-order DataLoader over pre-cut batches with ``workers`` processes and prefetch."""
    workers = max(0, int(workers))
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"prefetch_factor": 4, "multiprocessing_context": "fork"}
    return torch.utils.data.DataLoader(
        _BatchReader(dataset, batches, view_fn),
        batch_size=None,  # items are batches already
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        **extra,
    )


def _device(device: str | torch.device) -> torch.device:
    """A torch.device, ``auto`` meaning CUDA when available."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def iter_embeddings(
    backbone: Callable[[Any], Any],
    dataset: Any,
    batches: list[np.ndarray],
    view_fn: ViewFn | None = None,
    *,
    workers: int = 0,
    device: str | torch.device = "cpu",
    bar: Any = None,
) -> Iterator[np.ndarray]:
    """Float32 features (len(batch), D) of each batch of image indices, in order.

    Inference runs under ``torch.inference_mode``, with bf16 autocast on CUDA (float32 on CPU).
    """
    dev = _device(device)
    fn = _as_module_callable(backbone)
    if hasattr(fn, "to"):
        fn.to(dev)
    on_cpu = dev.type == "cpu"
    loader = _loader(dataset, batches, view_fn if on_cpu else None, workers, pin=dev.type == "cuda")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda"
        else contextlib.nullcontext()
    )
    with torch.inference_mode():
        for x in loader:
            x = x.to(dev, non_blocking=True)
            if not on_cpu and view_fn is not None:
                x = view_fn(x)
            with autocast:
                feats = fn(x)
            if isinstance(feats, tuple | list):  # some modules return (features, extra)
                feats = feats[0]
            out = feats.reshape(feats.shape[0], -1).float().cpu().numpy()
            if bar is not None:
                bar.update(len(out))
            yield out


def cut_batches(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive batches of at most ``batch_size`` indices."""
    b = max(1, int(batch_size))
    return [indices[a : a + b] for a in range(0, len(indices), b)]


def embed_images(
    backbone: Callable[[Any], Any],
    dataset: Any,
    indices: np.ndarray | list[int] | None = None,
    view_fn: ViewFn | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "embed",
    workers: int = 0,
) -> np.ndarray:
    """Embed the centre view of each image: float32 array (len(indices), D), in index order."""
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    bar = tqdm(
        total=len(idx), desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True
    )
    out: np.ndarray | None = None
    start = 0
    for feats in iter_embeddings(
        backbone,
        dataset,
        cut_batches(idx, batch_size),
        view_fn,
        workers=workers,
        device=device,
        bar=bar,
    ):
        if out is None:  # allocate once the feature width is known
            out = np.empty((len(idx), feats.shape[1]), dtype=np.float32)
        out[start : start + len(feats)] = feats
        start += len(feats)
    bar.close()
    if out is None:
        return np.zeros((0, 0), dtype=np.float32)
    return out
