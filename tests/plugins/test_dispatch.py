"""The chain runner: order, first pick, narrowing, isolation of broken plugins, fallback, supervisor."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gatewayd.dispatch import HOOK_THREADS, HOOK_THREADS_PER_PLUGIN, RoutingChain
from gatewayd.plugin import API_VERSION, Decision, Plugin
from gatewayd.testing import (
    FakeClock,
    MemoryStateStore,
    RecordingObserver,
    build_chain,
    make_agent,
    make_agents,
    make_ticket,
    run_chain,
)


class PickFirst(Plugin):
    def route(self, context, ticket, message, candidates):
        return Decision.pick(candidates[0].name, "first candidate") if candidates else None


class Raises(Plugin):
    def route(self, context, ticket, message, candidates):
        raise RuntimeError("boom")


class Hangs(Plugin):
    async def route(self, context, ticket, message, candidates):
        await asyncio.sleep(30)


class Blocks(Plugin):
    def route(self, context, ticket, message, candidates):
        time.sleep(0.06)
        return Decision.pick("alice", "too late")


class Garbage(Plugin):
    def route(self, context, ticket, message, candidates):
        return "alice"


class PicksStranger(Plugin):
    def route(self, context, ticket, message, candidates):
        return Decision.pick("mallory", "not a candidate")


class ToSecurity(Plugin):
    def route(self, context, ticket, message, candidates):
        return Decision.narrow("security matter", team="security", priority="high")


class OnlyBob(Plugin):
    def route(self, context, ticket, message, candidates):
        return Decision.narrow("bob only", agents=["bob", "sam"])


class PickAlice(Plugin):
    def route(self, context, ticket, message, candidates):
        return Decision.pick("alice", "always alice")


class Counting(Plugin):
    calls = 0

    def route(self, context, ticket, message, candidates):
        type(self).calls += 1
        raise ValueError("still broken")


AGENTS = (make_agent("alice", open_tickets=3), make_agent("bob", open_tickets=1),
          make_agent("carol", open_tickets=1), make_agent("sam", teams=("security",)))


async def test_first_pick_wins_and_ends_the_chain():
    result, trace = await run_chain([PickFirst, PickAlice], agents=AGENTS)
    assert result.agent == "alice" and result.decided_by == "PickFirst"
    assert [s.plugin for s in trace] == ["PickFirst"]
    assert trace[0].outcome == "pick" and trace[0].reason == "first candidate"


async def test_broken_plugins_are_passes_and_counted(observer: RecordingObserver):
    result, trace = await run_chain(
        [(Raises, {}), (Hangs, {"timeout": 0.05}), (Garbage, {}), (PicksStranger, {}), PickAlice],
        agents=AGENTS, observer=observer)
    assert result.agent == "alice"
    assert [s.outcome for s in trace] == ["error", "timeout", "garbage", "garbage", "pick"]
    assert "RuntimeError: boom" in trace[0].reason
    assert "mallory" in trace[3].reason
    assert observer.errors == ["Raises", "Hangs", "Garbage", "PicksStranger"]
    assert observer.decisions == [("PickAlice", "alice")]


async def test_a_blocking_sync_hook_over_its_timeout_is_discarded(observer):
    result, trace = await run_chain([(Blocks, {"timeout": 0.01})], agents=AGENTS, observer=observer)
    assert trace[0].outcome == "timeout"
    assert result.agent == "bob"
    assert observer.errors == ["Blocks"]


async def test_a_blocking_sync_hook_leaves_the_event_loop_free():
    """A def hook runs in a worker thread: the loop (and so every SMTP session) keeps ticking."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await run_chain([(Blocks, {"timeout": 1})], agents=AGENTS)
    task.cancel()
    assert ticks >= 3


async def test_hanging_plugin_does_not_hold_the_chain():
    started = time.perf_counter()
    await run_chain([(Hangs, {"timeout": 0.05})], agents=AGENTS)
    assert time.perf_counter() - started < 1


class BlocksForever(Plugin):
    """A def hook stuck in a call that never returns (a dead NFS mount, a lost lock)."""

    release = threading.Event()

    def route(self, context, ticket, message, candidates):
        self.release.wait()


async def test_hung_def_hooks_hold_threads_of_their_own_not_the_default_pool():
    try:
        chain = build_chain([(BlocksForever, {"timeout": 0.02}), PickAlice], agents=AGENTS, max_failures=1000)
        for _ in range(HOOK_THREADS + 4):
            result, trace = await run_chain(chain, agents=AGENTS)
            assert trace[0].outcome == "timeout"
            # The hung plugin holds threads of its own share only: the next def plugin still runs.
            assert result.agent == "alice" and result.decided_by == "PickAlice"
        # Each of the loop's default threads would be stuck by now; relay sends and parsing use them.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), timeout=2) == "free"
        assert threading.active_count() <= HOOK_THREADS_PER_PLUGIN + 16
    finally:
        BlocksForever.release.set()


async def test_no_pick_falls_back_to_least_loaded_with_name_tiebreak():
    result, trace = await run_chain([], agents=AGENTS)
    assert result.agent == "bob"
    assert trace[-1].outcome == "fallback" and result.decided_by == "fallback"


async def test_team_narrowing_binds_picks_and_sets_priority(observer):
    result, trace = await run_chain([ToSecurity, PickAlice], agents=AGENTS, observer=observer)
    assert [s.outcome for s in trace] == ["narrow", "garbage", "fallback"]
    assert (result.agent, result.team, result.priority) == ("sam", "security", "high")


async def test_agent_narrowing_accumulates():
    result, trace = await run_chain([OnlyBob, PickAlice], agents=AGENTS)
    assert result.agent == "bob"
    assert "not among the narrowed candidates" in trace[1].reason


async def test_away_and_lapsed_agents_are_never_picked():
    agents = (make_agent("alice", away=True), make_agent("bob"), make_agent("carol"))
    result, trace = await run_chain([PickAlice], agents=agents, ticket=make_ticket(lapsed_agents=["bob"]))
    assert trace[0].outcome == "garbage" and "is away" in trace[0].reason
    assert result.agent == "carol"


async def test_nobody_available_goes_to_the_narrowed_teams_supervisor(observer):
    agents = AGENTS[:3] + (make_agent("sam", teams=("security",), away=True),)
    result, trace = await run_chain([ToSecurity], agents=agents, observer=observer,
                                    teams={"support": "lead@example.test", "security": "ciso@example.test"})
    assert result.agent is None and result.supervisor == "ciso@example.test"
    assert trace[-1].outcome == "supervisor" and "ciso@example.test" in trace[-1].reason
    assert observer.decisions == [("supervisor", "-")]
    assert result.summary.startswith("supervisor=ciso@example.test")


async def test_nobody_in_fallback_team_goes_to_its_supervisor():
    result, _ = await run_chain([], agents=make_agents("alice", "bob", teams=()),
                                teams={"support": "lead@example.test"}, fallback_team="support")
    assert result.supervisor == "lead@example.test" and result.team == "support"


async def test_cooldown_after_consecutive_failures():
    ticks = [0.0]
    Counting.calls = 0
    chain = build_chain([Counting, PickAlice], agents=AGENTS, max_failures=3, cooldown=60,
                        monotonic=lambda: ticks[0])
    state = MemoryStateStore()
    for _ in range(5):
        result, trace = await run_chain(chain, agents=AGENTS, state=state)
        assert result.agent == "alice"
    assert Counting.calls == 3
    assert trace[0].outcome == "skipped"
    ticks[0] = 61.0
    await run_chain(chain, agents=AGENTS, state=state)
    assert Counting.calls == 4


async def test_summary_is_one_ascii_line():
    agents = (make_agent("zoë"),)
    result, _ = await run_chain([], agents=agents)
    assert result.summary.isascii() and "\r" not in result.summary and "\n" not in result.summary
    assert result.summary.startswith("agent=zo?")


async def test_state_is_namespaced_per_entry_and_json_only():
    class Remember(Plugin):
        async def route(self, context, ticket, message, candidates):
            seen = await context.state.get("seen", 0)
            await context.state.set("seen", seen + 1)
            with pytest.raises(TypeError, match="JSON"):
                await context.state.set("bad", object())
            return None

    state = MemoryStateStore()
    chain = build_chain([Remember, (Remember, {"name": "again"})], agents=AGENTS)
    await run_chain(chain, agents=AGENTS, state=state)
    await run_chain(chain, agents=AGENTS, state=state)
    assert await state.get("Remember", "seen") == 2
    assert await state.get("again", "seen") == 2


async def test_context_now_comes_from_the_injected_clock():
    seen = []

    class Clocked(Plugin):
        def route(self, context, ticket, message, candidates):
            seen.append(context.now())

    clock = FakeClock("2024-03-01T08:00:00+00:00")
    await run_chain([Clocked], agents=AGENTS, clock=clock)
    clock.advance(hours=2)
    await run_chain([Clocked], agents=AGENTS, clock=clock)
    assert [t.hour for t in seen] == [8, 10]


def test_fallback_team_needs_a_supervisor():
    with pytest.raises(ValueError):
        RoutingChain([], supervisors={"support": "lead@example.test"}, fallback_team="nope")


def test_api_version_is_an_int():
    assert isinstance(API_VERSION, int) and Plugin.api_version == API_VERSION
