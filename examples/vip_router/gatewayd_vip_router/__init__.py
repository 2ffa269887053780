"""``vip_router``: senders from VIP domains go to a named agent (while available) or team."""

from __future__ import annotations

from gatewayd.plugin import (
    API_VERSION,
    PRIORITIES,
    AgentView,
    Decision,
    MessageView,
    Options,
    Plugin,
    PluginContext,
    TicketView,
)

__all__ = ["VipRouter"]


class VipRouter(Plugin):
    """Options: ``domains`` (required), ``agent`` and/or ``team`` (at least one), ``priority``."""

    api_version = API_VERSION
    reads_body = False  # only the sender counts: gatewayd need not extract bodies for this plugin

    def __init__(self, options: Options) -> None:
        domains = options.get_list("domains") or ()
        self.domains = tuple(str(d).lower().lstrip("@.") for d in domains)
        if not self.domains:
            options.error("domains", "needs at least one domain, e.g. [bigcorp.example]")
        self.agent: str | None = options.get_str("agent", None)
        self.team: str | None = options.get_str("team", None)
        self.priority: str | None = options.get_str("priority", None)
        if self.agent is None and self.team is None:
            options.error("", "needs agent: or team: (or both)")
        if self.agent is not None:
            options.check_agent("agent", self.agent)
        if self.team is not None:
            options.check_team("team", self.team)
        if self.priority is not None and self.priority not in PRIORITIES:
            options.error("priority", f"must be one of {', '.join(PRIORITIES)}")

    def vip_domain(self, sender: str) -> str | None:
        domain = sender.rpartition("@")[2].lower()
        return next((d for d in self.domains if domain == d or domain.endswith("." + d)), None)

    def route(self, context: PluginContext, ticket: TicketView, message: MessageView,
              candidates: tuple[AgentView, ...]) -> Decision:
        domain = self.vip_domain(message.sender)
        if domain is None:
            return Decision.abstain("not a VIP sender")
        available = {a.name for a in context.agents if not a.away}
        if self.agent is not None and self.agent in available:
            return Decision(reason=f"VIP domain {domain}: reserved agent {self.agent}", agent=self.agent,
                            team=self.team, priority=self.priority)
        if self.team is not None:
            return Decision.narrow(f"VIP domain {domain}: team {self.team}", team=self.team, priority=self.priority)
        if self.priority is not None:
            return Decision.set_priority(self.priority, f"VIP domain {domain}; {self.agent} is away")
        return Decision.abstain(f"VIP domain {domain}, but {self.agent} is away")
