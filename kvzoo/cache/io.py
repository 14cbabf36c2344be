"""Saving and loading a KV cache: one safetensors file, tensors plus a JSON header saying what it belongs to.

Tensors are named `layers.<i>.<k|v|logw|score|pos|budget>` and `layers.<i>.state.<name>`. The header (the
safetensors metadata entry "kvzoo") records the format version, the kvzoo version, the model config and the
tokenizer fingerprint the cache was built with, the method with every field, the dtype, the sequences'
lengths, and a sha256 of every tensor's bytes. Loading checks each of them against the model and refuses
a mismatch with a one-line `CacheFileError` naming it. Nothing is unpickled: safetensors holds raw tensors
only, and the method is rebuilt from its registry name and fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kvzoo.cache.slots import KVCache, LayerSlots
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.cache.base import CompressionMethod
    from kvzoo.models.base import CausalLM

FORMAT = "kvzoo-cache"
FORMAT_VERSION = 1
HEADER_KEY = "kvzoo"
SLOT_TENSORS = ("k", "v", "logw", "score", "pos", "budget")
# State written under another name by earlier kvzoo versions (same tensor, same meaning): ZSMerge's two marks of
# the induction heads, merged into one (`induction_head`).
RENAMED_STATE = {"sum_head": "induction_head", "reading_head": "induction_head"}


class CacheFileError(KvzooError):
    """A saved cache cannot be read, or does not belong to the model it is loaded into."""


def model_origin(model: "CausalLM") -> dict[str, Any]:
    """What a cache built by `model` belongs to: its config (every field) and its tokenizer's fingerprint."""
    return {
        "config": model.config.to_dict(),
        "tokenizer": model.tokenizer.fingerprint if model.tokenizer is not None else None,
    }


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of a model config's fields (canonical JSON): equal for the same architecture and sizes."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def method_spec(method: "CompressionMethod") -> dict[str, Any]:
    """{"name": registry name, "fields": every dataclass field} (JSON values: tuples become lists)."""
    from kvzoo.cache.registry import METHODS

    name = next((n for n, cls in METHODS.items() if cls is type(method)), None)
    if name is None:
        raise KvzooError(f"{type(method).__name__} is not registered (kvzoo.cache.registry.register), so a cache "
                         "using it cannot be saved")
    fields = dataclasses.asdict(method) if dataclasses.is_dataclass(method) else {}  # type: ignore[arg-type]
    return {"name": name, "fields": fields}


def _method_from_spec(spec: dict[str, Any], path: Path) -> "CompressionMethod":
    from kvzoo.cache.registry import METHODS

    cls = METHODS.get(spec.get("name", ""))
    if cls is None:
        raise CacheFileError(f"{path}: the cache uses compression method {spec.get('name')!r}, which this kvzoo "
                             f"does not know (known: {', '.join(sorted(METHODS))})")
    known = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    fields = spec.get("fields", {})
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise CacheFileError(f"{path}: the cache's {cls.__name__} has fields {unknown} this kvzoo does not know")
    # JSON turned tuples into lists; give tuple-typed fields their tuples back.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return cls(**values)
    except KvzooError as e:
        raise CacheFileError(f"{path}: the header's method is invalid: {e}") from e


def _tensors(cache: KVCache) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(cache.layers):
        for name in SLOT_TENSORS:
            out[f"layers.{i}.{name}"] = getattr(layer, name)
        for name, t in layer.state.items():
            out[f"layers.{i}.state.{name}"] = t
    # Own contiguous copies: state tensors may be shared between layers, which safetensors refuses.
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in out.items()}


def _digest(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> str:
    """sha256 over the header (but its own "sha256") and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _version() -> str:
    import kvzoo

    return kvzoo.__version__


def save_cache(cache: KVCache, path: str | os.PathLike[str], notes: dict[str, Any] | None = None) -> None:
    """Write `cache` to `path` (safetensors; written to a temporary file, then renamed into place)."""
    if not cache.origin:
        raise KvzooError("this cache does not record which model built it; build it with model.prefill(...)")
    path = Path(path)
    tensors = _tensors(cache)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kvzoo_version": _version(),
        "model_fingerprint": config_fingerprint(cache.origin["config"]),
        "model_config": cache.origin["config"],
        "tokenizer": cache.origin.get("tokenizer"),
        "method": method_spec(cache.method),  # type: ignore[arg-type]
        "dtype": str(cache.dtype).removeprefix("torch."),
        "num_layers": len(cache.layers),
        "lengths": list(cache.lengths),
        "tokens_seen": cache.tokens_seen,
        "state": list(cache.layers[0].state),  # in order: `LayerSlots.tensors()` lists them so
        "notes": notes or {},
    }
    header["sha256"] = _digest(tensors, header)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KvzooError(f"{path}: cannot write the cache: {e}") from e


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a saved cache, checked for format and version (no tensor is read)."""
    path = Path(path)
    with _open(path) as f:
        meta = f.metadata() or {}
    return _parse_header(meta, path)


def _open(path: Path):  # noqa: ANN202 - safetensors' handle type is private
    if not path.is_file():
        raise CacheFileError(f"{path}: no such cache file")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CacheFileError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from e


def _parse_header(meta: dict[str, str], path: Path) -> dict[str, Any]:
    raw = meta.get(HEADER_KEY)
    if raw is None:
        raise CacheFileError(f"{path}: not a kvzoo cache (no '{HEADER_KEY}' header in the safetensors metadata)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CacheFileError(f"{path}: the kvzoo header is not valid JSON (edited?): {e}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CacheFileError(f"{path}: not a kvzoo cache (header format is not {FORMAT!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise CacheFileError(
            f"{path}: cache format version {header.get('format_version')!r} (written by kvzoo "
            f"{header.get('kvzoo_version')}) is incompatible with this kvzoo {_version()}, which reads version "
            f"{FORMAT_VERSION}; prefill the document again")
    missing = [k for k in ("model_config", "method", "dtype", "num_layers", "lengths", "tokens_seen", "state",
                           "sha256") if k not in header]
    if missing:
        raise CacheFileError(f"{path}: the kvzoo header lacks {missing} (edited or truncated?)")
    return header


def _check_belongs_to(header: dict[str, Any], model: "CausalLM", path: Path) -> None:
    want = model_origin(model)
    saved_cfg, cfg = header["model_config"], want["config"]
    diff = [k for k in sorted(set(saved_cfg) | set(cfg)) if saved_cfg.get(k) != cfg.get(k)]
    if diff:
        shown = ", ".join(f"{k}: cache {saved_cfg.get(k)!r} vs model {cfg.get(k)!r}" for k in diff[:3])
        raise CacheFileError(f"{path}: the cache was built by a different model ({shown})")
    if header.get("tokenizer") != want["tokenizer"]:
        raise CacheFileError(
            f"{path}: the cache was built with a different tokenizer (fingerprint "
            f"{str(header.get('tokenizer'))[:12]} vs the model's {str(want['tokenizer'])[:12]})")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if header["dtype"] != dtype:
        raise CacheFileError(f"{path}: the cache holds {header['dtype']} keys and values, the model runs in {dtype}; "
                             f"load the model with dtype={header['dtype']!r} or prefill again")


def load_cache(path: str | os.PathLike[str], model: "CausalLM") -> KVCache:
    """Read a cache saved by `KVCache.save` for `model` (on the model's device), after checking that it belongs
    to this model, tokenizer and dtype, and that its tensors are exactly the ones written."""
    path = Path(path)
    with _open(path) as f:
        header = _parse_header(f.metadata() or {}, path)
        _check_belongs_to(header, model, path)
        try:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CacheFileError(f"{path}: cannot read the tensors (truncated file?): {e}") from e
    if _digest(tensors, header) != header["sha256"]:
        raise CacheFileError(f"{path}: the tensors or header do not match the header's sha256 (edited or damaged)")
    method = _method_from_spec(header["method"], path)
    device = next(model.parameters()).device
    layers = []
    for i in range(header["num_layers"]):
        try:
            parts = {name: tensors[f"layers.{i}.{name}"].to(device) for name in SLOT_TENSORS}
            state = {RENAMED_STATE.get(name, name): tensors[f"layers.{i}.state.{name}"].to(device)
                     for name in header["state"]}
        except KeyError as e:
            raise CacheFileError(f"{path}: tensor {e.args[0]!r} is missing") from e
        layers.append(LayerSlots(**parts, state=state))
    return KVCache(layers=layers, method=method, tokens_seen=int(header["tokens_seen"]),
                   lengths=[int(n) for n in header["lengths"]], origin=model_origin(model))
