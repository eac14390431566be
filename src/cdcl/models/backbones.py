"""timm backbones with C input channels, mapping (N,C,H,W) to features (N,D).

ViTs return the CLS token (num_classes=0) with ``dynamic_img_size=True`` so global and local
crops of different sizes go through the same network; ResNets return the global-pooled map.
Nothing is ever downloaded: ``pretrained=False`` always; weights only come from a local file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors  # a dependency of timm
from timm.layers import resample_abs_pos_embed

from cdcl.errors import CdclError, ConfigError

# Keys under which training frameworks nest the network's state_dict.
_NESTED_KEYS = ("state_dict", "model", "teacher", "student", "module", "backbone")
_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "_orig_mod.")


@dataclass
class ModelConfig:
    """Backbone settings (timm architecture name + optional size overrides)."""

    arch: str = "vit_small_patch16_224"
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.1
    weights: str | None = None
    img_size: int | None = None


def is_vit(arch: str) -> bool:
    """Whether a timm architecture name is a Vision Transformer."""
    return arch.startswith(("vit", "deit"))


def build_backbone(cfg: ModelConfig, in_chans: int, img_size: int) -> tuple[nn.Module, int]:
    """A timm network for ``in_chans`` channels and its feature dimension D."""
    kwargs: dict[str, Any] = {
        "pretrained": False,
        "num_classes": 0,
        "in_chans": int(in_chans),
        "drop_path_rate": float(cfg.drop_path),
    }
    if is_vit(cfg.arch):
        kwargs["img_size"] = int(cfg.img_size or img_size)
        kwargs["dynamic_img_size"] = True
        # Crops whose size is not a multiple of the patch size (e.g. 28 px, patch 8) are padded.
        kwargs["dynamic_img_pad"] = True
        for key in ("patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(cfg, key) is not None:
                kwargs[key] = int(getattr(cfg, key))
    else:
        given = [k for k in ("patch_size", "embed_dim", "depth", "num_heads") if getattr(cfg, k)]
        if given:
            raise ConfigError(
                f"model.{given[0]}: only ViT architectures take it; unset it for `{cfg.arch}`"
            )
    try:
        net = timm.create_model(cfg.arch, **kwargs)
    except RuntimeError as e:  # timm: unknown model name
        raise ConfigError(f"model.arch `{cfg.arch}`: {e}; use a timm model name") from None
    except TypeError as e:
        raise ConfigError(f"model.arch `{cfg.arch}`: unsupported option ({e})") from None
    if cfg.weights:
        net.load_report = load_weights(net, cfg.weights, in_chans)  # type: ignore[attr-defined]
    return net, int(net.num_features)


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common checkpoint layouts and strip wrapper prefixes."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nxt = next((obj[k] for k in _NESTED_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if nxt is None:
            break
        obj = nxt
    if not isinstance(obj, dict):
        return {}
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed and sd:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CdclError(
            f"{path}: cannot be read as a weights-only torch state_dict ({type(e).__name__})"
        ) from None
    return _unwrap(obj)


def _adapt_input_conv(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-layer kernel (O,C',k,k) to C input channels: mean over C', repeat, rescale.

    The rescaling by C'/C keeps the response to an image whose channels are all equal.
    """
    src = w.shape[1]
    return w.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (src / in_chans)


def load_weights(net: nn.Module, weights: str | Path, in_chans: int) -> dict[str, list[str]]:
    """Load a local state_dict into ``net``; adapt the input conv and ViT position embedding.

    Returns {"missing": [...], "unexpected": [...], "adapted": [...]}; missing/unexpected keys
    are also warned about. A missing file, an unreadable one or one that matches no parameter
    is a CdclError.
    """
    path = Path(weights)
    if not path.is_file():
        raise CdclError(f"model.weights: file {path} not found; give a local .pth/.safetensors")
    sd = _read_state_dict(path)
    own = net.state_dict()
    adapted: list[str] = []
    for key, value in list(sd.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        target = own[key]
        if (
            value.dim() == 4
            and value.shape[0] == target.shape[0]
            and value.shape[2:] == target.shape[2:]
        ):
            sd[key] = _adapt_input_conv(value, target.shape[1])
            adapted.append(key)
        elif key == "pos_embed" and value.dim() == 3 and value.shape[-1] == target.shape[-1]:
            n_prefix = getattr(net, "num_prefix_tokens", 1)
            grid = net.patch_embed.grid_size  # type: ignore[union-attr]
            sd[key] = resample_abs_pos_embed(value, list(grid), num_prefix_tokens=n_prefix)
            adapted.append(key)
        else:
            raise CdclError(
                f"{path}: `{key}` has shape {tuple(value.shape)} but model.arch expects "
                f"{tuple(target.shape)}; check model.arch and its size overrides"
            )
    result = net.load_state_dict(sd, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if len(missing) == len(own):
        raise CdclError(f"{path}: no key matches the model `{type(net).__name__}`; wrong file?")
    if missing or unexpected:
        warnings.warn(
            f"{path}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected keys (e.g. {unexpected[:3]})",
            stacklevel=2,
        )
    return {"missing": missing, "unexpected": unexpected, "adapted": adapted}
