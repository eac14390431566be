"""Batch, plate, well and site nuisance of the simulated screen (see ``docs/calibration.md``).

Each batch's nuisance comes from a random stream of its own, keyed by the batch's split and
its index within that split, so adding held-out batches leaves every other batch unchanged.
Every knob is ``centre + strength * half_width * z``: training and validation batches draw
``z`` uniformly in [-1, 1]; held-out (test) batches draw ``|z|`` in [1.2, 1.6] with a random
sign, so their nuisance lies outside the training batches' range. ``strength`` (the screen's
``batch_strength``) is 0 for no batch effect (every batch, plate and well position alike) and
1 for the strength calibrated against BBBC021.

What survives per-plate standardisation against control pixels, beyond affine gain/offset:
a non-linear staining response (gamma and soft saturation per batch and channel), bleed-through
between spectrally adjacent channels, blur that varies per batch and from site to site, an
illumination field, cell density and size drift with confluence-driven morphology (crowded
cells are smaller and respond less to treatment), and well-position (edge) effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
HELD_OUT_Z = (1.2, 1.6)  # |z| of held-out batches: beyond the training range of [-1, 1]
# Spectrally adjacent Cell Painting channels (source -> target): Hoechst tails into the
# 488 nm ER channel, ER into RNA (SYTO14), RNA into AGP (phalloidin/WGA), AGP into Mito.
BLEED_PAIRS = ((0, 1), (1, 2), (2, 3), (3, 4))
ROWS_384, COLS_384 = 16, 24

# Half-widths (at strength 1) of every nuisance knob. The fit to BBBC021 (docs/calibration.md,
# benchmarks/fit_calibration.py) scaled two groups of them; ``centre`` values are what every
# batch shares at strength 0.
KNOBS: dict[str, dict[str, float]] = {
    # optics and staining (fitted: 0.45 x the first draft's half-widths)
    "log_gain": {"centre": 0.0, "half": 0.225},  # affine; removed by plate standardisation
    "offset": {"centre": 0.07, "half": 0.0225},
    "log_gamma": {"centre": 0.0, "half": 0.09},  # non-linear staining response
    "log_saturation": {"centre": np.log(3.0), "half": 0.225},  # soft ceiling, clean units
    "bleed": {"centre": 0.0, "half": 0.018},  # one-sided: fraction in [0, 2 * half]
    "log_blur": {"centre": np.log(0.75), "half": 0.2025},  # px at 64 px
    "focus_sd": {"centre": 0.0, "half": 0.0675},  # one-sided: site-to-site log-blur sd
    "log_read_noise": {"centre": np.log(0.02), "half": 0.315},
    "log_shot_noise": {"centre": np.log(0.006), "half": 0.495},
    "illum_gradient": {"centre": 0.0, "half": 0.135},  # one-sided amplitude
    "vignetting": {"centre": 0.0, "half": 0.09},  # one-sided
    "plate_log_gain_sd": {"centre": 0.0, "half": 0.0225},  # plate jitter (sd, one-sided)
    # biology (fitted: 0.3 x the first draft's half-widths)
    "log_density": {"centre": 0.0, "half": 0.105},
    "log_size": {"centre": 0.0, "half": 0.03},
    "log_response": {"centre": 0.0, "half": 0.075},
    "edge": {"centre": 0.0, "half": 0.15},  # one-sided edge-effect strength
    "plate_log_density_sd": {"centre": 0.0, "half": 0.015},
    "log_well_jitter": {"centre": 0.0, "half": 0.15},  # seeding / staining heterogeneity
}
ONE_SIDED = {
    "bleed",
    "focus_sd",
    "illum_gradient",
    "vignetting",
    "edge",
    "plate_log_gain_sd",
    "plate_log_density_sd",
}
# Biology, not batch: how morphology follows the nuisance part of confluence (log density).
CONFLUENCE = {"cell_size": -0.25, "nuc_size": -0.12, "response": -0.5}
# Edge wells (evaporation): fewer cells, brighter stain, per unit of edge strength.
EDGE = {"log_density": -0.5, "log_intensity": 0.12, "decay_wells": 1.0}


def batch_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of the ``index``-th batch of ``split``."""
    return np.random.default_rng([seed, 2, SPLIT_CODE[split], index])


def _z(rng: np.random.Generator, shape: Any, held_out: bool, one_sided: bool) -> np.ndarray:
    if held_out:
        z = rng.uniform(*HELD_OUT_Z, shape) * rng.choice([-1.0, 1.0], shape)
    else:
        z = rng.uniform(-1.0, 1.0, shape)
    return (np.abs(z) if held_out else (z + 1.0) / 2.0) if one_sided else z


def knob(
    name: str, rng: np.random.Generator, shape: Any, strength: float, held_out: bool
) -> np.ndarray:
    """One knob's value(s): ``centre + strength * half * z`` (one-sided: z mapped to [0, 1+])."""
    k = KNOBS[name]
    one = name in ONE_SIDED
    z = _z(rng, shape, held_out, one)
    return k["centre"] + strength * (2.0 * k["half"] if one else k["half"]) * z


@dataclass
class BatchNuisance:
    """One batch's nuisance (per channel where shaped (C,))."""

    gain: np.ndarray  # (C,)
    offset: np.ndarray  # (C,) clean-intensity units
    gamma: np.ndarray  # (C,) exponent of the staining response
    saturation: np.ndarray  # (C,) soft ceiling, clean-intensity units
    bleed: np.ndarray  # (len(BLEED_PAIRS),) fraction of source added to target
    blur: float  # px
    focus_sd: float  # sd of log blur between sites
    read_noise: float
    shot_noise: float
    grad_amp: float
    grad_angle: float
    vignetting: float
    density: float  # log
    size_drift: float  # log
    response: float  # multiplier of treatment effects
    edge: float  # edge-effect strength
    plate_gain: np.ndarray  # (plates, C)
    plate_density: np.ndarray  # (plates,) log
    well_jitter: float  # multiplier of the well-to-well density and intensity jitter

    def truth(self, channels: list[str]) -> dict[str, Any]:
        """JSON-ready description for ground_truth.json."""

        def ch(v: np.ndarray) -> dict[str, float]:
            return {c: round(float(x), 6) for c, x in zip(channels, v)}

        return {
            "gain": ch(self.gain),
            "offset": ch(self.offset),
            "gamma": ch(self.gamma),
            "saturation": ch(self.saturation),
            "bleed_through": {
                f"{channels[a]}->{channels[b]}": round(float(f), 6)
                for (a, b), f in zip(BLEED_PAIRS, self.bleed)
            },
            "blur_sigma_px": round(self.blur, 6),
            "focus_log_sd": round(self.focus_sd, 6),
            "read_noise": round(self.read_noise, 6),
            "shot_noise": round(self.shot_noise, 6),
            "illumination_gradient": round(self.grad_amp, 6),
            "illumination_angle_rad": round(self.grad_angle, 6),
            "vignetting": round(self.vignetting, 6),
            "density_log": round(self.density, 6),
            "cell_size_log": round(self.size_drift, 6),
            "response_multiplier": round(self.response, 6),
            "edge_strength": round(self.edge, 6),
            "well_jitter_multiplier": round(self.well_jitter, 6),
        }


def draw_batch(
    rng: np.random.Generator,
    n_channels: int,
    n_plates: int,
    image_scale: float,
    strength: float,
    held_out: bool,
) -> BatchNuisance:
    """Draw one batch's nuisance from its own stream (the order of draws is fixed)."""

    def k(name: str, shape: Any = None) -> Any:
        v = knob(name, rng, shape, strength, held_out)
        return float(v) if shape is None else v

    gain = np.exp(k("log_gain", n_channels))
    offset = np.maximum(k("offset", n_channels), 0.0)
    gamma = np.exp(k("log_gamma", n_channels))
    saturation = np.exp(k("log_saturation", n_channels))
    bleed = k("bleed", len(BLEED_PAIRS))
    blur = float(np.exp(k("log_blur"))) * image_scale
    focus_sd = k("focus_sd")
    read_noise = float(np.exp(k("log_read_noise")))
    shot_noise = float(np.exp(k("log_shot_noise")))
    grad_amp = k("illum_gradient")
    grad_angle = float(rng.uniform(0.0, 2 * np.pi))
    vignetting = k("vignetting")
    density = k("log_density")
    size_drift = k("log_size")
    response = float(np.exp(k("log_response")))
    edge = k("edge")
    gain_sd, dens_sd = k("plate_log_gain_sd"), k("plate_log_density_sd")
    plate_gain = np.exp(rng.normal(0.0, 1.0, (n_plates, n_channels)) * gain_sd)
    plate_density = rng.normal(0.0, 1.0, n_plates) * dens_sd
    well_jitter = float(np.exp(k("log_well_jitter")))
    return BatchNuisance(
        gain, offset, gamma, saturation, bleed, blur, focus_sd, read_noise, shot_noise,
        grad_amp, grad_angle, vignetting, density, size_drift, response, edge,
        plate_gain, plate_density, well_jitter,
    )  # fmt: skip


def illumination(n: BatchNuisance, size: int) -> np.ndarray:
    """The batch's multiplicative illumination field (H, W): a gradient and vignetting."""
    coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    field = (
        1.0
        + n.grad_amp * (np.cos(n.grad_angle) * xx + np.sin(n.grad_angle) * yy)
        - n.vignetting * (xx**2 + yy**2) / 2.0
    )
    return np.maximum(field, 0.05).astype(np.float32)


def edge_weight(position: np.ndarray) -> np.ndarray:
    """How much a 384-well position is an edge well: exp(-distance to the edge / decay)."""
    row, col = position // COLS_384, position % COLS_384
    dist = np.minimum.reduce([row, ROWS_384 - 1 - row, col, COLS_384 - 1 - col])
    return np.exp(-dist / EDGE["decay_wells"])


def stain_response(x: np.ndarray, gamma: np.ndarray, saturation: np.ndarray) -> np.ndarray:
    """Non-affine staining response per image and channel on (n, C, H, W), in place-safe form.

    ``y = L * tanh((x / 1)^gamma / L)``: gamma bends the response around the reference
    intensity 1.0 (a cell's typical stain), the soft ceiling ``L`` saturates bright structures.
    """
    g = gamma.astype(np.float32)[:, :, None, None]
    sat = saturation.astype(np.float32)[:, :, None, None]
    y = np.power(np.maximum(x, 0.0), g)
    return sat * np.tanh(y / sat)


def bleed_through(x: np.ndarray, bleed: np.ndarray) -> np.ndarray:
    """Add each source channel's signal to its spectral neighbour: (n, C, H, W), (n, pairs)."""
    out = x.copy()
    for j, (src, dst) in enumerate(BLEED_PAIRS):
        out[:, dst] += bleed[:, j].astype(np.float32)[:, None, None] * x[:, src]
    return out
