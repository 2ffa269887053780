"""Reviewer fixes: a store failure retries the receipt; agent mail with a failed DKIM verdict is refused."""

from __future__ import annotations

import pytest

from gatewayd.errors import StoreError, StoreUnavailable
from gatewayd.responder import Responder
from gatewayd.store import WorkItem
from tests.autoreply.conftest import autoreply_yaml, outcome
from tests.autoreply.test_dkim import CUSTOMER_RECORD, sign_inbound
from tests.replies.helpers import agent_mail, header, open_ticket, work_done
from tests.support.smtp import send_message


class TestReceiptStoreFailure:
    async def test_a_store_error_is_raised_for_a_retry_not_recorded_as_receipt_failed(self, gateway_factory,
                                                                                       monkeypatch) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        number, _ = await open_ticket(gw)
        await outcome(gw.store, number)
        responder = Responder(gw.daemon.config, gw.store, gw.daemon.router.ids, gw.daemon.metrics)

        async def broken(item):
            raise StoreUnavailable("disk went away")
        monkeypatch.setattr(responder, "_respond", broken)
        first = await gw.store.first_message(number)
        with pytest.raises(StoreError):
            await responder.handle(WorkItem(10**6, "receipt", number, first))
        assert "receipt_failed" not in [e.kind for e in await gw.store.events(number)]

    async def test_other_errors_still_end_as_receipt_failed(self, gateway_factory, monkeypatch) -> None:
        gw = await gateway_factory(extra=autoreply_yaml())
        number, _ = await open_ticket(gw)
        await outcome(gw.store, number)
        responder = Responder(gw.daemon.config, gw.store, gw.daemon.router.ids, gw.daemon.metrics)

        async def broken(item):
            raise ValueError("bad template")
        monkeypatch.setattr(responder, "_respond", broken)
        first = await gw.store.first_message(number)
        assert await responder.handle(WorkItem(10**6, "receipt", number, first)) is False
        assert "receipt_failed" in [e.kind for e in await gw.store.events(number)]


class TestAgentMailDkim:
    async def test_agent_mail_whose_dkim_failed_is_refused_and_the_supervisor_told(self, gateway_factory, dns_stub,
                                                                                   rsa_key) -> None:
        stub, port = dns_stub
        stub.records[CUSTOMER_RECORD] = rsa_key.txt
        gw = await gateway_factory(extra=f'dns: {{resolver: "127.0.0.1:{port}", timeout: 1s}}\n')
        number, forward = await open_ticket(gw)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        tampered = sign_inbound(agent_mail(agent, reply_to, "Please restart it.\r\n"), rsa_key).replace(
            b"Please restart it.", b"Please pay here.")
        [reply] = await send_message(gw.smtp_port, tampered, mail_from=f"{agent}@agents.example.test",
                                     rcpts=(reply_to,))
        assert reply.code == 250
        await work_done(gw)
        [_, alert] = await gw.sink.wait_for(2)
        assert alert.rcpt_tos == ["lead@example.test"]
        assert all(r.rcpt_tos != ["carol@customer.test"] for r in gw.sink.received)
        refused = [e for e in await gw.store.events(number) if e.kind == "reply_refused"]
        assert [e.detail["reason"] for e in refused] == ["dkim_failed"]
        assert gw.daemon.metrics.replies_refused.labels("dkim_failed")._value.get() == 1

    async def test_agent_mail_with_a_valid_signature_is_relayed(self, gateway_factory, dns_stub, rsa_key) -> None:
        stub, port = dns_stub
        stub.records[CUSTOMER_RECORD] = rsa_key.txt
        gw = await gateway_factory(extra=f'dns: {{resolver: "127.0.0.1:{port}", timeout: 1s}}\n')
        _, forward = await open_ticket(gw)
        agent, reply_to = header(forward, "X-Gatewayd-Agent"), header(forward, "Reply-To")
        signed = sign_inbound(agent_mail(agent, reply_to, "Please restart it.\r\n"), rsa_key)
        [reply] = await send_message(gw.smtp_port, signed, mail_from=f"{agent}@agents.example.test",
                                     rcpts=(reply_to,))
        assert reply.code == 250
        received = await gw.sink.wait_for(2)
        assert received[1].rcpt_tos == ["carol@customer.test"]
