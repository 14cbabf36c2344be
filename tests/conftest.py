"""Shared fixtures: tiny random Hugging Face models saved as safetensors checkpoints (the parity oracle), and
kvzoo models loaded from them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import kvzoo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `make test`: share the cores between the workers
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

VOCAB = 128

# name -> (transformers config class name, kwargs). Every layout the issue lists, kept tiny (2 layers).
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama-gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mha-tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-headdim-theta": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, rope_theta=100000.0, attention_bias=True),
    ),
    "mistral-window": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5)),
    "mistral-nowindow": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "falcon-7b-style": ("FalconConfig", dict(num_attention_heads=4, multi_query=True, parallel_attn=True)),
    "falcon-40b-style": (
        "FalconConfig",
        dict(num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, bias=False),
    ),
    "falcon-mha": ("FalconConfig", dict(num_attention_heads=4, multi_query=False, parallel_attn=False, bias=True)),
}
FAMILY_OF = {"LlamaConfig": "Llama2", "MistralConfig": "Mistral", "FalconConfig": "Falcon"}


def build_hf_model(name: str, seed: int = 0, **overrides):
    """A tiny random transformers model for one of TINY_CONFIGS (fp32, eval mode)."""
    import transformers

    cls_name, kwargs = TINY_CONFIGS[name]
    base = dict(hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256)
    if cls_name != "FalconConfig":
        base["intermediate_size"] = 96
    config = getattr(transformers, cls_name)(**{**base, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init leaves norms at 1/0; perturb every parameter so a wrong layout cannot pass by symmetry.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[[str], tuple[object, Path]]:
    """name -> (transformers model, directory holding its save_pretrained safetensors checkpoint)."""
    made: dict[str, tuple[object, Path]] = {}

    def get(name: str) -> tuple[object, Path]:
        if name not in made:
            model = build_hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, safe_serialization=True)
            made[name] = (model, path)
        return made[name]

    return get


@pytest.fixture(scope="module")
def models(tiny_checkpoint) -> Callable[[str], object]:
    """name -> the kvzoo model loaded from that tiny checkpoint (once per test module)."""
    loaded: dict[str, object] = {}

    def get(name: str) -> object:
        if name not in loaded:
            loaded[name] = kvzoo.load(tiny_checkpoint(name)[1])
        return loaded[name]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """The models are tiny: with several threads on a busy 2-core machine each matmul waits on the others. A
    module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`; its threads come back after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
