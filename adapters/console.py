"""The local console chat: stdin lines in, streamed answers out.

Works interactively (a prompt, statuses on stderr, Ctrl-C stops an answer, Ctrl-C or EOF at
the prompt quits) and piped (`printf 'ping\\n' | python -m launcher console` prints the answer and
exits at end of input). Lines are answered in order; `/stop` typed during an answer acts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import locale
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from bot.app import App
from bot.messages import ImageAttachment, Incoming, Phase, ReplyContext, SurfaceLimits

LIMITS = SurfaceLimits(max_length=1_000_000, min_edit_interval=0.0)


@dataclass
class _Printed:
    text: str = ""


class ConsoleSurface:
    limits = LIMITS
    context: ReplyContext | None = None  # set by the core; the console shows only the text

    def __init__(self, out: TextIO, err: TextIO, tty: bool) -> None:
        self.out, self.err, self.tty = out, err, tty
        self.status_shown = False

    async def post(self, text: str, *, phase: Phase) -> _Printed:
        handle = _Printed()
        await self.edit(handle, text, phase=phase)
        return handle

    async def edit(self, handle: _Printed, text: str, *, phase: Phase) -> None:
        if phase == "status":  # queue and loading notices: stderr, one line, overwritten
            if self.tty:
                self.err.write("\r\033[K" + text)
                self.err.flush()
                self.status_shown = True
            return
        self._clear_status()
        if text.startswith(handle.text):
            self.out.write(text[len(handle.text) :])
        else:  # the text changed in place (e.g. a stop mark replaced): show it again
            self.out.write("\n" + text)
        handle.text = text
        if phase in ("done", "sealed", "notice"):
            self.out.write("\n")
        self.out.flush()

    async def typing(self) -> None:
        pass

    def _clear_status(self) -> None:
        if self.status_shown:
            self.err.write("\r\033[K")
            self.err.flush()
            self.status_shown = False


class ConsoleAdapter:
    name = "console"

    def __init__(self, app: App, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.app = app
        self.stdin, self.out, self.err = stdin, out, err
        self.tty = stdin.isatty() and out.isatty()
        self.user = _user_name()
        self.language = _language()
        self._answering: asyncio.Task | None = None

    def incoming(self, text: str) -> Incoming:
        image = None
        command, _, rest = text.partition(" ")
        if command == "/image" and rest.strip():
            path, _, question = rest.strip().partition(" ")
            image = _file_attachment(Path(path).expanduser())
            text = question
        return Incoming(
            platform="console", chat_id="local", user_id=self.user, user_name=self.user,
            text=text, language=self.language, image=image,
        )

    async def run(self, stop: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        # A daemon thread, not the default executor: a blocked readline must not delay exit.
        threading.Thread(target=self._read, args=(loop, lines), name="console-stdin", daemon=True).start()
        if self.tty:
            self.err.write("InternLM console chat. /help lists the commands; Ctrl-C stops an answer; Ctrl-D quits.\n")
            try:
                loop.add_signal_handler(signal.SIGINT, self._interrupt)
            except (NotImplementedError, RuntimeError):
                pass
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if self.tty:
                    self.out.write("> ")
                    self.out.flush()
                getting = asyncio.create_task(lines.get())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    break
                line = getting.result()
                if line is None:
                    break
                if not line.strip():
                    continue
                surface = ConsoleSurface(self.out, self.err, self.tty)
                self._answering = asyncio.create_task(self.app.handle(self.incoming(line), surface))
                await asyncio.wait({self._answering, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():  # shutting down: the core's policy (finish within the grace, else stop)
                    await self.app.drain(self.name)
                await self._answering
                self._answering = None
        finally:
            stopping.cancel()
            if self.tty:
                try:
                    loop.remove_signal_handler(signal.SIGINT)
                except (NotImplementedError, RuntimeError):
                    pass

    def _read(self, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue) -> None:
        """Runs on the reader thread: `/stop` acts at once, other lines queue in order. End of
        input, or input that cannot be read at all, always ends the console."""
        try:
            for line in self._lines():
                loop.call_soon_threadsafe(self._on_line, line.rstrip("\n"), lines)
        except (OSError, ValueError) as exc:  # stdin closed or broken: treat it as end of input
            if not isinstance(exc, ValueError) or "closed file" not in str(exc):
                self.err.write(f"console: cannot read input ({exc}); stopping\n")
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed first: nobody is waiting
                loop.call_soon_threadsafe(lines.put_nowait, None)

    def _lines(self) -> Iterator[str]:
        """stdin's lines. Bytes are decoded here, with undecodable ones replaced (U+FFFD), so
        invalid UTF-8 reaches the core, which answers with its binary-data notice, instead of
        raising in the reader whatever PYTHONIOENCODING says."""
        raw = getattr(self.stdin, "buffer", None)
        if raw is None:  # a text-only stream (tests): already str
            yield from iter(self.stdin.readline, "")
            return
        encoding = getattr(self.stdin, "encoding", None) or "utf-8"
        for line in iter(raw.readline, b""):
            yield line.decode(encoding, errors="replace")

    def _on_line(self, line: str, lines: asyncio.Queue) -> None:
        if line.strip() == "/stop" and self._answering is not None:
            self.app.stop_for(self.incoming(""))
        else:
            lines.put_nowait(line)

    def _interrupt(self) -> None:
        if self._answering is not None and self.app.stop_for(self.incoming("")):
            return
        os.kill(os.getpid(), signal.SIGTERM)  # Ctrl-C at the prompt quits


def _file_attachment(path: Path) -> ImageAttachment:
    async def fetch() -> bytes:
        return await asyncio.to_thread(path.read_bytes)

    size = path.stat().st_size if path.is_file() else None
    return ImageAttachment(fetch=fetch, size=size, filename=path.name)


def _user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "local"


def _language() -> str:
    for variable in ("LC_ALL", "LC_MESSAGES", "LANG"):
        if os.environ.get(variable):
            return os.environ[variable].split(".")[0]
    return (locale.getlocale()[0] or "en").split(".")[0]
