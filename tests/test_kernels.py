"""Kernel dispatch (kvzoo_kernels.dispatch), and the Triton kernels against their torch references.

The kernels themselves are checked in tests/kernel_parity.py, run here in a fresh process under the
Triton interpreter (TRITON_INTERPRET=1 must be set before triton is first imported, and must not leak into
the other tests). triton is a test extra (`make test` installs it): a missing triton fails loudly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton  # noqa: F401 (fails loudly when the test extra is missing)

from kvzoo_kernels import dispatch
from kvzoo_kernels.decode_attention import decode_attention_triton

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (dispatch.ENV_VAR, "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_triton_kernels_equal_their_references_under_the_interpreter():
    """Every kernel (decode attention, chunked-prefill attention, window column scores, the fused ZSMerge
    update) and its custom op, on hypothesis-generated shapes, fp32 and fp16: tests/kernel_parity.py."""
    env = _clean_env() | {"TRITON_INTERPRET": "1", dispatch.ENV_VAR: "triton"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "kernel_parity.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, result.stdout[-2000:]


def test_kernel_mode_from_environment(monkeypatch):
    for value, mode in (("", "auto"), ("TORCH", "torch"), ("triton", "triton"), ("auto", "auto")):
        monkeypatch.setenv(dispatch.ENV_VAR, value)
        assert dispatch._mode_from_env() == mode
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="KVZOO_KERNELS='cuda': expected one of auto, torch, triton"):
        dispatch._mode_from_env()


def test_auto_mode_on_cpu_runs_the_reference_without_importing_triton():
    """The default dispatch on CPU tensors is the torch reference, and triton is never imported (kvzoo runs
    without it). A fresh process, since this one has imported triton."""
    script = (
        "import sys, torch\n"
        "from kvzoo_kernels import dispatch\n"
        "from kvzoo_kernels.decode_attention import decode_attention, decode_attention_reference\n"
        "import kvzoo\n"
        "assert dispatch.MODE == 'auto', dispatch.MODE\n"
        "q, k, b, kn = torch.randn(1, 2, 8), torch.randn(1, 1, 4, 8), torch.zeros(1, 1, 4), torch.randn(1, 1, 8)\n"
        "out, probs = decode_attention(q, k, k, b, kn, kn)\n"
        "ref, _ = decode_attention_reference(q, k, k, b, kn, kn)\n"
        "assert torch.equal(out, ref)\n"
        "assert 'triton' not in sys.modules, 'triton was imported on the CPU path'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=_clean_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_clear_errors_without_triton_or_without_a_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    with pytest.raises(ImportError, match="triton cannot be imported.*KVZOO_KERNELS=torch"):
        dispatch.import_triton()
    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 8)
    k = torch.randn(1, 1, 2, 8)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        decode_attention_triton(q, k, k, torch.zeros(1, 1, 2), q, q)
