"""Multi-crop views and augmentations, computed for a whole batch at once (docs/design.md §4).

Augmentations: random resized crops, horizontal/vertical flips, random 90° rotations and a
per-channel intensity jitter ``x_c <- a_c * x_c + b_c`` (a_c ~ N(1, s_a²), b_c ~ N(0, s_b²)),
followed by plate standardisation. No colour jitter, grayscale, solarise or blur: they mean
nothing for fluorescence channels.

Two stages, so that the cheap, random part runs where the items are read and the pixel work
runs where it is cheapest:

1. :func:`draw_view_params` draws every random choice of one item's views (crop boxes, flips,
   rotation, jitter gains and offsets) from that item's generator: small tensors, made in the
   data-loader workers.
2. :func:`batch_views` turns a batch of raw images (uint8/uint16 as stored), their plate
   statistics and the drawn parameters into the views with torch ops, on any device: on the
   training GPU, or in the loader workers when training on the CPU.

Intensity units: the jitter acts on intensities scaled to [0, 1] by the dtype maximum M, and
each view is then standardised with its own image's plate control mean/std (raw units). Both are
affine per channel and commute with resampling (its weights sum to 1), so they are applied as
one multiply-add on the resampled view: with r the view in raw units,
``(a·r/M + b·u - mean/M) / (std/M) = r·a/std + (b·u·M - mean)/std``, where the offset unit u is
std/M ("plate_std") or 1 ("range"). With a = 1 and b = 0 this is ``Dataset.standardized``.

Resampling, antialiased bilinear (``F.interpolate(antialias=True)``'s weights) in both of two
interchangeable ways: on a CPU core, crop by crop ("slices": each crop is sliced, no copy, and
resized, into one batch tensor per view; measured in benchmarks/bench_views.py); on a GPU,
every crop of a view at once ("matmul": two batched matrix products with the resampling
weights, a few kernels per view instead of several per crop). Zoom-out (area scale > 1): the
crop window may be larger than the image; pixels outside it are filled by mirror reflection
(``reflect`` without repeating the edge), so a scale of 1.1 shows the whole image plus a
mirrored margin, i.e. a slight zoom-out, as in the reference implementation's intent.

View order (DINO family, 2 + 2·n_local views): global(A), global(B), n_local × local(A),
n_local × local(B). BYOL family: global(A), global(B). Single: global(A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

VIEW_KINDS = ("dino", "byol", "single")


@dataclass
class ViewsConfig:
    """Augmentation settings; crop sizes None = scale with the image (224/256, 112/256)."""

    resize: int | None = None
    global_size: int | None = None
    local_size: int | None = None
    n_local: int = 3
    global_scale: tuple[float, float] = (0.9, 1.1)
    local_scale: tuple[float, float] = (0.3, 0.5)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rot90_p: float = 0.5
    jitter_p_global: float = 0.8
    jitter_p_local: float = 0.5
    jitter_gain_std: float = 0.1
    jitter_offset_std: float = 0.1
    # Unit of the additive jitter b_c: "plate_std" = the plate's control std of that channel
    # (independent of bit depth and exposure); "range" = the [0, 1] intensity range (the
    # seed's, right for 8-bit images that fill their range). On 16-bit fields whose signal
    # sits in the bottom few % of the range, "range" offsets of std 0.1 are ~3 control stds
    # per channel and per view, and DINO collapsed to the uniform solution (measured).
    jitter_offset_unit: str = "plate_std"

    def resolved(self, image_size: int) -> ViewsConfig:
        """A copy with crop sizes filled in from the (resized) image size, as the reference implementation scales."""
        base = int(self.resize) if self.resize else int(image_size)
        g = self.global_size or max(1, round(base * 224 / 256))
        loc = self.local_size or max(1, round(base * 112 / 256))
        return replace(
            self,
            global_size=int(g),
            local_size=int(loc),
            global_scale=tuple(float(x) for x in self.global_scale),
            local_scale=tuple(float(x) for x in self.local_scale),
            crop_ratio=tuple(float(x) for x in self.crop_ratio),
        )

    def n_views(self, kind: str) -> int:
        """Number of views :func:`batch_views` returns for a view kind."""
        return {"dino": 2 + 2 * self.n_local, "byol": 2, "single": 1}[kind]


def view_slots(cfg: ViewsConfig, kind: str) -> list[tuple[int, bool]]:
    """(source, is_global) of each view in the order of docs/design.md §4; source 0 = image A, 1 = its partner B."""
    if kind not in VIEW_KINDS:
        raise ValueError(f"view kind {kind!r}: expected one of {VIEW_KINDS}")
    if kind == "single":
        return [(0, True)]
    slots = [(0, True), (1, True)]
    if kind == "dino":
        slots += [(0, False)] * cfg.n_local + [(1, False)] * cfg.n_local
    return slots


def _uniform(gen: torch.Generator | None, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _draw_box(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a window of area scale·h·w and aspect ratio in ``ratio``.

    Windows larger than the image (zoom-out) are placed so that the image stays inside them.
    """
    area = h * w * _uniform(gen, float(scale[0]), float(scale[1]))
    r = math.exp(_uniform(gen, math.log(ratio[0]), math.log(ratio[1])))
    cw = max(1, int(round(math.sqrt(area * r))))
    ch = max(1, int(round(math.sqrt(area / r))))
    top = int(math.floor(_uniform(gen, min(0, h - ch), max(0, h - ch) + 1 - 1e-9)))
    left = int(math.floor(_uniform(gen, min(0, w - cw), max(0, w - cw) + 1 - 1e-9)))
    return top, left, ch, cw


def draw_view_params(
    cfg: ViewsConfig,
    kind: str,
    image_hw: tuple[int, int],
    n_channels: int,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Every random choice of one item's views, drawn from ``gen`` in view order.

    Returns per view (V = number of views): ``box`` (V, 4) int64 = top, left, height, width of
    the crop window in pixels of the (resized) image, possibly outside it for zoom-out;
    ``flip`` (V, 2) bool = horizontal, vertical; ``rot90`` (V,) int64 = quarter turns 0-3;
    ``jitter`` (V,) bool; ``gain`` and ``offset`` (V, C) float32 = a_c and b_c (1 and 0 when
    the view is not jittered; b_c in ``cfg.jitter_offset_unit`` units).
    """
    slots = view_slots(cfg, kind)
    h, w = image_hw
    boxes, flips, rots, jit = [], [], [], []
    gain = torch.ones(len(slots), n_channels)
    offset = torch.zeros(len(slots), n_channels)
    for v, (_, is_global) in enumerate(slots):
        scale = cfg.global_scale if is_global else cfg.local_scale
        boxes.append(_draw_box(h, w, scale, cfg.crop_ratio, gen))
        flips.append((_uniform(gen) < cfg.flip_p, _uniform(gen) < cfg.flip_p))
        k = 0
        if _uniform(gen) < cfg.rot90_p:
            k = 1 + int(torch.randint(0, 3, (), generator=gen))
        rots.append(k)
        p = cfg.jitter_p_global if is_global else cfg.jitter_p_local
        jit.append(_uniform(gen) < p)
        if jit[-1]:
            gain[v] = 1.0 + cfg.jitter_gain_std * torch.randn(n_channels, generator=gen)
            offset[v] = cfg.jitter_offset_std * torch.randn(n_channels, generator=gen)
    return {
        "box": torch.tensor(boxes, dtype=torch.int64).reshape(len(slots), 4),
        "flip": torch.tensor(flips, dtype=torch.bool).reshape(len(slots), 2),
        "rot90": torch.tensor(rots, dtype=torch.int64),
        "jitter": torch.tensor(jit, dtype=torch.bool),
        "gain": gain,
        "offset": offset,
    }


def _reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Map any integer coordinates into [0, n) by mirror reflection (edge not repeated)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def _crop(img: torch.Tensor, top: int, left: int, ch: int, cw: int) -> torch.Tensor:
    """Window of (C, H, W) ``img``: a slice inside the image, mirror-filled where outside."""
    h, w = img.shape[-2:]
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return img[:, top : top + ch, left : left + cw]
    # Reflection padding of the part inside the image (fast) when the margins allow it; else
    # fold every coordinate back into the image (any margin).
    t, lft = max(top, 0), max(left, 0)
    b, r = min(top + ch, h), min(left + cw, w)
    pads = (lft - left, left + cw - r, t - top, top + ch - b)
    if max(pads[:2]) < r - lft and max(pads[2:]) < b - t:
        return F.pad(img[None, :, t:b, lft:r], pads, mode="reflect")[0]
    rows = _reflect_index(torch.arange(top, top + ch, device=img.device), h)
    cols = _reflect_index(torch.arange(left, left + cw, device=img.device), w)
    return img.index_select(1, rows).index_select(2, cols)


def _empty(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An uninitialised float32 tensor; in a loader worker, in shared memory (as default_collate
    does), so that handing the batch to the training process copies nothing."""
    if device.type != "cpu" or get_worker_info() is None:
        return torch.empty(shape, device=device)
    elem = torch.empty(0)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(shape)


def _to_float(img: torch.Tensor) -> torch.Tensor:
    """float32 copy of a stored (uint8/uint16) image; numpy converts 16-bit ints 2x faster on CPU."""
    if img.device.type == "cpu":
        return torch.from_numpy(img.numpy().astype(np.float32))
    return img.to(torch.float32)


def _dihedral(flip_h: bool, flip_v: bool, k: int) -> tuple[list[int], bool]:
    """Flips then ``rot90(k)`` as one flip (dims) followed by an optional transpose."""
    dims = []
    if flip_v ^ (k in (2, 3)):
        dims.append(-2)
    if flip_h ^ (k in (1, 2)):
        dims.append(-1)
    return dims, k % 2 == 1


def view_affine(
    params: dict[str, torch.Tensor],
    plate_mean: torch.Tensor,
    plate_std: torch.Tensor,
    cfg: ViewsConfig,
    kind: str,
    value_max: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per view and channel (B, V, C) scale and shift taking raw pixels to jittered, standardised ones.

    ``params`` are batched draws (B, V, ...); ``plate_mean``/``plate_std`` (B, 2, C) are the raw
    control statistics of image A and its partner.
    """
    src = torch.tensor([s for s, _ in view_slots(cfg, kind)], device=plate_std.device)
    mean, std = plate_mean[:, src].float(), plate_std[:, src].float()
    gain, offset = params["gain"].float(), params["offset"].float()
    if cfg.jitter_offset_unit == "plate_std":
        shift = offset - mean / std
    elif cfg.jitter_offset_unit == "range":
        shift = (offset * float(value_max) - mean) / std
    else:
        raise ValueError(
            f"views.jitter_offset_unit={cfg.jitter_offset_unit!r}: use plate_std or range"
        )
    return gain / std, shift


def batch_views(
    images: torch.Tensor,
    plate_mean: torch.Tensor,
    plate_std: torch.Tensor,
    params: dict[str, torch.Tensor],
    cfg: ViewsConfig,
    kind: str,
    value_max: float,
    resampler: str | None = None,
) -> list[torch.Tensor]:
    """The training views of a batch, in the order of docs/design.md §4: one (B, C, S, S) float32 tensor per view.

    ``images`` (B, 2, C, H, W) holds each item's image A and its partner B in stored units, on
    the device where the views are wanted; ``plate_mean``/``plate_std`` (B, 2, C) their plate
    control statistics; ``params`` the items' :func:`draw_view_params` stacked (B, V, ...);
    ``value_max`` the dtype maximum M of the stored pixels (the jitter's [0, 1] scale).
    ``resampler``: "slices" (crop by crop; fastest on a CPU core) or "matmul" (every crop of a
    view at once as two batched matrix products; a few kernels per view on a GPU instead of
    several per crop); default: matmul on CUDA, slices elsewhere. Both resample with the same
    antialiased bilinear weights.
    """
    if cfg.global_size is None or cfg.local_size is None:
        cfg = cfg.resolved(images.shape[-1])
    if resampler is None:
        resampler = "matmul" if images.device.type == "cuda" else "slices"
    if resampler not in ("slices", "matmul"):
        raise ValueError(f"resampler {resampler!r}: expected slices or matmul")
    scale, shift = view_affine(params, plate_mean, plate_std, cfg, kind, value_max)
    scale = scale.to(images.device, non_blocking=True)[..., None, None]
    shift = shift.to(images.device, non_blocking=True)[..., None, None]
    make = _views_by_slices if resampler == "slices" else _views_by_matmul
    return make(images, params, scale, shift, cfg, view_slots(cfg, kind))


def _views_by_slices(
    images: torch.Tensor,
    params: dict[str, torch.Tensor],
    scale: torch.Tensor,
    shift: torch.Tensor,
    cfg: ViewsConfig,
    slots: list[tuple[int, bool]],
) -> list[torch.Tensor]:
    """Crop by crop: slice (or mirror-pad), resize, multiply-add, flip, write into the batch."""
    device = images.device
    n, _, c = images.shape[:3]
    need_resize = bool(cfg.resize) and tuple(images.shape[-2:]) != (cfg.resize, cfg.resize)
    # The loops below only slice and resize; every parameter is read once, on the CPU.
    boxes = params["box"].cpu().tolist()
    flips = params["flip"].cpu().tolist()
    rots = params["rot90"].cpu().tolist()
    sizes = [int(cfg.global_size if g else cfg.local_size) for _, g in slots]
    views = [_empty((n, c, size, size), device) for size in sizes]
    for b in range(n):
        # One item at a time: its two images stay in cache while their views are cut.
        src_imgs = [_to_float(images[b, k]) for k in range(2 if len(slots) > 1 else 1)]
        if need_resize:
            src_imgs = [resize(im, int(cfg.resize)) for im in src_imgs]
        for v, (src, _) in enumerate(slots):
            size = sizes[v]
            y = _crop(src_imgs[src], *boxes[b][v])
            if tuple(y.shape[-2:]) != (size, size):
                y = resize(y, size)
            else:
                y = y.clone()
            # Jitter and standardisation: one in-place multiply-add per channel.
            y.mul_(scale[b, v]).add_(shift[b, v])
            dims, transpose = _dihedral(flips[b][v][0], flips[b][v][1], rots[b][v])
            if dims:
                y = y.flip(dims)
            (views[v][b].transpose(-2, -1) if transpose else views[v][b]).copy_(y)
    return views


def _views_by_matmul(
    images: torch.Tensor,
    params: dict[str, torch.Tensor],
    scale: torch.Tensor,
    shift: torch.Tensor,
    cfg: ViewsConfig,
    slots: list[tuple[int, bool]],
) -> list[torch.Tensor]:
    """Every crop of a view at once: view = Wy · image · Wxᵀ per item and channel.

    Wy (S × H) and Wx (S × W) hold, for each output row/column, the antialiased bilinear
    weights of its source pixels within the crop, moved to their mirror-reflected positions in
    the image and in reversed order for a flip; odd quarter turns then transpose the view.
    """
    device = images.device
    x = images.to(torch.float32)
    n = x.shape[0]
    if cfg.resize and tuple(x.shape[-2:]) != (cfg.resize, cfg.resize):
        x = resize(x.flatten(0, 1), int(cfg.resize)).unflatten(0, (n, 2))
    h, w = x.shape[-2:]
    box = params["box"].to(device)
    flip = params["flip"].to(device)
    k = params["rot90"].to(device)
    # Flips, then k quarter turns = flip rows/columns (as below), then transpose if k is odd.
    flip_rows = flip[..., 1] ^ ((k == 2) | (k == 3))
    flip_cols = flip[..., 0] ^ ((k == 1) | (k == 2))
    views = []
    for v, (src, is_global) in enumerate(slots):
        size = int(cfg.global_size if is_global else cfg.local_size)
        wy = _resample_matrix(box[:, v, 0], box[:, v, 2], size, h, flip_rows[:, v])
        wx = _resample_matrix(box[:, v, 1], box[:, v, 3], size, w, flip_cols[:, v])
        y = wy[:, None] @ (x[:, src] @ wx[:, None].transpose(-2, -1))
        odd = (k[:, v] % 2 == 1)[:, None, None, None]
        y = torch.where(odd, y.transpose(-2, -1), y)
        views.append(torch.addcmul(shift[:, v], y, scale[:, v]))
    return views


def _resample_matrix(
    start: torch.Tensor, length: torch.Tensor, size: int, n: int, flip: torch.Tensor
) -> torch.Tensor:
    """(B, size, n): antialiased bilinear resampling of the windows [start, start + length) of
    an axis of n pixels (mirrored outside it) to ``size`` samples, reversed where ``flip``.

    The weights are those of ``F.interpolate(mode="bilinear", antialias=True,
    align_corners=False)``: a triangle filter widened by the downscaling factor, normalised.
    """
    device = start.device
    scale = length.double() / size  # (B,)
    support = torch.clamp(scale, min=1.0)  # filter half-width in source pixels
    centre = scale[:, None] * (torch.arange(size, device=device, dtype=torch.float64) + 0.5)
    lo = torch.floor(centre - support[:, None] + 0.5).clamp(min=0)
    hi = torch.minimum(torch.floor(centre + support[:, None] + 0.5), length[:, None].double())
    taps = int(math.ceil(2 * float(support.max()))) + 2
    idx = lo[..., None] + torch.arange(taps, device=device, dtype=torch.float64)  # (B, S, T)
    weight = torch.clamp(1 - ((idx - centre[..., None] + 0.5) / support[:, None, None]).abs(), 0)
    weight = torch.where(idx < hi[..., None], weight, 0.0)
    weight = weight / weight.sum(-1, keepdim=True)
    pos = _reflect_index(start[:, None, None] + idx.long(), n)
    flip = flip[:, None, None]
    weight = torch.where(flip, weight.flip(1), weight)
    pos = torch.where(flip, pos.flip(1), pos)
    out = torch.zeros(len(start), size, n, device=device, dtype=torch.float64)
    out.scatter_add_(2, pos, weight)
    return out.to(torch.float32)


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (C,H,W) or (N,C,H,W) to size × size, bilinear with antialiasing."""
    batched = img.dim() == 4
    x = img if batched else img[None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return x if batched else x[0]


def center_view(img: torch.Tensor, cfg: ViewsConfig) -> torch.Tensor:
    """The evaluation view of (C,H,W) or (N,C,H,W): resize to cfg.resize if set, centre crop.

    Crop size is cfg.global_size (resolved from the image size when None). Intensities are left
    as given (pass plate-standardised images).
    """
    if cfg.global_size is None:
        cfg = cfg.resolved(img.shape[-1])
    x = resize(img, cfg.resize) if cfg.resize else img
    h, w = x.shape[-2:]
    s = int(cfg.global_size)
    if s > min(h, w):
        return resize(x, s)
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top : top + s, left : left + s].contiguous()
