"""Prometheus metrics, one registry per daemon (no process-global state).

Counters and histograms are updated where things happen. Gauges that describe
the store (open and overdue tickets, outbox depth and age) are recomputed from
the store on every scrape, so they are exact right after a restart.

Label values come from config (listener, team, agent and plugin names) or from
fixed vocabularies in the code (outcomes, kinds, results, reasons), never from
message content: the number of series stays bounded whatever mail arrives.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from . import __version__, autoreply
from .store import CommitStats, Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MINUTE = 60.0
HOUR = 60 * MINUTE
DAY = 24 * HOUR

# An SMTP transaction's DATA phase ends in one group commit: milliseconds,
# seconds only when the disk is struggling.
SMTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Acknowledgement and first response are human reaction times: minutes to days.
RESPONSE_BUCKETS = (1 * MINUTE, 5 * MINUTE, 15 * MINUTE, 30 * MINUTE, 1 * HOUR, 2 * HOUR, 4 * HOUR, 8 * HOUR,
                    1 * DAY, 2 * DAY, 3 * DAY, 7 * DAY)

TRANSACTION_OUTCOMES = ("accepted", "duplicate", "refused", "tempfail", "error")
OUTBOX_KINDS = ("forward", "receipt", "reply", "alert", "webhook")
OUTBOX_STATES = ("pending", "failed")
DELIVERY_RESULTS = ("sent", "retry", "failed")
AUTOREPLY_RESULTS = ("sent", "suppressed")
# Why a receipt was not sent: the reasons gatewayd.autoreply and the responder
# decide on (RFC 3834 and DESIGN § Receipt); ``none`` goes with ``sent``.
AUTOREPLY_REASONS = ("none", "disabled", *autoreply.REASONS, "other")
RELOAD_RESULTS = ("success", "failure")
# The families a worker process adds to the daemon's: event counts, which add up
# across processes. Gauges are the daemon's alone (it computes them from the
# store), and so are the process_* figures.
_SUMMED_TYPES = ("counter", "histogram")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[SampleKey, float]

@dataclass(frozen=True)
class Known:
    """Label values the config names; they get zero-valued series so rates and alerts work from the start."""

    listeners: tuple[str, ...] = ()
    teams: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    plugins: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoreSnapshot:
    """The store-derived gauge values, read before any gauge changes so a scrape never sees half an update."""

    open: tuple[tuple[str, str, int], ...]
    overdue: tuple[tuple[str, str, int], ...]
    outbox: tuple[tuple[str, str, int], ...]
    oldest_pending: float | None


class Metrics:
    """All of gatewayd's metrics and the hooks the listener, router, outbox and receipts call."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._known = Known()
        r = self.registry
        ProcessCollector(registry=r)
        self.build_info = Gauge(
            "gatewayd_build_info", "Always 1; the running gatewayd version is a label", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.messages_received = Counter(
            "gatewayd_messages_received", "SMTP/LMTP transactions that reached the end of DATA, by outcome",
            ["listener", "outcome"], registry=r)
        self.smtp_transaction_seconds = Histogram(
            "gatewayd_smtp_transaction_seconds", "Time from the end of DATA to the reply (commit included)",
            ["listener"], buckets=SMTP_BUCKETS, registry=r)
        self.smtp_sessions_active = Gauge(
            "gatewayd_smtp_sessions_active", "Open SMTP/LMTP sessions", ["listener"], registry=r)
        self.tickets_created = Counter(
            "gatewayd_tickets_created", "Tickets opened, by the team that took them", ["team"], registry=r)
        self.tickets_open = Gauge(
            "gatewayd_tickets_open", "Open tickets by team and owning agent (agent empty: with a supervisor "
            "or not yet routed)", ["team", "agent"], registry=r)
        self.tickets_overdue = Gauge(
            "gatewayd_tickets_overdue", "Open tickets that missed their first-response target and are "
            "still waiting, by team and agent", ["team", "agent"], registry=r)
        self.first_response_seconds = Histogram(
            "gatewayd_first_response_seconds", "Time from a ticket's creation to the agent's first reply",
            ["team"], buckets=RESPONSE_BUCKETS, registry=r)
        self.ack_seconds = Histogram(
            "gatewayd_ack_seconds", "Time from a ticket's forward to the agent's acknowledgement (#ack or reply)",
            ["team"], buckets=RESPONSE_BUCKETS, registry=r)
        self.routing_decisions = Counter(
            "gatewayd_routing_decisions", "Routing outcomes, by deciding plugin (or fallback) and chosen agent",
            ["plugin", "agent"], registry=r)
        self.plugin_errors = Counter(
            "gatewayd_plugin_errors", "Plugin calls that raised, timed out or returned garbage (treated as pass)",
            ["plugin"], registry=r)
        self.autoreplies = Counter(
            "gatewayd_autoreplies", "Receipts to customers: sent, or suppressed with the reason",
            ["result", "reason"], registry=r)
        self.delivery_attempts = Counter(
            "gatewayd_delivery_attempts", "Attempts to hand an outbox item to the relay, by kind and result",
            ["kind", "result"], registry=r)
        self.outbox_messages = Gauge(
            "gatewayd_outbox_messages", "Outbox items not yet sent, by kind and state (pending or failed)",
            ["kind", "state"], registry=r)
        self.outbox_oldest_age = Gauge(
            "gatewayd_outbox_oldest_age_seconds", "Age of the oldest pending outbox item (0 when none)",
            registry=r)
        self.replies_refused = Counter(
            "gatewayd_agent_replies_refused", "Mail to a reply address that was not relayed, by reason",
            ["reason"], registry=r)
        self.config_reloads = Counter(
            "gatewayd_config_reloads", "SIGHUP configuration reloads, by result", ["result"], registry=r)
        self.worker_restarts = Counter(
            "gatewayd_worker_restarts", "Times the worker process (routing and delivery) ended unexpectedly "
            "and was started again", registry=r)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        self.autoreplies.labels("sent", "none")
        for reason in AUTOREPLY_REASONS[1:]:
            self.autoreplies.labels("suppressed", reason)
        for kind in OUTBOX_KINDS:
            for result in DELIVERY_RESULTS:
                self.delivery_attempts.labels(kind, result)

    # Hooks called where things happen.

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

    def autoreply(self, result: str, reason: str = "none") -> None:
        """Counts a receipt decision; a reason outside the fixed vocabulary counts as ``other``."""
        if result not in AUTOREPLY_RESULTS:
            raise ValueError(f"autoreply result must be one of {AUTOREPLY_RESULTS}, not {result!r}")
        self.autoreplies.labels(result, reason if reason in AUTOREPLY_REASONS else "other").inc()

    def first_response(self, team: str, seconds: float) -> None:
        self.first_response_seconds.labels(team).observe(seconds)

    def acknowledged(self, team: str, seconds: float) -> None:
        self.ack_seconds.labels(team).observe(seconds)

    def reply_refused(self, reason: str) -> None:
        """Mail to a reply address that was not relayed (reason: a fixed word from gatewayd.agent_reply)."""
        self.replies_refused.labels(reason).inc()

    def config_reload(self, ok: bool) -> None:
        self.config_reloads.labels("success" if ok else "failure").inc()

    def worker_restarted(self) -> None:
        self.worker_restarts.inc()

    def watch_store(self, stats: Callable[[], CommitStats]) -> None:
        """Exposes the store's group-commit counts (this process's writer) on every scrape."""
        self.registry.register(_StoreCounts(stats))

    # Series for what the config names, and the store-derived gauges.

    def prime(self, known: Known) -> None:
        """Creates zero-valued series for the configured listeners, teams, agents and plugins.

        Called at start and after a reload; series of names that left the config
        keep their history (counters) or drop out at the next scrape (gauges).
        """
        self._known = known
        for plugin in known.plugins:
            self.plugin_errors.labels(plugin)
        for plugin in (*known.plugins, "fallback"):
            for agent in sorted({agent for _, agent in known.pairs}):
                self.routing_decisions.labels(plugin, agent)
        for listener in self._known.listeners:
            for outcome in TRANSACTION_OUTCOMES:
                self.messages_received.labels(listener, outcome)
            self.smtp_transaction_seconds.labels(listener)
            self.smtp_sessions_active.labels(listener)
        for team in self._known.teams:
            self.tickets_created.labels(team)
            self.first_response_seconds.labels(team)
            self.ack_seconds.labels(team)
        self._apply(StoreSnapshot((), (), (), None), time.time())

    async def refresh(self, store: Store, sessions: dict[str, int], now: float | None = None) -> None:
        """Recomputes the store-derived gauges; called on every scrape."""
        snapshot = StoreSnapshot(
            open=tuple(tuple(r) for r in await store.fetchall(
                "SELECT coalesce(team, ''), coalesce(agent, ''), count(*) FROM tickets "
                "WHERE status = 'open' GROUP BY 1, 2")),
            overdue=tuple((team, agent, count) for (team, agent), count in
                          Tally((team, agent) for _, team, agent in await store.overdue()).items()),
            outbox=tuple(tuple(r) for r in await store.fetchall(
                "SELECT kind, state, count(*) FROM outbox WHERE state != 'sent' GROUP BY 1, 2")),
            oldest_pending=(await store.fetchone(
                "SELECT min(created_at) FROM outbox WHERE state = 'pending'"))[0],
        )
        for listener, active in sessions.items():
            self.smtp_sessions_active.labels(listener).set(active)
        self._apply(snapshot, time.time() if now is None else now)

    def _apply(self, snapshot: StoreSnapshot, now: float) -> None:
        """Replaces the store-derived gauges without awaiting, so no scrape sees them half-written."""
        for gauge, rows in ((self.tickets_open, snapshot.open), (self.tickets_overdue, snapshot.overdue)):
            gauge.clear()
            for team, agent in self._known.pairs:
                gauge.labels(team, agent).set(0)
            for team, agent, count in rows:
                gauge.labels(team, agent).set(count)
        self.outbox_messages.clear()
        for kind in OUTBOX_KINDS:
            for state in OUTBOX_STATES:
                self.outbox_messages.labels(kind, state).set(0)
        for kind, state, count in snapshot.outbox:
            self.outbox_messages.labels(kind, state).set(count)
        oldest = snapshot.oldest_pending
        self.outbox_oldest_age.set(max(0.0, now - oldest) if oldest is not None else 0.0)

    def samples(self) -> Samples:
        """The counter and histogram values, for the daemon to add to its own (the worker process's part)."""
        return {_key(sample.name, sample.labels): sample.value
                for family in self.registry.collect() if _summed(family)
                for sample in family.samples if not sample.name.endswith("_created")}

    def exposition(self, worker: Samples | None = None) -> bytes:
        """The text exposition; ``worker``'s counts are added to the matching series, or appended."""
        if not worker:
            return generate_latest(self.registry)
        return generate_latest(_Merged(self.registry, worker))


def _key(name: str, labels: dict[str, str]) -> SampleKey:
    return name, tuple(sorted(labels.items()))


def _summed(family: Metric) -> bool:
    return family.type in _SUMMED_TYPES and family.name.startswith("gatewayd_")


class _Merged:
    """A registry's families with another process's counts added: what generate_latest needs to read."""

    def __init__(self, registry: CollectorRegistry, extra: Samples) -> None:
        self._registry = registry
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        extra = dict(self._extra)
        for family in self._registry.collect():
            if _summed(family):
                own = [sample._replace(value=sample.value + extra.pop(_key(sample.name, sample.labels), 0.0))
                       for sample in family.samples]
                names = {family.name + suffix for suffix in _SUFFIXES[family.type]}
                theirs = [key for key in extra if key[0] in names]
                family.samples = own
                for name, labels in theirs:
                    family.add_sample(name, dict(labels), extra.pop((name, labels)))
            yield family


class _StoreCounts:
    """A collector for the writer's :class:`CommitStats`."""

    def __init__(self, stats: Callable[[], CommitStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield CounterMetricFamily("gatewayd_store_commits", "Store write transactions committed (each one fsync; "
                                  "group commit puts many writes in one)", value=stats.commits)
        yield CounterMetricFamily("gatewayd_store_writes", "Store writes committed: SMTP transactions, routing "
                                  "decisions, delivery results", value=stats.jobs)
