"""Durable state of gatewayd: one SQLite file in WAL mode, written with group commit."""

from .api import (AgentState, EventRecord, Inbound, MessageRecord, OutboxItem, Store, TicketRecord, WorkItem,
                  add_event, event_statement, plugin_state_statement, previous_agents, work_done,
                  work_done_statement)
from .db import CommitStats, Part, Statement, Tx, Writes, map_error

__all__ = ["AgentState", "CommitStats", "EventRecord", "Inbound", "MessageRecord", "OutboxItem", "Part", "Statement",
           "Store", "TicketRecord", "Tx", "WorkItem", "Writes", "add_event", "event_statement", "map_error",
           "plugin_state_statement", "previous_agents", "work_done", "work_done_statement"]
