"""``sticky``: follow-ups stay with the ticket's agent; returning customers go to their previous agent.

Only while that agent is still a candidate (available, not lapsed, in the
team): otherwise the chain continues and the reason says why.

Options::

    - plugin: sticky
      followups: true            # default true
      returning_customers: true  # default true
"""

from __future__ import annotations

from gatewayd.plugin import API_VERSION, AgentView, Decision, MessageView, Options, Plugin, PluginContext, TicketView


class Sticky(Plugin):
    """Continuity beats balance: the customer keeps talking to someone who knows the case."""

    api_version = API_VERSION
    reads_body = False

    def __init__(self, options: Options) -> None:
        self.followups: bool = options.get_bool("followups", True)
        self.returning_customers: bool = options.get_bool("returning_customers", True)

    def route(self, context: PluginContext, ticket: TicketView, message: MessageView,
              candidates: tuple[AgentView, ...]) -> Decision:
        names = {a.name for a in candidates}
        if self.followups and ticket.is_followup and ticket.agent:
            if ticket.agent in names:
                return Decision.pick(ticket.agent, f"follow-up stays with its agent {ticket.agent}")
            return Decision.abstain(f"follow-up, but its agent {ticket.agent} {_why_not(context, ticket.agent)}")
        if self.returning_customers and ticket.customer_previous_agents:
            for previous in ticket.customer_previous_agents:
                if previous in names:
                    return Decision.pick(previous, f"returning customer; previous agent {previous}")
            latest = ticket.customer_previous_agents[0]
            return Decision.abstain(f"returning customer, but previous agent {latest} "
                                    f"{_why_not(context, latest)}")
        return Decision.abstain("new customer, new ticket")


def _why_not(context: PluginContext, name: str) -> str:
    agent = next((a for a in context.agents if a.name == name), None)
    if agent is None:
        return "is no longer configured"
    if agent.away:
        return "is away"
    return "is not a candidate here"


plugin = Sticky
