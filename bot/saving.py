"""Saving one exchange (question and growing answer) to the history.

A disk that fills up (or turns read-only) while the bot runs must not cost the user the answer:
a failed write marks the exchange unsaved, the answer is still delivered with a note, and the
failure is logged at most once a minute however many writes fail.
"""

from __future__ import annotations

import logging

from .logs import OncePerMinute
from .store import HistoryStore, StorageError

log = logging.getLogger(__name__)
storage_alarm = OncePerMinute(log)


def report(exc: StorageError) -> None:
    storage_alarm("history not saved (DATA_DIR full or read-only?): %s; answers are still delivered", exc)


class ExchangeRecord:
    def __init__(self, store: HistoryStore, session: str, persona: str) -> None:
        self.store, self.session, self.persona = store, session, persona
        self.answer_id: int | None = None
        self.reference: str | None = None  # where the answer is shown (see bot/recovery.py)
        self.saved = True

    def begin(self, question: str, attachment: str | None) -> None:
        try:
            self.store.add(self.session, self.persona, "user", question, attachment=attachment)
            self.answer_id = self.store.add(
                self.session, self.persona, "assistant", "", status="streaming", reference=self.reference
            )
        except StorageError as exc:
            self._lost(exc)

    def place(self, reference: str) -> None:
        """The answer is now shown in this platform message (posted before or after `begin`)."""
        self.reference = reference
        if self.answer_id is None:
            return
        try:
            self.store.set_reference(self.answer_id, reference)
        except StorageError as exc:
            self._lost(exc)

    def update(self, text: str, status: str | None = None) -> None:
        if self.answer_id is None:
            return
        try:
            self.store.update(self.answer_id, text, status)
        except StorageError as exc:
            self._lost(exc)

    def _lost(self, exc: StorageError) -> None:
        self.saved = False
        report(exc)
