"""Receipt wording: ``string.Template`` files in the config directory, per-team overrides.

Files are ``<kind>.subject``, ``<kind>.txt`` and ``<kind>.html`` for the kinds
``receipt`` (a new ticket) and ``followup`` (the short acknowledgement of a
follow-up). A team directory (``templates/security/receipt.txt``) replaces
single files for that team. Templates are read and checked when the config
is loaded, so a typo in a placeholder is a ``check-config`` error, not a
receipt that fails at 3 a.m.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import MappingProxyType

KINDS = ("receipt", "followup")
PARTS = ("subject", "txt", "html")
FIELDS = frozenset({"ticket", "customer_name", "greeting_name", "subject", "team", "expected",
                    "support_address"})
_MAX_SIZE = 64 * 1024


@dataclass(frozen=True)
class TemplateSet:
    subject: Template
    text: Template
    html: Template


@dataclass(frozen=True)
class Templates:
    directory: Path
    sets: Mapping[tuple[str, str | None], TemplateSet]

    def get(self, kind: str, team: str | None) -> TemplateSet:
        """The team's set if it overrides anything, else the defaults."""
        return self.sets.get((kind, team)) or self.sets[(kind, None)]


def load_templates(directory: Path, kinds: Iterable[str], teams: Iterable[str]) -> Templates:
    """Reads and checks every template; raises ValueError naming the file at fault."""
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory of receipt templates")
    sets: dict[tuple[str, str | None], TemplateSet] = {}
    for kind in kinds:
        defaults = {part: _read(directory / f"{kind}.{part}") for part in PARTS}
        sets[(kind, None)] = _set(defaults)
        for team in teams:
            team_dir = directory / team
            overrides = {part: _read(team_dir / f"{kind}.{part}")
                         for part in PARTS if (team_dir / f"{kind}.{part}").is_file()}
            if overrides:
                sets[(kind, team)] = _set({**defaults, **overrides})
    return Templates(directory, MappingProxyType(sets))


def _set(parts: Mapping[str, Template]) -> TemplateSet:
    return TemplateSet(subject=parts["subject"], text=parts["txt"], html=parts["html"])


def _read(path: Path) -> Template:
    try:
        if path.stat().st_size > _MAX_SIZE:
            raise ValueError(f"{path}: larger than {_MAX_SIZE // 1024} KB")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read template {path}: {exc}") from None
    template = Template(text.strip("\n") if path.suffix == ".subject" else text)
    if not template.is_valid():
        raise ValueError(f"{path}: invalid placeholder (write $$ for a dollar sign)")
    unknown = set(template.get_identifiers()) - FIELDS
    if unknown:
        raise ValueError(f"{path}: unknown placeholder(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(FIELDS))})")
    if path.suffix == ".subject" and "\n" in template.template:
        raise ValueError(f"{path}: a subject template is one line")
    return template
