"""The final Telegram render keeps every character the model wrote (issue 9, item 1).

A tiny real model (tests/tiny_markup_model.py) answers with hard-to-render texts; each goes
through the whole bot, the real python-telegram-bot and the strict fake Bot API. The visible text
of the final message(s), with their links' URLs and code blocks' languages, must hold every
character of the answer except the Markdown syntax listed for that case (which became an entity)."""

from __future__ import annotations

from collections import Counter

import pytest

from adapters.telegram.render import render
from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import TOKEN, running_bot, telegram_settings
from tests.tiny_markup_model import TRICKY, markup_model_path

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

# case -> (Markdown syntax characters that may become formatting, fragments shown exactly)
CASES = {
    "generics": ("`", ["std::vector<int> v;", "std::map<std::string, int> m;", "List<String> x", "ArrayList<>()",
                       "Map<K, V>"]),
    "html": ("", ["Use the <div> element, not <span>.", "<b>x</i> &bogus;", "<br/>", "<!-- a comment -->"]),
    "compare": ("", ["a < b > c", "x<y", "3 <= 4 >= 2", "-> and <- and <=>"]),
    "entities": ("", ["&amp; for &, &lt; for <, &gt; for >;", "&#39;", "&nbsp;", "AT&T"]),
    "unbalanced": ("", ["*star alone", "_underscore alone", "`backtick alone", "** doubled"]),
    "fences": ("`", ['```python\nprint("inner")\n```', "let a = 1 < 2;"]),
    "links": ("[]()", ["Foo (bar)", "https://example.com/a_(b)"]),
    "table": ("|-", ["a<b", "1&2", "中文", "😀"]),
    "latex": ("", ["$E=mc^2$", "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$", "\\(\\alpha_1 + \\beta\\)",
                   "\\[\\sum_{i=1}^n x_i\\]"]),
    "chinese": ("*", ["你好，世界！🎉", "重点", "👍🏽", "👨‍👩‍👧", "½"]),
    "markdown": ("*~`>[]()", ["bold", "italic", "gone", "x < y", "a quote", "one", "two", "InternLM"]),
}


def finished(fake: FakeTelegram, chat: int) -> bool:
    messages = fake.messages(chat)
    return bool(messages) and any(b.startswith("regen:") for b in fake.buttons(messages[-1]))


def shown(messages) -> tuple[str, str]:
    """(visible text of the messages, what their entities carry besides: URLs and languages)."""
    text = "\n".join(m.text for m in messages)
    extra = "".join(e.get("url", "") + e.get("language", "") for m in messages for e in m.entities)
    return text, extra


def lost(answer: str, may_vanish: str, visible: str) -> Counter:
    want = Counter(c for c in answer if not c.isspace() and c not in may_vanish)
    return want - Counter(c for c in visible if not c.isspace())


def test_the_cases_cover_the_model():
    assert set(CASES) == set(TRICKY)


async def test_final_messages_keep_every_character_of_tricky_answers(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake), chat_model=str(markup_model_path()), max_new_tokens=400)
        async with running_bot(app):
            chats = {}
            for i, case in enumerate(CASES):
                chats[case] = fake.private_chat(100 + i)
                fake.send_text(chats[case], 100 + i, case)
            await fake.wait_until(lambda: all(finished(fake, chat) for chat in chats.values()))
        failures = []
        for case, (may_vanish, fragments) in CASES.items():
            messages = fake.messages(chats[case])
            text, extra = shown(messages)
            if missing := lost(TRICKY[case], may_vanish, text + extra):
                failures.append(f"{case}: lost {''.join(sorted(missing.elements()))!r} from {text!r}")
            failures += [f"{case}: {f!r} not shown in {text!r}" for f in fragments if f not in text]
        assert failures == []
        entities = lambda case: {e["type"] for m in fake.messages(chats[case]) for e in m.entities}  # noqa: E731
        # Markdown still becomes formatting where it is meant as such
        assert {"bold", "italic", "strikethrough", "code", "blockquote", "text_link"} <= entities("markdown")
        assert "https://en.wikipedia.org/wiki/Foo_(bar)" in shown(fake.messages(chats["links"]))[1]
        assert entities("latex") == {"code"} and "pre" in entities("table") and "bold" in entities("chinese")
        assert fake.flood_429s == 0


@pytest.mark.parametrize("case", sorted(TRICKY))
def test_render_keeps_every_character(case):
    """The same cases at the unit level, to point at the renderer when the end-to-end one fails."""
    may_vanish, fragments = CASES[case]
    text, entities = render(TRICKY[case])
    extra = "".join((e.url or "") + (e.language or "") for e in entities)
    assert not lost(TRICKY[case], may_vanish, text + extra)
    assert [f for f in fragments if f not in text] == []
