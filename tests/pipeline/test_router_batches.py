"""The router decides work items one by one but commits a whole batch at once, as if one by one."""

from __future__ import annotations

import asyncio
import textwrap
import threading
from collections import Counter

import pytest

from gatewayd import config as config_module
from gatewayd import message_view
from gatewayd import router as router_module
from gatewayd.discovery import load_chain
from gatewayd.errors import StoreUnavailable
from gatewayd.router import Router
from tests.autoreply.conftest import autoreply_yaml
from tests.support.gateway import config_text
from tests.support.smtp import message, send_message


async def paused(gw) -> Router:
    """Stops the daemon's own workers and returns a router the test drives by hand.

    Mail sent meanwhile queues up as work, so one ``work_through`` sees it all as one batch.
    """
    gw.daemon.router.stop()
    gw.daemon.sla.stop()
    await gw.daemon.outbox.stop(0)
    await asyncio.sleep(0.1)
    daemon = gw.daemon
    return Router(daemon.config, gw.store, daemon.router.ids, daemon.router.chain, daemon.metrics)


async def send(gw, count: int, **kwargs) -> None:
    for n in range(count):
        [reply] = await send_message(gw.smtp_port, message(f"Help {n}", message_id=f"<b{n}@customer.test>"),
                                     **kwargs)
        assert reply.code == 250, reply


async def forwards(gw) -> list[tuple[int, str | None]]:
    items = await gw.store.outbox(states=("pending",))
    return [(i.ticket, i.agent) for i in items if i.kind == "forward"]


async def test_a_batch_of_routes_and_receipts_commits_once(gateway_factory, monkeypatch):
    monkeypatch.setattr(router_module, "_BATCH_SECONDS", 60.0)
    gw = await gateway_factory(extra=autoreply_yaml())
    router = await paused(gw)
    await send(gw, 10)
    assert len(await gw.store.pending_work()) == 20, "a route and a receipt per message"
    commits = gw.store.stats.commits

    await router.work_through()

    assert gw.store.stats.commits == commits + 1
    assert await gw.store.pending_work() == []
    assert len(await forwards(gw)) == 10
    receipts = [i for i in await gw.store.outbox(states=("pending",)) if i.kind == "receipt"]
    assert len(receipts) == 3, "the per-sender limit (3) counts the receipts queued earlier in the same batch"


async def test_round_robin_stays_fair_across_a_batch_and_its_position_is_saved(gateway):
    router = await paused(gateway)
    await send(gateway, 9)
    await router.work_through()

    agents = [agent for _, agent in sorted(await forwards(gateway))]
    assert agents == ["alice", "bob"] * 4 + ["alice"]
    assert await gateway.store.plugin_state_get("round_robin", "last:support") == "alice"
    await send_message(gateway.smtp_port, message("next", message_id="<next@customer.test>"))
    await router.work_through()
    assert sorted(await forwards(gateway))[-1][1] == "bob", "the next batch continues the rotation"


async def test_later_items_see_the_loads_of_earlier_ones(gateway_factory):
    gw = await gateway_factory(routing="  - plugin: least_loaded\n")
    router = await paused(gw)
    await send(gw, 6)
    await router.work_through()
    assert Counter(agent for _, agent in await forwards(gw)) == {"alice": 3, "bob": 3}


async def test_a_follow_up_in_the_same_batch_stays_with_the_owner_just_decided(gateway):
    router = await paused(gateway)
    await send_message(gateway.smtp_port, message("Printer on fire", message_id="<first@customer.test>"))
    await send_message(gateway.smtp_port, message("Re: [SUP-1000] Printer on fire", message_id="<second@customer.test>",
                                                  extra="In-Reply-To: <first@customer.test>\r\n"))
    await router.work_through()

    assert await forwards(gateway) == [(1000, "alice"), (1000, "alice")]
    [_, followup] = [e for e in await gateway.store.events(1000) if e.kind == "routed"]
    assert followup.detail["summary"] == "owner -> alice"


async def test_a_returning_customer_in_the_same_batch_goes_to_the_agent_just_picked(gateway_factory):
    gw = await gateway_factory(routing="  - plugin: sticky\n  - plugin: round_robin\n")
    router = await paused(gw)
    await send(gw, 2)
    await router.work_through()
    assert await forwards(gw) == [(1000, "alice"), (1001, "alice")]
    [routed] = [e for e in await gw.store.events(1001) if e.kind == "routed"]
    assert routed.detail["trace"][0]["reason"] == "returning customer; previous agent alice"


async def test_an_item_the_store_refuses_rolls_back_alone_and_is_routed_when_it_can_be(gateway, monkeypatch):
    monkeypatch.setattr(router_module, "_RETRY_AFTER_ERROR", 0.0)
    original = router_module.enqueue_statement

    def enqueue_statement(**fields):
        if fields["ticket"] == 1001:
            return "INSERT INTO no_such_table VALUES (?)", (1,)
        return original(**fields)
    monkeypatch.setattr(router_module, "enqueue_statement", enqueue_statement)
    router = await paused(gateway)
    await send(gateway, 3)
    commits = gateway.store.stats.commits

    await router.work_through()
    assert gateway.store.stats.commits == commits + 1
    assert [t for t, _ in await forwards(gateway)] == [1000, 1002]
    assert [w.ticket for w in await gateway.store.pending_work()] == [1001]
    assert (await gateway.store.ticket(1001)).agent is None, "its owner change was rolled back with it"

    monkeypatch.setattr(router_module, "enqueue_statement", original)
    await router.work_through()
    assert sorted(t for t, _ in await forwards(gateway)) == [1000, 1001, 1002]
    assert await gateway.store.pending_work() == []


async def test_a_batch_the_store_cannot_commit_is_decided_again_from_scratch(gateway, monkeypatch):
    """Nothing of a batch that was not committed survives: not its routes, not the round-robin position."""
    monkeypatch.setattr(router_module, "_RETRY_AFTER_ERROR", 0.0)
    router = await paused(gateway)
    await send(gateway, 3)
    original = gateway.store.transact_each

    async def unavailable(parts):
        raise StoreUnavailable("disk went away")
    monkeypatch.setattr(gateway.store, "transact_each", unavailable)
    await router.work_through()
    assert len(await gateway.store.pending_work()) == 3
    assert await gateway.store.plugin_state_get("round_robin", "last:support") is None

    monkeypatch.setattr(gateway.store, "transact_each", original)
    await router.work_through()
    assert await forwards(gateway) == [(1000, "alice"), (1001, "bob"), (1002, "alice")]


async def test_a_long_queue_is_worked_through_in_a_few_batches(gateway):
    router = await paused(gateway)
    await send(gateway, 100)
    commits = gateway.store.stats.commits
    while await router.work_through():
        pass
    assert len(await forwards(gateway)) == 100
    assert gateway.store.stats.commits - commits <= 20


async def test_a_message_too_big_to_prefetch_is_read_on_its_own_in_the_same_batch(gateway):
    router = await paused(gateway)
    big = message("Big one", message_id="<big@customer.test>", body=("z" * 76 + "\r\n") * 4000)
    assert len(big) > 256 * 1024
    await send_message(gateway.smtp_port, message("Small one", message_id="<small@customer.test>"))
    await send_message(gateway.smtp_port, big)
    commits = gateway.store.stats.commits
    await router.work_through()
    assert gateway.store.stats.commits == commits + 1
    assert await forwards(gateway) == [(1000, "alice"), (1001, "bob")]


async def test_time_spent_reading_the_batch_does_not_cut_it_short(gateway, monkeypatch):
    """The batch's time limit is for deciding; a slow prefetch must not shrink batches to one item."""
    monkeypatch.setattr(router_module, "_BATCH_SECONDS", 0.05)
    router = await paused(gateway)
    await send(gateway, 5)
    first_messages = gateway.store.first_messages

    async def slow(tickets):
        await asyncio.sleep(0.2)
        return await first_messages(tickets)
    monkeypatch.setattr(gateway.store, "first_messages", slow)
    await router.work_through()
    assert len(await forwards(gateway)) == 5


class TestMessageBodies:
    """Bodies are extracted before the chain runs, off the loop, unless no plugin of the chain reads them."""

    BODY_RULES = ("  - plugin: rules\n    rules:\n"
                  "      - {match: {body: 'card (was )?stolen'}, team: security}\n"
                  "  - plugin: round_robin\n")
    SUBJECT_RULES = ("  - plugin: rules\n    rules:\n"
                     "      - {match: {subject: 'stolen'}, team: security}\n"
                     "  - plugin: round_robin\n")
    PEEKER = textwrap.dedent("""\
        from gatewayd.plugin import API_VERSION, Decision, Plugin

        class BodyPeeker(Plugin):
            api_version = API_VERSION
            {declaration}

            def route(self, context, ticket, message, candidates):
                if "stolen" in message.body:
                    return Decision.narrow("stolen card", team="security")
                return Decision.abstain("nothing stolen")

        plugin = BodyPeeker
        """)

    @staticmethod
    def spy_on_extraction(monkeypatch) -> list[str]:
        """The name of the thread each body extraction ran on."""
        threads: list[str] = []
        original = message_view._extract_body

        def extract(*args):
            threads.append(threading.current_thread().name)
            return original(*args)
        monkeypatch.setattr(message_view, "_extract_body", extract)
        return threads

    @staticmethod
    async def send_stolen_cards(gw, count: int, first: int = 0) -> None:
        for n in range(first, first + count):
            [reply] = await send_message(gw.smtp_port, message(f"Help {n}", message_id=f"<c{n}@customer.test>",
                                                               body="My card was stolen yesterday.\r\n"))
            assert reply.code == 250, reply

    async def peeker_gateway(self, gateway_factory, tmp_path, declaration: str):
        (tmp_path / "local").mkdir()
        (tmp_path / "local" / "peeker.py").write_text(self.PEEKER.format(declaration=declaration))
        return await gateway_factory(routing="  - plugin: peeker\n  - plugin: round_robin\n",
                                     extra=f"plugin_paths: [{tmp_path / 'local'}]\n")

    @pytest.mark.parametrize("routing", ["  - plugin: round_robin\n", SUBJECT_RULES], ids=["round_robin", "subject_rules"])
    async def test_a_chain_that_never_reads_bodies_never_extracts_one(self, gateway_factory, monkeypatch, routing):
        gw = await gateway_factory(routing=routing)
        threads = self.spy_on_extraction(monkeypatch)
        router = await paused(gw)
        await self.send_stolen_cards(gw, 5)
        await router.work_through()
        assert len(await forwards(gw)) == 5
        assert threads == []

    async def test_a_rule_on_the_body_gets_every_body_extracted_before_the_chain_runs(
            self, gateway_factory, monkeypatch):
        gw = await gateway_factory(routing=self.BODY_RULES)
        threads = self.spy_on_extraction(monkeypatch)
        router = await paused(gw)
        await self.send_stolen_cards(gw, 3)
        await router.work_through()

        assert Counter(agent for _, agent in await forwards(gw)) == {"sam": 3}, "every body was read by the rule"
        assert len(threads) == 3
        assert "gatewayd-plugin-hook" not in threads, "never under the plugin's timeout"
        assert threading.current_thread().name not in threads, "never on the loop"

    async def test_a_plugin_that_does_not_say_counts_as_reading_bodies(self, gateway_factory, tmp_path, monkeypatch):
        gw = await self.peeker_gateway(gateway_factory, tmp_path, declaration="")
        threads = self.spy_on_extraction(monkeypatch)
        router = await paused(gw)
        await self.send_stolen_cards(gw, 3)
        await router.work_through()
        assert Counter(agent for _, agent in await forwards(gw)) == {"sam": 3}
        assert len(threads) == 3 and "gatewayd-plugin-hook" not in threads

    async def test_a_plugin_that_reads_the_body_it_said_it_would_not_still_gets_it(
            self, gateway_factory, tmp_path, monkeypatch, caplog):
        gw = await self.peeker_gateway(gateway_factory, tmp_path, declaration="reads_body = False")
        threads = self.spy_on_extraction(monkeypatch)
        router = await paused(gw)
        await self.send_stolen_cards(gw, 3)
        await router.work_through()
        await self.send_stolen_cards(gw, 2, first=3)
        await router.work_through()

        assert Counter(agent for _, agent in await forwards(gw)) == {"sam": 5}
        assert len(threads) == 5
        assert threads[0] == "gatewayd-plugin-hook", "the first where it read it"
        assert "gatewayd-plugin-hook" not in threads[1:], "then before the chain runs"
        assert "every plugin of the chain has reads_body = False" in caplog.text

    async def test_a_reload_decides_again(self, gateway_factory, monkeypatch, tmp_path):
        gw = await gateway_factory(routing=self.BODY_RULES)
        threads = self.spy_on_extraction(monkeypatch)
        router = await paused(gw)
        await self.send_stolen_cards(gw, 1)
        await router.work_through()
        assert len(threads) == 1

        plain = config_module.loads(config_text(tmp_path, smtp_port=1, lmtp_port=2, relay_port=3), "reloaded.yaml")
        router.reconfigure(router.config, load_chain(plain, gw.daemon.metrics))
        await self.send_stolen_cards(gw, 2, first=1)
        await router.work_through()
        assert len(await forwards(gw)) == 3
        assert len(threads) == 1, "round_robin never reads a body"
