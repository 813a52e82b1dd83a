"""Telegram pacing: per-chat spacing from the previous write's completion, the overall budget
shared fairly, groups at 20 a minute, typing only from spare budget. Unit tests on virtual
time, then the real ReplyStream + TelegramSurface + python-telegram-bot against the strict fake
Bot API server, which adds request jitter and enforces the limits at the moment it accepts a
write. The integration tests feed text when the previous write was accepted (events, not time)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from telegram import Bot
from telegram.request import HTTPXRequest

from adapters.telegram.pacing import FINAL_BUDGET, GROUP_INTERVAL, MARGIN, SPARE_BUDGET, STREAM_BUDGET, WINDOW, Pacer
from adapters.telegram.surface import TelegramSurface
from bot.streaming import ReplyStream
from tests.fake_telegram import FakeTelegram
from tests.surfaces import FakeClock
from tests.telegram_harness import TOKEN

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")


async def test_a_chat_writes_again_only_an_interval_after_its_previous_write_completed():
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    slot = pacer.try_take("1", 1.0, STREAM_BUDGET)
    assert slot is not None
    await clock.advance(5.0)  # a slow request: however long it takes, the chat waits for it
    assert pacer.try_take("1", 1.0, STREAM_BUDGET) is None
    pacer.release(slot)  # Telegram accepted it (it may have counted it just now)
    await clock.advance(1.0)
    assert pacer.try_take("1", 1.0, STREAM_BUDGET) is None  # 1 s after completion is not enough...
    assert pacer.wait_for("1", STREAM_BUDGET) == pytest.approx(MARGIN)
    await clock.advance(MARGIN)
    again = pacer.try_take("1", 1.0, STREAM_BUDGET)  # ...the margin on top is
    assert again is not None
    pacer.release(again, wrote=False)  # refused without effect (message gone): at once again
    assert pacer.try_take("1", 1.0, FINAL_BUDGET) is not None
    assert pacer.stats.writes == 3


async def test_a_group_gets_at_most_twenty_writes_a_minute():
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    accepted: list[float] = []

    async def writer():  # a group whose answers always have a complete message waiting
        while clock.now < 1000 + 180:
            slot = await pacer.take("-100", GROUP_INTERVAL, FINAL_BUDGET)
            pacer.release(slot)
            accepted.append(clock.now)

    task = asyncio.create_task(writer())
    while not task.done():
        await clock.advance(0.5)
    assert len(accepted) >= 50
    assert max(sum(1 for b in accepted if a <= b < a + 60) for a in accepted) <= 20


async def test_the_overall_budget_goes_first_to_finals_then_to_the_chat_that_waited_longest():
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    fillers = [pacer.try_take(f"f{i}", 1.0, STREAM_BUDGET) for i in range(STREAM_BUDGET - 1)]
    assert all(fillers)  # other chats are not blocked by each other
    pacer.release(pacer.try_take("old", 1.0, STREAM_BUDGET))  # a chat that has written
    assert pacer.try_take("new", 1.0, STREAM_BUDGET, queue=True) is None  # the streaming share is used up
    assert pacer.busy  # text is waiting: no typing indicators and no status lines now
    assert pacer.try_take("queued", 1.0, FINAL_BUDGET, queue=True, status=True) is None
    assert pacer.try_take("final", 1.0, FINAL_BUDGET) is not None  # a complete message still goes
    await clock.advance(WINDOW + MARGIN + 0.05)  # "old"'s write left the window; "new" is still queued
    pacer.release(fillers.pop())
    assert pacer.try_take("new", 1.0, STREAM_BUDGET, queue=True) is None  # asks again (still full)
    await clock.advance(WINDOW)  # one filler's place is free again (the final still counts)
    assert pacer.try_take("old", 1.0, STREAM_BUDGET, queue=True) is None  # asked first, but...
    assert pacer.try_take("new", 1.0, STREAM_BUDGET, queue=True) is not None  # ..."new" waited longer


async def test_typing_takes_only_spare_budget():
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    typing = [pacer.try_spare() for _ in range(SPARE_BUDGET + 3)]
    assert sum(1 for s in typing if s) == SPARE_BUDGET  # never more than the spare share
    for slot in typing:
        if slot:
            pacer.release(slot)
    assert pacer.try_take("1", 1.0, STREAM_BUDGET) is not None  # text still has its share
    assert pacer.stats.typing == SPARE_BUDGET and pacer.stats.typing_skipped == 3


def _bot(fake: FakeTelegram) -> Bot:
    request = HTTPXRequest(connection_pool_size=128, read_timeout=30, connect_timeout=30, pool_timeout=30)
    return Bot(TOKEN, base_url=fake.base_url, request=request)


async def _stream_in_rounds(fake: FakeTelegram, stream: ReplyStream, chat: int, rounds: int) -> str:
    """Feed a chunk whenever the previous one was accepted, so the stream always wants to write
    as soon as it may; then finish. Returns the whole text."""
    text = ""
    for k in range(rounds):
        chunk = f"r{k}w{chat}s{id(stream)} "
        stream.feed(chunk)
        text += chunk
        await fake.wait_until(lambda: any(w.chat_id == chat and chunk in w.text + " " for w in fake.writes))
    await stream.finish()
    return text


def _spacing(fake: FakeTelegram) -> dict[int, list[float]]:
    gaps: dict[int, list[float]] = defaultdict(list)
    last: dict[int, float] = {}
    for w in fake.writes:
        if w.chat_id in last:
            gaps[w.chat_id].append(w.at - last[w.chat_id])
        last[w.chat_id] = w.at
    return gaps


async def test_heavy_jitter_never_brings_two_writes_of_a_chat_within_a_second():
    # Requests take 0.2-0.6 s and are accepted anywhere in between; two answers stream into one
    # chat (e.g. a second question's status while the first answer streams). Spacing writes from
    # when they started would put accepted writes less than a second apart.
    async with FakeTelegram(TOKEN, jitter=(0.2, 0.6), seed=3) as fake:
        chat = fake.private_chat(7)
        pacer = Pacer()
        async with _bot(fake) as bot:
            streams = [
                ReplyStream(TelegramSurface(bot, pacer, chat, is_group=False, owner_id="7", lang="en")).start()
                for _ in range(2)
            ]
            texts = await asyncio.gather(*(_stream_in_rounds(fake, s, chat, rounds=4) for s in streams))
        assert sorted(fake.texts(chat)) == sorted(t.strip() for t in texts)
        assert fake.flood_429s == 0 and pacer.stats.rate_limited == 0
        assert len(fake.writes) >= 8 and min(_spacing(fake)[chat]) >= 1.0


async def test_forty_chats_share_the_overall_budget_without_a_429():
    async with FakeTelegram(TOKEN) as fake:  # default jitter: 3-60 ms per request
        chats = [fake.private_chat(100 + i) for i in range(40)]
        pacer = Pacer()
        async with _bot(fake) as bot:
            streams = {
                c: ReplyStream(TelegramSurface(bot, pacer, c, is_group=False, owner_id=str(c), lang="en")).start()
                for c in chats
            }
            texts = await asyncio.gather(*(_stream_in_rounds(fake, streams[c], c, rounds=3) for c in chats))
        assert fake.flood_429s == 0 and not [e for e in fake.errors if e[1] == 429]
        for chat, text in zip(chats, texts):
            assert fake.texts(chat) == [text.strip()]
            assert len([w for w in fake.writes if w.chat_id == chat]) >= 3  # every chat streamed
        assert pacer.stats.deferred > 0  # the budget was short: edits were left out, not refused
        # the fake's own counting: never more than 30 accepted writes in a second
        times = [w.at for w in fake.writes]
        assert max(sum(1 for b in times if a <= b < a + 1.0) for a in times) <= 30


async def test_answers_in_one_group_share_its_twenty_a_minute():
    async with FakeTelegram(TOKEN) as fake:
        group = fake.group_chat(-1001)
        pacer = Pacer()
        async with _bot(fake) as bot:
            streams = [
                ReplyStream(TelegramSurface(bot, pacer, group, is_group=True, owner_id=str(u), lang="en")).start()
                for u in (1, 2)
            ]
            for i, stream in enumerate(streams):
                stream.feed(f"answer {i}")
            await asyncio.gather(*(s.finish() for s in streams))
        assert sorted(fake.texts(group)) == ["answer 0", "answer 1"]
        assert fake.flood_429s == 0
        assert min(_spacing(fake)[group]) >= GROUP_INTERVAL
