"""``gatewayd dkim keygen``: a signing key for ``dkim.key_file`` and the DNS record to publish.

It needs no config file (the key usually comes before the ``dkim:`` section),
and it never overwrites an existing key: replacing a published key by
accident breaks every signature in flight.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .dkim import generate_key


def add_parsers(sub: Any) -> None:
    dkim = sub.add_parser("dkim", help="DKIM signing keys").add_subparsers(dest="action", metavar="ACTION")
    keygen = dkim.add_parser("keygen", help="write a new private key and print the DNS TXT record to publish")
    keygen.add_argument("key_file", metavar="KEY_FILE", type=Path, help="where to write the key (must not exist)")
    keygen.add_argument("--domain", required=True, help="signing domain (d=), e.g. example.test")
    keygen.add_argument("--selector", required=True, help="selector (s=), e.g. gw")
    keygen.add_argument("--algorithm", choices=("rsa-sha256", "ed25519-sha256"), default="rsa-sha256")
    keygen.add_argument("--bits", type=int, default=2048, choices=(1024, 2048, 3072, 4096),
                        help="RSA key size (default 2048)")
    keygen.set_defaults(handler=keygen_command, standalone=True)


def keygen_command(args: argparse.Namespace) -> int:
    key = generate_key(args.algorithm, args.bits)
    try:
        fd = os.open(args.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"gatewayd: {args.key_file} exists; refusing to overwrite a key", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gatewayd: cannot write {args.key_file}: {exc.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as out:
        out.write(key.private)
    print(f"; private key written to {args.key_file} (mode 0600); publish this record:")
    print(key.record(args.selector, args.domain.lower()))
    print(f"; then configure: dkim: {{domain: {args.domain.lower()}, selector: {args.selector}, "
          f"key_file: {args.key_file}, algorithm: {args.algorithm}}}")
    return 0
