"""Budgets: turning a user's `budget` into slots, and the per-layer allocation rules (uniform, pyramid)."""

from __future__ import annotations

from kvzoo.errors import KvzooError

Budget = float | int


def check_budget(budget: Budget, method: str, name: str = "budget") -> None:
    """A float in (0, 1) is a ratio of the prompt length; an int >= 1 is a number of tokens per KV head."""
    if isinstance(budget, bool):
        raise KvzooError(f"{method}: {name} must be a float in (0, 1) or an int >= 1, got {budget!r}")
    if isinstance(budget, float):
        if not 0 < budget < 1:
            raise KvzooError(
                f"{method}: {name}={budget!r} is not a ratio in (0, 1); "
                "give a float in (0, 1) for a fraction of the prompt or an int >= 1 for tokens per KV head"
            )
    elif isinstance(budget, int):
        if budget < 1:
            raise KvzooError(f"{method}: {name}={budget!r} must be >= 1 token per KV head")
    else:
        raise KvzooError(f"{method}: {name} must be a float in (0, 1) or an int >= 1, got {budget!r}")


def budget_tokens(budget: Budget, prompt_len: int) -> int:
    """Slots per KV head for one sequence (a ratio is taken of its own prompt length, at least 1)."""
    if isinstance(budget, float):
        return max(1, int(budget * prompt_len))
    return budget


def part_tokens(part: Budget, whole: int) -> int:
    """A sub-budget (e.g. ZSMerge's proximity part): a float is a fraction of `whole`, an int is absolute."""
    return int(part * whole) if isinstance(part, float) else part


def require_at_least(method: str, budget: int, fixed: int, what: str, prompt_len: int) -> None:
    if budget < fixed:
        raise KvzooError(
            f"{method}: the budget resolves to {budget} slots per KV head for a {prompt_len}-token prompt, "
            f"smaller than its fixed part ({what} = {fixed}); raise the budget"
        )


def pyramid_budgets(avg_capacity: int, window: int, prompt_len: int, num_layers: int, beta: float) -> list[int]:
    """PyramidKV: per-layer token budgets (window included), largest at layer 0, arithmetic decrease.

    With c = avg_capacity - window selectable tokens on average: min = c / beta, max = 2c - min, capped at
    the prompt's selectable length (then min = 2c - max). The mean over layers stays avg_capacity
    (up to integer rounding).
    """
    c = avg_capacity - window
    if c <= 0 or num_layers == 1:
        return [avg_capacity] * num_layers
    low = c / beta
    high = 2 * c - low
    if high >= prompt_len - window:
        high = prompt_len - window
        low = 2 * c - high
    steps = [high - layer * (high - low) / (num_layers - 1) for layer in range(num_layers)]
    return [int(round(s)) + window for s in steps]
