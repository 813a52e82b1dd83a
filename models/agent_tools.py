"""The agent's tools as lagent actions: Python in the bubblewrap sandbox, and arXiv search.

lagent calls actions synchronously on the agent's worker thread; the sandbox is asyncio, so
a run is handed to the bot's event loop and the worker waits for its result. lagent's own
interpreters run code on the host and are never used.
"""

from __future__ import annotations

import asyncio
import logging
from copy import deepcopy

from lagent.actions import ArxivSearch, BaseAction, tool_api
from lagent.actions.parser import JsonParser
from lagent.schema import ActionReturn, ActionStatusCode

from .base import Cancel
from .sandbox import RunResult, Sandbox, SandboxUnavailable, strip_code_fences

log = logging.getLogger(__name__)


class SandboxedPython(BaseAction):
    """Run Python code in an isolated sandbox (no network, no state kept between runs) and
    return what it prints."""

    def __init__(self, sandbox: Sandbox, loop: asyncio.AbstractEventLoop, cancel: Cancel) -> None:
        super().__init__(description=None, parser=JsonParser, enable=True)
        self.sandbox = sandbox
        self.loop = loop
        self.cancel = cancel
        self.runs: list[RunResult | SandboxUnavailable] = []  # one per call, for the display

    @tool_api
    def run(self, command: str) -> ActionReturn:
        """Run Python code and return its standard output and errors.

        Args:
            command (:class:`str`): Python code, optionally in a ```python block
        """
        code = strip_code_fences(command)
        if self.cancel.is_set:
            result = RunResult("", None, reason="cancelled")
        else:
            future = asyncio.run_coroutine_threadsafe(self.sandbox.run(code, cancel=self.cancel), self.loop)
            try:
                result = future.result()
            except SandboxUnavailable as exc:
                log.error("the agent wanted to run code, but: %s", exc)
                self.runs.append(exc)
                return ActionReturn(
                    args={"command": command}, type=self.name, state=ActionStatusCode.API_ERROR,
                    errmsg="Python is not available on this bot (no sandbox); answer without running code.",
                )
        self.runs.append(result)
        log.info("sandbox run: %s, exit %s, %d bytes, %.2fs", result.outcome,
                 result.exit_code, result.bytes_received, result.seconds)
        return ActionReturn(
            args={"command": command}, type=self.name, result=[{"type": "text", "content": result.for_model()}]
        )


class ArxivPapers(ArxivSearch):
    """lagent's ArxivSearch (same name and description, which InternLM2 knows), on the current
    `arxiv` client API (lagent 0.2.4 calls `Search.results()`, which arxiv 2.x removed)."""

    def __init__(self, top_k_results: int = 3, doc_content_chars_max: int = 800) -> None:
        super().__init__(
            top_k_results=top_k_results, doc_content_chars_max=doc_content_chars_max,
            description=deepcopy(ArxivSearch.__tool_description__),
        )

    @tool_api(explode_return=True)
    def get_arxiv_article_information(self, query: str) -> dict:
        """Run Arxiv search and get the article meta information.

        Args:
            query (:class:`str`): the content of search query

        Returns:
            :class:`dict`: article information
                * content (str): a list of 3 arxiv search papers
        """
        import arxiv

        try:
            search = arxiv.Search(query[: self.max_query_len], max_results=self.top_k_results)
            results = list(arxiv.Client(num_retries=1).results(search))
        except Exception as exc:
            log.warning("arXiv search failed: %r", exc)
            return ActionReturn(errmsg=f"Arxiv exception: {exc}", state=ActionStatusCode.HTTP_ERROR)
        docs = [
            f"Published: {r.updated.date()}\nTitle: {r.title}\nAuthors: {', '.join(a.name for a in r.authors)}\n"
            f"Summary: {r.summary[: self.doc_content_chars_max]}"
            for r in results
        ]
        return {"content": "\n\n".join(docs) if docs else "No good Arxiv Result was found"}
