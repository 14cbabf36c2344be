"""Shared helpers for the compression-method tests.

Two ways to drive a method through the library's own code paths, both recording the slot cache after prefill
and after every decode step:
- `drive_model`: a real tiny model (prefill with left padding, optionally chunked, then greedy decode steps);
- `drive_synthetic`: `kvzoo.attention.attend` fed with random post-RoPE q/k/v, i.e. a "model" whose
  projections are random tensors, so tests know every token's key and every query exactly.

Plus independent reference computations of attention (straight from the definitions) and the generic
slot-cache invariants every eviction method must satisfy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvzoo.attention import ForwardContext, attend
from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.slots import KVCache
from kvzoo.generate import left_pad


@dataclass
class Snapshot:
    """The cache after prefill or after one decode step."""

    seen: list[int]  # tokens of each sequence in the cache's history so far (prompt + fed decode tokens)
    layers: list[dict[str, torch.Tensor]]  # per layer: clones of k, v, logw, score, pos, budget
    nbytes: int

    def kept(self, layer: int, b: int, h: int) -> list[int]:
        """Positions held by the filled slots of (layer, sequence, KV head), in slot order."""
        s = self.layers[layer]
        filled = torch.isfinite(s["logw"][b, h])
        return s["pos"][b, h][filled].tolist()

    def filled_counts(self, layer: int) -> torch.Tensor:
        """[B, Hkv] filled slots."""
        return torch.isfinite(self.layers[layer]["logw"]).sum(-1)


def random_prompt(n: int, seed: int) -> list[int]:
    """n token ids of the tiny models' vocabulary, the same for the same seed."""
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(1000 + seed)).tolist()


def snapshot(cache: KVCache, seen: list[int]) -> Snapshot:
    layers = [
        {n: getattr(ls, n).clone() for n in ("k", "v", "logw", "score", "pos", "budget")} for ls in cache.layers
    ]
    return Snapshot(list(seen), layers, cache.nbytes())


@dataclass
class Trace:
    prompt_lens: list[int]
    snapshots: list[Snapshot]  # after prefill, then after each decode step
    logits: list[torch.Tensor]  # [B, V] next-token logits after prefill, then after each decode step
    tokens: list[list[int]]  # greedy tokens of each sequence (one per entry of `logits`)
    cache: KVCache


def drive_model(model, prompts: list[list[int]], method: CompressionMethod, steps: int,
                prefill_chunk: int | None = None) -> Trace:
    """Prefill `prompts` (left-padded, fed in chunks of `prefill_chunk`) and run `steps` greedy decode steps,
    exactly as `kvzoo.generate` does, but keeping every step's logits and cache."""
    lens = [len(p) for p in prompts]
    with torch.no_grad():
        ids, positions = left_pad(prompts, 0, torch.device("cpu"))
        cache = method.make_cache(model.config, lens, steps, torch.float32, "cpu")
        chunk = prefill_chunk or ids.shape[1]
        for start in range(0, ids.shape[1], chunk):
            logits = model(ids[:, start:start + chunk], positions[:, start:start + chunk], cache=cache)[:, -1]
        cache.end_prefill()
        snaps, all_logits = [snapshot(cache, lens)], [logits]
        next_pos = torch.tensor(lens)[:, None]
        for s in range(steps):
            token = logits.argmax(-1)
            logits = model(token[:, None], next_pos + s, cache=cache, decode=True)[:, -1]
            snaps.append(snapshot(cache, [n + s + 1 for n in lens]))
            all_logits.append(logits)
    tokens = torch.stack([lg.argmax(-1) for lg in all_logits], dim=1).tolist()
    return Trace(lens, snaps, all_logits, tokens, cache)


# --- synthetic model: random q/k/v through the library's attention step ---------------------------------

@dataclass
class FakeConfig:
    """The fields of ModelConfig that cache allocation reads."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class QKV:
    """Per layer, every token's post-RoPE query/key/value, indexed by absolute position.

    q: [B, Hq, P, D]; k, v: [B, Hkv, P, D] with P >= prompt + decode steps of every sequence.
    (A plain class, so that hypothesis reports show its short repr rather than the tensors.)"""

    def __init__(self, q: list[torch.Tensor], k: list[torch.Tensor], v: list[torch.Tensor],
                 seed: int | None = None) -> None:
        self.q, self.k, self.v = q, k, v
        self.seed = seed  # how random_qkv made it

    def __repr__(self) -> str:
        b, hq, p, d = self.q[0].shape
        return (f"QKV(batch={b}, layers={len(self.q)}, q_heads={hq}, kv_heads={self.k[0].shape[1]}, "
                f"length={p}, head_dim={d}, seed={self.seed})")

    @property
    def groups(self) -> int:
        return self.q[0].shape[1] // self.k[0].shape[1]

    def select(self, b: int) -> "QKV":
        """Sequence b alone (batch of one)."""
        return QKV([x[b:b + 1] for x in self.q], [x[b:b + 1] for x in self.k], [x[b:b + 1] for x in self.v],
                   self.seed)


def random_qkv(batch: int, layers: int, kv_heads: int, groups: int, length: int, head_dim: int = 8,
               seed: int = 0, scale: float = 1.5) -> QKV:
    g = torch.Generator().manual_seed(seed)

    def rnd(h: int) -> list[torch.Tensor]:
        return [torch.randn(batch, h, length, head_dim, generator=g) * scale for _ in range(layers)]

    return QKV(rnd(kv_heads * groups), rnd(kv_heads), rnd(kv_heads), seed)


def _at(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, H, P, D] at positions pos [B, T] (-1: padding -> zeros) -> [B, H, T, D]."""
    b, h, _, d = x.shape
    idx = pos.clamp(min=0)[:, None, :, None].expand(b, h, pos.shape[1], d)
    return x.gather(2, idx) * (pos >= 0)[:, None, :, None]


@dataclass
class SynthTrace:
    prompt_lens: list[int]
    qkv: QKV
    window: int | None
    snapshots: list[Snapshot]
    cache: KVCache


def drive_synthetic(method: CompressionMethod, qkv: QKV, prompt_lens: list[int], steps: int,
                    window: int | None = None, prefill_chunk: int | None = None,
                    surprisal: torch.Tensor | None = None) -> SynthTrace:
    """Left-padded prefill (optionally chunked) and `steps` decode steps through `kvzoo.attention.attend`,
    layer by layer, with the given q/k/v instead of projections. A chunked prompt is compressed by the method
    generate would use for it (`for_chunked_prefill`). `surprisal` [B, n_pos]: the prompt's surprisal by
    position, as the model's prefill gives a method that reads it (`cache.prompt_surprisal`)."""
    if prefill_chunk is not None:
        method = method.for_chunked_prefill()
    layers, kv_heads, head_dim = len(qkv.k), qkv.k[0].shape[1], qkv.k[0].shape[-1]
    t = max(prompt_lens)
    positions = torch.full((len(prompt_lens), t), -1, dtype=torch.long)
    for b, n in enumerate(prompt_lens):
        positions[b, t - n:] = torch.arange(n)
    cfg = FakeConfig(layers, kv_heads, head_dim)
    with torch.no_grad():
        cache = method.make_cache(cfg, prompt_lens, steps, torch.float32, "cpu")
        chunk = prefill_chunk or t
        for start in range(0, t, chunk):
            pos = positions[:, start:start + chunk]
            ctx = ForwardContext(pos, None, None, cache, False, window, bool((pos < 0).any()))  # type: ignore[arg-type]
            for layer in range(layers):
                attend(layer, _at(qkv.q[layer], pos), _at(qkv.k[layer], pos), _at(qkv.v[layer], pos), ctx)
            cache.tokens_seen += pos.shape[1]
        cache.prompt_surprisal = surprisal
        cache.end_prefill()
        snaps = [snapshot(cache, prompt_lens)]
        for s in range(steps):
            pos = torch.tensor(prompt_lens)[:, None] + s
            ctx = ForwardContext(pos, None, None, cache, True, window, False)  # type: ignore[arg-type]
            for layer in range(layers):
                attend(layer, _at(qkv.q[layer], pos), _at(qkv.k[layer], pos), _at(qkv.v[layer], pos), ctx)
            snaps.append(snapshot(cache, [n + s + 1 for n in prompt_lens]))
    return SynthTrace(list(prompt_lens), qkv, window, snaps, cache)


def spiky_surprisal(n: int, seed: int) -> torch.Tensor:
    """[1, n] a prompt's surprisal as text has it: mostly low, a few surprising tokens (0 at the first)."""
    gen = torch.Generator().manual_seed(seed)
    surprisal = torch.rand(1, n, generator=gen) * 2
    surprisal[0, torch.randint(1, n, (max(2, n // 12),), generator=gen)] += 8
    surprisal[0, 0] = 0.0
    return surprisal


# --- references computed from the definitions ------------------------------------------------------------

def reference_probs(q: torch.Tensor, k: torch.Tensor, q_pos: list[int], key_pos: list[int],
                    window: int | None) -> torch.Tensor:
    """Softmax attention of queries q [Hq', n_q, D] at q_pos over keys k [n_k, D] at key_pos: causal, and
    within the sliding window if any. Returns [Hq', n_q, n_k] (float64)."""
    qp = torch.tensor(q_pos)[:, None]
    kp = torch.tensor(key_pos)[None, :]
    visible = kp <= qp
    if window is not None:
        visible &= (qp - kp) < window
    logits = torch.einsum("hqd,kd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return logits.masked_fill(~visible, float("-inf")).softmax(-1)


def pool_1d(x: torch.Tensor, kernel: int, mode: str, ahead: int | None = None) -> torch.Tensor:
    """Stride-1, same-size pooling of x [..., n] over its own n entries (edges: only entries that exist).
    `ahead`: entry i pools entries i - (kernel - 1 - ahead) .. i + ahead (default: centred), written out
    from that definition."""
    if kernel <= 1 or x.shape[-1] == 0:
        return x
    if ahead is not None:
        n = x.shape[-1]
        spans = [x[..., max(0, i - (kernel - 1 - ahead)): min(n, i + ahead + 1)] for i in range(n)]
        reduce = (lambda t: t.max(-1).values) if mode == "max" else (lambda t: t.mean(-1))
        return torch.stack([reduce(span) for span in spans], dim=-1)
    flat = x.reshape(-1, 1, x.shape[-1])
    if mode == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return out[..., : x.shape[-1]].reshape(x.shape)


# --- generic invariants -----------------------------------------------------------------------------------

def check_slot_invariants(snaps: list[Snapshot], budgets: list[list[int]], constant: bool = False,
                          qkv: QKV | None = None) -> None:
    """Every snapshot, layer, sequence and KV head: filled slots <= budgets[layer][b] (== min(seen, budget)
    when `constant`); filled slots hold distinct real positions < seen (padding and the future never occupy
    a slot); empty slots have pos -1; no slot is a merge (log w = 0); with `qkv`, each filled slot holds exactly
    the key and value of its position."""
    for si, snap in enumerate(snaps):
        seen = torch.tensor(snap.seen)[:, None, None]  # [B, 1, 1]
        for layer, s in enumerate(snap.layers):
            filled, pos = torch.isfinite(s["logw"]), s["pos"]
            budget = torch.tensor(budgets[layer])[:, None]  # [B, 1]
            n = filled.sum(-1)  # [B, Hkv]
            where = f"snapshot {si} (seen {snap.seen}), layer {layer}"

            def fail(bad: torch.Tensor, what: str) -> str:
                b, h = bad.nonzero()[0].tolist()[:2]
                return (f"{where}, sequence {b}, head {h}: {what}; budget {budgets[layer][b]}, "
                        f"positions {sorted(pos[b, h][filled[b, h]].tolist())}")

            bad = n > budget
            assert not bad.any(), fail(bad, "more filled slots than the budget")
            if constant:
                bad = n != torch.minimum(seen[..., 0], budget)
                assert not bad.any(), fail(bad, "filled slots != min(seen, budget)")
            bad = (filled & ((pos < 0) | (pos >= seen))).any(-1)
            assert not bad.any(), fail(bad, "a filled slot holds padding or a position not yet seen")
            bad = (~filled & (pos != -1)).any(-1)
            assert not bad.any(), fail(bad, "an empty slot has a position")
            bad = (filled & (s["logw"] != 0)).any(-1)
            assert not bad.any(), fail(bad, "a slot counts more than one token")
            ordered = pos.masked_fill(~filled, -1).sort(-1).values
            bad = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(-1)
            assert not bad.any(), fail(bad, "a position is held by two slots")
            if qkv is not None:
                idx = pos.clamp(min=0)[..., None].expand_as(s["k"])
                for name, true in (("k", qkv.k[layer]), ("v", qkv.v[layer])):
                    expected = true.gather(2, idx)
                    bad = (filled[..., None] & (s[name] != expected)).any(-1).any(-1)
                    assert not bad.any(), fail(bad, f"a slot's {name} is not its token's")


def ratio_or_tokens(budget: float | int, prompt_len: int) -> int:
    """The documented resolution of a budget: a float is that fraction of the prompt (at least 1 slot),
    an int is a number of slots."""
    return max(1, int(budget * prompt_len)) if isinstance(budget, float) else budget


def reference_min_budget_output(probs: torch.Tensor, values: torch.Tensor, order: list[int], eps: float) -> int:
    """1 + the largest k whose first k keys of `order`, attention renormalised over them, leave the mean relative
    output error of the queries probs [W, S] (values [S, D]) above eps; a query with no mass on them outputs 0."""
    full = probs @ values
    worst = 0
    for k in range(1, probs.shape[1] + 1):
        kept = probs[:, order[:k]]
        mass = kept.sum(-1, keepdim=True)
        out = torch.where(mass > 0, kept @ values[order[:k]] / mass.clamp(min=1e-300), torch.zeros_like(full))
        if ((out - full).norm(dim=-1) / full.norm(dim=-1)).mean() > eps:
            worst = k
    return min(worst + 1, probs.shape[1])


def dense_block_attention(q: torch.Tensor, k: torch.Tensor, positions: list[int], block: int,
                          scale: float) -> torch.Tensor:
    """One sequence, float64: q [Hq, T, D], k [Hkv, T, D] -> [Hkv, T] column sums of the softmax of every valid
    query over the valid keys of its own block (position // block), then the mean over a KV head's queries."""
    hq, t, _ = q.shape
    hkv = k.shape[0]
    out = torch.zeros(hq, t, dtype=torch.float64)
    for h in range(hq):
        for i, pi in enumerate(positions):
            if pi < 0:
                continue
            keys = [j for j, pj in enumerate(positions) if pj >= 0 and pj // block == pi // block]
            logits = torch.stack([q[h, i].double() @ k[h * hkv // hq, j].double() * scale for j in keys])
            out[h, keys] += torch.softmax(logits, 0)
    return out.reshape(hkv, hq // hkv, t).mean(1)


def reference_leverage(keys: torch.Tensor) -> torch.Tensor:
    """Ridge leverage [n] of keys [n, D] (float64): h = diag(X (X^T X + r I)^-1 X^T), X the centred keys,
    r = 1e-4 tr(X^T X) / D."""
    x = keys.double()
    x = x - x.mean(0)
    gram = x.T @ x
    ridge = 1e-4 * torch.trace(gram) / x.shape[1]
    return torch.diagonal(x @ torch.linalg.inv(gram + ridge * torch.eye(x.shape[1], dtype=x.dtype)) @ x.T)


def layer_of(qkv: QKV, layer: int, b: int) -> QKV:
    """One layer of sequence b, as a one-layer model's q/k/v."""
    return QKV([qkv.q[layer]], [qkv.k[layer]], [qkv.v[layer]], qkv.seed).select(b)


def reference_uncertainty(qkv: QKV, layer: int, b: int, n: int, recent: int, window: int = 32,
                          tau: float = 0.9) -> float:
    """The mean over query heads of the fewest keys, the `recent` newest first (ZSMerge's ring, KVMerger's recent
    window) and then by accumulated attention
    (the KV head's mean over its query heads of every prompt query's), that keep the attention output of the
    last `window` queries within 1 - tau; sequence b's n tokens (drive_synthetic feeds positions 0 .. n-1)."""
    q, k, v = (x[layer][b, :, :n] for x in (qkv.q, qkv.k, qkv.v))  # [H, n, D]: positions 0 .. n-1
    groups = q.shape[0] // k.shape[0]
    counts = []
    for kv_head in range(k.shape[0]):
        probs = reference_probs(q[kv_head * groups:(kv_head + 1) * groups], k[kv_head], list(range(n)),
                                list(range(n)), None)  # [G, n, n]
        score = probs.sum(1).mean(0)  # [n]
        rank = score.masked_fill(torch.arange(n) >= n - recent, float("inf")).float()
        order = rank.argsort(descending=True, stable=True).tolist()
        for head_probs in probs:
            counts.append(reference_min_budget_output(head_probs[-window:], v[kv_head].double(), order, 1 - tau))
    return float(torch.tensor(counts, dtype=torch.float32).mean())


def record_layer_needs(monkeypatch) -> list[list[float]]:
    """Patch the allocation of layers by need (`layer_uncertainty.shares_by_need` -> `budgets.zigzag_budgets`) to
    record, per sequence it shares, the layers' needs it is given; returns the list it fills."""
    from kvzoo.cache import layer_uncertainty

    needs: list[list[float]] = []
    allocate = layer_uncertainty.zigzag_budgets

    def recording(need, *args):
        needs.append(list(need))
        return allocate(need, *args)

    monkeypatch.setattr(layer_uncertainty, "zigzag_budgets", recording)
    return needs
