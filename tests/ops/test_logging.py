"""Logs: one line per record and per SMTP transaction, with the ticket ID; never a message body."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.ops.helpers import DaemonProcess
from tests.support.gateway import config_text, free_port
from tests.support.smtp import Sink, message, send_message

pytestmark = pytest.mark.slow

MARKER = "Xyzzy-body-secret-4711"


async def run_scenario(tmp_path: Path, sink: Sink, logging: str) -> list[str]:
    smtp_port = free_port()
    path = tmp_path / "gatewayd.yaml"
    path.write_text(config_text(tmp_path, smtp_port=smtp_port, lmtp_port=free_port(), relay_port=sink.port,
                                extra=f"logging: {logging}\n"))
    daemon = await DaemonProcess.start(path, tmp_path)
    try:
        body = f"My account number is {MARKER}.\r\n"
        for n in range(2):
            [reply] = await send_message(smtp_port, message(f"Question {n}", message_id=f"<q{n}@c.test>", body=body))
            assert reply.code == 250
        [refused] = await send_message(smtp_port, message("Bare", body=f"{MARKER}\nbare LF\r\n"))
        assert refused.code == 550
        await sink.wait_for(2)
        await daemon.wait_for_log("delivery item=2")
    finally:
        assert await daemon.stop() == 0
    return daemon.log_text().splitlines()


async def test_json_logs_at_debug_level_have_one_transaction_line_each_and_no_body(
        tmp_path: Path, sink: Sink) -> None:
    lines = await run_scenario(tmp_path, sink, "{format: json, level: DEBUG}")
    records = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    transactions = [r["msg"] for r in records if r["msg"].startswith("smtp transaction ")]
    assert len(transactions) == 3
    assert [re.search(r"ticket=(\S+)", t).group(1) for t in transactions] == ["SUP-1000", "SUP-1001", "-"]
    assert [re.search(r"outcome=(\S+)", t).group(1) for t in transactions] == ["accepted", "accepted", "refused"]
    assert any("routed ticket=SUP-1000" in r["msg"] for r in records)
    assert MARKER not in "\n".join(lines)


async def test_keyvalue_logs_are_one_line_per_record_and_carry_no_body(tmp_path: Path, sink: Sink) -> None:
    lines = await run_scenario(tmp_path, sink, "{format: keyvalue, level: DEBUG}")
    assert lines and all(re.match(r"ts=\S+Z level=\w+ logger=\S+ msg=", line) for line in lines), lines[:5]
    assert sum("smtp transaction " in line for line in lines) == 3
    assert sum("queued as SUP-100" in line for line in lines) == 2
    assert MARKER not in "\n".join(lines)
