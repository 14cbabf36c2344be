"""kvzoo: minimal LLaMA-2, Mistral and Falcon with KV-cache compression inside the attention layer."""

from kvzoo.cache import (
    H2O,
    TOVA,
    CompressionMethod,
    FullCache,
    KVCache,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    ZSMerge,
)
from kvzoo.generate import generate_ids, generate_text
from kvzoo.loading import load
from kvzoo.models import Falcon, Llama2, Mistral

__all__ = [
    "H2O", "TOVA", "CompressionMethod", "Falcon", "FullCache", "KVCache", "Llama2", "Mistral", "PyramidKV",
    "SnapKV", "StreamingLLM", "ZSMerge", "generate_ids", "generate_text", "load",
]
__version__ = "0.1.0"
