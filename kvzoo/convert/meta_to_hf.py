"""Convert a Meta-format checkpoint (LLaMA-2 / Mistral `consolidated.*.pth` + `params.json`) to the Hugging Face layout.

- Model-parallel shards are concatenated: the column-parallel projections (`wq`, `wk`, `wv`, `w1`, `w3`, `output`)
  along dim 0, the row-parallel ones (`wo`, `w2`) and `tok_embeddings` along dim 1; norms are replicated on every
  shard and taken from the first (after checking the shards agree).
- Meta's q/k rows are in interleaved-RoPE order; they are permuted into Hugging Face's rotate-half order.
- `params.json` with a `sliding_window` key (even null) gives a `MistralForCausalLM` config, otherwise
  `LlamaForCausalLM`. The weights keep the checkpoint's dtype.
- `tokenizer.model`, when present next to the weights (or one directory up, where Meta's downloads put it), is
  copied, with a LlamaTokenizer-style `tokenizer_config.json`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from kvzoo.convert.common import (
    ProgressBar,
    ShardedSafetensorsWriter,
    check_out_dir,
    dtype_name,
    interleaved_to_half,
    llama_family_config,
    staged_output_dir,
    write_json,
)
from kvzoo.errors import CheckpointError
from kvzoo.json_file import read_json_object

# Meta name -> (HF name, how shards combine: concat dim, or None for replicated)
_LAYER_KEYS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_GLOBAL_KEYS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
_IGNORED = {"rope.freqs"}  # a precomputed RoPE buffer some LLaMA checkpoints carry
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def _shard_files(ckpt_dir: Path) -> list[Path]:
    files = sorted(ckpt_dir.glob("consolidated.*.pth"), key=lambda p: _shard_number(p))
    if not files:
        raise CheckpointError(f"{ckpt_dir}: no consolidated.*.pth files (expected a Meta-format checkpoint)")
    numbers = [_shard_number(p) for p in files]
    if numbers != list(range(len(files))):
        raise CheckpointError(
            f"{ckpt_dir}: model-parallel shards are not numbered 00..{len(files) - 1:02d}: "
            f"{', '.join(p.name for p in files)}"
        )
    return files


def _shard_number(p: Path) -> int:
    m = re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)
    if not m:
        raise CheckpointError(f"{p}: unexpected shard name (expected consolidated.NN.pth)")
    return int(m.group(1))


def _read_params(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: params.json not found (expected a Meta-format checkpoint directory)")
    params = read_json_object(path, CheckpointError)
    for key in ("dim", "n_layers", "n_heads"):
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    return params


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (pre-zip) torch.save files cannot be memory-mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint shard (truncated or not a torch.save file?): {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    if "model" in state and isinstance(state["model"], dict):  # some training checkpoints nest the weights
        state = state["model"]
    return state


def _hf_name(meta_name: str) -> tuple[str, int | None] | None:
    if meta_name in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[meta_name]
    m = _LAYER_RE.match(meta_name)
    if m and m.group(2) in _LAYER_KEYS:
        hf, dim = _LAYER_KEYS[m.group(2)]
        return f"model.layers.{m.group(1)}.{hf}", dim
    return None


def _combine(name: str, parts: list[torch.Tensor], dim: int | None, files: list[Path]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if dim is None:
        for p, f in zip(parts[1:], files[1:]):
            if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                raise CheckpointError(f"{f}: replicated tensor {name!r} differs from the one in {files[0].name}")
        return parts[0]
    try:
        return torch.cat(parts, dim=dim)
    except RuntimeError as e:
        shapes = ", ".join(str(list(p.shape)) for p in parts)
        raise CheckpointError(
            f"{files[0].parent}: shards of {name!r} cannot be joined along dim {dim}: {shapes}"
        ) from e


def _find_tokenizer(ckpt_dir: Path) -> Path | None:
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def convert_meta(ckpt_dir: str | Path, out_dir: str | Path, force: bool = False, progress: bool = True) -> Path:
    """Convert a Meta `consolidated.*.pth` + `params.json` checkpoint to a Hugging Face directory; return `out_dir`."""
    ckpt_dir = Path(ckpt_dir)
    out_dir = check_out_dir(out_dir, force)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    params = _read_params(ckpt_dir)
    files = _shard_files(ckpt_dir)
    shards = [_load_shard(f) for f in files]

    keys = list(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))[:5]
            raise CheckpointError(f"{f}: holds different tensor names than {files[0].name} (e.g. {diff})")
    unknown = [k for k in keys if _hf_name(k) is None and k not in _IGNORED]
    if unknown:
        raise CheckpointError(f"{files[0]}: unexpected tensors for a LLaMA/Mistral checkpoint: {unknown[:5]}")

    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    extra = sorted({int(m.group(1)) for k in keys if (m := _LAYER_RE.match(k))} - set(range(n_layers)))
    if extra:
        raise CheckpointError(f"{files[0]}: holds layer(s) {extra[:5]} beyond params.json's n_layers ({n_layers})")
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = params.get("head_dim") or dim // n_heads
    if n_heads % n_kv:
        raise CheckpointError(
            f"{ckpt_dir / 'params.json'}: n_heads ({n_heads}) is not a multiple of n_kv_heads ({n_kv})"
        )

    def get(name: str) -> torch.Tensor:
        if name not in shards[0]:
            raise CheckpointError(f"{files[0]}: tensor {name!r} is missing")
        hf = _hf_name(name)
        assert hf is not None
        return _combine(name, [s[name] for s in shards], hf[1], files)

    emb = get("tok_embeddings.weight")
    vocab_size = emb.shape[0]
    if params.get("vocab_size", -1) not in (-1, None, vocab_size):
        raise CheckpointError(
            f"{ckpt_dir / 'params.json'}: vocab_size {params['vocab_size']} but tok_embeddings has {vocab_size} rows"
        )
    if emb.shape[1] != dim:
        raise CheckpointError(f"{files[0]}: tok_embeddings has width {emb.shape[1]}, params.json says dim {dim}")
    w1 = get("layers.0.feed_forward.w1.weight")
    intermediate = w1.shape[0]
    dtype = emb.dtype
    tied = "output.weight" not in shards[0]
    expected = {
        "attention.wq.weight": (n_heads * head_dim, dim),
        "attention.wk.weight": (n_kv * head_dim, dim),
        "attention.wv.weight": (n_kv * head_dim, dim),
        "attention.wo.weight": (dim, n_heads * head_dim),
        "feed_forward.w1.weight": (intermediate, dim),
        "feed_forward.w3.weight": (intermediate, dim),
        "feed_forward.w2.weight": (dim, intermediate),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }

    is_mistral = "sliding_window" in params
    config = llama_family_config(
        mistral=is_mistral,
        hidden=dim,
        intermediate=intermediate,
        layers=n_layers,
        heads=n_heads,
        kv_heads=n_kv,
        head_dim=head_dim,
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        context=int(params.get("max_seq_len") or (32768 if is_mistral else 4096)),
        vocab_size=vocab_size,
        tied=tied,
        sliding_window=params.get("sliding_window"),
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype=dtype_name(dtype),
    )

    tokenizer_model = _find_tokenizer(ckpt_dir)
    n_tensors = 2 + (0 if tied else 1) + n_layers * len(_LAYER_KEYS)
    with staged_output_dir(out_dir, force) as tmp:
        writer = ShardedSafetensorsWriter(tmp)
        with ProgressBar(n_tensors, f"converting {ckpt_dir.name}", enabled=progress) as bar:
            writer.add("model.embed_tokens.weight", emb)
            bar.update()
            del emb
            for i in range(n_layers):
                for key, (hf, _) in _LAYER_KEYS.items():
                    name = f"layers.{i}.{key}"
                    w = get(name)
                    if tuple(w.shape) != expected[key]:
                        raise CheckpointError(
                            f"{files[0]}: tensor {name!r} has shape {list(w.shape)} after joining shards, "
                            f"expected {list(expected[key])}"
                        )
                    if key == "attention.wq.weight":
                        w = interleaved_to_half(w, n_heads, name)
                    elif key == "attention.wk.weight":
                        w = interleaved_to_half(w, n_kv, name)
                    writer.add(f"model.layers.{i}.{hf}", w.to(dtype))
                    bar.update(1, name)
            writer.add("model.norm.weight", get("norm.weight").to(dtype))
            bar.update()
            if not tied:
                out = get("output.weight")
                if tuple(out.shape) != (vocab_size, dim):
                    raise CheckpointError(f"{files[0]}: output.weight has shape {list(out.shape)}, "
                                          f"expected {[vocab_size, dim]}")
                writer.add("lm_head.weight", out.to(dtype))
                bar.update()
        writer.close()
        write_json(tmp / "config.json", dict(sorted(config.items())))
        write_json(tmp / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
            write_json(tmp / "tokenizer_config.json", {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": config["max_position_embeddings"],
            })
    return out_dir


__all__ = ["convert_meta"]
