"""Discord pacing: one overall budget and one per channel / interaction token; acknowledgements
and finals first, streaming answers fairly, status lines only from spare budget. Unit tests on
virtual time, then bursts through the real discord.py against the strict fake Discord (request
jitter; 50 bot-token requests in any second, interaction routes exempt as Discord documents)."""

from __future__ import annotations

import asyncio

from adapters.discord.pacing import CHANNEL, OVERALL, STATUS_BUDGET, STATUS_KEEP, STREAM_BUDGET, TOKEN, Pacer
from tests.discord_harness import answer_text, is_done, stack, until_done
from tests.surfaces import FakeClock


async def test_status_lines_never_take_places_text_needs():
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    channel = "channel:1"
    taken = [pacer.try_take(channel, "streaming", answer=f"a{i}") for i in range(CHANNEL[0] - STATUS_KEEP)]
    assert all(taken)
    assert pacer.try_take(channel, "status") is None  # the channel's last places are for text
    assert pacer.try_take(channel, "streaming", answer="a9") is not None
    assert pacer.try_take("channel:2", "status") is not None  # another channel has room
    # overall: status goes only below its share, and never while text waits
    others = [pacer.try_take(f"channel:c{i}", "streaming", answer=f"t{i}") for i in range(STATUS_BUDGET)]
    assert all(others)
    assert pacer.try_take("channel:x", "status") is None
    assert pacer.try_take("token:x", "status") is not None  # an interaction's own window only
    assert pacer.stats.status_skipped == 2


async def test_streaming_yields_to_acknowledgements_and_to_answers_that_waited_longer():
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    fillers = [pacer.try_take(f"channel:{i}", "streaming", answer=f"f{i}") for i in range(STREAM_BUDGET - 1)]
    assert all(fillers)
    pacer.release(pacer.try_take("channel:old", "streaming", answer="old"))  # an answer that has written
    assert pacer.try_take("channel:new", "streaming", answer="new") is None  # the streaming share is full
    assert pacer.busy
    urgent = [pacer.try_take(None, "urgent") for _ in range(OVERALL[0] - STREAM_BUDGET)]
    assert all(urgent)  # acknowledgements still go
    assert pacer.try_take(None, "urgent") is None  # ...up to the overall budget
    waiting = asyncio.create_task(pacer.take(None, "urgent"))
    await clock.advance(0.5)
    assert not waiting.done()
    for slot in urgent:
        pacer.release(slot)
    await clock.advance(1.1)  # those places are free again: the waiting acknowledgement goes first
    assert waiting.done()
    assert pacer.try_take("channel:new", "streaming", answer="new") is None  # asks again (still full)
    pacer.release(fillers.pop())
    await clock.advance(1.0)  # one streaming place is free
    assert pacer.try_take("channel:old", "streaming", answer="old") is None  # asked first, but...
    assert pacer.try_take("channel:new", "streaming", answer="new") is not None  # ..."new" waited longer


async def test_interaction_routes_keep_only_their_token_window():
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    full = [pacer.try_take(None, "urgent") for _ in range(OVERALL[0])]
    assert all(full) and pacer.try_take("channel:1", "final") is None  # the overall budget is spent
    # ...yet interactions are acknowledged and their answers stream, within each token's window
    assert all(pacer.try_take("interaction", "urgent") for _ in range(100))
    edits = [pacer.try_take("token:a", "streaming", answer="a") for _ in range(TOKEN[0] + 1)]
    assert all(edits[: TOKEN[0]]) and edits[-1] is None
    assert pacer.try_take("token:b", "streaming", answer="b") is not None
    for slot in edits[: TOKEN[0]]:
        pacer.release(slot)
    waiting = asyncio.create_task(pacer.take("token:a", "final"))
    await clock.advance(TOKEN[1] - 0.1)
    assert not waiting.done()  # the token's window still holds its five writes
    await clock.advance(0.2)
    assert waiting.done()


async def test_sixty_slash_commands_and_sixty_mentions_at_once_meet_no_429_and_every_one_is_answered(make_app):
    # 60 mentions in 60 channels need 120 bot-token writes (a reply, its final edit) against 50 in
    # any second; the 60 slash commands beside them go by their tokens, which Discord exempts from
    # the overall limit. The model answers one at a time (others see their queue position), and
    # every request takes 3-60 ms.
    async with stack(make_app, rate_limit_messages=100) as (fake, app, adapter):
        users = [fake.add_user(f"user{i}") for i in range(60)]
        channels = [fake.add_channel(f"room{i}", fake.guild) for i in range(60)]
        asked = await asyncio.gather(*(fake.send_message(u, c, "ping", mention_bot=True) for u, c in zip(users, channels)))
        interactions = await asyncio.gather(*(fake.slash("chat", u, prompt="ping") for u in users))
        for interaction in interactions:
            await until_done(fake, interaction)

        def replies() -> dict:
            return {m.reference_id: m for m in fake.bot_messages() if m.reference_id is not None}

        await fake.wait_for(lambda: all(is_done(replies().get(q.id)) for q in asked), "every mention answered")
        assert fake.rate_limited == 0 and fake.errors == [], (fake.errors, fake.global_hits)
        assert all(i.acked_at - i.dispatched_at < 3 for i in interactions)  # none missed its deadline
        assert [answer_text(i.messages) for i in interactions] == ["pong"] * 60
        assert [answer_text([replies()[q.id]]) for q in asked] == ["pong"] * 60
        assert adapter.pacer.stats.requests >= 3 * 60  # every acknowledgement and every write took a place
        assert adapter.pacer.stats.waited > 0  # the mentions did meet the overall budget
