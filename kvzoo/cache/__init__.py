"""The slot cache and the compression methods that manage it."""

from kvzoo.cache.base import CompressionMethod
from kvzoo.cache.compactor import Compactor
from kvzoo.cache.full import FullCache
from kvzoo.cache.h2o import H2O
from kvzoo.cache.kvmerger import KVMerger
from kvzoo.cache.pyramidkv import PyramidKV
from kvzoo.cache.slots import KVCache, LayerSlots
from kvzoo.cache.snapkv import SnapKV
from kvzoo.cache.streaming_llm import StreamingLLM
from kvzoo.cache.tova import TOVA
from kvzoo.cache.zigzag import ZigZagKV
from kvzoo.cache.zsmerge import ZSMerge

__all__ = [
    "CompressionMethod", "Compactor", "FullCache", "H2O", "KVCache", "KVMerger", "LayerSlots", "PyramidKV", "SnapKV",
    "StreamingLLM", "TOVA", "ZigZagKV", "ZSMerge",
]
