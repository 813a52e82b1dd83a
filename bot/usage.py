"""Usage per user over the last 24 hours (messages, tokens, agent runs), for spotting abuse on
the status page. User ids only ("telegram:42"), never names or message text; kept in memory in
hourly buckets, so it resets when the bot restarts."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

HOURS = 24
MAX_USERS_PER_HOUR = 50_000  # bounded memory under a flood of new accounts


@dataclass
class Usage:
    messages: int = 0
    tokens: int = 0
    agent_runs: int = 0


class UsageLog:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._hours: dict[int, dict[str, Usage]] = {}

    def add(self, user: str, *, messages: int = 0, tokens: int = 0, agent_runs: int = 0) -> None:
        hour = int(self.clock() // 3600)
        users = self._hours.get(hour)
        if users is None:
            users = self._hours[hour] = {}
            for old in [h for h in self._hours if h <= hour - HOURS]:
                del self._hours[old]
        usage = users.get(user)
        if usage is None:
            if len(users) >= MAX_USERS_PER_HOUR:
                return
            usage = users[user] = Usage()
        usage.messages += messages
        usage.tokens += tokens
        usage.agent_runs += agent_runs

    def last_day(self, limit: int = 200) -> list[tuple[str, Usage]]:
        """Users of the last 24 hours, busiest (most tokens, then messages) first."""
        first = int(self.clock() // 3600) - HOURS + 1
        totals: dict[str, Usage] = defaultdict(Usage)
        for hour, users in self._hours.items():
            if hour >= first:
                for user, u in users.items():
                    total = totals[user]
                    total.messages += u.messages
                    total.tokens += u.tokens
                    total.agent_runs += u.agent_runs
        ranked = sorted(totals.items(), key=lambda item: (-item[1].tokens, -item[1].messages, item[0]))
        return ranked[:limit]
