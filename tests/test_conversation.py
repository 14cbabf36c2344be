"""Conversations on the default model (ChatML template): each turn feeds only the new text, replies equal
generating on the whole rendered history, a non-incremental template falls back to re-rendering, and
memory stays constant under ZSMerge."""

from __future__ import annotations

import pytest

import kvzoo
from kvzoo.default_model import ensure_default_model
from kvzoo.errors import KvzooError

TURNS = ["What is the capital of France?", "And of Italy?", "Name a river in one of them."]


@pytest.fixture(scope="module")
def smol():
    return kvzoo.load(ensure_default_model(progress=False))


def test_chatml_renders_incrementally(smol):
    """Rendering a history = the previous rendering + the reply + what the new turn adds (what `say` relies on)."""
    tok = smol.require_tokenizer()
    history = [{"role": "system", "content": "Be brief."}]
    before = tok.apply_chat_template(history, add_generation_prompt=False)
    for i, user in enumerate(TURNS):
        history.append({"role": "user", "content": user})
        rendered = tok.apply_chat_template(history, add_generation_prompt=True)
        assert rendered.startswith(before)
        reply = f"reply {i}"
        history.append({"role": "assistant", "content": reply})
        before = rendered + reply


@pytest.mark.parametrize("system", [None, "Answer in one short sentence."])
def test_conversation_equals_generating_on_the_whole_history(smol, system):
    conv = smol.conversation(system=system, max_new_tokens=16)
    history = [{"role": "system", "content": system}] if system else []
    for user in TURNS:
        history.append({"role": "user", "content": user})
        want = smol.chat(history, max_new_tokens=16)
        assert conv.say(user) == want
        history.append({"role": "assistant", "content": want})
    assert conv.messages == history
    # Without a system message the first turn prefills everything; every later turn feeds only its own text.
    assert conv.incremental_turns == len(TURNS) - (system is None)


def test_a_template_that_rewrites_history_falls_back_to_re_rendering(smol):
    conv = smol.conversation(max_new_tokens=12)
    tok = conv.tokenizer

    class CountingTemplate:
        """Writes the number of messages at the top: no rendering is a prefix of the next one."""

        chat_template = tok.chat_template

        def apply_chat_template(self, messages, add_generation_prompt=True):
            return f"[{len(messages)} messages]\n" + tok.apply_chat_template(messages, add_generation_prompt)

        def __getattr__(self, name):
            return getattr(tok, name)

    conv.tokenizer = CountingTemplate()
    history = []
    for user in TURNS[:2]:
        history.append({"role": "user", "content": user})
        rendered = conv.tokenizer.apply_chat_template(history)
        want = smol.generate(rendered, max_new_tokens=12, add_special_tokens=False)
        assert conv.say(user) == want
        history.append({"role": "assistant", "content": want})
    assert conv.incremental_turns == 0


def test_memory_stays_constant_under_zsmerge_for_50_turns(smol):
    conv = smol.conversation(system="Reply with one word.", compression=kvzoo.ZSMerge(budget=48), max_new_tokens=2)
    sizes = []
    for i in range(50):
        conv.say(f"Say {i}.")
        sizes.append(conv.cache.nbytes())
    assert conv.cache.lengths[0] > 10 * 48  # far more tokens went through than the cache holds
    assert sizes == [sizes[0]] * 50
    assert conv.incremental_turns == 50


def test_full_cache_conversation_grows(smol):
    conv = smol.conversation(system="Reply with one word.", max_new_tokens=2)
    sizes = [conv.cache.nbytes()]
    for i in range(3):
        conv.say(f"Say {i}.")
        sizes.append(conv.cache.nbytes())
    assert sizes == sorted(set(sizes))


@pytest.mark.parametrize("given", [{}, {"compile": False}, {"compile": True}])
def test_compile_option_reaches_the_decode_loop_unchanged(smol, monkeypatch, given):
    """compile=None (the default) must reach `gen.run` as None, where long replies get compiled (as generate
    and the CLI's help say), not be turned into False; explicit choices pass through."""
    import kvzoo.generate as gen

    seen = []
    real_run = gen.run

    def spy(*args):
        seen.append(args[-1])
        return real_run(*args[:-1], False)  # never actually compile in this test

    monkeypatch.setattr(gen, "run", spy)
    conv = smol.conversation(max_new_tokens=1, **given)
    conv.say("Hi.")
    assert seen == [given.get("compile")]


def test_bad_turns(smol):
    conv = smol.conversation()
    with pytest.raises(KvzooError, match="say\\(\\) needs some text"):
        conv.say("  ")
    with pytest.raises(KvzooError, match="max_new_tokens >= 1"):
        conv.say("hi", max_new_tokens=0)
    with pytest.raises(KvzooError, match="unknown options \\['temprature'\\]"):
        smol.conversation(temprature=0.5)
    with pytest.raises(KvzooError, match="compile must be True, False or None, got 'yes'"):
        smol.conversation(compile="yes")
