"""InternLM-XComposer2 in-process, with the tiny XComposer2-shaped remote-code checkpoint
(tests/tiny_xcomposer2.py): loading offline (the vision tower from the checkpoint's own weights,
its input size fixed), photos through the console, Telegram and Discord, follow-ups, /stop while
the model reads the prompt, the remote code's prints kept out of the chat, its `[UNUSED_TOKEN_…]`
pieces kept out of answers, and what `check` says about the vision role."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from bot.i18n import t
from models.base import ModelUnavailable
from models.remote_code import TowerShape, clip_config_for, missing_imports, offline_clip_tower, tower_shape
from models.vision import XComposer2Backend
from tests import tiny_vlm, tiny_xcomposer2
from tests.surfaces import RecordingSurface
from tests.test_images import encode
from tests.waiting import until

REMOTE_PRINTS = ("Set max length to", "Position interpolate from")


@pytest.fixture(scope="session")
def tiny_xc() -> Path:
    return tiny_xcomposer2.xcomposer2_model_path()


@pytest.fixture
def xc_app(make_app, tiny_xc):
    def make(**overrides):
        return make_app(vision_model=str(tiny_xc), **overrides)

    return make


def picture(color: str, fmt: str = "PNG") -> bytes:
    return encode(tiny_vlm.solid_image(color), fmt)


async def console(app, *lines: str) -> str:
    from adapters.console import ConsoleAdapter

    out = io.StringIO()
    adapter = ConsoleAdapter(app, stdin=io.StringIO("".join(line + "\n" for line in lines)), out=out, err=io.StringIO())
    await adapter.run()
    return out.getvalue()


class PromptPassGate:
    """Holds the model inside its prompt pass (the vision tower's forward) until released."""

    def __init__(self, backend: XComposer2Backend) -> None:
        self.entered, self.released = threading.Event(), threading.Event()
        vit = backend.model.vit
        original = vit.forward

        def held(*args, **kwargs):
            self.entered.set()
            self.released.wait(300)  # a failed test must not leave the worker blocked for good
            return original(*args, **kwargs)

        vit.forward = held

    async def wait_entered(self) -> None:
        await until(self.entered.is_set)


async def loaded(app) -> XComposer2Backend:
    backend = await app.hub.get("vision").ensure_loaded()
    assert isinstance(backend, XComposer2Backend)
    return backend


# -- loading --------------------------------------------------------------------------------------


def test_the_remote_code_alone_cannot_load_offline_nor_take_its_own_picture_size(tiny_xc):
    """What the bot fixes: the remote code's second download, then CLIP's input-size check."""
    from transformers import AutoModel

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(OSError, match="clip-vit-large-patch14-336"):
        AutoModel.from_pretrained(tiny_xc, trust_remote_code=True)
    with offline_clip_tower(tiny_xc) as asked:
        model = AutoModel.from_pretrained(tiny_xc, trust_remote_code=True).eval()
    assert asked == ["openai/clip-vit-large-patch14-336"]
    pixels = model.vis_processor(tiny_vlm.solid_image("red")).unsqueeze(0)
    assert pixels.shape[-1] == 392
    with pytest.raises(ValueError, match=r"Input image size \(392\*392\) doesn't match model \(336\*336\)"):
        model.encode_img(pixels)


async def test_the_backend_loads_offline_fixes_the_size_and_logs_the_remote_prints(xc_app, caplog, capsys):
    caplog.set_level(logging.INFO)
    app = xc_app()
    backend = await loaded(app)
    assert backend.tower_requests == ["openai/clip-vit-large-patch14-336"]  # asked for, built from the checkpoint
    embeddings = backend.model.vit.vision_tower.vision_model.embeddings
    assert embeddings.image_size == backend.image_side == 392 and backend.image_tokens == 49
    assert backend.dtype == torch.float32 and backend.device == "cpu"
    logged = caplog.text
    assert "model code says: Set max length to 2048" in logged
    assert "model code says: Position interpolate from 6x6 to 7x7" in logged
    assert "XComposer2 runs on the CPU" in logged and "before the first word" in logged
    assert not any(p in capsys.readouterr().out for p in REMOTE_PRINTS)


def test_tower_shape_from_safetensors_and_from_sharded_bin(tiny_xc, tmp_path):
    shape = tower_shape(tiny_xc)
    assert shape == TowerShape(hidden_size=64, intermediate_size=128, num_hidden_layers=1, patch_size=56, positions=50)
    assert (shape.grid, shape.image_side, shape.image_tokens) == (7, 392, 49)
    # The published checkpoints ship sharded .bin files with an index: the same answer from those.
    from safetensors.torch import load_file

    state = load_file(Path(tiny_xc) / "model.safetensors")
    vit = {k: v for k, v in state.items() if k.startswith("vit.")}
    rest = {k: v for k, v in state.items() if not k.startswith("vit.")}
    torch.save(rest, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(vit, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: "pytorch_model-00001-of-00002.bin" for k in rest} | {k: "pytorch_model-00002-of-00002.bin" for k in vit}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert tower_shape(tmp_path) == shape
    # The published tower: ViT-L/14 at 336 px, resized to 35x35 patches.
    published = TowerShape(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, patch_size=14, positions=1226)
    config = clip_config_for("openai/clip-vit-large-patch14-336", published)
    assert (config.image_size, config.patch_size, config.num_attention_heads) == (336, 14, 16)
    assert (published.image_side, published.image_tokens) == (490, 1225)


def published_like(tiny_xc: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint whose code imports torchvision at the top, as published."""
    copy = tmp_path / "xcomposer2_published_imports"
    shutil.copytree(tiny_xc, copy)
    code = copy / "modeling_internlm_xcomposer2.py"
    text = code.read_text()
    code.write_text("from torchvision import transforms  # as published\n" + text)
    return copy


def test_missing_torchvision_is_named_before_loading(tiny_xc, tmp_path):
    assert missing_imports(tiny_xc) == {}  # the tiny code imports torchvision inside try/except
    copy = published_like(tiny_xc, tmp_path)
    assert missing_imports(copy) == {"torchvision": "not installed"}
    with pytest.raises(ModelUnavailable, match=r"needs torchvision \(not installed\).*pip install -e '\.\[gpu\]'"):
        XComposer2Backend(str(copy), device="cpu").load()


async def test_a_conversation_without_a_picture_runs_on_the_cpu(xc_app):
    """The published `chat` moves a text-only prompt to `.cuda()`; the backend builds it itself."""
    from models.base import Cancel, ChatMessage, GenerationParams

    backend = await loaded(xc_app())
    params = GenerationParams(max_new_tokens=4, temperature=0.0)
    messages = [ChatMessage("system", "You are a test."), ChatMessage("user", "hello")]
    deltas = [d async for d in backend.stream(messages, params=params, cancel=Cancel())]
    backend.last_worker.join(10)
    assert not backend.last_worker.is_alive() and all("[UNUSED_TOKEN_" not in d for d in deltas)


async def test_float16_the_gpus_dtype_answers_the_same(tiny_xc):
    """What a CUDA host runs (float16 weights, pictures and embeddings), here on the CPU."""
    from models.base import Cancel, ChatMessage, GenerationParams

    backend = XComposer2Backend(str(tiny_xc), device="cpu", dtype="float16")
    await asyncio.to_thread(backend.load)
    assert next(backend.model.parameters()).dtype == torch.float16
    params = GenerationParams(max_new_tokens=8, temperature=0.0)
    for color in ("red", "blue"):
        messages = [ChatMessage("user", "what is this", image=tiny_vlm.solid_image(color))]
        assert "".join([d async for d in backend.stream(messages, params=params, cancel=Cancel())]) == color


# -- the console ----------------------------------------------------------------------------------


async def test_console_photo_follow_up_and_unused_token_pieces(xc_app, tmp_path, capsys):
    app = xc_app()
    red, blue = tmp_path / "red.png", tmp_path / "blue.jpg"
    red.write_bytes(picture("red"))
    blue.write_bytes(picture("blue", "JPEG"))
    out = await console(app, f"/image {red} what is this", "And now?", f"/image {blue} {tiny_xcomposer2.TOOL_QUESTION}")
    # The last answer is "[UNUSED_TOKEN_144]blue[UNUSED_TOKEN_143]" as the model wrote it.
    assert out.splitlines() == ["red", "red", "blue"]
    assert not any(p in out + capsys.readouterr().out for p in REMOTE_PRINTS)
    backend = app.hub.get("vision").backend
    prompt = app.hub.get("vision").last_prompt
    assert prompt[1].image is not None and max(prompt[1].image.size) <= backend.image_side


async def test_console_stop_during_the_prompt_pass(xc_app, tmp_path):
    from adapters.console import ConsoleAdapter

    app = xc_app()
    gate = PromptPassGate(await loaded(app))
    red = tmp_path / "red.png"
    red.write_bytes(picture("red"))
    read_fd, write_fd = os.pipe()
    stdin, writer = os.fdopen(read_fd, "r"), os.fdopen(write_fd, "w")
    out = io.StringIO()
    runner = asyncio.create_task(ConsoleAdapter(app, stdin=stdin, out=out, err=io.StringIO()).run())
    writer.write(f"/image {red} what is this\n")
    writer.flush()
    await gate.wait_entered()
    writer.write("/stop\n")
    writer.flush()
    await until(lambda: t("stopped_mark", "en") in out.getvalue())  # while the model is held in its prompt pass
    assert t("stopped_mark", "en") in out.getvalue() and not gate.released.is_set()
    gate.released.set()
    writer.write("And now?\n")
    writer.close()
    await runner
    lines = out.getvalue().splitlines()
    assert lines[-1] == "red" and "red" not in lines[:-1]  # nothing of the stopped answer was shown


# -- through the core, Telegram and Discord -------------------------------------------------------


async def test_stop_during_the_prompt_pass_is_acknowledged_at_once_and_shows_no_tokens(xc_app):
    from bot.messages import ImageAttachment, Incoming

    app = xc_app()
    backend = await loaded(app)
    gate = PromptPassGate(backend)
    data = picture("red")

    async def fetch() -> bytes:
        return data

    question = Incoming(platform="test", chat_id="c1", user_id="u1", text="what is this?",
                        image=ImageAttachment(fetch=fetch, size=len(data), filename="red.png", mime_type="image/png"))
    answer = RecordingSurface()
    task = asyncio.create_task(app.handle(question, answer))
    await gate.wait_entered()
    stop = RecordingSurface()
    await app.handle(Incoming(platform="test", chat_id="c1", user_id="u1", text="/stop"), stop)
    assert stop.visible == t("stop_done", "en")
    await until(lambda: answer.visible == t("stopped_mark", "en"))
    assert answer.visible == t("stopped_mark", "en") and not task.done()  # the model still holds its prompt pass
    gate.released.set()
    await task
    assert answer.visible == t("stopped_mark", "en")
    assert all("red" not in m for m in answer.messages)
    backend.last_worker.join(10)
    assert not backend.last_worker.is_alive()
    [q, a] = app.store.history(app.session_key(question), "vision")
    assert (a.status, a.content) == ("stopped", "")
    follow_up = RecordingSurface()
    await app.handle(Incoming(platform="test", chat_id="c1", user_id="u1", text="And now?"), follow_up)
    assert follow_up.visible == "red"


async def test_telegram_photo_follow_up_and_stop_during_the_prompt_pass(xc_app):
    from tests.fake_telegram import FakeTelegram
    from tests.telegram_harness import TOKEN, running_bot, telegram_settings

    async with FakeTelegram(TOKEN) as fake:
        app = xc_app(**telegram_settings(fake))
        async with running_bot(app):
            chat = fake.private_chat(42)
            fake.send_photo(chat, 42, picture("red", "JPEG"), caption="what is this?")
            await fake.wait_until(lambda: "red" in fake.texts(chat))
            fake.send_text(chat, 42, "And now?")
            await fake.wait_until(lambda: fake.texts(chat).count("red") == 2)
            gate = PromptPassGate(app.hub.get("vision").backend)
            fake.send_photo(chat, 42, picture("blue", "JPEG"), caption="这张图里有什么？")
            await gate.wait_entered()
            fake.send_text(chat, 42, "/stop")
            await fake.wait_until(lambda: t("stop_done", "en") in fake.texts(chat)
                                  and t("stopped_mark", "en") in fake.texts(chat))
            assert not gate.released.is_set()
            gate.released.set()
            fake.send_text(chat, 42, "And now?")
            await fake.wait_until(lambda: "blue" in fake.texts(chat))
            texts = fake.texts(chat)
            assert texts.count("blue") == 1 and texts.index(t("stopped_mark", "en")) < texts.index("blue")
            assert not any(p in text for text in texts for p in REMOTE_PRINTS)
        assert fake.flood_429s == 0


async def test_discord_photo_follow_up_and_stop_during_the_prompt_pass(xc_app):
    from tests.discord_harness import answer_text, is_done, running
    from tests.fake_discord import FakeDiscord

    async with FakeDiscord() as fake:
        app = xc_app(discord_bot_token=fake.token)
        async with running(app, fake):
            upload = fake.add_file("red.png", picture("red"), "image/png")
            first = await fake.slash("image", fake.alice, image=upload, question="what is this?")
            await fake.wait_for(lambda: first.messages and is_done(first.messages[-1]), "/image")
            assert answer_text(first.messages) == "red"
            question = await fake.send_message(fake.alice, fake.channel, "And now?", mention_bot=True)
            reply = await fake.wait_for(
                lambda: next((m for m in fake.bot_messages() if m.reference_id == question.id and is_done(m)), None), "reply")
            assert answer_text([reply]) == "red"
            gate = PromptPassGate(app.hub.get("vision").backend)
            upload = fake.add_file("blue.png", picture("blue"), "image/png")
            held = await fake.slash("image", fake.alice, image=upload, question="what is this?")
            await gate.wait_entered()
            stop = await fake.slash("stop", fake.alice)
            await fake.wait_for(lambda: stop.original is not None and stop.original.content == t("stop_done", "en"), "/stop")
            await fake.wait_for(lambda: held.messages and held.messages[-1].content.endswith(t("stopped_mark", "en")), "stopped")
            assert not gate.released.is_set()
            gate.released.set()
            await fake.wait_for(lambda: held.messages and is_done(held.messages[-1]), "stopped answer done")
            assert "blue" not in answer_text(held.messages)
            question = await fake.send_message(fake.alice, fake.channel, "And now?", mention_bot=True)
            reply = await fake.wait_for(
                lambda: next((m for m in fake.bot_messages() if m.reference_id == question.id and is_done(m)), None), "reply")
            assert answer_text([reply]) == "blue"
            everything = " ".join(m.content for m in fake.bot_messages())
            assert not any(p in everything for p in REMOTE_PRINTS)
            assert fake.errors == []


# -- check --------------------------------------------------------------------------------------


def test_check_says_where_each_model_comes_from_and_whether_the_vision_role_is_ready(
    make_settings, tiny_xc, tmp_path, capsys, monkeypatch,
):
    from launcher.cli import check

    from bot.config import Settings

    for name in ("VISION_MODEL", "BAJIE_MODEL", "BAJIE_HUB", "MODEL_HUB"):
        monkeypatch.delenv(name, raising=False)
    default = Settings(_env_file=None)
    assert (default.vision_model, default.bajie_model) == ("internlm/internlm-xcomposer2-vl-1_8b", "JimmyMa99/BaJie-Chat-mini")
    assert (default.hub_for("bajie"), default.hub_for("chat")) == ("modelscope", "huggingface")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))  # empty: nothing downloaded
    defaults = make_settings(bajie_model="JimmyMa99/BaJie-Chat-mini", bajie_hub="modelscope",
                             vision_model="internlm/internlm-xcomposer2-vl-1_8b")
    assert check(defaults) == 1
    out = capsys.readouterr().out
    assert ("model bajie  [transformers] JimmyMa99/BaJie-Chat-mini: not downloaded yet; it will be fetched from "
            "ModelScope (modelscope.cn) on first use") in out
    assert ("model vision [transformers] internlm/internlm-xcomposer2-vl-1_8b: not downloaded yet; it will be "
            "fetched from Hugging Face (huggingface.co) on first use") in out
    assert "  vision: NOT READY: InternLM-XComposer2: its code needs torchvision (not installed)." in out

    assert check(make_settings(vision_model=str(tiny_xc))) == 0
    out = capsys.readouterr().out
    assert f"model vision [transformers] {tiny_xc}: local directory" in out
    assert ("  vision: ready: InternLM-XComposer2, on the CPU in float32 (slow: minutes per answer); vision tower "
            "built from its own weights (ViT 64 wide, 1 layers, 56-pixel patches, 392-pixel pictures = 49 image "
            "tokens), no second download") in out

    assert check(make_settings(vision_model=str(published_like(tiny_xc, tmp_path)))) == 1
    assert "  vision: NOT READY: InternLM-XComposer2 cannot load: its code needs torchvision (not installed)" in capsys.readouterr().out
