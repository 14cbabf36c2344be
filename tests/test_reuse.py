"""Compress once, ask many: a cache from `prefill` continued by `generate(..., cache=)` on tiny random models.

- FullCache: prefill(context) then the question == one prompt context + question (tokens, fp32 logits);
- asking leaves the stored cache bitwise unchanged, for every method;
- save -> load -> ask == asking the in-memory cache, token for token, for every method;
- a batch of questions (different lengths: left padding after the cache) == one question at a time;
- every bad file or mismatch gives its one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch

import kvzoo
from kvzoo.cache.io import CacheFileError, read_header
from kvzoo.errors import KvzooError
from kvzoo.generate import make_decode_step, prefill, prepare
from kvzoo.likelihood import teacher_force

# fp32 on CPU: the continued prefill attends over [cache slots ; question] in the masked kernel, the one-shot
# prompt in the plain causal one; the sums differ in order only (~1e-6), 1e-4 leaves room for 2 layers.
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)

CONTEXT = [(7 * i + 3) % 120 + 4 for i in range(60)]
QUESTIONS = [[9, 8, 7, 6, 5], [11, 12], [30, 31, 32, 33, 34, 35, 36, 37]]
NEW = 10

# Every method, with budgets small enough that the 60-token context is really compressed.
METHODS = [
    kvzoo.FullCache(),
    kvzoo.StreamingLLM(budget=16, sinks=2),
    kvzoo.H2O(budget=16),
    kvzoo.TOVA(budget=16),
    kvzoo.SnapKV(budget=16, window_size=4),
    kvzoo.PyramidKV(budget=16, window_size=4),
    kvzoo.ZigZagKV(budget=16, window_size=4),
    kvzoo.ZSMerge(budget=16, proximity=4, residual=2),
    kvzoo.KVMerger(budget=16, skip_layers=()),
    kvzoo.KVMerger(budget=None, threshold=0.2, skip_layers=(0,)),
    kvzoo.Compactor(budget=16),
]
IDS = [type(m).__name__ + ("-eps" if getattr(m, "budget", 1) is None else "") for m in METHODS]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return kvzoo.load(tiny_checkpoint("llama-gqa")[1])


def _slot_tensors(cache: kvzoo.KVCache) -> list[torch.Tensor]:
    return [t.clone() for layer in cache.layers for t in layer.tensors()]


def _last_logits(model, ids: list[int], cache=None) -> torch.Tensor:
    request = prepare(model, [ids], 0, None, None, cache)
    return prefill(model, request.ids, request.positions, request.cache)


def test_full_cache_prefill_then_question_equals_one_prompt(model):
    cache = model.prefill(CONTEXT)
    for q in QUESTIONS:
        torch.testing.assert_close(_last_logits(model, q, cache), _last_logits(model, CONTEXT + q), **LOGIT_TOL)
        got = model.generate_ids(q, max_new_tokens=NEW, eos_token_ids=[], cache=cache)
        want = model.generate_ids(CONTEXT + q, max_new_tokens=NEW, eos_token_ids=[])
        assert got.token_ids == want.token_ids
        assert got.cache is not cache and got.cache.lengths == [len(CONTEXT) + len(q) + NEW - 1]


def test_full_cache_decode_logits_match_one_prompt(model):
    """Every decode step's logits agree too, with the same tokens fed after either prefill."""
    q, fed = QUESTIONS[0], [40, 41, 42, 43]
    step = make_decode_step(model, compile=False)
    runs = []
    for prompt, cache in ((q, model.prefill(CONTEXT)), (CONTEXT + q, None)):
        request = prepare(model, [prompt], len(fed), None, None, cache)
        logits = [prefill(model, request.ids, request.positions, request.cache)]
        start = request.cache.lengths[0]
        with torch.inference_mode():
            for i, token in enumerate(fed):
                logits.append(step(torch.tensor([[token]]), torch.tensor([[start + i]]), request.cache))
        runs.append(torch.stack(logits))
    torch.testing.assert_close(runs[0], runs[1], **LOGIT_TOL)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_asking_leaves_the_cache_unchanged_and_a_batch_equals_one_at_a_time(model, method):
    cache = model.prefill(CONTEXT, compression=method)
    before = _slot_tensors(cache)
    lengths = list(cache.lengths)
    alone = [model.generate_ids(q, max_new_tokens=NEW, eos_token_ids=[], cache=cache).token_ids[0]
             for q in QUESTIONS]
    batch = model.generate_ids(QUESTIONS, max_new_tokens=NEW, eos_token_ids=[], cache=cache)
    assert batch.token_ids == alone
    after = _slot_tensors(cache)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    assert cache.lengths == lengths


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_save_load_ask_equals_asking_in_memory(model, method, tmp_path):
    cache = model.prefill(CONTEXT, compression=method)
    path = tmp_path / "doc.kvc"
    cache.save(path)
    loaded = kvzoo.load_cache(path, model)
    assert loaded.method == method.for_stored_document() and loaded.lengths == cache.lengths
    assert all(torch.equal(a, b) for a, b in zip(_slot_tensors(loaded), _slot_tensors(cache)))
    for q in QUESTIONS:
        want = model.generate_ids(q, max_new_tokens=NEW, eos_token_ids=[], cache=cache).token_ids
        assert model.generate_ids(q, max_new_tokens=NEW, eos_token_ids=[], cache=loaded).token_ids == want


def test_a_cache_saved_with_an_earlier_state_name_loads_and_answers_alike(model, tmp_path):
    """A ZSMerge document stored in chunks marks its induction heads ("induction_head"); a file written when the
    mark was called "sum_head" loads under today's name and answers as the cache in memory."""
    cache = model.prefill(CONTEXT, compression=kvzoo.ZSMerge(budget=16, proximity=4, residual=2), prefill_chunk=20)
    assert "induction_head" in cache.layers[0].state
    earlier = dataclasses.replace(cache, layers=[
        dataclasses.replace(layer, state={("sum_head" if k == "induction_head" else k): v
                                          for k, v in layer.state.items()}) for layer in cache.layers])
    earlier.save(tmp_path / "doc.kvc")
    loaded = kvzoo.load_cache(tmp_path / "doc.kvc", model)
    assert "sum_head" not in loaded.layers[0].state
    assert torch.equal(loaded.layers[0].state["induction_head"], cache.layers[0].state["induction_head"])
    want = model.generate_ids(QUESTIONS[2], max_new_tokens=NEW, eos_token_ids=[], cache=cache).token_ids
    assert model.generate_ids(QUESTIONS[2], max_new_tokens=NEW, eos_token_ids=[], cache=loaded).token_ids == want


def test_decode_time_methods_keep_their_size_prefill_only_methods_get_headroom(model):
    zs = model.prefill(CONTEXT, compression=kvzoo.ZSMerge(budget=16, proximity=4, residual=2))
    out = model.generate_ids(QUESTIONS[2], max_new_tokens=NEW, eos_token_ids=[], cache=zs)
    assert out.cache.layers[0].capacity == zs.layers[0].capacity == 16
    assert out.cache.nbytes() == zs.nbytes()
    snap = model.prefill(CONTEXT, compression=kvzoo.SnapKV(budget=16, window_size=4))
    out = model.generate_ids(QUESTIONS[2], max_new_tokens=NEW, eos_token_ids=[], cache=snap)
    assert out.cache.layers[0].capacity == 16 + len(QUESTIONS[2]) + NEW


def test_a_decode_cap_bounds_the_answer_not_the_question(model):
    """A capped prefill-only method still appends a question longer than its cap: the fork gets room for the
    question beside the capped answer."""
    method = kvzoo.SnapKV(budget=16, window_size=4, decode_cap=2)
    cache = model.prefill(CONTEXT, compression=method)
    out = model.generate_ids(QUESTIONS[2], max_new_tokens=NEW, eos_token_ids=[], cache=cache)
    assert out.cache.layers[0].capacity == 16 + len(QUESTIONS[2]) + 2
    held = set(out.cache.layers[0].pos[0, 0].tolist())
    assert set(range(len(CONTEXT), len(CONTEXT) + len(QUESTIONS[2]))) <= held


def test_score_continues_a_cache(model):
    q, answer = QUESTIONS[0], [40, 41, 42]
    cache = model.prefill(CONTEXT)
    torch.testing.assert_close(model.score(q, answer, cache=cache), model.score(CONTEXT + q, answer), **LOGIT_TOL)


def test_cache_misuse_is_a_clear_error(model):
    cache = model.prefill([CONTEXT, CONTEXT[:20]])
    with pytest.raises(KvzooError, match="a cache of 2 sequences cannot continue 3 prompts"):
        model.generate_ids(QUESTIONS, max_new_tokens=2, cache=cache)
    with pytest.raises(KvzooError, match="leave compression unset"):
        model.generate_ids(QUESTIONS[:2], max_new_tokens=2, cache=cache, compression=kvzoo.H2O(budget=8))
    with pytest.raises(KvzooError, match="more than the model's context of 256"):
        model.generate_ids([1] * 200, max_new_tokens=2, cache=model.prefill(CONTEXT))


# --- bad files -----------------------------------------------------------------------------------------------


@pytest.fixture()
def saved(model, tmp_path):
    path = tmp_path / "doc.kvc"
    model.prefill(CONTEXT, compression=kvzoo.ZSMerge(budget=16, proximity=4, residual=2)).save(path)
    return path


def _rewrite_header(path, edit) -> None:
    """Rewrite the safetensors JSON header with `edit(header_dict)` (tensor bytes untouched)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _edit_kvzoo(key, value):
    def edit(header):
        meta = json.loads(header["__metadata__"]["kvzoo"])
        meta[key] = value
        header["__metadata__"]["kvzoo"] = json.dumps(meta)
    return edit


def test_header_says_what_the_cache_belongs_to(model, saved):
    header = read_header(saved)
    assert header["model_config"] == model.config.to_dict()
    assert len(header["model_fingerprint"]) == 64 and header["sha256"] and header["tokens_seen"] == len(CONTEXT)
    assert header["method"] == {"name": "zsmerge", "fields": {
        "budget": 16, "proximity": 4, "proximity_cap": 32, "residual": 2, "alpha": 0.5, "decay": 1.0,
        "window_size": 8,
        "kernel_size": 7, "pooling": "max", "pool_ahead": 0, "metric": "dot", "score_update": "max",
        "prefill_scale": "window", "leverage": 0.0, "leverage_of": "keys", "rank": "window", "decode_score": "accumulated",
        "standing_half_life": 2.0, "accumulated": "sum",
        "window_weight": 1.0, "window_share": 0.25, "cross_layer": False, "cross_layer_heads": "all", "copy_reads": 0,
        "context_rank": "compactor",
        "leverage_tokens": "basis", "copy_heads": None, "copy_recent": 16, "stored_ring": 32,
        "stored_kernel_size": 7, "stored_surprisal": 1.0, "stored_surprisal_lend": "max+mean+run",
        "stored_copy_heads": 0.3, "layer_budgets": "uniform"}}
    assert header["lengths"] == [len(CONTEXT)] and header["dtype"] == "float32"
    assert header["kvzoo_version"] == kvzoo.__version__ and header["format_version"] == 1
    assert header["tokenizer"] is None  # the tiny checkpoint has no tokenizer


def test_another_model_is_refused(saved, tiny_checkpoint):
    other = kvzoo.load(tiny_checkpoint("llama-mha-tied")[1])
    with pytest.raises(CacheFileError, match=r"built by a different model \(num_kv_heads: cache 2 vs model 4"):
        kvzoo.load_cache(saved, other)


def test_another_dtype_is_refused(saved, tiny_checkpoint):
    bf16 = kvzoo.load(tiny_checkpoint("llama-gqa")[1], dtype="bfloat16")
    with pytest.raises(CacheFileError, match="holds float32 keys and values, the model runs in bfloat16"):
        kvzoo.load_cache(saved, bf16)


def test_truncated_file_is_refused(model, saved):
    saved.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(CacheFileError, match="truncated or corrupted"):
        kvzoo.load_cache(saved, model)


def test_edited_tensor_bytes_are_refused(model, saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF  # a byte of the last tensor
    saved.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="do not match the header's sha256"):
        kvzoo.load_cache(saved, model)


def test_edited_header_is_refused(model, saved):
    _rewrite_header(saved, _edit_kvzoo("lengths", [5]))
    with pytest.raises(CacheFileError, match="do not match the header's sha256"):
        kvzoo.load_cache(saved, model)


def test_incompatible_version_is_refused(model, saved):
    _rewrite_header(saved, _edit_kvzoo("format_version", 99))
    with pytest.raises(CacheFileError, match="cache format version 99 .* incompatible with this kvzoo"):
        kvzoo.load_cache(saved, model)


def test_not_a_cache_and_missing_files_are_refused(model, tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CacheFileError, match="not a kvzoo cache"):
        kvzoo.load_cache(plain, model)
    with pytest.raises(CacheFileError, match="no such cache file"):
        kvzoo.load_cache(tmp_path / "nope.kvc", model)


def test_errors_are_one_line(model, saved):
    saved.write_bytes(saved.read_bytes()[:50])
    with pytest.raises(CacheFileError) as info:
        kvzoo.load_cache(saved, model)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", [m for m in METHODS if m.supports_chunked_prefill and getattr(m, "budget", 1)
                                    and not m.appends_later_prompts], ids=lambda m: type(m).__name__)
def test_asking_a_cache_equals_chunked_prefill_with_a_boundary_after_the_context(model, method):
    """A decode-time method compresses the question as any later prompt chunk: asking the stored cache gives
    the tokens of one prompt context + question fed in two chunks (int budgets, so both runs resolve the same
    slot counts). ZSMerge with decode_score="standing": with the default ("accumulated") a question to a
    stored document stores its older slots' standings and a chunk of the same prompt their accumulated
    attention, by design (tests/test_zsmerge_standing.py), so their decode steps may evict differently; and
    without its stored-document rule (tests/test_copy_heads.py) and with uniform layer budgets (what a prompt fed
    in chunks keeps), so that both runs compress the context alike."""
    if isinstance(method, kvzoo.ZSMerge):
        method = dataclasses.replace(method, decode_score="standing", stored_ring=None, stored_copy_heads=None,
                                     layer_budgets="uniform")
    cache = model.prefill(CONTEXT, compression=method)
    for q in QUESTIONS:
        got = model.generate_ids(q, max_new_tokens=NEW, eos_token_ids=[], cache=cache).token_ids
        want = model.generate_ids(CONTEXT + q, max_new_tokens=NEW, eos_token_ids=[], compression=method,
                                  prefill_chunk=len(CONTEXT)).token_ids
        assert got == want


@pytest.mark.parametrize("chunk", [None, 3], ids=["whole", "chunked"])
@pytest.mark.parametrize("method", [m for m in METHODS if m.appends_later_prompts], ids=lambda m: type(m).__name__)
def test_a_prefill_only_method_keeps_the_stored_slots_and_appends_the_question(model, method, chunk):
    """A prefill-only method compressed the stored document once; a question to it is kept whole beside every
    stored slot (in the room its fork is given), as its generated tokens are: the fork holds the stored
    positions and the question's, and the answer equals the one from feeding the question through decode steps
    (which append), within the masked-kernel tolerance of LOGIT_TOL; the fork's stores keep the size they were
    given (KVMerger with budget=None sizes its stores at the end of the document's prefill only). Fed in chunks of 3 tokens (`prefill_chunk`),
    each later chunk continues the question and is appended too."""
    cache = model.prefill(CONTEXT, compression=method)
    stored = [set(layer.pos[0, h][layer.pos[0, h] >= 0].tolist()) for layer in cache.layers
              for h in range(layer.pos.shape[1])]
    for q in QUESTIONS:
        request = prepare(model, [q], NEW, None, None, cache)
        room = [layer.capacity for layer in request.cache.layers]
        logits = prefill(model, request.ids, request.positions, request.cache, chunk=chunk)
        assert [layer.capacity for layer in request.cache.layers] == room  # the end of prefill sizes nothing again
        asked = [set(layer.pos[0, h][layer.pos[0, h] >= 0].tolist()) for layer in request.cache.layers
                 for h in range(layer.pos.shape[1])]
        question = set(range(len(CONTEXT), len(CONTEXT) + len(q)))
        assert asked == [held | question for held in stored]

        fork = cache.fork(headroom=len(q) + NEW)
        step = make_decode_step(model, compile=False)
        with torch.inference_mode():
            fed = torch.tensor([q[1:]])
            start = torch.tensor([len(CONTEXT)])
            first_logits = step(torch.tensor([[q[0]]]), start[:, None], fork)
            _, decoded = teacher_force(step, fork, first_logits, fed, start + 1)
        torch.testing.assert_close(logits, decoded, **LOGIT_TOL)


@pytest.mark.parametrize("method", [m for m in METHODS if m.appends_later_prompts], ids=lambda m: type(m).__name__)
def test_a_stored_batch_appends_each_question_to_its_own_document(model, method):
    """Two stored documents of different lengths (so ratio and per-layer budgets differ per sequence), each
    asked its own question: every sequence's fork holds its stored positions and its question's."""
    docs = [CONTEXT, CONTEXT[5:45]]
    cache = model.prefill(docs, compression=method)
    request = prepare(model, QUESTIONS[:2], NEW, None, None, cache)
    prefill(model, request.ids, request.positions, request.cache)
    for before, after in zip(cache.layers, request.cache.layers):
        for b, (doc, q) in enumerate(zip(docs, QUESTIONS)):
            question = set(range(len(doc), len(doc) + len(q)))
            for h in range(before.pos.shape[1]):
                held = set(before.pos[b, h][before.pos[b, h] >= 0].tolist())
                assert set(after.pos[b, h][after.pos[b, h] >= 0].tolist()) == held | question


def test_another_tokenizer_is_refused(saved, tiny_checkpoint):
    from kvzoo.default_model import ensure_default_model
    from kvzoo.tokenizer import Tokenizer

    same_weights = kvzoo.load(tiny_checkpoint("llama-gqa")[1])
    same_weights.tokenizer = Tokenizer.from_dir(ensure_default_model(progress=False))  # the cache was built without
    with pytest.raises(CacheFileError, match="built with a different tokenizer"):
        kvzoo.load_cache(saved, same_weights)
