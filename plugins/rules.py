"""``rules``: ordered match rules -> team, agent and/or priority. The first matching rule applies.

Options::

    - plugin: rules
      rules:
        - name: security lane                 # optional, shown in the trace
          match:
            subject: "(?i)phishing|fraud"      # every key is a regex (re.search), keys are ANDed
            body: "(?i)unauthori[sz]ed charge"
            from: "@bigcorp\\.example$"        # the sender address (From header, else envelope)
            to: "^vip@"                        # any envelope recipient
            header: {X-Customer-Tier: gold}    # any value of that header
            keywords: [phishing, fraud]        # case-insensitive substrings of subject + body, any one
          team: security                       # narrow to a team ...
          priority: high                       # ... and/or set the priority
          agent: sam                           # ... and/or pick an agent directly

``keywords`` may also be written beside ``match``. Regexes are compiled at load,
so a broken pattern is a ``check-config`` error naming the rule and key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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

_TEXT_KEYS = ("subject", "body", "from", "to")
_MATCH_KEYS = (*_TEXT_KEYS, "header", "keywords")
_RULE_KEYS = ("name", "match", "keywords", "team", "agent", "priority")

Test = Callable[[MessageView], bool]


@dataclass(frozen=True)
class Rule:
    label: str
    tests: tuple[tuple[str, Test], ...]
    team: str | None
    agent: str | None
    priority: str | None

    def matches(self, message: MessageView) -> bool:
        return all(test(message) for _, test in self.tests)

    def decision(self) -> Decision:
        reason = f"{self.label} matched ({', '.join(key for key, _ in self.tests)})"
        if self.agent is not None:
            return Decision(reason=reason, agent=self.agent, team=self.team, priority=self.priority)
        if self.team is not None:
            return Decision.narrow(reason, team=self.team, priority=self.priority)
        return Decision.set_priority(self.priority or "normal", reason)


class Rules(Plugin):
    """Admin-written routing policy; the shipped example sends fraud reports to the security team."""

    api_version = API_VERSION

    def __init__(self, options: Options) -> None:
        raw_rules = options.get_list("rules")
        self.rules: tuple[Rule, ...] = tuple(
            rule for i, raw in enumerate(raw_rules or ())
            if (rule := _rule(options, f"rules[{i}]", i, raw)) is not None)
        if raw_rules is not None and not raw_rules:
            options.error("rules", "needs at least one rule")
        self.reads_body = any(key in ("body", "keywords") for rule in self.rules for key, _ in rule.tests)

    def route(self, context: PluginContext, ticket: TicketView, message: MessageView,
              candidates: tuple[AgentView, ...]) -> Decision:
        for rule in self.rules:
            if rule.matches(message):
                return rule.decision()
        return Decision.abstain(f"none of {len(self.rules)} rules matched")


def _rule(options: Options, path: str, index: int, raw: Any) -> Rule | None:
    if not isinstance(raw, Mapping):
        options.error(path, "must be a mapping with match: and team:, agent: or priority:")
        return None
    for key in raw:
        if key not in _RULE_KEYS:
            options.error(f"{path}.{key}", f"unknown key (expected one of: {', '.join(_RULE_KEYS)})")
    match = raw.get("match", {})
    if not isinstance(match, Mapping):
        options.error(f"{path}.match", "must be a mapping of match keys")
        match = {}
    for key in match:
        if key not in _MATCH_KEYS:
            options.error(f"{path}.match.{key}", f"unknown match key (expected one of: {', '.join(_MATCH_KEYS)})")
    tests: list[tuple[str, Test]] = []
    for key in _TEXT_KEYS:
        if key in match:
            pattern = _compile(options, f"{path}.match.{key}", match[key])
            if pattern is not None:
                tests.append((key, _text_test(key, pattern)))
    if "header" in match:
        tests.extend(_header_tests(options, f"{path}.match.header", match["header"]))
    for where, keywords in ((f"{path}.match.keywords", match.get("keywords")),
                            (f"{path}.keywords", raw.get("keywords"))):
        if keywords is not None:
            test = _keyword_test(options, where, keywords)
            if test is not None:
                tests.append(("keywords", test))
    if not match and raw.get("keywords") is None:
        options.error(path, "needs at least one match key (subject, body, from, to, header, keywords)")
    team, agent, priority = raw.get("team"), raw.get("agent"), raw.get("priority")
    if team is None and agent is None and priority is None:
        options.error(path, "needs an action: team:, agent: and/or priority:")
    ok = True
    if team is not None:
        ok = options.check_team(f"{path}.team", team) and ok
    if agent is not None:
        ok = options.check_agent(f"{path}.agent", agent) and ok
    if priority is not None and priority not in PRIORITIES:
        options.error(f"{path}.priority", f"{priority!r} is not one of: {', '.join(PRIORITIES)}")
        ok = False
    name = raw.get("name")
    label = f"rule {index + 1} ({name})" if isinstance(name, str) and name else f"rule {index + 1}"
    if not ok or not tests:
        return None
    return Rule(label=label, tests=tuple(tests), team=team, agent=agent, priority=priority)


def _compile(options: Options, path: str, pattern: Any) -> re.Pattern[str] | None:
    if not isinstance(pattern, str):
        options.error(path, f"must be a regular expression string, not {type(pattern).__name__}")
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        options.error(path, f"invalid regular expression {pattern!r}: {exc}")
        return None


def _text_test(key: str, pattern: re.Pattern[str]) -> Test:
    if key == "subject":
        return lambda m: pattern.search(m.subject) is not None
    if key == "body":
        return lambda m: pattern.search(m.body) is not None
    if key == "from":
        return lambda m: pattern.search(m.sender) is not None
    return lambda m: any(pattern.search(rcpt) is not None for rcpt in m.rcpt_tos)


def _header_tests(options: Options, path: str, headers: Any) -> list[tuple[str, Test]]:
    if not isinstance(headers, Mapping) or not headers:
        options.error(path, "must be a mapping of header name to regular expression")
        return []
    tests: list[tuple[str, Test]] = []
    for name, pattern_text in headers.items():
        pattern = _compile(options, f"{path}.{name}", pattern_text)
        if pattern is not None:
            tests.append((f"header {name}", _one_header_test(str(name).lower(), pattern)))
    return tests


def _one_header_test(name: str, pattern: re.Pattern[str]) -> Test:
    return lambda m: any(pattern.search(value) is not None for value in m.headers.get(name, ()))


def _keyword_test(options: Options, path: str, keywords: Any) -> Test | None:
    if isinstance(keywords, str):
        keywords = [keywords]
    if not isinstance(keywords, (list, tuple)) or not keywords or \
            not all(isinstance(k, str) and k.strip() for k in keywords):
        options.error(path, "must be a non-empty list of words or phrases")
        return None
    folded = tuple(k.casefold() for k in keywords)

    def test(message: MessageView) -> bool:
        text = f"{message.subject}\n{message.body}".casefold()
        return any(k in text for k in folded)
    return test


plugin = Rules
