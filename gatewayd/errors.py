"""gatewayd's exception tree.

Everything gatewayd raises on purpose derives from :class:`GatewayError`, so the
one boundary that talks to the outside (the SMTP reply, the CLI's exit status)
can map each kind to an answer without guessing::

    GatewayError
    ├── ConfigError          invalid configuration; carries every ConfigIssue
    └── StoreError           the SQLite store could not do what was asked
        ├── StoreFull        disk or max_page_count exhausted  -> 452 4.3.1
        ├── StoreCorrupt     file is not a usable gatewayd store -> refuse to start
        └── StoreUnavailable any other I/O failure              -> 451 4.3.0
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every error gatewayd raises deliberately."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located the way an editor wants it."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(GatewayError):
    """The configuration is invalid; ``issues`` lists every problem found, not only the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


class StoreError(GatewayError):
    """The store failed; subclasses say how an SMTP client should be answered."""


class StoreFull(StoreError):
    """No space left for the store (disk full or ``max_page_count`` reached)."""


class StoreCorrupt(StoreError):
    """The store file exists but is not a healthy gatewayd store; never recreated automatically."""


class StoreUnavailable(StoreError):
    """Any other I/O failure of the store."""


class WorkerFailed(GatewayError):
    """The worker process (routing and delivery) could not be started."""
