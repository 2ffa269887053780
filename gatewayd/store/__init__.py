"""Durable state of gatewayd: one SQLite file in WAL mode, written with group commit."""

from .api import (AgentState, EventRecord, MessageRecord, OutboxItem, Store, TicketRecord, WorkItem,
                  add_event, work_done)
from .db import CommitStats, Tx, map_error

__all__ = ["AgentState", "CommitStats", "EventRecord", "MessageRecord", "OutboxItem", "Store",
           "TicketRecord", "Tx", "WorkItem", "add_event", "map_error", "work_done"]
