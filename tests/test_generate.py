"""Text generation on the default model: streaming, stop strings, sampling, eos, chat, inspection, bad input."""

from __future__ import annotations

import pytest
import torch

import kvzoo
from kvzoo.default_model import ensure_default_model
from kvzoo.errors import KvzooError

PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def smol():
    return kvzoo.load(ensure_default_model(progress=False))


def test_stream_pieces_join_to_the_full_text(smol):
    full = smol.generate(PROMPT, max_new_tokens=24, eos_token_ids=[])
    pieces = list(smol.generate(PROMPT, max_new_tokens=24, eos_token_ids=[], stream=True))
    assert len(pieces) > 1
    assert "".join(pieces) == full


def test_stop_string_cuts_the_text_streamed_or_not(smol):
    full = smol.generate(PROMPT, max_new_tokens=24, eos_token_ids=[])
    stop = full.split()[2]  # a word from the middle of the greedy continuation
    cut = smol.generate(PROMPT, max_new_tokens=24, eos_token_ids=[], stop=[stop])
    assert cut == full[: full.index(stop)]
    assert "".join(smol.generate(PROMPT, max_new_tokens=24, eos_token_ids=[], stop=stop, stream=True)) == cut


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(smol):
    kwargs = dict(max_new_tokens=16, eos_token_ids=[], temperature=0.9, top_p=0.95)
    a = smol.generate(PROMPT, seed=3, **kwargs)
    assert a == smol.generate(PROMPT, seed=3, **kwargs)
    greedy = smol.generate(PROMPT, max_new_tokens=16, eos_token_ids=[])
    assert smol.generate(PROMPT, max_new_tokens=16, eos_token_ids=[], temperature=0.7, top_k=1, seed=0) == greedy


def test_eos_from_the_checkpoint_ends_a_chat_reply(smol):
    text = smol.require_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True)
    ids = smol.require_tokenizer().encode(text, add_special_tokens=False)
    out = smol.generate_ids(ids, max_new_tokens=64)
    assert out.finish_reasons == ["eos"]
    assert 2 not in out.token_ids[0]  # <|im_end|> ends the reply and is not part of it


def test_chat_equals_generate_on_the_rendered_template(smol):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = smol.chat(messages, max_new_tokens=24)
    assert "Paris" in reply
    rendered = smol.require_tokenizer().apply_chat_template(messages, add_generation_prompt=True)
    assert reply == smol.generate(rendered, max_new_tokens=24, add_special_tokens=False)


def test_return_cache_exposes_the_slot_tensors(smol):
    texts, cache = smol.generate([PROMPT, "Hello"], max_new_tokens=4, return_cache=True,
                                 compression=kvzoo.ZSMerge(budget=8, proximity=2, residual=1))
    assert len(texts) == 2
    cfg = smol.config
    layer = cache.layers[0]
    assert layer.k.shape == (2, cfg.num_kv_heads, 8, cfg.head_dim) == layer.v.shape
    assert layer.logw.shape == layer.score.shape == layer.pos.shape == (2, cfg.num_kv_heads, 8)
    assert cache.budgets().shape == (cfg.num_layers, 2)
    assert cache.nbytes() == sum(t.nbytes for lay in cache.layers for t in lay.tensors())


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0"),
    (dict(temperature=-0.5), r"temperature must be a number >= 0"),
    (dict(top_k=0), r"top_k must be an integer >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(stop=[""]), r"stop must be a non-empty string"),
    (dict(prefill_chunk=0), r"prefill_chunk must be a positive integer"),
    (dict(stream=True, return_cache=True), r"stream=True cannot return the cache"),
])
def test_bad_generation_arguments(smol, kwargs, message):
    with pytest.raises(KvzooError, match=message):
        result = smol.generate(PROMPT, **kwargs)
        if kwargs.get("stream"):
            list(result)


def test_bad_prompts(smol, tiny_checkpoint):
    with pytest.raises(KvzooError, match="empty prompt"):
        smol.generate("")
    with pytest.raises(KvzooError, match="stream=True takes a single prompt"):
        smol.generate([PROMPT, PROMPT], stream=True)
    tiny = kvzoo.load(tiny_checkpoint("llama-gqa")[1])  # context 256, no tokenizer
    with pytest.raises(KvzooError, match="prompt 0 has 300 tokens, more than the model's context of 256"):
        tiny.generate_ids([1] * 300, max_new_tokens=1)
    with pytest.raises(KvzooError, match="prompt 1 is empty"):
        tiny.generate_ids([[1, 2], []], max_new_tokens=1)
    with pytest.raises(KvzooError, match=r"token ids outside \[0, 128\): \[500\]"):
        tiny.generate_ids([1, 500], max_new_tokens=1)
    with pytest.raises(KvzooError, match="has no tokenizer"):
        tiny.generate("hello")
    with pytest.raises(KvzooError, match="ZigZagKV .* cannot compress chunk by chunk"):
        tiny.generate_ids([1, 2, 3] * 20, max_new_tokens=1, compression=kvzoo.ZigZagKV(budget=16),
                          prefill_chunk=8)


def test_max_new_tokens_zero_generates_nothing(smol):
    out = smol.generate_ids([[1, 2, 3]], max_new_tokens=0)
    assert out.token_ids == [[]]
    assert torch.isfinite(out.cache.layers[0].logw).sum() == 0  # nothing was prefilled either
