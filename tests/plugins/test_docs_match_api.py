"""docs/plugins.md's hook reference must agree with the code, in both directions.

Every fenced block tagged ``python signature`` in the doc holds signatures such as
``gatewayd.plugin.Plugin.route(self, context: PluginContext, ...) -> ...``,
separated by blank lines. Each must match ``inspect.signature`` of the named
object exactly (whitespace aside), and every public hook, view, decision helper,
option reader and test-kit function must be documented there.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from gatewayd import plugin as plugin_api
from gatewayd import testing
from gatewayd.plugin import Decision, PluginContext

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
_BLOCK = re.compile(r"^```python signature\n(.*?)^```", re.MULTILINE | re.DOTALL)
_NAME = re.compile(r"^([\w.]+)(\(.*\).*)$", re.DOTALL)


def documented() -> dict[str, str]:
    signatures: dict[str, str] = {}
    for block in _BLOCK.findall(DOC.read_text(encoding="utf-8")):
        for chunk in re.split(r"\n\s*\n", block.strip()):
            match = _NAME.match(" ".join(chunk.split()))
            assert match, f"unparseable signature in {DOC.name}: {chunk!r}"
            name, signature = match.groups()
            assert name not in signatures, f"{name} is documented twice"
            signatures[name] = signature.replace("( ", "(").replace(" )", ")").replace(", )", ")")
    return signatures


def resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise LookupError(dotted)


def _annotation(value: Any) -> str:
    return value if isinstance(value, str) else inspect.formatannotation(value)


def _default(value: Any) -> str:
    if value is testing.EPOCH:
        return "EPOCH"
    return "..." if repr(value) == "<factory>" else repr(value)


def render(obj: Any) -> str:
    """The signature as the doc spells it: string annotations unquoted, ``name: T = default``."""
    signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    params = list(signature.parameters.values())
    if inspect.isclass(obj):
        params = params[1:]
    out: list[str] = []
    star = False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        star = star or p.kind is p.VAR_POSITIONAL
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}"
        out.append(text)
    returns = "" if inspect.isclass(obj) or signature.return_annotation is signature.empty \
        else f" -> {_annotation(signature.return_annotation)}"
    return f"({', '.join(out)}){returns}"


def public_surface() -> list[str]:
    """Everything a plugin author touches: the names the doc must cover."""
    names: list[str] = []
    for module, exported in ((plugin_api, plugin_api.__all__), (testing, testing.__all__)):
        for name in exported:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or obj is plugin_api.PluginStateStore:
                continue
            names.append(f"{module.__name__}.{name}")
            if inspect.isclass(obj):
                names.extend(f"{module.__name__}.{name}.{attr}" for attr, value in vars(obj).items()
                             if not attr.startswith("_") and isinstance(value, (classmethod, staticmethod))
                             or (not attr.startswith("_") and inspect.isfunction(value)))
    return names


def test_doc_has_a_reference():
    assert len(documented()) >= 40


@pytest.mark.parametrize("name", sorted(documented()))
def test_documented_signature_matches_code(name: str):
    assert documented()[name] == render(resolve(name)), f"docs/plugins.md is out of date for {name}"


@pytest.mark.parametrize("name", public_surface())
def test_public_api_is_documented(name: str):
    assert name in documented(), f"{name} is public but missing from the reference in docs/plugins.md"


def test_render_sees_a_changed_signature():
    def route(self, context: PluginContext, ticket, *, extra: int = 1) -> Decision: ...
    assert render(route) == "(self, context: PluginContext, ticket, *, extra: int = 1) -> Decision"
    assert render(route) != documented()["gatewayd.plugin.Plugin.route"]


async def test_tutorial_plugin_works_as_written(tmp_path: Path):
    from gatewayd.testing import make_agents, make_message, run_chain

    code = next(block for block in re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"),
                                              re.MULTILINE | re.DOTALL)
                if block.startswith("# language_router.py"))
    (tmp_path / "language_router.py").write_text(code)
    agents = make_agents("alice", "bob", "carol")
    result, trace = await run_chain([("language_router", {"speakers": {"de": ["carol"]}}), "round_robin"],
                                    agents=agents, plugin_paths=[tmp_path],
                                    message=make_message(headers={"Content-Language": "de-AT"}))
    assert result.agent == "carol" and trace[0].outcome == "narrow"
