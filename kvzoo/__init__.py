"""kvzoo: minimal LLaMA-2, Mistral and Falcon with KV-cache compression inside the attention layer."""

from kvzoo.cache import CompressionMethod, FullCache, KVCache
from kvzoo.loading import load
from kvzoo.models import Falcon, Llama2, Mistral

__all__ = ["CompressionMethod", "Falcon", "FullCache", "KVCache", "Llama2", "Mistral", "load"]
__version__ = "0.1.0"
