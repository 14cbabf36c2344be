"""Per-layer attention-output error of a compressed cache (the ZSMerge authors' error study).

One exact forward over context + K probe tokens; at every layer, each method compresses the context's
keys/values as it would at prefill, then the probe tokens' queries attend to [compressed context slots
(with their alpha * log w bias) ; the probe tokens themselves, causally] and to the full context. The
relative error ||o_compressed - o_full|| / ||o_full|| (over heads, probe tokens and dims) is recorded per
layer and sequence. Every layer sees the exact inputs of the full model, so the error is that layer's cache
alone, not errors carried over from earlier layers; decode-time compression of the probe tokens is not
included (they are attended exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.chunk import make_prefill_chunk
from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.slots import KVCache, LayerSlots
from kvzoo.cache.observe import ForwardingObserver, observe_prefill
from kvzoo.generate import left_pad
from kvzoo_kernels.attention import prefill_attention

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.models.base import CausalLM


@dataclass
class _Probe:
    """What a layer's probe tokens need for the comparison, kept until every method has compressed."""

    q: torch.Tensor  # [B, Hq, K, D] probe queries
    k: torch.Tensor  # [B, Hkv, K, D]
    v: torch.Tensor
    pos: torch.Tensor  # [B, K]
    full: torch.Tensor  # [B, Hq, K, D] exact output over the whole context + probe


class _ErrorProbe(ForwardingObserver):
    def __init__(self, targets: list[tuple[CompressionMethod, KVCache]], context_len: int) -> None:
        super().__init__(targets)
        self.context_len = context_len
        self.probes: list[_Probe] = []

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        t = self.context_len
        q, k, v, pos = chunk.q, chunk.k, chunk.v, chunk.q_pos
        context = make_prefill_chunk(q[:, :, :t], k[:, :, :t], v[:, :, :t], pos[:, :t], None, 0, 0.0, chunk.window)
        full = prefill_attention(q[:, :, t:], chunk.keys, chunk.values, pos[:, t:], chunk.key_pos, chunk.key_bias,
                                 chunk.window)
        self.probes.append(_Probe(q[:, :, t:], k[:, :, t:], v[:, :, t:], pos[:, t:], full))
        for method, cache in self.targets:
            method.compress_prefill(layer_idx, cache.layers[layer_idx], context)


def layer_errors(slots: LayerSlots, alpha: float, probe: _Probe, window: int | None) -> torch.Tensor:
    """[B] relative error of the probe tokens' attention output over [slots ; probe] vs the full one."""
    b, hkv, k_len, _ = probe.k.shape
    probe_pos = probe.pos[:, None, :].expand(b, hkv, k_len)
    keys = torch.cat([slots.k, probe.k], dim=2)
    values = torch.cat([slots.v, probe.v], dim=2)
    key_pos = torch.cat([slots.pos, probe_pos], dim=2)
    bias = torch.cat([slots.slot_bias(alpha), torch.zeros(b, hkv, k_len)], dim=2)
    out = prefill_attention(probe.q, keys, values, probe.pos, key_pos, bias, window)
    diff = (out.float() - probe.full.float()).flatten(1).norm(dim=1)
    return diff / probe.full.float().flatten(1).norm(dim=1)


@torch.inference_mode()
def attention_errors(model: "CausalLM", contexts: list[list[int]], probes: list[list[int]],
                     methods: list[CompressionMethod]) -> list[torch.Tensor]:
    """Per method: relative attention-output error [L, B] of its compressed context at every layer.
    Contexts must all have the same length (so are the probe continuations)."""
    if len({len(c) for c in contexts}) != 1 or len({len(p) for p in probes}) != 1:
        raise ValueError("attention_errors needs contexts of one length and probes of one length")
    param = next(model.parameters())
    cfg = model.config
    lens = [len(c) for c in contexts]
    caches = [m.make_cache(cfg, lens, 0, param.dtype, param.device) for m in methods]
    probe = _ErrorProbe(list(zip(methods, caches)), lens[0])
    ids, positions = left_pad([c + p for c, p in zip(contexts, probes)], 0, param.device)
    observe_prefill(model, ids, positions, probe)
    out = []
    for method, cache in zip(methods, caches):
        cache.tokens_seen = lens[0]
        cache.end_prefill()  # deferred methods (ZigZagKV) compress here
        errors = [layer_errors(layer, method.attention_alpha, p, cfg.sliding_window)
                  for layer, p in zip(cache.layers, probe.probes)]
        out.append(torch.stack(errors))
    return out
