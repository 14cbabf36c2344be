"""The slot cache and the compression methods that manage it."""

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.full import FullCache
from kvzoo.cache.slots import KVCache, LayerSlots

__all__ = ["CompressionMethod", "FullCache", "KVCache", "LayerSlots"]
