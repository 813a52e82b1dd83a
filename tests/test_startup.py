"""What the bot does at start so that the first user does not wait: model-server clients are
set up (no import or client creation on the first message), in-process models load at start
with PRELOAD_MODELS=1 (lazily otherwise), and the first write of an answer is its text."""

from __future__ import annotations

from bot.app import App
from bot.messages import Incoming
from models.openai_backend import OpenAIBackend
from models.transformers_backend import TransformersBackend
from tests.openai_server import OpenAICompatibleServer
from tests.surfaces import RecordingSurface


def ask(text: str, user: str = "u1") -> Incoming:
    return Incoming(platform="console", chat_id="c1", user_id=user, text=text)


async def test_model_server_clients_are_set_up_and_warmed_at_start(make_settings, tiny_chat_model):
    backend = TransformersBackend(tiny_chat_model, device="cpu")
    backend.load()
    async with OpenAICompatibleServer({"served": backend}) as server:
        settings = make_settings(chat_backend="openai", chat_base_url=server.base_url, chat_model="served")
        app = App(settings)
        try:
            assert app.hub.get("chat").backend is None
            await app.prepare()
            client = app.hub.get("chat").backend
            assert isinstance(client, OpenAIBackend) and client._client is not None  # the client exists
            await client._warming  # one cheap request opened the connection
            assert app.hub.get("bajie").backend is None  # in-process models stay lazy by default
            surface = RecordingSurface(max_length=4096, interval=1.0)
            await app.handle(ask("ping"), surface)
            assert surface.messages == ["pong"]
            assert [g.model for g in server.generations] == ["served"]
        finally:
            app.store.close()


async def test_a_model_server_that_is_not_up_yet_does_not_hold_the_start(make_settings):
    # nothing listens on port 9 (the server may start after the bot)
    settings = make_settings(chat_backend="openai", chat_base_url="http://127.0.0.1:9/v1", chat_model="served")
    app = App(settings)
    try:
        await app.prepare()
        client = app.hub.get("chat").backend
        await client._warming  # failed quietly: the first user's request tries again
        assert client._warming.exception() is None
    finally:
        app.store.close()


async def test_preload_models_loads_in_process_models_at_start_and_the_first_write_is_text(make_app):
    app = make_app(preload_models=True)
    await app.prepare()
    assert app.hub.get("chat").backend is not None and app.hub.get("bajie").backend is not None
    surface = RecordingSurface(max_length=4096, interval=1.0)
    await app.handle(ask("ping"), surface)
    assert surface.writes and all(w.phase != "status" for w in surface.writes)  # no "loading…" line
    assert surface.messages == ["pong"]
