"""Accountability figures from the audit trail: who acknowledged, answered, reassigned, closed, and how fast.

Everything is derived from events, the same record ``tickets show`` prints, so
a report and a ticket's history never disagree. Tickets count in the range
they were created in; actions count in the range they happened in.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from .store import Store

# Audit events that count as an agent's action; handing a ticket to a team
# (``assigned``) counts as a reassignment like handing it to an agent.
_ACTIONS = {"acked": "acked", "replied": "replied", "reassigned": "reassigned", "assigned": "reassigned",
            "closed": "closed"}

async def overdue_tickets(store: Store) -> set[int]:
    return {number for number, _, _ in await store.overdue()}


@dataclass(frozen=True)
class Timing:
    count: int
    median: float | None
    p90: float | None


@dataclass
class _Row:
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ack: list[float] = field(default_factory=list)
    first_response: list[float] = field(default_factory=list)


def timing(values: list[float]) -> Timing:
    """Median and 90th percentile (nearest rank), so small samples give values that occurred."""
    if not values:
        return Timing(0, None, None)
    ordered = sorted(values)
    rank = max(0, -(-9 * len(ordered) // 10) - 1)
    return Timing(len(ordered), statistics.median(ordered), ordered[rank])


async def build(store: Store, start: float, end: float) -> dict[str, Any]:
    """``{"from", "to", "agents": {name: ...}, "teams": {name: ...}}``."""
    agents: dict[str, _Row] = defaultdict(_Row)
    teams: dict[str, _Row] = defaultdict(_Row)
    rows = await store.fetchall(
        "SELECT number, coalesce(team, ''), created_at FROM tickets WHERE created_at >= ? AND created_at < ?",
        (start, end))
    for number, team, created in rows:
        teams[team].counts["tickets"] += 1
        routed_at = acked_at = replied_at = None
        ack_by = reply_by = None
        for e in await store.events(number):
            if e.kind == "routed" and routed_at is None:
                routed_at = e.at
            elif e.kind == "acked" and acked_at is None:
                acked_at, ack_by = e.at, e.actor
            elif e.kind == "replied" and replied_at is None:
                replied_at, reply_by = e.at, e.actor
            elif e.kind == "overdue":
                teams[team].counts["overdue"] += 1
                if e.detail.get("agent"):
                    agents[e.detail["agent"]].counts["overdue"] += 1
        if acked_at is not None:
            seconds = acked_at - (routed_at if routed_at is not None else created)
            teams[team].ack.append(seconds)
            agents[ack_by or ""].ack.append(seconds)
        if replied_at is not None:
            teams[team].first_response.append(replied_at - created)
            agents[reply_by or ""].first_response.append(replied_at - created)
    for kind, actor in await store.fetchall(
            f"SELECT kind, actor FROM events WHERE at >= ? AND at < ? AND kind IN ({','.join('?' * len(_ACTIONS))}) "
            "AND actor IS NOT NULL", (start, end, *_ACTIONS)):
        agents[actor].counts[_ACTIONS[kind]] += 1

    def summary(row: _Row, keys: tuple[str, ...]) -> dict[str, Any]:
        return {**{k: row.counts.get(k, 0) for k in keys}, "ack_seconds": asdict(timing(row.ack)),
                "first_response_seconds": asdict(timing(row.first_response))}
    return {
        "from": start, "to": end,
        "agents": {name: summary(row, ("acked", "replied", "reassigned", "closed", "overdue"))
                   for name, row in sorted(agents.items()) if name},
        "teams": {name or "-": summary(row, ("tickets", "overdue")) for name, row in sorted(teams.items())},
    }


def render(report: dict[str, Any]) -> str:
    """The text form: one table per agents and teams, times in minutes."""
    def minutes(value: float | None) -> str:
        return "-" if value is None else f"{value / 60:.1f}m"

    def table(title: str, rows: dict[str, Any], counts: tuple[str, ...]) -> list[str]:
        header = [title.upper(), *(c.upper() for c in counts), "ACK MEDIAN", "ACK P90", "FIRST MEDIAN", "FIRST P90"]
        body = [[name, *(str(r[c]) for c in counts), minutes(r["ack_seconds"]["median"]),
                 minutes(r["ack_seconds"]["p90"]), minutes(r["first_response_seconds"]["median"]),
                 minutes(r["first_response_seconds"]["p90"])] for name, r in rows.items()]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]

    return "\n".join([*table("agent", report["agents"], ("acked", "replied", "reassigned", "closed", "overdue")),
                      "", *table("team", report["teams"], ("tickets", "overdue"))])
