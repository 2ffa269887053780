"""``schedule``: only agents on duty now, in their own time zone; the on-call roster when nobody is.

Options::

    - plugin: schedule
      timezone: Europe/Berlin          # for agents without their own timezone (default UTC)
      hours: {mon-fri: "09:00-17:00"}  # default working hours
      holidays: ["2024-12-25"]         # dates, in each agent's local calendar
      teams:
        security:
          timezone: America/New_York
          hours: {mon-fri: "08:00-20:00", sat: "10:00-14:00"}
          holidays: ["2024-07-04"]
          on_call: [sam]               # used when nobody in the team is on duty
      agents:
        alice: {hours: {mon-thu: "07:00-15:00"}, holidays: ["2024-08-12"]}

Hours are looked up agent first, then the candidate team, then the default;
an agent with no hours anywhere is always on duty. They are written as
gatewayd's ``business_hours.hours`` are (``parse_hours`` of the plugin API):
days ``mon``..``sun``, ranges (``mon-fri``, ``fri-mon``) and comma lists; a
day's value is a range ``HH:MM-HH:MM`` (``22:00-06:00`` runs past midnight), a
list of ranges, or ``off`` (closes the days; entries apply in order). Away
agents never reach this plugin: the dispatcher removes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gatewayd.plugin import (API_VERSION, AgentView, Decision, HoursError, MessageView, Options, Plugin, PluginContext,
                             TicketView, Week, is_open, parse_hours)


@dataclass(frozen=True)
class Calendar:
    """Working hours (minutes from midnight per weekday), holidays and a time zone."""

    week: Week | None = None
    holidays: frozenset[date] = frozenset()
    zone: tzinfo | None = None
    on_call: tuple[str, ...] = ()


@dataclass(frozen=True)
class Duty:
    on: bool
    why: str


class Schedule(Plugin):
    """Narrows to agents on duty; falls back to the team's on-call roster; never empties the pool itself."""

    api_version = API_VERSION
    reads_body = False

    def __init__(self, options: Options) -> None:
        self.default = _calendar(options, "", {
            "timezone": options.get("timezone", None), "hours": options.get("hours", None),
            "holidays": options.get("holidays", None)})
        self.teams: dict[str, Calendar] = {}
        for name, raw in options.get_mapping("teams", {}).items():
            if options.check_team(f"teams.{name}", name):
                self.teams[name] = _calendar(options, f"teams.{name}", raw, on_call=True)
        self.agents: dict[str, Calendar] = {}
        for name, raw in options.get_mapping("agents", {}).items():
            if options.check_agent(f"agents.{name}", name):
                self.agents[name] = _calendar(options, f"agents.{name}", raw)

    def duty(self, agent: AgentView, team: str, now: datetime) -> Duty:
        """Whether ``agent`` works at ``now``, judged in the agent's own time zone."""
        own = self.agents.get(agent.name, Calendar())
        team_cal = self.teams.get(team, Calendar())
        zone = _zone(agent.timezone) or own.zone or team_cal.zone or self.default.zone or UTC
        local = now.astimezone(zone)
        holidays = own.holidays | team_cal.holidays | self.default.holidays
        week = own.week if own.week is not None else team_cal.week if team_cal.week is not None else self.default.week
        if week is None:
            if local.date() in holidays:
                return Duty(False, f"holiday {local.date().isoformat()}")
            return Duty(True, "no working hours set")
        if is_open(week, local, holidays):
            return Duty(True, f"{local:%a %H:%M} local")
        if is_open(week, local):
            # Open but for a holiday: the one the shift running now started on (a night shift: yesterday).
            started = local.date() if local.date() in holidays else local.date() - timedelta(days=1)
            return Duty(False, f"holiday {started.isoformat()}")
        return Duty(False, f"{local:%a %H:%M} local is outside working hours")

    def route(self, context: PluginContext, ticket: TicketView, message: MessageView,
              candidates: tuple[AgentView, ...]) -> Decision:
        if not candidates:
            return Decision.abstain(f"no available candidate in team {context.team}")
        now = context.now()
        duties = {a.name: self.duty(a, context.team, now) for a in candidates}
        on_duty = [name for name, duty in duties.items() if duty.on]
        if len(on_duty) == len(candidates):
            return Decision.abstain("the only candidate is on duty" if len(candidates) == 1
                                    else f"all {len(candidates)} candidates on duty")
        off = "; ".join(f"{name}: {duty.why}" for name, duty in duties.items() if not duty.on)
        if on_duty:
            return Decision.narrow(f"on duty: {', '.join(on_duty)} (off: {off})", agents=on_duty)
        roster = [name for name in self.teams.get(context.team, Calendar()).on_call if name in duties]
        if roster:
            return Decision.narrow(f"nobody in team {context.team} on duty ({off}); on call: {', '.join(roster)}",
                                   agents=roster)
        return Decision.abstain(f"nobody in team {context.team} on duty and no on-call agent available "
                                f"({off}); candidates left unchanged")


def _zone(name: str | None) -> tzinfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _calendar(options: Options, path: str, raw: Any, *, on_call: bool = False) -> Calendar:
    prefix = f"{path}." if path else ""
    if path and not isinstance(raw, Mapping):
        options.error(path, "must be a mapping with hours:, holidays:, timezone:" + (", on_call:" if on_call else ""))
        return Calendar()
    if path:
        allowed = {"hours", "holidays", "timezone"} | ({"on_call"} if on_call else set())
        for key in raw:
            if key not in allowed:
                options.error(f"{prefix}{key}", f"unknown key (expected one of: {', '.join(sorted(allowed))})")
    zone = None
    if raw.get("timezone") is not None:
        zone = _zone(str(raw["timezone"]))
        if zone is None:
            options.error(f"{prefix}timezone", f"{raw['timezone']!r} is not a known time zone (e.g. Europe/Berlin)")
    week = _week(options, f"{prefix}hours", raw["hours"]) if raw.get("hours") is not None else None
    holidays = _holidays(options, f"{prefix}holidays", raw.get("holidays") or ())
    roster: tuple[str, ...] = ()
    if on_call and raw.get("on_call") is not None:
        names = raw["on_call"]
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            options.error(f"{prefix}on_call", "must be a list of agent names")
        else:
            roster = tuple(n for i, n in enumerate(names) if options.check_agent(f"{prefix}on_call[{i}]", n))
    return Calendar(week=week, holidays=holidays, zone=zone, on_call=roster)


def _week(options: Options, path: str, raw: Any) -> Week | None:
    if not isinstance(raw, Mapping):
        options.error(path, 'must map days to hours, e.g. {mon-fri: "09:00-17:00"}')
        return None
    try:
        return parse_hours(raw)
    except HoursError as exc:
        options.error(f"{path}.{exc.key}", exc.reason)
        return None


def _holidays(options: Options, path: str, raw: Any) -> frozenset[date]:
    if isinstance(raw, (str, date)) or not isinstance(raw, (list, tuple)):
        options.error(path, 'must be a list of dates such as "2024-12-25"')
        return frozenset()
    result: set[date] = set()
    for i, item in enumerate(raw):
        if isinstance(item, datetime):
            result.add(item.date())
        elif isinstance(item, date):
            result.add(item)
        else:
            try:
                result.add(date.fromisoformat(str(item)))
            except ValueError:
                options.error(f"{path}[{i}]", f"{item!r} is not a date (YYYY-MM-DD)")
    return frozenset(result)


plugin = Schedule
