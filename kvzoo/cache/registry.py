"""Compression methods by name, and the CLI's `name:key=value,...` spec strings."""

from __future__ import annotations

import dataclasses

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.full import FullCache
from kvzoo.cache.h2o import H2O
from kvzoo.cache.kvmerger import KVMerger
from kvzoo.cache.pyramidkv import PyramidKV
from kvzoo.cache.snapkv import SnapKV
from kvzoo.cache.streaming_llm import StreamingLLM
from kvzoo.cache.tova import TOVA
from kvzoo.cache.zigzag import ZigZagKV
from kvzoo.cache.zsmerge import ZSMerge
from kvzoo.errors import KvzooError

METHODS: dict[str, type[CompressionMethod]] = {
    "full": FullCache,
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "tova": TOVA,
    "zsmerge": ZSMerge,
    "kvmerger": KVMerger,
    "zigzag": ZigZagKV,
}


def register(name: str, cls: type[CompressionMethod]) -> None:
    METHODS[name] = cls


def _value(text: str) -> object:
    """'512' -> 512, '0.05' -> 0.05, 'none' -> None, 'true'/'false' -> bool, '(0,1)' -> tuple, else the text."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if low.startswith("(") and low.endswith(")"):
        return tuple(_value(x) for x in low[1:-1].split(";") if x)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_compression(spec: str) -> CompressionMethod:
    """`zsmerge:budget=0.05,alpha=1` -> ZSMerge(budget=0.05, alpha=1). A bare name takes every default."""
    name, _, args = spec.partition(":")
    cls = METHODS.get(name.strip().lower())
    if cls is None:
        raise KvzooError(f"unknown compression method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    kwargs: dict[str, object] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise KvzooError(f"compression spec {spec!r}: expected key=value, got {item!r}")
        if key.strip() not in fields:
            raise KvzooError(
                f"compression spec {spec!r}: {cls.__name__} has no parameter {key.strip()!r}; "
                f"its parameters are {', '.join(sorted(fields)) or 'none'}"
            )
        kwargs[key.strip()] = _value(value)
    return cls(**kwargs)
