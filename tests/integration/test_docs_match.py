"""docs/postfix.md is the recipe the integration tests run: every main.cf setting they write is shown."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import postfix_for
from tests.support.gateway import REPO
from tests.support.mta import DOVECOT_CONF, POSTFIX_MASTER_CF

DOC = (REPO / "docs" / "postfix.md").read_text()
ROOT = Path("/var/lib/gw-postfix")


def test_every_main_cf_setting_is_documented() -> None:
    main_cf = postfix_for(ROOT, 2525, "inet:[127.0.0.1]:2424", 24).main_cf()
    for line in main_cf.splitlines():
        assert line.rstrip() in DOC, f"docs/postfix.md lacks: {line}"


def test_master_cf_and_dovecot_conf_are_shown_verbatim() -> None:
    assert POSTFIX_MASTER_CF.format(listen="127.0.0.1:2525") in DOC
    dovecot = DOVECOT_CONF.format(root="/var/lib/gw-dovecot", imap_port=143, lmtp_port=24)
    assert dovecot in DOC
