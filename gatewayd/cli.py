"""``gatewayd`` command line: run the daemon, check a config, look at tickets and the outbox."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import __version__
from . import config as config_module
from .config import Config
from .errors import ConfigError, StoreError, WorkerFailed
from .ids import TicketIds

DEFAULT_CONFIG = "/etc/gatewayd/gatewayd.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if getattr(args, "standalone", False):
        return int(args.handler(args) or 0)
    try:
        config = config_module.load(args.config)
        if args.command != "check-config":
            _load_routing(config)
        return int(args.handler(args, config) or 0)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        count = len(exc.issues)
        print(f"{args.config}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"gatewayd: store: {exc}", file=sys.stderr)
        return 1
    except WorkerFailed as exc:
        print(f"gatewayd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    from .dkim_cli import add_parsers as add_dkim_parsers
    from .routing_cli import add_parsers as add_routing_parsers

    parser = argparse.ArgumentParser(prog="gatewayd", description="SMTP/LMTP gateway for support mail")
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    run.add_argument("--one-process", action="store_true",
                     help="route and deliver on the daemon's own event loop instead of in a worker process "
                          "(one process to debug or profile; half the throughput under load)")
    run.set_defaults(handler=_run)

    check = sub.add_parser("check-config", parents=[common],
                           help="validate a config file: exit 0, or 1 listing every error")
    check.set_defaults(handler=_check_config)

    tickets = sub.add_parser("tickets", help="list and show tickets").add_subparsers(dest="action", metavar="ACTION")
    listing = tickets.add_parser("list", parents=[common], help="list tickets, newest first")
    listing.add_argument("--open", action="store_true", help="only open tickets")
    listing.add_argument("--overdue", action="store_true", help="only open tickets past their response target")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=_store_command(_tickets_list))
    show = tickets.add_parser("show", parents=[common], help="one ticket with its messages and events")
    show.add_argument("ticket", metavar="ID", help="ticket ID, e.g. SUP-1042")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=_store_command(_tickets_show))

    queue = sub.add_parser("queue", help="the outbox").add_subparsers(dest="action", metavar="ACTION")
    qlist = queue.add_parser("list", parents=[common], help="outbox items not yet sent: pending and failed")
    qlist.add_argument("--all", action="store_true", help="include sent items")
    qlist.add_argument("--json", action="store_true", help="machine-readable output")
    qlist.set_defaults(handler=_store_command(_queue_list))

    report = sub.add_parser("report", parents=[common],
                            help="per-agent and per-team counts and response times for a date range")
    report.add_argument("--from", dest="start", required=True, help="first day, YYYY-MM-DD (local time)")
    report.add_argument("--to", dest="end", required=True, help="last day, YYYY-MM-DD (inclusive)")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.set_defaults(handler=_store_command(_report))

    stores = sub.add_parser("store", help="the SQLite store").add_subparsers(dest="action", metavar="ACTION")
    backup = stores.add_parser("backup", parents=[common],
                               help="consistent copy of the store, safe while gatewayd runs")
    backup.add_argument("path", metavar="PATH", type=Path, help="file to write; must not exist yet")
    backup.set_defaults(handler=_store_backup)

    add_routing_parsers(sub, common)
    add_dkim_parsers(sub)
    return parser


def _load_routing(config: Config) -> None:
    from .discovery import load_chain

    load_chain(config)


def _check_config(args: argparse.Namespace, config: Config) -> int:
    _load_routing(config)
    print(f"{args.config}: ok ({len(config.listeners)} listeners, {len(config.agents)} agents, "
          f"{len(config.routing)} routing plugins)")
    return 0


def _run(args: argparse.Namespace, config: Config) -> int:
    from . import logs
    from .daemon import Daemon

    logs.configure(config.logging)

    async def run() -> None:
        await Daemon(config, worker_process=not args.one_process).run()

    asyncio.run(run())
    return 0


def _store_backup(args: argparse.Namespace, config: Config) -> int:
    from .backup import backup

    result = backup(config.store.path, args.path)
    print(f"{config.store.path} -> {result.target}: {result.tickets} tickets, {result.size} bytes, "
          f"schema version {result.schema_version}, integrity ok")
    return 0


StoreHandler = Callable[[argparse.Namespace, Config, Any], Coroutine[Any, Any, int]]


def _store_command(handler: StoreHandler) -> Callable[[argparse.Namespace, Config], int]:
    """Wraps an async command that reads the store, opening and closing it around the call."""
    def run(args: argparse.Namespace, config: Config) -> int:
        from .store import Store

        async def go() -> int:
            store = await Store.open(config.store.path)
            try:
                return await handler(args, config, store)
            finally:
                await store.close()
        return asyncio.run(go())
    return run


def _ids(config: Config) -> TicketIds:
    return TicketIds(config.tickets.prefix, config.hostname, config.support.reply_secret.encode())


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


async def _tickets_list(args: argparse.Namespace, config: Config, store: Any) -> int:
    ids = _ids(config)
    tickets = await store.tickets(open_only=args.open)
    if args.overdue:
        from .report import overdue_tickets

        overdue = await overdue_tickets(store)
        tickets = [t for t in tickets if t.number in overdue]
    if args.json:
        print(json.dumps([{**asdict(t), "id": ids.ref(t.number)} for t in tickets], indent=2, ensure_ascii=False))
        return 0
    rows = [[ids.ref(t.number), t.status, t.priority, t.team or "-", t.agent or "-", _when(t.created_at),
             t.customer, t.subject[:60]] for t in tickets]
    print(_table(rows, ["ID", "STATUS", "PRIORITY", "TEAM", "AGENT", "CREATED", "CUSTOMER", "SUBJECT"]))
    return 0


async def _tickets_show(args: argparse.Namespace, config: Config, store: Any) -> int:
    ids = _ids(config)
    number = ids.number(args.ticket.upper())
    ticket = await store.ticket(number) if number is not None else None
    if ticket is None:
        print(f"gatewayd: no ticket {args.ticket}", file=sys.stderr)
        return 1
    messages = await store.messages(ticket.number)
    events = await store.events(ticket.number)
    if args.json:
        print(json.dumps({"ticket": {**asdict(ticket), "id": ids.ref(ticket.number)},
                          "messages": [asdict(m) for m in messages],
                          "events": [asdict(e) for e in events]}, indent=2, ensure_ascii=False))
        return 0
    print(f"{ids.ref(ticket.number)}  {ticket.subject}")
    for label, value in (("status", ticket.status), ("priority", ticket.priority), ("team", ticket.team),
                         ("agent", ticket.agent), ("customer", ticket.customer),
                         ("created", _when(ticket.created_at)), ("updated", _when(ticket.updated_at))):
        print(f"  {label:<9} {value or '-'}")
    print("\nmessages:")
    print(_table([[str(m.id), m.direction, _when(m.received_at), f"<{m.mail_from}>", str(m.size),
                   m.message_id or "-"] for m in messages], ["#", "DIR", "RECEIVED", "FROM", "SIZE", "MESSAGE-ID"]))
    print("\nevents:")
    for event in events:
        detail = {k: v for k, v in event.detail.items() if k != "trace"}
        print(f"  {_when(event.at)}  {event.kind:<20} {event.actor or '':<8} "
              f"{json.dumps(detail, ensure_ascii=False, sort_keys=True)}")
        for step in event.detail.get("trace", []):
            print(f"      {step['plugin']:<14} {step['outcome']:<9} {step['ms']:>7.1f} ms  {step['reason']}")
    return 0


async def _report(args: argparse.Namespace, config: Config, store: Any) -> int:
    from datetime import date, datetime, timedelta

    from . import report

    try:
        first, last = date.fromisoformat(args.start), date.fromisoformat(args.end)
    except ValueError as exc:
        print(f"gatewayd: report: {exc} (dates look like 2025-03-31)", file=sys.stderr)
        return 2
    start = datetime.combine(first, datetime.min.time()).astimezone().timestamp()
    end = datetime.combine(last + timedelta(days=1), datetime.min.time()).astimezone().timestamp()
    figures = await report.build(store, start, end)
    print(json.dumps(figures, indent=2, ensure_ascii=False) if args.json else report.render(figures))
    return 0


async def _queue_list(args: argparse.Namespace, config: Config, store: Any) -> int:
    ids = _ids(config)
    states = ("pending", "failed", "sent") if args.all else ("pending", "failed")
    items = await store.outbox(states=states)
    if args.json:
        print(json.dumps([asdict(i) for i in items], indent=2, ensure_ascii=False))
        return 0
    rows = [[str(i.id), i.kind, ids.ref(i.ticket) if i.ticket else "-", i.state, str(i.attempts),
             _when(i.next_attempt_at) if i.state == "pending" else "-", f"<{i.rcpt}>", (i.last_error or "-")[:70]]
            for i in items]
    print(_table(rows, ["#", "KIND", "TICKET", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "RCPT", "LAST ERROR"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
