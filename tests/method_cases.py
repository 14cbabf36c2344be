"""One list of compression-method cases driving the shared method tests (full-budget parity, batch equals
alone, memory, compiled equals eager, quality on the real model), like kvpress' `default_presses`.

Each case builds its method for a budget (ratio of the prompt or tokens per KV head) at the method's
defaults, except where a default cannot fit the small prompts of the tests (noted per case). Adding a
method to kvzoo means adding one line here; every shared test then covers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvzoo.cache import H2O, TOVA, Compactor, KVMerger, PyramidKV, SnapKV, StreamingLLM, ZigZagKV, ZSMerge
from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.budgets import Budget


@dataclass(frozen=True)
class MethodCase:
    name: str
    make: Callable[[Budget], CompressionMethod]
    constant_memory: bool  # compresses while decoding (memory fixed), else prefill-only (appends)

    def __repr__(self) -> str:
        return self.name


def _window(budget: Budget, default: int) -> int:
    """The observation window a prefill-only method can use at an integer budget: its default when it
    leaves room for selected tokens, else half the budget (tiny test prompts, 2% of a short prompt)."""
    return default if not isinstance(budget, int) or budget > default else max(1, budget // 2)


METHOD_CASES: list[MethodCase] = [
    MethodCase("StreamingLLM", lambda b: StreamingLLM(budget=b), constant_memory=True),
    MethodCase("H2O", lambda b: H2O(budget=b), constant_memory=True),
    MethodCase("TOVA", lambda b: TOVA(budget=b), constant_memory=True),
    MethodCase("ZSMerge", lambda b: ZSMerge(budget=b), constant_memory=True),
    MethodCase("ZSMerge-uniform", lambda b: ZSMerge(budget=b, layer_budgets="uniform"), constant_memory=True),
    MethodCase("ZSMerge-copy-reads", lambda b: ZSMerge(budget=b, copy_reads=9), constant_memory=True),
    MethodCase("SnapKV", lambda b: SnapKV(budget=b, window_size=_window(b, 32)), constant_memory=False),
    MethodCase("PyramidKV", lambda b: PyramidKV(budget=b, window_size=_window(b, 8)), constant_memory=False),
    MethodCase("ZigZagKV", lambda b: ZigZagKV(budget=b, window_size=_window(b, 8)), constant_memory=False),
    # Sinks and recent tokens shrink like a window at the tests' small integer budgets.
    MethodCase("Compactor", lambda b: Compactor(budget=b, sinks=_window(b, 8), recent=_window(b, 4)),
               constant_memory=False),
    MethodCase("KVMerger", lambda b: KVMerger(budget=b), constant_memory=False),
    MethodCase("KVMerger-uniform", lambda b: KVMerger(budget=b, layer_budgets="uniform"), constant_memory=False),
]
CASES_BY_NAME = {c.name: c for c in METHOD_CASES}
DECODE_TIME = [c for c in METHOD_CASES if c.constant_memory]
PREFILL_ONLY = [c for c in METHOD_CASES if not c.constant_memory]
