"""Quality guard on the real default model (SmolLM2-135M-Instruct): every method at budgets 2% .. 50% keeps
the next-token distributions close to the full cache's over a teacher-forced continuation.

Setup: tests/data/lighthouse.txt (341 tokens of plain English prose, written for this test); the first 309
tokens are the prompt, the last 32 are fed as decode steps. The score is the mean over the 32 predictions
of KL(full || compressed) in nats. The prompt is run once (tests/quality_helpers.py); each budget is an
integer number of slots, int(ratio * 309).

Bounds (nats), per budget ratio: 0.02: 3.0, 0.05: 1.5, 0.1: 1.0, 0.2: 0.5, 0.5: 0.25. Measured on
2026-12-01 (fp32, CPU; deterministic), after the session-3 defaults (ZSMerge alpha 0.5; KVMerger shares
of the budget, no skipped layer) and the tie-break fix (a max-pooled peak ranks before its neighbours);
ZigZagKV re-measured 2026-12-02 (its end-of-prefill tie-break), ZSMerge on 2026-12-02 after its default
became rank="shares", decay=1.0 (the window rank with decay 0.98, the earlier default, measured 0.87 0.45
0.30 0.18 0.06):

    ratio                   0.02   0.05   0.10   0.20   0.50
    StreamingLLM            1.27   0.59   0.34   0.25   0.08
    H2O                     0.98   0.48   0.23   0.12   0.04
    TOVA                    1.17   0.57   0.30   0.19   0.07
    ZSMerge                 0.95   0.54   0.32   0.18   0.05
    SnapKV                  0.54   0.40   0.25   0.16   0.05
    PyramidKV               0.73   0.45   0.34   0.22   0.13
    ZigZagKV                2.40   0.45   0.29   0.18   0.05
    KVMerger                0.54   0.26   0.17   0.10   0.04
    broken: StreamingLLM sinks=0        3.09   2.29   2.02   1.52   0.97
    broken: KVMerger.paper() (values x |S|) 8.00 9.92 8.92   1.05   0.06

Why these bounds: from 5% up each is 1.3-2x the worst healthy method at that budget (room for a different
but reasonable tie-break or rounding after a refactor) and below both broken configurations at small
budgets (StreamingLLM without attention sinks, the failure its paper is about; KVMerger scaling merged
values by the set size, which multiplies values by tens). At 2% (6 slots per head) everything is coarse:
the bound separates the |S|-scaled KVMerger (8.0) and, barely, StreamingLLM without sinks (3.09).
Before the tie-break fix ZSMerge at 2% measured 4.5 and PyramidKV 2.6: with 2 context slots, max-pooling
gave the attention sink's two neighbours the sink's score, ties went to the newer position, and the sink
itself was dropped (tests/test_zsmerge.py pins the fix).
The broken StreamingLLM is run here too, so the test shows it can fail.
tools/mutants.py's `streaming-default-without-sinks` is one of the mutants this test kills.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvzoo
from kvzoo.cache import StreamingLLM, ZSMerge
from kvzoo.default_model import ensure_default_model
from tests.method_cases import METHOD_CASES
from tests.quality_helpers import decode_logits, mean_kl, prefill_once, replay_prefill, stack_caches

PASSAGE = Path(__file__).parent / "data" / "lighthouse.txt"
CONTINUATION = 32
RATIOS = (0.02, 0.05, 0.1, 0.2, 0.5)
BOUND = {0.02: 3.0, 0.05: 1.5, 0.1: 1.0, 0.2: 0.5, 0.5: 0.25}

# Known violations (method, ratio) -> reason, run as strict xfails: once fixed, the xfail turns into a
# failure that asks for its removal. None at present.
KNOWN_OVER: dict[tuple[str, float], str] = {}


@pytest.fixture(scope="module")
def quality():
    """method name -> [len(RATIOS)] mean KL, computed on first use (so -k selects cheaply)."""
    torch.set_num_threads(1)  # a 135M model, one sequence: more threads only contend on a busy machine
    model = kvzoo.load(ensure_default_model(progress=False))
    ids = model.require_tokenizer().encode(PASSAGE.read_text().strip())
    prompt, continuation = ids[:-CONTINUATION], ids[-CONTINUATION:]
    pre = prefill_once(model, prompt, CONTINUATION)
    full = decode_logits(pre, pre.full_cache, continuation)
    budgets = [max(1, int(r * len(prompt))) for r in RATIOS]
    results: dict[str, torch.Tensor] = {}

    def kl_of(name: str, make) -> torch.Tensor:  # noqa: ANN001
        if name not in results:
            caches = [replay_prefill(pre, make(b)) for b in budgets]
            results[name] = mean_kl(full, decode_logits(pre, stack_caches(caches), continuation))
        return results[name]

    kl_of.pre, kl_of.full, kl_of.prompt, kl_of.continuation = pre, full, prompt, continuation  # type: ignore[attr-defined]
    return kl_of


def _cases() -> list:
    params = []
    for case in METHOD_CASES:
        for ratio in RATIOS:
            reason = KNOWN_OVER.get((case.name, ratio))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(case, ratio, marks=marks, id=f"{case.name}-{ratio}"))
    return params


@pytest.mark.parametrize("case, ratio", _cases())
def test_divergence_from_full_cache_is_bounded(quality, case, ratio):
    kl = quality(case.name, case.make)[RATIOS.index(ratio)].item()
    assert kl <= BOUND[ratio], f"{case.name} at budget {ratio}: mean KL {kl:.3f} nats > {BOUND[ratio]}"


def test_a_broken_method_exceeds_the_bounds(quality):
    """StreamingLLM without attention sinks (measured 3.09 .. 0.97) is over every bound."""
    kl = quality("StreamingLLM-no-sinks", lambda b: StreamingLLM(budget=b, sinks=0))
    over = [r for r, x in zip(RATIOS, kl.tolist()) if x > BOUND[r]]
    assert over == list(RATIOS), f"KL {kl.tolist()} should exceed {BOUND}"


CHUNK = 64


@pytest.mark.parametrize("ratio", (0.05, 0.2))
def test_zsmerge_chunked_prefill_stays_within_the_bound(quality, ratio):
    """ZSMerge does not promise that a prompt fed in chunks keeps what one-shot prefill keeps (each chunk
    compresses before the next is seen; METHODS.md gives no chunked algorithm). The stated bound instead:
    the prompt fed in chunks of 64 tokens meets the same KL bound as one-shot prefill. Measured 2026-12-02
    (rank="shares", decay=1.0): 0.05: 0.54 one-shot / 0.51 chunked; 0.2: 0.18 / 0.16."""
    pre = quality.pre
    # as generate compresses a prompt fed in chunks: uniform layer budgets (`for_chunked_prefill`)
    method = ZSMerge(budget=max(1, int(ratio * len(quality.prompt)))).for_chunked_prefill()
    cache = method.make_cache(pre.model.config, [len(quality.prompt)], CONTINUATION, torch.float32, "cpu")
    ids = torch.tensor([quality.prompt])
    with torch.inference_mode():
        for start in range(0, ids.shape[1], CHUNK):
            pre.model(ids[:, start:start + CHUNK], torch.arange(start, min(start + CHUNK, ids.shape[1]))[None],
                      cache=cache)
    cache.end_prefill()
    kl = mean_kl(quality.full, decode_logits(pre, cache, quality.continuation)).item()
    assert kl <= BOUND[ratio], f"chunked ZSMerge at {ratio}: mean KL {kl:.3f} > {BOUND[ratio]}"
