"""The slot cache: one fixed-capacity store per layer that expresses eviction and merging alike.

Every slot holds one key/value pair and three small statistics. A slot can stand for several original tokens
(a merged slot), which attention honours through the bias `alpha * logw`. Empty slots have `logw = -inf` and
`pos = -1`, so no lengths or masks are needed: padding and unused capacity are simply empty slots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

NEG_INF = float("-inf")


def attention_bias(logw: torch.Tensor, alpha: float) -> torch.Tensor:
    """Additive attention bias of slots or candidates: alpha * logw where filled, -inf where empty.

    Empties are selected explicitly: with alpha = 0, 0 * -inf would be NaN.
    """
    filled = torch.isfinite(logw)
    return torch.where(filled, alpha * torch.where(filled, logw, 0.0), NEG_INF)


def allocate_stores(
    budgets: list[torch.Tensor],
    capacities: list[int],
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[list["SlotStack"], list["LayerSlots"]]:
    """Empty stores for len(budgets) layers (budgets[l]: [B] slots per sequence, capacities[l] slots per row).
    Layers of equal capacity are allocated as one (`SlotStack`: the i-th of its layers has rows i*B ..
    (i+1)*B - 1 of the stack's tensors); a layer whose capacity no other layer has gets its own tensors."""
    batch = budgets[0].shape[0]
    layers: list[LayerSlots | None] = [None] * len(budgets)
    stacks = []
    for capacity in dict.fromkeys(capacities):  # each capacity once, in layer order
        members = [i for i, c in enumerate(capacities) if c == capacity]
        if len(members) == 1:
            layers[members[0]] = LayerSlots.empty(batch, kv_heads, capacity, head_dim, budgets[members[0]], dtype,
                                                  device)
            continue
        whole = LayerSlots.empty(len(members) * batch, kv_heads, capacity, head_dim,
                                 torch.cat([budgets[i] for i in members]), dtype, device)
        for row, i in enumerate(members):
            layers[i] = LayerSlots(*(t[row * batch:(row + 1) * batch] for t in (*whole.fields(), whole.budget)))
        views = tuple((*layers[i].fields(), layers[i].budget) for i in members)  # type: ignore[union-attr]
        stacks.append(SlotStack(*whole.fields(), whole.budget, views=views, layer_ids=tuple(members)))
    return stacks, layers  # type: ignore[return-value]


def pad_slot_state(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """Per-slot state [B, Hkv, C'] padded to `capacity` slots as empty slots hold it (0; -1 for integer
    positions); any other state as it is."""
    if t.dim() != 3 or t.shape[-1] >= capacity:
        return t
    return torch.nn.functional.pad(t, (0, capacity - t.shape[-1]), value=0 if t.is_floating_point() else -1)


def _repeat_rows(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """A copy of x with each row (first dimension) repeated `repeats` times in place."""
    return x.repeat_interleave(repeats, dim=0) if repeats > 1 else x.clone()


@dataclass
class SlotStack:
    """The stores of layers of one capacity as one allocation of L' * B rows: the i-th layer's k is
    k[i*B:(i+1)*B] (likewise v, logw, score, pos). A decode update that treats rows alike then runs once per step
    for all layers instead of once per layer (`KVCache.stacked_groups`, `CompressionMethod.decode_step_rowwise`):
    the same arithmetic in ~30x fewer, larger tensor ops, which is what eager decode on a CPU pays for."""

    k: torch.Tensor  # [L * B, Hkv, C, D]
    v: torch.Tensor
    logw: torch.Tensor  # [L * B, Hkv, C]
    score: torch.Tensor
    pos: torch.Tensor
    budget: torch.Tensor  # [L * B]
    views: tuple[tuple[torch.Tensor, ...], ...]  # per layer, the (k, v, logw, score, pos, budget) views handed out
    layer_ids: tuple[int, ...]  # the layers whose stores they are, in row order


@dataclass
class LayerSlots:
    k: torch.Tensor  # [B, Hkv, C, D] post-RoPE keys (a merged slot: the count-weighted mean of its members)
    v: torch.Tensor  # [B, Hkv, C, D] values
    # [B, Hkv, C] fp32: log(tokens the slot stands for, or KVMerger's attention count); 0 = one; -inf = empty
    logw: torch.Tensor
    score: torch.Tensor  # [B, Hkv, C] fp32: the method's importance statistic (accumulated/decayed attention)
    pos: torch.Tensor  # [B, Hkv, C] int64: position of the slot's token (representative one if merged); -1 empty
    budget: torch.Tensor  # [B] int64: slots sequence b may fill (<= C); the rest stay empty
    # Method-specific state, e.g. ZSMerge's region sizes; counted in nbytes(). Each entry is per sequence
    # (first dimension B, e.g. "prompt_len" [B]), per slot ([B, Hkv, C], e.g. ZSMerge's standing; a fork that
    # grows the store pads it as empty slots are, `pad_slot_state`) or shared (0-dim): `fork` relies on it.
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(
        cls,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        budget: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> "LayerSlots":
        shape = (batch, kv_heads, capacity)
        return cls(
            k=torch.zeros(*shape, head_dim, dtype=dtype, device=device),
            v=torch.zeros(*shape, head_dim, dtype=dtype, device=device),
            logw=torch.full(shape, NEG_INF, dtype=torch.float32, device=device),
            score=torch.zeros(shape, dtype=torch.float32, device=device),
            pos=torch.full(shape, -1, dtype=torch.int64, device=device),
            budget=budget.to(device=device, dtype=torch.int64),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def filled(self) -> torch.Tensor:
        """[B, Hkv, C] bool: which slots hold something."""
        return torch.isfinite(self.logw)

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v, logw, score, pos): what every slot holds."""
        return self.k, self.v, self.logw, self.score, self.pos

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.logw, self.score, self.pos, self.budget, *self.state.values()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def slot_bias(self, alpha: float) -> torch.Tensor:
        """[B, Hkv, C] additive attention bias of the slots (see `attention_bias`)."""
        return attention_bias(self.logw, alpha)

    def write(
        self,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        logw: torch.Tensor,
        score: torch.Tensor,
        pos: torch.Tensor,
    ) -> None:
        """Overwrite one slot per (batch, head): index [B, Hkv]; k, v [B, Hkv, D]; logw, score, pos [B, Hkv].

        Written in place with `index_put_`: under torch.compile inductor turns it back into an in-place
        store into the graph input (a `scatter_` there is functionalized into a copy of the whole store)."""
        rows = self._rows(index)
        self.k.index_put_(rows, k.to(self.k.dtype))
        self.v.index_put_(rows, v.to(self.v.dtype))
        self.logw.index_put_(rows, logw.to(self.logw.dtype))
        self.score.index_put_(rows, score.to(self.score.dtype))
        self.pos.index_put_(rows, pos.to(self.pos.dtype))

    def _rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advanced-indexing triple (batch [B, 1], head [1, Hkv], slot [B, Hkv]) for one slot per (b, h)."""
        b, hkv = index.shape
        batch = torch.arange(b, device=index.device)[:, None]
        head = torch.arange(hkv, device=index.device)[None, :]
        return batch, head, index

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The contents (k, v, logw, score, pos) of one slot per (batch, head); index [B, Hkv]."""
        rows = self._rows(index)
        return self.k[rows], self.v[rows], self.logw[rows], self.score[rows], self.pos[rows]

    def fork_budget(self, headroom: int, repeats: int) -> torch.Tensor:
        """[B * repeats] this store's budget for a copy with `headroom` more slots per row and every sequence
        repeated `repeats` times (`KVCache.fork`)."""
        return _repeat_rows(self.budget, repeats) + headroom

    def fork_into(self, new: "LayerSlots", repeats: int) -> None:
        """Fill the empty store `new` (capacity >= this one's, B * repeats rows, its own budget) with this
        store's slots and state, every sequence repeated `repeats` times (`KVCache.fork`)."""
        b, _, c, _ = self.k.shape
        for mine, theirs in zip(self.fields(), new.fields()):
            theirs[:, :, :c] = _repeat_rows(mine, repeats)
        new.state = {name: pad_slot_state(_repeat_rows(t, repeats), new.capacity) if t.dim() > 0 and t.shape[0] == b
                     else t.clone() for name, t in self.state.items()}

    def replace_all(self, k: torch.Tensor, v: torch.Tensor, logw: torch.Tensor, score: torch.Tensor,
                    pos: torch.Tensor) -> None:
        """Overwrite the first n slots with the given [B, Hkv, n(, D)] contents and empty the rest."""
        n = k.shape[2]
        if n > self.capacity:
            raise ValueError(f"{n} slots given for a cache of capacity {self.capacity}")
        self.k[:, :, :n] = k
        self.v[:, :, :n] = v
        self.logw[:, :, :n] = logw
        self.score[:, :, :n] = score
        self.pos[:, :, :n] = pos
        self.logw[:, :, n:] = NEG_INF
        self.score[:, :, n:] = 0.0
        self.pos[:, :, n:] = -1


@dataclass
class KVCache:
    """The whole model's cache: one LayerSlots per layer, plus the method that manages them."""

    layers: list[LayerSlots]
    method: "object"  # kvzoo.cache.base.CompressionMethod (untyped here to avoid an import cycle)
    # Host-side count of positions fed so far, padding included (= the largest of `lengths` once fed).
    tokens_seen: int = 0
    # Per sequence: positions fed so far, i.e. the position the next token of that sequence takes.
    lengths: list[int] = field(default_factory=list)
    # What the cache belongs to (model config, tokenizer fingerprint; see `kvzoo.cache.io.model_origin`),
    # set when a model builds it; written into the header by `save`.
    origin: dict[str, Any] = field(default_factory=dict)
    # Host-side: the largest position the planned generation reaches (prompt + new tokens); the model's
    # RoPE table is grown to cover it before the first step, so decode steps never read past it.
    max_position: int = 0
    # The allocations the layers' stores are views of (`allocate_stores`: one per capacity that several layers
    # share); layers a method replaces later (e.g. at `end_prefill`) simply stop being part of it (see
    # `stacked_groups`).
    stacks: list[SlotStack] = field(default_factory=list)
    # [B, n_pos] each prompt token's surprisal -log p(token | the tokens before it), by position (0 at the first
    # and at padding), when the method reads it (`reads_prompt_surprisal`); set by the model's prefill.
    prompt_surprisal: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].k.device

    @torch.inference_mode()
    def fork(self, headroom: int = 0, batch: int | None = None) -> "KVCache":
        """A private copy to continue from, leaving this cache untouched: `headroom` more slots per (sequence,
        KV head) for tokens appended later (prefill-only methods need them; decode-time methods keep their
        size with 0), and, with `batch`, a one-sequence cache repeated into `batch` sequences (a cache of
        `batch` sequences is copied as is)."""
        from kvzoo.errors import KvzooError

        b = self.batch_size
        batch = b if batch is None else batch
        if batch != b and b != 1:
            raise KvzooError(
                f"a cache of {b} sequences cannot continue {batch} prompts: give one prompt per cached sequence, "
                "or use a cache of one sequence, which is shared by every prompt")
        if isinstance(headroom, bool) or not isinstance(headroom, int) or headroom < 0:
            raise KvzooError(f"fork: headroom must be an integer >= 0, got {headroom!r}")
        repeats = batch // b
        first = self.layers[0]
        stacks, layers = allocate_stores([layer.fork_budget(headroom, repeats) for layer in self.layers],
                                        [layer.capacity + headroom for layer in self.layers], first.k.shape[1],
                                        first.k.shape[3], first.k.dtype, first.k.device)
        for mine, new in zip(self.layers, layers):
            mine.fork_into(new, repeats)
        return KVCache(
            layers=layers,
            method=self.method,
            tokens_seen=self.tokens_seen,
            lengths=[n for n in self.lengths for _ in range(repeats)],
            origin=self.origin,
            stacks=stacks,
        )

    def end_prefill(self) -> None:
        """The method's end of prefill, which may replace layers (e.g. with smaller stores); the stacks they left
        are then let go, so that the memory of the stores they replaced is released."""
        self.method.end_prefill(self)  # type: ignore[attr-defined]
        self.stacks = [stack for stack in self.stacks if self._holds(stack)]

    def _holds(self, stack: SlotStack) -> bool:
        """Whether the stack's layers are still its views, with the same per-sequence state names (host-side
        identity checks only, no tensor op)."""
        members = [self.layers[i] for i in stack.layer_ids if i < len(self.layers)]
        if len(members) != len(stack.views):
            return False
        names = list(members[0].state)
        for layer, views in zip(members, stack.views):
            if not all(mine is theirs for mine, theirs in zip((*layer.fields(), layer.budget), views)):
                return False
            if list(layer.state) != names or any(t.dim() == 0 for t in layer.state.values()):
                return False
        return True

    def is_stacked(self) -> bool:
        """Whether every layer is a row block of one stack (`stacked_groups` is then a single group)."""
        return len(self.stacks) == 1 and len(self.stacks[0].layer_ids) == len(self.layers) and \
            self._holds(self.stacks[0])

    def stacked_groups(self, slot_state: tuple[str, ...] = ()) -> list[tuple[tuple[int, ...], LayerSlots]] | None:
        """The layers as groups that one decode update can treat as rows: each stack's layers as one LayerSlots
        of L' * B rows, layer-major (row i * B + b is sequence b of its i-th layer; per-sequence counters [B]
        concatenated likewise, and of the per-slot state only the entries named in `slot_state`, which the
        method's decode step reads: the rest, such as a later chunk's ranking state, would be copied every step
        for nothing), and every other layer alone (its own store); with the layer ids of each. None when no
        stack holds its layers any more (nothing to batch). Writes to a group's slots and budget are writes to
        the layers'; a stacked group's state is a copy (read-only)."""
        held = [stack for stack in self.stacks if self._holds(stack)]
        if not held:
            return None
        groups: list[tuple[tuple[int, ...], LayerSlots]] = []
        for stack in held:
            members = [self.layers[i] for i in stack.layer_ids]
            groups.append((stack.layer_ids, LayerSlots(
                stack.k, stack.v, stack.logw, stack.score, stack.pos, stack.budget,
                state={name: torch.cat([layer.state[name] for layer in members])
                       for name, first in members[0].state.items() if first.dim() == 1 or name in slot_state})))
        stacked = {i for ids, _ in groups for i in ids}
        groups += [((i,), layer) for i, layer in enumerate(self.layers) if i not in stacked]
        return groups

    def save(self, path: "str | os.PathLike[str]", notes: dict[str, Any] | None = None) -> None:
        """Write this cache to a safetensors file with a header saying what it belongs to; `notes` (JSON
        values) are stored alongside. Load it with `kvzoo.load_cache(path, model)`."""
        from kvzoo.cache.io import save_cache

        save_cache(self, path, notes)

    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache."""
        return sum(layer.nbytes() for layer in self.layers)

    def budgets(self) -> torch.Tensor:
        """[L, B] slots each sequence may use per KV head, per layer."""
        return torch.stack([layer.budget for layer in self.layers])

    def filled_slots(self) -> torch.Tensor:
        """[L, B, Hkv] slots currently filled."""
        return torch.stack([layer.filled.sum(-1) for layer in self.layers])
