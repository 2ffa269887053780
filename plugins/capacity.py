"""``capacity``: agents at their maximum of open tickets stop being candidates.

Options::

    - plugin: capacity
      max_open: 20            # default limit for every agent
      agents: {alice: 5}      # per-agent overrides
"""

from __future__ import annotations

from collections.abc import Mapping

from gatewayd.plugin import API_VERSION, AgentView, Decision, MessageView, Options, Plugin, PluginContext, TicketView


class Capacity(Plugin):
    """Narrows the candidates to agents below their limit; a full team is left to the fallback rules."""

    api_version = API_VERSION
    reads_body = False

    def __init__(self, options: Options) -> None:
        self.max_open: int = options.get_int("max_open", 20, minimum=1)
        self.limits: dict[str, int] = {}
        overrides: Mapping[str, object] = options.get_mapping("agents", {})
        for name, limit in overrides.items():
            if not options.check_agent(f"agents.{name}", name):
                continue
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                options.error(f"agents.{name}", f"must be a whole number of at least 0, not {limit!r}")
                continue
            self.limits[name] = limit

    def limit(self, agent: str) -> int:
        return self.limits.get(agent, self.max_open)

    def route(self, context: PluginContext, ticket: TicketView, message: MessageView,
              candidates: tuple[AgentView, ...]) -> Decision:
        full = [a for a in candidates if a.open_tickets >= self.limit(a.name)]
        if not full:
            return Decision.abstain("the only candidate is below capacity" if len(candidates) == 1
                                    else f"all {len(candidates)} candidates below capacity")
        described = ", ".join(f"{a.name} ({a.open_tickets}/{self.limit(a.name)})" for a in full)
        return Decision.narrow(f"at capacity: {described}",
                               agents=[a.name for a in candidates if a not in full])


plugin = Capacity
