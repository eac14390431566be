"""The built-in simulated screen (docs/design.md §3): rendered Cell-Painting-like fields of view.

A fair miniature of a real screen. ``batches`` x ``plates`` x wells x ``sites``; every plate
holds every treatment (``wells_per_treatment`` wells each, randomised plate map) plus
``control_wells`` negative-control wells ("DMSO"). Treatments are compounds (optionally at
several doses) grouped into mechanisms of action (MoAs): each MoA has a sparse phenotype
direction over 16 parameters, each compound a noisy, more or less potent copy of it, each dose
a Hill-like fraction of it. Eleven parameters are morphological (cell count, cell and nuclear
size and shape, chromatin and ER texture, nucleoli and mitochondrial puncta counts, actin ring,
spatial clustering) and five are channel intensities, so intensity statistics alone do not
carry the whole signal (docs/design.md §9).

Every image is rendered from cells: nuclei (DNA) as soft ellipses with chromatin texture,
cytoplasm (ER: perinuclear gradient with texture; RNA: diffuse plus nucleoli; AGP: cortical
ring plus diffuse actin; Mito: puncta). Batches, plates, well positions and sites add the
nuisance of ``cdcl.data.nuisance`` (affine gain and offset, and what survives per-plate
standardisation: non-linear staining response, bleed-through, blur varying per batch and
site, illumination, density and size drift with confluence-driven morphology, edge effects),
scaled by ``batch_strength`` (0: none; 1: calibrated against BBBC021, docs/calibration.md).

Determinism: the treatments come from ``rng([seed, 0])``; each batch's nuisance, plate maps and
well jitter from a stream of its own keyed by its split and index within that split; the pixels
from fixed blocks of at most ``BLOCK`` images within one batch (see :func:`blocks`). A resumed
build equals an uninterrupted one byte for byte, and adding held-out batches
(``test_batches``) leaves every other batch's images identical. The ground truth is written as
``ground_truth.json`` next to the dataset tables.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from cdcl.data import nuisance as nz
from cdcl.data.dataset_dir import INFO_FILE, MASKS_DIR, DatasetInfo, DatasetWriter, validate
from cdcl.errors import ConfigError, DatasetError

VERSION = 2  # bump whenever the rendered pixels of a given (preset, seed) change
BLOCK = 64  # images per fixed rendering block; part of the determinism contract
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
CONTROL = "DMSO"
CONTROL_MOA = "control"
GROUND_TRUTH_FILE = "ground_truth.json"
PIXEL_SCALE = 8000.0  # clean intensity 1.0 -> 8000 grey levels in uint16
ROWS = "ABCDEFGHIJKLMNOP"  # a 384-well plate: 16 rows x 24 columns
MASK_OBJECTS = ["cells", "nuclei"]  # label masks exported with the screen, in this order
MASK_DTYPE = np.uint16

# Phenotype parameters: name -> (unit, kind, meaning). A treatment effect of 1.0 on a
# parameter moves it by one unit; MoA directions are drawn in these units.
PARAMS: dict[str, tuple[float, str, str]] = {
    "density": (0.35, "morphology", "log multiplier of cells per field"),
    "cell_size": (0.18, "morphology", "log multiplier of the cytoplasm radius"),
    "cell_ecc": (0.35, "morphology", "added log aspect ratio of the cell"),
    "nuc_size": (0.18, "morphology", "log multiplier of the nuclear radius"),
    "nuc_ecc": (0.35, "morphology", "added log aspect ratio of the nucleus"),
    "dna_texture": (0.2, "morphology", "added chromatin texture amplitude (DNA)"),
    "er_texture": (0.25, "morphology", "added ER texture amplitude"),
    "nucleoli": (0.5, "morphology", "log multiplier of nucleoli per nucleus (RNA)"),
    "mito_spots": (0.5, "morphology", "log multiplier of mitochondrial puncta per cell"),
    "actin_ring": (0.5, "morphology", "log multiplier of the cortical actin ring (AGP)"),
    "clustering": (0.3, "morphology", "added fraction of cells growing in clusters"),
    "int_DNA": (0.15, "intensity", "log multiplier of DNA stain intensity"),
    "int_ER": (0.15, "intensity", "log multiplier of ER stain intensity"),
    "int_RNA": (0.15, "intensity", "log multiplier of RNA stain intensity"),
    "int_AGP": (0.15, "intensity", "log multiplier of AGP stain intensity"),
    "int_Mito": (0.15, "intensity", "log multiplier of Mito stain intensity"),
}
PARAM_NAMES = list(PARAMS)
P = {name: i for i, name in enumerate(PARAM_NAMES)}

# Baseline cell (at 64 px; lengths scale with image_size: the field of view is fixed).
BASE = {
    "cell_radius_px": 7.0,
    "nuc_radius_px": 3.4,
    "cell_log_aspect": 0.25,
    "nuc_log_aspect": 0.12,
    "dna_texture": 0.15,
    "er_texture": 0.3,
    "nucleoli_per_nucleus": 2.5,
    "mito_per_cell": 12.0,
    "actin_ring": 0.6,
    "clustering": 0.1,
    "intensity": {"DNA": 1.0, "ER": 0.55, "RNA": 0.45, "AGP": 0.55, "Mito": 0.7},
}


@dataclass(frozen=True)
class ScreenConfig:
    """The shape of a simulated screen (a preset plus overrides)."""

    batches: int
    plates: int  # per batch
    moas: int
    compounds_per_moa: int
    doses: tuple[float, ...] | None  # None: one dose (1.0), treatment named by compound
    wells_per_treatment: int
    control_wells: int
    sites: int
    image_size: int
    cells_per_field: float
    test_batches: int  # the last batches are held out for testing
    val_batches: int  # the batches just before the test batches
    batch_strength: float = 1.0  # 0: no batch effect; 1: calibrated against BBBC021

    @property
    def n_wells(self) -> int:
        """Wells per plate."""
        n_doses = len(self.doses) if self.doses else 1
        return (
            self.moas * self.compounds_per_moa * n_doses * self.wells_per_treatment
            + self.control_wells
        )

    @property
    def n_images(self) -> int:
        """Images in the whole screen."""
        return self.batches * self.plates * self.n_wells * self.sites


PRESETS: dict[str, ScreenConfig] = {
    # tests: 4 batches (2 train / 2 test) x 1 plate x 8 wells x 3 sites = 96 images, 32 px
    "tiny": ScreenConfig(4, 1, 3, 2, None, 1, 2, 3, 32, 16.0, 2, 0),
    # demo: 6 batches (4 train / 2 test) x 2 plates x 56 wells x 3 sites = 2016 images, 64 px
    "small": ScreenConfig(6, 2, 6, 4, None, 2, 8, 3, 64, 16.0, 2, 0),
    # benchmarks: 8 batches (5 train / 1 val / 2 test) x 3 plates x 112 wells x 3 sites
    # = 8064 images, 96 treatments (8 MoAs x 4 compounds x 3 doses), 64 px
    "medium": ScreenConfig(8, 3, 8, 4, (0.3, 1.0, 3.0), 1, 16, 3, 64, 16.0, 2, 1),
}


def _parse_doses(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    raw = value
    if isinstance(value, str):
        if value.strip().lower() in ("", "none"):
            return None
        value = value.split(",")
    try:
        doses = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"--doses {raw}: give positive numbers, e.g. 0.3,1,3") from None
    if not doses or any(not d > 0 for d in doses) or len(set(doses)) != len(doses):
        raise ConfigError(f"--doses {raw}: give distinct positive numbers, e.g. 0.3,1,3")
    return doses


def resolve_config(preset: str = "tiny", **overrides: Any) -> ScreenConfig:
    """A preset with overrides applied and checked; unknown keys are ConfigErrors."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset}: unknown; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(ScreenConfig)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(
                f"synthetic override `{key}` unknown; known: {', '.join(sorted(known))}"
            )
        if value is None and key != "doses":
            continue
        if key == "doses":
            changes[key] = _parse_doses(value)
        elif key in ("cells_per_field", "batch_strength"):
            try:
                changes[key] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"synthetic override {key}={value!r}: expected a number"
                ) from None
        else:
            if isinstance(value, bool) or int(value) != value:
                raise ConfigError(f"synthetic override {key}={value!r}: expected a whole number")
            changes[key] = int(value)
    base = PRESETS[preset]
    if "batches" not in changes and ("test_batches" in changes or "val_batches" in changes):
        # held-out batches are added to (or removed from) the preset's training batches,
        # which stay the same batches with the same pixels
        train = base.batches - base.test_batches - base.val_batches
        changes["batches"] = (
            train
            + changes.get("val_batches", base.val_batches)
            + changes.get("test_batches", base.test_batches)
        )
    cfg = replace(base, **changes)
    _check_config(cfg)
    return cfg


def _check_config(cfg: ScreenConfig) -> None:
    minimum = {
        "batches": 2,
        "plates": 1,
        "moas": 1,
        "compounds_per_moa": 1,
        "wells_per_treatment": 1,
        "control_wells": 1,
        "sites": 1,
        "image_size": 16,
        "test_batches": 1,
        "val_batches": 0,
    }
    for key, low in minimum.items():
        if getattr(cfg, key) < low:
            raise ConfigError(
                f"synthetic override {key}={getattr(cfg, key)}: must be at least {low}"
            )
    if cfg.test_batches + cfg.val_batches >= cfg.batches:
        raise ConfigError(
            f"test_batches={cfg.test_batches} + val_batches={cfg.val_batches} leave no training "
            f"batch out of {cfg.batches}; lower them or raise --batches"
        )
    if cfg.n_wells > len(ROWS) * 24:
        raise ConfigError(
            f"{cfg.n_wells} wells per plate exceed a 384-well plate; use fewer treatments"
        )
    if not 0 < cfg.cells_per_field <= 200:
        raise ConfigError(f"cells_per_field={cfg.cells_per_field}: must be in (0, 200]")
    if not 0.0 <= cfg.batch_strength <= 5.0:
        raise ConfigError(f"batch_strength={cfg.batch_strength}: must be in [0, 5]")
    if cfg.image_size > 1024:
        raise ConfigError(f"image_size={cfg.image_size}: at most 1024 px")


def _clean_overrides(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that change the preset, in their resolved (JSON) form."""
    cfg = resolve_config(preset, **overrides)
    base = PRESETS[preset]
    out: dict[str, Any] = {}
    for key in sorted(f.name for f in fields(ScreenConfig)):
        value, default = getattr(cfg, key), getattr(base, key)
        if value != default:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def build_key(preset: str = "tiny", seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """The build description stored in dataset.json; equal keys mean identical datasets."""
    return {
        "adapter": "synthetic",
        "preset": preset,
        "seed": int(seed),
        "overrides": _clean_overrides(preset, overrides),
        "version": VERSION,
        "block": BLOCK,
    }


# --------------------------------------------------------------------------------------- design


@dataclass
class _Design:
    """Everything drawn once per screen; rendering looks images up in these arrays."""

    cfg: ScreenConfig
    samples: pd.DataFrame
    effects: np.ndarray  # (n_treatments, n_params) in units; row 0 = control (zeros)
    treat_of: np.ndarray  # (N,) treatment row of each image
    batch_of: np.ndarray  # (N,)
    plate_of: np.ndarray  # (N,) global plate number
    well_of: np.ndarray  # (N,) global well number
    nuisance: list[nz.BatchNuisance]  # one per batch
    batch_gain: np.ndarray  # (B, C)
    batch_offset: np.ndarray  # (B, C) in clean-intensity units
    batch_gamma: np.ndarray  # (B, C)
    batch_saturation: np.ndarray  # (B, C)
    batch_bleed: np.ndarray  # (B, len(nz.BLEED_PAIRS))
    batch_read_noise: np.ndarray  # (B,)
    batch_shot_noise: np.ndarray  # (B,)
    batch_size_drift: np.ndarray  # (B,) log
    batch_response: np.ndarray  # (B,) multiplier of treatment effects
    illumination: np.ndarray  # (B, H, W) multiplicative field
    plate_gain: np.ndarray  # (n_plates, C)
    image_blur: np.ndarray  # (N,) px: the batch's blur with site-to-site focus variation
    nuisance_density: np.ndarray  # (N,) log: batch + plate + edge (drives confluence)
    well_density: np.ndarray  # (n_wells_total,) biological replicate jitter, log
    well_intensity: np.ndarray  # (n_wells_total, C) log: replicate jitter + edge effect
    well_effect: np.ndarray  # (n_wells_total, n_params) applied changes
    truth: dict[str, Any]


def _well_positions(n_wells: int) -> np.ndarray:
    """Positions (0..383) of a plate's wells, spread over the whole 384-well plate."""
    return np.round(np.linspace(0, len(ROWS) * 24 - 1, n_wells)).astype(np.int64)


def _well_name(position: int) -> str:
    return f"{ROWS[position // 24]}{position % 24 + 1:02d}"


@dataclass
class _Treatments:
    """The treatment table (row 0 = control) drawn from MoAs and their compounds."""

    names: list[str]
    compound: list[str]
    dose: list[float]
    moa: list[str]
    effects: np.ndarray  # (n_treatments, n_params) in parameter units
    truth_moas: dict[str, Any]
    truth_compounds: dict[str, Any]


def _draw_treatments(cfg: ScreenConfig, rng: np.random.Generator) -> _Treatments:
    """MoAs (sparse phenotype directions) and compounds (noisy, more or less potent copies)."""
    n_par = len(PARAM_NAMES)
    # MoAs: a few strong (primary) parameters plus a weak dense component; strengths vary.
    moa_names = [f"moa{m + 1:02d}" for m in range(cfg.moas)]
    moa_dirs = np.zeros((cfg.moas, n_par))
    moa_strength = rng.uniform(0.4, 1.4, cfg.moas)
    for m in range(cfg.moas):
        k = int(rng.integers(2, 5))
        primary = rng.choice(n_par, size=k, replace=False)
        moa_dirs[m, primary] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.7, 1.3, k)
        moa_dirs[m] += rng.normal(0.0, 0.15, n_par)

    # Compounds: noisy copies of their MoA's direction with their own potency and EC50.
    n_cmp = cfg.moas * cfg.compounds_per_moa
    width = max(2, len(str(n_cmp)))
    compounds, cmp_moa, cmp_effect, cmp_ec50 = [], [], [], []
    for m in range(cfg.moas):
        for _ in range(cfg.compounds_per_moa):
            compounds.append(f"cmpd{len(compounds) + 1:0{width}d}")
            cmp_moa.append(m)
            potency = math.exp(rng.normal(0.0, 0.35))
            noise = rng.normal(0.0, 0.3, n_par) * (np.abs(moa_dirs[m]) + 0.3)
            cmp_effect.append(moa_strength[m] * potency * (moa_dirs[m] + noise))
            cmp_ec50.append(math.exp(rng.normal(0.0, 0.5)))

    doses = cfg.doses if cfg.doses else (1.0,)
    t = _Treatments([CONTROL], [CONTROL], [0.0], [CONTROL_MOA], np.zeros((1, n_par)), {}, {})
    effects = [np.zeros(n_par)]
    for c, name in enumerate(compounds):
        for dose in doses:
            t.names.append(f"{name}@{dose}" if cfg.doses else name)
            t.compound.append(name)
            t.dose.append(float(dose))
            t.moa.append(moa_names[cmp_moa[c]])
            # Hill-like response normalised to 1 at dose 1.0.
            e = cmp_ec50[c]
            effects.append(cmp_effect[c] * dose * (1.0 + e) / (dose + e))
    t.effects = np.array(effects)
    t.truth_moas = {
        moa_names[m]: {
            "strength": round(float(moa_strength[m]), 6),
            "direction": _by_param(moa_dirs[m]),
        }
        for m in range(cfg.moas)
    }
    t.truth_compounds = {
        name: {
            "moa": moa_names[cmp_moa[c]],
            "ec50": round(cmp_ec50[c], 6),
            "effect_at_dose_1": _by_param(cmp_effect[c]),
        }
        for c, name in enumerate(compounds)
    }
    return t


def _batch_splits(cfg: ScreenConfig, batch_names: list[str]) -> dict[str, str]:
    """The last batches are test, the ones before them val, the rest train."""
    split_of = {}
    for b, name in enumerate(batch_names):
        from_end = cfg.batches - b
        split_of[name] = (
            "test"
            if from_end <= cfg.test_batches
            else "val"
            if from_end <= cfg.test_batches + cfg.val_batches
            else "train"
        )
    return split_of


def _batch_streams(cfg: ScreenConfig, seed: int, batch_names: list[str]) -> list[tuple[str, int]]:
    """Each batch's (split, index within split): the key of its own random stream."""
    split_of = _batch_splits(cfg, batch_names)
    seen: dict[str, int] = {}
    keys = []
    for name in batch_names:
        sp = split_of[name]
        keys.append((sp, seen.get(sp, 0)))
        seen[sp] = seen.get(sp, 0) + 1
    return keys


@dataclass
class _BatchDraw:
    """What one batch's own stream holds: nuisance, plate maps, well jitter, site focus."""

    nuisance: nz.BatchNuisance
    layouts: np.ndarray  # (plates, n_wells) treatment row at each well slot
    well_density: np.ndarray  # (plates * n_wells,)
    well_intensity: np.ndarray  # (plates * n_wells, C)
    well_effect: np.ndarray  # (plates * n_wells, n_params) in units
    focus: np.ndarray  # (plates * n_wells * sites,) standard normal focus deviations


def _draw_batch(
    cfg: ScreenConfig, seed: int, key: tuple[str, int], contents: np.ndarray, units: np.ndarray
) -> _BatchDraw:
    """One batch from its own stream; the order of the draws fixes the batch for a seed."""
    rng = nz.batch_rng(seed, *key)
    n_ch = len(CHANNELS)
    nuis = nz.draw_batch(
        rng, n_ch, cfg.plates, cfg.image_size / 64.0, cfg.batch_strength, key[0] == "test"
    )
    layouts = np.stack([contents[rng.permutation(len(contents))] for _ in range(cfg.plates)])
    n_w = cfg.plates * cfg.n_wells
    # how heterogeneous wells are (seeding, staining) differs between batches
    well_density = rng.normal(0.0, 0.1, n_w) * nuis.well_jitter
    well_intensity = rng.normal(0.0, 0.04, (n_w, n_ch)) * nuis.well_jitter
    # replicate wells differ in phenotype too (biological variability), in parameter units
    well_effect = rng.normal(0.0, 0.2, (n_w, len(PARAM_NAMES))) * units[None, :]
    focus = rng.standard_normal(n_w * cfg.sites)
    return _BatchDraw(nuis, layouts, well_density, well_intensity, well_effect, focus)


def _samples_table(
    cfg: ScreenConfig, batch_names: list[str], draws: list[_BatchDraw], t: _Treatments
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Plate maps -> samples; returns the table, each image's treatment row, global plate and
    global well, and the plate names."""
    positions = _well_positions(cfg.n_wells)
    rows: dict[str, list[Any]] = {k: [] for k in ("batch", "plate", "well", "site", "t")}
    plate_of, well_of, plate_names = [], [], []
    for b, draw in enumerate(draws):
        for p in range(cfg.plates):
            g_plate = b * cfg.plates + p
            plate = f"{batch_names[b]}_P{p + 1}"
            plate_names.append(plate)
            for slot, ti in enumerate(draw.layouts[p]):
                for s in range(cfg.sites):
                    rows["batch"].append(batch_names[b])
                    rows["plate"].append(plate)
                    rows["well"].append(_well_name(int(positions[slot])))
                    rows["site"].append(s + 1)
                    rows["t"].append(int(ti))
                    plate_of.append(g_plate)
                    well_of.append(g_plate * cfg.n_wells + slot)
    t_idx = np.array(rows["t"], dtype=np.int64)
    split_of = _batch_splits(cfg, batch_names)
    samples = pd.DataFrame(
        {
            "image": np.arange(len(t_idx), dtype=np.int64),
            "batch": rows["batch"],
            "plate": rows["plate"],
            "well": rows["well"],
            "site": np.array(rows["site"], dtype=np.int64),
            "treatment": [t.names[i] for i in t_idx],
            "compound": [t.compound[i] for i in t_idx],
            "dose": np.array([t.dose[i] for i in t_idx], dtype=np.float64),
            "moa": [t.moa[i] for i in t_idx],
            "is_control": t_idx == 0,
            "cell_type": "synthetic",
            "split": [split_of[b] for b in rows["batch"]],
        }
    )
    plates = np.array(plate_of, dtype=np.int64)
    return samples, t_idx, plates, np.array(well_of, dtype=np.int64), plate_names


def _by_param(vec: np.ndarray) -> dict[str, float]:
    return {p: round(float(v), 6) for p, v in zip(PARAM_NAMES, vec)}


def _by_channel(vec: np.ndarray) -> dict[str, float]:
    return {c: round(float(v), 6) for c, v in zip(CHANNELS, vec)}


def _nuisance_model_truth() -> dict[str, Any]:
    """The batch-effect model: knob ranges, one-sided knobs, held-out |z|, plate effects."""
    return {
        "knobs": {
            k: {kk: round(float(vv), 6) for kk, vv in v.items()} for k, v in nz.KNOBS.items()
        },
        "one_sided": sorted(nz.ONE_SIDED),
        "held_out_abs_z": list(nz.HELD_OUT_Z),
        "confluence": nz.CONFLUENCE,
        "edge": nz.EDGE,
    }


def _treatments_truth(t: _Treatments) -> dict[str, Any]:
    """Every treatment's compound, dose, MoA and effect (in parameter units)."""
    return {
        name: {
            "compound": t.compound[i],
            "dose": t.dose[i],
            "moa": t.moa[i],
            "is_control": i == 0,
            "effect": _by_param(t.effects[i]),
            "effect_norm": round(float(np.linalg.norm(t.effects[i])), 6),
        }
        for i, name in enumerate(t.names)
    }


def _plates_truth(
    cfg: ScreenConfig, draws: list[_BatchDraw], batch_names: list[str], plate_names: list[str]
) -> dict[str, Any]:
    """Every plate's batch, channel gains and density offset."""
    plates = {}
    for g, name in enumerate(plate_names):
        nuisance = draws[g // cfg.plates].nuisance
        plates[name] = {
            "batch": batch_names[g // cfg.plates],
            "gain": _by_channel(nuisance.plate_gain[g % cfg.plates]),
            "density_log": round(float(nuisance.plate_density[g % cfg.plates]), 6),
        }
    return plates


def _ground_truth(
    cfg: ScreenConfig,
    seed: int,
    t: _Treatments,
    draws: list[_BatchDraw],
    batch_names: list[str],
    plate_names: list[str],
) -> dict[str, Any]:
    """Everything the screen was drawn from, for ground_truth.json."""
    split_of = _batch_splits(cfg, batch_names)
    return {
        "version": VERSION,
        "seed": int(seed),
        "batch_strength": cfg.batch_strength,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "channels": CHANNELS,
        "pixel_scale": PIXEL_SCALE,
        "baseline_cell": BASE,
        "params": {p: {"unit": u, "kind": k, "meaning": d} for p, (u, k, d) in PARAMS.items()},
        "note": (
            "Effects are in parameter units (value x unit = change applied, see `params`). "
            "Batch gain/offset act on clean intensities (cells ~1.0) before pixel_scale. "
            "Nuisance knobs are centre + batch_strength x half-width x z (see `nuisance_model`); "
            "held-out (test) batches have |z| beyond the training range."
        ),
        "nuisance_model": _nuisance_model_truth(),
        "moas": t.truth_moas,
        "compounds": t.truth_compounds,
        "treatments": _treatments_truth(t),
        "batches": {
            name: {"split": split_of[name], **draws[b].nuisance.truth(CHANNELS)}
            for b, name in enumerate(batch_names)
        },
        "plates": _plates_truth(cfg, draws, batch_names, plate_names),
        "well_jitter": {"density_log_sd": 0.1, "intensity_log_sd": 0.04, "effect_sd_units": 0.2},
    }


def _design(cfg: ScreenConfig, seed: int) -> _Design:
    """Draw the whole screen design.

    Treatments come from ``rng([seed, 0])``; every batch (its nuisance, plate maps, well jitter
    and site focus) from its own stream (``nuisance.batch_rng``), so adding held-out batches
    changes no other batch.
    """
    rng = np.random.default_rng([seed, 0])
    units = np.array([PARAMS[p][0] for p in PARAM_NAMES])
    treatments = _draw_treatments(cfg, rng)
    contents = [i for i in range(1, len(treatments.names)) for _ in range(cfg.wells_per_treatment)]
    contents_arr = np.array(contents + [0] * cfg.control_wells, dtype=np.int64)

    batch_names = [f"B{b + 1:02d}" for b in range(cfg.batches)]
    keys = _batch_streams(cfg, seed, batch_names)
    draws = [_draw_batch(cfg, seed, key, contents_arr, units) for key in keys]
    samples, t_idx, plate_of, well_of, plate_names = _samples_table(
        cfg, batch_names, draws, treatments
    )
    truth = _ground_truth(cfg, seed, treatments, draws, batch_names, plate_names)
    nus = [d.nuisance for d in draws]
    batch_of = np.repeat(np.arange(cfg.batches), cfg.plates * cfg.n_wells * cfg.sites)

    # well-position (edge) effects: fewer cells and brighter stain near the plate's edge
    edge_w = nz.edge_weight(_well_positions(cfg.n_wells))
    edge = np.concatenate([np.tile(edge_w, cfg.plates) * n.edge for n in nus])
    well_intensity = np.concatenate([d.well_intensity for d in draws])
    well_intensity = well_intensity + nz.EDGE["log_intensity"] * edge[:, None]
    plate_density = np.concatenate([n.plate_density for n in nus])
    nuisance_density = (
        np.array([n.density for n in nus])[batch_of]
        + plate_density[plate_of]
        + nz.EDGE["log_density"] * edge[well_of]
    )
    blur = np.array([n.blur for n in nus])[batch_of]
    focus_sd = np.array([n.focus_sd for n in nus])[batch_of]
    image_blur = blur * np.exp(focus_sd * np.concatenate([d.focus for d in draws]))
    return _Design(
        cfg=cfg,
        samples=samples,
        effects=treatments.effects * units[None, :],  # stored as applied changes
        treat_of=t_idx,
        batch_of=batch_of,
        plate_of=plate_of,
        well_of=well_of,
        nuisance=nus,
        batch_gain=np.stack([n.gain for n in nus]),
        batch_offset=np.stack([n.offset for n in nus]),
        batch_gamma=np.stack([n.gamma for n in nus]),
        batch_saturation=np.stack([n.saturation for n in nus]),
        batch_bleed=np.stack([n.bleed for n in nus]),
        batch_read_noise=np.array([n.read_noise for n in nus]),
        batch_shot_noise=np.array([n.shot_noise for n in nus]),
        batch_size_drift=np.array([n.size_drift for n in nus]),
        batch_response=np.array([n.response for n in nus]),
        illumination=np.stack([nz.illumination(n, cfg.image_size) for n in nus]),
        plate_gain=np.concatenate([n.plate_gain for n in nus]),
        image_blur=image_blur,
        nuisance_density=nuisance_density,
        well_density=np.concatenate([d.well_density for d in draws]),
        well_intensity=well_intensity,
        well_effect=np.concatenate([d.well_effect for d in draws]),
        truth=truth,
    )


# ------------------------------------------------------------------------------------ rendering


def _deposit(
    canvas_shape: tuple[int, int, int],
    img: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    mass: np.ndarray,
) -> np.ndarray:
    """Bilinear point deposits (sub-pixel positions) into n canvases via one bincount."""
    n, hc, wc = canvas_shape
    y0 = np.floor(y).astype(np.int64)
    x0 = np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    idx, w = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < hc) & (xx >= 0) & (xx < wc)
            idx.append((img * hc + yy) * wc + xx)
            w.append(np.where(ok, wy * wx * mass, 0.0))
    flat = np.clip(np.concatenate(idx), 0, n * hc * wc - 1)
    out = np.bincount(flat, weights=np.concatenate(w), minlength=n * hc * wc)
    return out.reshape(n, hc, wc)


def _ellipse_points(
    rng: np.random.Generator, k: int, a: np.ndarray, b: np.ndarray, theta: np.ndarray, frac: float
) -> tuple[np.ndarray, np.ndarray]:
    """k points uniform inside ellipses (semi-axes a, b, angle theta) shrunk by frac."""
    r = np.sqrt(rng.random(k)) * frac
    phi = rng.random(k) * 2 * np.pi
    u, v = r * np.cos(phi) * a, r * np.sin(phi) * b
    c, s = np.cos(theta), np.sin(theta)
    return u * s + v * c, u * c - v * s  # (dy, dx)


def _patches(
    cy: np.ndarray, cx: np.ndarray, half: int, img: np.ndarray, hc: int, wc: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel offsets (dy, dx) of a (2*half+1)^2 patch per cell, its flat canvas index and mask."""
    d = np.arange(-half, half + 1)
    iy = np.floor(cy).astype(np.int64)
    ix = np.floor(cx).astype(np.int64)
    py = iy[:, None, None] + d[None, :, None]  # (T, P, 1)
    px = ix[:, None, None] + d[None, None, :]  # (T, 1, P)
    dy = (py + 0.5 - cy[:, None, None]).astype(np.float32)
    dx = (px + 0.5 - cx[:, None, None]).astype(np.float32)
    ok = (py >= 0) & (py < hc) & (px >= 0) & (px < wc)
    flat = (img[:, None, None] * hc + np.clip(py, 0, hc - 1)) * wc + np.clip(px, 0, wc - 1)
    return dy, dx, flat, ok


def _norm_radius(
    dy: np.ndarray, dx: np.ndarray, a: np.ndarray, b: np.ndarray, theta: np.ndarray
) -> np.ndarray:
    """Normalised elliptical radius (1 on the boundary) on patches."""
    c = np.cos(theta).astype(np.float32)[:, None, None]
    s = np.sin(theta).astype(np.float32)[:, None, None]
    u = (dy * s + dx * c) / a.astype(np.float32)[:, None, None]
    v = (dy * c - dx * s) / b.astype(np.float32)[:, None, None]
    return np.sqrt(u * u + v * v)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Unit-variance smoothed Gaussian noise fields (texture), one per leading index."""
    f = rng.standard_normal(shape, dtype=np.float32)
    f = ndimage.gaussian_filter(f, sigma=(0,) * (len(shape) - 2) + (sigma, sigma), mode="wrap")
    f /= f.std(axis=(-2, -1), keepdims=True) + 1e-6
    return f


@dataclass
class _Cells:
    """Every cell of one block of images: owner image, geometry and stain intensities."""

    img: np.ndarray  # (T,) image of each cell, 0..n-1
    cy: np.ndarray  # cell centre (canvas coordinates, margin included)
    cx: np.ndarray
    ny: np.ndarray  # nucleus centre
    nx: np.ndarray
    rc: np.ndarray  # cell and nucleus radii
    rn: np.ndarray
    ca: np.ndarray  # cell ellipse semi-axes and angle
    cb: np.ndarray
    theta_c: np.ndarray
    na: np.ndarray  # nucleus ellipse semi-axes and angle
    nb: np.ndarray
    theta_n: np.ndarray
    off: np.ndarray  # (T, 2) nucleus offset from the cell centre
    intensity: np.ndarray  # (T, C) per-cell stain intensities
    ring_w: np.ndarray  # (T,) cortical actin ring weight


def _place_cells(
    d: _Design, idx: np.ndarray, eff: np.ndarray, rng: np.random.Generator, margin: int
) -> _Cells:
    """Cells per image, positions (with optional clustering), shapes and intensities."""
    cfg = d.cfg
    n, size = len(idx), cfg.image_size
    scale = size / 64.0
    hc = wc = size + 2 * margin
    b_of, w_of = d.batch_of[idx], d.well_of[idx]
    nuis_density = d.nuisance_density[idx]
    log_density = eff[:, P["density"]] + nuis_density + d.well_density[w_of]
    area_factor = (hc * wc) / (size * size)
    counts = rng.poisson(cfg.cells_per_field * area_factor * np.exp(log_density))
    T = int(counts.sum())
    img = np.repeat(np.arange(n), counts)
    # confluence: cells in crowded fields (batch, plate, edge density) are smaller
    size_drift = d.batch_size_drift[b_of] + nz.CONFLUENCE["cell_size"] * nuis_density
    nuc_drift = 0.5 * d.batch_size_drift[b_of] + nz.CONFLUENCE["nuc_size"] * nuis_density
    rc_img = BASE["cell_radius_px"] * scale * np.exp(eff[:, P["cell_size"]] + size_drift)
    rn_img = BASE["nuc_radius_px"] * scale * np.exp(eff[:, P["nuc_size"]] + nuc_drift)
    clust = np.clip(BASE["clustering"] + eff[:, P["clustering"]], 0.0, 0.9)
    n_centres = 3
    centres = margin + rng.random((n, n_centres, 2)) * size
    cy = rng.random(T) * hc
    cx = rng.random(T) * wc
    in_cluster = rng.random(T) < clust[img]
    which = rng.integers(0, n_centres, T)
    spread = rng.normal(0.0, 1.0, (T, 2)) * (1.3 * rc_img[img])[:, None]
    cy = np.where(in_cluster, centres[img, which, 0] + spread[:, 0], cy)
    cx = np.where(in_cluster, centres[img, which, 1] + spread[:, 1], cx)

    rc = rc_img[img] * np.exp(rng.normal(0.0, 0.1, T))
    rn = np.minimum(rn_img[img] * np.exp(rng.normal(0.0, 0.1, T)), 0.75 * rc)
    c_asp = np.clip(
        np.abs(BASE["cell_log_aspect"] + eff[img, P["cell_ecc"]] + rng.normal(0.0, 0.15, T)),
        0.0,
        0.9,
    )
    n_asp = np.clip(
        np.abs(BASE["nuc_log_aspect"] + eff[img, P["nuc_ecc"]] + rng.normal(0.0, 0.1, T)), 0.0, 0.9
    )
    theta_c = rng.random(T) * np.pi
    theta_n = theta_c + rng.normal(0.0, 0.3, T)
    off = rng.normal(0.0, 0.12, (T, 2)) * rc[:, None]  # the nucleus sits off-centre in its cell

    # per-cell stain intensities: treatment ratios, well jitter and cell-to-cell variation
    base_int = np.array([BASE["intensity"][c] for c in CHANNELS])
    int_idx = [P[f"int_{c}"] for c in CHANNELS]
    log_int = eff[:, int_idx] + d.well_intensity[w_of]
    cell_int = base_int[None, :] * np.exp(log_int[img] + rng.normal(0.0, 0.15, (T, len(CHANNELS))))
    return _Cells(
        img=img, cy=cy, cx=cx, ny=cy + off[:, 0], nx=cx + off[:, 1], rc=rc, rn=rn,
        ca=rc * np.exp(c_asp / 2), cb=rc * np.exp(-c_asp / 2), theta_c=theta_c,
        na=rn * np.exp(n_asp / 2), nb=rn * np.exp(-n_asp / 2), theta_n=theta_n, off=off,
        intensity=cell_int, ring_w=BASE["actin_ring"] * np.exp(eff[img, P["actin_ring"]]),
    )  # fmt: skip


def _paint_cells(cells: _Cells, n: int, hc: int, wc: int, scale: float) -> np.ndarray:
    """Nuclei (DNA) and cytoplasm (ER, RNA, AGP, Mito diffuse) on per-cell patches: (C, n, hc, wc)."""
    c = cells
    canvas = np.zeros((len(CHANNELS), n * hc * wc))
    if len(c.img):
        half_n = int(math.ceil(float(c.na.max()) + 2.0 * scale + 1))
        dy, dx, flat, ok = _patches(c.ny, c.nx, half_n, c.img, hc, wc)
        rho = _norm_radius(dy, dx, c.na, c.nb, c.theta_n)
        edge = (c.rn / (0.8 * scale)).astype(np.float32)[:, None, None]
        nuc = np.clip((1.0 - rho) * edge + 0.5, 0.0, 1.0) * ok
        canvas[0] += np.bincount(
            flat.ravel(), (nuc * c.intensity[:, 0, None, None]).ravel(), minlength=n * hc * wc
        )
        canvas[2] += np.bincount(
            flat.ravel(), (0.2 * nuc * c.intensity[:, 2, None, None]).ravel(), minlength=n * hc * wc
        )

        half_c = int(math.ceil(float(c.ca.max()) + 2.0 * scale + 1))
        dy, dx, flat, ok = _patches(c.cy, c.cx, half_c, c.img, hc, wc)
        rho_c = _norm_radius(dy, dx, c.ca, c.cb, c.theta_c)
        edge = (c.rc / (1.5 * scale)).astype(np.float32)[:, None, None]
        cyto = np.clip((1.0 - rho_c) * edge + 0.5, 0.0, 1.0) * ok
        # nuclear exclusion in cytoplasmic stains, in the cytoplasm patch's coordinates
        rho_n = _norm_radius(
            dy - c.off[:, 0, None, None].astype(np.float32),
            dx - c.off[:, 1, None, None].astype(np.float32),
            c.na,
            c.nb,
            c.theta_n,
        )
        excl = np.clip((rho_n - 0.7) * 3.0, 0.0, 1.0)
        er = cyto * (0.25 + np.clip(1.3 - rho_c, 0.0, 1.0)) * (0.15 + 0.85 * excl)
        ring = np.clip(1.0 - np.abs(rho_c - 0.9) / 0.15, 0.0, 1.0) * ok
        agp = 0.35 * cyto + c.ring_w.astype(np.float32)[:, None, None] * ring
        rna = 0.4 * cyto * (0.4 + 0.6 * excl)
        mito = 0.15 * cyto * excl
        flat_r = flat.ravel()
        for ch, layer in ((1, er), (2, rna), (3, agp), (4, mito)):
            canvas[ch] += np.bincount(
                flat_r, (layer * c.intensity[:, ch, None, None]).ravel(), minlength=n * hc * wc
            )
    return canvas.reshape(len(CHANNELS), n, hc, wc)


def _paint_puncta(
    canvas: np.ndarray, cells: _Cells, eff: np.ndarray, rng: np.random.Generator, scale: float
) -> None:
    """Add nucleoli (RNA) inside nuclei and mitochondria (Mito) in the cytoplasm, in place."""
    c = cells
    _, n, hc, wc = canvas.shape
    k_nuc = rng.poisson(BASE["nucleoli_per_nucleus"] * np.exp(eff[c.img, P["nucleoli"]]))
    k_mit = rng.poisson(
        BASE["mito_per_cell"]
        * np.exp(eff[c.img, P["mito_spots"]])
        * (c.rc / (BASE["cell_radius_px"] * scale)) ** 2
    )
    spots = np.zeros((2, n, hc, wc))
    for layer, k, cyy, cxx, a, b, th, frac, ch in (
        (0, k_nuc, c.ny, c.nx, c.na, c.nb, c.theta_n, 0.6, 2),
        (1, k_mit, c.cy, c.cx, c.ca, c.cb, c.theta_c, 0.85, 4),
    ):
        owner = np.repeat(np.arange(len(c.img)), k)
        if len(owner):
            sy, sx = _ellipse_points(rng, len(owner), a[owner], b[owner], th[owner], frac)
            mass = c.intensity[owner, ch] * rng.uniform(0.5, 1.5, len(owner))
            spots[layer] = _deposit(
                (n, hc, wc), c.img[owner], cyy[owner] + sy, cxx[owner] + sx, mass
            )
    sig = 0.7 * scale
    spots = ndimage.gaussian_filter(spots, sigma=(0, 0, sig, sig)) * (2 * np.pi * sig * sig)
    canvas[2] += 0.9 * spots[0]
    canvas[4] += 1.0 * spots[1]


def _add_texture(x: np.ndarray, eff: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """Chromatin (DNA) and ER-network texture, multiplicative, in place on (n, C, H, W)."""
    n, _, size, _ = x.shape
    tex = _smooth_noise(rng, (n, 2, size, size), 0.8 * scale)
    dna_amp = np.clip(BASE["dna_texture"] + eff[:, P["dna_texture"]], 0.0, 1.0).astype(np.float32)
    er_amp = np.clip(BASE["er_texture"] + eff[:, P["er_texture"]], 0.0, 1.0).astype(np.float32)
    x[:, 0] *= np.clip(1.0 + dna_amp[:, None, None] * tex[:, 0], 0.05, None)
    x[:, 1] *= np.clip(1.0 + er_amp[:, None, None] * tex[:, 1], 0.05, None)


def _apply_batch_nuisance(
    d: _Design, idx: np.ndarray, x: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Bleed-through, blur (per site), illumination, staining response, gain/offset, shot and
    read noise; then 16-bit pixels."""
    b_of, pl_of = d.batch_of[idx], d.plate_of[idx]
    x = nz.bleed_through(x, d.batch_bleed[b_of])
    for i, sigma in enumerate(d.image_blur[idx]):
        x[i] = ndimage.gaussian_filter(x[i], sigma=(0, sigma, sigma))
    x *= d.illumination[b_of][:, None]
    x = nz.stain_response(x, d.batch_gamma[b_of], d.batch_saturation[b_of]).astype(np.float32)
    gain = (d.batch_gain[b_of] * d.plate_gain[pl_of]).astype(np.float32)
    x *= gain[:, :, None, None]
    x += d.batch_offset[b_of].astype(np.float32)[:, :, None, None]
    var = (d.batch_read_noise[b_of] ** 2).astype(np.float32)[:, None, None, None] + (
        d.batch_shot_noise[b_of].astype(np.float32)[:, None, None, None] * np.maximum(x, 0.0)
    )
    x += np.sqrt(var) * rng.standard_normal(x.shape, dtype=np.float32)
    return np.clip(np.rint(x * PIXEL_SCALE), 0, 65535).astype(np.uint16)


def _render_block(
    d: _Design, idx: np.ndarray, rng: np.random.Generator, with_masks: bool = False
) -> Any:
    """Render images ``idx`` (one fixed block) as uint16 (n, C, H, W).

    Cells are painted on a canvas with a margin (cells beyond the field edge still reach into
    it), then the field is cropped, textured and passed through the batch's optics and camera.
    The order of the random draws (cells, puncta, texture, noise) fixes the pixels for a seed.
    ``with_masks`` also returns the cells' label masks (n, 2, H, W), see :func:`_label_masks`
    (computed from the geometry alone: no random draw, so the pixels are the same either way).
    """
    n, size = len(idx), d.cfg.image_size
    scale = size / 64.0
    margin = int(math.ceil(14 * scale))
    hc = wc = size + 2 * margin
    eff, cells = _block_cells(d, idx, rng, margin)
    canvas = _paint_cells(cells, n, hc, wc, scale)
    _paint_puncta(canvas, cells, eff, rng, scale)
    x = np.ascontiguousarray(canvas[:, :, margin:-margin, margin:-margin].transpose(1, 0, 2, 3))
    x = x.astype(np.float32)
    _add_texture(x, eff, rng, scale)
    images = _apply_batch_nuisance(d, idx, x, rng)
    return (images, _label_masks(cells, n, hc, wc, margin)) if with_masks else images


def _block_cells(
    d: _Design, idx: np.ndarray, rng: np.random.Generator, margin: int
) -> tuple[np.ndarray, Any]:
    """The applied changes (n, n_params) of images ``idx`` and the cells placed in them.

    The changes are the treatment x batch response (weaker in crowded fields: confluence
    interacts with the treatment) plus replicate-well variation. The first random draws of a
    block, so the cells of a block can be recomputed without rendering it (mask tests).
    """
    response = d.batch_response[d.batch_of[idx]] * np.exp(
        nz.CONFLUENCE["response"] * d.nuisance_density[idx]
    )
    eff = d.effects[d.treat_of[idx]] * response[:, None] + d.well_effect[d.well_of[idx]]
    return eff, _place_cells(d, idx, eff, rng, margin)


def render(
    preset: str = "tiny", seed: int = 0, indices: np.ndarray | None = None, **overrides: Any
) -> np.ndarray:
    """Render images in memory (no dataset directory), e.g. for notebooks; uint16 (n, C, H, W)."""
    cfg = resolve_config(preset, **overrides)
    d = _design(cfg, seed)
    idx = np.arange(cfg.n_images) if indices is None else np.asarray(indices, dtype=np.int64)
    out = np.zeros((len(idx), len(CHANNELS), cfg.image_size, cfg.image_size), dtype=np.uint16)
    for block_idx, key in blocks(cfg, seed):
        sel = np.isin(idx, block_idx)
        if sel.any():
            imgs = _render_block(d, block_idx, np.random.default_rng(key))
            out[sel] = imgs[idx[sel] - block_idx[0]]
    return out


def blocks(cfg: ScreenConfig, seed: int) -> list[tuple[np.ndarray, list[int]]]:
    """The fixed rendering blocks: (image indices, random-stream key).

    Blocks never straddle batches: each batch's images are cut into runs of ``BLOCK`` and
    keyed by the batch's split and index within it, so adding batches changes no pixel of
    the others.
    """
    per_batch = cfg.plates * cfg.n_wells * cfg.sites
    names = [f"B{b + 1:02d}" for b in range(cfg.batches)]
    out = []
    for b, (split, k) in enumerate(_batch_streams(cfg, seed, names)):
        start = b * per_batch
        for j, a in enumerate(range(0, per_batch, BLOCK)):
            idx = np.arange(start + a, start + min(a + BLOCK, per_batch))
            out.append((idx, [seed, 1, nz.SPLIT_CODE[split], k, j]))
    return out


def render_masks(
    preset: str = "tiny", seed: int = 0, indices: np.ndarray | None = None, **overrides: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint16 (n, C, H, W) and their cell and nucleus label masks (n, 2, H, W)."""
    cfg = resolve_config(preset, **overrides)
    d = _design(cfg, seed)
    idx = np.arange(cfg.n_images) if indices is None else np.asarray(indices, dtype=np.int64)
    size = cfg.image_size
    out = np.zeros((len(idx), len(CHANNELS), size, size), dtype=np.uint16)
    masks = np.zeros((len(idx), len(MASK_OBJECTS), size, size), dtype=MASK_DTYPE)
    for block_idx, key in blocks(cfg, seed):
        sel = np.isin(idx, block_idx)
        if not sel.any():
            continue
        imgs, labels = _render_block(d, block_idx, np.random.default_rng(key), with_masks=True)
        pos = np.searchsorted(block_idx, idx[sel])
        out[sel] = imgs[pos]
        masks[sel] = labels[pos]
    return out, masks


def _owner_of_pixels(
    flat: np.ndarray, rho: np.ndarray, inside: np.ndarray, n_pixels: int
) -> np.ndarray:
    """Per canvas pixel, 1 + the cell whose normalised radius there is smallest (0: none)."""
    n_cells = flat.shape[0]
    cell = np.broadcast_to(np.arange(n_cells)[:, None, None], flat.shape)[inside]
    f = flat[inside]
    # One integer key (pixel, quantised radius, cell) sorts by pixel, then nearest cell, with
    # ties broken by cell number: one argsort instead of a lexsort, 10x faster.
    bits_c = max(1, n_cells.bit_length())
    bits_q = 62 - max(1, n_pixels.bit_length()) - bits_c
    q = np.minimum(rho[inside], 1.0) * float((1 << bits_q) - 1)
    key = (f.astype(np.int64) << (bits_q + bits_c)) | (q.astype(np.int64) << bits_c) | cell
    key.sort()
    f = key >> (bits_q + bits_c)
    first = np.ones(len(f), dtype=bool)
    first[1:] = f[1:] != f[:-1]
    owner = np.zeros(n_pixels, dtype=np.int64)
    owner[f[first]] = (key[first] & ((1 << bits_c) - 1)) + 1
    return owner


def _label_masks(cells: _Cells, n: int, hc: int, wc: int, margin: int) -> np.ndarray:
    """Label masks (n, 2, H, W) of the field: cells, then nuclei; 0 is background.

    A pixel belongs to a nucleus (cell) where it lies inside the ellipse's boundary, which is
    where the painted profile passes half its height (normalised radius < 1); where ellipses
    overlap, to the one whose normalised radius is smallest. A nucleus's pixels belong to its
    own cell. Cells are numbered 1..k per image in the order they were drawn, and a nucleus
    carries the number of its cell (CellProfiler's parent-child convention).
    """
    c = cells
    total = n * hc * wc
    labels = np.zeros((2, total), dtype=np.int64)
    if len(c.img):
        for layer, (yy, xx, a, b, th) in enumerate(
            ((c.cy, c.cx, c.ca, c.cb, c.theta_c), (c.ny, c.nx, c.na, c.nb, c.theta_n))
        ):
            half = int(math.ceil(float(a.max()) + 1))
            dy, dx, flat, ok = _patches(yy, xx, half, c.img, hc, wc)
            rho = _norm_radius(dy, dx, a, b, th)
            labels[layer] = _owner_of_pixels(flat, rho, ok & (rho < 1.0), total)
        labels[0] = np.where(labels[1] > 0, labels[1], labels[0])
    field = labels.reshape(2, n, hc, wc)[:, :, margin:-margin, margin:-margin]
    field = np.ascontiguousarray(field.transpose(1, 0, 2, 3))
    out = np.zeros(field.shape, dtype=MASK_DTYPE)
    for i in range(n):  # renumber 1..k per image, in drawing order
        ids = np.unique(field[i])
        ids = ids[ids > 0]
        lut = np.zeros(int(ids[-1]) + 1 if len(ids) else 1, dtype=np.int64)
        lut[ids] = np.arange(1, len(ids) + 1)
        out[i] = lut[field[i]]
    return out


def design_samples(preset: str = "tiny", seed: int = 0, **overrides: Any) -> pd.DataFrame:
    """The samples table of a screen without rendering it."""
    return _design(resolve_config(preset, **overrides), seed).samples.copy()


# --------------------------------------------------------------------------------------- writing


def reusable(out: Path, key: dict[str, Any]) -> bool:
    """True when ``out`` holds a complete, valid dataset built with exactly this key."""
    out = Path(out)
    if not (out / INFO_FILE).exists():
        return False
    try:
        info = validate(out)
    except DatasetError:
        return False
    same = json.dumps(info.build, sort_keys=True) == json.dumps(key, sort_keys=True)
    return same and (out / MASKS_DIR).exists()  # built before cell masks were exported: redo


def generate(
    out: Path,
    preset: str = "tiny",
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: bool = False,
    **overrides: Any,
) -> Path:
    """Render the screen into the dataset directory ``out`` (resumable, atomic); returns ``out``.

    An existing dataset built with the same preset, seed and overrides is reused as it is;
    another dataset at ``out`` is replaced only with ``overwrite``.
    """
    out = Path(out)
    cfg = resolve_config(preset, **overrides)
    key = build_key(preset, seed, **overrides)
    if out.exists():
        if not overwrite and reusable(out, key):
            return out
        is_dataset = (out / INFO_FILE).exists()
        if not overwrite:
            what = "a different dataset" if is_dataset else "files"
            raise DatasetError(
                f"{out}: already holds {what}; pass --overwrite or choose another --out"
            )
        if not out.is_dir() or (not is_dataset and any(out.iterdir())):
            raise DatasetError(
                f"{out}: exists and is not a dataset directory; --overwrite only replaces datasets"
            )
        if not is_dataset:
            shutil.rmtree(out)  # an empty directory
    d = _design(cfg, seed)
    size = cfg.image_size
    name = f"synthetic-{preset}-seed{seed}"
    info = DatasetInfo(
        name=name,
        source="synthetic",
        channels=list(CHANNELS),
        dtype="uint16",
        image_size=[size, size],
        n_images=cfg.n_images,
        build=key,
    )
    writer = DatasetWriter(out, info, build_key=key, mask_objects=MASK_OBJECTS)
    pending = writer.pending()
    bar = None
    if progress:
        bar = tqdm(total=len(pending), unit="img", desc=f"synth {preset}", leave=False)
        if writer.resumed:
            done = cfg.n_images - len(pending)
            bar.write(f"resuming: {done} of {cfg.n_images} images already done", file=sys.stderr)
    for block_idx, rng_key in blocks(cfg, seed):
        todo = np.isin(block_idx, pending)
        if not todo.any():
            continue
        imgs, masks = _render_block(d, block_idx, np.random.default_rng(rng_key), with_masks=True)
        writer.write(block_idx[todo], imgs[todo], masks[todo])
        if bar is not None:
            bar.update(int(todo.sum()))
    if bar is not None:
        bar.close()
    truth = json.dumps(d.truth, indent=1, sort_keys=True)
    return writer.commit(d.samples, extra_files={GROUND_TRUTH_FILE: truth}, overwrite=True)
