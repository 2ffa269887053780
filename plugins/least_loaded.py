"""``least_loaded``: the candidate with the fewest open tickets; ties go to the first name."""

from __future__ import annotations

from gatewayd.plugin import API_VERSION, AgentView, Decision, MessageView, Plugin, PluginContext, TicketView


class LeastLoaded(Plugin):
    """Deterministic by design: equal load is broken by agent name, never by chance."""

    api_version = API_VERSION
    reads_body = False

    def route(self, context: PluginContext, ticket: TicketView, message: MessageView,
              candidates: tuple[AgentView, ...]) -> Decision:
        if not candidates:
            return Decision.abstain(f"no available candidate in team {context.team}")
        chosen = min(candidates, key=lambda a: (a.open_tickets, a.name))
        return Decision.pick(chosen.name, f"fewest open tickets ({chosen.open_tickets}) "
                                          f"of {len(candidates)} candidates")


plugin = LeastLoaded
