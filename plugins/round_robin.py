"""``round_robin``: even distribution among the available candidates of the team.

The last agent picked per team is kept in plugin state, so the rotation
continues where it stopped after a restart, and an agent who comes back from
being away simply rejoins the rotation in name order.
"""

from __future__ import annotations

from gatewayd.plugin import API_VERSION, AgentView, Decision, MessageView, Plugin, PluginContext, TicketView


class RoundRobin(Plugin):
    """Picks the candidate whose name follows the previously picked one (wrapping around)."""

    api_version = API_VERSION
    reads_body = False

    async def route(self, context: PluginContext, ticket: TicketView, message: MessageView,
                    candidates: tuple[AgentView, ...]) -> Decision:
        if not candidates:
            return Decision.abstain(f"no available candidate in team {context.team}")
        key = f"last:{context.team}"
        last = await context.state.get(key)
        names = sorted(a.name for a in candidates)
        chosen = next((n for n in names if isinstance(last, str) and n > last), names[0])
        await context.state.set(key, chosen)
        after = f"after {last}" if isinstance(last, str) else "starting"
        return Decision.pick(chosen, f"rotation of {len(names)} in team {context.team}, {after}")


plugin = RoundRobin
