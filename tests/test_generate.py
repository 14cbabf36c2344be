"""Text generation on the default model: streaming, stop strings, sampling, eos, chat, inspection, bad input."""

from __future__ import annotations

import pytest
import torch

import kvzoo
from kvzoo.default_model import ensure_default_model
from kvzoo.errors import KvzooError, KvzooWarning

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
    assert cache.budgets().shape == (cfg.num_layers, 2)
    assert cache.budgets().sum(0).tolist() == [8 * cfg.num_layers] * 2  # each prompt's layers share 8 by need
    for layer, budgets in zip(cache.layers, cache.budgets()):
        slots = int(budgets.max())  # a layer's store holds its largest budget
        assert layer.k.shape == (2, cfg.num_kv_heads, slots, cfg.head_dim) == layer.v.shape
        assert layer.logw.shape == layer.score.shape == layer.pos.shape == (2, cfg.num_kv_heads, slots)
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
    with pytest.raises(KvzooError, match="prompt 1 is empty"):
        tiny.generate_ids([[1, 2], []], max_new_tokens=1)
    with pytest.raises(KvzooError, match=r"token ids outside \[0, 128\): \[500\]"):
        tiny.generate_ids([1, 500], max_new_tokens=1)
    with pytest.raises(KvzooError, match="has no tokenizer"):
        tiny.generate("hello")
    with pytest.raises(KvzooError, match="ZigZagKV .* cannot compress chunk by chunk"):
        tiny.generate_ids([1, 2, 3] * 20, max_new_tokens=1, compression=kvzoo.ZigZagKV(budget=16),
                          prefill_chunk=8)
    with pytest.raises(KvzooError, match="ZSMerge .* cannot compress chunk by chunk"):
        tiny.generate_ids([1, 2, 3] * 20, max_new_tokens=1, prefill_chunk=8,
                          compression=kvzoo.ZSMerge(budget=24, rank="window", context_rank="compactor",
                                                    layer_budgets="uniform"))
    with pytest.raises(KvzooError, match="KVMerger .* cannot compress chunk by chunk"):
        tiny.generate_ids([1, 2, 3] * 20, max_new_tokens=1, prefill_chunk=8,
                          compression=kvzoo.KVMerger(budget=24, rank="compactor", layer_budgets="uniform"))


def test_max_new_tokens_zero_generates_nothing(smol):
    out = smol.generate_ids([[1, 2, 3]], max_new_tokens=0)
    assert out.token_ids == [[]]
    assert torch.isfinite(out.cache.layers[0].logw).sum() == 0  # nothing was prefilled either


def test_the_chat_template_rule(smol):
    """chat=None applies the checkpoint's template to a plain prompt (what the CLI does), chat=False gives the
    raw continuation, add_special_tokens=False marks text as already rendered."""
    question = "What is the capital of France?"
    tok = smol.require_tokenizer()
    rendered = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    default = smol.generate(question, max_new_tokens=12)
    assert "Paris" in default
    assert default == smol.generate(question, max_new_tokens=12, chat=True)
    assert default == smol.generate(rendered, max_new_tokens=12, add_special_tokens=False)
    raw = smol.generate(question, max_new_tokens=12, chat=False, eos_token_ids=[])
    assert raw == tok.decode(smol.generate_ids(tok.encode(question), max_new_tokens=12, eos_token_ids=[]).token_ids[0])
    assert raw != default


def test_a_spec_string_wherever_a_method_is_accepted(smol, tiny_checkpoint):
    tiny = kvzoo.load(tiny_checkpoint("llama-gqa")[1])
    ids = list(range(1, 40))
    by_object = tiny.generate_ids(ids, max_new_tokens=6, compression=kvzoo.ZSMerge(budget=0.1))
    for spec in ("zsmerge:budget=0.1", "ZSMerge:budget=0.1", "zs_merge:budget=0.1"):
        out = tiny.generate_ids(ids, max_new_tokens=6, compression=spec)
        assert out.token_ids == by_object.token_ids and type(out.cache.method) is kvzoo.ZSMerge
    assert type(tiny.generate_ids(ids, max_new_tokens=2, compression=kvzoo.SnapKV).cache.method) is kvzoo.SnapKV
    text, cache = smol.generate("Hi", max_new_tokens=2, compression="ZigZagKV", return_cache=True)
    assert type(cache.method) is kvzoo.ZigZagKV
    assert smol.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2, compression="snap_kv:budget=0.5")
    with pytest.raises(KvzooError, match=r"unknown compression method 'nosuch'; accepted names: full \(FullCache"):
        tiny.generate_ids(ids, max_new_tokens=1, compression="nosuch")
    with pytest.raises(KvzooError, match=r"compression must be a method .* got 0.1"):
        tiny.generate_ids(ids, max_new_tokens=1, compression=0.1)


def test_a_paper_spec_starts_from_the_paper_settings():
    from kvzoo.cache.registry import parse_compression

    assert parse_compression("zsmerge.paper:budget=0.05") == kvzoo.ZSMerge.paper(budget=0.05)
    assert parse_compression("KVMerger.paper") == kvzoo.KVMerger.paper()
    assert parse_compression("zsmerge.paper").alpha == 1.0 != kvzoo.ZSMerge().alpha
    zigzag = parse_compression("zigzag.paper:tau=0.8")
    assert zigzag == kvzoo.ZigZagKV(uncertainty="attention", rank="window", window_size=8, kernel_size=7,
                                    pooling="max", pool_ahead=None, stored_rank=None, stored_surprisal=0.0, tau=0.8)
    assert zigzag != kvzoo.ZigZagKV(tau=0.8)
    no_paper = r"'h2o.paper': H2O has no variant 'paper'; '.paper' .* kvmerger, zigzag, zsmerge"
    with pytest.raises(KvzooError, match=no_paper):
        parse_compression("h2o.paper")
    with pytest.raises(KvzooError, match=r"ZSMerge has no variant 'best'"):
        parse_compression("zsmerge.best:budget=0.1")


def test_a_spec_with_two_faults_names_the_first():
    from kvzoo.cache.registry import parse_compression, spec_fields

    with pytest.raises(KvzooError, match=r"ZSMerge has no parameter 'nosuch'"):
        parse_compression("zsmerge:nosuch=1,oops")
    with pytest.raises(KvzooError, match=r"'zsmerge:oops,nosuch=1': expected key=value, got 'oops'"):
        parse_compression("zsmerge:oops,nosuch=1")
    assert spec_fields("zsmerge.paper: alpha=1 , rank=window,budget=none") == {"alpha": 1, "rank": "window",
                                                                              "budget": None}


def test_the_long_prompt_rule(tiny_checkpoint):
    """Past the context (256 here): refused with the full cache fed at once; fed with a warning when
    compression or chunked prefill is on."""
    tiny = kvzoo.load(tiny_checkpoint("llama-gqa")[1])
    long = [1] * 300
    with pytest.raises(KvzooError, match=r"prompt 0 has 300 tokens, more than the model's context of 256; .*"
                                         r"compression=\.\.\. or prefill_chunk=N"):
        tiny.generate_ids(long, max_new_tokens=1)
    for kwargs in (dict(compression="h2o:budget=32"), dict(prefill_chunk=128)):
        with pytest.warns(KvzooWarning, match="prompt 1 has 300 tokens, more than the model's context of 256: fed"):
            out = tiny.generate_ids([[1, 2], long], max_new_tokens=2, eos_token_ids=[], **kwargs)
        assert [len(t) for t in out.token_ids] == [2, 2]
    with pytest.warns(KvzooWarning, match=r"prompt \(250 tokens\) \+ max_new_tokens \(10\) exceeds"):
        tiny.generate_ids([1] * 250, max_new_tokens=10)


def test_top_p_or_top_k_under_greedy_warns(smol):
    with pytest.warns(KvzooWarning, match="top_k / top_p have no effect with temperature 0"):
        smol.generate(PROMPT, max_new_tokens=1, top_p=0.9)


def test_compile_takes_true_false_or_none(tiny_checkpoint):
    """The one check Conversation and generate share (kvzoo.compile.check_compile)."""
    tiny = kvzoo.load(tiny_checkpoint("llama-gqa")[1])
    with pytest.raises(KvzooError, match="generate: compile must be True, False or None, got 'yes'"):
        tiny.generate_ids([[1, 2, 3]], max_new_tokens=1, compile="yes")


def test_a_method_that_reads_the_prompts_surprisal_gets_each_tokens_by_position(tiny_checkpoint):
    """`cache.prompt_surprisal` [B, n_pos]: -log p(token | the tokens before it) under the model's own forward,
    by position, for a left-padded batch (the first token and padding 0), chunked over positions as computed."""
    from kvzoo.cache.full import FullCache
    from kvzoo.likelihood import prefill_cache

    class ReadsSurprisal(FullCache):
        reads_prompt_surprisal = True

    model = kvzoo.load(tiny_checkpoint("llama-gqa")[1])
    prompts = [[(7 * i) % 120 + 3 for i in range(200)], list(range(40, 100))]  # longer than one 128-row block
    cache, _ = prefill_cache(model, prompts, ReadsSurprisal(), headroom=0)
    assert cache.prompt_surprisal is not None and cache.prompt_surprisal.shape == (2, 200)
    for b, ids in enumerate(prompts):
        with torch.inference_mode():
            logp = model(torch.tensor([ids]))[0].double().log_softmax(-1)
        expected = torch.cat([torch.zeros(1, dtype=torch.float64),
                              -logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]])
        torch.testing.assert_close(cache.prompt_surprisal[b, :len(ids)].double(), expected, rtol=1e-5, atol=1e-5)
        assert not cache.prompt_surprisal[b, len(ids):].any()  # past a shorter prompt: nothing
    plain, _ = prefill_cache(model, prompts, FullCache(), headroom=0)
    assert plain.prompt_surprisal is None  # computed only for a method that reads it
