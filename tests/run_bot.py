"""`python -m tests.run_bot [mode]`: the real bot command line in its own process, for tests
that kill it. discord.py is pointed at a fake Discord (FAKE_DISCORD_API, FAKE_DISCORD_GATEWAY),
and TEST_SECONDS_PER_TOKEN slows the tiny model down (real tokens, a human-visible pace) so a
test can act while an answer streams."""

from __future__ import annotations

import os
import sys
import time


def _point_discord_at_the_fake() -> None:
    import discord.gateway
    import discord.http
    import yarl

    discord.http.Route.BASE = os.environ["FAKE_DISCORD_API"]
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(os.environ["FAKE_DISCORD_GATEWAY"])


def _slow_down(seconds: float) -> None:
    import transformers

    forward = transformers.LlamaForCausalLM.forward

    def slow_forward(self, *args, **kwargs):
        time.sleep(seconds)
        return forward(self, *args, **kwargs)

    transformers.LlamaForCausalLM.forward = slow_forward


# At module level, not under __main__: the model generates in a spawned process, which imports
# this module again (as __mp_main__), and the slow-down must apply there.
if os.environ.get("TEST_SECONDS_PER_TOKEN"):
    _slow_down(float(os.environ["TEST_SECONDS_PER_TOKEN"]))


if __name__ == "__main__":
    if os.environ.get("FAKE_DISCORD_API"):
        _point_discord_at_the_fake()
    from launcher.cli import main

    sys.exit(main(sys.argv[1:]))
