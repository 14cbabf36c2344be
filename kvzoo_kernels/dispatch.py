"""Which implementation of a kernel runs: the torch reference or the Triton kernel.

Rule (the environment variable KVZOO_KERNELS, read once at import):
- `auto` (default): Triton for CUDA tensors when triton is installed, the torch reference otherwise;
- `torch`: always the torch reference (also on the CPU, where `auto` may take a fused torch fast path
  that computes the same statistic, e.g. kvzoo_kernels/column_sums_cpu.py);
- `triton`: always Triton, on any device. On CPU tensors this only works under the Triton interpreter
  (`TRITON_INTERPRET=1`), which is how the kernels are tested without a GPU.

triton is imported lazily, on the first Triton launch: importing kvzoo never imports it, and the CPU path
never touches it. Kernels are written as plain module-level functions that name `triton.language` as the
global `tl`; `triton_kernel` jit-compiles them on first launch (once per interpreter mode, because
`triton.jit` reads TRITON_INTERPRET when it decorates).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

ENV_VAR = "KVZOO_KERNELS"
MODES = ("auto", "torch", "triton")


def _mode_from_env() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(MODES)}")
    return mode


MODE = _mode_from_env()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def kernels_setting() -> str:
    """The KVZOO_KERNELS mode in force: auto, torch or triton."""
    return MODE


def use_triton(x: torch.Tensor) -> bool:
    """Whether a kernel whose main input is `x` runs as Triton (see the module docstring)."""
    if MODE == "auto":
        return x.is_cuda and HAS_TRITON
    return MODE == "triton"


def import_triton() -> tuple[Any, Any]:
    """(triton, triton.language), with a clear error when triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:
        raise ImportError(
            f"a Triton kernel was requested ({ENV_VAR}={MODE}, or CUDA tensors) but triton cannot be "
            f"imported: {exc}; install it (`pip install triton`) or set {ENV_VAR}=torch"
        ) from exc
    return triton, tl


def check_launchable(*tensors: torch.Tensor) -> None:
    """A Triton launch needs CUDA tensors, or CPU tensors under the interpreter: say so in one line."""
    triton, _ = import_triton()
    if all(t.is_cuda for t in tensors):
        return
    if not triton.knobs.runtime.interpret:
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"Triton kernel called on {', '.join(devices)} tensors: that needs CUDA tensors, or "
            f"TRITON_INTERPRET=1 for the Triton interpreter on CPU (set {ENV_VAR}=torch for the torch path)"
        )


class triton_kernel:  # noqa: N801 (used as a decorator, like triton.jit)
    """Decorator for a kernel function written against a module global `tl`: jitted on first launch.

    `kernel[grid](*args)` works as with `triton.jit`."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._jitted: dict[bool, Any] = {}

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        triton, tl = import_triton()
        interpret = bool(triton.knobs.runtime.interpret)
        jitted = self._jitted.get(interpret)
        if jitted is None:
            self.fn.__globals__["tl"] = tl  # the kernel module's `tl` placeholder becomes triton.language
            jitted = self._jitted[interpret] = triton.jit(self.fn)
        return jitted[grid]


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_size(n: int, minimum: int = 16, maximum: int | None = None) -> int:
    """A power-of-two tile size >= n (at least `minimum`: tl.dot needs every dim >= 16), capped."""
    size = max(minimum, next_power_of_2(n))
    return size if maximum is None else min(size, maximum)


def window_arg(window: int | None) -> int:
    """Kernels take the sliding window as an int; no window = a window wider than any position."""
    return 2**62 if window is None else int(window)
