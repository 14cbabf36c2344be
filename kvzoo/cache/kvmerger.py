"""KVMerger (Wang, Jin, Yu, Zhang, "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on
Long-Context Tasks", arXiv 2407.08454). Specification: METHODS.md section 2 (no official code exists).

At the end of each layer's prefill (by default at the end of the whole prefill, once the layers have shared the
budget by need: `layer_budgets`), per (sequence, KV head), as the paper describes it (the defaults differ in the
ratios' base, the heavy hitters' rank, the value scaling and the layers' budgets: see "Ambiguities" below):
1. aggregated attention A_t = column sums of the prompt's causal attention over all its queries
   (`scoring.accumulated_scores`; GQA: mean over the group's query heads);
2. protected tokens, kept verbatim: the most recent `recent_ratio` of the prompt and the `heavy_ratio` of
   the prompt with the largest A_t among the older tokens (`protected_tokens`);
3. merging sets (Algorithm 1): runs of consecutive unprotected tokens whose adjacent post-RoPE keys have
   cosine similarity >= epsilon (`merging_sets`); protected tokens and dissimilar neighbours are singletons;
4. each set becomes one slot (`merge_sets`): pivot p = argmax A_t in the set, Gaussian weights
   g_t = exp(-|k_p - k_t|^2 / (2 sigma^2)) normalised over the set (the pivot's is the largest),
   k* = sum w_t k_t, v* = |S| sum w_t v_t; the slot sits at the pivot's position with log w = log |S|.
Decode appends generated tokens (prefill-only method, METHODS.md 2.2 step 4), as SnapKV.

Ambiguities (METHODS.md 2.2, 2.6) and how they are resolved here:
- Exact budget (2.2 step 5). With `budget` set, epsilon is chosen per (layer, sequence, head) as bisection
  would find it, without iterating: to end with exactly B entries, m = B - #protected sets are needed among
  the unprotected tokens, i.e. m - #runs of the links between adjacent unprotected tokens must be cut; the
  least similar links are cut (ties: the earlier link first). This is Algorithm 1 with epsilon just above
  the (m - #runs)-th smallest similarity, so no remainder is left to fix (`budget_merging_sets`). It gives
  exactly min(B, prompt length) entries, provided #protected + #runs <= B, which `protected_tokens`
  guarantees: the recent window is at most B - 1 tokens and heavy hitters are added in score order only
  while protected + runs still fits (adding one raises that count by 0, 1 or 2, so the prefix is well
  defined). `threshold` is then unused: it is the epsilon of `budget=None`, the paper's own mode, where
  the data decides the size (#protected + #sets) and each layer's store is shrunk to fit at the end of
  prefill; `threshold > 1` there merges nothing and reproduces the full cache.
- A floor on epsilon (`min_similarity`, not in the paper's budget reading): the paper merges runs of keys whose
  adjacent cosine similarity is at least epsilon (0.75), a set of similar keys being its premise, and skips
  layers 0, 1 and L-1, where adjacent keys are not similar. Without skipped layers, a small budget drives the
  bisection's epsilon far down in such a layer: SmolLM2-135M's layer 0 at 5% kept merges across links of
  cosine 0.19 (its other layers 0.58-0.86), and its attention output there was 0.37 off the full cache's
  against SnapKV's 0.24 (`kvzoo eval --tasks attn_error`). So epsilon stops at `min_similarity` (0.5): a less
  similar link is always cut, and the entries beyond the budget are evicted, the sets of lowest summed A_t
  first (never a protected token). A layer whose keys are similar merges as before; one whose keys are not
  becomes eviction by A_t. `min_similarity=None` (`KVMerger.paper()`) lets the budget lower epsilon as far as
  it must, so every token is merged somewhere. Measured: see the field's comment.
- recent_ratio / heavy_ratio: the paper reports 0.17 / 0.12 of the prompt at a 50% budget. As fractions of
  the prompt they outgrow any budget below 29%: at 5% the recent window alone took all but one slot and
  every older token merged into that one slot. The default keeps the paper's proportions *of the budget*
  (`ratio_of="budget"`, 0.34 / 0.24 = 0.17 / 0.12 at 50%), so a small budget still has 42% of its slots for
  merged sets; `ratio_of="prompt"` (in `KVMerger.paper()`) is the paper's reading. Heavy hitters are chosen
  among the tokens outside the recent window.
- sigma: the paper's adaptive formula is circular; fixed sigma = 5 (the value its grid search picks).
  sigma = inf gives plain averaging.
- Value scaling: the default is NOT the paper's. The paper multiplies a merged value by |S|
  (`value_scale="set_size"`, `alpha=0`, reachable as `KVMerger.paper()`); measured on held-out texts with
  the default model (SmolLM2-135M, 256 teacher-forced tokens after a compressed context) that collapses
  at small budgets (continuation NLL 15.7 at 5% kept vs 1.05 for the full cache and ~2.0 for every other
  method): a set of tens of tokens multiplies its value by tens, far outside the values attention can mix.
  The default keeps the weighted mean value (`value_scale="none"`) and gives the merged slot the
  attention bias alpha * log|S| with `alpha=1` (the ZSMerge-style compensation of METHODS.md 2.6): the slot
  then attracts the attention mass of |S| copies of its key, and its output stays a convex combination of
  values (exact for identical keys and values).
- A merged slot's count (`merged_count`, `stored_merged_count`; not in the paper). The Gaussian weights put most
  of a set's key on its pivot, the set's most attended token, so |S| copies of that key can draw more attention
  than the set's members drew: a question asked after compression then reads the merged slots instead of the
  verbatim answer in the recent window (seed 25's two 1024-token needles planted last, lost at 5% kept with
  |S| and answered with the count below or with `alpha=0`). `merged_count="attention"` counts a slot as
  n_p * sum_t A_t / A_p (`attention_counts`: the members' accumulated attention in units of the pivot's,
  between 1 and |S|). Measured (tools/RESULTS.md, "Session 34"; SmolLM2-135M, equal memory): needles asked after
  compression, seeds 24-28 (120, the full cache 86), 20 / 22 / 32 at 5 / 10 / 20% kept against 18 / 20 / 29 with
  |S| (SnapKV 20 / 20 / 20): all of the gain on seed 25 (the two needles above and the same failure at 10 and
  20%), level on the other four (16 / 18 / 26 both); asked with the context (seeds 24-26, 72) 21 / 38 / 44
  against 20 / 36 / 43; but continuation NLL (seed 24, 16 windows) +0.015 +- 0.006 / +0.009 +- 0.006 / +0.008
  +- 0.004 higher (why a continuation prefers |S| is not settled; the weights' effective count, 1 / sum w^2,
  costs more). So a prompt keeps |S| (`merged_count="members"`) and a document stored for later questions
  counts by attention (`stored_merged_count="attention"`).
- Pivot ties go to the earliest token; a merged slot's score is the sum of its members' A_t.
- Granularity: sets, pivots and epsilon per KV head; every head keeps B entries (budget mode).
- skip_layers (paper: {0, 1, L-1}; negative indices count from the end) are not compressed at all: they
  keep the whole prompt, so their capacity is the prompt length. The other layers' budgets are not lowered
  to compensate, so the cache is larger than `budget` implies: with L layers, s skipped and budget ratio r,
  (s + (L - s) r) / L of the full cache, e.g. SmolLM2-135M (L=30, s=3) at r=0.05: 14.5% instead of 5%.
  The default skips no layer, so that a budget means the same memory for every method.
- Chunked prefill (not in the paper) is supported: A_t accumulates over chunks (H2O-style), the recent window
  is relative to the chunk's newest token, and already merged slots re-enter merging as members standing for
  n = exp(log w) tokens (key weight proportional to n g_t; with value_scale="set_size" their values are
  divided by n before re-merging). A single-chunk prompt is exactly the algorithm above. A prompt fed in
  chunks keeps uniform layers (`for_chunked_prefill`).
- A_t uses the whole prompt's attention (O(T^2) compute in blocks, never an O(T^2) buffer); the cheaper
  observation-window proxy of METHODS.md 2.6 is not offered.
- Heavy hitters: the default is NOT the paper's. The paper protects the largest A_t; a question at the end
  of the prompt then has its answer merged into a set unless every earlier query read it too. The default
  (`rank="attention_shares"`) protects the largest of each token's share of A_t and its share of the last
  8 queries' max-pooled attention, the rank ZSMerge and ZigZagKV offer. Measured (tools/RESULTS.md,
  "Session 12"; SmolLM2-135M, equal budgets): 24 held-out query-aware needles 13 / 29 / 38% at 5 / 10 /
  20% kept against 8 / 17 / 25% with A_t alone (SnapKV 12 / 12 / 17%), asked after compression 17 / 17 /
  17% (13 / 17 / 17%); continuation NLL of 16 held-out contexts +0.005 +- 0.022 / +0.022 +- 0.017 / +0.009
  +- 0.007 against A_t alone (against SnapKV: +0.005 +- 0.028 / -0.011 +- 0.026 / -0.006 +- 0.021).
  Development set: needles 3 / 3 / 4 of 12 against 2 / 2 / 2, NLL +0.003 +- 0.023 / +0.007 +- 0.007.
- The window's scores are max-pooled over a token and the 6 before it (`pool_ahead=0`, session 20; centred
  before), so a token the question reads lends its score to the tokens after it, where its answer is (see
  ZSMerge's "Measured effect"). Seeds 5 and 6 (48 needles): asked with the context 14 / 25 / 28 at 5 / 10 /
  20% kept against 9 / 15 / 19 centred (SnapKV 6 / 7 / 12), asked after 5 / 5 / 7 against 4 / 6 / 7; Rust
  book (seeds 1 and 2) 13 / 26 / 31 against 4 / 16 / 22 (SnapKV 8 / 9 / 11), after 8 / 8 / 8 as before;
  continuation NLL level (seed 9: +0.005 +- 0.005 / +0.001 +- 0.002 / +0.000 +- 0.004; Rust
  book seed 1: +0.002 +- 0.004 / -0.006 +- 0.005 / -0.001 +- 0.004).
- Per-layer budgets (`layer_budgets`, not in the paper, which gives every compressed layer the same budget and
  skips three): the default shares L x budget between the merging layers by need, with ZigZagKV's rule on each
  layer's output uncertainty, so the whole prompt is held until the end of prefill, where each layer merges it
  into its own budget (as a uniform KVMerger with that budget would). Measured: see the field's comment.
- A document stored for later questions (`for_stored_document`, not in the paper): its last queries are the
  document's own, so the heavy hitters are ranked by Compactor's query-agnostic score (`rank="compactor"`,
  the first tokens first, each token's score max-pooled from the 2 before it to the 6 after it, so a kept token
  keeps the phrase that leads to it: `compactor.SPAN`, `compactor.LEAD_IN`) and the recent
  window holds 32 tokens, at most half the budget (`stored_recent`, as ZSMerge's `stored_ring`; session 25). The
  heavy hitters take every slot the window leaves but one per run of tokens between them, each run merged into
  that slot (`stored_verbatim`, session 42; a prompt's verbatim share left 4 heavy hitters at 5% kept), and of
  equal pooled ranks the newer tokens are protected first (the span lends a token's score to the 6 before it, so
  the newer of a tied span are its peak and the lead-in nearest it; a prompt's window score lends forward, and
  keeps the earlier first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvzoo.cache.base import PrefillOnlyMethod
from kvzoo.cache import layer_uncertainty
from kvzoo.cache.budgets import Budget, check_budget, check_choice, check_counts, check_pooling, resolve_budget
from kvzoo.cache.compactor import (check_surprisal_settings, held_rank_with_surprisal, sinks_then_compactor,
                                   unpooled_compactor)
from kvzoo.cache.merging_sets import (attention_counts, budget_merging_sets, evict_lowest_sets, gaussian_merge_weights,
                                      merge_sets, merging_sets, per_set, protected_tokens, set_pivots)
from kvzoo.cache.scoring import accumulated_scores, attention_shares, window_scores
from kvzoo.cache.selection import keep_every_candidate, keep_top, recent_mask, shrink_slots, slot_candidates
from kvzoo.cache.slots import NEG_INF, KVCache, LayerSlots, allocate_stores
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig

VALUE_SCALES = ("set_size", "none")
MERGED_COUNTS = ("attention", "members")  # see KVMerger.merged_count
RATIOS_OF = ("budget", "prompt")
RANKS = ("accumulated", "attention_shares", "compactor")  # see KVMerger.rank
LAYER_BUDGETS = ("uniform", "uncertainty")  # see KVMerger.layer_budgets


# --- the method ----------------------------------------------------------------------------------------


@dataclass
class KVMerger(PrefillOnlyMethod):
    """Merge runs of similar adjacent keys into Gaussian-weighted pivots at prefill; see the module doc.
    Budget rule (`budgets.resolve_budget`): at least 1 slot, at most the prompt (a prompt no longer than the
    budget is kept whole); skipped layers keep the whole prompt. With `layer_budgets="uncertainty"` it is the
    merging layers' average: each gets between a fifth of it (at least 1) and the prompt."""

    budget: Budget | None = 0.5  # slots per KV head (ratio of the prompt or tokens); None: fixed epsilon
    threshold: float = 0.75  # epsilon: cosine similarity of adjacent keys that merges (budget=None only)
    sigma: float = 5.0
    recent_ratio: float = 0.34  # of `ratio_of`, kept verbatim
    heavy_ratio: float = 0.24  # of `ratio_of`, kept verbatim (largest aggregated attention)
    ratio_of: str = "budget"  # "budget" (default) or "prompt" (paper: 0.17 / 0.12 of the prompt at a 50% budget)
    skip_layers: tuple[int, ...] = ()  # paper: (0, 1, -1), kept whole (outside the budget)
    value_scale: str = "none"  # paper: "set_size" (see the module doc)
    alpha: float = 1.0  # log|S| attention bias of merged slots (paper: 0, no bias)
    decode_cap: int | None = None
    # What picks the heavy hitters among the older tokens: "accumulated" (the paper's A_t) or
    # "attention_shares" (`scoring.attention_shares`: the larger of a token's share of A_t and of the pooled
    # attention of the last `window_size` queries, max-pooled over `kernel_size` positions, as ZSMerge and
    # ZigZagKV read them), so what a question at the end of the prompt reads is kept verbatim rather than
    # merged, or "compactor" (`compactor.sinks_then_compactor`: the first tokens, then Compactor's
    # query-agnostic score, blended by the fraction of the prompt the budget drops), for a document whose
    # questions come later. Pivots and merged slots' scores stay A_t. See "Measured" in the module doc.
    rank: str = "attention_shares"  # paper: "accumulated"
    # The recent window holds this many tokens, and at most half the budget (None: `recent_ratio`); the
    # verbatim share (recent_ratio + heavy_ratio) is kept, the heavy hitters taking what the window does not,
    # so the budget and the merged sets' share are unchanged.
    recent_tokens: int | None = None
    # A document stored for questions asked later (`for_stored_document`: `prefill_cache`, `model.prefill`, the
    # eval's needles asked after compression): its heavy hitters are ranked by Compactor's score
    # (rank="compactor"), since the last queries are the document's own, not a question's, and its recent
    # window holds this many tokens (`recent_tokens`: what a question goes on from, SnapKV's window, as
    # ZSMerge's `stored_ring`). None: as a prompt; a document fed in chunks too (Compactor's score is of one
    # chunk). Not the paper's. Measured (tools/RESULTS.md, "Session 25"; 96 needles asked after compression,
    # seeds 12-14 and 16, the full cache 68): 15 / 16 / 30 at 5 / 10 / 20% kept against SnapKV's 16 / 16 / 16
    # (12 / 11 / 14 of 72 on seeds 12-14 with the prompt rule, against 11 / 12 / 23); Compactor's rank with
    # the usual recent window answers less at 20% (10 against 15 on seeds 12-13); `make demo`'s stored
    # document 5 / 4 of 6 facts at 50 / 20% kept against 2 / 0. The rank keeps spans since session 36
    # (`compactor.SPAN`): on fresh seeds 29-30 (48, the full cache 38) 8 / 10 / 15 against 8 / 10 / 16; and their
    # lead-ins since session 40 (`compactor.LEAD_IN`): on seeds 33-36 (96, the full cache 71) 17 / 19 / 35 against
    # the centred span's 16 / 20 / 33 (SnapKV 15 / 15 / 14).
    stored_recent: int | None = 32
    # The share of a stored document's budget (of `ratio_of`, as the shares it replaces) kept verbatim:
    # `stored_recent`'s window and the heavy hitters, in place of recent_ratio + heavy_ratio (with `stored_recent`
    # set). 1.0: the heavy hitters take every slot the window leaves but one per run of tokens between them
    # (`protected_tokens` stops there), so each such run is merged into one slot, or evicted where its keys are
    # less similar than `min_similarity`: what a later question copies (a code, a name) is kept exactly, and the
    # text between is merged rather than dropped. A prompt's 0.58 (the paper's 0.17 + 0.12 at 50%) left a stored
    # document 4 heavy hitters at 5% of 1005 tokens (50 slots; its window takes 25) and 17 merged slots per head,
    # which no later question could read a code from (counted over one stored prefill's layers; 1.0: 2.6 merged).
    # Not the paper's. Measured (tools/RESULTS.md, "Session 42"; needles asked after
    # compression, seeds 33-34, 48, the full cache 36, equal memory): 15 / 25 / 31 at 5 / 10 / 20% kept against
    # 8 / 15 / 28 (0.84: 13 / 21 / 32; the window outside the shares, 0.58 of the rest verbatim: 11 / 20 / 27;
    # SnapKV 8 / 8 / 7). The newer-first tie alone answers the same 8 / 15 / 28 (with 1.0: one gained, one lost).
    # Seeds 35-36 (48, the full cache 35): 15 / 25 / 30; a fresh seed (38, 24, the full cache 17): 4 / 11 / 15
    # (SnapKV 4 / 4 / 4).
    stored_verbatim: float = 1.0
    window_size: int = 8  # rank="attention_shares": the window's queries
    kernel_size: int = 7  # rank="attention_shares": pooling of the window's scores over positions
    pooling: str = "max"  # rank="attention_shares": "max" or "avg" (SnapKV's) over `kernel_size` positions
    # rank="attention_shares": of the kernel_size pooled positions, how many follow a token (None: centred);
    # 0 lends a token's window score to the 6 after it (see the module doc)
    pool_ahead: int | None = 0
    # Budget mode never merges keys less similar than this (cosine of adjacent keys): a link below it is cut,
    # and the entries beyond the budget are evicted, the sets with the lowest summed A_t first
    # (`evict_lowest_sets`). None: the budget lowers epsilon as far as it must (every token is merged
    # somewhere). See "A floor on epsilon" in the module doc. Not the paper's. Measured (tools/RESULTS.md,
    # "Session 28"; 16 windows each, paired against None) at 5 / 10 / 20% kept: continuation NLL -0.026 +-
    # 0.007 / -0.009 +- 0.005 / -0.002 +- 0.003 (seed 15), -0.022 +- 0.006 / -0.016 +- 0.005 / -0.005 +- 0.003
    # (seed 12), -0.027 +- 0.008 / -0.010 +- 0.005 / -0.003 +- 0.003 (the Rust book, seed 4); layer 0's
    # attention-output error 0.25 / 0.21 / 0.16 against 0.37 / 0.35 / 0.28; needles on seeds 16 and 17 (48)
    # 16 / 28 / 37 asked with the context against 17 / 29 / 37, asked after 8 / 8 / 11 as before. Floors
    # 0.3 and 0.7 give the same attention errors; 0.75 and 0.9 NLL within a standard error of 0.5, and 0.9
    # answers 15 / 29 / 33 of those needles asked with the context (mostly eviction: its floor is above most
    # layers' 5% epsilon).
    min_similarity: float | None = 0.5
    # What a merged slot counts for (its log w: the attention bias alpha * log w, and its weight when it is
    # merged again in a later chunk): "members", the |S| tokens it merged (ZSMerge's count, METHODS.md 2.6),
    # or "attention", its members' accumulated attention in units of its pivot's, n_p * sum_t A_t / A_p
    # (`attention_counts`; between 1 and |S|): a slot whose key is nearly its pivot's then draws from the
    # prompt's queries about what its members drew. See "A merged slot's count" in the module doc.
    merged_count: str = "members"
    # The count of a document stored for questions asked later (`for_stored_document`); None: `merged_count`,
    # as is a value_scale="set_size" KVMerger's (its values are scaled by |S|). Not the paper's. See "A merged
    # slot's count" in the module doc.
    stored_merged_count: str | None = "attention"
    # With Compactor's rank (a stored document's heavy hitters), each token's rank adds this weight times the
    # z-scored surprisal it is lent, as ZSMerge's `stored_surprisal` (see there; 0: off). The surprisal needs the
    # whole document, so the merging layers hold it until end_prefill and merge there, each into its budget as
    # before. Measured: tools/RESULTS.md, "Session 41".
    stored_surprisal: float = 1.0
    # How the surprisal is lent (`compactor.SURPRISAL_LENDS`; see ZSMerge's `stored_surprisal_lend`, which adds
    # the run lend since session 46, not measured here): "max+mean" since session 44, "max" (the largest surprisal
    # alone) before. Measured (tools/RESULTS.md, "Session 44"; needles asked after compression, equal memory):
    # seeds 33-36 (96, the full cache 71) 40 / 55 / 63 at 5 / 10 / 20% kept against 30 / 50 / 61 with "max"; a
    # fresh seed (40, 24, the full cache 15) 9 / 15 / 17 against 7 / 9 / 13.
    stored_surprisal_lend: str = "max+mean"
    # How the layers share the budget (the average over the layers stays `budget`, so the cache's memory is the
    # same): "uniform" (paper), every layer keeps `budget`; "uncertainty", ZigZagKV's allocation as ZSMerge's
    # `layer_budgets` makes it (`layer_uncertainty`, `budgets.zigzag_budgets`): each layer's need is the fewest
    # keys, taken as the average layer would keep them (its recent window, then the heavy hitters' rank), that
    # keep the attention output of the prompt's last 32 queries within a tenth of the full one; the merging
    # layers split L x budget slots in proportion to it, none below a fifth of the budget. The allocation needs
    # every layer's need, so the whole prompt is held until the end of prefill, where each layer merges it
    # into its own budget (a one-shot prefill peaks above the full cache's memory, as ZigZagKV's does); a
    # prompt fed in chunks (`for_chunked_prefill`) and a document stored for later questions
    # (`for_stored_document`: its last queries are its own, not a question's; ZSMerge measured no gain there)
    # keep "uniform", as does `budget=None` (the data sizes each layer) and the paper's setting; rank="compactor"
    # (blended by the fraction a layer drops) needs "uniform". Measured (tools/RESULTS.md, "Session 35";
    # SmolLM2-135M, 16 windows each, equal memory, paired against "uniform" at 5 / 10 / 20% kept): continuation
    # NLL -0.022 +- 0.008 / -0.008 +- 0.005 / -0.013 +- 0.007 (seed 24), -0.011 +- 0.009 / -0.014 +- 0.006 /
    # -0.012 +- 0.006 (seed 27).
    layer_budgets: str = "uncertainty"

    def __post_init__(self) -> None:
        if self.budget is not None:
            check_budget(self.budget, "KVMerger")
        if not _is_number(self.threshold) or math.isnan(self.threshold):
            raise KvzooError(f"KVMerger: threshold (epsilon) must be a number, got {self.threshold!r}")
        if not _is_number(self.sigma) or not self.sigma > 0:
            raise KvzooError(f"KVMerger: sigma must be a number > 0 (inf allowed), got {self.sigma!r}")
        for name in ("recent_ratio", "heavy_ratio"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= 1:
                raise KvzooError(f"KVMerger: {name} must be in [0, 1], got {value!r}")
        if not isinstance(self.skip_layers, (tuple, list, set, frozenset)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.skip_layers
        ):
            raise KvzooError(f"KVMerger: skip_layers must be a tuple of layer indices, got {self.skip_layers!r}")
        self.skip_layers = tuple(self.skip_layers)
        for name, choices in (("ratio_of", RATIOS_OF), ("value_scale", VALUE_SCALES), ("merged_count", MERGED_COUNTS)):
            check_choice(self, "KVMerger", name, choices)
        check_choice(self, "KVMerger", "stored_merged_count", MERGED_COUNTS, optional=True)
        if self.value_scale == "set_size" and self.merged_count != "members":
            raise KvzooError("KVMerger: value_scale='set_size' scales a merged value by its set size, which a "
                             "later chunk undoes by the slot's count: it needs merged_count='members'")
        if not _is_number(self.alpha) or not math.isfinite(self.alpha):
            raise KvzooError(f"KVMerger: alpha must be a finite number, got {self.alpha!r}")
        check_choice(self, "KVMerger", "rank", RANKS)
        if self.min_similarity is not None and (not _is_number(self.min_similarity)
                                                or not -1 <= self.min_similarity <= 1):
            raise KvzooError(f"KVMerger: min_similarity must be None or a cosine similarity in [-1, 1], "
                             f"got {self.min_similarity!r}")
        check_choice(self, "KVMerger", "layer_budgets", LAYER_BUDGETS)
        if self.layer_budgets != "uniform" and self.budget is not None and self.rank == "compactor":
            raise KvzooError("KVMerger: rank='compactor' blends Compactor's score by the fraction of the prompt a "
                             "layer drops, which layer_budgets='uncertainty' decides only after it; use "
                             "layer_budgets='uniform' with it")
        check_counts(self, "KVMerger", ("recent_tokens", "stored_recent"), least=0, optional=True)
        check_surprisal_settings(self, "KVMerger")
        if not _is_number(self.stored_verbatim) or not self.recent_ratio <= self.stored_verbatim <= 1:
            raise KvzooError(f"KVMerger: stored_verbatim must be a share of the budget in [recent_ratio "
                             f"({self.recent_ratio!r}), 1], got {self.stored_verbatim!r}")
        check_counts(self, "KVMerger", ("window_size", "kernel_size"))
        check_pooling(self, "KVMerger")
        self.check_decode_cap()

    @classmethod
    def paper(cls, **overrides: object) -> "KVMerger":
        """The paper's settings: merged values scaled by the set size, no attention bias, recent and heavy
        shares of the prompt, layers 0, 1 and L-1 uncompressed, heavy hitters by A_t alone."""
        paper = {"value_scale": "set_size", "alpha": 0.0, "recent_ratio": 0.17, "heavy_ratio": 0.12,
                 "ratio_of": "prompt", "skip_layers": (0, 1, -1), "rank": "accumulated", "pool_ahead": None,
                 "stored_recent": None, "min_similarity": None, "stored_merged_count": None,
                 "layer_budgets": "uniform", "stored_surprisal": 0.0}
        return cls(**{**paper, **overrides})  # type: ignore[arg-type]

    def for_stored_document(self, chunked: bool = False) -> "KVMerger":
        """This KVMerger with merged slots counted by `stored_merged_count`, and heavy hitters by Compactor's
        score, a recent window of `stored_recent` tokens and `stored_verbatim` of the budget kept verbatim (not for
        a document fed in chunks: Compactor's score is of one chunk); itself where neither applies."""
        keeps_count = self.stored_merged_count is None or self.value_scale == "set_size"
        stored = self if keeps_count else replace(self, merged_count=self.stored_merged_count)
        stored = stored.for_chunked_prefill()  # uniform layers (`layer_budgets`)
        if self.stored_recent is None or chunked:
            return stored
        return replace(stored, rank="compactor", recent_tokens=self.stored_recent,
                       heavy_ratio=round(self.stored_verbatim - self.recent_ratio, 9))  # 1.0 - 0.34 is 0.6599..

    def for_chunked_prefill(self) -> "KVMerger":
        """This KVMerger with uniform layer budgets (`layer_budgets`) when it would hold the whole prompt for
        them: a prompt fed in chunks keeps its memory flat."""
        return replace(self, layer_budgets="uniform") if self._holds_prompt else self

    @property
    def _holds_prompt(self) -> bool:
        """Whether every merging layer keeps the whole prompt until end_prefill merges it (`layer_budgets`, the
        prompt's surprisal; without a budget the data sizes each layer)."""
        return (self.layer_budgets != "uniform" or self.reads_prompt_surprisal) and self.budget is not None

    @property
    def reads_prompt_surprisal(self) -> bool:  # type: ignore[override]
        """Compactor's rank with `stored_surprisal` (and a budget): end_prefill adds the prompt's surprisal."""
        return self.rank == "compactor" and self.stored_surprisal > 0 and self.budget is not None

    @property
    def supports_chunked_prefill(self) -> bool:  # type: ignore[override]
        # Compactor's score is standardised over one chunk; merged slots keep A_t, which it cannot rank against.
        return self.rank != "compactor"

    @property
    def attention_alpha(self) -> float:
        return float(self.alpha)

    def skipped(self, num_layers: int) -> set[int]:
        """The layers left uncompressed, as indices in [0, num_layers)."""
        bad = [i for i in self.skip_layers if not -num_layers <= i < num_layers]
        if bad:
            raise KvzooError(
                f"KVMerger: skip_layers {bad} out of range for a model with {num_layers} layers "
                f"(use indices in [{-num_layers}, {num_layers}))"
            )
        return {i % num_layers for i in self.skip_layers}

    def _average_budgets(self, prompt_lens: list[int]) -> list[int]:
        """Each sequence's budget in a merging layer (their average with `layer_budgets="uncertainty"`); without
        a budget, the whole prompt."""
        budget = self.budget
        return list(prompt_lens) if budget is None else [resolve_budget(budget, n, cap_at_prompt=True)
                                                         for n in prompt_lens]

    def _average_budget_tensor(self, prompt_len: torch.Tensor) -> torch.Tensor:
        """`_average_budgets` of prompt_len [B], on its device."""
        return torch.tensor(self._average_budgets(prompt_len.tolist()), device=prompt_len.device)

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        if self._holds_prompt:  # the whole prompt, until end_prefill
            return [list(prompt_lens)] * cfg.num_layers
        return self.compressed_budgets(cfg, prompt_lens)

    def compressed_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        # layer_budgets="uncertainty" shares L times the average between the merging layers (the same slots)
        skipped = self.skipped(cfg.num_layers)
        average = self._average_budgets(prompt_lens)
        return [list(prompt_lens) if layer in skipped else average for layer in range(cfg.num_layers)]

    def make_cache(self, cfg: "ModelConfig", prompt_lens: list[int], max_new_tokens: int, dtype: torch.dtype,
                   device: torch.device | str, compressed: bool = False) -> KVCache:
        cache = super().make_cache(cfg, prompt_lens, max_new_tokens, dtype, device, compressed)
        skipped = self.skipped(cfg.num_layers)
        for layer_idx, slots in enumerate(cache.layers):  # compress_prefill does not know L
            # [B], one per sequence like every other per-sequence state (a 0-dim entry would keep the layers'
            # decode updates from being batched: `KVCache.stacked_groups`)
            slots.state["merges"] = torch.full((len(prompt_lens),), layer_idx not in skipped, device=device)
        return cache

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        prompt_len = slots.state["prompt_len"]
        budget = slots.state["prefill_budget"]  # [B] (a held prompt's: the whole prompt, merged at end_prefill)
        average = self._average_budget_tensor(prompt_len) if self._holds_prompt else budget
        if not bool(slots.state["merges"].all()) or (self.budget is not None and bool((average >= prompt_len).all())):
            # Nothing to merge, ever: keep every candidate in position order (room: the whole store).
            keep_every_candidate(slots, chunk)
            return
        score = chunk.key_score + accumulated_scores(chunk)  # [B, Hkv, S]
        heavy_rank = self._heavy_rank(slots, chunk, score, average)
        if self._holds_prompt:
            self._hold(slots, chunk, score, heavy_rank, average)
            return
        self._merge(slots, chunk, score, heavy_rank, budget)

    def _verbatim(self, budget: torch.Tensor, prompt_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(recent, heavy) [B]: how many of each sequence's tokens the recent window and the heavy hitters keep
        verbatim in a layer of `budget` [B] slots (shares of the budget, default, or of the prompt, paper;
        without a budget, of the prompt)."""
        base = budget if self.ratio_of == "budget" and self.budget is not None else prompt_len
        recent = (base * self.recent_ratio).long()
        heavy = (base * self.heavy_ratio).long()
        if self.recent_tokens is not None:  # the same verbatim share, split otherwise
            verbatim = recent + heavy
            recent = (budget // 2).clamp(max=self.recent_tokens).minimum(verbatim)
            heavy = verbatim - recent
        if self.budget is not None:
            recent = recent.minimum(budget - 1)
        return recent, heavy

    def _merge(self, slots: LayerSlots, candidates: "PrefillChunk", score: torch.Tensor, heavy_rank: torch.Tensor,
               budget: torch.Tensor) -> None:
        """Merge the candidates (a prompt chunk's, or a held prompt's slots) into `budget` [B] entries per head
        and store them in `slots`: `score` [B, Hkv, S] their A_t (pivots, eviction, the slots' scores),
        `heavy_rank` [B, Hkv, S] what picks the heavy hitters."""
        recent, heavy = self._verbatim(budget, slots.state["prompt_len"])
        heavy = heavy[:, None]
        # Candidates in position order, empty ones (padding, unused slots) last.
        order = _position_order(candidates)
        keys, values = (x.gather(2, order[..., None].expand_as(x)) for x in (candidates.keys, candidates.values))
        pos, logw, score, heavy_rank, recent_m = (x.gather(-1, order) for x in (
            candidates.key_pos, candidates.key_logw, score, heavy_rank, recent_mask(candidates, recent)))
        valid = torch.isfinite(logw)
        # Compactor's rank is max-pooled over a span that lends a token's score to the LEAD_IN tokens before it: of
        # a span's equal ranks the newer are the peak and the lead-in nearest it (the window's rank lends forward)
        newer_first = self.rank == "compactor"
        if self.budget is None:
            protected = protected_tokens(heavy_rank, recent_m, heavy, valid=valid, newer_first=newer_first)
            sets = merging_sets(keys, protected, self.threshold, valid)
        else:
            protected = protected_tokens(heavy_rank, recent_m, heavy, budget[:, None], valid, newer_first)
            sets = budget_merging_sets(keys, protected, budget[:, None], valid, self.min_similarity)
            if self.min_similarity is not None:  # too few links left to merge down to the budget: evict
                sets, valid = evict_lowest_sets(sets, protected, score, budget[:, None], valid)
        counts = logw.exp()  # what each candidate stands for (1 for a token; a merged slot's count)
        counts = torch.where(valid, counts.round() if self.merged_count == "members" else counts, 1.0)
        pivots = set_pivots(score, sets)
        weights = gaussian_merge_weights(keys, sets, pivots, self.sigma, counts)
        k_star, v_star = merge_sets(keys, values, sets, weights, counts, self.value_scale)
        slot_counts = per_set(counts, sets)  # [B, Hkv, S] by set number: |S| (members)
        if self.merged_count == "attention":
            slot_counts = attention_counts(score, counts, sets, pivots, slot_counts)
        self._store(slots, sets, valid, k_star, v_star, slot_counts, score, pos.gather(-1, pivots))

    def _hold(self, slots: LayerSlots, chunk: "PrefillChunk", score: torch.Tensor, heavy_rank: torch.Tensor,
              average: torch.Tensor) -> None:
        """layer_budgets="uncertainty" or the prompt's surprisal: keep the whole prompt in position order, each
        slot with its A_t (`score` [B, Hkv, S]) and its heavy-hitter rank (state["held_rank"]), and (uncertainty)
        record the layer's need (state["uncertainty"] [B]) in a layer of the `average` budget [B] for
        `end_prefill`, which allocates and merges."""
        # A second chunk of the same prompt (a later prompt is appended by take_prefill_chunk, never here).
        if chunk.slots_before:
            raise KvzooError("KVMerger(layer_budgets='uncertainty') allocates from every layer's attention over the "
                             "whole prompt, so it cannot take a prompt fed in chunks; use layer_budgets='uniform'")
        if self.layer_budgets != "uniform":  # (not with Compactor's rank, so not with the surprisal)
            recent, _ = self._verbatim(average, slots.state["prompt_len"])
            # The keys as the average layer would keep them: its recent window, then the heavy hitters' rank.
            slots.state["uncertainty"] = layer_uncertainty.output_uncertainty(
                chunk, heavy_rank, recent, layer_uncertainty.WINDOW, layer_uncertainty.TAU)
        keep_top(slots, chunk, -chunk.key_pos.float(), slots.budget, stored_score=score)  # position order
        held = heavy_rank.gather(-1, _position_order(chunk))[..., :slots.capacity]  # in slot order
        slots.state["held_rank"] = F.pad(held, (0, slots.capacity - held.shape[-1]))

    def _heavy_rank(self, slots: LayerSlots, chunk: "PrefillChunk", accumulated: torch.Tensor,
                    kept: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, S] what ranks the heavy hitters (`rank`), from the candidates' A_t [B, Hkv, S] and the slots
        each sequence keeps, kept [B] (the average layer's; Compactor's blend reads it). With the prompt's
        surprisal, Compactor's unpooled score (end_prefill adds the surprisal and pools)."""
        if self.rank == "accumulated":
            return accumulated
        if self.reads_prompt_surprisal:
            return unpooled_compactor(chunk, kept, slots.state["prompt_len"])
        if self.rank == "compactor":  # budget=None: nothing is known to be dropped, so the leverage weight is 0
            return sinks_then_compactor(chunk, kept, slots.state["prompt_len"])
        window = window_scores(chunk, self.window_size, kernel=self.kernel_size, pooling=self.pooling,
                               ahead=self.pool_ahead)
        return attention_shares(accumulated, window, torch.isfinite(chunk.key_logw))

    @staticmethod
    def _store(slots: LayerSlots, sets: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               slot_counts: torch.Tensor, score: torch.Tensor, pivot_pos: torch.Tensor) -> None:
        """Write the sets (in order) to the first slots, each with its count (`slot_counts`, by set number);
        sets of empty candidates stay empty."""
        filled = per_set(valid.long(), sets, "amax").bool()
        n = min(slots.capacity, sets.shape[-1])  # sets of valid candidates <= budget <= capacity
        filled = filled[..., :n]
        slots.replace_all(
            torch.where(filled[..., None], k[..., :n, :], 0.0).to(slots.k.dtype),
            torch.where(filled[..., None], v[..., :n, :], 0.0).to(slots.v.dtype),
            torch.where(filled, slot_counts[..., :n].log(), NEG_INF),
            torch.where(filled, per_set(score, sets)[..., :n], 0.0),
            torch.where(filled, per_set(pivot_pos, sets, "amax")[..., :n], -1),
        )

    def end_prefill(self, cache: KVCache) -> None:
        if any("held_rank" in slots.state for slots in cache.layers):
            self._merge_held(cache)
            return
        if self.budget is not None:
            return  # every layer already holds exactly its budget
        first = cache.layers[0].state
        if not bool((first["prefill_budget"] == first["prompt_len"]).all()):  # one host read
            return  # sized already (the budget is what was kept): a later prompt was appended in its room
        # Fixed epsilon: the data decided each head's size; shrink every store to its largest head.
        for layer_idx, slots in enumerate(cache.layers):
            keep = slots.filled.sum(-1).max(-1).values  # [B]
            cache.layers[layer_idx] = shrink_slots(slots, -slots.pos.float(), keep)

    def _merge_held(self, cache: KVCache) -> None:
        """layer_budgets="uncertainty": allocate each merging layer's budget from the layers' needs, then merge its
        held prompt into a store of that size (stores of equal capacity share one allocation), and copy each skipped
        layer into a store of its own, so that nothing is left holding the prompt's allocation."""
        merging = [i for i, slots in enumerate(cache.layers) if "held_rank" in slots.state]
        first = cache.layers[merging[0]]
        prompt_lens = first.state["prompt_len"]
        average = self._average_budgets(prompt_lens.tolist())
        if self.layer_budgets == "uniform":  # held for the surprisal alone: every merging layer its budget
            per_sequence = [[n] * len(merging) for n in average]
        else:  # a sequence whose prompt fits the budget (average = prompt) keeps it whole in every layer
            need = torch.stack([cache.layers[i].state.pop("uncertainty") for i in merging])  # [L', B]
            per_sequence = layer_uncertainty.shares_by_need(need, average, prompt_lens.tolist())
        budgets = [torch.tensor(layer, device=prompt_lens.device) for layer in zip(*per_sequence)]  # [L'] of [B]
        headroom = first.budget - first.state["prefill_budget"]  # [B] decode room, the same in every layer
        _, hkv, _, d = first.k.shape
        stacks, stores = allocate_stores([b + headroom for b in budgets], [int((b + headroom).max()) for b in budgets],
                                         hkv, d, first.k.dtype, first.k.device)
        for layer_idx, new, budget in zip(merging, stores, budgets):
            old = cache.layers[layer_idx]
            held_rank = old.state.pop("held_rank")
            if self.reads_prompt_surprisal:  # Compactor's unpooled score, with the surprisal
                held_rank = held_rank_with_surprisal(held_rank, old, cache.prompt_surprisal, self.stored_surprisal,
                                                     self.stored_surprisal_lend)
            new.state = {**old.state, "prefill_budget": budget}
            self._merge(new, slot_candidates(old), old.score, held_rank, budget)
            cache.layers[layer_idx] = new
        # the stacks number the merging layers from 0: give them the cache's layer ids
        cache.stacks = [replace(stack, layer_ids=tuple(merging[i] for i in stack.layer_ids)) for stack in stacks]
        for layer_idx, slots in enumerate(cache.layers):  # skipped: the whole prompt, out of the shared allocation
            if layer_idx not in merging:
                cache.layers[layer_idx] = shrink_slots(slots, -slots.pos.float(), slots.state["prefill_budget"])


def _position_order(candidates: "PrefillChunk") -> torch.Tensor:
    """[B, Hkv, S] candidate indices in position order, empty candidates (padding, unused slots) last."""
    valid = torch.isfinite(candidates.key_logw)
    return torch.where(valid, candidates.key_pos, torch.iinfo(torch.int64).max).argsort(-1)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
