"""Log output as one line per record, key=value or JSON, never with message bodies."""

from __future__ import annotations

import json
import logging
import sys
import time

from .config import LoggingConfig


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


def configure(config: LoggingConfig) -> None:
    """Installs gatewayd's handler on the root logger (stderr, which journald collects)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level)
    # aiosmtpd logs every command line at INFO (addresses included); our own
    # per-transaction line replaces it.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
