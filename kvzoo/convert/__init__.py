"""Checkpoint converters into the Hugging Face layout (config.json + model.safetensors + tokenizer files)."""

from kvzoo.convert.gguf_to_hf import convert_gguf
from kvzoo.convert.meta_to_hf import convert_meta

__all__ = ["convert_gguf", "convert_meta"]
