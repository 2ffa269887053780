"""``gatewayd route --explain`` and ``gatewayd agents list|away|back``.

Each handler takes the parsed arguments and a loaded Config and returns the
exit status. ``route --explain`` is a dry run: it reads the live agent state
and plugin state but never writes (plugin state changes are kept in memory
and dropped), and it never creates a missing store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from .config import Config
from .discovery import load_chain
from .dispatch import RoutingResult
from .message_view import message_view_from_bytes
from .plugin import MessageView, TicketView
from .router import StorePluginState, agent_views
from .testing import MemoryStateStore, ReadOnlyStateStore

__all__ = ["add_parsers", "explain", "agents_list", "agents_away", "agents_back", "open_store"]


async def open_store(path: Path) -> Any:
    """The store behind the commands; a seam so tests can substitute a fake."""
    from .store import Store

    return await Store.open(path)


def add_parsers(subparsers: Any, common: argparse.ArgumentParser | None = None) -> None:
    """Adds ``route`` and ``agents`` to the main parser; ``common`` carries ``-c/--config``."""
    parents = [common] if common is not None else []
    route = subparsers.add_parser("route", parents=parents, help="dry-run the routing chain on a message")
    route.add_argument("--explain", metavar="MESSAGE.eml", required=True, type=Path,
                       help="show which plugin decided what, and why; changes nothing")
    route.add_argument("--mail-from", default=None, help="envelope sender (default: the From address)")
    route.add_argument("--rcpt", action="append", default=None,
                       help="envelope recipient (default: the first support address); repeatable")
    route.add_argument("--json", action="store_true", help="machine-readable output")
    route.set_defaults(handler=explain)

    agents = subparsers.add_parser("agents", help="agent availability").add_subparsers(dest="action",
                                                                                       metavar="ACTION")
    listing = agents.add_parser("list", parents=parents, help="agents with teams, away flag and open tickets")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=agents_list)
    away = agents.add_parser("away", parents=parents, help="take an agent out of routing")
    away.add_argument("name", metavar="NAME")
    away.add_argument("--reason", default="set away from the command line")
    away.set_defaults(handler=agents_away)
    back = agents.add_parser("back", parents=parents, help="put an agent back into routing")
    back.add_argument("name", metavar="NAME")
    back.add_argument("--reason", default="back from the command line")
    back.set_defaults(handler=agents_back)


# --------------------------------------------------------------------------- route --explain


def explain(args: argparse.Namespace, config: Config, out: TextIO = sys.stdout) -> int:
    try:
        raw = args.explain.read_bytes()
    except OSError as exc:
        print(f"gatewayd: cannot read {args.explain}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    rcpts = tuple(args.rcpt or config.support.addresses[:1])
    message = message_view_from_bytes(raw, args.mail_from or "", rcpts, max_depth=config.limits.mime_depth)
    if not message.mail_from:
        message = replace(message, mail_from=message.sender)
    result = asyncio.run(_explain(config, message))
    if args.json:
        payload = {"message": {"subject": message.subject, "sender": message.sender, "rcpt_tos": list(rcpts)},
                   "dry_run": True, **result.to_dict()}
        json.dump(payload, out, indent=2)
        out.write("\n")
    else:
        out.write(render_explain(message, result))
    return 0


async def _explain(config: Config, message: MessageView) -> RoutingResult:
    chain = load_chain(config)
    now = datetime.now(UTC)
    store = await open_store(config.store.path) if Path(config.store.path).exists() else None
    try:
        states = await store.agent_states() if store is not None else {}
        previous = await store.customer_previous_agents(message.sender, -1) if store is not None else ()
        backing: Any = StorePluginState(store) if store is not None else MemoryStateStore()
        ticket = TicketView(id="(dry run)", subject=message.subject, customer=message.sender, priority="normal",
                            created_at=now, customer_previous_agents=tuple(previous))
        return await chain.route(ticket, message, agent_views(config, states), ReadOnlyStateStore(backing), now)
    finally:
        if store is not None:
            await store.close()


def render_explain(message: MessageView, result: RoutingResult) -> str:
    lines = [f"Message: {message.subject!r} from {message.sender}", f"Chain ({len(result.trace)} steps):"]
    width = max((len(step.plugin) for step in result.trace), default=8)
    for number, step in enumerate(result.trace, 1):
        lines.append(f"  {number}. {step.plugin:<{width}}  {step.outcome:<10} {step.ms:8.2f} ms  {step.reason}")
    if result.agent is not None:
        lines.append(f"Result: {result.agent} (team {result.team}, priority {result.priority}), "
                     f"decided by {result.decided_by}")
    else:
        lines.append(f"Result: nobody available in team {result.team}; supervisor {result.supervisor} "
                     f"(priority {result.priority})")
    lines.append("Dry run: nothing was stored and plugin state was not changed.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- agents


def agents_list(args: argparse.Namespace, config: Config, out: TextIO = sys.stdout) -> int:
    async def read() -> dict[str, Any]:
        if not Path(config.store.path).exists():
            return {}
        store = await open_store(config.store.path)
        try:
            return dict(await store.agent_states())
        finally:
            await store.close()

    states = asyncio.run(read())
    rows: list[dict[str, Any]] = [{"name": a.name, "address": a.address, "teams": list(a.teams), "away": bool(s and s.away),
             "reason": getattr(s, "reason", None) if s and s.away else None,
             "open_tickets": s.open_tickets if s else 0}
            for a in config.agents for s in [states.get(a.name)]]
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return 0
    out.write(_table(["NAME", "TEAMS", "STATUS", "OPEN", "ADDRESS"],
                     [[r["name"], ",".join(r["teams"]), _status(r), str(r["open_tickets"]), r["address"]]
                      for r in rows]))
    return 0


def _status(row: dict[str, Any]) -> str:
    if not row["away"]:
        return "available"
    return f"away ({row['reason']})" if row["reason"] else "away"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return "".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
                   for row in [header, *rows])


def agents_away(args: argparse.Namespace, config: Config, out: TextIO = sys.stdout) -> int:
    return _set_away(args, config, True, out)


def agents_back(args: argparse.Namespace, config: Config, out: TextIO = sys.stdout) -> int:
    return _set_away(args, config, False, out)


def _set_away(args: argparse.Namespace, config: Config, away: bool, out: TextIO) -> int:
    if config.agent(args.name) is None:
        known = ", ".join(a.name for a in config.agents) or "none"
        print(f"gatewayd: no agent named {args.name!r} in {config.source} (known: {known})", file=sys.stderr)
        return 1

    async def write() -> None:
        store = await open_store(config.store.path)
        try:
            await store.set_agent_away(args.name, away, args.reason)
        finally:
            await store.close()

    asyncio.run(write())
    out.write(f"{args.name} is {'away: no new tickets are routed to them' if away else 'back in routing'}\n")
    return 0
