"""KVzip (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv
2505.23416): keep the tokens the model reads when it reproduces the document."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvzoo.cache.base import PrefillOnlyMethod, ScoredSelection
from kvzoo.cache.budgets import Budget, check_budget, resolve_budget
from kvzoo.cache.reconstruction import score_a_fresh_document, take_reconstruction_scores
from kvzoo.cache.selection import sink_mask
from kvzoo.cache.slots import KVCache, LayerSlots
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig
    from kvzoo.models.base import CausalLM


@dataclass
class KVzip(ScoredSelection, PrefillOnlyMethod):
    """Prefill-only selection by the reconstruction score (`kvzoo.cache.reconstruction`): before the prompt's
    forward, one more forward over the prompt followed by itself; each token is scored by the largest
    attention the second copy's queries give it, the first `sinks` tokens are always kept. Nothing reads a
    question, so a document compressed once serves any later question.

    Differs from the paper: the copies are adjacent (no "Repeat the previous context" instruction between them,
    so no tokenizer or chat template is needed), the document is reconstructed in one piece rather than in
    2k-token chunks, and every KV head keeps the same number of slots (the paper ranks all heads of all layers
    together; kvzoo's stores give each head of a layer the same budget). Needs the whole prompt in one chunk.
    Budget rule (`budgets.resolve_budget`): at least `sinks` slots (1), at most the prompt; decode appends up to
    `decode_cap` generated tokens (None: all).
    """

    supports_chunked_prefill = False  # the reconstruction reads the whole document

    budget: Budget = 0.2
    sinks: int = 4
    decode_cap: int | None = None

    def __post_init__(self) -> None:
        check_budget(self.budget, "KVzip")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise KvzooError(f"KVzip: sinks must be an integer >= 0, got {self.sinks!r}")
        self.check_decode_cap()

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        return [[resolve_budget(self.budget, n, minimum=max(1, self.sinks), cap_at_prompt=True)
                 for n in prompt_lens]] * cfg.num_layers

    def before_prefill(self, model: "CausalLM", cache: KVCache, ids: torch.Tensor, positions: torch.Tensor) -> None:
        score_a_fresh_document(model, cache, ids, positions)  # a later prompt is appended whole: not scored

    def prefill_scores(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        scores = take_reconstruction_scores(slots, chunk)
        assert scores is not None  # compress_prefill sees only a fresh document (take_prefill_chunk)
        return scores

    def protected(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        return sink_mask(chunk, self.sinks)

    def prefill_keep(self, slots: LayerSlots) -> torch.Tensor:
        return slots.state["prefill_budget"]
