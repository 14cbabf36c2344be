"""Compression methods by name, and the CLI's `name:key=value,...` spec strings."""

from __future__ import annotations

import dataclasses

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.compactor import Compactor
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
    "compactor": Compactor,
    "pyramidkv": PyramidKV,
    "tova": TOVA,
    "zsmerge": ZSMerge,
    "kvmerger": KVMerger,
    "zigzag": ZigZagKV,
}
# Other accepted names (compared after `normalise_name`); the class names themselves are always accepted.
ALIASES: dict[str, str] = {
    "none": "full",
    "streaming": "streamingllm",
    "snap": "snapkv",
    "pyramid": "pyramidkv",
    "zeromerge": "zsmerge",
}


def normalise_name(name: str) -> str:
    """Case-insensitive, `-` and `_` ignored: 'ZigZag-KV', 'zigzag_kv' and 'zigzagkv' are the same name."""
    return name.strip().lower().replace("-", "").replace("_", "")


def register(name: str, cls: type[CompressionMethod]) -> None:
    METHODS[normalise_name(name)] = cls


def method_class(name: str) -> type[CompressionMethod]:
    """The method called `name`: a key of METHODS, an alias or a class name, in any case, `-`/`_` ignored."""
    key = normalise_name(name)
    key = ALIASES.get(key, key)
    if key in METHODS:
        return METHODS[key]
    for cls in METHODS.values():
        if normalise_name(cls.__name__) == key:
            return cls
    raise KvzooError(f"unknown compression method {name.strip()!r}; accepted names: {accepted_names()}")


def accepted_names() -> str:
    """'full (FullCache, fullcache, none), ...': every method with its other accepted names."""
    parts = []
    for key, cls in METHODS.items():
        others = [cls.__name__] if normalise_name(cls.__name__) != key else []
        others += [alias for alias, target in ALIASES.items() if target == key]
        parts.append(f"{key} ({', '.join(others)})" if others else key)
    return ", ".join(parts) + " (case-insensitive; - and _ ignored)"


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
    """`zsmerge:budget=0.05,alpha=1` -> ZSMerge(budget=0.05, alpha=1). A bare name takes every default;
    `name.paper` starts from the paper's settings instead (`zsmerge.paper:budget=0.05` -> ZSMerge.paper(budget=0.05)).
    Names: see `method_class`; values: ints, floats, none, true/false, `(a;b)` tuples, else strings."""
    if not isinstance(spec, str) or not spec.strip():
        raise KvzooError(f"a compression spec is a non-empty string like 'zsmerge:budget=0.1', got {spec!r}")
    name = spec.partition(":")[0]
    name, dot, variant = name.partition(".")
    cls = method_class(name)
    make = cls
    if dot:
        make = getattr(cls, variant.strip(), None) if variant.strip() == "paper" else None
        if make is None:
            with_paper = sorted(key for key, c in METHODS.items() if hasattr(c, "paper"))
            raise KvzooError(f"compression spec {spec!r}: {cls.__name__} has no variant {variant.strip()!r}; "
                             f"'.paper' (the paper's settings) exists for {', '.join(with_paper)}")
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return make(**spec_fields(spec, (cls.__name__, fields)))


def spec_fields(spec: str, known: tuple[str, set[str]] | None = None) -> dict[str, object]:
    """The `key=value` settings a spec string gives, parsed ('zsmerge:alpha=1' -> {'alpha': 1}), item by item
    from the left; with `known` (the class name and its parameters) an unknown key is an error too. The name
    is not checked here (`parse_compression` does)."""
    kwargs: dict[str, object] = {}
    for item in filter(None, (a.strip() for a in spec.partition(":")[2].split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise KvzooError(f"compression spec {spec!r}: expected key=value, got {item!r}")
        if known is not None and key.strip() not in known[1]:
            raise KvzooError(
                f"compression spec {spec!r}: {known[0]} has no parameter {key.strip()!r}; "
                f"its parameters are {', '.join(sorted(known[1])) or 'none'}"
            )
        kwargs[key.strip()] = _value(value)
    return kwargs


def as_method(compression: "CompressionMethod | type[CompressionMethod] | str | None") -> CompressionMethod:
    """What every API taking `compression=` accepts: a method instance, a method class (its defaults), a spec
    string ('zsmerge:budget=0.1', 'ZigZagKV') or None (the full cache)."""
    if compression is None:
        return FullCache()
    if isinstance(compression, CompressionMethod):
        return compression
    if isinstance(compression, type) and issubclass(compression, CompressionMethod):
        return compression()
    if isinstance(compression, str):
        return parse_compression(compression)
    raise KvzooError(
        "compression must be a method such as ZSMerge(budget=0.1), a spec string such as 'zsmerge:budget=0.1', "
        f"or None (the full cache); got {compression!r}"
    )
