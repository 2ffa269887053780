"""Durable state of gatewayd: one SQLite file in WAL mode, written with group commit."""

from .api import (AgentState, EventRecord, Inbound, MessageRecord, OutboxItem, Store, TicketRecord, WorkItem,
                  add_event, plugin_state_write, previous_agents, work_done)
from .db import CommitStats, Tx, map_error

__all__ = ["AgentState", "CommitStats", "EventRecord", "Inbound", "MessageRecord", "OutboxItem", "Store",
           "TicketRecord", "Tx", "WorkItem", "add_event", "map_error", "plugin_state_write", "previous_agents",
           "work_done"]
