"""kvzoo.tokenizer against transformers as the oracle, on tokenizers trained here (no network, a few seconds).

- byte-level BPE `tokenizer.json` (GPT-2 / Falcon style) saved by `PreTrainedTokenizerFast.save_pretrained`;
- byte-fallback sentencepiece `tokenizer.model` (Llama / Mistral style) with a LlamaTokenizer config. transformers
  5 has no slow LlamaTokenizer: its `LlamaTokenizer` converts tokenizer.model into a `tokenizers` BPE, which needs
  the protobuf package. Without protobuf the oracle is built from the same vocabulary and merges by hand.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvzoo.errors import CheckpointError, KvzooError
from kvzoo.tokenizer import StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
sentencepiece = pytest.importorskip("sentencepiece")

WORDS = ["hello", "world", "token", "stream", "cache", "merge", "the", "a", "of", "model", "attention", "Zürich",
         "café", "naïve", "你好", "世界", "日本語", "😀", "🚀", "12", "345", "don't", "it's", "(x)", "a.b", "-", "?"]

# Texts for the parity checks: unicode, emoji (including characters never seen in training, so that byte-level
# and byte-fallback tokens split them), whitespace runs, and special tokens written in the text.
TEXTS = [
    "hello world",
    "Hello World! It's 2024, isn't it?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines   runs",
    "你好世界，日本語のテキスト",
    "emoji 😀🚀 and unseen ones 🤖🎉🧑‍🚀",
    "漢字 ॐ ℵ ∑ ﬁ é (combining e\u0301)",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<s>hello</s> <s> world",
    "text<|im_end|>",
    "",
    " ",
]

CHATML = (
    "{{ bos_token }}"
    "{% for message in messages %}\n"
    "    {% if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{ raise_exception('unknown role ' + message['role']) }}\n"
    "    {% endif %}\n"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}\n"
    "    {% if message.meta is defined %}{{ message.meta | tojson }}{% endif %}\n"
    "    {% if message.tool_calls is defined %}{{ ' calls: ' ~ message.tool_calls }}{% endif %}\n"
    "{{ '<|im_end|>\\n' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "{{ '<|im_start|>assistant\\n' }}\n"
    "{% endif %}"
)

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse. 😀"},
    {"role": "user", "content": "Say <hi> in 中文", "meta": {"lang": "zh", "tags": ["<b>", "é"]}},
    {"role": "assistant", "content": "你好", "tool_calls": None},
    {"role": "user", "content": "  and again  "},
]


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(WORDS) + rng.choice([" ", " ", "  ", ", ", "\n", ""]) for _ in range(rng.randint(3, 12)))
            for _ in range(n)]


def _hf_ids(out: Any) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list in transformers 4 and a BatchEncoding in 5."""
    return list(out) if isinstance(out, list) else list(out["input_ids"])


# --- byte-level BPE tokenizer.json -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tk = RustTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_corpus(), trainer)
    # The post-processor adds <s>, as in Falcon/Llama-3 style tokenizer.json files.
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>",
                                              chat_template=CHATML)
    path = tmp_path_factory.mktemp("bpe")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bpe_pair(bpe_dir: Path) -> tuple[Tokenizer, Any]:
    return Tokenizer.from_dir(bpe_dir), transformers.AutoTokenizer.from_pretrained(bpe_dir)


def test_bpe_ids_and_text_match_transformers(bpe_pair: tuple[Tokenizer, Any]) -> None:
    ours, hf = bpe_pair
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (text, add)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert ours.encode("hi")[0] == ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids == [hf.eos_token_id] == [hf.convert_tokens_to_ids("<|im_end|>")]
    assert ours.pad_token_id == hf.eos_token_id  # no pad token: falls back to eos
    assert ours.vocab_size == len(hf)
    assert ours.encode("<|im_start|>")[1:] == [hf.convert_tokens_to_ids("<|im_start|>")]


@given(st.text(max_size=40))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_bpe_random_text_matches_transformers(bpe_pair: tuple[Tokenizer, Any], text: str) -> None:
    ours, hf = bpe_pair
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def _move_template_into_config(src: Path, dst: Path, form: str) -> None:
    """Copy a checkpoint, storing its chat template in tokenizer_config.json (`form`: "string" or "list")."""
    shutil.copytree(src, dst)
    template = (dst / "chat_template.jinja").read_text(encoding="utf-8")
    (dst / "chat_template.jinja").unlink()
    config = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template if form == "string" else [
        {"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": template}]
    (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize("stored", ["jinja_file", "config_string", "config_list"])
def test_chat_template_matches_transformers(bpe_dir: Path, tmp_path: Path, stored: str) -> None:
    path = bpe_dir
    if stored != "jinja_file":
        path = tmp_path / "ckpt"
        _move_template_into_config(bpe_dir, path, stored.removeprefix("config_"))
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.chat_template == CHATML
    for generation_prompt in (True, False):
        text = ours.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt)
        assert text == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
        ids = _hf_ids(hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=generation_prompt))
        assert ours.encode(text, add_special_tokens=False) == ids
    assert text.startswith("<s><|im_start|>system\n")  # bos_token is visible to the template
    assert '{"lang": "zh", "tags": ["<b>", "é"]}' in text  # tojson without HTML escaping or ASCII escapes
    assert "None" not in text


def test_chat_template_errors(bpe_dir: Path, tmp_path: Path) -> None:
    ours = Tokenizer.from_dir(bpe_dir)
    with pytest.raises(KvzooError, match="unknown role tool"):  # the template's raise_exception
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    shutil.copytree(bpe_dir, tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink()
    plain = Tokenizer.from_dir(tmp_path / "plain")
    assert plain.chat_template is None
    with pytest.raises(KvzooError, match="no chat template"):
        plain.apply_chat_template(MESSAGES)


# --- sentencepiece tokenizer.model -----------------------------------------------------------------------------------

# The Llama flags, and special tokens both as strings and as the serialized AddedToken dicts older transformers wrote.
_ADDED = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
LLAMA_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": {**_ADDED, "content": "<s>"},
    "eos_token": {**_ADDED, "content": "</s>"},
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "clean_up_tokenization_spaces": False,
}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-style sentencepiece model: BPE, byte fallback, no normalization, digits split.

    400 pieces: 256 byte pieces and 3 special ones leave about 140 for characters and merges."""
    import io

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=out, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=0.9995, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


def _sp_checkpoint(model: Path, directory: Path, config: dict | None) -> Path:
    """tokenizer.model + tokenizer_config.json, the files kvzoo's converters and Meta's Llama releases have."""
    directory.mkdir()
    shutil.copyfile(model, directory / "tokenizer.model")
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def _has_protobuf() -> bool:
    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:  # no "google" namespace package at all
        return False


def _llama_oracle(directory: Path) -> Any:
    """transformers' LlamaTokenizer for `directory`."""
    if _has_protobuf():
        return transformers.LlamaTokenizer.from_pretrained(directory)
    # transformers reads tokenizer.model through protobuf: without it, give LlamaTokenizer the vocabulary and
    # the merges exactly as its sentencepiece conversion builds them (pieces in id order, merges by rank).
    from transformers.tokenization_utils_base import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    kwargs = {k: v["content"] if isinstance(v, dict) else v for k, v in config.items() if k != "tokenizer_class"}
    return transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), **kwargs)


@pytest.fixture(scope="module")
def sp_pair(sp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any]:
    directory = _sp_checkpoint(sp_model, tmp_path_factory.mktemp("llama") / "ckpt", LLAMA_CONFIG)
    return Tokenizer.from_dir(directory), _llama_oracle(directory)


def test_sentencepiece_ids_and_text_match_transformers(sp_pair: tuple[Tokenizer, Any]) -> None:
    ours, hf = sp_pair
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (text, add)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    # Every prefix of an id sequence, so that byte-fallback runs are cut in the middle of characters.
    ids = ours.encode(STREAM_TEXT)
    for end in range(len(ids) + 1):
        assert ours.decode(ids[:end]) == hf.decode(ids[:end], skip_special_tokens=True)
    assert ours.encode("hello")[0] == ours.bos_token_id == hf.bos_token_id == 1  # bos added, as add_bos_token says
    assert ours.eos_token_ids == [hf.eos_token_id] == [2]
    assert ours.unk_token_id == hf.unk_token_id == 0
    assert ours.vocab_size == len(hf) == 400
    # Characters outside the vocabulary become byte-fallback pieces <0xNN>, not <unk>.
    assert 0 not in ours.encode("🤖 ॐ")


@given(st.text(max_size=40))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sentencepiece_random_text_matches_transformers(sp_pair: tuple[Tokenizer, Any], text: str) -> None:
    ours, hf = sp_pair
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("flags", [
    {"legacy": True},  # every piece of text between special tokens gets its "▁"
    {"add_bos_token": False, "add_eos_token": True},
    {"add_prefix_space": False},
    None,  # no tokenizer_config.json: transformers 5 then adds no bos
], ids=["legacy", "eos-not-bos", "no-prefix-space", "no-config"])
def test_sentencepiece_config_flags_match_transformers(sp_model: Path, tmp_path: Path, flags: dict | None) -> None:
    config = None if flags is None else {**LLAMA_CONFIG, **flags}
    directory = _sp_checkpoint(sp_model, tmp_path / "ckpt", config)
    ours, hf = Tokenizer.from_dir(directory), _llama_oracle(directory)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), text


# --- eos ids, errors, streaming --------------------------------------------------------------------------------------


def test_generation_config_eos_ids_are_merged(bpe_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(bpe_dir, tmp_path / "ckpt")
    own = Tokenizer.from_dir(bpe_dir).eos_token_ids
    assert len(own) == 1
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, own[0], 9]}))
    assert Tokenizer.from_dir(tmp_path / "ckpt").eos_token_ids == [own[0], 7, 9]
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    tok = Tokenizer.from_dir(tmp_path / "ckpt")
    assert tok.eos_token_ids == [own[0], 7]
    assert tok.pad_token_id == own[0]
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id"):
        Tokenizer.from_dir(tmp_path / "ckpt")


def test_special_token_missing_from_tokenizer_json_is_added(bpe_dir: Path, tmp_path: Path) -> None:
    """A pad token named in tokenizer_config.json but absent from tokenizer.json: transformers appends it."""
    shutil.copytree(bpe_dir, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = "<pad>"
    config_path.write_text(json.dumps(config))
    ours, hf = Tokenizer.from_dir(tmp_path / "ckpt"), transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert ours.pad_token_id == hf.pad_token_id == 400
    assert ours.vocab_size == len(hf) == 401
    ids = ours.encode("a<pad>b")
    assert ids == hf.encode("a<pad>b") and 400 in ids
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "ab"


def test_tokenizer_json_settings_transformers_overrides(bpe_dir: Path, tmp_path: Path) -> None:
    """Truncation and padding in tokenizer.json, and space clean-up for a BPE model, are not applied by default."""
    shutil.copytree(bpe_dir, tmp_path / "ckpt")
    json_path, config_path = tmp_path / "ckpt" / "tokenizer.json", tmp_path / "ckpt" / "tokenizer_config.json"
    data = json.loads(json_path.read_text())
    data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 1,
                       "pad_type_id": 0, "pad_token": "</s>"}
    json_path.write_text(json.dumps(data))
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "clean_up_tokenization_spaces": True}))
    ours, hf = Tokenizer.from_dir(tmp_path / "ckpt"), transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    text = "hello world , it 's a model . don't ?"
    ids = ours.encode(text)
    assert ids == hf.encode(text) and len(ids) > 10
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "tokenizer.json" in str(info.value) and "tokenizer.model" in str(info.value)


def test_malformed_files(bpe_dir: Path, sp_model: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.model").write_bytes(b"\xff\xff garbage")
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path / "b")
    directory = _sp_checkpoint(sp_model, tmp_path / "c", {**LLAMA_CONFIG, "eos_token": "<|eot|>"})
    with pytest.raises(CheckpointError, match="eos_token '<\\|eot\\|>'"):
        Tokenizer.from_dir(directory)
    with pytest.raises(KvzooError, match="out of range"):
        Tokenizer.from_dir(bpe_dir).decode([10**6])


STREAM_TEXT = "你好，世界！漢字と日本語 🤖🎉 done, é\u0301 ok"


@pytest.mark.parametrize("which", ["bpe", "sentencepiece"])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_pieces_concatenate_to_decode(bpe_pair: tuple, sp_pair: tuple, which: str,
                                                     skip: bool) -> None:
    tok = (bpe_pair if which == "bpe" else sp_pair)[0]
    ids = tok.encode(STREAM_TEXT)
    # The text must really split UTF-8 sequences over tokens, or the test would prove nothing.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    decoder = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1] and sum(bool(p) for p in pieces) > 5  # held back at times, yet incremental
    assert decoder.flush() == ""


@given(st.lists(st.sampled_from(["a", "b c", " ", "  ", "\n", "é", "e\u0301", "你", "漢", "😀", "🤖", "🧑\u200d🚀",
                                  "ॐ", "<s>", "</s>", "<|im_end|>", "."]), max_size=30))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_stream_decoder_random_text(bpe_pair: tuple, sp_pair: tuple, parts: list[str]) -> None:
    for tok in (bpe_pair[0], sp_pair[0]):
        ids = tok.encode("".join(parts))
        for skip in (True, False):
            decoder = StreamDecoder(tok, skip_special_tokens=skip)
            pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_cost_does_not_grow(sp_pair: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each push decodes a short window of recent tokens, not the whole sequence."""
    tok = sp_pair[0]
    ids = tok.encode(" ".join(["hello world, 你好 🤖 </s> <s>"] * 100))
    assert len(ids) > 1000
    lengths: list[int] = []
    decode = tok.decode

    def recording_decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        lengths.append(len(ids))
        return decode(ids, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", recording_decode)
    decoder = StreamDecoder(tok)
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    monkeypatch.undo()
    assert text == tok.decode(ids)
    assert max(lengths) < 20


def test_stream_decoder_with_space_clean_up(tmp_path: Path) -> None:
    """A WordLevel tokenizer with clean_up_tokenization_spaces: decode() rewrites " ." as "." after the fact."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    words = ["[UNK]", "hello", "world", ".", ",", "it", "'s", "n't", "do", "?", "'"]
    tk = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(cleanup=False)  # leave the clean-up to transformers (and kvzoo)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]",
                                              clean_up_tokenization_spaces=True)
    hf.save_pretrained(tmp_path)
    ours, hf = Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = [1, 4, 2, 3, 5, 6, 7, 9, 8, 7, 1, 10, 1, 3]  # ... "do n't hello ' hello ." -> "don't hello'hello."
    text = ours.decode(ids)
    assert text == hf.decode(ids, skip_special_tokens=True)
    assert text.startswith("hello, world. it's") and " ." not in text
    decoder = StreamDecoder(ours)
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == text
