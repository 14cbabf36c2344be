"""Checkpoint loading: sharded files, and every bad input gives an error naming the file/key/value at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kvzoo
from kvzoo.errors import CheckpointError, ConfigError


@pytest.fixture
def llama_dir(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny LLaMA checkpoint that a test may damage."""
    _, src = tiny_checkpoint("llama-gqa")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def test_sharded_checkpoint_loads(tmp_path):
    from tests.conftest import build_hf_model

    ref = build_hf_model("llama-gqa")
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = kvzoo.load(tmp_path)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4


def test_missing_key_is_named(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        kvzoo.load(llama_dir)


def test_unexpected_key_is_named(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.extra\.weight.*model\.safetensors"):
        kvzoo.load(llama_dir)


def test_wrong_shape_names_key_and_both_shapes(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'model\.norm\.weight'.*\[65\].*expected \[64\]"):
        kvzoo.load(llama_dir)


def test_truncated_file_is_reported(llama_dir):
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupted"):
        kvzoo.load(llama_dir)


def test_corrupted_header_is_reported(llama_dir):
    path = llama_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json!!!!"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        kvzoo.load(llama_dir)


def test_missing_shard_is_named(tmp_path):
    from tests.conftest import build_hf_model

    build_hf_model("llama-gqa").save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        kvzoo.load(tmp_path)


def test_no_weights_file(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        kvzoo.load(llama_dir)


def test_missing_config(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        kvzoo.load(llama_dir)


def test_config_missing_field(llama_dir):
    _edit_config(llama_dir, num_hidden_layers=...)
    with pytest.raises(ConfigError, match=r"config\.json: missing required field 'num_hidden_layers'"):
        kvzoo.load(llama_dir)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", "64", r"'hidden_size' must be an integer >= 1, got '64'"),
        ("num_key_value_heads", 3, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
        ("rms_norm_eps", -1, r"'rms_norm_eps' must be a positive number, got -1"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, r"rope scaling type 'yarn' is not implemented"),
    ],
)
def test_config_invalid_field(llama_dir, field, value, message):
    _edit_config(llama_dir, **{field: value})
    with pytest.raises(ConfigError, match=message):
        kvzoo.load(llama_dir)


def test_invalid_json_config(llama_dir):
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        kvzoo.load(llama_dir)


def test_unknown_model_type(llama_dir):
    _edit_config(llama_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match=r"unknown model_type 'gpt2'.*supports"):
        kvzoo.load(llama_dir)


def test_family_is_read_from_architectures_when_model_type_is_absent(llama_dir):
    _edit_config(llama_dir, model_type=...)
    assert type(kvzoo.load(llama_dir)) is kvzoo.Llama2


def test_wrong_family_class_is_refused(llama_dir):
    with pytest.raises(ConfigError, match=r"llama checkpoint, not falcon"):
        kvzoo.Falcon.from_pretrained(llama_dir)


def test_falcon_alibi_is_refused(tiny_checkpoint, tmp_path):
    _, src = tiny_checkpoint("falcon-7b-style")
    shutil.copytree(src, tmp_path / "f")
    _edit_config(tmp_path / "f", alibi=True)
    with pytest.raises(ConfigError, match=r"alibi=true are not supported"):
        kvzoo.load(tmp_path / "f")


def test_falcon_legacy_config_names(tiny_checkpoint, tmp_path):
    """RW-era configs spell the sizes n_head / n_layer / n_embed; they must load to the same model."""
    ref, src = tiny_checkpoint("falcon-7b-style")
    dst = tmp_path / "legacy"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    legacy = {"hidden_size": "n_embed", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
    for new, old in legacy.items():
        cfg[old] = cfg.pop(new)
    cfg["model_type"] = "RefinedWebModel"
    (dst / "config.json").write_text(json.dumps(cfg))
    model = kvzoo.load(dst)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"does-not-exist: no such checkpoint directory \(does not exist"):
        kvzoo.load(tmp_path / "does-not-exist")


@pytest.mark.parametrize("text", [
    "weights/smollm2-135m",  # its first component `weights/` exists here: a mistyped path, not an owner
    "./weights/smollm2", "~/no-such-kvzoo-dir", "/no/such/dir", "a/b/c", "no-slash", "spaces in/name", "org/..",
])
def test_a_path_that_does_not_exist_says_so_in_one_line_without_the_hub(tmp_path, monkeypatch, text):
    """The path rule (loading.hub_id_or_none): nothing that looks like a path goes to the hub, offline or not."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(CheckpointError) as err:
        kvzoo.load(text)
    expected = f"{text}: no such checkpoint directory (does not exist, and it is not a hub id 'owner/name')"
    assert str(err.value) == expected


def test_a_plausible_hub_id_goes_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.chdir(tmp_path)  # no `someone/` directory here
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda hub_id, **k: asked.append(hub_id) or "/nope")
    with pytest.raises(ConfigError, match="/nope: config.json not found"):  # what the fake download returned
        kvzoo.load("someone/some-model")
    assert asked == ["someone/some-model"]


def test_hub_id_offline_names_the_id_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"someone/some-model: not a local directory, and fetching it from the "
                                              r"Hugging Face hub failed") as err:
        kvzoo.load("someone/some-model")
    assert "\n" not in str(err.value)


def test_dtype_argument(llama_dir):
    model = kvzoo.load(llama_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for alias, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("FP32", torch.float32),
                         ("float32", torch.float32), ("torch.float16", torch.float16)):
        assert next(kvzoo.load(llama_dir, dtype=alias).parameters()).dtype == dtype
    with pytest.raises(ConfigError, match=r"dtype 'int8' is not a floating-point dtype; use one of float32, fp32"):
        kvzoo.load(llama_dir, dtype="int8")
