"""Text <-> token ids for a checkpoint directory, giving the same ids, text and chat prompts as transformers.

`Tokenizer.from_dir` reads, from a Hugging Face layout checkpoint directory:

- `tokenizer.json` with the `tokenizers` library when present, else `tokenizer.model` with `sentencepiece`;
- `tokenizer_config.json`: the special tokens (bos, eos, unk, pad), the chat template, and for a
  `tokenizer.model` the flags `add_bos_token`, `add_eos_token`, `add_prefix_space` and `legacy`. For a
  `tokenizer.json` those flags are ignored, as transformers ignores them: its post-processor already says which
  special tokens to add;
- `chat_template.jinja` and `additional_chat_templates/*.jinja` (what transformers now saves), which take priority
  over a `chat_template` written in `tokenizer_config.json`;
- `generation_config.json`: end-of-sequence ids beyond the tokenizer's own eos token.

A `tokenizer.model` is tokenized the way transformers' `LlamaTokenizer` (Metaspace pre-tokenizer, byte fallback)
treats it: the sentencepiece model is applied to the text between special tokens, with its own normalization
rules (the identity for Llama and Mistral), and a "▁" is prepended to the first piece of text only (to every piece
when `legacy` is true).

`StreamDecoder` turns ids arriving one at a time into text pieces that are safe to print.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from kvzoo.errors import CheckpointError, KvzooError
from kvzoo.json_file import read_json_object

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A checkpoint's tokenizer. Build it with `Tokenizer.from_dir(path)`."""

    def __init__(self, backend: _TokenizersBackend | _SentencePieceBackend, source: Path,
                 special_tokens: dict[str, str], extra_eos_ids: list[int],
                 chat_templates: dict[str, str]) -> None:
        self._backend = backend
        self._source = source
        self._special_tokens = special_tokens  # "bos_token" etc. -> token text, only the ones the checkpoint sets
        self._extra_eos_ids = extra_eos_ids
        self._chat_templates = chat_templates

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of the checkpoint directory `path` (see the module docstring for the files read).

        Raises `CheckpointError` when the directory has neither tokenizer file, or a file is malformed.
        """
        directory = Path(path).expanduser()
        config = _read_json_object(directory / TOKENIZER_CONFIG)
        generation = _read_json_object(directory / GENERATION_CONFIG)
        special_tokens = {
            key: text for key in _SPECIAL_KEYS
            if (text := _token_text(config.get(key), directory / TOKENIZER_CONFIG, key)) is not None
        }
        if (directory / TOKENIZER_JSON).is_file():
            backend: _TokenizersBackend | _SentencePieceBackend = _TokenizersBackend(
                directory / TOKENIZER_JSON, special_tokens, config)
        elif (directory / SENTENCEPIECE_MODEL).is_file():
            backend = _SentencePieceBackend(directory / SENTENCEPIECE_MODEL, special_tokens, config)
        else:
            raise CheckpointError(
                f"{directory}: no tokenizer found (looked for {TOKENIZER_JSON} and {SENTENCEPIECE_MODEL})")
        # Tokens a sentencepiece model defines itself (e.g. "<s>") count as set, as transformers' LlamaTokenizer does.
        special_tokens = {**backend.default_special_tokens, **special_tokens}
        extra_eos = _eos_ids_from_generation_config(generation, directory / GENERATION_CONFIG)
        return cls(backend, directory, special_tokens, extra_eos, _read_chat_templates(directory, config))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._source)!r}, vocab_size={self.vocab_size}, backend={self._backend.name})"

    # --- ids -------------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") become their ids;
        `add_special_tokens` adds the bos/eos tokens the checkpoint asks for (as transformers' `encode` does)."""
        if not isinstance(text, str):
            raise KvzooError(f"encode() takes a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` (a list, or anything iterable of ints such as a 1-D tensor).

        Incomplete UTF-8 byte sequences decode to U+FFFD, as in transformers."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise KvzooError(f"token id {bad} is out of range for this tokenizer (vocab_size {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens)

    # --- special tokens --------------------------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None when the checkpoint has none."""
        return self._special_id("bos_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: the tokenizer's eos token first, then generation_config.json's other ones."""
        own = self._special_id("eos_token")
        ids = [] if own is None else [own]
        return ids + [i for i in self._extra_eos_ids if i not in ids]

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token; the eos token when the checkpoint has no pad token (common for causal LMs)."""
        pad = self._special_id("pad_token")
        if pad is not None:
            return pad
        eos = self.eos_token_ids
        return eos[0] if eos else None

    @property
    def unk_token_id(self) -> int | None:
        """Id of the unknown token, or None when the checkpoint has none."""
        return self._special_id("unk_token")

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id, added tokens included. The ids of released tokenizers have no
        gaps, and this is what `len()` of a transformers tokenizer gives."""
        return self._backend.vocab_size

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the vocabulary file this tokenizer reads and of its special tokens: tokenizers with equal
        fingerprints turn text into the same ids (a saved cache records it)."""
        digest = hashlib.sha256()
        for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL):
            if (self._source / name).is_file():
                digest.update((self._source / name).read_bytes())
                break
        digest.update(json.dumps(self._special_tokens, sort_keys=True).encode())
        return digest.hexdigest()

    def _special_id(self, key: str) -> int | None:
        text = self._special_tokens.get(key)
        return None if text is None else self._backend.token_to_id(text)

    # --- chat ------------------------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The jinja2 chat template ("default" one of a named set), or None when the checkpoint has none."""
        return self._chat_templates.get("default")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render `messages` (dicts with "role" and "content") as the model's prompt text, as transformers'
        `apply_chat_template(messages, tokenize=False)` does. The result already contains any bos token the
        template writes: encode it with `add_special_tokens=False`."""
        template = self.chat_template
        if template is None:
            named = f" (it has templates named {sorted(self._chat_templates)} but none named 'default')" \
                if self._chat_templates else ""
            raise KvzooError(
                f"{self._source}: the checkpoint has no chat template{named}; there is no chat_template in "
                f"{TOKENIZER_CONFIG} and no {CHAT_TEMPLATE_FILE}. Format the prompt yourself and use encode()")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise KvzooError("messages must be a list of dicts such as {'role': 'user', 'content': '...'}")
        import jinja2

        # Like transformers: keys set to None are dropped (many templates would print "None"), tools and documents
        # are always defined, and every special token the checkpoint sets is visible as a string.
        variables = {
            **self._special_tokens,
            "messages": [{k: v for k, v in m.items() if v is not None} for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "tools": None,
            "documents": None,
        }
        try:
            return _compile_template(template).render(**variables)
        except jinja2.TemplateError as e:
            raise KvzooError(f"{self._source}: the chat template failed on these messages: {e}") from e

    @property
    def _cleans_up_spaces(self) -> bool:
        return self._backend.cleans_up_spaces


class StreamDecoder:
    """Incremental detokenization for streaming: `push` each generated id and print what it returns.

    A piece is held back while the decoded text ends with U+FFFD, i.e. with a character whose UTF-8 bytes are
    split over tokens and not all generated yet (byte-level BPE and byte-fallback vocabularies do this for emoji
    and CJK text). Concatenating every `push` result and `flush()` gives `tokenizer.decode(all_ids)` whenever the
    generated bytes are valid UTF-8. (When they are not, transformers' byte-fallback decoding turns the whole run of
    byte tokens into U+FFFD, characters already printed included, and no stream can match that.)

    Decoding only the newest token would not match `decode`: sentencepiece-style decoders drop the leading space
    of the text and byte fallback joins bytes across tokens. So each push decodes a window of recent tokens that
    starts at a token from which decoding reproduces the text already returned, and keeps the cost per token
    constant instead of growing with the sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._text = ""  # all the text returned so far
        self._start = 0  # the window: ids[self._start:] are decoded on each push
        self._start_len = 0  # characters of the window's text already returned
        self._read = 0  # ids[:self._read] have all their text returned

    def push(self, token_id: int) -> str:
        """Add one generated id; return the new text that is safe to print (possibly "")."""
        self._ids.append(int(token_id))
        window = self._decode(self._start)
        if window.endswith(_REPLACEMENT_CHAR):
            return ""
        cleans_up = self._tokenizer._cleans_up_spaces
        # Clean-up rewrites " ." into "." and the like, so the text from the last space on may still change.
        end = max(window.rfind(" "), self._start_len) if cleans_up else len(window)
        piece = window[self._start_len:end]
        self._text += piece
        self._start_len = end
        if not cleans_up:  # (a clean-up can reach back before any start: decode everything every time)
            # Slide the window to the first token of this piece when decoding from there gives the text already
            # returned. It does not when that token is a skipped special token, or inside a run of byte tokens.
            context = self._decode(self._read)
            if context and self._text.endswith(context):
                self._start, self._start_len = self._read, len(context)
            self._read = len(self._ids)
        return piece

    def flush(self) -> str:
        """The text still held back (call once generation ended)."""
        piece = self._decode(self._start)[self._start_len:]
        self._text += piece
        self._start_len += len(piece)
        return piece

    def _decode(self, start: int) -> str:
        return self._tokenizer.decode(self._ids[start:], self._skip_special_tokens)


# --- backends --------------------------------------------------------------------------------------------------------


class _TokenizersBackend:
    """A `tokenizer.json`, run by the `tokenizers` library exactly as transformers' fast tokenizers run it."""

    name = "tokenizers"

    def __init__(self, path: Path, special_tokens: dict[str, str], config: dict[str, Any]) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        try:
            tokenizer = RustTokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception for unreadable files
            raise CheckpointError(f"{path}: not a valid tokenizers file: {e}") from e
        # transformers encodes without truncation or padding unless asked, whatever tokenizer.json says.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        # Special tokens named in tokenizer_config.json but not among tokenizer.json's added tokens are added by
        # transformers (so that they are matched in text and skipped when decoding); do the same.
        added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
        missing = [text for text in special_tokens.values() if text not in added]
        if missing:
            tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in missing])
        self._tokenizer = tokenizer
        self.default_special_tokens: dict[str, str] = {}
        added_ids = tokenizer.get_added_tokens_decoder().keys()
        self.vocab_size = max([tokenizer.get_vocab_size(with_added_tokens=False), *(i + 1 for i in added_ids)])
        # transformers skips its clean-up of spaces before punctuation for BPE models (it corrupts their output).
        self.cleans_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) \
            and type(tokenizer.model).__name__ != "BPE"

    def token_to_id(self, text: str) -> int | None:
        return self._tokenizer.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.cleans_up_spaces else text


class _SentencePieceBackend:
    """A `tokenizer.model`, tokenized as transformers' `LlamaTokenizer` does (see the module docstring)."""

    name = "sentencepiece"

    def __init__(self, path: Path, special_tokens: dict[str, str], config: dict[str, Any]) -> None:
        import sentencepiece

        config_path = path.parent / TOKENIZER_CONFIG
        try:
            # The "▁" that sentencepiece prepends to every call is prepended here instead, only where transformers
            # puts it (first piece of text only), so the model is loaded with that option switched off.
            model = sentencepiece.SentencePieceProcessor(model_proto=_without_dummy_prefix(path.read_bytes(), path))
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{path}: not a valid sentencepiece model: {e}") from e
        self._sp = model
        size = model.get_piece_size()
        # Decoding table (an int is a byte-fallback piece "<0xNN>"): what transformers' decoder makes of each piece.
        self._pieces: list[str | int] = [
            int(model.id_to_piece(i)[3:5], 16) if model.is_byte(i) else model.id_to_piece(i).replace("▁", " ")
            for i in range(size)
        ]
        # Without a tokenizer_config.json, transformers' LlamaTokenizer uses <s>, </s> and <unk>: the model's own.
        self.default_special_tokens = {key: model.id_to_piece(i) for key, i in (
            ("bos_token", model.bos_id()), ("eos_token", model.eos_id()), ("unk_token", model.unk_id())) if i >= 0}

        # Added tokens are cut out of the text before sentencepiece sees it: the model's control pieces, the
        # configured special tokens and tokenizer_config.json's added_tokens_decoder (which may extend the vocab).
        self._added: dict[str, int] = {model.id_to_piece(i): i for i in range(size) if model.is_control(i)}
        self._special_ids: set[int] = set(self._added.values())
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            text = _token_text(entry, config_path, f"added_tokens_decoder[{key}]")
            if text is None or not str(key).isdigit():
                raise CheckpointError(f"{config_path}: added_tokens_decoder has a malformed entry {key!r}: {entry!r}")
            self._added[text] = int(key)
            if not isinstance(entry, dict) or entry.get("special", True):
                self._special_ids.add(int(key))
        for key, text in {**self.default_special_tokens, **special_tokens}.items():
            token_id = self._added.get(text)
            if token_id is None:
                token_id = model.piece_to_id(text)
                if model.id_to_piece(token_id) != text:
                    raise CheckpointError(f"{config_path}: {key} {text!r} is neither in {path.name}'s vocabulary "
                                          f"nor in added_tokens_decoder")
            self._added[text] = token_id
            self._special_ids.add(token_id)
        self._id_to_added = {i: text for text, i in self._added.items()}
        # Longest first, so that a token is never cut out as the prefix of a longer one.
        alternatives = sorted(self._added, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

        self._prefix_space = config.get("add_prefix_space") is not False  # None and missing mean True
        self._legacy = bool(config.get("legacy", False))
        # Without the flag transformers 5 adds no bos (4 did): Llama configs, and kvzoo's converters, always set it.
        self._add_bos = bool(config.get("add_bos_token", False))
        self._add_eos = bool(config.get("add_eos_token", False))
        self._bos = special_tokens.get("bos_token", self.default_special_tokens.get("bos_token"))
        self._eos = special_tokens.get("eos_token", self.default_special_tokens.get("eos_token"))
        self.vocab_size = max([size, *(i + 1 for i in self._added.values())])
        self.cleans_up_spaces = False  # transformers never cleans up after BPE, and LlamaTokenizer is BPE

    def token_to_id(self, text: str) -> int | None:
        if text in self._added:
            return self._added[text]
        token_id = self._sp.piece_to_id(text)
        return token_id if self._sp.id_to_piece(token_id) == text else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        parts = self._splitter.split(text) if self._splitter else [text]
        ids: list[int] = []
        # split() with a capturing group alternates: text, token, text, token, ..., text (possibly empty).
        for index, part in enumerate(parts):
            if index % 2:
                ids.append(self._added[part])
            elif part:
                if self._prefix_space and (index == 0 or self._legacy) and not part.startswith((" ", "▁")):
                    part = " " + part
                ids.extend(self._sp.encode(part))
        if add_special_tokens:
            if self._add_bos and self._bos is not None:
                ids.insert(0, self._added[self._bos])
            if self._add_eos and self._eos is not None:
                ids.append(self._added[self._eos])
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run = bytearray()  # consecutive byte-fallback pieces are decoded together
        for i in ids:
            if i in self._id_to_added:
                if skip_special_tokens and i in self._special_ids:
                    continue
                piece: str | int = self._id_to_added[i]
            else:
                piece = self._pieces[i]
            if isinstance(piece, int):
                run.append(piece)
                continue
            if run:
                out.append(_decode_byte_run(run))
                run.clear()
            out.append(piece)
        if run:
            out.append(_decode_byte_run(run))
        text = "".join(out)
        # The space that came from the prepended "▁" is removed again, once, at the very start.
        return text[1:] if self._prefix_space and text.startswith(" ") else text


# --- helpers ---------------------------------------------------------------------------------------------------------


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file does not exist."""
    return read_json_object(path, CheckpointError) if path.is_file() else {}


def _token_text(value: Any, path: Path, key: str) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or a dict with "content" (a serialized AddedToken)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{path}: {key} must be a string or an object with a \"content\" string, got {value!r}")


def _eos_ids_from_generation_config(generation: dict[str, Any], path: Path) -> list[int]:
    value = generation.get("eos_token_id")
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{path}: eos_token_id must be an id or a list of ids, got {value!r}")
    return values


def _read_chat_templates(directory: Path, config: dict[str, Any]) -> dict[str, str]:
    """Templates by name ("default" is the one used). Template files replace those in tokenizer_config.json."""
    templates: dict[str, str] = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for file in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    # The list form: [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
    if isinstance(value, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in value):
        return {t["name"]: t["template"] for t in value}
    raise CheckpointError(f"{directory / TOKENIZER_CONFIG}: chat_template must be a string or a list of "
                          f"{{\"name\": ..., \"template\": ...}} objects")


@lru_cache(maxsize=16)
def _compile_template(template: str) -> Any:
    return _jinja_environment().from_string(template)


@lru_cache(maxsize=1)
def _jinja_environment() -> Any:
    """The environment transformers renders chat templates in. Templates come from the hub, so they run sandboxed."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # jinja2's own tojson escapes HTML characters ("<" -> "\u003c"), which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _decode_byte_run(run: bytearray) -> str:
    # As the tokenizers library's ByteFallback decoder: a run that is not valid UTF-8 becomes one U+FFFD per byte.
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return _REPLACEMENT_CHAR * len(run)


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`: remove the space WordPiece-style decoding leaves before punctuation."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# Protocol buffer wire format, just enough to flip one option of a sentencepiece ModelProto without the protobuf
# package (which sentencepiece does not need, and transformers only needs to convert tokenizer.model files).
_NORMALIZER_SPEC = 3  # ModelProto.normalizer_spec
_SELF_TEST_DATA = 4  # ModelProto.self_test_data
_ADD_DUMMY_PREFIX = 3  # NormalizerSpec.add_dummy_prefix


def _without_dummy_prefix(proto: bytes, path: Path) -> bytes:
    """The serialized sentencepiece model `proto` with `normalizer_spec.add_dummy_prefix = false`.

    Its self-test samples are dropped too: sentencepiece checks them on load, and they assume the prefix."""
    out = bytearray()
    found = False
    for field, wire, raw, payload in _proto_fields(proto, path):
        if field == _NORMALIZER_SPEC and wire == 2:
            spec = b"".join(r for f, _, r, _ in _proto_fields(payload, path) if f != _ADD_DUMMY_PREFIX)
            out += _normalizer_spec(spec)
            found = True
        elif field != _SELF_TEST_DATA:
            out += raw
    if not found:  # every option at its default
        out += _normalizer_spec(b"")
    return bytes(out)


def _normalizer_spec(fields: bytes) -> bytes:
    fields += _varint(_ADD_DUMMY_PREFIX << 3) + _varint(0)  # varint field = false
    return _varint(_NORMALIZER_SPEC << 3 | 2) + _varint(len(fields)) + fields


def _proto_fields(data: bytes, path: Path) -> list[tuple[int, int, bytes, bytes]]:
    """(field number, wire type, raw bytes, length-delimited payload) for each field of a message."""
    fields = []
    pos = 0
    try:
        while pos < len(data):
            start = pos
            key, pos = _read_varint(data, pos)
            wire = key & 7
            payload = b""
            if wire == 0:
                _, pos = _read_varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _read_varint(data, pos)
                payload = data[pos:pos + length]
                pos += length
            else:
                raise ValueError(f"unsupported wire type {wire}")
            if pos > len(data):
                raise ValueError("truncated")
            fields.append((key >> 3, wire, data[start:pos], payload))
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: not a valid sentencepiece model ({e})") from e
    return fields


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


__all__ = ["StreamDecoder", "Tokenizer"]
