"""ReplyStream against a recording surface with virtual time."""

from __future__ import annotations

import re

from bot.messages import MessageGone, RetryLater
from bot.splitting import open_fence, split
from bot.streaming import ReplyStream
from tests.surfaces import FakeClock, RecordingSurface


def make(max_length=4096, interval=1.0):
    clock = FakeClock()
    surface = RecordingSurface(max_length=max_length, interval=interval, clock=clock)
    stream = ReplyStream(surface, clock=clock, sleep=clock.sleep).start()
    return clock, surface, stream


async def feed_words(clock, stream, words, every=0.1):
    for word in words:
        stream.feed(word)
        await clock.advance(every)


async def test_edits_are_throttled_coalesced_and_final_text_delivered():
    clock, surface, stream = make(interval=1.0)
    words = [f"w{i} " for i in range(60)]
    await feed_words(clock, stream, words)  # 6 virtual seconds of tokens
    await clock.run_until(stream.finish())
    times = [w.at for w in surface.writes]
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip(times, times[1:])), times
    assert 5 <= len(surface.writes) <= 8  # about one per second, not one per token
    assert surface.messages == ["".join(words)]
    assert surface.phases == ["done"]
    texts = [w.text for w in surface.writes]
    streaming = [w.text for w in surface.writes if w.phase == "streaming"]
    assert len(streaming) == len(set(streaming))  # never an identical edit (the final may repeat to render)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # always the newest text


async def test_no_identical_streaming_edit():
    clock, surface, stream = make()
    stream.feed("hello")
    await clock.advance(2)
    stream.feed("")  # nothing new
    stream._dirty.set()  # even a spurious wake-up must not re-send
    await clock.advance(2)
    streaming = [w for w in surface.writes if w.phase == "streaming"]
    assert [w.text for w in streaming] == ["hello"]
    await clock.run_until(stream.finish())


async def test_retry_after_waits_and_sends_only_the_newest_text():
    clock, surface, stream = make()
    stream.feed("a")
    await clock.advance(1.5)
    surface.fail_next.append(RetryLater(5))
    stream.feed("b")
    await clock.advance(1.0)  # this edit gets the 429
    failed_at = clock.now
    for ch in "cdefg":
        stream.feed(ch)
        await clock.advance(0.5)
    await clock.run_until(stream.finish())
    after = [w for w in surface.writes if w.at > failed_at - 1.0]
    assert after and all(w.at >= failed_at + 4.0 for w in after)
    assert surface.messages == ["abcdefg"]
    assert stream.retries_after == 1


async def test_final_text_survives_failed_intermediate_edits_and_429_on_final():
    clock, surface, stream = make()
    stream.feed("part one ")
    await clock.advance(1.1)
    surface.fail_next.extend([RuntimeError("network"), RuntimeError("network")])
    stream.feed("part two")
    await clock.advance(3)
    surface.fail_next.append(RetryLater(2))
    await clock.run_until(stream.finish())
    assert surface.messages == ["part one part two"]
    assert surface.phases[-1] == "done"


async def test_deleted_message_continues_in_a_new_message():
    clock, surface, stream = make()
    stream.feed("first")
    await clock.advance(1.1)
    surface.delete(0)
    stream.feed(" second")
    await clock.run_until(stream.finish())
    assert surface.messages[0] is None
    assert surface.messages[1] == "first second"


async def test_status_is_replaced_by_the_answer_in_the_same_message():
    clock, surface, stream = make()
    stream.set_status("queued: 2 ahead")
    await clock.advance(1.1)
    assert surface.messages == ["queued: 2 ahead"] and surface.phases == ["status"]
    stream.feed("answer")
    await clock.run_until(stream.finish())
    assert surface.messages == ["answer"] and surface.phases == ["done"]


async def test_typing_is_renewed_until_text_is_visible():
    clock, surface, stream = make()
    await clock.advance(10)
    assert surface.typing_calls == 3  # at 0, 4.5 and 9 s
    stream.feed("x")
    await clock.advance(10)
    assert surface.typing_calls == 3
    await clock.run_until(stream.finish())


async def test_long_answer_splits_without_breaking_code_fences():
    clock, surface, stream = make(max_length=500)
    answer = "Intro paragraph.\n\n```python\n" + "".join(f"print({i})\n" for i in range(200)) + "```\n\nDone."
    for i in range(0, len(answer), 7):
        stream.feed(answer[i : i + 7])
        await clock.advance(0.05)
    await clock.run_until(stream.finish())
    messages = surface.messages
    assert len(messages) >= 4
    assert all(len(m) <= 500 for m in messages)
    for m in messages:
        assert open_fence(m) is None, m  # every message is balanced on its own
    assert surface.phases[:-1] == ["sealed"] * (len(messages) - 1) and surface.phases[-1] == "done"
    # Removing the added closers/openers gives back the original lines, in order.
    lines = []
    for i, m in enumerate(messages):
        body = m.split("\n")
        if i < len(messages) - 1 and body[-1] == "```" and open_fence("\n".join(body[:-1])):
            body = body[:-1]  # the closer added at the cut
        if i > 0 and open_fence(messages[i - 1].rsplit("\n", 1)[0]) and body[0] == "```python":
            body = body[1:]  # the fence reopened after the cut
        lines.extend(body)
    assert [x for x in lines if x] == [x for x in answer.split("\n") if x]


def test_split_prefers_paragraphs_then_lines_then_sentences():
    text = "a" * 50 + "\n\n" + "b" * 40 + "\n" + "c" * 100
    assert split(text, 120).head == "a" * 50  # the paragraph break wins over the later line break
    assert split("a" * 20 + "\n\n" + "b" * 60 + "\n" + "c" * 100, 120).head == "a" * 20 + "\n\n" + "b" * 60
    text = "First sentence here. Second sentence is long " + "x" * 100
    assert split(text, 80).head == "First sentence here."
    text = "y" * 300
    part = split(text, 100)
    assert part.head == "y" * 84 and part.consumed == 84  # hard cut leaves room for a closer


def test_split_closes_and_reopens_the_fence_with_its_language():
    text = "```rust\n" + "let x = 1;\n" * 30
    part = split(text, 120)
    assert part.head.startswith("```rust\n") and part.head.endswith("\n```")
    assert part.reopen == "```rust\n"
    assert len(part.head) <= 120


async def test_finish_with_no_text_shows_the_empty_text():
    clock, surface, stream = make()
    await clock.run_until(stream.finish(empty_text="(nothing)"))
    assert surface.messages == ["(nothing)"]


async def test_message_gone_on_final_edit_reposts():
    clock, surface, stream = make()
    stream.feed("hello")
    await clock.advance(1.1)
    surface.fail_next.append(MessageGone())
    await clock.run_until(stream.finish())
    assert surface.messages[-1] == "hello" and surface.phases[-1] == "done"


async def test_first_text_overtakes_a_fresh_status_and_typing():
    clock, surface, stream = make()
    stream.set_status("⏳ in the queue: 1 ahead")
    await clock.advance(0.1)
    stream.feed("answer")  # the text came before the status was worth a write
    await clock.advance(0.1)
    assert [w.text for w in surface.writes] == ["answer"] and surface.typing_calls == 0
    await clock.run_until(stream.finish())
    assert surface.phases == ["done"]


async def test_a_status_that_stands_is_shown_then_the_text_replaces_it():
    clock, surface, stream = make()
    stream.set_status("⏳ loading the model")
    await clock.advance(0.45)
    assert surface.writes == [] and surface.typing_calls == 1  # "typing…" after 0.3 s
    await clock.advance(0.1)
    assert [w.phase for w in surface.writes] == ["status"]
    stream.feed("answer")
    await clock.run_until(stream.finish())
    assert surface.messages == ["answer"]
    assert surface.writes[1].at - surface.writes[0].at >= 1.0  # from the status write's completion


async def test_writes_are_spaced_from_the_previous_write_completing():
    clock = FakeClock()

    class SlowSurface(RecordingSurface):
        async def edit(self, handle, text, *, phase):
            await clock.sleep(0.4)  # a slow request: accepted 0.4 s after it was sent
            await super().edit(handle, text, phase=phase)

    surface = SlowSurface(interval=1.0, clock=clock)
    stream = ReplyStream(surface, clock=clock, sleep=clock.sleep).start()
    for i in range(40):
        stream.feed(f"w{i} ")
        await clock.advance(0.1)
    await clock.run_until(stream.finish())
    times = [w.at for w in surface.writes]
    # each write was accepted 0.4 s after it started, and started 1 s after the previous completed
    assert len(times) >= 3 and all(b - a >= 1.4 - 1e-9 for a, b in zip(times, times[1:])), times
