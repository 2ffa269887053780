"""docs/postfix.md and docs/dovecot.md are the recipe the integration tests run, block for block.

Each configuration the harness writes (main.cf, master.cf with the relay port,
the transport map, dovecot.conf, the users file, and what the tests add to
gatewayd's config) must appear in the docs as one fenced block, exactly, with
the docs' placeholder paths and ports. Trailing blanks are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.integration.conftest import GATEWAYD_EXTRA, MAILBOXES, RELAY_TLS_OPTIONS, postfix_for, transport_map
from tests.support.gateway import REPO, config_text
from tests.support.mta import DOVECOT_CONF, DOVECOT_USER, Postfix

POSTFIX_DOC = (REPO / "docs" / "postfix.md").read_text()
DOVECOT_DOC = (REPO / "docs" / "dovecot.md").read_text()
# The placeholders the docs use for the tests' temporary directories and free ports.
POSTFIX_ROOT = Path("/var/lib/gw-postfix")
DOVECOT_ROOT = Path("/var/lib/gw-dovecot")
MX, RELAY, GATEWAY_SMTP, GATEWAY_LMTP, SOCKET, DOVECOT_LMTP, IMAP = \
    2525, 10025, 2526, 2424, "/run/gatewayd/lmtp.sock", 24, 143


def blocks(doc: str) -> list[str]:
    """The fenced code blocks of a Markdown text, each line without trailing blanks."""
    found = re.findall(r"^```[\w-]*\n(.*?)^```$", doc, flags=re.MULTILINE | re.DOTALL)
    return [normal(b) for b in found]


def normal(text: str) -> str:
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def assert_block(text: str, doc: str, name: str) -> None:
    assert normal(text) in blocks(doc), f"{name} is not shown as one block of exactly:\n{text}"


def postfix() -> Postfix:
    return postfix_for(POSTFIX_ROOT, MX, RELAY, f"inet:[127.0.0.1]:{GATEWAY_LMTP}", DOVECOT_LMTP)


class TestPostfix:
    def test_main_cf_is_shown_exactly(self) -> None:
        assert_block(postfix().main_cf(), POSTFIX_DOC, "main.cf")

    def test_master_cf_with_the_relay_port_is_shown_exactly(self) -> None:
        assert_block(postfix().master_cf(), POSTFIX_DOC, "master.cf")
        assert f"127.0.0.1:{RELAY} inet n - n - - smtpd\n  -o " in postfix().master_cf()

    def test_transport_map_is_shown_for_tcp_and_for_the_unix_socket(self) -> None:
        assert_block(transport_map(f"inet:[127.0.0.1]:{GATEWAY_LMTP}", DOVECOT_LMTP), POSTFIX_DOC, "transport")
        [socket_line] = [line for line in transport_map(f"unix:{SOCKET}", DOVECOT_LMTP).splitlines()
                         if line.startswith("example.test ")]
        assert_block(socket_line, POSTFIX_DOC, "the transport line for the unix socket")

    def test_the_transport_map_file_is_the_one_main_cf_names(self) -> None:
        assert f"transport_maps = hash:{POSTFIX_ROOT}/conf/transport\n" in postfix().main_cf()
        assert f"postmap -c {POSTFIX_ROOT}/conf {POSTFIX_ROOT}/conf/transport" in POSTFIX_DOC


    def test_the_relay_port_over_tls_is_shown_exactly(self) -> None:
        tls = (Path("/etc/postfix/relay.crt"), Path("/etc/postfix/relay.key"))
        options = RELAY_TLS_OPTIONS.format(cert=tls[0], key=tls[1])
        assert_block(options, POSTFIX_DOC, "the relay port's TLS options")
        with_tls = postfix_for(POSTFIX_ROOT, MX, RELAY, f"inet:[127.0.0.1]:{GATEWAY_LMTP}", DOVECOT_LMTP, tls)
        assert with_tls.master_cf() == postfix().master_cf() + options, "the options extend the relay port's block"
        [shown] = [yaml.safe_load(b) for b in blocks(POSTFIX_DOC) if b.startswith("  starttls:")]
        assert shown == {"starttls": True, "ca_file": str(tls[0])}


class TestGatewayd:
    def test_listeners_and_relay_are_the_ones_the_tests_configure(self) -> None:
        tests = yaml.safe_load(config_text(Path("/var/lib/gatewayd"), smtp_port=GATEWAY_SMTP,
                                           lmtp_port=GATEWAY_LMTP, relay_port=RELAY, lmtp_socket=SOCKET))
        [shown] = [yaml.safe_load(b) for b in blocks(POSTFIX_DOC) if b.startswith("listeners:")]
        assert shown["listeners"] == tests["listeners"]
        assert shown["relay"]["address"] == tests["relay"]["address"] == f"127.0.0.1:{RELAY}"

    def test_what_the_integration_tests_add_is_shown_exactly(self) -> None:
        extra = GATEWAYD_EXTRA.format(templates="/etc/gatewayd/templates", key_file="/etc/gatewayd/dkim.key",
                                      resolver="127.0.0.1:53")
        assert_block(extra, POSTFIX_DOC, "the gatewayd settings the integration tests add")


class TestDovecot:
    def test_dovecot_conf_is_shown_exactly(self) -> None:
        conf = DOVECOT_CONF.format(root=DOVECOT_ROOT, imap_port=IMAP, lmtp_port=DOVECOT_LMTP)
        assert_block(conf, DOVECOT_DOC, "dovecot.conf")

    def test_the_users_file_lists_every_mailbox_the_tests_read(self) -> None:
        users = "".join(DOVECOT_USER.format(user=user) for user in MAILBOXES)
        assert_block(users, DOVECOT_DOC, "the users file")
