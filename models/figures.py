"""Figures a loaded model exposes to whoever watches it (the bot's metrics and status page).

Plain numbers kept by `models/` objects and read at scrape time: `models/` knows nothing of
chats or of Prometheus, and the bot never has to ask a backend how it works inside.
"""

from __future__ import annotations

from dataclasses import dataclass

STATES = ("not loaded", "loading", "ready", "failed")


@dataclass
class ModelFigures:
    state: str = "not loaded"  # one of STATES
    error: str = ""  # why loading failed (state "failed")
    device: str = ""  # "cpu", "cuda:0", or the server's URL for a model server
    load_seconds: float | None = None
    memory_bytes: int | None = None  # weights (and, on a GPU, what the process allocated there)
    streams: int = 0  # generations finished
    tokens: int = 0  # tokens generated, all streams together
    generating_seconds: float = 0.0  # time spent streaming (first byte to end), all streams
    last_tokens_per_second: float | None = None  # decode speed of the latest stream
    batch_size: int | None = None  # sequences decoded together now, where the backend batches

    def loading(self) -> None:
        self.state, self.error = "loading", ""

    def loaded(self, seconds: float, device: str, memory_bytes: int | None) -> None:
        self.state, self.load_seconds, self.device, self.memory_bytes = "ready", seconds, device, memory_bytes

    def failed(self, error: str) -> None:
        self.state, self.error = "failed", error

    def stream_done(self, tokens: int, seconds: float) -> None:
        self.streams += 1
        self.tokens += tokens
        self.generating_seconds += seconds
        if tokens and seconds > 0:
            self.last_tokens_per_second = tokens / seconds

