"""Multi-crop views and augmentations on tensors of any channel count (DESIGN §4).

Augmentations: random resized crops, horizontal/vertical flips, random 90° rotations and a
per-channel intensity jitter ``x_c <- a_c * x_c + b_c`` (a_c ~ N(1, s_a²), b_c ~ N(0, s_b²)),
followed by plate standardisation. No colour jitter, grayscale, solarise or blur: they mean
nothing for fluorescence channels.

Intensity units: :func:`make_views` expects images scaled to [0, 1] by the dtype maximum (the
jitter's offsets are defined in those units) and, optionally, the plate control mean/std in the
same [0, 1] units, with which each view is standardised *after* its jitter. With a = 1 and b = 0
this equals the raw-pixel plate standardisation of ``Dataset.standardized``.

Zoom-out (area scale > 1): the crop window may be larger than the image; pixels outside it are
filled by mirror reflection (``reflect`` without repeating the edge), so a scale of 1.1 shows
the whole image plus a mirrored margin, i.e. a slight zoom-out, as in the seed's intent.

View order (DINO family, 2 + 2·n_local views): global(A), global(B), n_local × local(A),
n_local × local(B). BYOL family: global(A), global(B). Single: global(A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

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
        """A copy with crop sizes filled in from the (resized) image size, as the seed scales."""
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
        """Number of views :func:`make_views` returns for a view kind."""
        return {"dino": 2 + 2 * self.n_local, "byol": 2, "single": 1}[kind]


def _uniform(gen: torch.Generator | None, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Map any integer coordinates into [0, n) by mirror reflection (edge not repeated)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (C,H,W) or (N,C,H,W) to size × size, bilinear with antialiasing."""
    batched = img.dim() == 4
    x = img if batched else img[None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return x if batched else x[0]


def random_resized_crop(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random window of area scale·H·W and aspect ratio in ``ratio``, resized to size².

    Scales above 1 (zoom-out) are allowed: the window then extends beyond the image and the
    outside is mirror-reflected.
    """
    _, h, w = img.shape
    area = h * w * _uniform(gen, float(scale[0]), float(scale[1]))
    log_r = _uniform(gen, math.log(ratio[0]), math.log(ratio[1]))
    r = math.exp(log_r)
    cw = max(1, int(round(math.sqrt(area * r))))
    ch = max(1, int(round(math.sqrt(area / r))))
    # Offsets range over all windows that stay inside the image, or (window larger than the
    # image) over all placements that keep the image inside the window.
    top = int(math.floor(_uniform(gen, min(0, h - ch), max(0, h - ch) + 1 - 1e-9)))
    left = int(math.floor(_uniform(gen, min(0, w - cw), max(0, w - cw) + 1 - 1e-9)))
    rows = _reflect_index(torch.arange(top, top + ch), h)
    cols = _reflect_index(torch.arange(left, left + cw), w)
    crop = img.index_select(1, rows).index_select(2, cols)
    return resize(crop, size)


def random_flip_rot90(
    img: torch.Tensor, flip_p: float, rot90_p: float, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Horizontal and vertical flips (each with flip_p) and a 90/180/270° rotation with rot90_p."""
    if _uniform(gen) < flip_p:
        img = img.flip(-1)
    if _uniform(gen) < flip_p:
        img = img.flip(-2)
    if _uniform(gen) < rot90_p:
        k = 1 + int(torch.randint(0, 3, (), generator=gen))
        img = torch.rot90(img, k, dims=(-2, -1))
    return img


def intensity_jitter(
    img: torch.Tensor,
    p: float,
    gain_std: float,
    offset_std: float,
    gen: torch.Generator | None = None,
    offset_unit: torch.Tensor | None = None,
) -> torch.Tensor:
    """With probability p: x_c <- a_c·x_c + b_c per channel, a_c ~ N(1, gain²), b_c ~ N(0, off²).

    ``offset_unit`` (C,) rescales b_c per channel (e.g. the plate's control std).
    """
    if _uniform(gen) >= p:
        return img
    c = img.shape[0]
    a = 1.0 + gain_std * torch.randn(c, generator=gen, dtype=img.dtype)
    b = offset_std * torch.randn(c, generator=gen, dtype=img.dtype)
    if offset_unit is not None:
        b = b * offset_unit.reshape(-1).to(img.dtype)
    return img * a[:, None, None] + b[:, None, None]


def _standardise(img: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if norm is None:
        return img
    mean, std = norm
    return (img - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1)


def _one_view(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    jitter_p: float,
    cfg: ViewsConfig,
    gen: torch.Generator | None,
    norm: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    x = random_resized_crop(img, size, scale, tuple(cfg.crop_ratio), gen=gen)
    x = random_flip_rot90(x, cfg.flip_p, cfg.rot90_p, gen)
    # Jitter acts pointwise, so applying it after the crop equals applying it before (cheaper).
    unit = _offset_unit(cfg, norm)
    x = intensity_jitter(x, jitter_p, cfg.jitter_gain_std, cfg.jitter_offset_std, gen, unit)
    return _standardise(x, norm).contiguous()


def _offset_unit(
    cfg: ViewsConfig, norm: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor | None:
    if cfg.jitter_offset_unit == "range":
        return None
    if cfg.jitter_offset_unit != "plate_std":
        raise ValueError(
            f"views.jitter_offset_unit={cfg.jitter_offset_unit!r}: use plate_std or range"
        )
    return None if norm is None else norm[1]


def make_views(
    img_a: torch.Tensor,
    img_b: torch.Tensor | None,
    cfg: ViewsConfig,
    kind: str,
    gen: torch.Generator | None = None,
    *,
    norm_a: tuple[torch.Tensor, torch.Tensor] | None = None,
    norm_b: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The training views of image A and its partner B (B = A without pairing), in DESIGN order.

    Images are float (C,H,W) in [0,1] units; ``norm_a``/``norm_b`` = (mean, std) per channel in
    the same units standardise each view after its jitter (None: no standardisation).
    """
    if kind not in VIEW_KINDS:
        raise ValueError(f"view kind {kind!r}: expected one of {VIEW_KINDS}")
    if img_b is None:
        img_b, norm_b = img_a, norm_a
    if cfg.global_size is None or cfg.local_size is None:
        cfg = cfg.resolved(img_a.shape[-1])
    if cfg.resize:
        img_a, img_b = resize(img_a, cfg.resize), resize(img_b, cfg.resize)
    gs, ls = int(cfg.global_size), int(cfg.local_size)

    def glob(img: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        return _one_view(img, gs, cfg.global_scale, cfg.jitter_p_global, cfg, gen, norm)

    def loc(img: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        return _one_view(img, ls, cfg.local_scale, cfg.jitter_p_local, cfg, gen, norm)

    if kind == "single":
        return [glob(img_a, norm_a)]
    views = [glob(img_a, norm_a), glob(img_b, norm_b)]
    if kind == "dino":
        views += [loc(img_a, norm_a) for _ in range(cfg.n_local)]
        views += [loc(img_b, norm_b) for _ in range(cfg.n_local)]
    return views


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
