"""Mistral: the LLaMA architecture plus a sliding attention window (`sliding_window` in config.json).

The window is enforced by the shared attention code from `ModelConfig.sliding_window` (prefill masks and
decode alike); a `null` window means full attention. Everything else is LLaMA, so nothing is repeated here.
"""

from __future__ import annotations

from kvzoo.models.llama import Llama2


class Mistral(Llama2):
    """A Mistral decoder (`model_type: mistral`)."""

    family = "mistral"
