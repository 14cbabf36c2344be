"""The interface every compression method implements: a policy on the slot cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvzoo.cache.selection import append_decode_step, keep_every_candidate, keep_top
from kvzoo.cache.slots import KVCache, LayerSlots, allocate_stores
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig
    from kvzoo.models.base import CausalLM


class CompressionMethod:
    """A method decides how many slots each layer gets and what goes into them.

    Hooks:
    - `prefill_budgets`: slots per KV head kept after prefill, per layer and sequence;
    - `decode_headroom`: extra slots for generated tokens (0 for methods that compress while decoding,
      so their memory stays constant);
    - `compress_prefill`: after a layer's exact attention over a prompt chunk, fill/evict/merge slots (reached
      through `take_prefill_chunk`, which keeps a later prompt whole for methods that `appends_later_prompts`);
    - `decode_step`: after a decode step's attention, place the new token. Tensor ops only: this runs inside
      the compiled decode step, so no `.item()`, no branching on tensor values, no data-dependent shapes;
    - `end_prefill`: once the whole prompt is in (for methods that allocate from every layer's statistics);
    - `before_prefill`: before every prompt chunk's forward, with the model (for what the method learns of the
      model itself, e.g. its copy heads);
    - `for_stored_document`: the method `prefill_cache` compresses a document with (questions come later).
    """

    # False for methods whose allocation needs the whole prompt at once (ZigZagKV).
    supports_chunked_prefill: bool = True
    # False for methods whose `decode_step` never reads the attention probabilities (it gets None): their
    # decode attention skips computing them (a fused kernel instead of logits, softmax and two matmuls).
    reads_decode_probs: bool = True
    # True for methods whose `decode_step` always puts the new token in a free slot, whatever attention did
    # (never reads the probabilities, never evicts while decoding): the decode step then writes first and
    # attends over the store alone, which equals attending over [store ; new token] and is one fused kernel
    # call with nothing to fold in (`kvzoo_kernels.decode_attention.store_attention`).
    decode_writes_first: bool = False
    # True for methods whose `decode_step` treats every (sequence) row alike and on its own, never reads
    # `layer_idx` and never writes `budget` or `state`: eager decode then runs it once per step on every
    # layer's store at once (`KVCache.stacked_groups`: layers become rows), after the last layer's attention.
    # The result is the same, since a layer's update is only read by that layer's next step.
    decode_step_rowwise: bool = False
    # True for methods whose `end_prefill` reads `cache.prompt_surprisal` (each prompt token's -log p under the
    # model, by position): the model then computes it from its output head over a fresh prompt fed in one shot.
    reads_prompt_surprisal: bool = False
    # The per-slot state entries ([B, Hkv, C]) a row-wise decode step reads (the stacked view copies them in).
    decode_slot_state: tuple[str, ...] = ()
    # True for methods that compress only the prompt they were made for and append what follows (prefill-only
    # methods): a later prompt to their cache (a question to a stored document, `generate(cache=...)`) is
    # kept whole, in the headroom `continue_cache` gives its fork for it, as their generated tokens are;
    # compressing it to the old budget would only drop stored tokens, the room being allocated anyway.
    # Decode-time methods keep their size, so they compress a later prompt as any chunk.
    appends_later_prompts: bool = False

    @property
    def attention_alpha(self) -> float:
        """Scale of the `log w` attention bias of merged slots (0 for methods that never merge)."""
        return 0.0

    def slots_in_use(self, capacity: int, tokens_seen: int) -> int:
        """How many leading slots a later prompt chunk must attend to (and may compress) after `tokens_seen`
        prompt positions: all of them once anything is in (slots may be filled anywhere)."""
        return capacity if tokens_seen > 0 else 0

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        """[L][B] slots per KV head a prompt is compressed into as it is read (the whole prompt, for a method
        that allocates only once it has read all of it, at `end_prefill`)."""
        raise NotImplementedError

    def compressed_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        """[L][B] slots per KV head held once prefill is over, as far as they are known before the prompt is
        read: `prefill_budgets`, or for a method that allocates at `end_prefill` the average layer's share in
        every layer (the same total)."""
        return self.prefill_budgets(cfg, prompt_lens)

    def decode_headroom(self, max_new_tokens: int) -> int:
        return 0

    def before_prefill(self, model: "CausalLM", cache: KVCache) -> None:
        """Called by the model before a prompt chunk's forward over `cache` (never in decode steps)."""

    def for_stored_document(self, chunked: bool = False) -> "CompressionMethod":
        """The method that compresses a document stored for questions asked later (`prefill_cache`, the eval's
        questions asked after compression), where nothing in the prompt says what will be read: this method
        itself unless it keeps something else for such questions (ZSMerge's `stored_ring`). `chunked`: the
        document is fed in chunks (`prefill_chunk`), so the method must support chunked prefill if this one
        does."""
        return self

    def for_chunked_prefill(self) -> "CompressionMethod":
        """The method that compresses a prompt fed in chunks (`prefill_chunk`), whose memory must stay flat:
        this method itself unless it would hold the whole prompt for a choice it can also make without
        (ZSMerge's and KVMerger's `layer_budgets`)."""
        return self

    def make_cache(
        self,
        cfg: "ModelConfig",
        prompt_lens: list[int],
        max_new_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
        compressed: bool = False,
    ) -> KVCache:
        """Allocate every layer's slot store; capacities are fixed here, before the first decode step.
        `compressed`: the cache as it is once prefill is over (`compressed_budgets`), to measure it without a
        prompt (`kvzoo info`), not to prefill into."""
        headroom = self.decode_headroom(max_new_tokens)
        budgets_of = self.compressed_budgets if compressed else self.prefill_budgets
        prefill_budgets = [torch.tensor(budgets, dtype=torch.int64) for budgets in budgets_of(cfg, prompt_lens)]
        # Equal capacities become one allocation (`SlotStack`): row-wise decode updates then batch the layers.
        stacks, layers = allocate_stores([budgets + headroom for budgets in prefill_budgets],
                                        [int(budgets.max()) + headroom for budgets in prefill_budgets],
                                        cfg.num_kv_heads, cfg.head_dim, dtype, device)
        for slots, budgets in zip(layers, prefill_budgets):
            slots.state["prefill_budget"] = budgets.to(device)
            slots.state["prompt_len"] = torch.tensor(prompt_lens, dtype=torch.int64, device=device)
        return KVCache(layers=layers, method=self, max_position=max(prompt_lens, default=0) + max_new_tokens,
                       stacks=stacks)

    def take_prefill_chunk(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        """What the attention layer hands each prompt chunk to: `compress_prefill`, except that a method that
        `appends_later_prompts` keeps a later prompt's chunk (`PrefillChunk.continues_a_prompt`) beside every
        slot in use."""
        later = self.appends_later_prompts and chunk.slots_before > 0 \
            and bool(chunk.continues_a_prompt(slots).all())  # one host read per layer, prefill only
        if not later:
            self.compress_prefill(layer_idx, slots, chunk)
            return
        held = torch.isfinite(chunk.key_logw).sum(-1).amax(-1)  # [B] slots each sequence needs
        short = (held > slots.budget).nonzero()
        if len(short):
            b = int(short[0, 0])
            raise KvzooError(f"{type(self).__name__} keeps a later prompt whole, but sequence {b}'s cache has room "
                             f"for {int(slots.budget[b])} slots per head and needs {int(held[b])}: continue a stored "
                             "cache through generate(..., cache=...), which gives its copy the room")
        keep_every_candidate(slots, chunk)

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        raise NotImplementedError

    def decode_step(
        self,
        layer_idx: int,
        slots: LayerSlots,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        pos_new: torch.Tensor,
        probs: torch.Tensor,
    ) -> None:
        """k_new, v_new: [B, Hkv, D]; pos_new: [B]; probs: [B, Hq, C + 1] (last column: the new token), or
        None when the method says it does not read them (`reads_decode_probs = False`)."""
        raise NotImplementedError

    def end_prefill(self, cache: KVCache) -> None:
        """Called once after the whole prompt has been fed. A method may replace entries of `cache.layers`
        here (e.g. with smaller stores); nothing may hold on to a layer's store across this call."""


class ScoredSelection(CompressionMethod):
    """A method whose prefill is one job, scoring (as kvpress' scorer presses): `prefill_scores` returns each
    candidate's importance [B, Hkv, S] and `protected` the candidates always kept (a recent window, sinks);
    this base keeps the protected ones and then the highest-scored, up to `prefill_keep` slots, storing each
    kept slot's score for decode."""

    def prefill_scores(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor:
        """[B, Hkv, S] importance of every candidate of [slots in use ; chunk tokens] (higher is kept)."""
        raise NotImplementedError

    def protected(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor | None:
        """[B, Hkv, S] bool: candidates kept whatever their score (None: none)."""
        return None

    def prefill_keep(self, slots: LayerSlots) -> torch.Tensor:
        """[B] slots to fill after prefill."""
        return slots.budget

    def prefill_tiebreak(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor | None:
        """[B, Hkv, S] order among equal scores (None: the newer position first), e.g. the unpooled score."""
        return None

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        scores = self.prefill_scores(slots, chunk)
        forced = self.protected(slots, chunk)
        rank = scores if forced is None else scores.masked_fill(forced, float("inf"))
        keep_top(slots, chunk, rank, self.prefill_keep(slots), stored_score=scores,
                 tie=self.prefill_tiebreak(slots, chunk))


class PrefillOnlyMethod(CompressionMethod):
    """A method that compresses only the prompt: generated tokens are appended, up to `decode_cap` of them
    (None: all); past the cap each new token replaces the oldest generated one, the compressed prompt stays.
    Subclasses are dataclasses with a `decode_cap: int | None = None` field."""

    decode_cap: int | None
    reads_decode_probs = False  # generated tokens are appended whatever attention did
    appends_later_prompts = True  # and so is a later prompt (a question to a stored document)
    decode_step_rowwise = True

    @property
    def decode_writes_first(self) -> bool:  # type: ignore[override]
        """Without a cap every generated token has a free slot (`decode_headroom`); with one, a token past
        the cap replaces the oldest generated one, which must still be attended to at that step."""
        return self.decode_cap is None

    def check_decode_cap(self) -> None:
        cap = self.decode_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise KvzooError(f"{type(self).__name__}: decode_cap must be None or an integer >= 1, got {cap!r}")

    def decode_headroom(self, max_new_tokens: int) -> int:
        return max_new_tokens if self.decode_cap is None else min(max_new_tokens, self.decode_cap)

    def decode_step(self, layer_idx: int, slots: LayerSlots, k_new: torch.Tensor, v_new: torch.Tensor,
                    pos_new: torch.Tensor, probs: torch.Tensor | None) -> None:
        append_decode_step(slots, k_new, v_new, pos_new)
