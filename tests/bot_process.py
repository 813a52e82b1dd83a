"""Run the real bot (`python -m bot ...`) as a separate process, for faults that need one:
kill -9, two processes on one DATA_DIR, and a DATA_DIR on a small tmpfs that fills up or is
read-only (mounted in a private mount namespace with `unshare`, no privileges needed)."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bot_env(data_dir: Path, chat_model: Path, bajie_model: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.endswith(("_TOKEN", "_MODEL")) and not k.startswith(("TELEGRAM", "DISCORD"))
    }
    env.update(
        DATA_DIR=str(data_dir), CHAT_MODEL=str(chat_model), BAJIE_MODEL=str(bajie_model), AGENT_MODEL=str(chat_model),
        VISION_MODEL=str(chat_model), DEVICE="cpu", TEMPERATURE="0", MAX_NEW_TOKENS="40", HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1", LANG="en_US.UTF-8",
    )
    env.update(extra)
    return env


def in_tmpfs(data_dir: Path, argv: list[str], *, options: str = "size=4m", before: str = "") -> list[str]:
    """`argv` run with `data_dir` replaced by a fresh tmpfs (`before`: shell run after mounting)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(data_dir))} && {{ {before or 'true'}; }} && exec \"$@\""
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *argv]


def bot_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", *args]


async def start(argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def say(proc: asyncio.subprocess.Process, line: str) -> None:
    proc.stdin.write(line.encode() + b"\n")
    await proc.stdin.drain()


async def read_line(proc: asyncio.subprocess.Process, timeout: float = 180.0) -> str:
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        raise AssertionError(f"the bot closed its output; stderr: {(await proc.stderr.read()).decode()[-2000:]}")
    return line.decode().rstrip("\n")


async def finish(proc: asyncio.subprocess.Process, timeout: float = 120.0) -> tuple[int, str, str]:
    """Close stdin (end of console input) and collect the exit status and the rest of the output."""
    if proc.stdin and not proc.stdin.is_closing():
        proc.stdin.close()
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()
