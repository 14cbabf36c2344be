"""Pieces shared by the checkpoint converters.

- `staged_output_dir`: every converter writes into a hidden temporary sibling of the output directory and only
  moves the finished files into place at the end, so an interrupted conversion never looks like a finished one.
  An existing, non-empty output directory is refused unless `force=True`; with `force` only the files a
  converter writes (config, weights, tokenizer files) are replaced, nothing else in that directory is deleted.
- `ShardedSafetensorsWriter`: streams tensors into `model.safetensors` (or numbered shards plus an index when
  the model is larger than one shard), so a converter never holds more than one shard in memory.
- `ProgressBar`: a dependency-free progress bar on stderr.
- `interleaved_to_half` / `half_to_interleaved`: the q/k row permutation between interleaved RoPE pairs
  (Meta checkpoints and llama.cpp GGUF files) and the rotate-half layout of Hugging Face checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch

from kvzoo.errors import CheckpointError

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Everything a converter may write; `force=True` replaces exactly these in an existing output directory.
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
)
OUTPUT_GLOBS = ("model-*-of-*.safetensors",)
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
PARTIAL_MARKER = ".partial-"


# --------------------------------------------------------------------------------------------------------------
# Output directory handling


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """Refuse an output path that exists as a file, or as a non-empty directory unless `force` is set."""
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise CheckpointError(f"{out_dir}: output path exists and is not a directory; choose another output path")
        if not force and any(out_dir.iterdir()):
            raise CheckpointError(
                f"{out_dir}: output directory already exists and is not empty; "
                "pass force=True (--force on the command line) to overwrite the converted files in it"
            )
    return out_dir


def _remove_previous_outputs(out_dir: Path) -> None:
    for name in OUTPUT_FILES:
        path = out_dir / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    for pattern in OUTPUT_GLOBS:
        for path in out_dir.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, out_dir: Path, force: bool) -> None:
    # mkdtemp creates a private (0700) directory; give the results the permissions a normal write would.
    mask = _current_umask()
    for path in tmp.iterdir():
        path.chmod(0o666 & ~mask)
    tmp.chmod(0o777 & ~mask)
    if not out_dir.exists():
        try:
            os.rename(tmp, out_dir)  # atomic: the directory appears complete or not at all
            return
        except OSError:
            if not out_dir.is_dir():
                raise
            # Someone created it meanwhile: fall through and re-check it like any existing directory.
    check_out_dir(out_dir, force)
    _remove_previous_outputs(out_dir)
    for path in sorted(tmp.iterdir()):
        os.replace(path, out_dir / path.name)
    tmp.rmdir()


@contextmanager
def staged_output_dir(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out_dir` to write into; move its files to `out_dir` on success.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and `out_dir` is left
    untouched.
    """
    out_dir = check_out_dir(out_dir, force)
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{PARTIAL_MARKER}", dir=parent))
    except OSError as e:
        raise CheckpointError(f"{out_dir}: cannot create the output directory: {e}") from e
    try:
        yield tmp
        _publish(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# Weights


class ShardedSafetensorsWriter:
    """Collect tensors and write them as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json` once the total exceeds `max_shard_bytes`."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"internal error: tensor {name!r} written twice")
        self._names.add(name)
        tensor = tensor.detach().contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[str]:
        """Write what is left; return the file names written."""
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            os.replace(self._shards[0][0], self.directory / WEIGHTS_FILE)
            return [WEIGHTS_FILE]
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        names = []
        for i, (path, tensor_names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.directory / final)
            names.append(final)
            weight_map.update(dict.fromkeys(tensor_names, final))
        write_json(
            self.directory / WEIGHTS_INDEX_FILE,
            {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
        )
        return [*names, WEIGHTS_INDEX_FILE]


def interleaved_to_half(w: torch.Tensor, n_heads: int, what: str = "tensor") -> torch.Tensor:
    """Reorder the rows of a q or k projection (weight or bias) from interleaved RoPE pairs to rotate-half.

    Meta's reference code and llama.cpp rotate the pairs (x0, x1), (x2, x3), ... of each head; Hugging Face's
    rotate-half pairs x_i with x_{i + d/2}. Within each head, row 2i + j moves to row j * d/2 + i.
    """
    rows = w.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads):
        raise CheckpointError(f"{what}: {rows} rows cannot be split into {n_heads} heads of even size")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int, what: str = "tensor") -> torch.Tensor:
    """Inverse of `interleaved_to_half`."""
    rows = w.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads):
        raise CheckpointError(f"{what}: {rows} rows cannot be split into {n_heads} heads of even size")
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the spelling config.json uses for torch_dtype."""
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------------------
# Progress


class ProgressBar:
    """A small progress bar on stderr.

    On a terminal it redraws one line (at most ten times a second); otherwise (a log file) it prints a line
    at most every `log_every` seconds and one when closed, so logs show progress without being flooded.
    """

    log_every = 30.0

    def __init__(self, total: int, desc: str, enabled: bool = True, stream: TextIO | None = None,
                 width: int = 30) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.count = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._closed = False
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if self.enabled and self._tty:
            self._draw()

    def _line(self, note: str = "") -> str:
        frac = self.count / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.monotonic() - self.start
        line = f"{self.desc} |{bar}| {self.count}/{self.total} {elapsed:5.1f}s"
        return f"{line} {note}" if note else line

    def _draw(self, note: str = "") -> None:
        line = self._line(note)[:120]
        self.stream.write("\r" + line.ljust(120))
        self.stream.flush()
        self._last_draw = time.monotonic()

    def update(self, n: int = 1, note: str = "") -> None:
        self.count = min(self.count + n, self.total) if self.total else self.count + n
        if self.enabled and self._tty and (time.monotonic() - self._last_draw >= 0.1 or self.count >= self.total):
            self._draw(note)
        elif self.enabled and not self._tty and time.monotonic() - self._last_draw >= self.log_every:
            self.stream.write(self._line(note)[:160] + "\n")
            self.stream.flush()
            self._last_draw = time.monotonic()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._tty:
            self._draw()
            self.stream.write("\n")
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def llama_family_config(
    *,
    mistral: bool,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    norm_eps: float,
    rope_theta: float,
    context: int,
    vocab_size: int,
    tied: bool,
    sliding_window: int | None = None,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM / MistralForCausalLM checkpoint, as transformers writes it."""
    config: dict[str, Any] = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": norm_eps,
        "rope_theta": rope_theta,
        "max_position_embeddings": context,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        **extra,
    }
    if mistral:
        config["sliding_window"] = sliding_window
    else:
        config["attention_bias"] = attention_bias
        config["mlp_bias"] = mlp_bias
    return config
