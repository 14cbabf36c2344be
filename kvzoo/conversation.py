"""A conversation that keeps one cache across turns.

Each `say` renders the whole history with the chat template, but feeds the model only what the cache does not
hold yet: the text after the previous rendering and the previous reply. That is exact when the template is
incremental (rendering the history = the previous rendering + the reply + the new turn, as ChatML is); when it
is not, the turn falls back to prefilling the whole rendering into a new cache. With a decode-time method
(ZSMerge, H2O, TOVA, StreamingLLM) the cache keeps its size however long the conversation runs.

    conv = model.conversation(system="You are terse.", compression=ZSMerge(budget=2048))
    print(conv.say("Hello!"))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvzoo import generate as gen
from kvzoo.compile import check_compile
from kvzoo.cache.registry import as_method
from kvzoo.cache.slots import KVCache
from kvzoo.errors import KvzooError

if TYPE_CHECKING:
    from kvzoo.models.base import CausalLM
    from kvzoo.tokenizer import Tokenizer


class Conversation:
    """Turns of a chat over one cache. `document` is appended to the system message and prefilled (and
    compressed) once, before the first turn; so is a system message alone."""

    def __init__(
        self,
        model: "CausalLM",
        system: str | None = None,
        compression: "gen.Compression" = None,
        document: str | None = None,
        prefill_chunk: int | None = None,
        max_new_tokens: int = gen.DEFAULT_MAX_NEW_TOKENS,
        stop: str | list[str] | None = None,
        **sampling: Any,
    ) -> None:
        self.model = model
        self.tokenizer = model.require_tokenizer()
        if self.tokenizer.chat_template is None:
            raise KvzooError("the checkpoint has no chat template, so it cannot hold a conversation")
        self.compression = as_method(compression)
        self.stop = gen.normalise_stop(stop)
        self.prefill_chunk = prefill_chunk
        self.max_new_tokens = max_new_tokens
        self.sampling = gen.Sampling(**{k: sampling.pop(k) for k in ("temperature", "top_k", "top_p", "seed")
                                        if k in sampling})
        self.eos_token_ids = sampling.pop("eos_token_ids", None)
        # None: compiled only for long replies, as generate (checked here, not at the first reply)
        self.compile = check_compile(sampling.pop("compile", None), "Conversation")
        if sampling:
            raise KvzooError(f"Conversation: unknown options {sorted(sampling)}")
        self.messages: list[dict[str, str]] = []
        self.cache: KVCache | None = None
        self.incremental_turns = 0  # turns that fed only the new text (the rest re-rendered everything)
        self._fed_text = ""  # the rendering the cache holds (up to the last reply)
        self._pending: list[int] = []  # reply tokens sampled but not fed yet (the last one of a reply)
        content = "\n\n".join(x for x in (system, document) if x)
        if content:
            self.messages.append({"role": "system", "content": content})
            self._prefill_system()

    def _prefill_system(self) -> None:
        try:
            rendered = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=False)
        except KvzooError:
            return  # the template renders no system turn alone; the first turn renders it with the user's
        ids = self.tokenizer.encode(rendered, add_special_tokens=False)
        self.cache = gen.prefill_cache(self.model, [ids], self.compression, self.prefill_chunk)
        self._fed_text = rendered

    def say(self, text: str, max_new_tokens: int | None = None,
            on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn, generate the reply, add it to the history, and return it. `on_text` receives the
        reply's text piece by piece as it is decoded (for streaming)."""
        if not isinstance(text, str) or not text.strip():
            raise KvzooError("say() needs some text")
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise KvzooError(f"a reply needs max_new_tokens >= 1, got {max_new!r}")
        messages = self.messages + [{"role": "user", "content": text}]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        incremental = self.cache is not None and rendered.startswith(self._fed_text)
        if incremental:
            ids = self._pending + self.tokenizer.encode(rendered[len(self._fed_text):], add_special_tokens=False)
            start = self.cache.lengths[0]  # type: ignore[union-attr]
            request = gen.prepare(self.model, [ids], max_new, None, self.prefill_chunk, self.cache, in_place=True)
        else:  # first turn, or a template that rewrites earlier turns: prefill the whole rendering
            ids = self.tokenizer.encode(rendered, add_special_tokens=False)
            start = 0
            self.cache = None  # free it before building the next
            request = gen.prepare(self.model, [ids], max_new, self.compression, self.prefill_chunk)
        eos = gen.default_eos_ids(self.model) if self.eos_token_ids is None else self.eos_token_ids
        steps = gen.run(self.model, request, max_new, self.sampling, eos, self.prefill_chunk, self.compile)
        tokens: list[int] = []

        def recorded() -> Iterator[list[int | None]]:
            for step in steps:
                tokens.extend(t for t in step if t is not None)
                yield step

        for piece in gen.stream_text(self.tokenizer, recorded(), self.stop):  # ends at eos or a stop string
            if on_text is not None:
                on_text(piece)
        generated = self.tokenizer.decode(tokens)
        reply = gen.cut_at_stop(generated, self.stop)[0]
        self.cache = request.cache
        fed = self.cache.lengths[0] - start - len(ids)  # reply tokens the cache holds
        self._pending = tokens[fed:]
        # What the cache holds (plus the pending tokens). A reply cut at a stop string differs from it, so the
        # next turn's rendering will not extend it and that turn re-renders everything.
        self._fed_text = rendered + generated
        self.incremental_turns += incremental
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return reply


_QUESTION_MARK = "\x00question\x00"


@dataclass(frozen=True)
class DocumentPrompt:
    """A user turn "document, blank line, question" in the chat template, split where the question goes:
    `prefix` (everything up to the document's end, prefilled once) and the text `question(q)` fed after it."""

    prefix: str
    suffix: str  # what the template writes after the user's message (end of turn, assistant header)

    @classmethod
    def render(cls, tokenizer: "Tokenizer", document: str) -> "DocumentPrompt":
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": document + _QUESTION_MARK}], add_generation_prompt=True)
        prefix, found, suffix = rendered.partition(_QUESTION_MARK)
        if not found or _QUESTION_MARK in suffix:
            raise KvzooError("the chat template does not keep the user's message verbatim, so a document cannot be "
                             "prefilled apart from the question; use --no-chat")
        return cls(prefix, suffix)

    def question(self, text: str) -> str:
        return f"\n\n{text}{self.suffix}"
