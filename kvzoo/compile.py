"""torch.compile for the decode step, made worth turning on.

- Regional compilation: one compiled function runs every decoder block (`compiled_block_runner`). The
  blocks of a model share their code, so it is traced and compiled once, not once per layer: the layer's
  store comes in through `ForwardContext.slots`, never through a layer number.
- The store capacity C is a symbolic dimension of that graph (`mark_capacity_dynamic`): every layer
  (PyramidKV and ZigZagKV give layers different capacities) and every prompt length reuse the same graph.
  This replaces rounding capacities up to buckets: no padding slots to attend over, no recompiles at all.
- Slot writes stay in place in the compiled graph: `LayerSlots.write` uses `index_put_`, which inductor
  re-inplaces into the graph input, and inductor's `reorder_for_locality` pass is off for this graph (it
  moves the write before the attention's read of the old store, which forces a copy of the whole store).
- The inductor cache lives under the user's cache dir (`inductor_cache_dir`), so a second run is warm.
- `compile=None` (the default) compiles when the generation is long enough to pay for it (`should_compile`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kvzoo.cache.slots import KVCache
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.attention import ForwardContext

# How a decoder block is run: (block, hidden [B, T, H], per-layer context) -> hidden. The default calls the
# block; `compiled_block_runner` is one compiled function shared by every layer (regional compilation).
BlockRunner = Callable[[nn.Module, torch.Tensor, "ForwardContext"], torch.Tensor]


def call_block(block: nn.Module, x: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
    return block(x, ctx)

# compile=None compiles the decode step when at least this many tokens are generated: a warm start (graph
# tracing plus loading cached kernels) costs a few seconds, which this many faster steps pay back; a cold
# first compile costs more, once per machine.
AUTO_COMPILE_MIN_NEW_TOKENS = 1024
CAPACITY_DIM = 2  # k, v [B, Hkv, C, D]; logw, score, pos [B, Hkv, C]

_compiled_block: BlockRunner | None = None


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled kernels: $TORCHINDUCTOR_CACHE_DIR if set, else
    $XDG_CACHE_HOME/kvzoo/inductor (default ~/.cache/kvzoo/inductor)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kvzoo" / "inductor"


def check_compile(compile: object, where: str) -> bool | None:
    """`compile` as every API takes it (True, False or None: automatic), or a KvzooError naming `where`."""
    if compile is not None and not isinstance(compile, bool):
        raise KvzooError(f"{where}: compile must be True, False or None, got {compile!r}")
    return compile


def should_compile(compile: bool | None, max_new_tokens: int) -> bool:
    """The documented rule: an explicit True/False wins; None compiles from AUTO_COMPILE_MIN_NEW_TOKENS on."""
    check_compile(compile, "generate")
    if compile is None:
        return max_new_tokens >= AUTO_COMPILE_MIN_NEW_TOKENS
    return bool(compile)


def compiled_block_runner() -> BlockRunner:
    """The compiled decoder-block runner, created once per process; its graphs serve every model and layer
    whose block code, dtypes and static shapes match."""
    global _compiled_block
    if _compiled_block is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
        _compiled_block = torch.compile(
            call_block, fullgraph=True, dynamic=False, options={"reorder_for_locality": False}
        )
    return _compiled_block


def mark_capacity_dynamic(cache: KVCache) -> None:
    """Make the capacity of every layer's store a symbolic size for the compiled block, in the slots and in
    the per-slot state a decode step may read (e.g. ZSMerge's standing) (call before the first compiled
    decode step; tensors replaced later, e.g. by `end_prefill` or a later prompt, must be marked again)."""
    for slots in cache.layers:
        per_slot = [t for t in slots.state.values() if t.dim() == 3 and t.shape[CAPACITY_DIM] == slots.capacity]
        for t in (slots.k, slots.v, slots.logw, slots.score, slots.pos, *per_slot):
            if hasattr(t, "_dynamo_weak_dynamic_indices"):
                continue  # marked already
            if t.shape[CAPACITY_DIM] > 1:  # sizes 0 and 1 are always specialised by torch.compile
                torch._dynamo.maybe_mark_dynamic(t, CAPACITY_DIM)
