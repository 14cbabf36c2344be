"""One `ModelConfig` for every family, read from a Hugging Face `config.json`.

Field names follow the LLaMA config; Falcon's legacy names (`n_head`, `n_head_kv`, `n_layer`, `n_embed`) and
transformers 4.x / 5.x spellings of RoPE settings (`rope_theta` / `rope_parameters`) are all accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kvzoo.errors import ConfigError
from kvzoo.json_file import read_json_object

# model_type (or an `architectures` entry) -> family name
FAMILY_BY_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "mistral",
    "falcon": "falcon",
    "RefinedWeb": "falcon",
    "RefinedWebModel": "falcon",
}
FAMILY_BY_ARCHITECTURE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "FalconForCausalLM": "falcon",
    "RWForCausalLM": "falcon",
}
SUPPORTED_ROPE_TYPES = ("default", "linear")


@dataclass
class ModelConfig:
    family: str  # "llama" | "mistral" | "falcon"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0  # rope_scaling {"rope_type": "linear", "factor": f}: positions divided by f
    tie_word_embeddings: bool = False
    # Mistral: a query at position p attends to keys at positions p - sliding_window + 1 ... p (None: all).
    sliding_window: int | None = None
    attention_bias: bool = False  # LLaMA: biases on q/k/v/o projections
    mlp_bias: bool = False
    # Falcon only.
    falcon_layout: str = ""  # "multi_query" (7B) | "grouped" (40B/180B new_decoder_architecture) | "mha"
    parallel_attn: bool = False  # attention and MLP read the same input and are summed
    num_ln_in_parallel_attn: int = 1  # 2: separate ln_attn / ln_mlp (40B style)
    bias: bool = False  # Falcon linear biases
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def num_query_groups(self) -> int:
        """Query heads per KV head (G)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """Bytes of keys and values one token occupies in an uncompressed cache, summed over layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read `config.json` (the file, or the directory that holds it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        return cls.from_hf_dict(read_json_object(path, ConfigError), source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        family = detect_family(raw, source)
        reader = _FieldReader(raw, source)
        if family == "falcon":
            return _falcon_config(reader)
        return _llama_config(reader, family)


def detect_family(raw: dict[str, Any], source: str = "config") -> str:
    """The model family from `model_type`, else from `architectures`."""
    model_type = raw.get("model_type")
    if model_type in FAMILY_BY_MODEL_TYPE:
        return FAMILY_BY_MODEL_TYPE[model_type]
    for arch in raw.get("architectures") or []:
        if arch in FAMILY_BY_ARCHITECTURE:
            return FAMILY_BY_ARCHITECTURE[arch]
    known = sorted(set(FAMILY_BY_MODEL_TYPE) | set(FAMILY_BY_ARCHITECTURE))
    raise ConfigError(
        f"{source}: unknown model_type {model_type!r} (architectures {raw.get('architectures')!r}); "
        f"kvzoo supports {', '.join(known)}"
    )


class _FieldReader:
    """Typed access to config fields with errors that name the file, the key and what was expected."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def _lookup(self, names: tuple[str, ...]) -> tuple[str, Any] | None:
        for name in names:
            if self.raw.get(name) is not None:
                return name, self.raw[name]
        return None

    def int(self, *names: str, default: int | None = None, minimum: int = 1) -> int:
        found = self._lookup(names)
        if found is None:
            if default is not None:
                return default
            raise ConfigError(f"{self.source}: missing required field {names[0]!r} (an integer >= {minimum})")
        name, value = found
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.source}: field {name!r} must be an integer >= {minimum}, got {value!r}")
        return value

    def float(self, *names: str, default: float, positive: bool = True) -> float:
        found = self._lookup(names)
        if found is None:
            return default
        name, value = found
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
            raise ConfigError(f"{self.source}: field {name!r} must be a positive number, got {value!r}")
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: field {name!r} must be true or false, got {value!r}")
        return value

    def token_ids(self, name: str) -> list[int]:
        value = self.raw.get(name)
        if value is None:
            return []
        ids = value if isinstance(value, list) else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"{self.source}: field {name!r} must be a token id or a list of them, got {value!r}")
        return ids


def _rope_settings(r: _FieldReader) -> tuple[float, float]:
    """(rope_theta, linear factor) from `rope_theta`/`rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    params = r.raw.get("rope_parameters") or {}
    scaling = r.raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{r.source}: 'rope_parameters' / 'rope_scaling' must be objects")
    theta = params.get("rope_theta", r.raw.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{r.source}: field 'rope_theta' must be a positive number, got {theta!r}")
    # A 4.x file says `rope_scaling`; a 5.x file folds the same into `rope_parameters`.
    merged = scaling or params
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{r.source}: rope scaling type {rope_type!r} is not implemented by kvzoo "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    factor = 1.0
    if rope_type == "linear":
        factor = merged.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            raise ConfigError(f"{r.source}: linear rope scaling needs a positive 'factor', got {factor!r}")
    return float(theta), float(factor)


def _check_heads(r: _FieldReader, hidden: int, heads: int, kv_heads: int) -> None:
    if heads % kv_heads:
        raise ConfigError(
            f"{r.source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )


def _llama_config(r: _FieldReader, family: str) -> ModelConfig:
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    kv_heads = r.int("num_key_value_heads", default=heads)
    _check_heads(r, hidden, heads, kv_heads)
    if "head_dim" not in r.raw and hidden % heads:
        raise ConfigError(f"{r.source}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
    head_dim = r.int("head_dim", default=hidden // heads)
    theta, factor = _rope_settings(r)
    if r.raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{r.source}: hidden_act {r.raw['hidden_act']!r} is not supported (expected 'silu')")
    window = r.raw.get("sliding_window") if family == "mistral" else None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"{r.source}: field 'sliding_window' must be a positive integer or null, got {window!r}")
    return ModelConfig(
        family=family,
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        num_layers=r.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=r.int("intermediate_size"),
        max_position_embeddings=r.int("max_position_embeddings", default=4096),
        norm_eps=r.float("rms_norm_eps", default=1e-6),
        rope_theta=theta,
        rope_linear_factor=factor,
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        sliding_window=window,
        attention_bias=r.bool("attention_bias", False),
        mlp_bias=r.bool("mlp_bias", False),
        bos_token_id=(r.token_ids("bos_token_id") or [None])[0],
        eos_token_ids=r.token_ids("eos_token_id"),
    )


def _falcon_config(r: _FieldReader) -> ModelConfig:
    if r.bool("alibi", False):
        raise ConfigError(
            f"{r.source}: Falcon checkpoints with alibi=true are not supported by kvzoo "
            "(only rotary-embedding Falcon models)"
        )
    hidden = r.int("hidden_size", "n_embed")
    heads = r.int("num_attention_heads", "n_head")
    if hidden % heads:
        raise ConfigError(f"{r.source}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
    new_arch = r.bool("new_decoder_architecture", False)
    multi_query = r.bool("multi_query", True)
    if new_arch:
        layout, kv_heads = "grouped", r.int("num_kv_heads", "n_head_kv", default=heads)
    elif multi_query:
        layout, kv_heads = "multi_query", 1
    else:
        layout, kv_heads = "mha", heads
    _check_heads(r, hidden, heads, kv_heads)
    activation = r.raw.get("activation", "gelu")
    if activation != "gelu":
        raise ConfigError(f"{r.source}: Falcon activation {activation!r} is not supported (expected 'gelu')")
    num_ln = r.raw.get("num_ln_in_parallel_attn")
    if num_ln is None:
        num_ln = 2 if new_arch else 1
    if num_ln not in (1, 2):
        raise ConfigError(f"{r.source}: field 'num_ln_in_parallel_attn' must be 1 or 2, got {num_ln!r}")
    theta, factor = _rope_settings(r)
    return ModelConfig(
        family="falcon",
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        num_layers=r.int("num_hidden_layers", "n_layer"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=r.int("ffn_hidden_size", default=4 * hidden),
        max_position_embeddings=r.int("max_position_embeddings", default=2048),
        norm_eps=r.float("layer_norm_epsilon", default=1e-5),
        rope_theta=theta,
        rope_linear_factor=factor,
        tie_word_embeddings=r.bool("tie_word_embeddings", True),
        falcon_layout=layout,
        # The 40B-style architecture is always parallel.
        parallel_attn=new_arch or r.bool("parallel_attn", True),
        num_ln_in_parallel_attn=num_ln if new_arch else 1,
        bias=r.bool("bias", False),
        bos_token_id=(r.token_ids("bos_token_id") or [None])[0],
        eos_token_ids=r.token_ids("eos_token_id"),
    )
