"""The model families, by the family name `ModelConfig.family` carries."""

from kvzoo.models.base import CausalLM
from kvzoo.models.falcon import Falcon
from kvzoo.models.llama import Llama2
from kvzoo.models.mistral import Mistral

FAMILIES: dict[str, type[CausalLM]] = {"llama": Llama2, "mistral": Mistral, "falcon": Falcon}

__all__ = ["CausalLM", "Falcon", "Llama2", "Mistral", "FAMILIES"]
