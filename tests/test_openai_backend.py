"""The openai backend against a local OpenAI-compatible server (tests/openai_server.py) that
serves the tiny models for real: request format, SSE parsing, stop words, images, cancellation,
and the faults a real deployment has (server down, 500s, a stream cut mid-answer, a hung engine)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

import pytest

from bot.i18n import t
from bot.messages import ImageAttachment, Incoming
from bot.personas import BAJIE_SYSTEM_PROMPT, INTERNLM_SYSTEM_PROMPT
from bot.vision_feature import XCOMPOSER_SYSTEM_PROMPT
from models.base import Cancel, ChatMessage, GenerationParams, ModelError, ModelUnavailable, StreamStats
from models.openai_backend import OpenAIBackend, ServerUnavailable, approx_tokens
from tests import tiny_models, tiny_vlm
from tests.openai_server import OpenAICompatibleServer, load_backend
from tests.surfaces import RecordingSurface
from tests.test_images import encode
from tests.waiting import until


GREEDY = GenerationParams(max_new_tokens=64, temperature=0.0)


@pytest.fixture(scope="session")
def served(tiny_chat_model, tiny_bajie_model) -> dict:
    """The tiny models, loaded once, as the server's backends (served names → backends)."""
    return {
        "tiny-chat": load_backend(str(tiny_chat_model)),
        "tiny-bajie": load_backend(str(tiny_bajie_model)),
        "tiny-vlm": load_backend(str(tiny_vlm.vision_model_path())),
    }


def openai_settings(server: OpenAICompatibleServer, **overrides) -> dict:
    values = dict(
        chat_backend="openai", chat_base_url=server.base_url, chat_model="tiny-chat",
        bajie_backend="openai", bajie_base_url=server.base_url, bajie_model="tiny-bajie",
        agent_backend="openai", agent_base_url=server.base_url, agent_model="tiny-chat",
        vision_backend="openai", vision_base_url=server.base_url, vision_model="tiny-vlm",
        openai_max_retries=1, openai_timeout=30.0,
    )
    values.update(overrides)
    return values


def backend(server: OpenAICompatibleServer, model: str = "tiny-chat", **kw) -> OpenAIBackend:
    kw.setdefault("backoff", 0.01)
    return OpenAIBackend(base_url=server.base_url, model=model, **kw)


async def collect(b: OpenAIBackend, messages: list[ChatMessage], params: GenerationParams = GREEDY, **kw) -> list[str]:
    async with aclosing(b.stream(messages, params=params, cancel=kw.pop("cancel", Cancel()), **kw)) as deltas:
        return [d async for d in deltas]


def user(text: str, image=None) -> list[ChatMessage]:
    return [ChatMessage("user", text, image=image)]


async def ask(app, text: str = "", image: ImageAttachment | None = None, lang: str = "en", user_id: str = "u1") -> str:
    surface = RecordingSurface()
    await app.handle(Incoming(platform="test", chat_id="c1", user_id=user_id, text=text, image=image, language=lang), surface)
    return surface.visible


def png(color: str) -> ImageAttachment:
    data = encode(tiny_vlm.solid_image(color), "PNG")

    async def fetch() -> bytes:
        return data

    return ImageAttachment(fetch=fetch, size=len(data), filename=f"{color}.png", mime_type="image/png")


async def test_every_role_runs_through_the_server(make_app, served):
    async with OpenAICompatibleServer(served) as server:
        app = make_app(**openai_settings(server))
        assert await ask(app, "ping") == "pong"
        chat_request = server.requests[-1]
        assert chat_request["stream"] is True and chat_request["model"] == "tiny-chat"
        assert chat_request["messages"] == [{"role": "system", "content": INTERNLM_SYSTEM_PROMPT}, {"role": "user", "content": "ping"}]
        assert chat_request["temperature"] == 0.0 and chat_request["max_tokens"] == 64
        assert await ask(app, "/bajie ping") == "俺老猪听见了：pong"
        assert server.requests[-1]["messages"][0] == {"role": "system", "content": BAJIE_SYSTEM_PROMPT}
        assert await ask(app, "recall") == tiny_models.BAJIE_UNKNOWN  # history goes along
        assert len(server.requests[-1]["messages"]) == 4
        # The picture goes as a base64 JPEG data URL, shrunk by the intake first.
        assert await ask(app, "这张图里有什么？", png("red")) == "red"
        parts = server.requests[-1]["messages"][1]["content"]
        assert server.requests[-1]["messages"][0] == {"role": "system", "content": XCOMPOSER_SYSTEM_PROMPT}
        assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert parts[1] == {"type": "text", "text": "这张图里有什么？"}
        assert server.generations[-1].messages[1].image.size == (64, 48)  # smaller than the intake's cap
        assert await ask(app, "And now?") == "red"  # the follow-up sends the picture again
        assert server.requests[-1]["messages"][1]["content"][0]["type"] == "image_url"
        # The agent role: same server and model as chat, so one client and one queue.
        assert app.hub.get("agent") is app.hub.get("chat")
        stats = StreamStats()
        deltas = app.hub.get("agent").stream(user("ping"), params=GREEDY, cancel=Cancel(), tenant="t", stats=stats)
        assert "".join([d async for d in deltas]) == "pong"
        assert stats.completion_tokens >= 1 and stats.prompt_tokens > 0


async def test_stop_words_are_sent_and_the_answer_ends_before_them(served):
    async with OpenAICompatibleServer(served) as server:
        params = GREEDY.with_(stop=("four", "nine"))
        text = "".join(await collect(backend(server), user("count"), params))
        assert text == "one two three "
        assert server.requests[-1]["stop"] == ["four", "nine"]
        assert server.generations[-1].text == "one two three "  # the server stopped, not just the client


async def test_cancel_closes_the_stream_and_the_server_stops_generating(served):
    async with OpenAICompatibleServer(served) as server:
        b = backend(server)
        cancel = Cancel()
        got = []
        async with aclosing(b.stream(user("code"), params=GREEDY.with_(max_new_tokens=3000), cancel=cancel)) as deltas:
            async for delta in deltas:
                got.append(delta)
                if len(got) == 3:
                    cancel.set()
        assert 3 <= len(got) < 50
        generation = server.generations[-1]
        await generation.done.wait()
        assert generation.finish == "disconnected" and generation.completion_tokens < 3000
        assert served["tiny-chat"].in_flight == 0  # the engine dropped the row
        # Leaving early (the consumer goes away) closes the connection just the same.
        async with aclosing(b.stream(user("code"), params=GREEDY.with_(max_new_tokens=3000), cancel=Cancel())) as deltas:
            async for _ in deltas:
                break
        generation = server.generations[-1]
        await generation.done.wait()
        assert generation.finish == "disconnected" and generation.completion_tokens < 3000


async def test_cancel_while_the_server_is_still_silent(served):
    async with OpenAICompatibleServer(served) as server:
        server.stall_next(30)
        cancel = Cancel()
        task = asyncio.create_task(collect(backend(server), user("ping"), cancel=cancel))
        await until(lambda: server.requests)  # the server has the request and says nothing
        cancel.set()
        assert await task == []


async def test_cancel_while_the_stream_is_silent(served):
    async with OpenAICompatibleServer(served) as server:
        server.pause_after(2, 20)
        cancel = Cancel()
        got: list[str] = []

        async def consume() -> None:
            async with aclosing(backend(server).stream(user("count"), params=GREEDY, cancel=cancel)) as deltas:
                async for delta in deltas:
                    got.append(delta)

        task = asyncio.create_task(consume())
        while len(got) < 2:
            await asyncio.sleep(0.02)
        cancel.set()
        await task  # the silent read was interrupted by closing the stream
        assert len(got) == 2 and tiny_models.COUNT_ANSWER.startswith("".join(got))


async def test_server_down_gives_a_clear_message_and_it_recovers_by_itself(make_app, served, caplog):
    async with OpenAICompatibleServer(served) as server:
        app = make_app(**openai_settings(server))
        assert await ask(app, "ping") == "pong"
        await server.go_down()
        with caplog.at_level(logging.WARNING):
            assert await ask(app, "ping") == t("model_server_down", "en")
            assert await ask(app, "ping", lang="zh") == t("model_server_down", "zh")
        assert any("cannot reach the server" in r.getMessage() for r in caplog.records)
        await server.come_up()
        assert await ask(app, "ping") == "pong"


async def test_500s_are_retried_and_a_persistent_500_fails_the_answer(make_app, served):
    async with OpenAICompatibleServer(served) as server:
        server.fail_next(2, 500)
        assert "".join(await collect(backend(server, max_retries=3), user("ping"))) == "pong"
        assert len(server.requests) == 3
        server.fail_next(3, 500)
        with pytest.raises(ModelError) as info:
            await collect(backend(server, max_retries=2), user("ping"))
        assert not isinstance(info.value, ModelUnavailable) and "HTTP 500" in str(info.value)
        server.fail_next(2, 503)  # a proxy whose engines are all gone: "down"
        with pytest.raises(ServerUnavailable):
            await collect(backend(server, max_retries=1), user("ping"))
        app = make_app(**openai_settings(server))
        server.fail_next(2, 500)  # OPENAI_MAX_RETRIES=1: two attempts
        assert await ask(app, "ping") == t("model_failed", "en")
        assert len(server.requests) == 3 + 3 + 2 + 2


async def test_a_stream_cut_mid_answer(make_app, served):
    async with OpenAICompatibleServer(served) as server:
        app = make_app(**openai_settings(server))
        server.drop_after(len("one two "))
        shown = await ask(app, "count")
        answer, _, notice = shown.partition("\n\n")
        assert answer.strip() == "one two"  # what was sent before the cut, and nothing more
        assert notice == t("model_failed", "en")
        assert server.generations[-1].finish == "dropped"
        # Cut before anything was shown: retried, and the user never notices.
        server.drop_after(0)
        assert await ask(app, "count", user_id="u2") == tiny_models.COUNT_ANSWER
        assert [g.finish for g in server.generations[-2:]] == ["dropped", "stop"]


async def test_a_hung_server_times_out(served):
    async with OpenAICompatibleServer(served) as server:
        server.stall_next(2)
        server.stall_next(2)
        with pytest.raises(ServerUnavailable, match="timed out"):
            await collect(backend(server, timeout=0.3, max_retries=1), user("ping"))
        assert len(server.requests) == 2


async def test_wrong_model_name_and_api_keys(served, caplog):
    async with OpenAICompatibleServer(served, api_key="s3cret-key-123") as server:
        with pytest.raises(ModelUnavailable) as info:
            await collect(backend(server, model="internlm2-chat-7b", api_key="s3cret-key-123"), user("ping"))
        assert "HTTP 404" in str(info.value) and "CHAT_MODEL" in str(info.value)
        with caplog.at_level(logging.DEBUG):
            assert "".join(await collect(backend(server, api_key="s3cret-key-123"), user("ping"))) == "pong"
            with pytest.raises(ModelUnavailable) as info:
                await collect(backend(server, api_key="wrong-key"), user("ping"))
        assert "CHAT_API_KEY" in str(info.value)
        assert not any("s3cret-key-123" in r.getMessage() for r in caplog.records)


async def test_images_and_text_directly_through_the_backend(served):
    async with OpenAICompatibleServer(served) as server:
        b = backend(server, model="tiny-vlm")
        for color in ("red", "green", "blue"):
            assert "".join(await collect(b, user("what is this", image=tiny_vlm.solid_image(color, (300, 200))))) == color
        assert "".join(await collect(b, user("what is this"))) == tiny_vlm.NO_IMAGE_ANSWER


def test_a_missing_base_url_is_a_clear_configuration_error():
    with pytest.raises(ModelUnavailable, match="VISION_BASE_URL"):
        OpenAIBackend(base_url="", model="x", variable="VISION")


def test_token_estimate_is_sensible(tiny_chat_model):
    from transformers import AutoTokenizer

    assert approx_tokens("") == 0
    assert approx_tokens("你好世界") == 4
    english = "The quick brown fox jumps over the lazy dog. " * 10
    assert 90 <= approx_tokens(english) <= 160  # ~4.5 characters per token, estimated a little high
    b = OpenAIBackend(base_url="http://127.0.0.1:9/v1", model="x")
    with_image = b.count_tokens([ChatMessage("user", "hi", image=object())])
    assert with_image - b.count_tokens([ChatMessage("user", "hi")]) == b.capabilities.image_tokens
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    messages = [ChatMessage("system", INTERNLM_SYSTEM_PROMPT), ChatMessage("user", "ping 你好")]
    real = len(tokenizer.apply_chat_template([m.as_dict() for m in messages], add_generation_prompt=True))
    assert b.count_tokens(messages) >= real


class _Lines:
    """The only part of a streaming response the SSE parser reads."""

    def __init__(self, *lines: str) -> None:
        self.lines = lines

    async def iter_lines(self):
        for line in self.lines:
            yield line


async def test_the_event_stream_parser_follows_the_sse_rules():
    from models.openai_backend import _sse_chunks

    events = _Lines(": keep-alive", "event: message", 'data: {"a":', 'data: 1}', "", "", 'data: {"b": 2}', "",
                    "data: [DONE]", "", 'data: {"never": 1}', "")
    assert [c async for c in _sse_chunks(events)] == [{"a": 1}, {"b": 2}]
    assert [c async for c in _sse_chunks(_Lines('data: {"last": true}'))] == [{"last": True}]  # no blank line at the end
    with pytest.raises(ModelError, match="out of memory"):
        [c async for c in _sse_chunks(_Lines('data: {"error": {"message": "CUDA out of memory"}}', ""))]
    with pytest.raises(ModelError, match="malformed"):
        [c async for c in _sse_chunks(_Lines("data: {oops", ""))]
