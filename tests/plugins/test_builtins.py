"""The six built-in plugins, loaded by name through the gatewayd.plugins entry points."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from gatewayd.config import loads
from gatewayd.discovery import load_chain
from gatewayd.router import reads_bodies
from gatewayd.testing import (
    FakeClock,
    MemoryStateStore,
    build_chain,
    make_agent,
    make_agents,
    make_message,
    make_ticket,
    run_chain,
)
from tests.plugins.routing_fixtures import BASE_CONFIG

THREE = make_agents("alice", "bob", "carol")
TEAMS = {"support": "lead@example.test", "security": "ciso@example.test"}


async def route_many(chain, count, state, agents=THREE):
    picks = []
    for n in range(count):
        result, _ = await run_chain(chain, agents=agents, state=state, ticket=make_ticket(id=f"SUP-{n}"))
        picks.append(result.agent)
    return picks


async def test_round_robin_distributes_30_tickets_evenly(state):
    picks = await route_many(build_chain(["round_robin"], agents=THREE), 30, state)
    assert Counter(picks) == {"alice": 10, "bob": 10, "carol": 10}
    assert picks[:4] == ["alice", "bob", "carol", "alice"]


async def test_round_robin_continues_fairly_after_restart(state):
    first = await route_many(build_chain(["round_robin"], agents=THREE), 7, state)
    second = await route_many(build_chain(["round_robin"], agents=THREE), 23, state)
    assert first[-1] == "alice" and second[0] == "bob"
    assert Counter(first + second) == {"alice": 10, "bob": 10, "carol": 10}


async def test_round_robin_skips_away_agents(state):
    agents = (make_agent("alice"), make_agent("bob", away=True), make_agent("carol"))
    picks = await route_many(build_chain(["round_robin"], agents=agents), 4, state, agents)
    assert picks == ["alice", "carol", "alice", "carol"]


async def test_least_loaded_with_deterministic_ties():
    agents = (make_agent("carol", open_tickets=1), make_agent("bob", open_tickets=1),
              make_agent("alice", open_tickets=4))
    result, trace = await run_chain(["least_loaded"], agents=agents)
    assert result.agent == "bob" and "fewest open tickets (1)" in trace[0].reason


SECURITY_RULES = {"rules": [
    {"name": "security lane", "match": {"subject": "(?i)phishing|fraud|unauthori[sz]ed"},
     "team": "security", "priority": "high"},
    {"match": {"keywords": ["unauthorised charge", "unauthorized charge", "phishing"]},
     "team": "security", "priority": "high"},
    {"match": {"from": "@bigcorp\\.example$", "header": {"X-Customer-Tier": "gold"}}, "agent": "alice"},
    {"match": {"to": "^billing@"}, "priority": "low"},
]}
PEOPLE = THREE + (make_agent("sam", teams=("security",)), make_agent("sue", teams=("security",), open_tickets=2))


async def test_rules_security_lane_on_subject():
    result, trace = await run_chain([("rules", SECURITY_RULES), "round_robin"], agents=PEOPLE, teams=TEAMS,
                                    message=make_message(subject="Possible PHISHING mail"))
    assert (result.team, result.priority, result.agent) == ("security", "high", "sam")
    assert trace[0].outcome == "narrow" and "rule 1 (security lane)" in trace[0].reason


async def test_rules_security_lane_on_body_keywords():
    message = make_message(subject="Question about my bill", body="There is an Unauthorised Charge on my card")
    result, trace = await run_chain([("rules", SECURITY_RULES)], agents=PEOPLE, teams=TEAMS, message=message)
    assert (result.team, result.priority, result.agent) == ("security", "high", "sam")
    assert "rule 2" in trace[0].reason and result.decided_by == "fallback"


async def test_rules_match_keys_are_anded():
    gold = make_message(sender="ceo@bigcorp.example", headers={"X-Customer-Tier": "gold"})
    silver = make_message(sender="ceo@bigcorp.example", headers={"X-Customer-Tier": "silver"})
    chain = [("rules", SECURITY_RULES), "least_loaded"]
    assert (await run_chain(chain, agents=PEOPLE, teams=TEAMS, message=gold))[0].decided_by == "rules"
    result, trace = await run_chain(chain, agents=PEOPLE, teams=TEAMS, message=silver)
    assert result.decided_by == "least_loaded" and trace[0].outcome == "pass"


async def test_rules_recipient_sets_priority_only():
    message = make_message(to=["billing@example.test"])
    result, trace = await run_chain([("rules", SECURITY_RULES)], agents=PEOPLE, teams=TEAMS, message=message)
    assert trace[0].outcome == "priority" and result.priority == "low" and result.team == "support"


async def test_sticky_followup_stays_with_its_agent_unless_away():
    ticket = make_ticket(is_followup=True, agent="carol", team="support")
    result, trace = await run_chain(["sticky", "round_robin"], agents=THREE, ticket=ticket)
    assert result.agent == "carol" and result.decided_by == "sticky"
    away = (THREE[0], THREE[1], make_agent("carol", away=True))
    result, trace = await run_chain(["sticky", "round_robin"], agents=away, ticket=ticket)
    assert result.agent == "alice" and "carol is away" in trace[0].reason


async def test_sticky_returning_customer_gets_previous_available_agent():
    ticket = make_ticket(customer_previous_agents=["carol", "bob"])
    result, _ = await run_chain(["sticky", "round_robin"], agents=THREE, ticket=ticket)
    assert result.agent == "carol"
    away = (THREE[0], THREE[1], make_agent("carol", away=True))
    result, trace = await run_chain(["sticky", "round_robin"], agents=away, ticket=ticket)
    assert result.agent == "bob" and result.decided_by == "sticky"
    nobody = (THREE[0], make_agent("bob", away=True), make_agent("carol", away=True))
    result, trace = await run_chain(["sticky", "round_robin"], agents=nobody, ticket=ticket)
    assert result.agent == "alice" and result.decided_by == "round_robin"
    assert "previous agent carol is away" in trace[0].reason


async def test_capacity_excludes_full_agents():
    agents = (make_agent("alice", open_tickets=5), make_agent("bob", open_tickets=2),
              make_agent("carol", open_tickets=3))
    options = {"max_open": 5, "agents": {"bob": 2}}
    result, trace = await run_chain([("capacity", options), "round_robin"], agents=agents)
    assert result.agent == "carol"
    assert trace[0].outcome == "narrow" and "alice (5/5)" in trace[0].reason and "bob (2/2)" in trace[0].reason


async def test_capacity_everyone_full_goes_to_supervisor():
    agents = make_agents("alice", "bob")
    result, _ = await run_chain([("capacity", {"max_open": 1, "agents": {"alice": 0, "bob": 0}})], agents=agents)
    assert result.agent is None and result.supervisor == "support-lead@example.test"


SCHEDULE = {
    "hours": {"mon-fri": "09:00-17:00"},
    "holidays": ["2024-12-25"],
    "teams": {"support": {"on_call": ["oncall"]}},
}
WORLD = (make_agent("berlin", timezone="Europe/Berlin"), make_agent("newyork", timezone="America/New_York"),
         make_agent("tokyo", timezone="Asia/Tokyo"), make_agent("oncall"))


async def scheduled(now: str, agents=WORLD):
    clock = FakeClock(now)
    return await run_chain([("schedule", SCHEDULE), "least_loaded"], agents=agents, clock=clock)


async def test_schedule_uses_each_agents_time_zone():
    result, trace = await scheduled("2024-06-03T08:00:00+00:00")
    assert trace[0].reason.startswith("on duty: berlin (off:")
    assert result.agent == "berlin"
    result, trace = await scheduled("2024-06-03T15:30:00+00:00")
    assert trace[0].reason.startswith("on duty: newyork, oncall (off:")
    result, trace = await scheduled("2024-06-04T01:00:00+00:00")
    assert trace[0].reason.startswith("on duty: tokyo (off:")
    assert "newyork: Mon 21:00 local is outside working hours" in trace[0].reason


async def test_schedule_holiday_and_on_call_roster():
    result, trace = await scheduled("2024-12-25T11:00:00+01:00")
    assert result.agent == "oncall"
    assert "berlin: holiday 2024-12-25" in trace[0].reason
    assert "nobody in team support on duty" in trace[0].reason and "on call: oncall" in trace[0].reason
    result, trace = await scheduled("2024-12-24T16:30:00+00:00")
    assert trace[0].reason.startswith("on duty: newyork, oncall (off:")


async def test_schedule_without_roster_leaves_candidates():
    clock = FakeClock("2024-06-08T12:00:00+00:00")
    result, trace = await run_chain([("schedule", {"hours": {"mon-fri": "09:00-17:00"}})],
                                    agents=make_agents("alice"), clock=clock)
    assert trace[0].outcome == "pass" and result.agent == "alice"


async def test_schedule_night_shift_spans_midnight():
    options = {"agents": {"owl": {"hours": {"fri": "22:00-06:00"}}}, "hours": {"mon-sun": "off"}}
    agents = (make_agent("owl"), make_agent("lark"))
    clock = FakeClock("2024-06-08T03:00:00+00:00")
    result, trace = await run_chain([("schedule", options)], agents=agents, clock=clock)
    assert "on duty: owl" in trace[0].reason and result.agent == "owl"


async def test_schedule_a_night_shift_belongs_to_the_day_it_starts():
    """A holiday on Saturday does not end Friday's night shift; one on Friday means it never starts."""
    agents = (make_agent("owl"), make_agent("lark"))
    clock = FakeClock("2024-06-08T03:00:00+00:00")
    for holiday, on_duty in (("2024-06-08", True), ("2024-06-07", False)):
        options = {"agents": {"owl": {"hours": {"fri": "22:00-06:00"}, "holidays": [holiday]}},
                   "hours": {"mon-sun": "off"}}
        result, trace = await run_chain([("schedule", options)], agents=agents, clock=clock)
        if on_duty:
            assert "on duty: owl" in trace[0].reason and result.agent == "owl"
        else:
            assert "owl: holiday 2024-06-07" in trace[0].reason


async def test_example_chain_with_all_six(state):
    chain = build_chain([
        ("rules", SECURITY_RULES), "sticky", ("schedule", {"hours": {"mon-sun": "00:00-24:00"}}),
        ("capacity", {"max_open": 10}), "round_robin", "least_loaded"], agents=PEOPLE, teams=TEAMS)
    result, trace = await run_chain(chain, agents=PEOPLE, state=state,
                                    message=make_message(subject="fraud on my account"))
    assert result.team == "security" and result.agent == "sam" and result.decided_by == "round_robin"
    assert [s.plugin for s in trace] == ["rules", "sticky", "schedule", "capacity", "round_robin"]
    assert isinstance(state, MemoryStateStore) and await state.get("round_robin", "last:security") == "sam"


def test_shipped_routing_example_loads():
    example = (Path(__file__).resolve().parents[2] / "docs" / "routing-example.yaml").read_text()
    config = loads(BASE_CONFIG.replace("fallback: {team: support}\n", "") + example, "routing-example.yaml")
    chain = load_chain(config)
    assert [link.name for link in chain.links] == ["rules", "sticky", "schedule", "capacity", "round_robin"]
    assert chain.links[-1].timeout == 0.5


def reads_body(plugin, **options) -> bool:
    agents = (*THREE, make_agent("sam", teams=("security",)))
    return reads_bodies(build_chain([(plugin, options)], agents=agents))


def test_only_rules_on_the_body_make_gatewayd_extract_bodies():
    for name in ("round_robin", "least_loaded", "sticky", "schedule", "capacity"):
        options = {"max_open": 5} if name == "capacity" else {}
        assert not reads_body(name, **options), name
    assert not reads_body("rules", rules=[{"match": {"subject": "fraud", "from": "@x"}, "team": "security"}])
    assert reads_body("rules", rules=[{"match": {"body": "fraud"}, "team": "security"}])
    assert reads_body("rules", rules=[{"keywords": ["fraud"], "team": "security"}])
