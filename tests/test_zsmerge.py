"""ZSMerge against kvzoo/cache/METHODS.md section 1: a hand-worked decode case (1.2) and the invariants of 1.4,
driven through the library's own prefill and decode code paths."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvzoo
from kvzoo.cache.chunk import make_prefill_chunk
from kvzoo.cache.slots import LayerSlots
from kvzoo.cache.zsmerge import ZSMerge, ZSMergeLayout
from kvzoo.errors import KvzooError
from kvzoo_kernels.attention import decode_attention

INF = float("inf")


def _hand_slots(method: ZSMerge) -> LayerSlots:
    """B=1, one KV head, budget 5 = 1 residual + 2 context + 2 proximity (ring slots 3, 4)."""
    slots = LayerSlots.empty(1, 1, 5, 2, torch.tensor([5]), torch.float32, "cpu")
    slots.state["residual"] = torch.tensor([1])
    slots.state["proximity"] = torch.tensor([2])
    rows = {  # slot: (pos, key, value, score); the token at position p sits in ring slot 3 + p % 2
        1: (0, [1.0, 0.0], [1.0, 1.0], 0.4),
        2: (1, [0.0, 1.0], [2.0, 0.0], 0.1),
        3: (2, [1.0, 1.0], [0.0, 2.0], 0.3),
        4: (3, [-1.0, 0.0], [1.0, 0.0], 0.2),
    }
    for i, (p, k, v, s) in rows.items():
        slots.k[0, 0, i], slots.v[0, 0, i] = torch.tensor(k), torch.tensor(v)
        slots.pos[0, 0, i], slots.score[0, 0, i], slots.logw[0, 0, i] = p, s, 0.0
    return slots


def _step(method: ZSMerge, slots: LayerSlots, pos: int, k: list[float], v: list[float], probs: list[float]) -> None:
    method.decode_step(0, slots, torch.tensor([[k]]), torch.tensor([[v]]), torch.tensor([pos]),
                       torch.tensor([[probs]]))


def _assert_slots(slots: LayerSlots, expected: dict[int, tuple]) -> None:
    for i, (p, k, v, w, s) in expected.items():
        assert slots.pos[0, 0, i].item() == p, f"slot {i} position"
        torch.testing.assert_close(slots.k[0, 0, i], torch.tensor(k), msg=f"slot {i} key")
        torch.testing.assert_close(slots.v[0, 0, i], torch.tensor(v), msg=f"slot {i} value")
        assert math.isclose(slots.logw[0, 0, i].exp().item(), w, rel_tol=1e-6), f"slot {i} count"
        assert math.isclose(slots.score[0, 0, i].item(), s, rel_tol=1e-6), f"slot {i} score"


def test_hand_worked_decode_steps():
    """Three decode steps with decay 0.5, numbers worked out by hand from METHODS.md 1.2 (paper semantics):
    s <- 0.5 s + a; the new token takes the ring slot of the oldest proximity token; that token takes a free
    context slot or competes with the weakest context token; the loser is merged into the residual slot."""
    method = ZSMerge(budget=5, proximity=2, residual=1, decay=0.5)
    slots = _hand_slots(method)

    # Step 1 (pos 4): scores -> [_, .3, .25, .45, .2]; ring slot 3 + 4%2 = 3 holds pos 2 (score .45).
    # Context is full; its weakest (slot 2, .25) loses to the leaving token: it is copied into the empty
    # residual slot, and pos 2 takes slot 2.
    _step(method, slots, 4, [2.0, 0.0], [4.0, 4.0], [0.0, 0.1, 0.2, 0.3, 0.1, 0.3])
    _assert_slots(slots, {
        0: (1, [0.0, 1.0], [2.0, 0.0], 1, 0.25),
        1: (0, [1.0, 0.0], [1.0, 1.0], 1, 0.3),
        2: (2, [1.0, 1.0], [0.0, 2.0], 1, 0.45),
        3: (4, [2.0, 0.0], [4.0, 4.0], 1, 0.3),
        4: (3, [-1.0, 0.0], [1.0, 0.0], 1, 0.2),
    })

    # Step 2 (pos 5): scores -> [.225, .25, .325, .35, .2]; ring slot 4 holds pos 3 (score .2), weaker than
    # every context token, so pos 3 itself is merged into residual slot 0: mean key [-.5, .5], count 2,
    # score max(.225, .2), representative position max(1, 3).
    _step(method, slots, 5, [0.0, 2.0], [2.0, 2.0], [0.1, 0.1, 0.1, 0.2, 0.1, 0.4])
    _assert_slots(slots, {
        0: (3, [-0.5, 0.5], [1.5, 0.0], 2, 0.225),
        1: (0, [1.0, 0.0], [1.0, 1.0], 1, 0.25),
        2: (2, [1.0, 1.0], [0.0, 2.0], 1, 0.325),
        3: (4, [2.0, 0.0], [4.0, 4.0], 1, 0.35),
        4: (5, [0.0, 2.0], [2.0, 2.0], 1, 0.4),
    })

    # Step 3 (pos 6): scores -> [.4125, .175, .2125, .275, .3]; pos 4 leaves the ring (score .275); the
    # weakest context token, pos 0 (.175), is merged: count 3, key (2*[-.5,.5] + [1,0])/3 = [0, 1/3].
    _step(method, slots, 6, [1.0, -1.0], [0.0, 0.0], [0.3, 0.05, 0.05, 0.1, 0.1, 0.4])
    _assert_slots(slots, {
        0: (3, [0.0, 1 / 3], [4 / 3, 1 / 3], 3, 0.4125),
        1: (4, [2.0, 0.0], [4.0, 4.0], 1, 0.275),
        2: (2, [1.0, 1.0], [0.0, 2.0], 1, 0.2125),
        3: (6, [1.0, -1.0], [0.0, 0.0], 1, 0.4),
        4: (5, [0.0, 2.0], [2.0, 2.0], 1, 0.3),
    })
    # The compensated bias is alpha * log w (Eq. 8).
    torch.testing.assert_close(slots.slot_bias(1.0)[0, 0, 0], torch.tensor(math.log(3.0)))


def test_hand_worked_lapsing_standing():
    """standing_half_life=1: a decode step evicts the lowest of context ∪ {leaving} by score + bonus * 2^-t (t
    decode steps since the prompt ended), counting the bonus of context slots only, and stores the scores
    without it. Slot 2 (pos 1) holds a token kept for its standing (bonus 0.8); ring slot 4 (pos 3) has a
    bonus of 5, which must not count."""
    method = ZSMerge(budget=5, proximity=2, residual=1, decay=1.0, standing_half_life=1.0)
    slots = _hand_slots(method)
    slots.state["standing_bonus"] = torch.tensor([[[0.0, 0.0, 0.8, 0.0, 5.0]]])
    slots.state["standing_pos"] = slots.pos.to(torch.int32)
    slots.state["standing_written"] = torch.tensor([4])  # the prompt ended at position 3

    # Step 1 (pos 4, t = 0): scores -> [_, .5, .3, .6, .3]; pos 2 leaves ring slot 3. Slot 2 competes with
    # .3 + .8 = 1.1, so the weakest is slot 1 (.5; without the bonus slot 2 would be): pos 0 is copied into
    # the empty residual slot and pos 2 takes slot 1. Slot 2 stores .3, not 1.1.
    _step(method, slots, 4, [2.0, 0.0], [4.0, 4.0], [0.0, 0.1, 0.2, 0.3, 0.1, 0.3])
    _assert_slots(slots, {
        0: (0, [1.0, 0.0], [1.0, 1.0], 1, 0.5),
        1: (2, [1.0, 1.0], [0.0, 2.0], 1, 0.6),
        2: (1, [0.0, 1.0], [2.0, 0.0], 1, 0.3),
        3: (4, [2.0, 0.0], [4.0, 4.0], 1, 0.3),
        4: (3, [-1.0, 0.0], [1.0, 0.0], 1, 0.3),
    })

    # Step 2 (pos 5, t = 1, bonus .4): scores -> [.6, .7, .4, .5, .4]; pos 3 leaves ring slot 4 with .4 (with
    # its ring bonus it would have 2.9 and stay), below slot 1 (.7) and slot 2 (.4 + .4): it is merged into
    # residual slot 0, mean key [0, 0], count 2, score max(.6, .4).
    _step(method, slots, 5, [0.0, 2.0], [2.0, 2.0], [0.1, 0.1, 0.1, 0.2, 0.1, 0.4])
    _assert_slots(slots, {
        0: (3, [0.0, 0.0], [1.0, 0.5], 2, 0.6),
        1: (2, [1.0, 1.0], [0.0, 2.0], 1, 0.7),
        2: (1, [0.0, 1.0], [2.0, 0.0], 1, 0.4),
        3: (4, [2.0, 0.0], [4.0, 4.0], 1, 0.5),
        4: (5, [0.0, 2.0], [2.0, 2.0], 1, 0.4),
    })

    # Step 3 (pos 6, t = 2, bonus .2): scores -> [.9, .75, .4, .8, .5]; pos 4 leaves with .8. Slot 2 has
    # .4 + .2 = .6 (the unlapsed .8 would keep it at 1.2): it is the weakest, merged into residual slot 0
    # (count 3), and pos 4 takes slot 2.
    _step(method, slots, 6, [1.0, -1.0], [0.0, 0.0], [0.3, 0.05, 0.0, 0.3, 0.1, 0.25])
    _assert_slots(slots, {
        0: (3, [0.0, 1 / 3], [4 / 3, 1 / 3], 3, 0.9),
        1: (2, [1.0, 1.0], [0.0, 2.0], 1, 0.75),
        2: (4, [2.0, 0.0], [4.0, 4.0], 1, 0.8),
        3: (6, [1.0, -1.0], [0.0, 0.0], 1, 0.25),
        4: (5, [0.0, 2.0], [2.0, 2.0], 1, 0.5),
    })


# --- invariants on random states --------------------------------------------------------------------------

def _run(method: ZSMerge, prompt_len: int, steps: int, chunk: int | None, seed: int, heads: int = 2,
         same_key: bool = False):
    """Drive prefill (optionally chunked) and decode with random q/k and one-hot values.

    Value of the token at position p is the one-hot e_p, so a slot's value times its count is the
    indicator of its members: membership is observable without instrumenting the method."""
    g = torch.Generator().manual_seed(seed)
    total = prompt_len + steps
    d = 8
    keys = torch.randn(1, heads, total, d, generator=g)
    if same_key:
        keys = keys[:, :, :1].expand_as(keys).contiguous()
    values = torch.eye(total)[None, None].expand(1, heads, total, total).contiguous()
    cfg = type("Cfg", (), {"num_layers": 1, "num_kv_heads": heads, "head_dim": total})()
    # One layer's regions, step by step: each layer of layer_budgets="uncertainty" is exactly such a ZSMerge of its
    # own budget (tests/test_zsmerge_layer_budgets.py).
    method = replace(method, layer_budgets="uniform")
    cache = method.make_cache(cfg, [prompt_len], steps, torch.float32, "cpu")
    slots = cache.layers[0]
    # Keys are d-dimensional but slots hold total-dim values: store keys zero-padded to the value width.
    keys_p = torch.nn.functional.pad(keys, (0, total - d))
    q_all = torch.randn(1, heads, total, total, generator=g)
    positions = torch.arange(total)[None]
    step = chunk or prompt_len
    for start in range(0, prompt_len, step):
        stop = min(prompt_len, start + step)
        used = method.slots_in_use(slots.capacity, start)
        pc = make_prefill_chunk(q_all[:, :, start:stop], keys_p[:, :, start:stop], values[:, :, start:stop],
                                positions[:, start:stop], slots, used, method.attention_alpha, None)
        method.compress_prefill(0, slots, pc)
    states = [(prompt_len, _snapshot(slots))]
    for p in range(prompt_len, total):
        bias = slots.slot_bias(method.attention_alpha)
        _, probs = decode_attention(q_all[:, :, p], slots.k, slots.v, bias, keys_p[:, :, p], values[:, :, p])
        method.decode_step(0, slots, keys_p[:, :, p], values[:, :, p], torch.tensor([p]), probs)
        states.append((p + 1, _snapshot(slots)))
    return states, keys_p, values, q_all


def _snapshot(slots: LayerSlots) -> dict[str, torch.Tensor]:
    return {n: getattr(slots, n).clone() for n in ("k", "v", "logw", "score", "pos")}


zsmerge_cases = st.tuples(
    st.integers(8, 40),  # budget (slots)
    st.integers(2, 6),  # proximity
    st.integers(1, 3),  # residual
    st.integers(1, 50),  # prompt length
    st.integers(0, 20),  # decode steps
    st.sampled_from([None, 5, 16]),  # prefill chunk
    st.integers(0, 10_000),  # seed
).filter(lambda c: c[0] > c[1] + c[2])


@settings(max_examples=40, deadline=None)
@given(zsmerge_cases)
def test_budget_mass_partition_and_exact_means(case):
    """1.4 invariants 1-4: size == min(tokens, B); sum w == tokens seen; every token in exactly one slot;
    every slot's key and value are the exact means of its members."""
    budget, proximity, residual, prompt_len, steps, chunk, seed = case
    method = ZSMerge(budget=budget, proximity=proximity, residual=residual)
    states, keys, _, _ = _run(method, prompt_len, steps, chunk, seed)
    for seen, s in states:
        filled = torch.isfinite(s["logw"])
        assert (filled.sum(-1) == min(seen, budget)).all(), "constant size"
        w = torch.where(filled, s["logw"].exp(), 0.0)
        torch.testing.assert_close(w.sum(-1), torch.full_like(w.sum(-1), float(seen)))
        members = s["v"] * w[..., None]  # [1, H, C, total]: the member indicator of each slot
        coverage = members.sum(2)[..., :seen]
        torch.testing.assert_close(coverage, torch.ones_like(coverage), msg="each token in exactly one slot")
        assert (members[..., seen:].abs() < 1e-5).all()
        member_keys = torch.einsum("bhct,bhtd->bhcd", members, keys[:, :, : members.shape[-1]])
        expected = member_keys / w.clamp(min=1)[..., None]
        torch.testing.assert_close(torch.where(filled[..., None], s["k"], 0.0), torch.where(filled[..., None], expected, 0.0),
                                   atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(zsmerge_cases)
def test_proximity_holds_the_most_recent_tokens(case):
    """1.4 invariant 11: the ring always holds exactly the B_p most recent tokens, uncompressed."""
    budget, proximity, residual, prompt_len, steps, chunk, seed = case
    states, _, _, _ = _run(ZSMerge(budget=budget, proximity=proximity, residual=residual), prompt_len, steps,
                           chunk, seed)
    for seen, s in states:
        ring = s["pos"][..., budget - proximity: budget]
        expected = set(range(max(0, seen - proximity), seen))
        for h in range(ring.shape[1]):
            assert set(ring[0, h].tolist()) - {-1} == expected
            assert (s["logw"][0, h, budget - proximity: budget][ring[0, h] >= 0] == 0).all()


@settings(max_examples=30, deadline=None)
@given(zsmerge_cases, st.integers(0, 10_000))
def test_theorem_1_exact_tokens_never_lose_attention(case, qseed):
    """Theorem 1 (alpha = 1): for any query, every exact slot's compensated weight >= that token's weight
    under the full cache, and the compressed partition function <= the full one."""
    budget, proximity, residual, prompt_len, steps, chunk, seed = case
    states, keys, _, _ = _run(ZSMerge(budget=budget, proximity=proximity, residual=residual, alpha=1.0), prompt_len,
                              steps, chunk, seed)
    seen, s = states[-1]
    q = torch.randn(keys.shape[-1], generator=torch.Generator().manual_seed(qseed), dtype=torch.float64)
    for h in range(keys.shape[1]):
        full_logits = keys[0, h, :seen].double() @ q
        full_z = full_logits.exp().sum()
        filled = torch.isfinite(s["logw"][0, h])
        comp_logits = s["k"][0, h, filled].double() @ q + s["logw"][0, h, filled].double()
        comp_z = comp_logits.exp().sum()
        assert comp_z <= full_z * (1 + 1e-9)
        exact = filled & (s["logw"][0, h] == 0)
        for slot in exact.nonzero().flatten().tolist():
            p = int(s["pos"][0, h, slot])
            comp_w = (s["k"][0, h, slot].double() @ q).exp() / comp_z
            full_w = full_logits[p].exp() / full_z
            assert comp_w >= full_w * (1 - 1e-9)


@settings(max_examples=20, deadline=None)
@given(zsmerge_cases, st.integers(0, 10_000))
def test_identical_keys_merge_losslessly(case, qseed):
    """1.4 invariant 6: when merged tokens share one key, compensated attention (alpha = 1) over the slots
    equals full attention over every token, for any query."""
    budget, proximity, residual, prompt_len, steps, chunk, seed = case
    states, keys, values, _ = _run(ZSMerge(budget=budget, proximity=proximity, residual=residual, alpha=1.0),
                                   prompt_len, steps, chunk, seed, same_key=True)
    seen, s = states[-1]
    q = torch.randn(1, keys.shape[1], keys.shape[-1], generator=torch.Generator().manual_seed(qseed))
    bias = torch.where(torch.isfinite(s["logw"]), s["logw"], -INF)
    # Attend over the slots; the "new token" term is neutralised by giving it a key at -inf logit.
    out, _ = decode_attention(q, s["k"], s["v"], bias, torch.zeros_like(q), torch.zeros_like(q))
    full_bias = torch.zeros(1, keys.shape[1], seen)
    full, _ = decode_attention(q, keys[:, :, :seen], values[:, :, :seen], full_bias, torch.zeros_like(q),
                               torch.zeros_like(q))
    # Both include the same extra zero key with weight e^0 / Z; Z is equal in both when lossless.
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-4)


def test_score_recursion_without_eviction():
    """1.4 invariant 10: with room for every token, s_t = decay^k s_t(0) + sum_j decay^(k-j) a_t(j)."""
    method = ZSMerge(budget=64, proximity=4, residual=1, decay=0.9)
    slots = LayerSlots.empty(1, 1, 64, 4, torch.tensor([64]), torch.float32, "cpu")
    slots.state["residual"], slots.state["proximity"] = torch.tensor([1]), torch.tensor([4])
    g = torch.Generator().manual_seed(0)
    history, positions_before = [], []
    for p in range(12):
        positions_before.append(slots.pos[0, 0].clone())
        probs = torch.rand(1, 1, 65, generator=g)
        probs = torch.where(torch.cat([slots.filled[0], torch.tensor([[True]])], -1), probs, 0.0)
        probs = probs / probs.sum()
        history.append(probs[0, 0].clone())
        method.decode_step(0, slots, torch.randn(1, 1, 4, generator=g), torch.randn(1, 1, 4, generator=g),
                           torch.tensor([p]), probs)
    for slot in slots.filled[0, 0].nonzero().flatten().tolist():
        p = int(slots.pos[0, 0, slot])
        # Token p was written with its own probability at step p (last column), then decayed and increased by
        # the probability of whichever slot held it at every later step (it moves from the ring to context).
        expected = history[p][-1] * 0.9 ** (11 - p)
        for j in range(p + 1, 12):
            held = int((positions_before[j] == p).nonzero()[0])
            expected += history[j][held] * 0.9 ** (11 - j)
        assert math.isclose(slots.score[0, 0, slot].item(), float(expected), rel_tol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=0), r"budget=0 must be >= 1"),
        (dict(budget=-3), r"budget=-3 must be >= 1"),
        (dict(budget=1.0), r"budget=1.0 is not a ratio in \(0, 1\)"),
        (dict(budget="5%"), r"budget must be a float in \(0, 1\) or an int >= 1"),
        (dict(alpha=2.0), r"alpha must be in \[0, 1\]"),
        (dict(metric="cos"), r"metric must be 'dot' or 'l2'"),
        (dict(leverage=-1.0), r"leverage must be a number >= 0, got -1.0"),
        (dict(leverage_of="queries"), r"leverage_of must be 'keys' or 'values', got 'queries'"),
        (dict(rank="max"), r"rank must be one of 'window', 'accumulated', .*, got 'max'"),
        (dict(window_size=None), r"window_size must be an integer >= 1, got None \(.* is rank='accumulated'\)"),
        (dict(window_weight=-1.0), r"window_weight must be a number >= 0, got -1.0"),
        (dict(window_share=1.5), r"window_share must be a fraction in \[0, 1\], got 1.5"),
        (dict(accumulated="mean"), r"accumulated must be one of 'sum', 'rate', 'rate_outside_copy_heads', 'distant_rate', 'distant_rate_outside_copy_heads', got 'mean'"),
        (dict(decode_score="share"), r"decode_score must be one of 'accumulated', 'standing', got 'share'"),
        (dict(standing_half_life=-1.0), r"standing_half_life must be a number >= 0, got -1.0"),
        (dict(standing_half_life="8"), r"standing_half_life must be a number >= 0, got '8'"),
        (dict(context_rank="compactor", rank="shares"), r"context_rank='compactor' .* \(got rank='shares'\)"),
        (dict(leverage_tokens="rank"), r"leverage_tokens must be 'basis', 'all' or a token count >= 0, got 'rank'"),
        (dict(leverage_tokens=-1), r"leverage_tokens must be .*, got -1"),
        (dict(leverage_tokens=2.5), r"leverage_tokens must be .*, got 2.5"),
        (dict(pool_ahead=9), r"pool_ahead must be None \(centred\) or an integer in 0 .. kernel_size - 1 = 8, got 9"),
        (dict(pool_ahead=-1), r"pool_ahead must be .*, got -1"),
        (dict(pool_ahead=True), r"pool_ahead must be .*, got True"),
        (dict(pool_ahead="after"), r"pool_ahead must be .*, got 'after'"),
        (dict(stored_kernel_size=0), r"stored_kernel_size must be .*, got 0"),
        (dict(stored_surprisal=-0.5), r"stored_surprisal must be a number >= 0 \(0: off\), got -0.5"),
        (dict(stored_surprisal=float("inf")), r"stored_surprisal must be .*, got inf"),
        (dict(stored_surprisal="1"), r"stored_surprisal must be .*, got '1'"),
        (dict(stored_surprisal_lend="sum"),
         r"stored_surprisal_lend must be one of 'max', 'max\+mean', 'max\+mean\+run', got 'sum'"),
        (dict(pool_ahead=7),
         r"pool_ahead must be below stored_kernel_size too \(a stored document pools over 7 positions\), got pool_ahead=7"),
    ],
)
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(KvzooError, match=message):
        ZSMerge(**kwargs)


def test_budget_smaller_than_fixed_parts():
    """A budget without room for a context slot is raised to the smallest layout with one (the budget rule)."""
    assert ZSMerge(budget=3, proximity=2, residual=1).layout(100) == ZSMergeLayout(4, 2, 1)
    assert ZSMerge(budget=0.05).layout(40) == ZSMergeLayout(4, 2, 1)  # 2 slots raised to 4
    assert ZSMerge(budget=0.05).layout(1) == ZSMergeLayout(4, 2, 1)
    assert ZSMerge(budget=0.05).layout(200) == ZSMergeLayout(10, 5, 1)
    assert ZSMerge(budget=0.2, proximity=0.9).layout(10) == ZSMergeLayout(11, 9, 1)  # 10 slots: 9 + 1 + 0


def test_nbytes_is_what_the_tensors_hold_and_a_fifteenth_of_full(tmp_path):
    """cache.nbytes() equals the bytes of its tensors, and at budget 0.05 of a 2048-token prompt it is
    <= 1/15 of the full cache's; the layers share those bytes by need (the default; `compressed=True`: the
    cache as it is after prefill, known before the prompt is read)."""
    from tests.conftest import build_hf_model

    build_hf_model("llama-gqa", max_position_embeddings=4096).save_pretrained(tmp_path)
    model = kvzoo.load(tmp_path)
    prompt = [[(7 * i) % 128 for i in range(2048)]]
    cfg = model.config
    z = ZSMerge(budget=0.05).make_cache(cfg, [2048], 16, torch.float32, "cpu", compressed=True)
    full = kvzoo.FullCache().make_cache(cfg, [2048], 16, torch.float32, "cpu")
    for cache in (z, full):
        assert cache.nbytes() == sum(t.nbytes for layer in cache.layers for t in layer.tensors())
    assert z.nbytes() * 15 <= full.nbytes()
    # The same holds for the cache a real generation returns, after prefill and decoding.
    out = model.generate_ids(prompt, max_new_tokens=4, compression=ZSMerge(budget=0.05), eos_token_ids=[])
    assert out.cache.nbytes() == sum(t.nbytes for layer in out.cache.layers for t in layer.tensors()) == z.nbytes()
    assert out.cache.filled_slots().sum(0).tolist() == [[102 * cfg.num_layers] * cfg.num_kv_heads]
    assert out.cache.budgets().sum(0).tolist() == [102 * cfg.num_layers]


# --- through the real models ------------------------------------------------------------------------------

# 1.4 invariant 7 (full budget == full cache) for every method: tests/test_method_cases.py.


@pytest.mark.parametrize("model_name", ["llama-gqa", "falcon-40b-style"])
def test_compressed_batch_equals_each_prompt_alone(tiny_checkpoint, model_name):
    """Per-sequence budgets: a ratio budget resolves per prompt, padding never takes a slot, so a batch
    gives each prompt the tokens it gets alone — also with chunked prefill when the left padding is a whole
    number of chunks (otherwise a padded prompt is cut into chunks at other positions than alone, and each
    chunk boundary is a compression point: its kept tokens may differ, legitimately)."""
    model = kvzoo.load(tiny_checkpoint(model_name)[1])
    g = torch.Generator().manual_seed(6)
    for chunk, lens, budgets in ((None, (40, 25, 33), [16, 10, 13]), (8, (40, 24, 32), [16, 9, 12])):
        prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lens]
        method = ZSMerge(budget=0.4)
        alone = [model.generate_ids(p, max_new_tokens=10, eos_token_ids=[], compression=method,
                                    prefill_chunk=chunk) for p in prompts]
        batch = model.generate_ids(prompts, max_new_tokens=10, eos_token_ids=[], compression=method,
                                   prefill_chunk=chunk)
        assert batch.token_ids == [a.token_ids[0] for a in alone], f"prefill_chunk={chunk}"
        # each prompt's layers share its budget by need (one-shot prefill) or keep it each (chunks)
        assert batch.cache.budgets().sum(0).tolist() == [b * model.config.num_layers for b in budgets]
        for i, a in enumerate(alone):  # the same tokens kept, not only the same greedy output
            for mine, theirs in zip(batch.cache.layers, a.cache.layers):
                for h, (x, y) in enumerate(zip(mine.pos[i], theirs.pos[0])):
                    kept = [sorted(p for p in head.tolist() if p >= 0) for head in (x, y)]
                    assert kept[0] == kept[1], f"prefill_chunk={chunk}, prompt {i}, head {h}"


def test_equal_pooled_scores_go_to_the_larger_own_score():
    """rank_order: ties of the rank go to the larger tie-break (the unpooled score), then to the newer position."""
    from kvzoo.cache.selection import rank_order

    rank = torch.tensor([[[5.0, 5.0, 5.0, 1.0, 5.0]]])
    pos = torch.tensor([[[0, 1, 2, 3, 4]]])
    assert rank_order(rank, pos).tolist() == [[[4, 2, 1, 0, 3]]]
    own = torch.tensor([[[1.0, 5.0, 2.0, 0.0, 2.0]]])
    assert rank_order(rank, pos, own).tolist() == [[[1, 4, 2, 0, 3]]]


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_a_max_pooled_peak_is_kept_before_its_neighbours(kernel_size):
    """Two context slots and an attention sink at position 0 that every query looks at: max-pooling gives
    positions 1 .. kernel_size // 2 the sink's score, and the sink must still be kept (it was dropped for its
    newer neighbours before the tie-break, the 2% failure of tests/test_quality.py)."""
    from tests.method_helpers import drive_synthetic, random_qkv

    n = 30
    qkv = random_qkv(1, 1, 1, 1, n, seed=1, scale=0.3)
    direction = torch.randn(qkv.k[0].shape[-1], generator=torch.Generator().manual_seed(2))
    qkv.q[0][:] = direction
    qkv.k[0][0, 0, 0] = 8 * direction  # the sink
    method = ZSMerge(budget=6, proximity=3, residual=1, kernel_size=kernel_size, rank="window")  # pooled ties
    s = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers[0]
    context = s["pos"][0, 0, 1:3].tolist()  # slots: [residual | 2 context | 3 proximity]
    assert 0 in context, f"context holds {context}"


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "zigzag"])
@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_window_selection_keeps_a_max_pooled_peak_before_its_neighbours(name, kernel_size):
    """The same sink for the observation-window methods with one token to choose beyond the window: ZigZagKV
    selects at the end of prefill from its stored slots, where the tie-break must survive as slot order."""
    from kvzoo.cache.registry import parse_compression
    from tests.method_helpers import drive_synthetic, random_qkv

    n, window = 30, 4
    qkv = random_qkv(1, 1, 1, 1, n, seed=1, scale=0.3)
    direction = torch.randn(qkv.k[0].shape[-1], generator=torch.Generator().manual_seed(2))
    qkv.q[0][:] = direction
    qkv.k[0][0, 0, 0] = 8 * direction  # the sink
    method = parse_compression(f"{name}:budget={window + 1},window_size={window},kernel_size={kernel_size},"
                               "pooling=max")
    s = drive_synthetic(method, qkv, [n], 0).snapshots[0].layers[0]
    kept = sorted(p for p in s["pos"][0, 0].tolist() if p >= 0)
    assert kept == [0] + list(range(n - window, n)), f"{name} keeps {kept}"
