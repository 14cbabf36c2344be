"""Loading Hugging Face layout checkpoints: resolve a directory or hub id, read config.json, build the model on
the meta device and fill it from (possibly sharded) safetensors with strict key accounting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from kvzoo.config import ModelConfig
from kvzoo.errors import CheckpointError, ConfigError
from kvzoo.json_file import read_json_object

if TYPE_CHECKING:
    from kvzoo.models.base import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files fetched from the hub for a model: config, weights, tokenizer.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "additional_chat_templates/*.jinja"]


# A hub id is `owner/name`: letters, digits, '-', '_', '.'; neither part starts with '.' or '-'.
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*")


def hub_id_or_none(text: str) -> str | None:
    """`text` if it can only mean a Hugging Face hub id, else None (it is a local path).

    The rule: a local path is anything that exists, starts with '.', '/' or '~', has other than exactly one
    '/', contains characters a hub id cannot ('\\', spaces, ...), or whose first component is an existing
    local directory (`weights/smollm2-135m` where `weights/` exists is a mistyped path, not an owner)."""
    if Path(text).expanduser().exists() or not _HUB_ID.fullmatch(text) or ".." in text:
        return None
    return None if Path(text.split("/")[0]).is_dir() else text


def resolve_checkpoint_dir(path_or_hub_id: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded through huggingface-hub (see `hub_id_or_none`)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    hub_id = None if isinstance(path_or_hub_id, Path) else hub_id_or_none(text)
    if hub_id is None:
        what = "is not a directory" if path.exists() else "does not exist"
        raise CheckpointError(f"{text}: no such checkpoint directory ({what}, and it is not a hub id 'owner/name')")
    return _download_from_hub(hub_id)


def _download_from_hub(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types: offline, 404, gated, auth
        reason = (str(e).strip().splitlines() or [""])[0][:200]  # one line: the client's messages run long
        raise CheckpointError(
            f"{hub_id}: not a local directory, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {reason}); check the path, or the id and your network / HF_TOKEN"
        ) from e


def checkpoint_files(ckpt_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it (single file or sharded index)."""
    index = ckpt_dir / INDEX_FILE
    single = ckpt_dir / SINGLE_FILE
    if index.is_file():
        weight_map = read_json_object(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid safetensors index (expected a 'weight_map' object, got "
                                  f"{type(weight_map).__name__})")
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


DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
                 "half": "float16", "float": "float32"}
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # what --dtype lists


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """'bf16' / 'bfloat16' / 'torch.bfloat16' / torch.bfloat16 -> torch.bfloat16 (floating-point dtypes only)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().replace("torch.", "")
    resolved = getattr(torch, DTYPE_ALIASES.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"dtype {dtype!r} is not a floating-point dtype; use one of {', '.join(DTYPE_NAMES)}")
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, ckpt_dir: Path) -> torch.dtype:
    """An explicit dtype (aliases as in `parse_dtype`), else the checkpoint's `torch_dtype`/`dtype`, else float32."""
    if dtype is None:
        raw = read_json_object(ckpt_dir / "config.json", ConfigError)
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return parse_dtype(dtype)


def load_pretrained(
    path_or_hub_id: str | Path,
    family_class: "type[CausalLM]",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> "CausalLM":
    """Build the model for the checkpoint's config and load its weights (and tokenizer, when present).

    `family_class` is the class asked for (CausalLM: any family); the models package passes it, so loading
    never imports the models."""
    ckpt_dir = resolve_checkpoint_dir(path_or_hub_id)
    cfg = ModelConfig.from_file(ckpt_dir)
    cls = family_class.class_for(cfg.family)
    if not issubclass(cls, family_class):
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
    # The state dict's keys are the checkpoint layout (fused projections show up as their parts).
    expected = model.state_dict()
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
