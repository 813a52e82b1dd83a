"""Backends declare what they can do (`models.base.Capabilities`); callers read the declaration
instead of probing attributes or backend names. Real backends: the tiny chat model, the tiny VLM,
and the openai backend (no server needed to read its declaration)."""

from __future__ import annotations

import pytest

from models.base import Cancel, Capabilities, ChatMessage, GenerationParams, ModelUnavailable
from models.openai_backend import OpenAIBackend
from models.registry import RoleSpec, ScheduledModel
from tests import tiny_vlm

GREEDY = GenerationParams(max_new_tokens=8, temperature=0.0)


async def test_a_text_model_declares_it_runs_the_agent_and_refuses_a_picture(tiny_chat_model):
    model = ScheduledModel(RoleSpec(role="chat", model=str(tiny_chat_model), device="cpu"))
    assert model.capabilities is None  # nothing is known before it is loaded
    await model.ensure_loaded()
    assert model.capabilities == Capabilities(special_tokens=True, agent=True)
    picture = [ChatMessage("user", "what is this?", image=tiny_vlm.solid_image("red", (32, 32)))]
    with pytest.raises(ModelUnavailable, match="does not take pictures"):
        async for _ in model.stream(picture, params=GREEDY, cancel=Cancel(), tenant="t"):
            pass
    text = "".join([d async for d in model.stream([ChatMessage("user", "ping")], params=GREEDY, cancel=Cancel(), tenant="t")])
    assert text == "pong"  # the refusal left the model usable


async def test_a_vision_model_declares_its_picture_size_and_cost():
    model = ScheduledModel(RoleSpec(role="vision", model=str(tiny_vlm.vision_model_path()), device="cpu"))
    backend = await model.ensure_loaded()
    capabilities = backend.capabilities
    assert capabilities.images and not capabilities.agent and not capabilities.special_tokens
    assert capabilities.image_side == 32 and capabilities.image_tokens > 0
    with_picture = backend.count_tokens([ChatMessage("user", "x", image=tiny_vlm.solid_image("red", (32, 32)))])
    assert with_picture - backend.count_tokens([ChatMessage("user", "x")]) >= capabilities.image_tokens


def test_a_model_server_takes_pictures_and_runs_the_agent_with_plain_roles():
    capabilities = OpenAIBackend(base_url="http://127.0.0.1:9/v1", model="m").capabilities
    assert capabilities.images and capabilities.agent and capabilities.image_side == 0
    assert not capabilities.special_tokens  # the server's template renders the roles
