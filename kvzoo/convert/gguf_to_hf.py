"""Convert a GGUF file (llama.cpp) into a Hugging Face checkpoint directory.

Supported architectures:

- `llama` -- LLaMA-family files, including Mistral models that llama.cpp publishes as `llama` (detected by
  "mistral" in `general.name`; they become a `MistralForCausalLM` config). llama.cpp stores the rows of each
  q/k projection in interleaved-RoPE order; they are put back into Hugging Face's rotate-half order.
- `falcon` -- Falcon 7B style (multi-query, one layer norm) and 40B/180B style (grouped KV, two layer norms).
  llama.cpp stores the fused QKV projection as [all q heads, all k heads, all v heads]; it is regrouped into the
  per-KV-group layout of `FalconForCausalLM`.

Every tensor is dequantized to float32 with `gguf.quants.dequantize`. The tokenizer is rebuilt from the GGUF
vocabulary as a `tokenizer.json` (byte-level BPE for `tokenizer.ggml.model == "gpt2"`, byte-fallback
sentencepiece-style BPE for `"llama"`), with `tokenizer_config.json` carrying the chat template and special tokens.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvzoo.convert.common import (
    ProgressBar,
    ShardedSafetensorsWriter,
    check_out_dir,
    interleaved_to_half,
    llama_family_config,
    staged_output_dir,
    write_json,
)
from kvzoo.errors import CheckpointError, KvzooError

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "falcon")

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_MISSING = object()


def _import_gguf():  # noqa: ANN202
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise KvzooError("converting GGUF files needs the `gguf` package: pip install gguf") from e
    return gguf


# --------------------------------------------------------------------------------------------------------------
# Reading the file


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_TYPE_STRING, _TYPE_ARRAY = 8, 9
_MAX_DIMS = 4


class _Truncated(Exception):
    pass


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first); GGUF lists dimensions innermost first
    ggml_type: int
    offset: int  # absolute position of the data in the file
    n_bytes: int


class GGUFFile:
    """A minimal, fast GGUF (v2/v3, little-endian) container reader.

    `metadata` maps keys to Python values (arrays become lists); `tensors` lists the tensor infos in file order;
    `raw(t)` is a zero-copy uint8 view of a tensor's bytes shaped for `gguf.quants.dequantize`. (gguf's own
    `GGUFReader` builds a numpy view per vocabulary string, which takes seconds for a 50k-token vocabulary.)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        with open(self.path, "rb") as f:
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise CheckpointError(
                    f"{self.path}: not a GGUF file (the first bytes are {magic!r}, a GGUF file starts with the magic "
                    f"bytes {GGUF_MAGIC!r})"
                )
            self.size = os.fstat(f.fileno()).st_size
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 4
        try:
            self._parse()
        except _Truncated as e:
            self.close()
            raise CheckpointError(
                f"{self.path}: truncated GGUF file ({self.size} bytes): the header ends early while reading {e}"
            ) from None
        except CheckpointError:
            self.close()
            raise

    # -- low-level reads -----------------------------------------------------------------------------------
    def _take(self, n: int, what: str) -> int:
        pos = self._pos
        if n < 0 or pos + n > self.size:
            raise _Truncated(what)
        self._pos = pos + n
        return pos

    def _scalar(self, fmt: str, what: str) -> Any:
        pos = self._take(struct.calcsize(fmt), what)
        return struct.unpack_from("<" + fmt, self._mm, pos)[0]

    def _string(self, what: str) -> str:
        n = self._scalar("Q", what)
        pos = self._take(n, what)
        try:
            return self._mm[pos : pos + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} is not valid UTF-8 ({e})") from None

    def _value(self, vtype: int, what: str) -> Any:
        if vtype == _TYPE_STRING:
            return self._string(what)
        if vtype in _SCALAR_FORMATS:
            return self._scalar(_SCALAR_FORMATS[vtype], what)
        if vtype == _TYPE_ARRAY:
            etype = self._scalar("I", what)
            count = self._scalar("Q", what)
            if etype in _SCALAR_FORMATS:
                fmt = "<" + _SCALAR_FORMATS[etype]
                pos = self._take(count * struct.calcsize(fmt), what)
                return np.frombuffer(self._mm, dtype=np.dtype(fmt), count=count, offset=pos).tolist()
            if etype in (_TYPE_STRING, _TYPE_ARRAY):
                if count * 8 > self.size - self._pos:  # every element takes at least 8 bytes
                    raise _Truncated(what)
                return [self._value(etype, what) for _ in range(count)]
            raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} has unknown array element type {etype}")
        raise CheckpointError(f"{self.path}: corrupt GGUF file: {what} has unknown value type {vtype}")

    # -- structure ---------------------------------------------------------------------------------------------
    def _parse(self) -> None:
        gguf = _import_gguf()
        version = self._scalar("I", "the version")
        if version & 0xFFFF == 0 and version:
            raise CheckpointError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (only versions 2 and 3)")
        n_tensors = self._scalar("Q", "the tensor count")
        n_kv = self._scalar("Q", "the metadata count")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = self._string(f"metadata key #{i}")
            vtype = self._scalar("I", f"the type of metadata key {key!r}")
            self.metadata[key] = self._value(vtype, f"metadata key {key!r}")
        infos = []
        for i in range(n_tensors):
            name = self._string(f"tensor info #{i}")
            n_dims = self._scalar("I", f"tensor {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise CheckpointError(f"{self.path}: corrupt GGUF file: tensor {name!r} has {n_dims} dimensions")
            dims = [self._scalar("Q", f"tensor {name!r}") for _ in range(n_dims)]
            ggml_type = self._scalar("I", f"tensor {name!r}")
            offset = self._scalar("Q", f"tensor {name!r}")
            infos.append((name, dims, ggml_type, offset))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{self.path}: corrupt GGUF file: general.alignment is {alignment!r}")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: list[GGUFTensorInfo] = []
        seen = set()
        for name, dims, ggml_type, offset in infos:
            if name in seen:
                raise CheckpointError(f"{self.path}: corrupt GGUF file: tensor {name!r} appears twice")
            seen.add(name)
            try:
                qtype = gguf.GGMLQuantizationType(ggml_type)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has unknown ggml type {ggml_type}") from None
            if dims[0] % block:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r}: row length {dims[0]} is not a multiple of the {qtype.name} block "
                    f"size {block}"
                )
            n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
            start = data_start + offset
            if start + n_bytes > self.size:
                raise CheckpointError(
                    f"{self.path}: truncated GGUF file: tensor {name!r} needs bytes {start}..{start + n_bytes} but the "
                    f"file is {self.size} bytes long"
                )
            self.tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, start, n_bytes))

    def raw(self, t: GGUFTensorInfo) -> np.ndarray:
        gguf = _import_gguf()
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)]
        byte_shape = (*t.shape[:-1], t.shape[-1] // block * type_size)
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.n_bytes, offset=t.offset).reshape(byte_shape)

    def close(self) -> None:
        try:
            self._mm.close()
        except (BufferError, ValueError, AttributeError):
            pass  # views are still alive; the mapping goes away with them


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of a GGUF file, or raise a `CheckpointError` saying what is wrong with it."""
    return GGUFFile(path)


class _Metadata:
    """Typed access to GGUF key/value metadata with errors that name the file and key."""

    def __init__(self, metadata: dict[str, Any], path: Path) -> None:
        self.metadata = metadata
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.metadata

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return value

    def int(self, key: str, default: Any = _MISSING) -> int:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        if isinstance(value, list):  # some files store a per-layer array; kvzoo needs one value for all layers
            if value and all(v == value[0] for v in value):
                value = value[0]
            else:
                raise CheckpointError(f"{self.path}: {key!r} differs between layers ({value!r}); not supported")
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} should be an integer, got {value!r}")
        return value

    def float(self, key: str, default: Any = _MISSING) -> float:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} should be a number, got {value!r}")
        return _short_float(value)


def _short_float(x: float) -> float:
    """GGUF stores float32; write the shortest decimal that reads back as the same float32 (1e-05, not
    9.999999747378752e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


# --------------------------------------------------------------------------------------------------------------
# Architectures: config and tensor mapping


@dataclass
class _Plan:
    """What to write: the config, and for each GGUF tensor its HF name and a transform of its values."""

    config: dict[str, Any]
    tensors: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]] = field(default_factory=dict)


_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([A-Za-z0-9_]+)\.(weight|bias)$")
_GLOBAL = re.compile(r"^([A-Za-z0-9_]+)\.(weight|bias)$")


def _np_shape(t: GGUFTensorInfo) -> tuple[int, ...]:
    return t.shape


def _unsupported_tensors(path: Path, names: list[str], arch: str) -> CheckpointError:
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    hint = ""
    if any(n.startswith("rope_freqs") for n in names):
        hint = " (rope_freqs means Llama-3.1-style RoPE scaling, which kvzoo does not implement)"
    elif any("_exps" in n or "ffn_gate_inp" in n for n in names):
        hint = " (mixture-of-experts layers are not supported)"
    return CheckpointError(f"{path}: unsupported tensors for a {arch!r} GGUF file: {shown}{hint}")


def _rope_scaling(meta: _Metadata, arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta.float(f"{arch}.rope.scaling.factor")}
    raise CheckpointError(f"{meta.path}: RoPE scaling type {kind!r} is not supported (only 'linear')")


def _llama_plan(meta: _Metadata, tensors: dict[str, Any]) -> _Plan:
    path, arch = meta.path, "llama"
    hidden = meta.int(f"{arch}.embedding_length")
    n_layers = meta.int(f"{arch}.block_count")
    n_heads = meta.int(f"{arch}.attention.head_count")
    n_kv = meta.int(f"{arch}.attention.head_count_kv", n_heads)
    if n_kv < 1 or n_heads % n_kv:
        raise CheckpointError(f"{path}: head_count ({n_heads}) is not a multiple of head_count_kv ({n_kv})")
    head_dim = meta.int(f"{arch}.attention.key_length", hidden // n_heads)
    value_dim = meta.int(f"{arch}.attention.value_length", head_dim)
    rope_dim = meta.int(f"{arch}.rope.dimension_count", head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise CheckpointError(
            f"{path}: key_length {head_dim}, value_length {value_dim} and rope.dimension_count {rope_dim} differ; "
            "kvzoo needs one head_dim with full rotary embeddings"
        )

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab_size, emb_dim = _np_shape(tensors["token_embd.weight"])
    if emb_dim != hidden:
        raise CheckpointError(f"{path}: token_embd.weight has width {emb_dim}, expected embedding_length {hidden}")
    meta_vocab = meta.int(f"{arch}.vocab_size", vocab_size)
    if meta_vocab != vocab_size:
        raise CheckpointError(f"{path}: {arch}.vocab_size is {meta_vocab} but token_embd.weight has {vocab_size} rows")
    ffn_up = tensors.get("blk.0.ffn_up.weight")
    intermediate = meta.int(f"{arch}.feed_forward_length", _np_shape(ffn_up)[0] if ffn_up is not None else _MISSING)

    name = str(meta.get("general.name") or "")
    is_mistral = "mistral" in name.lower()
    plan = _Plan(config={})
    unknown: list[str] = []
    attn_bias: set[str] = set()
    mlp_bias: set[str] = set()
    for tname in tensors:
        m = _BLOCK.match(tname)
        if m:
            layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
            if part not in _LLAMA_LAYER or layer >= n_layers:
                unknown.append(tname)
                continue
            if kind == "bias":
                if part in ("attn_norm", "ffn_norm"):
                    unknown.append(tname)
                    continue
                (attn_bias if part.startswith("attn") else mlp_bias).add(part)
            hf = f"model.layers.{layer}.{_LLAMA_LAYER[part]}.{kind}"
            transform = None
            if part == "attn_q":
                transform = _permute(n_heads, tname)
            elif part == "attn_k":
                transform = _permute(n_kv, tname)
            plan.tensors[tname] = (hf, transform)
            continue
        m = _GLOBAL.match(tname)
        if m and m.group(1) in _LLAMA_GLOBAL and m.group(2) == "weight":
            plan.tensors[tname] = (f"{_LLAMA_GLOBAL[m.group(1)]}.weight", None)
            continue
        unknown.append(tname)
    if unknown:
        raise _unsupported_tensors(path, unknown, arch)
    if attn_bias and attn_bias != {"attn_q", "attn_k", "attn_v", "attn_output"}:
        raise CheckpointError(f"{path}: biases on only some attention projections ({sorted(attn_bias)}); not supported")
    if mlp_bias and mlp_bias != {"ffn_gate", "ffn_up", "ffn_down"}:
        raise CheckpointError(f"{path}: biases on only some MLP projections ({sorted(mlp_bias)}); not supported")
    if is_mistral and (attn_bias or mlp_bias):
        is_mistral = False  # MistralConfig has no bias switches; the LLaMA config describes the same network

    expected = {
        "token_embd.weight": (vocab_size, hidden),
        "output_norm.weight": (hidden,),
    }
    for i in range(n_layers):
        p = f"blk.{i}."
        expected.update({
            p + "attn_norm.weight": (hidden,),
            p + "attn_q.weight": (n_heads * head_dim, hidden),
            p + "attn_k.weight": (n_kv * head_dim, hidden),
            p + "attn_v.weight": (n_kv * head_dim, hidden),
            p + "attn_output.weight": (hidden, n_heads * head_dim),
            p + "ffn_norm.weight": (hidden,),
            p + "ffn_gate.weight": (intermediate, hidden),
            p + "ffn_up.weight": (intermediate, hidden),
            p + "ffn_down.weight": (hidden, intermediate),
        })
        if attn_bias:
            expected.update({p + "attn_q.bias": (n_heads * head_dim,), p + "attn_k.bias": (n_kv * head_dim,),
                             p + "attn_v.bias": (n_kv * head_dim,), p + "attn_output.bias": (hidden,)})
        if mlp_bias:
            expected.update({p + "ffn_gate.bias": (intermediate,), p + "ffn_up.bias": (intermediate,),
                             p + "ffn_down.bias": (hidden,)})
    tied = "output.weight" not in tensors
    if not tied:
        expected["output.weight"] = (vocab_size, hidden)
    _check_shapes(path, tensors, expected)

    plan.config = llama_family_config(
        mistral=is_mistral,
        hidden=hidden,
        intermediate=intermediate,
        layers=n_layers,
        heads=n_heads,
        kv_heads=n_kv,
        head_dim=head_dim,
        norm_eps=meta.float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.float(f"{arch}.rope.freq_base", 10000.0),
        context=meta.int(f"{arch}.context_length", 4096),
        vocab_size=vocab_size,
        tied=tied,
        sliding_window=meta.int(f"{arch}.attention.sliding_window", None) if is_mistral else None,
        attention_bias=bool(attn_bias),
        mlp_bias=bool(mlp_bias),
        rope_scaling=_rope_scaling(meta, arch),
    )
    return plan


def _permute(n_heads: int, what: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: interleaved_to_half(w, n_heads, what)


_FALCON_LAYER = {
    "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}
_FALCON_GLOBAL = {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f", "output": "lm_head"}


def falcon_qkv_from_gguf(w: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """llama.cpp's fused QKV rows [q heads..., k heads..., v heads...] -> Falcon's grouped layout, where each of the
    `n_kv` groups holds its `n_heads / n_kv` query heads, then its key head, then its value head."""
    rest = tuple(w.shape[1:])
    per_group = n_heads // n_kv
    q = w[: n_heads * head_dim].reshape(n_kv, per_group, head_dim, *rest)
    k = w[n_heads * head_dim : (n_heads + n_kv) * head_dim].reshape(n_kv, 1, head_dim, *rest)
    v = w[(n_heads + n_kv) * head_dim :].reshape(n_kv, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(w.shape)


def falcon_qkv_to_gguf(w: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Inverse of `falcon_qkv_from_gguf` (what llama.cpp's converter does)."""
    rest = tuple(w.shape[1:])
    g = w.reshape(n_kv, n_heads // n_kv + 2, head_dim, *rest)
    q = g[:, :-2].reshape(n_heads * head_dim, *rest)
    k = g[:, -2].reshape(n_kv * head_dim, *rest)
    v = g[:, -1].reshape(n_kv * head_dim, *rest)
    return torch.cat([q, k, v]).reshape(w.shape)


def _falcon_plan(meta: _Metadata, tensors: dict[str, Any]) -> _Plan:
    path, arch = meta.path, "falcon"
    hidden = meta.int(f"{arch}.embedding_length")
    n_layers = meta.int(f"{arch}.block_count")
    n_heads = meta.int(f"{arch}.attention.head_count")
    n_kv = meta.int(f"{arch}.attention.head_count_kv", 1)
    if hidden % n_heads or n_kv < 1 or n_heads % n_kv:
        raise CheckpointError(f"{path}: inconsistent head counts: hidden {hidden}, heads {n_heads}, kv heads {n_kv}")
    head_dim = hidden // n_heads
    layout = meta.get(f"{arch}.tensor_data_layout")
    if layout not in (None, "jploski"):
        raise CheckpointError(f"{path}: unknown Falcon tensor_data_layout {layout!r} (expected 'jploski')")
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab_size, _ = _np_shape(tensors["token_embd.weight"])
    up = tensors.get("blk.0.ffn_up.weight")
    ffn = meta.int(f"{arch}.feed_forward_length", _np_shape(up)[0] if up is not None else 4 * hidden)
    two_norms = "blk.0.attn_norm_2.weight" in tensors
    new_arch = two_norms or n_kv > 1
    linear_bias = "blk.0.attn_qkv.bias" in tensors

    plan = _Plan(config={})
    unknown: list[str] = []
    for tname in tensors:
        m = _BLOCK.match(tname)
        if m:
            layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
            if layer >= n_layers:
                unknown.append(tname)
            elif part == "attn_norm":
                norm = "ln_attn" if two_norms else "input_layernorm"
                plan.tensors[tname] = (f"transformer.h.{layer}.{norm}.{kind}", None)
            elif part == "attn_norm_2":
                plan.tensors[tname] = (f"transformer.h.{layer}.ln_mlp.{kind}", None)
            elif part in _FALCON_LAYER:
                transform = None
                if part == "attn_qkv":
                    transform = lambda w: falcon_qkv_from_gguf(w, n_heads, n_kv, head_dim)  # noqa: E731
                plan.tensors[tname] = (f"transformer.h.{layer}.{_FALCON_LAYER[part]}.{kind}", transform)
            else:
                unknown.append(tname)
            continue
        m = _GLOBAL.match(tname)
        if m and m.group(1) in _FALCON_GLOBAL and (m.group(2) == "weight" or m.group(1) == "output_norm"):
            plan.tensors[tname] = (f"{_FALCON_GLOBAL[m.group(1)]}.{m.group(2)}", None)
            continue
        unknown.append(tname)
    if unknown:
        raise _unsupported_tensors(path, unknown, arch)

    qkv_rows = (n_heads + 2 * n_kv) * head_dim
    expected = {"token_embd.weight": (vocab_size, hidden), "output_norm.weight": (hidden,),
                "output_norm.bias": (hidden,)}
    for i in range(n_layers):
        p = f"blk.{i}."
        expected.update({
            p + "attn_norm.weight": (hidden,), p + "attn_norm.bias": (hidden,),
            p + "attn_qkv.weight": (qkv_rows, hidden), p + "attn_output.weight": (hidden, hidden),
            p + "ffn_up.weight": (ffn, hidden), p + "ffn_down.weight": (hidden, ffn),
        })
        if two_norms:
            expected.update({p + "attn_norm_2.weight": (hidden,), p + "attn_norm_2.bias": (hidden,)})
        if linear_bias:
            expected.update({p + "attn_qkv.bias": (qkv_rows,), p + "attn_output.bias": (hidden,),
                             p + "ffn_up.bias": (ffn,), p + "ffn_down.bias": (hidden,)})
    tied = "output.weight" not in tensors
    if not tied:
        expected["output.weight"] = (vocab_size, hidden)
    _check_shapes(path, tensors, expected)

    plan.config = {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "hidden_size": hidden,
        "ffn_hidden_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_kv_heads": n_kv,
        "new_decoder_architecture": new_arch,
        "multi_query": not new_arch,
        "parallel_attn": True,
        "num_ln_in_parallel_attn": 2 if two_norms else 1,
        "bias": linear_bias,
        "alibi": False,
        "activation": "gelu",
        "layer_norm_epsilon": meta.float(f"{arch}.attention.layer_norm_epsilon", 1e-5),
        "rope_theta": meta.float(f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(meta, arch),
        "max_position_embeddings": meta.int(f"{arch}.context_length", 2048),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "use_cache": True,
    }
    return plan


def _check_shapes(path: Path, tensors: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    missing = [n for n in expected if n not in tensors]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: tensors missing from the GGUF file: {shown}")
    for name, shape in expected.items():
        got = _np_shape(tensors[name])
        if got != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")


_PLANNERS = {"llama": _llama_plan, "falcon": _falcon_plan}


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the remaining 68 bytes are given the code points 256, 257, ...
    in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


# `tokenizer.ggml.pre` -> the regex transformers' GGUF loader splits text with before byte-level BPE. Any other
# value (e.g. "smollm", "gpt2", "falcon", "default") gets tokenizers' built-in GPT-2 split (ByteLevel use_regex),
# which is also what transformers does for those values.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
         "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_SPLIT),
}


def _read_tokenizer_metadata(meta: _Metadata) -> dict[str, Any] | None:
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return None
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.model is {model!r} but tokenizer.ggml.tokens is missing")
    return {
        "model": model,
        "pre": meta.get("tokenizer.ggml.pre"),
        "tokens": tokens,
        "token_type": meta.get("tokenizer.ggml.token_type") or [],
        "scores": meta.get("tokenizer.ggml.scores"),
        "merges": meta.get("tokenizer.ggml.merges"),
        "bos": meta.get("tokenizer.ggml.bos_token_id"),
        "eos": meta.get("tokenizer.ggml.eos_token_id"),
        "eot": meta.get("tokenizer.ggml.eot_token_id"),
        "unk": meta.get("tokenizer.ggml.unknown_token_id"),
        "pad": meta.get("tokenizer.ggml.padding_token_id"),
        "add_bos": meta.get("tokenizer.ggml.add_bos_token"),
        "add_eos": meta.get("tokenizer.ggml.add_eos_token"),
        "add_space_prefix": meta.get("tokenizer.ggml.add_space_prefix"),
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def _merges_from_file(merges: list[str]) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise CheckpointError(f"malformed BPE merge {m!r} in tokenizer.ggml.merges (expected 'left right')")
        out.append((left, right))
    return out


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary that lists no merges.

    Every way of splitting a token into two tokens of the vocabulary is a merge; merges are ranked by the score of
    the token they produce (higher first), ties by longer left then longer right part, then by vocabulary order.
    """
    index = {t: i for i, t in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))
    ranked: list[tuple[float, int, int, str, str]] = []
    for token in index:
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in index and token[k:] in index]
        pairs.sort(key=lambda p: (index[p[0]], index[p[1]]))
        ranked.extend((score_of[token], len(left), len(right), left, right) for left, right in pairs)
    ranked.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)  # stable: equal keys keep vocabulary order
    return [(r[3], r[4]) for r in ranked]


def build_tokenizer(info: dict[str, Any], source: Path):  # noqa: ANN201 - tokenizers.Tokenizer
    """A `tokenizers.Tokenizer` equivalent to the GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = info["tokens"]
    types: list[int] = list(info["token_type"] or [])
    kind = info["model"]
    if kind == "gpt2":
        alphabet = byte_level_alphabet()
        spelled = set(alphabet.values())
        vocab = {
            (t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
            for i, t in enumerate(tokens)
        }
        if info["merges"] is None:
            raise CheckpointError(f"{source}: byte-level BPE vocabulary without tokenizer.ggml.merges")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_file(info["merges"]), dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(info["pre"] or "")
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel()
        # A control token spelled outside the byte alphabet is a mislabelled vocabulary entry; adding it would
        # change the vocabulary (transformers skips these too).
        control_ok = lambda t: set(t) <= spelled  # noqa: E731
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        if info["merges"] is not None:
            merges = _merges_from_file(info["merges"])
        elif info["scores"] is not None:
            merges = merges_from_scores(tokens, info["scores"])
        else:
            raise CheckpointError(f"{source}: sentencepiece vocabulary with neither merges nor scores")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        prefix = info["add_space_prefix"] is not False
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        control_ok = lambda t: True  # noqa: E731
    else:
        raise CheckpointError(
            f"{source}: tokenizer model {kind!r} is not supported (kvzoo builds 'gpt2' byte-level BPE and 'llama' "
            "sentencepiece-style vocabularies)"
        )
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL and control_ok(t)]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)

    add_bos, add_eos = _add_bos_eos(info)
    bos = _token(info, "bos")
    eos = _token(info, "eos")
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = ([(bos, info["bos"])] if add_bos else []) + ([(eos, info["eos"])] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def _token(info: dict[str, Any], key: str) -> str | None:
    idx = info.get(key)
    if idx is None or not 0 <= idx < len(info["tokens"]):
        return None
    return info["tokens"][idx]


def _add_bos_eos(info: dict[str, Any]) -> tuple[bool, bool]:
    add_bos = info["add_bos"]
    if add_bos is None:  # llama.cpp adds BOS to sentencepiece vocabularies unless told otherwise
        add_bos = info["model"] == "llama"
    add_eos = bool(info["add_eos"])
    return bool(add_bos) and _token(info, "bos") is not None, add_eos and _token(info, "eos") is not None


def _tokenizer_config(info: dict[str, Any], max_len: int) -> dict[str, Any]:
    add_bos, add_eos = _add_bos_eos(info)
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name in ("bos", "eos", "unk", "pad"):
        token = _token(info, name)
        if token is not None:
            cfg[f"{name}_token"] = token
    cfg.update({
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    })
    if info["chat_template"]:
        cfg["chat_template"] = info["chat_template"]
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Entry point


def _dequantize(f: GGUFFile, t: GGUFTensorInfo, gguf: Any) -> torch.Tensor:
    qtype = gguf.GGMLQuantizationType(t.ggml_type)
    try:
        arr = gguf.quants.dequantize(f.raw(t), qtype)
    except NotImplementedError as e:
        raise CheckpointError(f"{f.path}: tensor {t.name!r}: cannot dequantize type {qtype.name}: {e}") from e
    arr = np.asarray(arr, dtype=np.float32)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=np.float32, order="C", copy=True)  # detach from the read-only memory map
    return torch.from_numpy(arr).reshape(t.shape)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, force: bool = False, progress: bool = True) -> Path:
    """Convert a llama.cpp GGUF file into a Hugging Face checkpoint directory (float32 weights); return `out_dir`.

    Writes `config.json`, `generation_config.json`, `model.safetensors` and, when the file has a vocabulary,
    `tokenizer.json` and `tokenizer_config.json`. Raises `CheckpointError` for a file that is not GGUF, is
    truncated, has an unsupported architecture or layout, or when `out_dir` exists and is not empty (unless
    `force`).
    """
    gguf_path = Path(gguf_path)
    out_dir = check_out_dir(out_dir, force)
    reader = open_gguf(gguf_path)
    try:
        gguf = _import_gguf()
        meta = _Metadata(reader.metadata, gguf_path)
        arch = meta.get("general.architecture")
        if arch not in _PLANNERS:
            raise CheckpointError(
                f"{gguf_path}: unsupported GGUF architecture {arch!r}; "
                f"kvzoo converts {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        tensors = {t.name: t for t in reader.tensors}
        plan = _PLANNERS[arch](meta, tensors)
        tok_info = _read_tokenizer_metadata(meta)

        config = plan.config
        gen: dict[str, Any] = {}
        if tok_info is not None:
            for key in ("bos", "eos", "pad"):
                if tok_info[key] is not None:
                    config[f"{key}_token_id"] = tok_info[key]
                    gen[f"{key}_token_id"] = tok_info[key]
            if tok_info["eot"] is not None and tok_info["eos"] is not None and tok_info["eot"] != tok_info["eos"]:
                gen["eos_token_id"] = [tok_info["eos"], tok_info["eot"]]
        config["torch_dtype"] = "float32"
        tokenizer = build_tokenizer(tok_info, gguf_path) if tok_info is not None else None
        if tokenizer is None:
            print(f"kvzoo: {gguf_path} has no vocabulary; writing no tokenizer files", file=sys.stderr)

        with staged_output_dir(out_dir, force) as tmp:
            writer = ShardedSafetensorsWriter(tmp)
            with ProgressBar(len(reader.tensors), f"converting {gguf_path.name}", enabled=progress) as bar:
                for t in reader.tensors:
                    hf_name, transform = plan.tensors[t.name]
                    w = _dequantize(reader, t, gguf)
                    if transform is not None:
                        w = transform(w)
                    writer.add(hf_name, w)
                    bar.update(1, t.name)
            writer.close()
            write_json(tmp / "config.json", dict(sorted(config.items())))
            write_json(tmp / "generation_config.json", gen)
            if tokenizer is not None:
                tokenizer.save(str(tmp / "tokenizer.json"))
                tok_config = _tokenizer_config(tok_info, config["max_position_embeddings"])
                write_json(tmp / "tokenizer_config.json", tok_config)
    finally:
        reader.close()
    return out_dir


__all__ = ["convert_gguf", "open_gguf", "build_tokenizer", "byte_level_alphabet", "merges_from_scores",
           "falcon_qkv_from_gguf", "falcon_qkv_to_gguf", "PRE_TOKENIZER_SPLITS"]
