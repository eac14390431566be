"""Typed config: presets, key=value overrides, type checks and helpful errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cdcl.config import Config, config_diff, config_from_dict, load_config, preset_names
from cdcl.errors import ConfigError

METHODS = ("supervised", "dino", "byol", "dino-cb", "byol-cb", "cdcl", "cdcl-same-batch")
REQUIRED_PRESETS = (
    [f"synthetic-{m}" for m in METHODS]
    + [f"rxrx1-{m}" for m in METHODS]
    + [
        "cpg0004-supervised",
        "cpg0004-cdcl",
        "cpg0004-cdcl-same-batch",
        "bbbc021-dino",
        "bbbc021-cdcl",
        "bbbc021-cdcl-same-batch",
        "generic-cdcl-same-batch",
    ]
)


def test_every_required_preset_ships() -> None:
    """All presets other engineers rely on are package data."""
    assert set(REQUIRED_PRESETS) <= set(preset_names())


@pytest.mark.parametrize("name", sorted(preset_names()))
def test_every_preset_loads_and_round_trips(name: str) -> None:
    """Each preset type-checks, names a known method, and survives dict/YAML round trips."""
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    expected = name.split("-", 1)[1].replace("-", "_")
    assert cfg.method.name == expected
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("family", ["synthetic", "rxrx1", "cpg0004", "bbbc021", "generic"])
def test_same_batch_control_differs_from_cdcl_only_in_its_name(family: str) -> None:
    """X-cdcl-same-batch is X-cdcl with method.name cdcl_same_batch (its pairing follows)."""
    cdcl, ctrl = load_config(f"{family}-cdcl"), load_config(f"{family}-cdcl-same-batch")
    assert config_diff(cdcl.to_dict(), ctrl.to_dict()) == {
        "method.name": ("cdcl", "cdcl_same_batch")
    }
    assert (cdcl.method.resolved().pairing, ctrl.method.resolved().pairing) == (
        "cross_batch",
        "same_batch",
    )


def test_seed_faithful_values() -> None:
    """RxRx1/cpg0004 presets carry the reference implementation's settings (docs/design.md §4-5)."""
    r = load_config("rxrx1-cdcl")
    assert (r.model.arch, r.views.resize, r.views.global_size, r.views.local_size) == (
        "vit_small_patch16_224",
        256,
        224,
        112,
    )
    assert (r.train.batch_size, r.train.epochs, r.train.lr, r.method.out_dim) == (
        92,
        200,
        7e-4,
        4096,
    )
    assert (r.train.ema_momentum, r.train.ema_momentum_end, r.train.clip_grad) == (
        0.995,
        0.9996,
        3.0,
    )
    # The seed's params.json: DINO.hidden_dim 1024, bottleneck_dim 512, projection_size 4096.
    assert (r.method.hidden_dim, r.method.bottleneck_dim) == (1024, 512)
    assert load_config("cpg0004-cdcl").views.global_scale == (0.75, 0.9)
    assert (
        load_config("rxrx1-byol").train.weight_decay_end
        == load_config("rxrx1-byol").train.weight_decay
    )


def test_unknown_key_names_it_and_lists_valid_keys() -> None:
    """A typo is an error naming the key, a suggestion, and every valid key of the section."""
    with pytest.raises(ConfigError) as e:
        load_config("synthetic-dino", ["train.epoch=1"])
    msg = str(e.value)
    assert "train.epoch" in msg and "did you mean `epochs`" in msg
    for valid in ("batch_size", "lr", "max_steps", "save_every_steps"):
        assert valid in msg
    with pytest.raises(ConfigError, match="unknown config section `trian`.*valid sections: data"):
        load_config("synthetic-dino", ["trian.epochs=1"])
    with pytest.raises(ConfigError, match="must be section.key"):
        load_config("synthetic-dino", ["epochs=1"])


def test_unknown_key_in_a_yaml_file_is_an_error(tmp_path: Path) -> None:
    """Presets are checked as strictly as overrides, and the message names the file."""
    p = tmp_path / "mine.yaml"
    p.write_text("extends: synthetic-dino\nmodel:\n  archh: resnet18\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "model.archh" in str(e.value) and "arch," in str(e.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs=abc", "expected int"),
        ("train.epochs=1.5", "expected int"),
        ("views.global_scale=[1]", "expected [float, float]"),
        ("train.amp=fp8", "one of 'auto', 'bf16', 'off'"),
        ("method.head_bn=maybe", "expected bool"),
        ("train.lr=fast", "expected float"),
    ],
)
def test_ill_typed_values_name_key_and_type(override: str, expected: str) -> None:
    """An ill-typed value names the key and the expected type."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config("synthetic-dino", [override])
    assert f"`{key}`" in str(e.value) and expected in str(e.value)


def test_zero_false_and_null_overrides_are_honoured() -> None:
    """0, false and null replace non-zero preset values (the reference implementation ignored numeric zeros)."""
    base = load_config("synthetic-dino")
    assert (
        base.method.head_bn is True and base.train.clip_grad == 3.0 and base.train.warmup_epochs > 0
    )
    cfg = load_config(
        "synthetic-dino",
        [
            "method.head_bn=false",
            "train.clip_grad=0",
            "train.warmup_epochs=0",
            "train.seed=0",
            "views.flip_p=0",
            "train.save_every_steps=null",
            "model.drop_path=0.0",
        ],
    )
    assert cfg.method.head_bn is False
    assert cfg.train.clip_grad == 0.0 and cfg.train.warmup_epochs == 0.0
    assert cfg.train.seed == 0 and cfg.views.flip_p == 0.0 and cfg.model.drop_path == 0.0
    assert cfg.train.save_every_steps is None
    seeded = load_config("synthetic-dino", ["train.seed=7"])
    assert load_config(None, ["train.seed=0"]).train.seed == 0 and seeded.train.seed == 7


def test_value_parsing() -> None:
    """YAML values: exponent floats, lists to tuples, strings kept as written, ranges checked."""
    cfg = load_config(
        "synthetic-cdcl",
        [
            "train.lr=1e-4",
            "views.global_scale=[0.75, 0.9]",
            "model.arch=resnet18",
            "data.subset=only_controls",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.views.global_scale == (0.75, 0.9)
    assert cfg.model.arch == "resnet18" and cfg.data.subset == "only_controls"
    with pytest.raises(ConfigError, match="train.epochs.*at least 1"):
        load_config("synthetic-dino", ["train.epochs=0"])
    with pytest.raises(ConfigError, match="method.name"):
        load_config("synthetic-dino", ["method.name=simclr"])


def test_presets_by_name_and_path(tmp_path: Path) -> None:
    """Unknown preset names list the available ones; a YAML path works and may extend a preset."""
    with pytest.raises(ConfigError, match="unknown preset `synthetic-cdlc`.*synthetic-cdcl"):
        load_config("synthetic-cdlc")
    p = tmp_path / "long.yaml"
    p.write_text("extends: synthetic-cdcl\ntrain:\n  epochs: 3\n")
    cfg = load_config(p, ["train.batch_size=4"])
    assert cfg.method.name == "cdcl" and cfg.train.epochs == 3 and cfg.train.batch_size == 4
    diff = config_diff(load_config("synthetic-cdcl").to_dict(), cfg.to_dict())
    assert set(diff) == {"train.epochs", "train.batch_size"}
