"""Log output as one line per record, key=value or JSON, never with message bodies.

gatewayd's own records name envelopes, ticket IDs and outcomes, not content.
Libraries are another matter below WARNING: aiosqlite logs every statement with
its parameters (the raw message is one) and aiosmtpd every command line. So
their DEBUG and INFO records are dropped at the handler, whatever the level.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from .config import LoggingConfig

OWN_LOGGER = "gatewayd"


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"ts={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} logger={record.name} " \
               f"msg={record.getMessage()!r}"
        if record.exc_info:
            line += f" exc={self.formatException(record.exc_info)!r}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": record.created, "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


AIOSMTPD_LOGGER = "mail.log"


class OwnRecordsOnly(logging.Filter):
    """Passes gatewayd's records (plugins log as ``gatewayd.plugins.*``) at any level, others from WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING or record.name == OWN_LOGGER
                or record.name.startswith(OWN_LOGGER + "."))


def configure(config: LoggingConfig) -> None:
    """Installs gatewayd's handler on the root logger (stderr, which journald collects)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else KeyValueFormatter())
    handler.addFilter(OwnRecordsOnly())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level)
    # aiosmtpd logs every command at INFO; the filter above would drop those
    # records anyway, but only after they were built (a measurable share of
    # the CPU per message). gatewayd logs each transaction itself.
    logging.getLogger(AIOSMTPD_LOGGER).setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[config.level.upper()]))
