"""Conversation history in SQLite (WAL): survives restarts and kill -9.

The question is written before the model starts; the answer row is created as "streaming",
updated while it grows, and closed as "ok", "stopped" or "failed". Rows still "streaming"
at start-up were cut by a crash and become "interrupted"; their text so far is kept.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,
    persona TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL,
    persona TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok',
    attachment TEXT,
    created REAL NOT NULL,
    reference TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session, persona, id);
"""

# Answers shown to the model again: a stopped or crash-cut answer is still what the user saw.
VISIBLE = ("ok", "stopped", "interrupted")


class StorageError(Exception):
    """A write to the history failed (disk full, read-only, I/O error); the message says why."""


F = TypeVar("F", bound=Callable)


def _write(method: F) -> F:
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class StoredMessage:
    id: int
    role: str
    content: str
    status: str
    attachment: str | None


class HistoryStore:
    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable against process crashes
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(messages)")}
        if "reference" not in columns:  # a database from before answers kept their platform message
            self.db.execute("ALTER TABLE messages ADD COLUMN reference TEXT")
        self.recovered = self.db.execute(
            "UPDATE messages SET status='interrupted' WHERE status='streaming'"
        ).rowcount

    def close(self) -> None:
        self.db.close()

    # -- persona per session -----------------------------------------------------------
    def persona(self, session: str, default: str) -> str:
        row = self.db.execute("SELECT persona FROM sessions WHERE key=?", (session,)).fetchone()
        return row[0] if row else default

    @_write
    def set_persona(self, session: str, persona: str) -> None:
        self.db.execute(
            "INSERT INTO sessions (key, persona, updated) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET persona=excluded.persona, updated=excluded.updated",
            (session, persona, time.time()),
        )

    # -- messages ----------------------------------------------------------------------
    @_write
    def add(
        self, session: str, persona: str, role: str, content: str, *,
        status: str = "ok", attachment: str | None = None, reference: str | None = None,
    ) -> int:
        cur = self.db.execute(
            "INSERT INTO messages (session, persona, role, content, status, attachment, created, reference) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (session, persona, role, content, status, attachment, time.time(), reference),
        )
        return int(cur.lastrowid)

    @_write
    def set_reference(self, message_id: int, reference: str | None) -> None:
        """Where the answer is shown on its platform (JSON, opaque here), to mark it after a crash."""
        self.db.execute("UPDATE messages SET reference=? WHERE id=?", (reference, message_id))

    def answer_place(self, message_id: int) -> tuple[str, str] | None:
        """(session, persona) of a stored message, None when it is gone."""
        return self.db.execute("SELECT session, persona FROM messages WHERE id=?", (message_id,)).fetchone()

    def interrupted_references(self) -> list[tuple[int, str, str]]:
        """(id, content, reference) of answers cut by a crash whose platform message is not yet marked."""
        return self.db.execute(
            "SELECT id, content, reference FROM messages WHERE status='interrupted' AND reference IS NOT NULL ORDER BY id"
        ).fetchall()

    @_write
    def update(self, message_id: int, content: str, status: str | None = None) -> None:
        if status is None:
            self.db.execute("UPDATE messages SET content=? WHERE id=?", (content, message_id))
        else:
            self.db.execute("UPDATE messages SET content=?, status=? WHERE id=?", (content, status, message_id))

    def history(self, session: str, persona: str) -> list[StoredMessage]:
        rows = self.db.execute(
            "SELECT id, role, content, status, attachment FROM messages WHERE session=? AND persona=? ORDER BY id",
            (session, persona),
        ).fetchall()
        return [StoredMessage(*row) for row in rows]

    @_write
    def delete_from(self, session: str, persona: str, message_id: int) -> None:
        """Forget a message and everything after it (regenerate)."""
        self.db.execute("DELETE FROM messages WHERE session=? AND persona=? AND id>=?", (session, persona, message_id))

    @_write
    def reset(self, session: str, persona: str) -> int:
        return self.db.execute("DELETE FROM messages WHERE session=? AND persona=?", (session, persona)).rowcount
