"""ZSMerge (Liu, Wang, Liu, Tang, "ZSMerge: Zero-Shot KV Cache Compression for Memory-Efficient Long-Context
LLMs", arXiv 2503.10714; v1 "ZeroMerge"). Specification: METHODS.md section 1.

Per (layer, sequence, KV head) the B slots are split into three regions, at fixed slot numbers:

    [ residual R: B_r slots | context C: B - B_p - B_r slots | proximity ring P: B_p slots ]

- P holds the B_p most recent tokens exactly; the token at position p sits in slot ring_start + p mod B_p,
  so the slot a new token takes always holds the oldest proximity token (no pointer state).
- C holds older tokens with the highest decayed contribution score s <- decay * s + attention.
- R slots are running count-weighted means of every token pushed out of C; a slot standing for w tokens
  gets the attention bias alpha * log w (Eq. 8), exact for identical keys when alpha = 1.

Ambiguities (METHODS.md 1.6) resolved as recommended:
- A2 prefill scoring: `rank="window"` = observation window of the last `window_size` queries with decay and
  max-pool (latest code); `rank="accumulated"` = decayed sum over every prompt query, no pooling (paper
  Eq. 5). Further ranks blend the window with the accumulated attention (`rank`, below).
- A3: the ring holds exactly B_p tokens (paper), not B_p - 1 (code).
- A4: the token leaving the ring competes with C: the lowest-scored of C ∪ {leaving} is merged (paper).
- A5: a residual slot's score is the max of its members' (`score_update="max"`; "sum" available).
- A6: GQA scores are the mean over a KV head's query heads.
- A8/A9: residual slots exist from the start, empty (log w = -inf); the first merges into an empty residual
  slot are exact copies, so nothing is lost until more than B tokens have been seen; padding never enters.
- A10: alpha. The paper's alpha = 1 (`ZSMerge.paper()`) is the only value for which merging identical keys
  is lossless (Theorem 1). The default is alpha = 0.5, measured better (see below): a residual slot stands
  for hundreds of unrelated tokens at small budgets; its count bias gives it roughly their attention mass
  (by Jensen, n exp(q.mean(k)) never exceeds the members' sum of exp(q.k)), but its value is the plain mean
  of their values, a blur of what attention would have read. alpha interpolates between merging (1) and
  evicting (0): alpha < 1 lends part of that mass back to the exact slots.
Defaults: budget 0.2 of the prompt (code) on average over the layers, shared by need (`layer_budgets`; paper:
every layer the same), B_p = 0.5 B (paper's recommendation), B_r = 0.02 (B - B_p) (paper; at least 1), rank
"attention_shares" (paper "window"), decay 1.0 (paper 0.98), window 8, max-pool 9 over a token and the 8 before
it (paper 5, centred), dot-product slot choice (Eq. 6), alpha 0.5 (paper 1), no leverage term; the accumulated
share is of each token's attention per query at least the ring's size after it, except in the copy heads
(`accumulated`); a kept slot stores its accumulated attention, the standing it was ranked by kept beside it for
later prompt chunks (`decode_score`) and for the first decode steps, where it lapses with a half-life of 2 steps
(`standing_half_life`). A document stored for later questions (`for_stored_document`, not in the paper) keeps a
ring of at most 32 tokens and ranks the rest of its context by Compactor's query-agnostic score (`stored_ring`)
plus the surprisal of the text each token follows (`stored_surprisal`), its window max-pooled over 7 positions
(`stored_kernel_size`); the question, a later prompt, then gives up the stored tokens its reads rank lowest
(`context_rank`).

Measured effect of the defaults that differ from the paper (tools/RESULTS.md; SmolLM2-135M, 16 2048-token
contexts, 128 teacher-forced tokens, equal memory, paired differences; needle: 12 development or 24 held-out
instances):
- rank "shares" with decay 1.0 instead of the window's decayed scores (sessions 9-10): each context token is
  kept for the largest of three shares, of the attention of every prompt query, of the pooled window's and of
  the keys' leverage (see `rank`). Continuation NLL level with the window on three sets (development -0.002 +-
  0.014 / -0.010 +- 0.013 at 5 / 20% kept; held out, seed 4: +0.005 +- 0.012 / +0.001 +- 0.011 / -0.006 +-
  0.011 at 5 / 10 / 20%; seed 3, means: 0.006 / 0.003 / 0.010 lower); more query-aware needles at 5-10%
  kept (development 6 / 6 / 7 of 12 against 3 / 5 / 4; held out 17 / 42 / 54% against 8 / 33 / 46% and
  17 / 42 / 42% against 12 / 33 / 46%); needles asked after compression unchanged. H2O still leads NLL by
  0.01-0.04.
- rank "attention_shares" instead of "shares" (session 25): a prompt's context no longer keeps tokens for their
  key leverage alone. That share was what retrieved query-aware needles until the pooling reached the tokens
  after a read one (`pool_ahead=0`, session 20); since then the window's share keeps the answer, and a
  document stored for later questions is ranked by Compactor's score, which holds the leverage (`stored_ring`).
  Seeds 12, 13, 14 (72 needles asked with the context): 44 / 48 / 50 at 5 / 10 / 20% kept against 44 / 48 / 51
  (full cache 50); continuation NLL 0.009 / 0.004 / 0.007 lower (seed 12) and 0.009 / 0.007 / 0.011 (seed 10),
  H2O's lead down to 0.006 / 0.014 / 0.013 on seed 12 and 0.001 / 0.006 / 0.005 over 26 windows of seeds 10,
  12 and 15, within a standard error (see `rank`).
- decode_score "accumulated" (session 13): a token kept for its window or leverage share is evicted in decode
  when the attention it gets falls below the token leaving the ring's: NLL 0.015 +- 0.005 lower at 5% kept
  (held out; 0.006 / 0.002 at 10 / 20%), the same needles; see `decode_score`.
- standing_half_life 2 (session 27; 0 before): a token kept for the window's share was the first a decode
  step gave up, since its accumulated attention is small, so a question asked with its document lost the
  answer's later digits while the first were written ("1800." for 18792). Its standing now lapses, halving
  every 2 decode steps. Seeds 12, 13, 14 and 16 (96 needles asked with the context): 54 / 68 / 69 at 5 / 10 /
  20% kept against 55 / 67 / 67 (the full cache 68; at 20% every needle the full cache answers, on each
  seed; half-lives 2 and 8 answer the same instances); continuation NLL level (seed 15: -0.002 +- 0.002 /
  -0.001 +- 0.001 / +0.000 +- 0.000; seed 12: -0.001 +- 0.002 / +0.001 +- 0.001 / +0.000 +- 0.000; half-life
  8: +0.003 / +0.001 / +0.002 on seed 12); a stored document's needles unchanged (its rank stores no standing).
- accumulated "distant_rate_outside_copy_heads" (session 31; "sum" before): the accumulated share ranks a token
  by the attention per query from at least the ring's size away, as every decode query reads the context,
  instead of the sum over every query, which favours early tokens for how many queries have seen them (the
  copy heads keep the sum). Continuation NLL on four sets (seeds 18 and 19, the Rust reference, the
  Rustonomicon): -0.007 / -0.015 / -0.020 / -0.011 at 5% kept (1.8 to 3.7 standard errors), -0.001 to -0.008 at
  10%, +0.000 to -0.010 at 20%; needles (seeds 19-22, 96 per layout): asked with the context 49 / 65 / 71
  against 50 / 66 / 71 at 5 / 10 / 20% kept (the full cache 71; at 20% one the full cache answers lost, one it
  misses answered), asked after compression the same 15 / 20 / 34. One-shot prefill +17-23% (one attention band
  per layer).
- alpha 0.5 instead of 1 lowers the continuation NLL increase by 0.019 +- 0.009 at 5% kept, 0.007 +- 0.005
  at 10%, 0.001 +- 0.002 at 20% (alpha = 0 measures the same) and leaves needle retrieval unchanged; on 16
  held-out instances (seed 2) it is neutral: 0.007 +- 0.008 better at 5%, 0.004 +- 0.003 worse at 20%.
  With today's other defaults (tools/RESULTS.md, "Session 37" and "Session 38"): the continuation NLL of
  alpha = 1 is 0.002-0.003 lower (seed 24), it answers 3 more of 168 needles asked with the context at 20% kept
  (seeds 24-28 and 31-32, the gain on the seeds where it was found) and on fresh seeds 33-34 one fewer at 5% and
  at 10% (48, level at 20%); asked after compression it loses (seed 29: 5 / 5 / 11 against 6 / 11 / 13).
- max-pool 7 instead of 5 (what PyramidKV and ZigZagKV use with the same 8-query window), over the token and the 6
  before it instead of centred (`pool_ahead=0`, session 20), so a token the window reads lends its score to the 6
  after it. A question's queries read the phrase of the document that matches them ("the passkey for the white
  door is"; the model's induction heads read each matched token's successor), and the answer is what follows that
  phrase. Max-pool 7, centred: query-aware needle 25% -> 42% at 10% kept, 25% -> 33% at 20%; NLL neutral (-0.007
  +- 0.003 at 5%, +0.003 +- 0.004 at 20%). Centred, it kept 3 tokens past the peak and lost the rest: answers came
  back a digit short ("5261." for 52616; six of the nine query-aware needles lost at 20% kept on seeds 5 and 6
  that the full cache retrieves, of which it answers seven now). Over the token and the 6 before it: query-aware
  needles 47 / 58 / 65 of 96 at 5 / 10 / 20% kept against 22 / 38 / 48 (four seeds; the full cache 66), on the
  Rust book 28 / 32 / 32 of 48 against 14 / 21 / 22 (full 34); asked after compression 11 / 16 / 18 against 11 /
  16 / 14 (book 5 / 8 / 9 against 6 / 7 / 8); continuation NLL unchanged (-0.001 +- 0.004 / +0.000 +- 0.002 /
  +0.000 +- 0.001, 23 windows; 31 of the Rust book: -0.009 +- 0.004 / -0.004 +- 0.003 / -0.002 +- 0.001); `make
  demo` 5 of 6 facts at 50% and 80% as before. One position after the token (`pool_ahead=1`, for a question that
  reads the end of a fact's sentence): 23 / 27 / 33 of 48 against 28 / 29 / 33 on seeds 5 and 6.
- max-pool 9 instead of 7 (session 35), over the token and the 8 before it: a read token lends its score to the 8
  after it, the whole of a 5-digit answer after the phrase's last words (with 7 the last digit was the first
  thing a tight budget dropped: " 8205." for 82052, " 20545" for 20542, where ZigZagKV, keeping no ring, had
  room for it). Seeds 24-28 (120 needles asked with the context, the full cache 86, equal memory, session 36):
  78 / 86 / 85 at 5 / 10 / 20% kept against 72 / 80 / 85 (ZigZagKV 63 / 83 / 86); continuation NLL -0.005 +-
  0.006 / +0.002 +- 0.002 / +0.002 +- 0.001 (seed 24) and -0.005 +- 0.006 / +0.004 +- 0.002 / +0.002 +- 0.001
  (seed 27), still the lowest of every method. A stored document keeps 7 (`stored_kernel_size`; 9 answers the
  same needles asked after compression there).
- layer_budgets "uncertainty" instead of every layer keeping the budget (session 32, the default since session
  33): the layers share it by need, as ZigZagKV allocates. Continuation NLL 0.002-0.073 lower on six sets at
  every budget (see the field), for an eager decode step 4-9% slower (compiled: level) and the whole prompt
  held during a one-shot prefill; a prompt fed in chunks and a stored document keep uniform layers.
- Not adopted: a quarter of the budget as ring (proximity 0.25) doubles the context and retrieves more
  (58% at 20%) but costs 0.056 +- 0.026 NLL at 5%; the leverage term (`leverage`, below) retrieves far more
  and costs more NLL still (see its comment).
Budget rule (`budgets.resolve_budget`): B is at least the smallest layout with one context slot (4 slots
with the defaults: proximity 2, residual 1, context 1); the layout is constant-size even for a shorter
prompt, whose tokens fill it until decoding pushes them out and merging starts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.budgets import (Budget, budget_tokens, check_budget, check_choice, check_counts, check_pooling,
                                 level_budgets, part_tokens)
from kvzoo.cache.compactor import (SINKS, check_surprisal_settings, held_rank_with_surprisal, sinks_then_compactor,
                                   unpooled_compactor)
from kvzoo.cache.copy_heads import COPY_HEAD_THRESHOLD, induction_scores
from kvzoo.cache import layer_uncertainty
from kvzoo.cache.residual_merge import SCORE_UPDATES, merge_groups, merge_scores, residual_groups, scatter_slots
from kvzoo.cache.scoring import (accumulated_scores, attention_rate, attention_shares, block_attention,
                                 distant_attention_rate, leverage_scores, on_the_scale_of, own_key_leverage,
                                 window_scores)
from kvzoo.cache.selection import (cross_layer_rank, rank_order, recent_mask, slot_candidates, top_mask,
                                   widest_shares)
from kvzoo.cache.slots import NEG_INF, KVCache, LayerSlots, allocate_stores
from kvzoo.errors import KvzooError
from kvzoo_kernels.zsmerge_update import zsmerge_update

if TYPE_CHECKING:
    from kvzoo.cache.chunk import PrefillChunk
    from kvzoo.config import ModelConfig
    from kvzoo.models.base import CausalLM

MIN_PROXIMITY = 2  # as the reference code: max(2, tail)
MIN_RESIDUAL = 1
RANKS = ("window", "accumulated", "blend", "split", "attention_shares", "shares", "block_shares")  # see ZSMerge.rank
WINDOW_RANKS = ("window", "accumulated")  # the paper's: one attention signal, no blend (context_rank, tie)
SHARE_RANKS = ("attention_shares", "shares", "block_shares")  # rank by the largest share (see ZSMerge.decode_score)
CROSS_LAYER_HEADS = ("all", "copy")  # see ZSMerge.cross_layer_heads
NOT_ATTENTION_ONLY = ("split", "shares", "block_shares")  # ranks cross_layer cannot take (leverage or a split)
DECODE_SCORES = ("accumulated", "standing")
LAYER_BUDGETS = ("uniform", "uncertainty")  # see ZSMerge.layer_budgets
# layer_budgets="uncertainty" evens the layers' budgets out into this many runs by need, so that an eager decode
# step updates a handful of stacked stores, not every layer alone (`budgets.level_budgets`)
LAYER_LEVELS = 4
ACCUMULATED = ("sum", "rate", "rate_outside_copy_heads", "distant_rate", "distant_rate_outside_copy_heads")
KEEP_SUM_IN_COPY_HEADS = ("rate_outside_copy_heads", "distant_rate_outside_copy_heads")  # see ZSMerge.accumulated


@dataclass(frozen=True)
class ZSMergeLayout:
    """Per-sequence region sizes (slots per KV head)."""

    budget: int
    proximity: int
    residual: int

    @property
    def context(self) -> int:
        return self.budget - self.proximity - self.residual


@dataclass
class ZSMerge(CompressionMethod):
    """Zero-shot KV merging with head-level granularity and compensated (alpha * log w) attention."""

    decode_step_rowwise = True

    budget: Budget = 0.2
    proximity: Budget = 0.5  # B_p: fraction of the budget (float) or slots (int); at least 2
    proximity_cap: int | None = None  # the ring holds at most this many tokens (None: no cap); see stored_ring
    residual: Budget = 0.02  # B_r: fraction of B - B_p (float) or slots (int); at least 1
    alpha: float = 0.5  # paper: 1.0 (see A10 above)
    decay: float = 1.0  # paper: 0.98
    window_size: int = 8  # the window's queries (every rank but "accumulated")
    kernel_size: int = 9  # paper: 5 (see "Measured effect" above)
    pooling: str = "max"
    # How many of the kernel_size positions a token's pooled window score reads follow it (the rest precede
    # it; None: centred, the paper's). A token the window reads lends its score to the kernel_size - 1 -
    # pool_ahead tokens after it, where a question's answer is (see "Measured effect" above).
    pool_ahead: int | None = 0
    metric: str = "dot"  # residual slot choice: "dot" (Eq. 6) or "l2"
    score_update: str = "max"
    # "window": a prefill score is the decayed attention sum over the window's queries (paper); "steady": the
    # same estimate of the token's attention rate put on the scale decode scores converge to (divided by
    # 1 - decay^queries), so prefill-chosen context slots and tokens leaving the ring compete fairly.
    prefill_scale: str = "window"
    # Weight of the leverage (scoring.leverage_scores) of the keys or values in the choice of prefill context
    # tokens: the context is ranked by zscore(attention score) + leverage * zscore(leverage), and a kept token
    # stores that standing on the attention scale (so decode steps do not evict it first; with a share rank
    # and decode_score="accumulated" the standing is kept beside the score, see `decode_score`). 0 = attention
    # alone (paper). A retrieval setting, not a default: "proximity=0.25,leverage=0.5,leverage_of=values"
    # retrieves a needle asked *after* compression at 20% kept in 50% of 12 development instances (17%
    # without) but in 25% of 24 held-out ones (17% without), and the tokens it keeps for being unique
    # displace ones the continuation attends to: +0.15 NLL at 5%, +0.075 at 20% (tools/RESULTS.md).
    leverage: float = 0.0
    leverage_of: str = "keys"  # or "values"
    # What ranks the prompt's context tokens (`RANKS`; paper: "window"). Every rank but "accumulated" reads the
    # pooled window of the last `window_size` queries; those with "accumulated attention" add the attention of
    # every prompt query (H2O's signal; undecayed with decay=1.0). Measured on held-out texts at equal memory
    # (tools/RESULTS.md, sessions 5-9; 16 NLL / 24 needle instances per set):
    # - "window": the stored decayed window sum (paper's latest code, A2).
    # - "accumulated": the decayed sum over every prompt query, no pooling (paper Eq. 5).
    # - "blend": zscore(accumulated) + window_weight * zscore(pooled window), stored on the accumulated scale.
    #   With decay=1.0: 0.000 / -0.014 / -0.027 NLL against "window" at 5 / 10 / 20% kept; query-aware needle
    #   12 / 42 / 46% against "window"'s 17 / 50 / 62%. On development instances NLL falls steadily with the
    #   window_weight (1 / 0.5 / 0.25 / 0: +0.222 / +0.210 / +0.205 / +0.185 at 5%).
    # - "split": 1 - window_share of the context slots to the highest accumulated attention, the share to the
    #   tokens the pooled window reads most among the rest; stored scores are the blend. window_share=0.25,
    #   decay=1.0 is the continuation setting: level with H2O (+0.004 / 0.000 / +0.009 NLL), 0.03-0.04 below
    #   "window", but query-aware needle 8 / 17 / 38%.
    # - "attention_shares": each token's larger share of attention, max(accumulated / its sum, pooled window /
    #   its sum) over the candidates: kept when either every prompt query or the last ones give it a large part
    #   of their attention. Both are distributions over the same tokens, so no weight is needed, and a head
    #   whose window attention is diffuse spends few slots on it while one that reads a single passage (a
    #   question's answer) keeps it; its standing is the share times the accumulated mass (`decode_score`).
    #   With decay=1.0 on two held-out sets: NLL -0.023 / -0.024 / -0.034 and -0.013 / -0.019 / -0.037 against
    #   "window" (H2O: -0.044 / -0.035 / -0.047 and -0.036 / -0.029 / -0.048); needle 8 / 29 / 38% and
    #   8 / 29 / 46% against "window"'s 8 / 33 / 46% and 17 / 50 / 62%.
    # - "shares": "attention_shares" with a third share, each token's leverage among the pre-RoPE keys of its
    #   prompt chunk over the chunk's sum of leverages (scoring.own_key_leverage, Compactor's query-agnostic
    #   signal): a token no combination of the others reproduces (a number, a name) is kept although no query
    #   has read it yet (only a basis of the keys, `leverage_tokens`, since session 19). Keys kept from
    #   earlier chunks compete by their standings (share 0 here). With decay=1.0, against "window":
    #   development NLL -0.002 +- 0.014 / -0.010 +- 0.013 at 5 / 20% (paired), needle 6 / 6 / 7 of 12 (3 / 5 / 4);
    #   held out NLL +0.233 / +0.174 / +0.123 at 5 / 10 / 20% against
    #   +0.239 / +0.177 / +0.133, needle 17 / 42 / 54% against 8 / 33 / 46% and 17 / 42 / 42% against
    #   12 / 33 / 46% on a second set. Session 18 (seeds 5, 6; 23 distinct texts, 48 needles): the leverage
    #   share is the whole NLL gap to H2O (attention_shares: -0.002 / -0.001 / +0.004 against H2O, the default
    #   +0.003 / +0.010 / +0.015) and what retrieves (query-aware needles 11 / 20 / 28 against attention_shares'
    #   6 / 11 / 16; `make demo`'s stored document: 5 of 6 facts at 50% kept against 1 of 6). The default until
    #   session 25; since `pool_ahead=0` (session 20) "attention_shares" retrieves the same query-aware needles
    #   (44 / 48 / 50 of 72 at 5 / 10 / 20% kept against 44 / 48 / 51, seeds 12-14) at a lower NLL, and a stored
    #   document gets Compactor's rank (`stored_ring`), so the leverage share is no longer needed for either.
    # - "block_shares": "shares" with a fourth share, the attention each token receives from every query of its
    #   256-position block, before and after it, times its value norm (Compactor's query-agnostic attention,
    #   scoring.block_attention, average-pooled over 3 positions), over the chunk's sum: what the text
    #   around a token reads from it. Not the default: on two held-out sets it lowers the continuation NLL
    #   (-0.007 +- 0.005 / -0.009 +- 0.003 / -0.006 +- 0.002 and -0.007 +- 0.006 / -0.012 +- 0.004 / -0.004 +-
    #   0.004 at 5 / 10 / 20% kept) but retrieves fewer query-aware needles (5 / 6 / 12 of 24 against
    #   6 / 11 / 13) and no more asked after compression (4 of 24 at 20%; Compactor 11; tools/RESULTS.md,
    #   "Session 15").
    rank: str = "attention_shares"  # paper: "window"
    # What a kept slot's score is with a share rank: the number every decode step adds the slot's attention to,
    # and by which the lowest of context ∪ {token leaving the ring} is merged.
    # - "accumulated" (default): the token's attention summed over every query so far (H2O's statistic). The
    #   standing it was ranked by (largest share x mass) is kept beside it, as standing - score in
    #   state["standing_bonus"] with the position it belongs to in state["standing_pos"] (8 bytes a slot), so
    #   that a later chunk of the prompt ranks the slots exactly as "standing" does; a decode step that moves a
    #   token lets its bonus lapse. Tokens kept for the window's or the leverage's share then compete in decode
    #   on the attention they actually get while the text goes on, once their standing has lapsed
    #   (`standing_half_life`). Every chunk of a later prompt (positions at
    #   or past where the last prefill ended: a question to a stored document, a conversation's next turn)
    #   stores the earlier slots' standing instead (`_stored_scores`): it may ask about a fact kept for its
    #   leverage, which the answer reads only when it writes it.
    # - "standing" (sessions 9-12): every slot stores its standing, so such a token outranks, at every decode
    #   step, tokens the continuation reads, and is never given up.
    # Measured (tools/RESULTS.md, "Session 13"; equal memory, paired): "accumulated" lowers the continuation NLL
    # increase by 0.015 +- 0.005 / 0.006 +- 0.004 / 0.002 +- 0.003 at 5 / 10 / 20% kept on 16 held-out
    # contexts (development: 0.018 +- 0.006 / 0.002 +- 0.003 at 5 / 20%), with the same 48 held-out needles.
    # Without the later-prompt rule `make demo` (six questions to a stored document) lost one answer at 50%
    # (4/6) and a short chat over a document lost the name asked for; with it both answer as "standing" does.
    decode_score: str = "accumulated"
    # With decode_score="accumulated": the half-life, in decode steps, of the standing bonus of a context slot
    # still holding the token it was ranked for. A decode step evicts the lowest of context ∪ {token leaving
    # the ring} by score + bonus * 2^(-t / standing_half_life), t the decode steps since the prompt ended, so
    # a token kept for the window's share is not the first given up while the answer the window asked for is
    # written, and competes on the attention it gets once the text has moved on. 0: the bonus plays no part in
    # decode (the accumulated attention alone). On a 2048-token text a context slot's bonus is a few to a
    # hundred times a typical slot's accumulated attention (median 3-9 against 1.3-1.4, the top tenth 30-145,
    # at 20 and 5% kept), so with 2 it holds its slot for about 5-15 decode steps, a short answer's length;
    # 8 answers the same needles and costs 0.002 nats of continuation NLL at 10-20% kept ("Measured effect").
    standing_half_life: float = 2.0
    # With a share rank (other ranks do not read it): what the accumulated share is a share of.
    # - "sum" (the default until session 31): each token's attention summed over every prompt query (H2O's
    #   statistic), which favours a token for the number of queries that have seen it: at equal attention per
    #   query the first tokens of a 2048-token prompt outscore those 1000 positions later twofold, though every
    #   continuation query sees both.
    # - "rate": that sum over the queries that could see the token (`scoring.attention_rate`; kvpress' observed
    #   attention). Standings stay on the sum's scale (a later chunk divides an older slot's standing by the
    #   queries that have seen it). Session 30, against "sum" (continuation NLL, 16 windows, equal memory, at
    #   5 / 10 / 20% kept): seed 19 -0.017 +- 0.007 / -0.008 +- 0.005 / -0.002 +- 0.003, the Rust reference
    #   -0.007 / -0.012 / -0.012, the nightly Rustonomicon -0.011 / -0.010 / -0.003, but seed 18 +0.004 / +0.004 /
    #   +0.012, all of it one window whose continuation copies a table from 1,700 tokens back (+0.18 / +0.12 /
    #   +0.18 there): the sum kept what the prompt's own earlier copy read.
    # - "distant_rate" (session 31): the attention per query at least the ring's size (B_p) after the token
    #   (`scoring.distant_attention_rate`). Every decode query reads a context token from at least that far,
    #   past the ring; its nearest queries read it for local reasons (the next words lean on the last ones),
    #   and the plain rate divides that local part by the few queries that have seen a recent token, so it
    #   favours the tokens just outside the ring.
    # - "..._outside_copy_heads": as the rate or the distant rate, except in the copy heads
    #   (`copy_heads.induction_scores` above COPY_HEAD_THRESHOLD), which keep the sum: they read whichever
    #   earlier passage the text is repeating, so how much the earlier repeats read a token is what tells
    #   them what a copy will need (seed 18's copy window: +0.05 / +0.01 / +0.02 with the rate outside them).
    # Measured against "sum" (tools/RESULTS.md, "Sessions 30-31"; paired, 16 windows each at 5 / 10 / 20%):
    # "rate_outside_copy_heads" seed 18 -0.005 / -0.003 / +0.002, seed 19 -0.012 / -0.007 / -0.001, the Rust
    # reference -0.008 / -0.006 / -0.010, the nightly Rustonomicon -0.009 / -0.007 / -0.001, and one query-aware
    # needle fewer at 10 and at 20% on seed 19. "distant_rate_outside_copy_heads" (the default) seed 18 -0.007
    # +- 0.004 / -0.001 +- 0.004 / +0.000 +- 0.002, seed 19 -0.015 +- 0.004 / -0.006 +- 0.004 / -0.001 +- 0.002,
    # the Rust reference -0.020 +- 0.007 / -0.007 +- 0.005 / -0.010 +- 0.005, the nightly Rustonomicon -0.011 +-
    # 0.003 / -0.008 +- 0.003 / -0.003 +- 0.003; needles (seeds 19-22, 96 per layout): asked with the context
    # 49 / 65 / 71 against 50 / 66 / 71 (the full cache 71), asked after compression 15 / 20 / 34 for both.
    accumulated: str = "distant_rate_outside_copy_heads"
    window_weight: float = 1.0  # "blend" and "split": the pooled window's weight in the blended score
    window_share: float = 0.25  # "split": the share of the context slots picked by the pooled window
    # Rank each layer's context candidates by the larger of their share of that head's stored score and the
    # largest share any head of any layer gives them (see ZigZagKV.cross_layer): a token a late retrieval
    # head reads is kept in every layer, since an answer copied from the context is read through all of
    # them. Every layer keeps the whole prompt until the end of prefill (the peak memory of the full cache,
    # and no chunked prefill), then each layer is compressed as usual with that rank. Not the default: 9 of
    # 12 development needles at 20% kept (default 4, full cache 8), NLL +0.025 +- 0.009 at 5% and level at
    # 20% (equal memory), but on 24 held-out needles 12 / 29 / 46% at 5 / 10 / 20% kept, as the default's
    # 8 / 33 / 46% (tools/RESULTS.md, "Session 7"). With today's share ranks it fails: the largest share any of the
    # 90 heads gives a token is won by what some head reads nearly alone (the first tokens among them), so the heads
    # keep the same tokens and lose what their own reads need (seed 33 instance 2 at 10% kept: the three heads of
    # layer 18 hold the same 37 context tokens, none of the code's digits); 7 / 5 / 13 of 24 needles at 5 / 10 / 20%
    # kept against the default's 19 / 19 / 19 (seed 33, the full cache 19; tools/RESULTS.md, "Session 38").
    cross_layer: bool = False
    # Which heads' shares the cross-layer rank takes the largest of: "all" (every head of every layer) or "copy"
    # (the copy heads alone, `copy_heads.induction_scores` above COPY_HEAD_THRESHOLD: the heads a question's
    # answer is read through), so every layer keeps what the question reads through them and its own reads
    # otherwise. Not the default: asked with the context (seeds 31-34, 96 needles, the full cache 67, equal
    # memory) 64 / 63 / 63 at 5 / 10 / 20% kept against the default's 59 / 67 / 64. It answers seed 31's
    # repeated-digit code (` 92999.`, lost by the default at 5-30%), but every layer then holds every door's code
    # the copy heads read, and multikey needles get another door's code (seed 33: 17 / 18 / 18 against 19 / 19 /
    # 19; seed 32 at 10% kept writes ` 22122.` for 82308). tools/RESULTS.md, "Session 39".
    cross_layer_heads: str = "all"
    # Every layer keeps, beside its own context, the `copy_reads` prompt tokens the copy heads' window reads most
    # (`copy_heads.induction_scores` above COPY_HEAD_THRESHOLD; each read lent to the kernel_size - 1 tokens
    # after it, as the pooled window lends it; the first `compactor.SINKS` tokens and those every layer's ring
    # keeps anyway left out): the answer a question points the copy heads at, which the layers below them drop
    # at small budgets although a copy of it needs them (`tools/needle_trace.py`: seed 35 instance 4 at 5% kept
    # holds ` 46642` in the reading heads and in none of layers 1-14, and writes ` 4662.`). It needs the whole
    # prompt at the end of prefill (as layer_budgets="uncertainty"); a prompt fed in chunks and a document stored
    # for later questions (no question yet) keep 0. 0: off (the default). Measured (tools/RESULTS.md, "Session
    # 39"; copy_reads=9, asked with the context, seeds 31-36, 144 needles, the full cache 102, equal memory): 93 /
    # 102 / 99 at 5 / 10 / 20% kept, as the default's 93 / 104 / 99, continuation NLL +0.002 +- 0.002 / +0.001 +-
    # 0.001 / +0.001 +- 0.001 (seed 24, 16 windows): it answers the codes written short (seed 35 instances 4, 9
    # and 16 at 5%, seed 31 instance 10 at every budget), and loses multikey needles the default answers (seed 35
    # instance 15 at 10 and 20%, seed 32 instance 17 at 10%), where the copy heads' window reads more than the
    # asked door's code.
    copy_reads: int = 0
    # What picks the context tokens at prefill: "score" (the stored attention scores above) or "compactor"
    # (scoring.compactor_scores: non-causal block attention times value norm plus the leverage of the pre-RoPE
    # keys, blended by the dropped fraction of the prompt, the first `compactor.SINKS` tokens first; as the
    # Compactor baseline). The stored scores, and so every decode-time choice, stay the attention scores.
    # Compactor's scores are standardised over one chunk and the slots keep attention scores, so the two
    # cannot rank each other: generation with `prefill_chunk` is refused (`supports_chunked_prefill`), and a
    # later prompt (a question to a stored document, a conversation's next turn) ranks by the attention scores:
    # the slots' stored scores plus what its own queries read (session 37; before, its old slots competed by
    # their stored scores against its tokens' Compactor scores, and a code a question was about to copy lost
    # its last digits to the question's tokens).
    context_rank: str = "score"
    # With rank="shares": how many of a prompt chunk's tokens per KV head may be kept for their leverage share
    # (those with the highest leverage; the share itself is unchanged). "basis" (default): one more than the
    # chunk's leverages sum to, i.e. the effective dimension of its centred keys under the ridge (about 61-64
    # of the default model's 64 per head on 2048-token texts) plus the mean's direction that centring removed:
    # enough tokens to span every direction the keys take, and no more. A chunk of at most head_dim + 1
    # tokens (a short document, a question) keeps every token's share: its centred keys sum to n - 1, and
    # without the + 1 the cut would drop one near-arbitrary token per head (it changed a chat's answer).
    # "all" (sessions 9-18): every token, which at 5 / 10 / 20% kept let the leverage share win 27 / 35 / 48% of
    # the 113 / 163 / 264 context slots (two texts; 27 / 33 / 44% are not what attention alone keeps), most of
    # them keys only slightly above the average leverage, displacing tokens the continuation reads. An integer:
    # that many. Measured (tools/RESULTS.md, "Session 19"; seeds 5 and 6, 23 windows at equal memory, 48 needles):
    # "basis" against "all": NLL -0.000 +- 0.000 / -0.004 +- 0.002 / -0.009 +- 0.003 at 5 / 10 / 20% kept
    # (31 windows of a second genre, the Rust book, without the + 1: -0.001 +- 0.001 / -0.002 +- 0.002 /
    # -0.008 +- 0.003), query-aware needles 11 / 20 / 25 against 11 / 20 / 28, asked-after 5 / 8 / 7 against
    # 5 / 8 / 8 (four seeds, without the + 1: 22 / 38 / 48 against 22 / 38 / 52 of 96, 11 / 16 / 14 against
    # 11 / 16 / 16), and `make demo`'s stored document 5 of 6 facts at 50% and 80% as before. 16 tokens: NLL
    # -0.006 / -0.007 / -0.010, but the demo keeps 1 of 6 facts at 50% (3 at 80%): the basis is what a stored
    # document's facts need. "all" stays the setting for retrieval at 20% kept and more.
    leverage_tokens: int | str = "basis"
    # Copy heads (kvzoo.cache.copy_heads): the KV heads whose induction score (a data-free probe, once per
    # model) exceeds this threshold are where a question later copies its answer from, and they read nothing in
    # particular while a document is read. At a fresh prompt's prefill each of them keeps only `copy_recent` of
    # its ring's tokens and gives the ring's other slots to its context (the same memory; decode overwrites those
    # slots first and the token there competes with the context, as a token leaving the ring does), ranked in
    # two steps: the window_size x kernel_size tokens the pooled window reads most (what a question compressed
    # with the prompt reads), then Compactor's query-agnostic score (scoring.compactor_scores). A later chunk
    # of a prompt ranks a copy head's larger context by the usual rank. None (default): no copy heads. A setting
    # for documents whose questions come after compression, not the default (tools/RESULTS.md, "Session 21";
    # SmolLM2-135M, whose five heads above 0.3 are the ones every needle's answer is read through): at 20% kept
    # the answer stays whole in 16 of 72 (needle, reading head) pairs after prefill against 1 (Compactor 18),
    # needles asked after compression 14 of 48 against 9 (seeds 5 and 6; 5 / 8 at 5 / 10% as the default), asked
    # with the context 27 / 28 / 34 against 28 / 29 / 33, for +0.011 +- 0.007 / +0.016 +- 0.008 / +0.015 +- 0.008
    # continuation NLL at 5 / 10 / 20% kept (seed 5, 16 windows, equal memory). The gain did not replicate on a
    # fresh seed (session 22, seed 10: 3 / 3 / 3 of 24 asked after compression, as the default, for +0.015 /
    # +0.015 / +0.007 NLL), so it stays off.
    copy_heads: float | None = None
    copy_recent: int = 16
    # A document stored for questions asked later (`prefill_cache`, `model.prefill`, the eval's needles asked
    # after compression; `for_stored_document`) is not continued, so nothing reads its newest tokens more than
    # the rest except the question, which goes on from its last sentence. Its ring holds at most `stored_ring`
    # tokens (`proximity_cap`; 32 is SnapKV's observation window, what a question continues from) and the rest of
    # the budget is context ranked by Compactor's query-agnostic score (`context_rank="compactor"`, with
    # `rank="window"` for the slots' stored scores), when `copy_heads` is None, the context rank is "score" and
    # there is no `leverage` term or cross-layer rank. None, and a document fed in chunks (`prefill_chunk`,
    # which Compactor's rank cannot take): the rule below (`stored_copy_heads`).
    # Measured (tools/RESULTS.md, "Session 24"; needles asked after compression, seeds 12 and 13, 48 needles,
    # the full cache 33): 9 / 11 / 15 at 5 / 10 / 20% kept, against the copy heads' 7 / 9 / 9, SnapKV's and
    # StreamingLLM's 8 / 8 / 8, KVMerger's 8 / 7 / 10, Compactor's 2 / 7 / 16 and a ring of a tenth of the
    # budget's 4 / 10 / 17; a ring of 64 tokens 8 / 9 / 12. Since session 36 the rank keeps spans (each token's
    # score max-pooled over the 5 around it, `compactor.SPAN`): on fresh seeds 29-30 (48 needles asked after
    # compression, the full cache 38, equal memory) 10 / 17 / 23 at 5 / 10 / 20% kept against 8 / 12 / 17. Since
    # session 40 a token lends its score to the 6 before it and the 2 after it (`compactor.LEAD_IN`: the phrase a
    # question finds it through): on seeds 33-36 (96 needles asked after compression, the full cache 71, equal
    # memory) 25 / 41 / 56 at 5 / 10 / 20% kept against 26 / 35 / 51 with the centred 5.
    stored_ring: int | None = 32
    # A stored document's window scores (its own last queries', the standing its slots keep for a later question's
    # reads to add to) are max-pooled over this many positions (None: `kernel_size`): the pooling of 7 a prompt had
    # before session 35, with which the chunked path (copy heads) was measured. At equal memory 9 answers exactly
    # the needles 7 answers (tools/RESULTS.md, "Session 36"; seeds 24-28, 120 asked after compression: 21 / 26 / 44
    # at 5 / 10 / 20% kept for both); session 35's 20 / 25 / 41 for 9 were at a smaller memory (`--memory budget`).
    stored_kernel_size: int | None = 7
    # A stored document (Compactor's rank, `stored_ring`) also keeps what the model could not predict: each
    # token's rank adds this weight times the z-scored surprisal -log p(token | the text before it) that it is
    # lent (the largest of its own and the 8 tokens' before it, `compactor.SURPRISE_LEND`), before the span's
    # max-pooling (`compactor.sinks_then_compactor_and_surprisal`). A later question asks about what the
    # document says, not what any text would: a name, a label, a number, and the words right after them. Every
    # score of the document's own attention ranked a multi-key needle's code (one of four labelled codes, each
    # once) between 200th and 950th of 1004 tokens in the heads the answer is read through (tools/RESULTS.md,
    # "Session 41"): nothing in it reads the code more than other text. The surprisal of its label (" red") is
    # among the document's highest. 1.0: as much weight as the attention term (0: off, the rank before session
    # 41; not tuned, one setting run). Measured (needles asked after compression, seeds 33-36, 96, the full cache
    # 71, equal memory): 42 / 57 / 65 at 5 / 10 / 20% kept against 25 / 41 / 56 (passkeys 33 / 43 / 47 of 48
    # against 17 / 31 / 41, the full cache 43; multi-key needles 9 / 14 / 18 against 8 / 10 / 15, the full
    # cache 28); a fresh seed (37) 10 / 12 / 15 of 24 against 5 / 8 / 11 (the full cache 19); the Rustonomicon
    # (seeds 3-4) 19 / 25 / 26 of 48 against 13 / 20 / 22 (the full cache 29); `make demo` 5 / 5 / 5 / 4 / 1 of 6 at
    # 80 / 50 / 30 / 20 / 10% against 4 / 4 / 4 / 4 / 1.
    # Costs: the document is held whole until end_prefill (as a one-shot prompt with `layer_budgets` is),
    # and the model's output head runs over every document position (SmolLM2-135M's head is 28M of the 135M
    # multiply-adds a token costs; a 7B model's, a few percent): an 8192-token document at 10% kept peaked at
    # 1948 MiB RSS against 1527 and took 98 s against 81 (one run each, beside two evals).
    stored_surprisal: float = 1.0
    # How a token is lent the surprisal before it (`compactor.SURPRISAL_LENDS`): "max+mean+run", the largest
    # surprisal among itself and the 8 tokens before it, their mean, and the least surprisal of the most surprising
    # run of 4 tokens through it, each z-scored and added; "max+mean" without the run (sessions 43-45), "max" the
    # largest alone (session 41's). The max lends a surprising word (a label) to what follows it; the mean ranks a
    # phrase surprising throughout (a fact stated for the first time) above a lone odd word of ordinary prose; the
    # run ranks a fact's value (a code, a number: no token of it can be guessed, though each is only as surprising
    # as a prose word) by itself, so a fact stated in the same form as an earlier one (a second "The passkey for
    # the red door is ...", whose repeated words lend little) keeps its value too. The z-scores are added, not
    # z-scored again: where all are high the surprisal weighs up to three times the attention term. Measured
    # (tools/RESULTS.md, "Session 46"; needles asked after compression, equal memory, 5 / 10 / 20% kept): seeds
    # 33-36 and 39-44 (240, the full cache 174) 140 / 160 / 177 against "max+mean"'s 141 / 157 / 170; the
    # Rustonomicon (seeds 3-4, 48, the full cache 29) 25 / 28 / 28 against 23 / 27 / 27; the Rust embedded book
    # (seeds 1-2, 48, the full cache 31) 25 / 28 / 32 against 27 / 28 / 32. `make demo`'s document
    # (six facts in repetitive filler): 5 / 5 / 5 / 1 / 0 of 6 at 80 / 50 / 30 / 20 / 10% kept against 5 / 5 / 5 /
    # 2 / 1 (the heavier lend overrules more of Compactor's per-head choice where every fact is the most
    # surprising text).
    stored_surprisal_lend: str = "max+mean+run"
    # With `stored_ring` None or a chunked document: the copy-head threshold for a stored document (session
    # 22's rule), when `copy_heads` is None and the context is not already ranked by Compactor's score; None: as
    # `copy_heads`. Its questions read the document through the copy heads. Measured (tools/RESULTS.md,
    # "Session 22"): `make demo`'s stored document at 80 / 50 / 30 / 20 / 10% kept answers 5 / 4 / 4 / 4 / 1
    # of 6 questions against 5 / 5 / 3 / 0 / 0 without (a 2000-token document at 50 / 20 / 10%: 5 / 5 / 2
    # against 5 / 3 / 1; the full cache 5); needles asked after compression 17 of 72 at 20% kept against 12
    # on seeds 5, 6 and 10 (5% and 10%: as without).
    stored_copy_heads: float | None = COPY_HEAD_THRESHOLD
    # How the layers share the budget (the average over layers stays `budget`, so the cache's memory is the
    # same). "uniform" (paper): every layer keeps `budget`. "uncertainty": ZigZagKV's allocation
    # (`layer_uncertainty`, `budgets.zigzag_budgets`): each layer's need is the fewest keys, taken as ZSMerge keeps
    # them (the ring, then the context by its rank), that keep the attention output of the prompt's last 32
    # queries within a tenth of the full one; the layers split L x budget slots in proportion to it, none
    # below a fifth of the budget (nor the smallest layout), evened out into `LAYER_LEVELS` runs of layers by
    # need (`budgets.level_budgets`), each layer with its own ring, context and residual regions. Layers of one
    # size share an allocation, so an eager decode step runs about five updates, not one per layer. The
    # allocation needs every layer's need, so the whole prompt is held until the end of prefill (a one-shot
    # prefill peaks above the full cache's memory, as ZigZagKV's does); a prompt fed in chunks
    # (`prefill_chunk`), whose memory has to stay flat, keeps "uniform" (`for_chunked_prefill`), and so does a
    # document stored for later questions
    # (`for_stored_document`): its layers' needs, read from the document's own last queries, say nothing of a
    # question to come (measured, session 33: needles asked after compression 4 / 5 / 8 of 24 at 5 / 10 / 20%
    # kept against 4 / 5 / 10 uniform, seed 25).
    # Measured (tools/RESULTS.md, "Session 32"; continuation NLL, 16 windows each, equal memory, paired against
    # "uniform" at 5 / 10 / 20% kept): seed 19 -0.006 +- 0.005 / -0.002 +- 0.004 / -0.004 +- 0.002, seed 23
    # -0.017 +- 0.006 / -0.023 +- 0.012 / -0.020 +- 0.010, the Rust reference -0.073 +- 0.026 / -0.058 +- 0.024 /
    # -0.019 +- 0.010, the nightly Rustonomicon -0.022 +- 0.008 / -0.020 +- 0.005 / -0.010 +- 0.005; a fixed
    # profile of the layers' needs (measured once on other text) gained about a quarter of that. Eager decode
    # 35.6 -> 38.8 ms/token at 2048 tokens, 34.7 -> 36.6 at 8192 (5% kept, `kvzoo bench`); prefill peak RSS
    # +95 / +440 MiB for SmolLM2-135M. Session 33 (fresh seed 24): -0.016 +- 0.006 / -0.019 +- 0.008 / -0.012 +-
    # 0.007; needles asked with the context 11 / 13 / 14 of 24 against 13 / 14 / 14 (the full cache 14);
    # one-shot prefill of 8192 tokens peaks at 2076 MiB RSS against 1684 (the full cache 1950). Decode
    # interleaved with transformers on a quiet machine (session 34, `tools/bench_interleaved.py`): eager 37.4 /
    # 38.0 / 40.3 ms/token against 35.8 / 34.9 / 38.0 at 512 / 2048 / 8192 tokens (five update calls a step, not
    # one), compiled 34.3 / 34.0 / 33.7 against 30.7 / 31.9 / 32.8 (within that run's noise: one compiled graph
    # serves both). The default since session 33 (tools/RESULTS.md, "Session 33"); copy_heads and rank="split"
    # decide within each layer's layout as the prompt is read, so they take "uniform".
    layer_budgets: str = "uncertainty"

    def __post_init__(self) -> None:
        check_budget(self.budget, "ZSMerge")
        for name in ("proximity", "residual"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                isinstance(value, float) and value >= 1
            ):
                raise KvzooError(f"ZSMerge: {name} must be a fraction in [0, 1) or a slot count >= 0, got {value!r}")
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise KvzooError(f"ZSMerge: alpha must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.decay, (int, float)) or not 0 < self.decay <= 1:
            raise KvzooError(f"ZSMerge: decay must be in (0, 1], got {self.decay!r}")
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 1:
            raise KvzooError(f"ZSMerge: window_size must be an integer >= 1, got {self.window_size!r} (the score "
                             "over every prompt query, no window, is rank='accumulated')")
        check_pooling(self, "ZSMerge")
        if self.metric not in ("dot", "l2"):
            raise KvzooError(f"ZSMerge: metric must be 'dot' or 'l2', got {self.metric!r}")
        check_choice(self, "ZSMerge", "score_update", SCORE_UPDATES)
        for name in ("leverage", "window_weight", "standing_half_life"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise KvzooError(f"ZSMerge: {name} must be a number >= 0, got {value!r}")
        if self.leverage_tokens not in ("basis", "all") and (
            isinstance(self.leverage_tokens, bool) or not isinstance(self.leverage_tokens, int)
            or self.leverage_tokens < 0
        ):
            raise KvzooError(f"ZSMerge: leverage_tokens must be 'basis', 'all' or a token count >= 0, got "
                             f"{self.leverage_tokens!r}")
        check_choice(self, "ZSMerge", "rank", RANKS)
        if isinstance(self.window_share, bool) or not isinstance(self.window_share, (int, float)) or not (
            0 <= self.window_share <= 1
        ):
            raise KvzooError(f"ZSMerge: window_share must be a fraction in [0, 1], got {self.window_share!r}")
        if not isinstance(self.cross_layer, bool):
            raise KvzooError(f"ZSMerge: cross_layer must be True or False, got {self.cross_layer!r}")
        if self.cross_layer and (self.leverage or self.rank in NOT_ATTENTION_ONLY):
            raise KvzooError(f"ZSMerge: cross_layer ranks by attention shares alone, so it takes neither leverage "
                             f"nor rank='split', 'shares' or 'block_shares' (got leverage={self.leverage!r}, "
                             f"rank={self.rank!r})")
        if isinstance(self.copy_reads, bool) or not isinstance(self.copy_reads, int) or self.copy_reads < 0:
            raise KvzooError(f"ZSMerge: copy_reads must be an integer >= 0, got {self.copy_reads!r}")
        if self.copy_reads and (self.rank in ("accumulated", "split") or self.copy_heads is not None):
            raise KvzooError(f"ZSMerge: copy_reads takes the copy heads' window reads, which rank='accumulated' does "
                             f"not keep, and ranks the rest by the standing, which rank='split' does not, and "
                             f"copy_heads decides otherwise (got rank={self.rank!r}, "
                             f"copy_heads={self.copy_heads!r})")
        check_choice(self, "ZSMerge", "cross_layer_heads", CROSS_LAYER_HEADS)
        check_choice(self, "ZSMerge", "context_rank", ("score", "compactor"))
        if self.context_rank == "compactor" and (self.leverage or self.cross_layer or self.rank not in WINDOW_RANKS):
            raise KvzooError(f"ZSMerge: context_rank='compactor' ranks the context by Compactor's score alone, so it "
                             f"takes neither leverage nor cross_layer, and its stored scores are rank='window' or "
                             f"'accumulated' (got rank={self.rank!r})")
        if self.leverage_of not in ("keys", "values"):
            raise KvzooError(f"ZSMerge: leverage_of must be 'keys' or 'values', got {self.leverage_of!r}")
        check_choice(self, "ZSMerge", "accumulated", ACCUMULATED)
        check_choice(self, "ZSMerge", "layer_budgets", LAYER_BUDGETS)
        if self.layer_budgets != "uniform" and (self.copy_heads is not None or self.rank == "split"):
            raise KvzooError(f"ZSMerge: layer_budgets={self.layer_budgets!r} compresses each layer after the whole "
                             f"prompt is read, which copy_heads and rank='split' do not (got "
                             f"copy_heads={self.copy_heads!r}, rank={self.rank!r}); use layer_budgets='uniform' "
                             f"with them")
        check_choice(self, "ZSMerge", "decode_score", DECODE_SCORES)
        check_counts(self, "ZSMerge", ("proximity_cap", "stored_ring"), least=MIN_PROXIMITY, optional=True)
        check_counts(self, "ZSMerge", ("stored_kernel_size",), optional=True)
        if self.stored_kernel_size is not None and self.pool_ahead is not None and \
                self.pool_ahead >= self.stored_kernel_size:
            raise KvzooError(f"ZSMerge: pool_ahead must be below stored_kernel_size too (a stored document pools "
                             f"over {self.stored_kernel_size} positions), got pool_ahead={self.pool_ahead}; raise "
                             "stored_kernel_size or set it to None (the prompt's kernel_size)")
        for name in ("copy_heads", "stored_copy_heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value < 1):
                raise KvzooError(f"ZSMerge: {name} must be None or an induction-score threshold in [0, 1), got "
                                 f"{value!r}")
        if isinstance(self.copy_recent, bool) or not isinstance(self.copy_recent, int) or self.copy_recent < 0:
            raise KvzooError(f"ZSMerge: copy_recent must be an integer >= 0, got {self.copy_recent!r}")
        if self.copy_heads is not None and self.cross_layer:
            raise KvzooError("ZSMerge: copy_heads and cross_layer each decide what every layer keeps; choose one")
        if self.prefill_scale not in ("window", "steady"):
            raise KvzooError(f"ZSMerge: prefill_scale must be 'window' or 'steady', got {self.prefill_scale!r}")
        check_surprisal_settings(self, "ZSMerge")

    @classmethod
    def paper(cls, **overrides: object) -> "ZSMerge":
        """The settings of the paper and its reference code (section 1 of METHODS.md): proximity half the
        budget, 2% of the rest residual, alpha = 1, decay 0.98 over an 8-query window, max-pool 5 (centred), every
        layer the same budget, and no copy heads for a stored document."""
        paper = {"proximity": 0.5, "residual": 0.02, "alpha": 1.0, "decay": 0.98, "rank": "window",
                 "window_size": 8, "kernel_size": 5, "pooling": "max", "pool_ahead": None, "metric": "dot",
                 "score_update": "max", "stored_ring": None, "stored_copy_heads": None, "layer_budgets": "uniform",
                 "stored_kernel_size": None, "stored_surprisal": 0.0}
        return cls(**{**paper, **overrides})  # type: ignore[arg-type]

    @property
    def _splits_standing(self) -> bool:
        """Whether slots store the accumulated attention with the standing beside it (`decode_score`)."""
        return self.rank in SHARE_RANKS and self.decode_score == "accumulated"

    @property
    def _sum_in_copy_heads(self) -> bool:
        """Whether the copy heads' accumulated share stays the sum (`accumulated`, read by the share ranks)."""
        return self.rank in SHARE_RANKS and self.accumulated in KEEP_SUM_IN_COPY_HEADS

    @property
    def _reads_copy_heads(self) -> bool:
        """Whether end_prefill reads the copy heads: the cross-layer rank over them alone (`cross_layer_heads`),
        or their window's reads (`copy_reads`)."""
        return (self.cross_layer and self.cross_layer_heads == "copy") or self.copy_reads > 0

    @property
    def _marks_induction_heads(self) -> bool:
        """Whether the cache marks each layer's induction heads (state["induction_head"] [B, Hkv]: the KV heads
        whose `copy_heads.induction_scores` is above COPY_HEAD_THRESHOLD), for the accumulated sum
        (`_sum_in_copy_heads`) or end_prefill's reads (`_reads_copy_heads`): one mark serves both."""
        return self._sum_in_copy_heads or self._reads_copy_heads

    @property
    def decode_slot_state(self) -> tuple[str, ...]:  # type: ignore[override]
        """The standing a decode step lets lapse (`standing_half_life`), when it does."""
        return ("standing_bonus", "standing_pos") if self.standing_half_life and self._splits_standing else ()

    @property
    def attention_alpha(self) -> float:
        return float(self.alpha)

    def _split(self, budget: int) -> ZSMergeLayout:
        """The regions of `budget` slots (possibly without a context slot, i.e. invalid)."""
        proximity = max(MIN_PROXIMITY, part_tokens(self.proximity, budget))
        if self.proximity_cap is not None:
            proximity = min(proximity, self.proximity_cap)
        residual = max(MIN_RESIDUAL, part_tokens(self.residual, budget - proximity))
        return ZSMergeLayout(budget, proximity, residual)

    def layout(self, prompt_len: int) -> ZSMergeLayout:
        """The regions for one sequence: the budget rule with the smallest layout holding a context slot as
        minimum (a budget that resolves below it is raised to it)."""
        return self._fit(budget_tokens(self.budget, prompt_len))

    def _fit(self, budget: int) -> ZSMergeLayout:
        """The regions of `budget` slots, or of the fewest more that hold a context slot."""
        layout = self._split(budget)
        while layout.context < 1:  # the context grows ~ (1 - proximity)(1 - residual) per slot: terminates
            layout = self._split(layout.budget + 1)
        return layout

    def _average_budgets(self, prompt_lens: list[int]) -> list[int]:
        """Each sequence's layout budget: every layer's with uniform layer budgets, their average by need."""
        return [self.layout(n).budget for n in prompt_lens]

    @property
    def _holds_prompt(self) -> bool:
        """Whether every layer keeps the whole prompt until end_prefill compresses it (`cross_layer`,
        `layer_budgets`, `copy_reads`)."""
        return self.cross_layer or self.layer_budgets != "uniform" or self.copy_reads > 0 or self.reads_prompt_surprisal

    @property
    def reads_prompt_surprisal(self) -> bool:  # type: ignore[override]
        """Compactor's context rank with `stored_surprisal`: end_prefill adds the prompt's surprisal."""
        return self.stored_surprisal > 0 and self.context_rank == "compactor"

    def for_chunked_prefill(self) -> "ZSMerge":
        """This ZSMerge with uniform layer budgets (`layer_budgets`) and no `copy_reads` when it would hold the
        whole prompt for them: a prompt fed in chunks keeps its memory flat. Itself otherwise (a cross-layer rank
        refuses chunks: `supports_chunked_prefill`)."""
        if self.cross_layer or (self.layer_budgets == "uniform" and not self.copy_reads):
            return self
        return replace(self, layer_budgets="uniform", copy_reads=0)

    @property
    def supports_chunked_prefill(self) -> bool:  # type: ignore[override]
        # The cross-layer rank needs every layer's scores over the whole prompt; Compactor's rank standardises
        # over the chunk, which the kept slots' attention scores are not comparable with.
        return not self.cross_layer and self.context_rank != "compactor"

    def prefill_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        if self._holds_prompt:  # the whole prompt until end_prefill
            return [[max(n, self.layout(n).budget) for n in prompt_lens]] * cfg.num_layers
        return self.compressed_budgets(cfg, prompt_lens)

    def compressed_budgets(self, cfg: "ModelConfig", prompt_lens: list[int]) -> list[list[int]]:
        # layer_budgets="uncertainty" shares L times each sequence's layout between its layers (the same slots)
        return [self._average_budgets(prompt_lens)] * cfg.num_layers

    def make_cache(self, cfg: "ModelConfig", prompt_lens: list[int], max_new_tokens: int,
                   dtype: torch.dtype, device: torch.device | str, compressed: bool = False) -> KVCache:
        cache = super().make_cache(cfg, prompt_lens, max_new_tokens, dtype, device, compressed)
        # Every layer's regions are the average budget's, until end_prefill allocates (`layer_budgets`).
        regions = self._regions(self._average_budgets(prompt_lens), device)
        for slots in cache.layers:
            slots.state.update(regions)
            residual = regions["residual"]
            if self._splits_standing:  # allocated up front: the cache's memory is constant from the start
                slots.state["standing_bonus"] = torch.zeros_like(slots.score)  # [B, Hkv, C] (see `_compress`)
                slots.state["standing_pos"] = torch.full_like(slots.pos, -1, dtype=torch.int32)  # [B, Hkv, C]
                slots.state["standing_written"] = torch.zeros_like(residual)  # [B] position after that chunk
            if self._marks_induction_heads:  # filled from the model (before_prefill)
                slots.state["induction_head"] = torch.zeros(len(prompt_lens), cfg.num_kv_heads, dtype=torch.bool,
                                                            device=device)  # [B, Hkv]
            if self.copy_heads is not None:  # filled from the model before each prompt chunk (before_prefill)
                slots.state["copy_head"] = torch.zeros(len(prompt_lens), cfg.num_kv_heads, dtype=torch.bool,
                                                       device=device)  # [B, Hkv]
        return cache

    def _regions(self, budgets: list[int], device: torch.device | str) -> dict[str, torch.Tensor]:
        """The state that places the regions of layouts of `budgets` slots (one per sequence): "residual" [B]
        (slots 0 .. residual-1 are R) and "proximity" [B] (the ring is budget - proximity .. budget-1)."""
        layouts = [self._split(n) for n in budgets]
        return {"residual": torch.tensor([lay.residual for lay in layouts], device=device),
                "proximity": torch.tensor([lay.proximity for lay in layouts], device=device)}

    def for_stored_document(self, chunked: bool = False) -> "ZSMerge":
        """This ZSMerge with a ring of at most `stored_ring` tokens and its context ranked by Compactor's score
        and the document's surprisal (`stored_surprisal`), or else (also for a document fed in chunks, which
        Compactor's rank cannot take) with copy heads at `stored_copy_heads` and the leverage share (rank
        "shares" for "attention_shares"); either way with its window pooled over `stored_kernel_size` positions
        and uniform layers. Itself with copy
        heads or a cross-layer rank (which decide what every layer keeps themselves) or another context rank
        (already chosen). Never with `copy_reads`: a stored document has no question yet."""
        if self.copy_reads:  # no question yet to read
            return replace(self, copy_reads=0).for_stored_document(chunked)
        if self.copy_heads is not None or self.cross_layer or self.context_rank != "score":
            return self
        pooled = replace(self, kernel_size=self.stored_kernel_size) if self.stored_kernel_size is not None else self
        if self.stored_ring is not None and not self.leverage and not chunked:
            return replace(pooled, proximity_cap=self.stored_ring, context_rank="compactor", rank="window",
                           accumulated="sum", layer_budgets="uniform")
        if self.stored_copy_heads is not None:  # with the keys' leverage share, as measured (session 22): the
            # query-agnostic signal beside the copy heads, which a prompt to continue no longer needs (`rank`)
            rank = "shares" if self.rank == "attention_shares" else self.rank
            return replace(pooled, copy_heads=self.stored_copy_heads, rank=rank, layer_budgets="uniform")
        return self

    def before_prefill(self, model: "CausalLM", cache: KVCache) -> None:
        """Mark each layer's copy heads in the cache, from the model's induction scores: those whose ring lends
        its slots (`copy_heads`) and those ranked by the attention sum (`accumulated`)."""
        marks = [] if self.copy_heads is None else [("copy_head", self.copy_heads)]
        if self._marks_induction_heads:
            marks.append(("induction_head", COPY_HEAD_THRESHOLD))
        if not marks:
            return
        scores = induction_scores(model)  # [L, Hkv], computed once per model
        for slots, layer_scores in zip(cache.layers, scores):
            for key, threshold in marks:
                slots.state[key].copy_((layer_scores > threshold)[None].expand_as(slots.state[key]))

    # --- prefill --------------------------------------------------------------------------------------
    def _sum_heads(self, slots: LayerSlots) -> torch.Tensor | None:
        """[B, Hkv] bool the heads whose accumulated share stays the sum (`accumulated`), or None."""
        return slots.state["induction_head"] if self._sum_in_copy_heads else None

    def _scores(self, chunk: "PrefillChunk", bonus: torch.Tensor | None = None, sum_head: torch.Tensor | None = None,
                ring: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(standing, fresh, accumulated), each [B, Hkv, S]: the contribution scores that rank the context
        (older slots' scores decayed over the chunk, plus the chunk's part as `rank` says); the chunk's own
        windowed, pooled (or, rank="accumulated", accumulated) attention; the attention accumulated over every
        query (older slots' stored scores included) for the ranks that read it (else None). Except with
        rank="split" the context is ranked by the standing. `bonus` [B, Hkv, S]: what the share ranks add to
        an older slot's stored score to get its standing (`_standing_bonus`); `sum_head` [B, Hkv] bool: the heads
        whose accumulated share stays the sum (`KEEP_SUM_IN_COPY_HEADS`); `ring` [B]: each sequence's ring size,
        the horizon of accumulated="distant_rate"."""
        t = chunk.q.shape[2]
        older = chunk.key_score * self.decay**t  # [B, Hkv, S]: 0 for the chunk's own tokens
        if self.rank == "accumulated":
            fresh, queries = accumulated_scores(chunk, decay=self.decay), t
        else:
            fresh = window_scores(chunk, self.window_size, self.decay, self.kernel_size, self.pooling,
                                  self.pool_ahead)
            queries = min(self.window_size, t)
        if self.prefill_scale == "steady" and self.decay < 1:
            # sum_{a < queries} decay^a = (1 - decay^queries) / (1 - decay); decode's steady state: 1 / (1 - decay)
            fresh = fresh / (1.0 - self.decay**queries)
        if self.rank in WINDOW_RANKS:
            return older + fresh, fresh, None
        total = older + accumulated_scores(chunk, decay=self.decay)
        valid = torch.isfinite(chunk.key_logw)
        if self.rank in ("blend", "split"):
            return total + on_the_scale_of(total, fresh, valid, self.window_weight), fresh, total
        standing = total if bonus is None else total + bonus * self.decay**t
        mass = (standing * valid).sum(-1, keepdim=True)  # [B, Hkv, 1]: the standings are shares of this mass
        signal = standing  # what the accumulated share is a share of
        if self.accumulated != "sum":
            if self.accumulated.startswith("distant_rate"):
                assert ring is not None, "the distant rate reads the ring's size"
                rate = distant_attention_rate(standing, chunk, ring, self.decay)
            else:
                rate = attention_rate(standing, chunk)
            signal = rate if sum_head is None else torch.where(sum_head[:, :, None], standing, rate)
        share = attention_shares(signal, fresh, valid)  # shares within each head: sum and rate heads never mix
        if self.rank in ("shares", "block_shares"):
            share = torch.maximum(share, self._leverage_share(chunk, valid))
        if self.rank == "block_shares":  # Compactor's defaults: 256-position blocks, unscaled logits, pooled 3
            share = torch.maximum(share, self._chunk_share(block_attention(chunk), valid))
        return share * mass, fresh, total

    def _stored_scores(self, slots: LayerSlots, chunk: "PrefillChunk", standing: torch.Tensor,
                       accumulated: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, S] what decode_score="accumulated" stores: the accumulated attention, except that in every
        chunk of a later prompt (positions at or past where the last prefill ended: a question to a stored
        document, a conversation's next turn) the slots kept before the chunk store their standing. A new
        prompt may ask about anything the earlier one kept (a fact kept for its leverage), and its answer
        reads it only when it writes it, so the decode steps that write it must not give it up first."""
        used = chunk.slots_before
        if used == 0:
            return accumulated
        later_prompt = chunk.continues_a_prompt(slots)[:, None, None]  # [B, 1, 1]
        earlier_slot = torch.arange(chunk.keys.shape[2], device=standing.device) < used  # [S]
        return torch.where(later_prompt & earlier_slot, standing, accumulated)

    def _standing_bonus(self, slots: LayerSlots, chunk: "PrefillChunk") -> torch.Tensor | None:
        """[B, Hkv, S] what each candidate's standing adds to its stored (accumulated-attention) score: the
        state["standing_bonus"] the last prefill chunk wrote (standing - score), decayed over the decode steps
        since (as the score was; state["standing_written"]: the position after that chunk), for a slot still
        holding the token it was granted to (state["standing_pos"]: a decode step that moves a token lets it
        lapse; a residual slot, whose position a merge of older tokens leaves as it was, may keep it, where it
        only counts in the head's mass); 0 for the chunk's own tokens. None before any slot was written."""
        if "standing_bonus" not in slots.state:
            return None
        used = chunk.slots_before
        held = self._held_bonus(slots.state, chunk.key_pos[..., :used], chunk.first_positions(), self.decay)
        return F.pad(held, (0, chunk.k.shape[2]))

    @staticmethod
    def _held_bonus(state: dict[str, torch.Tensor], positions: torch.Tensor, now: torch.Tensor,
                    rate: float) -> torch.Tensor:
        """[B, Hkv, N] state["standing_bonus"] of the first N slots times rate^(the decode steps from
        state["standing_written"], where the last prefill chunk ended, to the positions `now` [B]), for a slot
        whose token is still the one the bonus was granted to (state["standing_pos"] == positions [B, Hkv, N],
        the slots' or the candidates' positions); 0 for the others."""
        n = positions.shape[-1]
        held = state["standing_pos"][..., :n] == positions
        steps = (now - state["standing_written"]).clamp(min=0)  # [B]
        return state["standing_bonus"][..., :n] * held * (rate ** steps.double()).float()[:, None, None]

    def _leverage_share(self, chunk: "PrefillChunk", valid: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, S] the leverage share of rank="shares": each of the chunk's tokens' share of the chunk's
        key leverage (`_chunk_share`), granted only to the `leverage_tokens` highest leverages of its head
        ("basis": one more than the leverages sum to, the keys' effective dimension); 0 for the rest."""
        own = own_key_leverage(chunk)  # [B, Hkv, T]
        share = self._chunk_share(own, valid)
        if self.leverage_tokens == "all":
            return share
        # The leverages of centred keys sum to the dimension of their span less the mean's direction, which
        # centring removed (n keys: at most n - 1): one more token spans the keys themselves.
        count = own.sum(-1, keepdim=True).round() + 1 if self.leverage_tokens == "basis" \
            else self.leverage_tokens  # [B, Hkv, 1] or an int
        lead = valid.shape[-1] - own.shape[-1]  # candidates kept from earlier chunks come first, never picked
        rank = F.pad(own, (lead, 0), value=NEG_INF).masked_fill(~valid, NEG_INF)
        return share * top_mask(rank, chunk.key_pos, count)

    @staticmethod
    def _chunk_share(own: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, S] each candidate's share of a query-agnostic signal `own` [B, Hkv, T] >= 0 of the chunk's
        own tokens (their leverage among the chunk's keys; the attention the text around them gives them):
        the chunk's tokens split the chunk's part of the candidates (its valid tokens over all valid
        candidates) in proportion to `own`; slots kept from earlier chunks take 0 (their standing is their
        stored score plus its bonus). Weighting by the chunk's part keeps a short chunk, whose few keys all
        look unique (leverage near 1 each), from outranking every earlier token: a 25-token question after a
        document would otherwise take a share of 1/25 per token against the document's attention shares of
        about 1/(all candidates)."""
        t = own.shape[-1]
        own = F.pad(own, (valid.shape[-1] - t, 0))  # [B, Hkv, S]
        part = valid[..., -t:].sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)  # [B, Hkv, 1]
        return own / own.sum(-1, keepdim=True).clamp(min=1e-30) * part

    def _window_picks(self, chunk: "PrefillChunk", accumulated: torch.Tensor, window: torch.Tensor,
                      ctx_cand: torch.Tensor, n_context: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
        """[B, Hkv, S] the context tokens kept for the window: of each sequence's n_context [B, 1, 1] context
        slots, 1 - `window_share` go to the highest accumulated attention and the share to the tokens the
        pooled window scores highest among the others (so a sink both signals rank first costs the share
        nothing)."""
        n_pick = (n_context.float() * self.window_share).long()  # [B, 1, 1]
        heavy = top_mask(accumulated.masked_fill(~ctx_cand, NEG_INF), chunk.key_pos, n_context - n_pick)
        return top_mask(window.masked_fill(~ctx_cand | heavy, NEG_INF), chunk.key_pos, n_pick, own)

    def compress_prefill(self, layer_idx: int, slots: LayerSlots, chunk: "PrefillChunk") -> None:
        if "held_tie" in slots.state:  # a second chunk before end_prefill
            raise KvzooError(f"ZSMerge(cross_layer={self.cross_layer}, layer_budgets={self.layer_budgets!r}) ranks or "
                             "allocates from every layer's attention over the whole prompt, so it cannot compress "
                             "a prompt fed in chunks; generate without prefill_chunk")
        score, window, accumulated = self._scores(chunk, self._standing_bonus(slots, chunk),
                                                  self._sum_heads(slots), slots.state["proximity"])
        # The share ranks keep a token for its largest share, but its slot's score is what decode steps add
        # each query's attention to and evict by: the accumulated attention, with the standing kept beside it
        # for a later prompt chunk (see `decode_score`).
        stored = self._stored_scores(slots, chunk, score, accumulated) if self._splits_standing else None
        prompt_len = slots.state["prompt_len"]  # Compactor's rank blends by the fraction the layout drops
        fresh_prompt = chunk.slots_before == 0
        if self._holds_prompt and fresh_prompt:
            # Keep every token with its standing as score (what the cross-layer rank reads); end_prefill
            # allocates, then compresses with that rank (or Compactor's, of the average layout) and stores
            # `stored`.
            slots.replace_all(chunk.keys, chunk.values, chunk.key_logw, score, chunk.key_pos)
            tie = score if self.rank == "accumulated" else window_scores(chunk, self.window_size, self.decay)
            # One entry per slot, as end_prefill's candidates are (a prompt shorter than the smallest layout
            # leaves empty slots past its tokens).
            empty_slots = (0, slots.capacity - tie.shape[-1])
            slots.state["held_tie"] = F.pad(tie, empty_slots)
            if stored is not None:
                slots.state["held_stored"] = F.pad(stored, empty_slots)
            rank = None
            if self.context_rank == "compactor":
                average = torch.tensor(self._average_budgets(prompt_len.tolist()), device=score.device)
                if self.reads_prompt_surprisal:  # unpooled: end_prefill adds the surprisal, then pools
                    rank = unpooled_compactor(chunk, average, prompt_len)
                else:
                    rank = sinks_then_compactor(chunk, average, prompt_len)
                slots.state["held_rank"] = F.pad(rank, empty_slots, value=float("-inf"))
            if self.layer_budgets == "uncertainty":  # the ring first, as _compress keeps it, then the rank
                slots.state["uncertainty"] = layer_uncertainty.output_uncertainty(
                    chunk, score if rank is None else rank, slots.state["proximity"], layer_uncertainty.WINDOW,
                    layer_uncertainty.TAU)
            return
        rank = None  # a later prompt (the only later chunk Compactor's rank allows) ranks by the attention scores
        if self.context_rank == "compactor" and fresh_prompt:
            rank = sinks_then_compactor(chunk, slots.budget, prompt_len)
        copy = slots.state.get("copy_head")  # [B, Hkv] bool or None
        copy = copy[:, :, None] if copy is not None and bool(copy.any()) else None
        copy_rank = None
        if copy is not None and fresh_prompt:
            copy_rank = rank if rank is not None else sinks_then_compactor(chunk, slots.budget, prompt_len)
        self._compress(slots, chunk, score, window, accumulated, rank=rank, stored=stored, copy=copy,
                       copy_rank=copy_rank)

    def _compress(self, slots: LayerSlots, chunk: "PrefillChunk", score: torch.Tensor,
                  window: torch.Tensor | None, accumulated: torch.Tensor | None, rank: torch.Tensor | None = None,
                  tie: torch.Tensor | None = None, stored: torch.Tensor | None = None,
                  copy: torch.Tensor | None = None, copy_rank: torch.Tensor | None = None) -> None:
        """Ring, context and residual merge of the candidates into `slots`, ranking the context by `rank`
        [B, Hkv, S] (default: `score`, or the window share's picks) with equal ranks ordered by `tie`
        (default: the window's own unpooled scores). The slots store `stored` [B, Hkv, S] as their score
        (default: `score`); when given, each slot's score - stored is kept in state["standing_bonus"] (with
        the position it belongs to in state["standing_pos"]) for the next chunk's ranking (`decode_score`).
        `copy` [B, Hkv, 1] marks copy heads, whose ring keeps `copy_recent` tokens and lends its other slots
        to the context, ranked after the window's picks by `copy_rank` [B, Hkv, S] when given (`copy_heads`)."""
        b, hkv, s = chunk.key_logw.shape
        dev = chunk.keys.device
        residual, proximity = slots.state["residual"][:, None, None], slots.state["proximity"][:, None, None]
        ring_start = slots.budget[:, None, None] - proximity
        cand = torch.arange(s, device=dev)[None, None, :]
        used = s - chunk.k.shape[2]  # candidates before the chunk are slots 0 .. used-1
        is_residual = (cand < used) & (cand < residual)
        valid = torch.isfinite(chunk.key_logw)
        exact = valid & ~is_residual
        in_ring = exact & recent_mask(chunk, slots.state["proximity"])
        n_context = ring_start - residual  # [B, 1, 1] context slots
        lent = torch.zeros_like(n_context)  # [B, Hkv or 1, 1] ring slots lent to the context
        if copy is not None:
            kept_recent = proximity.clamp(max=self.copy_recent)  # [B, 1, 1]
            in_ring = torch.where(copy, exact & recent_mask(chunk, kept_recent[:, 0, 0]), in_ring)
            lent = torch.where(copy, proximity - kept_recent, 0)

        # Context: the top-scored exact tokens outside the ring, into slots residual .. ring_start-1 (and the
        # lent ring slots).
        ctx_cand = exact & ~in_ring
        if self.leverage:  # ranks like zscore(score) + leverage * zscore(leverage); stored on the score's scale
            leverage = leverage_scores(chunk, self.kernel_size, of=self.leverage_of)
            score = score + on_the_scale_of(score, leverage, ctx_cand, self.leverage)
        # Among equal pooled scores the token's own score decides: a peak is kept before the neighbours that
        # max-pooling gave its score (at a few context slots, e.g. 2% of a short prompt, the attention sink
        # itself was dropped for its two neighbours).
        own = tie
        if own is None and self.rank != "accumulated":
            own = window_scores(chunk, self.window_size, self.decay)
        if rank is not None:
            ctx_rank = rank.masked_fill(~ctx_cand, NEG_INF)
        elif self.rank != "split":
            ctx_rank = score.masked_fill(~ctx_cand, NEG_INF)
        else:  # the window's picks, then the highest accumulated attention (the picks' complement)
            assert accumulated is not None and window is not None  # rank="split" blends both (_scores)
            picks = self._window_picks(chunk, accumulated, window, ctx_cand, ring_start - residual, own)
            ctx_rank = accumulated.masked_fill(picks, float("inf")).masked_fill(~ctx_cand, NEG_INF)
        if copy_rank is not None:  # copy heads: what the window reads most, then Compactor's rank
            assert window is not None and copy is not None  # a fresh prompt's chunk (compress_prefill)
            reads = min(self.window_size * self.kernel_size, s)
            first = top_mask(window.masked_fill(~ctx_cand, NEG_INF), chunk.key_pos, n_context.clamp(max=reads), own)
            copy_order = torch.where(first, float("inf"), copy_rank.masked_fill(~ctx_cand, NEG_INF))
            ctx_rank = torch.where(copy, copy_order, ctx_rank)
        n_ctx = min(s, slots.capacity)
        top = rank_order(ctx_rank, chunk.key_pos, own)[..., :n_ctx]
        rank = torch.arange(n_ctx, device=dev)[None, None, :]
        ctx_kept = (rank < n_context + lent) & (ctx_rank.gather(-1, top) > NEG_INF)
        in_ctx = torch.zeros_like(valid).scatter(-1, top, ctx_kept)
        leftover = exact & ~in_ring & ~in_ctx

        # Target slot of every candidate; `dummy` (one past the end) swallows everything not kept verbatim.
        dummy = slots.capacity
        target = torch.full((b, hkv, s), dummy, device=dev)
        ctx_slot = residual + rank
        if copy is not None:
            # A lent ring slot is the one of a position decode reaches within `lent` steps: the e-th pick past the
            # context region goes to the slot decode overwrites (lent - 1 - e)-th, so the best picks stay longest.
            last = chunk.q_pos.max(dim=1).values[:, None, None]  # [B, 1, 1]
            overwritten_at = lent - 1 - (rank - n_context)  # [B, Hkv, n_ctx]: decode steps until overwritten
            lent_slot = ring_start + (last + 1 - proximity + overwritten_at) % proximity
            ctx_slot = torch.where(rank < n_context, ctx_slot, lent_slot)
        target = target.scatter(-1, top, torch.where(ctx_kept, ctx_slot, dummy))
        target = torch.where(in_ring, ring_start + chunk.key_pos % proximity, target)
        target = torch.where(is_residual & valid, cand, target)
        group = residual_groups(chunk, leftover, is_residual, residual, self.metric)

        kept_score = score if stored is None else stored
        k_new, v_new, logw_new, score_new, pos_new = scatter_slots(chunk, kept_score, target, dummy)
        merge = merge_groups(chunk, leftover, group, k_new, v_new, logw_new, pos_new)
        merge_scores(score_new, kept_score, merge, self.score_update)
        slots.replace_all(k_new[:, :, :dummy], v_new[:, :, :dummy], logw_new[..., :dummy],
                          score_new[..., :dummy], pos_new[..., :dummy])
        if stored is not None:  # the standing of every slot, a residual slot's from its members' (as its score)
            standing = torch.zeros_like(score_new).scatter(-1, target, score)
            merge_scores(standing, score, merge, self.score_update)
            slots.state["standing_bonus"] = (standing - score_new)[..., :dummy]  # [B, Hkv, C]
            slots.state["standing_pos"] = slots.pos.to(torch.int32)  # [B, Hkv, C]
            slots.state["standing_written"] = chunk.q_pos.max(dim=1).values + 1  # [B]

    def end_prefill(self, cache: KVCache) -> None:
        """With a held prompt (`cross_layer`, `layer_budgets`): allocate each layer's budget, then compress its
        whole prompt into its layout, ranking the context by the standing or (cross_layer) by max(the token's
        share of its head's score, the largest share any layer's head gives it). Stores of equal capacity are
        stacked again (one allocation, so decode steps still batch the layers)."""
        if "held_tie" not in cache.layers[0].state:
            return
        heads = [slots.state["induction_head"] for slots in cache.layers] if self._reads_copy_heads else None
        widest = widest_shares(cache.layers, heads) if self.cross_layer else None
        first = cache.layers[0]
        budgets = self._layer_budgets(cache)
        forced = self._copy_reads(cache.layers, heads, budgets) if self.copy_reads and heads is not None else None
        _, hkv, _, d = first.k.shape
        stacks, stores = allocate_stores(budgets, [int(b.max()) for b in budgets], hkv, d, first.k.dtype,
                                        first.k.device)
        for layer_idx, (old, new, budget) in enumerate(zip(cache.layers, stores, budgets)):
            tie, stored = old.state.pop("held_tie"), old.state.pop("held_stored", None)
            rank = old.state.pop("held_rank", None)  # Compactor's (context_rank), or None: the standing
            if rank is not None and self.reads_prompt_surprisal:
                rank = held_rank_with_surprisal(rank, old, cache.prompt_surprisal, self.stored_surprisal,
                                                self.stored_surprisal_lend)
            new.state = {**old.state, "prefill_budget": budget, **self._regions(budget.tolist(), budget.device)}
            if widest is not None:
                rank = cross_layer_rank(old, widest)
            if forced is not None:  # kept in every layer: ranked above any score
                is_forced = (old.pos[..., None] == forced[:, None, None, :]).any(-1) & old.filled
                rank = (old.score if rank is None else rank).masked_fill(is_forced, float("inf"))
            candidates = slot_candidates(old)
            candidates.k, candidates.v = old.k, old.v  # every slot is a fresh candidate (none is a residual)
            self._compress(new, candidates, old.score, None, None, rank=rank, tie=tie, stored=stored)
            cache.layers[layer_idx] = new
        cache.stacks = stacks

    def _copy_reads(self, layers: list[LayerSlots], heads: list[torch.Tensor], budgets: list[torch.Tensor]
                    ) -> torch.Tensor:
        """[B, copy_reads] the prompt positions the copy heads' window reads most, from each held layer's window
        scores (state["held_tie"]) in the heads marked in `heads` (one [B, Hkv] per layer): a token's read is its
        largest share of such a head's window, max-pooled over the kernel_size positions up to it (a read lends
        to the tokens after it); the first SINKS tokens lend nothing, and the tokens every layer's ring keeps
        (the smallest ring of `budgets`' layouts) are not picked. Positions -1 where a prompt has fewer."""
        prompt_len = layers[0].state["prompt_len"]  # [B]
        n_pos = int(prompt_len.max())
        reads = widest_shares(layers, heads, [slots.state["held_tie"] for slots in layers])  # [B, n_pos]
        reads[:, :SINKS] = 0.0
        k = self.kernel_size
        reads = F.max_pool1d(F.pad(reads[:, None], (k - 1, 0)), k, 1)[:, 0]  # [B, n_pos]
        # the ring grows with the budget: the smallest layer budget's ring is the smallest (one host read)
        smallest_budget = torch.stack(budgets).amin(0).tolist()
        smallest_ring = torch.tensor([self._split(b).proximity for b in smallest_budget], device=prompt_len.device)
        position = torch.arange(n_pos, device=prompt_len.device)[None]
        pickable = (position < (prompt_len - smallest_ring)[:, None]) & (reads > 0)
        reads = reads.masked_fill(~pickable, -1.0)
        top = reads.topk(min(self.copy_reads, n_pos), dim=-1)
        return torch.where(top.values > 0, top.indices, -1)

    def _layer_budgets(self, cache: KVCache) -> list[torch.Tensor]:
        """Per layer, the [B] slots of each sequence (`layer_budgets`): the average budget's layout, or a share
        of L times it by the layer's uncertainty (recorded in state["uncertainty"] [B] at compress_prefill),
        evened out into `LAYER_LEVELS` runs of the sequence's layers by need (`budgets.level_budgets`; a batch's
        sequences are allocated alone, so a batch decodes as its sequences would alone)."""
        prompt_lens = cache.layers[0].state["prompt_len"]
        average = self._average_budgets(prompt_lens.tolist())
        device = prompt_lens.device
        if self.layer_budgets == "uniform":
            return [torch.tensor(average, device=device)] * len(cache.layers)
        need = torch.stack([layer.state.pop("uncertainty") for layer in cache.layers])  # [L, B]
        shares = layer_uncertainty.shares_by_need(need, average, prompt_lens.tolist(), self._fit(1).budget)
        per_sequence = []
        for uncertainty, sequence_shares in zip(need.T.tolist(), shares):  # levelled in each sequence's need order
            neediest = sorted(range(len(uncertainty)), key=lambda i: -uncertainty[i])
            per_sequence.append(level_budgets(sequence_shares, neediest, LAYER_LEVELS))
        return [torch.tensor([self._fit(b).budget for b in layer], device=device) for layer in zip(*per_sequence)]

    # --- decode ---------------------------------------------------------------------------------------
    def decode_step(self, layer_idx: int, slots: LayerSlots, k_new: torch.Tensor, v_new: torch.Tensor,
                    pos_new: torch.Tensor, probs: torch.Tensor) -> None:
        """Static-shaped ZSMerge step (METHODS.md 1.2 decode, with A3/A4 paper semantics):
        decay scores, put the new token in the ring slot of the oldest proximity token, move that token
        into a free context slot, or else merge the lowest-scored of context ∪ {it} into the residual slot
        with the most similar key. The fused update lives in kvzoo_kernels.zsmerge_update (torch on CPU,
        Triton on CUDA)."""
        zsmerge_update(slots.k, slots.v, slots.logw, slots.score, slots.pos, slots.budget,
                       slots.state["residual"], slots.state["proximity"], k_new, v_new, pos_new, probs,
                       decay=self.decay, metric=self.metric, score_update=self.score_update,
                       eviction_bias=self._lapsing_bonus(slots, pos_new))

    def _lapsing_bonus(self, slots: LayerSlots, pos_new: torch.Tensor) -> torch.Tensor | None:
        """[B, Hkv, C] the eviction bias of a decode step at positions pos_new [B]: the part of each slot's
        standing bonus it still counts (`standing_half_life`), state["standing_bonus"] decayed as the scores
        were (this step's decay included) and halved every standing_half_life steps since the prompt ended, for
        a slot still holding the token it was granted to. The update reads it for the context slots alone (the
        ring's tokens were kept for their place, not their standing; the residual slots are never evicted) and
        stores it nowhere. None when no bonus lapses."""
        if not self.standing_half_life or "standing_bonus" not in slots.state:
            return None
        rate = self.decay * 2.0 ** (-1.0 / self.standing_half_life)  # per decode step: decayed, then halving
        return self._held_bonus(slots.state, slots.pos, pos_new, rate) * self.decay
