"""``gatewayd report`` figures on a seeded store: counts per agent and team, median/p90 times, overdue."""

from __future__ import annotations

from gatewayd import report
from gatewayd.store import Store, add_event

T0 = 1_700_000_000.0
MIN = 60.0


async def seed(store: Store) -> None:
    """Four support tickets (alice acks in 5/10/20 min, bob in 40) and one security ticket that went overdue."""
    plan = [("support", "alice", 5, 30), ("support", "alice", 10, 60), ("support", "alice", 20, None),
            ("support", "bob", 40, 120), ("security", "sam", None, None)]

    async def write(tx):
        for number, (team, agent, ack, reply) in enumerate(plan, start=1):
            await tx.execute("INSERT INTO tickets (number, subject, customer, team, agent, created_at, updated_at) "
                             "VALUES (?, 's', 'c@x.test', ?, ?, ?, ?)", (number, team, agent, T0, T0))
            await add_event(tx, number, "routed", {"agent": agent, "team": team}, at=T0)
            if ack is not None:
                await add_event(tx, number, "acked", {"via": "command"}, actor=agent, at=T0 + ack * MIN)
            if reply is not None:
                await add_event(tx, number, "replied", {}, actor=agent, at=T0 + reply * MIN)
        await add_event(tx, 5, "overdue", {"agent": "sam", "team": "security"}, actor="gatewayd", at=T0 + 99 * MIN)
        await add_event(tx, 3, "closed", {}, actor="alice", at=T0 + 30 * MIN)
        await add_event(tx, 4, "reassigned", {"agent": "alice"}, actor="bob", at=T0 + 50 * MIN)
    await store.transact(write)


async def test_report_figures(tmp_path):
    store = await Store.open(tmp_path / "s.sqlite3")
    try:
        await seed(store)
        figures = await report.build(store, T0 - 1, T0 + 86400)
        assert await report.overdue_tickets(store) == {5}
    finally:
        await store.close()
    alice, bob, sam = (figures["agents"][n] for n in ("alice", "bob", "sam"))
    assert (alice["acked"], alice["replied"], alice["closed"], alice["reassigned"]) == (3, 2, 1, 0)
    assert alice["ack_seconds"] == {"count": 3, "median": 10 * MIN, "p90": 20 * MIN}
    assert alice["first_response_seconds"] == {"count": 2, "median": 45 * MIN, "p90": 60 * MIN}
    assert (bob["acked"], bob["replied"], bob["reassigned"]) == (1, 1, 1)
    assert sam["overdue"] == 1 and sam["ack_seconds"]["count"] == 0
    support, security = figures["teams"]["support"], figures["teams"]["security"]
    assert (support["tickets"], support["overdue"], security["tickets"], security["overdue"]) == (4, 0, 1, 1)
    assert support["ack_seconds"] == {"count": 4, "median": 15 * MIN, "p90": 40 * MIN}
    text = report.render(figures)
    assert text.splitlines()[0].split()[:3] == ["AGENT", "ACKED", "REPLIED"]
    assert any(line.split()[:3] == ["alice", "3", "2"] for line in text.splitlines())


async def test_a_range_excludes_tickets_and_actions_outside_it(tmp_path):
    store = await Store.open(tmp_path / "s.sqlite3")
    try:
        await seed(store)
        figures = await report.build(store, T0 + 86400, T0 + 2 * 86400)
    finally:
        await store.close()
    assert figures["agents"] == {} and figures["teams"] == {}
