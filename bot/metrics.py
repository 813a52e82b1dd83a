"""Prometheus metrics of one bot process (prometheus-client), and the recent figures behind the
status page's charts.

Labels stay bounded: platform names, persona names, model names from the configuration, API
method names, and fixed outcome words. Never user ids or message text (per-user usage lives in
`bot/usage.py`, shown on the token-protected status page only).

Model-side figures (state, load time, memory, tokens, queue) are read from `models/` objects at
scrape time by `ModelCollector`, so generation itself pays nothing for them.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from models.figures import STATES
from models.registry import ModelHub

from .recent import RecentFigures
from .usage import UsageLog

PREFIX = "internlm_bot"
OUTCOMES = ("answered", "stopped", "failed", "refused", "rate_limited")
API_RESULTS = ("ok", "429", "error")
SANDBOX_OUTCOMES = ("ok", "error", "timeout", "memory_cap", "output_cap", "cancelled", "refused")
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0)
ANSWER_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0, 300.0)
EDIT_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144)
SANDBOX_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    """Every metric of one App, in its own registry (tests run several Apps in one process)."""

    def __init__(self, hub: ModelHub | None = None, *, clock: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.recent = RecentFigures(clock=clock) if clock else RecentFigures()
        self.usage = UsageLog(clock=clock) if clock else UsageLog()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "User requests by platform, persona and outcome", ["platform", "persona", "outcome"], registry=r)
        self.first_text = Histogram(
            f"{PREFIX}_first_text_seconds", "From a request to the first visible answer text",
            ["platform", "persona"], buckets=SECONDS_BUCKETS, registry=r,
        )
        self.answer_time = Histogram(
            f"{PREFIX}_answer_seconds", "From a request to its final answer delivered",
            ["platform", "persona"], buckets=ANSWER_BUCKETS, registry=r,
        )
        self.api_calls = Counter(f"{PREFIX}_platform_api_calls", "Platform API calls by method and result (ok, 429, error)", ["platform", "method", "result"], registry=r)
        self.edits = Histogram(f"{PREFIX}_reply_edits", "Message edits per answer", ["platform"], buckets=EDIT_BUCKETS, registry=r)
        self.sandbox_runs = Counter(f"{PREFIX}_sandbox_runs", "Agent code runs by outcome", ["outcome"], registry=r)
        self.sandbox_time = Histogram(f"{PREFIX}_sandbox_run_seconds", "Agent code run duration", ["outcome"], buckets=SANDBOX_BUCKETS, registry=r)
        self.images = Counter(f"{PREFIX}_image_intake", "Pictures received, by outcome", ["outcome"], registry=r)
        self.hub = hub
        if hub is not None:
            r.register(ModelCollector(hub))

    # -- recording (one call per event; cheap) --------------------------------------------
    def request(self, platform: str, persona: str, outcome: str, user: str) -> None:
        """One user message handled, with its outcome (answers: when they end)."""
        self.requests.labels(platform, persona, outcome).inc()
        self.usage.add(user, messages=1)
        if outcome == "answered":
            self.recent.add("answers", 1)

    def answer(self, platform: str, persona: str, user: str, *, first_text: float | None, total: float,
               edits: int, tokens: int, agent: bool) -> None:
        """One answer delivered (whatever its outcome), with its timings."""
        if first_text is not None:
            self.first_text.labels(platform, persona).observe(first_text)
            self.recent.sample("first_text", first_text)
        self.answer_time.labels(platform, persona).observe(total)
        self.edits.labels(platform).observe(edits)
        self.usage.add(user, tokens=tokens, agent_runs=int(agent))

    def api_call(self, platform: str, method: str, result: str) -> None:
        self.api_calls.labels(platform, method, result).inc()
        if result == "429":
            self.recent.add("429s", 1)

    def sandbox_run(self, outcome: str, seconds: float) -> None:
        self.sandbox_runs.labels(outcome).inc()
        self.sandbox_time.labels(outcome).observe(seconds)

    def image(self, outcome: str) -> None:
        self.images.labels(outcome).inc()

    # -- reading ----------------------------------------------------------------------
    def sample_models(self) -> None:
        """Fold the models' counters and queues into the recent figures (the charts)."""
        if self.hub is None:
            return
        for name, model in model_names(self.hub):
            if model.figures.state == "not loaded":
                continue  # a model nobody used yet would only add flat lines
            self.recent.counter(f"tokens:{name}", model.figures.tokens)
            self.recent.peak(f"queue:{name}", model.scheduler.waiting)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def model_names(hub: ModelHub) -> list[tuple[str, object]]:
    """(label, model) for each loaded-or-not model: its configured name, plus its roles when
    two instances share a name (e.g. a model that serves chat and, loaded as a VLM, vision)."""
    models = hub.models
    names = [m.spec.model for m in models]
    return [
        (name if names.count(name) == 1 else f"{name} ({','.join(hub.roles_of(m))})", m) for name, m in zip(names, models)
    ]


class NoMetrics(Metrics):
    """METRICS_PORT empty: nobody can read the figures, so nothing is recorded."""

    def __init__(self, hub: ModelHub | None = None) -> None:
        super().__init__(None)

    def request(self, *args: object, **kwargs: object) -> None:
        pass

    def answer(self, *args: object, **kwargs: object) -> None:
        pass

    def api_call(self, *args: object, **kwargs: object) -> None:
        pass

    def sandbox_run(self, *args: object, **kwargs: object) -> None:
        pass

    def image(self, *args: object, **kwargs: object) -> None:
        pass


class ModelCollector(Collector):
    """Model figures, read from the hub's models when Prometheus scrapes."""

    def __init__(self, hub: ModelHub) -> None:
        self.hub = hub

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_model_{name}", doc, labels=labels)

        state = gauge("state", "1 for the model's current state (not loaded, loading, ready, failed)", ["model", "state"])
        queue = gauge("queue_length", "Requests waiting for the model", ["model"])
        flight = gauge("streams_in_flight", "Generations running now", ["model"])
        batch = gauge("batch_size", "Sequences decoded together now (batching backends)", ["model"])
        load = gauge("load_seconds", "How long loading the model took", ["model"])
        memory = gauge("memory_bytes", "Memory the loaded model takes", ["model", "device"])
        speed = gauge("last_tokens_per_second", "Generation speed of the latest answer", ["model"])
        tokens = CounterMetricFamily(f"{PREFIX}_model_tokens", "Tokens generated", labels=["model"])
        busy = CounterMetricFamily(f"{PREFIX}_model_generation_seconds", "Time spent generating", labels=["model"])
        streams = CounterMetricFamily(f"{PREFIX}_model_streams", "Generations finished", labels=["model"])
        for name, model in model_names(self.hub):
            fig = model.figures
            for s in STATES:
                state.add_metric([name, s], 1.0 if fig.state == s else 0.0)
            queue.add_metric([name], model.scheduler.waiting)
            flight.add_metric([name], model.scheduler.active)
            tokens.add_metric([name], fig.tokens)
            busy.add_metric([name], fig.generating_seconds)
            streams.add_metric([name], fig.streams)
            if fig.batch_size is not None:
                batch.add_metric([name], fig.batch_size)
            if fig.load_seconds is not None:
                load.add_metric([name], fig.load_seconds)
            if fig.memory_bytes is not None:
                memory.add_metric([name, fig.device], fig.memory_bytes)
            if fig.last_tokens_per_second is not None:
                speed.add_metric([name], fig.last_tokens_per_second)
        yield from (state, queue, flight, batch, load, memory, speed, tokens, busy, streams)
