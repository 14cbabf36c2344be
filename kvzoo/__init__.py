"""kvzoo: minimal LLaMA-2, Mistral and Falcon with KV-cache compression inside the attention layer."""

from kvzoo.cache import (
    H2O,
    TOVA,
    Compactor,
    KVMerger,
    CompressionMethod,
    FullCache,
    KVCache,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    ZigZagKV,
    ZSMerge,
)
from kvzoo.cache.io import load_cache
from kvzoo.conversation import Conversation
from kvzoo.generate import generate_ids, generate_text
from kvzoo.models import Falcon, Llama2, Mistral, load

__all__ = [
    "H2O", "TOVA", "Compactor", "CompressionMethod", "Falcon", "FullCache", "KVCache", "KVMerger", "Llama2", "Mistral", "PyramidKV",
    "SnapKV", "StreamingLLM", "ZigZagKV", "ZSMerge", "Conversation", "generate_ids", "generate_text", "load",
    "load_cache",
]
__version__ = "0.1.0"
