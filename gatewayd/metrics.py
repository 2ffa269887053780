"""Prometheus metrics, one registry per daemon (no process-global state).

Counters and histograms are updated where things happen. Gauges that describe
the store (open tickets, outbox depth and age) are recomputed from the store on
every scrape, so they are exact right after a restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SMTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """All of gatewayd's metrics; label values come from config, never from message content."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_received = Counter(
            "gatewayd_messages_received", "SMTP/LMTP transactions that reached DATA, by outcome",
            ["listener", "outcome"], registry=r)
        self.smtp_transaction_seconds = Histogram(
            "gatewayd_smtp_transaction_seconds", "Time from end of DATA to the reply, by listener",
            ["listener"], buckets=_SMTP_BUCKETS, registry=r)
        self.smtp_sessions_active = Gauge(
            "gatewayd_smtp_sessions_active", "Open SMTP/LMTP sessions", ["listener"], registry=r)
        self.tickets_created = Counter(
            "gatewayd_tickets_created", "Tickets opened, by the team that took them", ["team"], registry=r)
        self.tickets_open = Gauge(
            "gatewayd_tickets_open", "Open tickets, by team and owning agent", ["team", "agent"], registry=r)
        self.routing_decisions = Counter(
            "gatewayd_routing_decisions", "Routing picks, by deciding plugin and chosen agent",
            ["plugin", "agent"], registry=r)
        self.plugin_errors = Counter(
            "gatewayd_plugin_errors", "Plugin calls that raised, timed out or returned garbage",
            ["plugin"], registry=r)
        self.delivery_attempts = Counter(
            "gatewayd_delivery_attempts", "Attempts to hand an outbox item to the relay, by result",
            ["kind", "result"], registry=r)
        self.outbox_messages = Gauge(
            "gatewayd_outbox_messages", "Outbox items not yet sent (pending or failed), by kind",
            ["kind", "state"], registry=r)
        self.outbox_oldest_age = Gauge(
            "gatewayd_outbox_oldest_age_seconds", "Age of the oldest pending outbox item", registry=r)

    # Observer hooks used by the listener, the router and the outbox.

    def transaction(self, listener: str, outcome: str, seconds: float) -> None:
        self.messages_received.labels(listener, outcome).inc()
        self.smtp_transaction_seconds.labels(listener).observe(seconds)

    def ticket_created(self, team: str) -> None:
        self.tickets_created.labels(team).inc()

    def routing_decision(self, plugin: str, agent: str) -> None:
        self.routing_decisions.labels(plugin, agent).inc()

    def plugin_error(self, plugin: str) -> None:
        self.plugin_errors.labels(plugin).inc()

    def delivery_attempt(self, kind: str, result: str) -> None:
        self.delivery_attempts.labels(kind, result).inc()

    def prime(self, listeners: Iterable[str], teams: Iterable[str], agents: Iterable[tuple[str, str]]) -> None:
        """Creates zero-valued series for known label sets, so rates and alerts work from the start."""
        for listener in listeners:
            for outcome in ("accepted", "duplicate", "refused", "tempfail", "error"):
                self.messages_received.labels(listener, outcome)
            self.smtp_sessions_active.labels(listener).set(0)
        for team in teams:
            self.tickets_created.labels(team)
        for team, agent in agents:
            self.tickets_open.labels(team, agent).set(0)

    async def refresh(self, store: Store, sessions: dict[str, int], now: float | None = None) -> None:
        """Recomputes the store-derived gauges; called on every scrape."""
        now = time.time() if now is None else now
        for listener, active in sessions.items():
            self.smtp_sessions_active.labels(listener).set(active)
        self.tickets_open.clear()
        for team, agent, count in await store.fetchall(
                "SELECT coalesce(team, ''), coalesce(agent, ''), count(*) FROM tickets "
                "WHERE status = 'open' GROUP BY 1, 2"):
            self.tickets_open.labels(team, agent).set(count)
        self.outbox_messages.clear()
        for kind in ("forward", "receipt", "reply", "alert"):
            for state in ("pending", "failed"):
                self.outbox_messages.labels(kind, state).set(0)
        for kind, state, count in await store.fetchall(
                "SELECT kind, state, count(*) FROM outbox WHERE state != 'sent' GROUP BY 1, 2"):
            self.outbox_messages.labels(kind, state).set(count)
        row = await store.fetchone("SELECT min(created_at) FROM outbox WHERE state = 'pending'")
        self.outbox_oldest_age.set(max(0.0, now - row[0]) if row and row[0] is not None else 0.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
