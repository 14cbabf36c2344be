"""Mutation check of the compression methods: does the test suite notice when a method decides wrongly?

Each mutant is one semantic bug written from a method's documented decisions (kvzoo/cache/METHODS.md, the methods'
docstrings): inverted scores, a dropped or doubled attention bias, a different merge weighting, an
off-by-one in a region or window, the wrong slot chosen for eviction or merging, statistics not updated.
For every mutant the tool copies the repository to a temporary directory, replaces one exact snippet
(failing loudly if it is not found exactly once, so the list cannot silently rot as the code changes),
runs the mutant's tests with `pytest -x -q` and reports whether they failed (killed) or passed (survived).

    python tools/mutants.py                 # every mutant; exit status 1 if any survives
    python tools/mutants.py --list          # names, files and tests
    python tools/mutants.py --only NAME     # one mutant (repeatable)
    python tools/mutants.py --write-results # also replace the "Mutation check" section of tools/RESULTS.md

Slow (minutes): run on demand, not in CI. Hypothesis runs with a fixed seed, so results are reproducible.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "RESULTS.md"
SECTION = "## Mutation check"
IGNORE = shutil.ignore_patterns(".git", ".venv", ".hypothesis", ".pytest_cache", "__pycache__", ".cache",
                                "weights", "*.egg-info")

# Test selections shared by several mutants (pytest node ids or files).
BASELINES = "tests/test_methods_baselines.py"
EQUATIONS = "tests/test_method_equations.py"
ZSMERGE = "tests/test_zsmerge.py"
KVMERGER = "tests/test_kvmerger_zigzag.py"
QUALITY = "tests/test_quality.py"
ZS_UPDATE = "kvzoo_kernels/zsmerge_update.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids or files, run in this order
    why: str  # the documented decision it breaks


MUTANTS: list[Mutant] = [
    # --- shared: attention bias and the decode attention -------------------------------------------------
    Mutant("bias-dropped", "kvzoo/cache/slots.py",
           "alpha * torch.where(filled, logw, 0.0)", "0.0 * torch.where(filled, logw, 0.0)",
           (EQUATIONS,), "Eq. 8: merged slots get alpha * log w"),
    Mutant("bias-doubled", "kvzoo/cache/slots.py",
           "alpha * torch.where(filled, logw, 0.0)", "2 * alpha * torch.where(filled, logw, 0.0)",
           (EQUATIONS,), "Eq. 8: alpha * log w, not 2 alpha log w"),
    Mutant("decode-new-token-ignored", "kvzoo_kernels/decode_attention.py",
           "out = out + probs[..., -1:].to(v_new.dtype) * v_new[:, :, None, :]",
           "out = out + 0 * probs[..., -1:].to(v_new.dtype) * v_new[:, :, None, :]",
           ("tests/test_model_parity.py", "tests/test_method_cases.py"), "the decode query attends to its own token"),
    Mutant("decode-window-off-by-one", "kvzoo/attention.py",
           "pos[:, None, None] - slots.pos >= window", "pos[:, None, None] - slots.pos > window",
           ("tests/test_model_parity.py",), "sliding window: q_pos - k_pos < W"),
    Mutant("prefill-window-off-by-one", "kvzoo_kernels/attention.py",
           "visible &= (qp - kp) < window", "visible &= (qp - kp) <= window",
           ("tests/test_model_parity.py",), "sliding window: q_pos - k_pos < W"),
    Mutant("stacked-update-positions-by-layer", "kvzoo/attention.py",
           "positions[:, 0].repeat(len(layer_ids))", "positions[:, 0].repeat_interleave(len(layer_ids))",
           ("tests/test_stacked_decode.py",), "stacked rows are layer-major: row l * B + b is sequence b"),
    # --- shared: selection, scoring, budgets ------------------------------------------------------------
    Mutant("column-sums-reused-lse-of-other-rows", "kvzoo_kernels/column_sums_cpu.py",
           "lse = row_lse.float()", "lse = row_lse.float().flip(-1)",
           ("tests/test_column_sums_cpu.py",), "accumulated attention reuses each query's own log partition"),
    Mutant("ties-to-older", "kvzoo/cache/selection.py",
           "order = key_pos.argsort(dim=-1, descending=True, stable=True)",
           "order = key_pos.argsort(dim=-1, descending=False, stable=True)",
           (EQUATIONS,), "equal ranks go to the newer position"),
    Mutant("recent-window-one-longer", "kvzoo/cache/selection.py",
           "(chunk.key_pos > last[:, None, None] - recent_t)", "(chunk.key_pos >= last[:, None, None] - recent_t)",
           (f"{BASELINES}::test_h2o_keeps_recent_and_heavy_hitters", EQUATIONS), "the `recent` newest tokens"),
    Mutant("gqa-max-instead-of-mean", "kvzoo/cache/scoring.py",
           "x.reshape(b, num_kv_heads, hq // num_kv_heads, *x.shape[2:]).mean(dim=2)",
           "x.reshape(b, num_kv_heads, hq // num_kv_heads, *x.shape[2:]).amax(dim=2)",
           (f"{BASELINES}::test_h2o_keeps_recent_and_heavy_hitters", EQUATIONS), "GQA: mean over the group"),
    Mutant("decode-gqa-first-head-only", "kvzoo/cache/selection.py",
           "per_kv = probs.reshape(b, num_kv_heads, hq // num_kv_heads, c1).mean(2)",
           "per_kv = probs.reshape(b, num_kv_heads, hq // num_kv_heads, c1)[:, :, 0]",
           (f"{BASELINES}::test_h2o_keeps_recent_and_heavy_hitters", EQUATIONS), "GQA: mean over the group"),
    Mutant("window-scores-decay-ignored", "kvzoo/cache/scoring.py",
           "weights = (decay**ages)[None] * (q_pos >= 0)", "weights = (decay**(0 * ages))[None] * (q_pos >= 0)",
           (EQUATIONS,), "ZSMerge: window queries weighted decay^age"),
    Mutant("observation-window-one-longer", "kvzoo/cache/scoring.py",
           "w = min(window, chunk.q.shape[2])", "w = min(window + 1, chunk.q.shape[2])",
           (f"{BASELINES}::test_snapkv_selects_the_top_of_pooled_window_attention", EQUATIONS),
           "the last w queries"),
    Mutant("max-pool-skipped", "kvzoo/cache/scoring.py",
           "F.max_pool1d(F.pad(buf.reshape(shape), pad, value=float(\"-inf\")), kernel, stride=1)",
           "buf.reshape(shape)",
           (f"{BASELINES}::test_snapkv_selects_the_top_of_pooled_window_attention", EQUATIONS),
           "1-D max pooling of the window scores"),
    Mutant("pooling-includes-window", "kvzoo/cache/scoring.py",
           "(chunk.key_pos <= last - real_w)", "(chunk.key_pos <= last - real_w + 1)",
           (f"{BASELINES}::test_snapkv_selects_the_top_of_pooled_window_attention", EQUATIONS),
           "SnapKV pools the first T - w keys only"),
    Mutant("accumulated-normalise-off-by-one", "kvzoo/cache/scoring.py",
           "seen_by = (last_pos - chunk.key_pos + 1).float()",
           "seen_by = (last_pos - chunk.key_pos + 2).float()",
           (f"{BASELINES}::test_h2o_keeps_recent_and_heavy_hitters",
            "tests/test_zsmerge_standing.py::test_the_accumulated_share_of_every_query_or_of_its_rate"),
           "queries that see token j: T - j"),
    Mutant("distant-rate-counts-the-ring", "kvzoo/cache/scoring.py",
           "far_queries = (queries_that_saw(chunk, within_chunk=False) - horizon[:, None, None]).clamp(min=0)",
           "far_queries = queries_that_saw(chunk, within_chunk=False)",
           ("tests/test_zsmerge_standing.py::test_the_accumulated_share_of_every_query_or_of_its_rate",),
           "the distant rate is per query at least the ring's size after the token"),
    Mutant("band-sums-one-query-wider", "kvzoo_kernels/column_sums_cpu.py",
           "in_band = (distance >= 0) & (distance < within)", "in_band = (distance >= 0) & (distance <= within)",
           ("tests/test_column_sums_cpu.py",), "the band is the queries j <= i < j + within"),
    Mutant("ratio-budget-rounds-up", "kvzoo/cache/budgets.py",
           "return max(1, int(budget * prompt_len))", "return max(1, math.ceil(budget * prompt_len))",
           (BASELINES,), "a ratio budget is int(ratio * prompt)"),
    Mutant("pyramid-inverted", "kvzoo/cache/budgets.py",
           "steps = [high - layer * (high - low) / (num_layers - 1) for layer in range(num_layers)]",
           "steps = [low + layer * (high - low) / (num_layers - 1) for layer in range(num_layers)]",
           (f"{BASELINES}::test_pyramid_budgets_examples", BASELINES), "PyramidKV: largest budget at layer 0"),
    Mutant("zigzag-uniform-share", "kvzoo/cache/budgets.py",
           "share = weight[i] / mass if mass > 0 else Fraction(1, len(free))", "share = Fraction(1, len(free))",
           (KVMERGER,), "ZigZagKV Eq. 6: budget share = LMBA_l / sum LMBA"),
    Mutant("min-budget-output-block-gram-ignored", "kvzoo/cache/budgets.py",
           "before = carried @ vb_t + pb @ gram.triu(1)", "before = carried @ vb_t",
           (f"{KVMERGER}::test_min_budget_output_against_its_definition",),
           "LMBO: ||s_k||^2 needs the block's earlier keys, not only the carried sum"),
    Mutant("mba-smallest-first", "kvzoo/cache/budgets.py",
           "mass = attn.double().sort(dim=-1, descending=True).values.cumsum(dim=-1)",
           "mass = attn.double().sort(dim=-1, descending=False).values.cumsum(dim=-1)",
           (KVMERGER,), "MBA: the fewest *largest* entries reaching tau"),
    Mutant("scored-selection-ignores-protected", "kvzoo/cache/base.py",
           "rank = scores if forced is None else scores.masked_fill(forced, float(\"inf\"))", "rank = scores",
           (f"{BASELINES}::test_snapkv_window_budget_and_append", f"{BASELINES}::test_h2o_keeps_recent_and_heavy_hitters"),
           "protected candidates (windows, sinks) are always kept"),
    Mutant("decode-cap-evicts-newest", "kvzoo/cache/selection.py",
           "oldest_generated = argmin_where(slots.pos.float(), generated & slots.filled)",
           "oldest_generated = argmin_where(-slots.pos.float(), generated & slots.filled)",
           (f"{BASELINES}::test_decode_cap_bounds_prefill_only_methods",), "decode_cap: the oldest generated goes"),
    # --- FullCache --------------------------------------------------------------------------------------
    Mutant("full-decode-value-is-key", "kvzoo/cache/full.py",
           "slots.write(index, k_new, v_new, zeros, zeros, index)", "slots.write(index, k_new, k_new, zeros, zeros, index)",
           ("tests/test_model_parity.py",), "slot = the token's own key and value"),
    # --- StreamingLLM -----------------------------------------------------------------------------------
    Mutant("streaming-one-sink-more", "kvzoo/cache/selection.py",
           "(chunk.key_pos >= 0) & (chunk.key_pos < sinks)", "(chunk.key_pos >= 0) & (chunk.key_pos <= sinks)",
           (f"{BASELINES}::test_streaming_llm_keeps_sinks_and_recent",), "sinks = positions 0 .. sinks-1"),
    Mutant("streaming-evicts-newest", "kvzoo/cache/streaming_llm.py",
           "oldest = argmin_where(slots.pos.float(), slots.filled & (slots.pos >= self.sinks))",
           "oldest = argmin_where(-slots.pos.float(), slots.filled & (slots.pos >= self.sinks))",
           (f"{BASELINES}::test_streaming_llm_keeps_sinks_and_recent",), "evict the oldest non-sink token"),
    Mutant("streaming-default-without-sinks", "kvzoo/cache/streaming_llm.py", "sinks: int = 4", "sinks: int = 0",
           (f"{QUALITY}::test_divergence_from_full_cache_is_bounded",), "attention sinks (quality on the real model)"),
    # --- H2O --------------------------------------------------------------------------------------------
    Mutant("h2o-prefill-keeps-lightest", "kvzoo/cache/h2o.py",
           "return chunk.key_score + accumulated_scores(chunk, normalise=self.normalise)",
           "return -(chunk.key_score + accumulated_scores(chunk, normalise=self.normalise))",
           (f"{BASELINES}::test_h2o_keeps_recent_and_heavy_hitters",), "keep the heavy hitters"),
    Mutant("h2o-decode-scores-frozen", "kvzoo/cache/h2o.py",
           "slots.score.add_(slot_p)", "slots.score.add_(0 * slot_p)",
           (f"{BASELINES}::test_h2o_keeps_recent_and_heavy_hitters",), "A += each step's attention"),
    Mutant("h2o-evicts-heaviest", "kvzoo/cache/h2o.py",
           "evict = argmin_where(slots.score, slots.filled & ~recent)",
           "evict = argmin_where(-slots.score, slots.filled & ~recent)",
           (f"{BASELINES}::test_h2o_keeps_recent_and_heavy_hitters",), "evict the lightest older token"),
    Mutant("h2o-decode-recent-one-shorter", "kvzoo/cache/h2o.py",
           "recent = slots.pos > (pos_new - self._recent(slots))[:, None, None]",
           "recent = slots.pos > (pos_new - self._recent(slots) + 1)[:, None, None]",
           (f"{BASELINES}::test_h2o_keeps_recent_and_heavy_hitters",), "the recent window is never evicted"),
    # --- SnapKV / PyramidKV -----------------------------------------------------------------------------
    Mutant("snapkv-keeps-lowest", "kvzoo/cache/snapkv.py",
           "return window_scores(chunk, self.window_size, kernel=self.kernel_size, pooling=self.pooling,",
           "return -window_scores(chunk, self.window_size, kernel=self.kernel_size, pooling=self.pooling,",
           (f"{BASELINES}::test_snapkv_selects_the_top_of_pooled_window_attention",), "keep the top of window scores"),
    Mutant("snapkv-window-not-kept", "kvzoo/cache/snapkv.py",
           "return recent_mask(chunk, self.window_size)", "return recent_mask(chunk, 0)",
           (f"{BASELINES}::test_snapkv_window_budget_and_append",), "the observation window is always kept"),
    Mutant("pyramid-budgets-ignored", "kvzoo/cache/pyramidkv.py",
           "per_sequence.append([min(b, n) for b in budgets])", "per_sequence.append([avg] * len(budgets))",
           (f"{BASELINES}::test_pyramidkv_falls_back_when_infeasible", f"{BASELINES}::test_pyramidkv_layer_budgets"),
           "per-layer pyramid budgets"),
    # --- TOVA -------------------------------------------------------------------------------------------
    Mutant("tova-prefill-keeps-least-attended", "kvzoo/cache/tova.py",
           "return window_scores(chunk, window=1).mean(dim=1, keepdim=True)",
           "return -window_scores(chunk, window=1).mean(dim=1, keepdim=True)",
           (f"{BASELINES}::test_tova_keeps_the_last_querys_favourites",), "keep the last query's favourites"),
    Mutant("tova-decode-stale-scores", "kvzoo/cache/tova.py",
           "slots.score.copy_(torch.where(slots.filled, slot_p, 0.0))",
           "slots.score.copy_(torch.where(slots.filled, slots.score, 0.0))",
           (f"{BASELINES}::test_tova_keeps_the_last_querys_favourites",), "scores = the current query's attention"),
    Mutant("tova-new-token-always-kept", "kvzoo/cache/tova.py",
           "drop_new = ~has_free & (new_p < lowest_score)", "drop_new = ~has_free & (new_p < 0)",
           (f"{BASELINES}::test_tova_keeps_the_last_querys_favourites", EQUATIONS),
           "the new token competes too"),
    Mutant("tova-first-head-only", "kvzoo/cache/tova.py",
           "layer_p = probs.mean(dim=1)", "layer_p = probs[:, 0]",
           (f"{BASELINES}::test_tova_keeps_the_last_querys_favourites",), "scores averaged over all heads"),
    # --- ZSMerge ----------------------------------------------------------------------------------------
    Mutant("zsmerge-prefill-keeps-lowest", "kvzoo/cache/zsmerge.py",
           "ctx_rank = score.masked_fill(~ctx_cand, NEG_INF)",
           "ctx_rank = (-score).masked_fill(~ctx_cand, NEG_INF)",
           (EQUATIONS,), "context = the top-scored older tokens"),
    Mutant("zsmerge-prefill-ring-one-shorter", "kvzoo/cache/zsmerge.py",
           "in_ring = exact & recent_mask(chunk, slots.state[\"proximity\"])",
           "in_ring = exact & recent_mask(chunk, slots.state[\"proximity\"] - 1)",
           (ZSMERGE,), "the ring holds the B_p newest tokens"),
    Mutant("zsmerge-prefill-merge-unweighted", "kvzoo/cache/residual_merge.py",
           "(sum_k / safe_w).to(k.dtype)", "(sum_k / safe_w.clamp(max=1)).to(k.dtype)",
           (ZSMERGE, EQUATIONS), "a residual slot is the mean of its members"),
    # The decode step's reference implementation (the CPU path; the Triton kernel is checked against it).
    Mutant("zsmerge-decode-no-decay", ZS_UPDATE,
           "decay * score + slot_p", "score + slot_p",
           (ZSMERGE,), "Eq. 5: s <- lambda s + a"),
    Mutant("zsmerge-decode-scores-frozen", ZS_UPDATE,
           "decay * score + slot_p", "decay * score + 0 * slot_p",
           (ZSMERGE,), "Eq. 5: s <- lambda s + a"),
    Mutant("zsmerge-ring-off-by-one", ZS_UPDATE,
           "ring_slot = (ring_start + pos_new % proximity)", "ring_slot = (ring_start + (pos_new + 1) % proximity)",
           (ZSMERGE,), "the new token replaces the oldest proximity token"),
    Mutant("zsmerge-merges-strongest", ZS_UPDATE,
           "weakest = rank.masked_fill(~(context & filled), float(\"inf\")).argmin(-1)",
           "weakest = (-rank).masked_fill(~(context & filled), float(\"inf\")).argmin(-1)",
           (ZSMERGE,), "the lowest-scored context token is merged"),
    Mutant("zsmerge-leaving-never-merged", ZS_UPDATE,
           "leaving_is_weakest = leaving[3] <= rank.gather(2, weakest[..., None])[..., 0]",
           "leaving_is_weakest = leaving[3] < -1.0",
           (ZSMERGE,), "A4: the leaving token competes with the context"),
    Mutant("zsmerge-least-similar-slot", ZS_UPDATE,
           "sim = qf @ kf.transpose(-1, -2) if", "sim = -(qf @ kf.transpose(-1, -2)) if",
           (ZSMERGE, EQUATIONS), "Eq. 6: merge into the most similar residual key"),
    Mutant("copy-heads-keep-the-whole-ring", "kvzoo/cache/zsmerge.py",
           "lent = torch.where(copy, proximity - kept_recent, 0)", "lent = torch.zeros_like(n_context)",
           ("tests/test_copy_heads.py",), "copy heads lend all but copy_recent ring slots to the context"),
    Mutant("induction-reads-the-earlier-copy-itself", "kvzoo/cache/copy_heads.py",
           "read = probs[:, i, i + 1].mean(dim=-1)", "read = probs[:, i, i].mean(dim=-1)",
           ("tests/test_copy_heads.py",), "the induction score reads the token after the earlier copy"),
    Mutant("stored-document-compressed-as-a-prompt", "kvzoo/generate.py",
           "request = prepare(model, ids, 0, compression, prefill_chunk, stored=True)",
           "request = prepare(model, ids, 0, compression, prefill_chunk)",
           ("tests/test_copy_heads.py",), "prefill_cache compresses with the method's for_stored_document"),
    Mutant("eval-asks-after-compression-of-a-prompt", "kvzoo/eval/runner.py",
           "self.prefilled(prompts, headroom, stored=layout == \"agnostic\")", "self.prefilled(prompts, headroom)",
           ("tests/test_eval.py",), "the asked-after needle layout prefills a stored document"),
    Mutant("prefill-only-compresses-a-later-prompt", "kvzoo/cache/base.py",
           "        if not later:\n            self.compress_prefill(layer_idx, slots, chunk)",
           "        if True:\n            self.compress_prefill(layer_idx, slots, chunk)",
           ("tests/test_reuse.py",), "a prefill-only method appends a question to its stored cache"),
    Mutant("proximity-cap-ignored", "kvzoo/cache/zsmerge.py",
           "            proximity = min(proximity, self.proximity_cap)",
           "            proximity = max(proximity, self.proximity_cap)",
           ("tests/test_copy_heads.py",), "a stored document's ring holds at most stored_ring tokens"),
    Mutant("stored-ring-keeps-the-prompt-rank", "kvzoo/cache/zsmerge.py",
           'return replace(pooled, proximity_cap=self.stored_ring, context_rank="compactor", rank="window",',
           "return replace(pooled, proximity_cap=self.stored_ring,",
           ("tests/test_copy_heads.py",), "a stored document ranks its context by Compactor's score"),
    Mutant("stored-chunked-document-refused", "kvzoo/generate.py",
           "method = method.for_stored_document(chunked=prefill_chunk is not None)",
           "method = method.for_stored_document()",
           ("tests/test_copy_heads.py",), "a stored document fed in chunks gets the copy heads"),
    Mutant("kvmerger-eps-resizes-after-a-later-prompt", "kvzoo/cache/kvmerger.py",
           'if not bool((first["prefill_budget"] == first["prompt_len"]).all()):  # one host read',
           "if False:",
           ("tests/test_reuse.py",), "KVMerger(budget=None) sizes its stores once, after the document's prefill"),
    Mutant("eval-asks-through-decode-steps", "kvzoo/eval/runner.py",
           "logits = prefill(self.model, asked.ids, asked.positions, cache)",
           "logits = __import__('kvzoo.likelihood', fromlist=['teacher_force']).teacher_force("
           "make_decode_step(self.model, compile=False), cache, logits, question, start)[1]",
           ("tests/test_eval.py",), "the asked-after needle layout feeds the question as generate(cache=) does"),
    Mutant("zsmerge-slots-store-standing", "kvzoo/cache/zsmerge.py",
           "stored = self._stored_scores(slots, chunk, score, accumulated) if self._splits_standing else None",
           "stored = None",
           ("tests/test_zsmerge_standing.py",), "decode_score='accumulated': slots store the accumulated attention"),
    Mutant("zsmerge-later-prompt-stores-accumulated", "kvzoo/cache/zsmerge.py",
           "return torch.where(later_prompt & earlier_slot, standing, accumulated)", "return accumulated",
           ("tests/test_zsmerge_standing.py",), "a later prompt stores the earlier slots' standing"),
    Mutant("zsmerge-every-later-chunk-stores-standing", "kvzoo/cache/zsmerge.py",
           "return torch.where(later_prompt & earlier_slot, standing, accumulated)",
           "return torch.where(earlier_slot, standing, accumulated)",
           ("tests/test_zsmerge_standing.py",), "only a later prompt stores the earlier slots' standing"),
    Mutant("zsmerge-later-chunk-forgets-standing", "kvzoo/cache/zsmerge.py",
           "held = state[\"standing_pos\"][..., :n] == positions", "held = state[\"standing_pos\"][..., :n] < -1",
           ("tests/test_zsmerge_standing.py",), "a later chunk ranks older slots by their standing"),
    Mutant("zsmerge-standing-never-lapses", "kvzoo/cache/zsmerge.py",
           "rate = self.decay * 2.0 ** (-1.0 / self.standing_half_life)", "rate = self.decay",
           (ZSMERGE,), "standing_half_life: the standing halves every standing_half_life decode steps"),
    Mutant("zsmerge-layer-budgets-stay-uniform", "kvzoo/cache/zsmerge.py",
           'if self.layer_budgets == "uniform":\n            return [torch.tensor(average', 'if True:\n            return [torch.tensor(average',
           ("tests/test_zsmerge_layer_budgets.py",), "layer_budgets='uncertainty': the layers share the budget by need"),
    Mutant("level-budgets-drop-the-remainder", "kvzoo/cache/budgets.py",
           "    even[order[0]] += left\n", "",
           ("tests/test_zsmerge_layer_budgets.py",), "evened-out layer budgets keep each sequence's total"),
    Mutant("zsmerge-held-prompt-ignores-compactor-rank", "kvzoo/cache/zsmerge.py",
           'rank = old.state.pop("held_rank", None)', 'rank = [old.state.pop("held_rank", None), None][1]',
           ("tests/test_compactor.py",), "a held prompt's context is ranked by Compactor's score (context_rank)"),
    Mutant("zsmerge-layer-need-ranks-the-ring-last", "kvzoo/cache/zsmerge.py",
           'score if rank is None else rank, slots.state["proximity"], layer_uncertainty.WINDOW',
           'score if rank is None else rank, 0, layer_uncertainty.WINDOW',
           ("tests/test_zsmerge_layer_budgets.py",), "a layer's need counts its keys as ZSMerge keeps them: the ring first"),
    Mutant("zsmerge-ring-keeps-its-standing", ZS_UPDATE,
           "leaving_is_weakest = leaving[3] <= rank.gather(2, weakest[..., None])[..., 0]",
           "leaving_is_weakest = rank.gather(2, ring_slot[..., None])[..., 0] <= rank.gather(2, weakest[..., None])[..., 0]",
           (ZSMERGE,), "only context slots compete with their lapsing standing, not the ring's"),
    Mutant("zsmerge-lapsing-standing-stored", ZS_UPDATE,
           "rank = score if eviction_bias is None else score + eviction_bias",
           "rank = score if eviction_bias is None else score.add_(eviction_bias)",
           (ZSMERGE,), "a decode step stores the accumulated attention, without the standing it competed with"),
    Mutant("zsmerge-kernel-ring-keeps-its-bias", ZS_UPDATE,
           "leaving_is_weakest = leave_sc <= weak_rank",
           "leaving_is_weakest = leave_sc + tl.sum(tl.where(at_ring, rank - sc, 0.0), axis=0) <= weak_rank",
           ("tests/test_kernels.py::test_triton_kernels_equal_their_references_under_the_interpreter",),
           "the Triton update reads the eviction bias for the context slots alone, as its reference"),
    Mutant("zsmerge-kernel-evicts-without-bias", ZS_UPDATE,
           "ranked = tl.where(context & filled, rank, float(\"inf\"))",
           "ranked = tl.where(context & filled, sc, float(\"inf\"))",
           ("tests/test_kernels.py::test_triton_kernels_equal_their_references_under_the_interpreter",),
           "the Triton update chooses what to merge by score plus the eviction bias, as its reference"),
    Mutant("zsmerge-stacked-decode-without-standing", "kvzoo/cache/zsmerge.py",
           "return (\"standing_bonus\", \"standing_pos\") if self.standing_half_life and self._splits_standing else ()",
           "return ()",
           ("tests/test_stacked_decode.py",), "the layer-batched decode step lets the standing lapse as one layer's does"),
    Mutant("compiled-standing-capacity-static", "kvzoo/compile.py",
           "for t in (slots.k, slots.v, slots.logw, slots.score, slots.pos, *per_slot):",
           "for t in (slots.k, slots.v, slots.logw, slots.score, slots.pos):",
           ("tests/test_compile.py",), "every capacity a decode step reads is symbolic: one graph for all prompt lengths"),
    Mutant("zsmerge-decode-merge-halves", ZS_UPDATE,
           "frac_r, frac_s = (w_r / w)[..., None], (w_s / w)[..., None]",
           "frac_r, frac_s = (0.5 + 0 * w_r / w)[..., None], (0.5 + 0 * w_s / w)[..., None]",
           (ZSMERGE, EQUATIONS), "Eq. 7: count-weighted running mean"),
    Mutant("zsmerge-decode-count-not-added", ZS_UPDATE,
           "merged = (merged_k, merged_v, w.log(), merged_score, torch.maximum(pos_r, src_pos))",
           "merged = (merged_k, merged_v, w_r.clamp(min=1).log(), merged_score, torch.maximum(pos_r, src_pos))",
           (ZSMERGE,), "Eq. 7: w <- w + 1"),
    # --- KVMerger ---------------------------------------------------------------------------------------
    Mutant("kvmerger-pivot-lowest-attention", "kvzoo/cache/merging_sets.py",
           "    score = score.float()\n    best =", "    score = -score.float()\n    best =",
           (EQUATIONS, KVMERGER), "pivot = argmax A_t in the set"),
    Mutant("kvmerger-sigma-not-squared", "kvzoo/cache/merging_sets.py",
           "torch.exp(-d2 / (2.0 * sigma * sigma))", "torch.exp(-d2 / (2.0 * sigma))",
           (EQUATIONS,), "g = exp(-|k_p - k_t|^2 / (2 sigma^2))"),
    Mutant("kvmerger-uniform-weights", "kvzoo/cache/merging_sets.py",
           "g = torch.where(d2 == 0, 1.0, torch.exp(-d2 / (2.0 * sigma * sigma)))", "g = torch.ones_like(d2)",
           (EQUATIONS, KVMERGER), "Gaussian-kernel weights around the pivot"),
    Mutant("kvmerger-cuts-most-similar", "kvzoo/cache/merging_sets.py",
           "cut = link & (_ranks(similarity) < cuts[..., None])",
           "cut = link & (_ranks(similarity, descending=True) < cuts[..., None])",
           (EQUATIONS, KVMERGER), "merge the most similar neighbours: cut the least similar links"),
    Mutant("kvmerger-floor-ignored", "kvzoo/cache/merging_sets.py",
           "cut |= link & (similarity < min_similarity)", "cut |= link & (similarity < -2.0)",
           (KVMERGER,), "min_similarity: no set joins adjacent keys less similar than the floor"),
    Mutant("kvmerger-floor-not-passed", "kvzoo/cache/kvmerger.py",
           "sets = budget_merging_sets(keys, protected, budget[:, None], valid, self.min_similarity)",
           "sets = budget_merging_sets(keys, protected, budget[:, None], valid)",
           (KVMERGER,), "KVMerger's budget mode applies its min_similarity floor"),
    Mutant("kvmerger-evicts-highest-sets", "kvzoo/cache/merging_sets.py",
           'lowest_first = _ranks(per_set(score.float(), sets).masked_fill(~droppable, float("inf")))',
           'lowest_first = _ranks((-per_set(score.float(), sets)).masked_fill(~droppable, float("inf")))',
           (KVMERGER,), "the sets beyond the budget are evicted lowest summed A_t first"),
    Mutant("kvmerger-evicts-protected", "kvzoo/cache/merging_sets.py",
           'droppable = filled & ~per_set((protected & valid).long(), sets, "amax").bool()', "droppable = filled",
           (KVMERGER,), "protected tokens (recent window, heavy hitters) are never evicted"),
    Mutant("kvmerger-attention-count-is-set-size", "kvzoo/cache/kvmerger.py",
           "slot_counts = attention_counts(score, counts, sets, pivots, slot_counts)", "slot_counts = slot_counts",
           (EQUATIONS,), "merged_count='attention': a merged slot counts sum_t A_t / A_p"),
    Mutant("kvmerger-attention-count-inverted", "kvzoo/cache/merging_sets.py",
           "by_mass = own * total / first", "by_mass = own * first / total.clamp(min=1e-30)",
           (EQUATIONS,), "merged_count='attention': the set's attention in units of its pivot's"),
    Mutant("kvmerger-attention-count-ignores-pivot-count", "kvzoo/cache/merging_sets.py",
           "by_mass = own * total / first", "by_mass = total / first",
           (KVMERGER,), "merged_count='attention': an already merged pivot scales the count by its own count"),
    Mutant("kvmerger-no-recent-window", "kvzoo/cache/kvmerger.py",
           "recent = (base * self.recent_ratio).long()", "recent = (base * self.recent_ratio * 0).long()",
           (EQUATIONS,), "the recent tokens are kept verbatim"),
    Mutant("zsmerge-pooled-ties-to-newer", "kvzoo/cache/zsmerge.py",
           "top = rank_order(ctx_rank, chunk.key_pos, own)", "top = rank_order(ctx_rank, chunk.key_pos)",
           ("tests/test_zsmerge.py",), "a max-pooled peak is kept before the neighbours that share its score"),
    Mutant("kvmerger-shares-of-the-prompt", "kvzoo/cache/kvmerger.py",
           'base = budget if self.ratio_of == "budget" and self.budget is not None else prompt_len',
           "base = prompt_len", (EQUATIONS,), "recent/heavy shares are of the budget by default"),
    Mutant("kvmerger-set-size-off-by-one", "kvzoo/cache/merging_sets.py",
           "v_star = v_star * torch.zeros_like(counts)", "v_star = v_star * 0 + v_star * torch.ones_like(counts)",
           (EQUATIONS,), "value_scale='set_size': v* = |S| sum w_t v_t, not (|S| + 1) ..."),
    Mutant("kvmerger-heavy-by-lowest", "kvzoo/cache/merging_sets.py",
           "score = score.float().masked_fill(~older, NEG_INF)  # older tokens first",
           "score = (-score.float()).masked_fill(~older, NEG_INF)",
           (KVMERGER,), "heavy hitters = the largest A_t"),
    Mutant("kvmerger-heavy-ignores-window", "kvzoo/cache/kvmerger.py",
           "return attention_shares(accumulated, window, torch.isfinite(chunk.key_logw))", "return accumulated",
           ("tests/test_leverage.py",), "rank='attention_shares': heavy hitters by max(accumulated, window) share"),
    # --- ZigZagKV ---------------------------------------------------------------------------------------
    Mutant("zigzag-keeps-lowest", "kvzoo/cache/zigzag.py",
           "rank = slots.score if widest is None", "rank = -slots.score if widest is None",
           (EQUATIONS,), "SnapKV selection within the layer budget"),
    Mutant("cross-layer-rank-own-only", "kvzoo/cache/selection.py",
           "return torch.maximum(score_shares(slots), at_slot)", "return score_shares(slots)",
           ("tests/test_cross_layer.py",), "cross_layer: max(own share, widest share of any layer)"),
    Mutant("zigzag-window-not-kept", "kvzoo/cache/zigzag.py",
           "recent_mask(slot_candidates(slots), self.window_size)", "recent_mask(slot_candidates(slots), 0)",
           (EQUATIONS,), "the observation window is always kept"),
    Mutant("zigzag-tau-ignored", "kvzoo/cache/layer_uncertainty.py",
           "return min_budget_attention(per_head, tau)", "return min_budget_attention(per_head, 1.0)",
           (EQUATIONS,), "LMBA at tau"),
    Mutant("zigzag-output-uncertainty-is-attention", "kvzoo/cache/zigzag.py",
           'if self.uncertainty == "attention":', "if True:",
           (EQUATIONS,), "uncertainty='output': LMBO from the attention output, not LMBA"),
    Mutant("zigzag-output-budget-window-not-first", "kvzoo/cache/layer_uncertainty.py",
           'first = rank.masked_fill(recent_mask(chunk, recent), float("inf"))', "first = rank.clone()",
           (EQUATIONS,), "LMBO counts keys in the order the layer keeps them: the window first"),
    Mutant("compactor-causal", "kvzoo/cache/scoring.py",
           "same = (block_of[:, start:stop, None] == block_of[:, None, lo:hi]) & valid[:, start:stop, None]",
           "same = (block_of[:, start:stop, None] == block_of[:, None, lo:hi]) & valid[:, start:stop, None]\n"
           "        same &= torch.arange(start, stop)[:, None] >= torch.arange(lo, hi)[None, :]",
           ("tests/test_compactor.py",), "Compactor's block attention is non-causal: later queries count too"),
    Mutant("compactor-post-rope-leverage", "kvzoo/cache/scoring.py",
           "return apply_rope(chunk.k, cos, -sin)", "return chunk.k",
           ("tests/test_compactor.py",), "Compactor's leverage is of the pre-RoPE keys"),
    Mutant("compactor-leverage-unweighted", "kvzoo/cache/scoring.py",
           "own = (zscore(attention, valid) + blend * zscore(leverage, valid))",
           "own = (zscore(attention, valid) + zscore(leverage, valid))",
           ("tests/test_compactor.py",), "Compactor blends leverage by the dropped fraction of the prompt"),
    Mutant("zsmerge-leverage-share-ignored", "kvzoo/cache/zsmerge.py",
           "share = torch.maximum(share, self._leverage_share(chunk, valid))",
           "share = share",
           ("tests/test_leverage.py",), "rank='shares' adds the keys' leverage as a third share"),
    Mutant("zsmerge-leverage-basis-ignored", "kvzoo/cache/zsmerge.py",
           "return share * top_mask(rank, chunk.key_pos, count)", "return share",
           ("tests/test_leverage.py",), "leverage_tokens='basis' grants the leverage share to a basis of the keys"),
    Mutant("zsmerge-leverage-basis-without-mean", "kvzoo/cache/zsmerge.py",
           "count = own.sum(-1, keepdim=True).round() + 1", "count = own.sum(-1, keepdim=True).round()",
           ("tests/test_leverage.py",),
           "the basis counts the mean's direction (a short chunk keeps every token's leverage share)"),
    Mutant("pool-ahead-ignored", "kvzoo/cache/scoring.py",
           "behind = kernel // 2 if ahead is None else kernel - 1 - ahead", "behind = kernel // 2",
           ("tests/test_leverage.py", "tests/test_method_equations.py"),
           "pool_ahead moves the pooled span (a read token lends its score to those after it)"),
    Mutant("zsmerge-block-share-ignored", "kvzoo/cache/zsmerge.py",
           "share = torch.maximum(share, self._chunk_share(block_attention(chunk), valid))", "share = share",
           ("tests/test_leverage.py",), "rank='block_shares' adds the block attention as a fourth share"),
    Mutant("kvmerger-window-pooling-ignored", "kvzoo/cache/kvmerger.py",
           "kernel=self.kernel_size, pooling=self.pooling,", "kernel=self.kernel_size, pooling=\"max\",",
           ("tests/test_leverage.py",), "KVMerger pools the window's scores as `pooling` says"),
    Mutant("zigzag-attention-shares-ignored", "kvzoo/cache/zigzag.py",
           "shares = attention_shares(accumulated_scores(chunk), window, valid)",
           "shares = window", ("tests/test_leverage.py",), "ZigZagKV rank='attention_shares' ranks by the accumulated and the window's shares too"),
    Mutant("zigzag-question-share-ignored", "kvzoo/cache/zigzag.py",
           "return torch.maximum(shares, share_of(question, valid))", "return shares",
           ("tests/test_leverage.py",), "ZigZagKV's share rank keeps a token for a question's share too"),
    Mutant("zigzag-question-pooling-ignored", "kvzoo/cache/zigzag.py",
           "pooling=self.question_pooling, ahead=self.question_pool_ahead)",
           "pooling=self.pooling, ahead=self.pool_ahead)",
           ("tests/test_leverage.py",), "ZigZagKV's question window is pooled as question_pooling / _pool_ahead say"),
    Mutant("zigzag-question-window-default-none", "kvzoo/cache/zigzag.py",
           "question_window: int | None = 8", "question_window: int | None = None",
           ("tests/test_leverage.py",), "ZigZagKV's default share rank reads a question's last 8 queries too"),
    Mutant("zigzag-compactor-rank-ignored", "kvzoo/cache/zigzag.py",
           'if self.rank == "compactor":', 'if self.rank == "compactor" and False:',
           ("tests/test_compactor.py",), "ZigZagKV rank='compactor' ranks by sinks, then Compactor's score"),
    Mutant("kvmerger-compactor-rank-ignored", "kvzoo/cache/kvmerger.py",
           'if self.rank == "compactor":', 'if self.rank == "compactor" and False:',
           ("tests/test_compactor.py",), "KVMerger rank='compactor' picks heavy hitters by Compactor's score"),
    Mutant("kvmerger-recent-tokens-ignored", "kvzoo/cache/kvmerger.py",
           "recent = (budget // 2).clamp(max=self.recent_tokens).minimum(verbatim)", "recent = recent",
           ("tests/test_compactor.py",), "KVMerger recent_tokens sets the recent window, the rest to heavy hitters"),
    Mutant("stored-chunked-fallback-without-leverage", "kvzoo/cache/zsmerge.py",
           'rank = "shares" if self.rank == "attention_shares" else self.rank', "rank = self.rank",
           ("tests/test_copy_heads.py",), "a chunked stored document keeps the leverage share beside its copy heads"),
    Mutant("zigzag-stored-rank-ignored", "kvzoo/cache/zigzag.py",
           "return replace(self, rank=self.stored_rank)", "return self",
           ("tests/test_copy_heads.py",), "ZigZagKV ranks a stored document by its stored_rank"),
    Mutant("kvmerger-stored-rule-ignored", "kvzoo/cache/kvmerger.py",
           'return replace(stored, rank="compactor", recent_tokens=self.stored_recent,', "return replace(stored,",
           ("tests/test_copy_heads.py",), "KVMerger stores a document with Compactor's rank and a short window"),
    Mutant("kvmerger-stored-verbatim-ignored", "kvzoo/cache/kvmerger.py",
           "heavy_ratio=round(self.stored_verbatim - self.recent_ratio, 9))", "heavy_ratio=self.heavy_ratio)",
           ("tests/test_copy_heads.py",), "a stored KVMerger keeps stored_verbatim of its budget verbatim"),
    Mutant("kvmerger-stored-count-ignored", "kvzoo/cache/kvmerger.py",
           'replace(self, merged_count=self.stored_merged_count)', "self",
           ("tests/test_copy_heads.py",), "KVMerger counts a stored document's merged slots by stored_merged_count"),
    Mutant("kvmerger-layer-budgets-stay-uniform", "kvzoo/cache/kvmerger.py",
           "per_sequence = layer_uncertainty.shares_by_need(need, average, prompt_lens.tolist())",
           "per_sequence = layer_uncertainty.shares_by_need(need * 0 + 1, average, prompt_lens.tolist())",
           ("tests/test_kvmerger_layer_budgets.py",), "KVMerger's layer_budgets='uncertainty' shares the budget by need"),
    Mutant("kvmerger-layer-need-ranks-the-window-last", "kvzoo/cache/kvmerger.py",
           "chunk, heavy_rank, recent, layer_uncertainty.WINDOW", "chunk, heavy_rank, 0, layer_uncertainty.WINDOW",
           ("tests/test_kvmerger_layer_budgets.py",), "a KVMerger layer's need counts its recent window first"),
    Mutant("kvmerger-held-rank-out-of-slot-order", "kvzoo/cache/kvmerger.py",
           "held = heavy_rank.gather(-1, _position_order(chunk))[..., :slots.capacity]",
           "held = heavy_rank[..., :slots.capacity]",
           ("tests/test_kvmerger_layer_budgets.py",), "a held prompt's heavy-hitter rank follows its slots"),
    Mutant("zsmerge-stored-kernel-ignored", "kvzoo/cache/zsmerge.py",
           "pooled = replace(self, kernel_size=self.stored_kernel_size) if self.stored_kernel_size is not None else self",
           "pooled = self",
           ("tests/test_copy_heads.py",), "a stored document pools its window over stored_kernel_size positions"),
    Mutant("kvmerger-skipped-layer-stays-a-view", "kvzoo/cache/kvmerger.py",
           "            if layer_idx not in merging:\n", "            if False:\n",
           ("tests/test_kvmerger_layer_budgets.py",), "a skipped layer leaves the held prompt's allocation"),
    Mutant("kvmerger-stacks-keep-merging-positions", "kvzoo/cache/kvmerger.py",
           "layer_ids=tuple(merging[i] for i in stack.layer_ids)", "layer_ids=stack.layer_ids",
           ("tests/test_kvmerger_layer_budgets.py",), "merging layers of one size stay one allocation"),
    Mutant("stored-rank-keeps-no-span", "kvzoo/cache/compactor.py",
           "dropped_fraction(kept, prompt_len), span=span, ahead=lead_in)", "dropped_fraction(kept, prompt_len))",
           ("tests/test_compactor.py",), "a stored document's rank is pooled over SPAN positions"),
    Mutant("stored-rank-span-centred", "kvzoo/cache/compactor.py",
           "dropped_fraction(kept, prompt_len), span=span, ahead=lead_in)",
           "dropped_fraction(kept, prompt_len), span=span)",
           ("tests/test_compactor.py",), "a stored document's rank lends a token's score to the LEAD_IN tokens before it"),
    Mutant("stored-surprisal-lent-backwards", "kvzoo/cache/compactor.py",
           'SURPRISE_LEND + 1, mode, 0)', 'SURPRISE_LEND + 1, mode, SURPRISE_LEND)',
           ("tests/test_compactor.py",), "a surprising token lends its surprisal to the tokens after it"),
    Mutant("stored-surprisal-lend-mean-ignored", "kvzoo/cache/compactor.py",
           'if "mean" in terms:', "if False:",
           ("tests/test_compactor.py",), "lend max+mean adds the mean surprisal of the window to its largest"),
    Mutant("stored-surprisal-lend-run-ignored", "kvzoo/cache/compactor.py",
           'if "run" in terms:', "if False:",
           ("tests/test_compactor.py",), "lend max+mean+run adds the run of unguessable tokens"),
    Mutant("stored-surprisal-run-mean-not-least", "kvzoo/cache/compactor.py",
           'least_of_run = -pooled(-surprisal, RUN, "max", 0)', 'least_of_run = pooled(surprisal, RUN, "avg", 0)',
           ("tests/test_compactor.py",), "the run lend takes a run's least surprisal, not its mean"),
    Mutant("stored-surprisal-run-not-spread", "kvzoo/cache/compactor.py",
           'z(pooled(least_of_run, RUN, "max", RUN - 1))', "z(least_of_run)",
           ("tests/test_compactor.py",), "every token of a run is lent the run's value, not only its last"),
    Mutant("zsmerge-stored-lend-default-run", "kvzoo/cache/zsmerge.py",
           'stored_surprisal_lend: str = "max+mean+run"', 'stored_surprisal_lend: str = "max+mean"',
           ("tests/test_reuse.py",), "ZSMerge's stored documents lend the run by default"),
    Mutant("zigzag-stored-surprisal-lend-ignored", "kvzoo/cache/zigzag.py",
           "self.stored_surprisal,\n                                                self.stored_surprisal_lend)",
           "self.stored_surprisal,\n                                                \"max\")",
           ("tests/test_compactor.py",), "ZigZagKV lends the surprisal as stored_surprisal_lend says"),
    Mutant("kvmerger-stored-surprisal-lend-ignored", "kvzoo/cache/kvmerger.py",
           "self.stored_surprisal,\n                                                     self.stored_surprisal_lend)",
           "self.stored_surprisal,\n                                                     \"max\")",
           ("tests/test_compactor.py",), "KVMerger lends the surprisal as stored_surprisal_lend says"),
    Mutant("stored-surprisal-added-after-pooling", "kvzoo/cache/zigzag.py",
           'stored = unpooled_compactor(chunk, self._kept(slots, chunk), slots.state["prompt_len"])',
           "stored = scores",
           ("tests/test_compactor.py",), "ZigZagKV adds the surprisal to Compactor's unpooled score, then pools"),
    Mutant("kvmerger-stored-surprisal-ignored", "kvzoo/cache/kvmerger.py",
           "if self.reads_prompt_surprisal:  # Compactor's unpooled score, with the surprisal",
           "if False:",
           ("tests/test_compactor.py",), "KVMerger's stored heavy hitters rank with the document's surprisal"),
    Mutant("kvmerger-stored-ties-earlier-first", "kvzoo/cache/kvmerger.py",
           'newer_first = self.rank == "compactor"', "newer_first = False",
           ("tests/test_compactor.py",), "a stored document's equal pooled ranks protect the newer tokens first"),
    Mutant("question-to-stored-document-ranked-by-compactor", "kvzoo/cache/zsmerge.py",
           'if self.context_rank == "compactor" and fresh_prompt:', 'if self.context_rank == "compactor":',
           ("tests/test_zsmerge_standing.py",), "a later prompt ranks a stored document by the attention scores"),
    Mutant("eval-runs-every-needle-layout", "kvzoo/eval/runner.py",
           "for layout in self.config.needle_layouts:", "for layout in NEEDLE_LAYOUTS:",
           ("tests/test_eval.py",), "--needle-layouts runs only the layouts asked for"),
    Mutant("zsmerge-leverage-share-of-a-chunk-unweighted", "kvzoo/cache/zsmerge.py",
           "return own / own.sum(-1, keepdim=True).clamp(min=1e-30) * part",
           "return own / own.sum(-1, keepdim=True).clamp(min=1e-30)",
           ("tests/test_leverage.py",), "a later chunk's tokens split only the chunk's part of the leverage share"),
]


@dataclass
class Outcome:
    mutant: Mutant
    killed: bool
    seconds: float
    detail: str  # the first failing test, or the error


def apply(root: Path, mutant: Mutant) -> None:
    """Replace the mutant's snippet in the copy at `root`; raise if it is not there exactly once."""
    path = root / mutant.file
    text = path.read_text()
    if text.count(mutant.original) != 1:
        raise SystemExit(f"mutant {mutant.name}: the snippet is not in {path} exactly once")
    path.write_text(text.replace(mutant.original, mutant.replacement))


def check_all_snippets() -> None:
    """Every snippet is in the working tree exactly once (before any copying, so a stale list fails fast)."""
    for m in MUTANTS:
        count = (ROOT / m.file).read_text().count(m.original)
        if count != 1:
            raise SystemExit(f"mutant {m.name}: the snippet occurs {count} times in {m.file} (expected once):"
                             f"\n    {m.original!r}\nupdate tools/mutants.py to the current code")
        if m.original == m.replacement:
            raise SystemExit(f"mutant {m.name}: replacement equals the original")


def run_one(mutant: Mutant, timeout: float) -> Outcome:
    """Run the mutant's tests on a mutated copy (mutant.original == replacement: the unmutated baseline)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"kvzoo-mutant-{mutant.name}-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE, symlinks=True)
        if mutant.original != mutant.replacement:
            apply(copy, mutant)
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1",
               "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0",
               *mutant.tests]
        try:
            proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(mutant, True, time.perf_counter() - started, f"timed out after {timeout:.0f} s")
    seconds = time.perf_counter() - started
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if proc.returncode == 0:
        return Outcome(mutant, False, seconds, "all selected tests passed")
    if proc.returncode in (1,) and failed:
        return Outcome(mutant, True, seconds, failed[0][:160])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return Outcome(mutant, True, seconds, f"pytest exit {proc.returncode}: {' | '.join(tail)[:160]}")


def report(outcomes: list[Outcome], total_seconds: float) -> str:
    killed = sum(o.killed for o in outcomes)
    lines = [
        SECTION, "",
        f"`python tools/mutants.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{killed}/{len(outcomes)} mutants killed, {len(outcomes) - killed} survived, "
        f"{total_seconds / 60:.1f} min in all (timings from a shared machine: indicative only).", "",
        "| mutant | file | breaks | result | s | first failure |",
        "|---|---|---|---|---:|---|",
    ]
    for o in outcomes:
        detail, why = (x.replace("|", "\\|") for x in (o.detail, o.mutant.why))
        lines.append(f"| {o.mutant.name} | {o.mutant.file} | {why} | "
                     f"{'killed' if o.killed else '**SURVIVED**'} | {o.seconds:.0f} | {detail} |")
    return "\n".join(lines) + "\n"


def write_results(section: str) -> None:
    """Replace (or append) the "Mutation check" section of tools/RESULTS.md, leaving other sections alone."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Results\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    RESULTS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (a hang counts as killed)")
    parser.add_argument("--write-results", action="store_true", help="write the report into tools/RESULTS.md")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not first check that the selected tests pass on the unmutated code")
    args = parser.parse_args(argv)
    check_all_snippets()
    names = {m.name for m in MUTANTS}
    if len(names) != len(MUTANTS):
        raise SystemExit("two mutants share a name")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<36} {m.file:<28} {' '.join(m.tests)}")
        return 0
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        raise SystemExit(f"unknown mutant(s) {', '.join(unknown)}; see --list")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    started = time.perf_counter()
    if not args.skip_baseline:  # a test failing without any mutant would count every mutant as killed
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        baseline = run_one(Mutant("baseline", "", "", "", tests, "no mutation"), args.timeout)
        print(f"baseline (unmutated): {'FAILED' if baseline.killed else 'passed'} in {baseline.seconds:.0f} s",
              flush=True)
        if baseline.killed:
            print(f"the selected tests fail without any mutant: {baseline.detail}", file=sys.stderr)
            return 2
    outcomes = []
    for i, mutant in enumerate(chosen, 1):
        outcome = run_one(mutant, args.timeout)
        outcomes.append(outcome)
        print(f"[{i}/{len(chosen)}] {mutant.name:<36} {'killed' if outcome.killed else 'SURVIVED':<9}"
              f"{outcome.seconds:6.0f} s  {outcome.detail}", flush=True)
    section = report(outcomes, time.perf_counter() - started)
    print("\n" + section)
    if args.write_results:
        write_results(section)
    return 1 if any(not o.killed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
