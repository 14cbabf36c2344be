"""Loading Hugging Face layout checkpoints: resolve a directory or hub id, read config.json, build the model on
the meta device and fill it from (possibly sharded) safetensors with strict key accounting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from kvzoo.config import ModelConfig
from kvzoo.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from kvzoo.models.base import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files fetched from the hub for a model: config, weights, tokenizer.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "additional_chat_templates/*.jinja"]


def resolve_checkpoint_dir(path_or_hub_id: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded through huggingface-hub."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_local:
        raise CheckpointError(f"{text}: not a checkpoint directory (it does not exist or is not a directory)")
    return _download_from_hub(text)


def _download_from_hub(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types: offline, 404, gated, auth
        raise CheckpointError(
            f"could not fetch {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Pass a local checkpoint directory instead, or check the id and your network/HF_TOKEN."
        ) from e


def checkpoint_files(ckpt_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it (single file or sharded index)."""
    index = ckpt_dir / INDEX_FILE
    single = ckpt_dir / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (expected a 'weight_map' object): {e}")
        files = {name: ckpt_dir / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which is missing from {ckpt_dir}")
        return files
    if single.is_file():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{ckpt_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _open(path: Path):  # noqa: ANN202 - safetensors' handle type is private
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupted?): {e}") from e


def model_class_for(cfg: ModelConfig) -> "type[CausalLM]":
    from kvzoo.models import FAMILIES

    return FAMILIES[cfg.family]


def resolve_dtype(dtype: torch.dtype | str | None, ckpt_dir: Path) -> torch.dtype:
    """An explicit dtype, else the checkpoint's `torch_dtype`/`dtype`, else float32."""
    if dtype is None:
        raw = json.loads((ckpt_dir / "config.json").read_text())
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"dtype {dtype!r} is not a torch floating-point dtype (e.g. 'float32', 'bfloat16')")
    return resolved


def load_pretrained(
    path_or_hub_id: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    family_class: "type[CausalLM] | None" = None,
) -> "CausalLM":
    """Build the model for the checkpoint's config and load its weights (and tokenizer, when present)."""
    ckpt_dir = resolve_checkpoint_dir(path_or_hub_id)
    cfg = ModelConfig.from_file(ckpt_dir)
    cls = model_class_for(cfg)
    if family_class is not None and not issubclass(cls, family_class):
        raise ConfigError(
            f"{ckpt_dir / 'config.json'}: this is a {cfg.family} checkpoint, not {family_class.family}; "
            f"use kvzoo.{cls.__name__} or kvzoo.load"
        )
    torch_dtype = resolve_dtype(dtype, ckpt_dir)
    with torch.device("meta"):
        model = cls(cfg)
    load_weights(model, ckpt_dir, torch_dtype, torch.device(device))
    model.eval()
    model.tokenizer = _maybe_tokenizer(ckpt_dir)
    return model


def load_weights(model: "CausalLM", ckpt_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Fill a meta-device model from the checkpoint; every key must be accounted for, every shape must match."""
    files = checkpoint_files(ckpt_dir)
    expected = dict(model.named_parameters())
    ignorable = set(model.tied_head_keys())
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - ignorable - {k for k in files if k.endswith("rotary_emb.inv_freq")})
    if missing:
        raise CheckpointError(
            f"{ckpt_dir}: {len(missing)} weight(s) missing from the checkpoint, e.g. {missing[:5]} "
            f"(a {model.config.family} model with this config.json needs them)"
        )
    if unexpected:
        where = files[unexpected[0]].name
        raise CheckpointError(
            f"{ckpt_dir}: {len(unexpected)} unexpected weight(s) in the checkpoint, e.g. {unexpected[:5]} "
            f"(first one in {where}); they do not belong to a {model.config.family} model with this config.json"
        )
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with _open(path) as f:
            for name in names:
                want = tuple(expected[name].shape)
                got = tuple(f.get_slice(name).get_shape())
                if got != want:
                    raise CheckpointError(f"{path.name}: tensor {name!r} has shape {list(got)}, expected {list(want)}")
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name!r} (truncated file?): {e}") from e
                state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)


def _maybe_tokenizer(ckpt_dir: Path):  # noqa: ANN202
    if not any((ckpt_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    from kvzoo.tokenizer import Tokenizer

    return Tokenizer.from_dir(ckpt_dir)


def load(path_or_hub_id: str | Path, dtype: torch.dtype | str | None = None,
         device: torch.device | str = "cpu") -> "CausalLM":
    """Load any supported checkpoint; the family is read from config.json (`model_type` / `architectures`)."""
    return load_pretrained(path_or_hub_id, dtype=dtype, device=device)
