"""Finding, checking and instantiating the plugins named in ``routing:``.

Plugins come from two places, looked up only for the names the config uses:

* the ``gatewayd.plugins`` entry-point group (installed distributions; the
  built-ins are registered there too), the entry-point name being the plugin
  name;
* plugin directories (``plugin_paths``, relative to the config file): a module
  ``NAME.py`` provides the plugin ``NAME`` through its module-level ``plugin``
  attribute (``plugin = MyRouter``).

One name found in two different places is an error rather than a silent
precedence rule: an admin must know which code routes their mail. The same
file reached both ways (the repo's ``plugins/`` is also installed as
``gatewayd_plugins``) counts once.

Each routing entry may carry ``name:`` to label it in traces, metrics and
state; the label defaults to the plugin name and must be unique, so using one
plugin twice needs a distinct ``name:`` on at least one of the entries.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from .config import Config
from .dispatch import DEFAULT_TIMEOUT, Link, RoutingChain, RoutingObserver
from .errors import ConfigError, ConfigIssue
from .plugin import API_VERSION, OptionError, Options

__all__ = ["load_chain", "build_chain", "PluginSpec", "PluginRegistry", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "gatewayd.plugins"
_TOP_KEY = re.compile(r"^[^.\[]+")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class PluginSpec:
    """One chain entry before instantiation; ``plugin`` is a registered name or a plugin class."""

    plugin: str | type
    options: Mapping[str, Any] = field(default_factory=dict)
    index: int = 0
    line: int | None = None
    timeout: float | None = None
    option_lines: Mapping[str, int] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"routing[{self.index}]"


@dataclass(frozen=True)
class _Found:
    origin: str
    load: Callable[[], Any]
    file: Path | None


class PluginRegistry:
    """The plugins visible to one load; built fresh per call, never cached in a global."""

    def __init__(self, plugin_paths: Sequence[Path] = (), *,
                 entry_points: Sequence[importlib.metadata.EntryPoint] | None = None) -> None:
        self.plugin_paths = tuple(plugin_paths)
        self._entry_points = tuple(entry_points if entry_points is not None
                                   else importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))

    def names(self) -> list[str]:
        found = {ep.name for ep in self._entry_points}
        for directory in self.plugin_paths:
            if directory.is_dir():
                found.update(p.stem for p in directory.glob("*.py") if not p.name.startswith("_"))
        return sorted(found)

    def resolve(self, name: str) -> Any:
        """The plugin class registered as ``name``; LookupError with a helpful message otherwise."""
        found = self._from_entry_points(name) + self._from_directories(name)
        distinct: dict[Any, _Found] = {}
        for item in found:
            distinct.setdefault(item.file.resolve() if item.file else item.origin, item)
        if not distinct:
            searched = ", ".join(str(p) for p in self.plugin_paths) or "no plugin directories"
            known = ", ".join(self.names()) or "none"
            raise LookupError(f"unknown plugin {name!r} (available: {known}; searched the "
                              f"{ENTRY_POINT_GROUP} entry points and {searched})")
        if len(distinct) > 1:
            origins = " and ".join(item.origin for item in distinct.values())
            raise LookupError(f"plugin {name!r} is provided by both {origins}; remove or rename one")
        item = next(iter(distinct.values()))
        try:
            return item.load()
        except Exception as exc:
            raise LookupError(f"plugin {name!r} from {item.origin} failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _from_entry_points(self, name: str) -> list[_Found]:
        result = []
        for ep in self._entry_points:
            if ep.name == name:
                result.append(_Found(f"entry point {ep.value}", ep.load, _module_file(ep.module)))
        return result

    def _from_directories(self, name: str) -> list[_Found]:
        result = []
        for directory in self.plugin_paths:
            candidate = directory / f"{name}.py"
            if candidate.is_file():
                result.append(_Found(str(candidate), _file_loader(candidate), candidate))
        return result


def _module_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except Exception:
        return None
    origin = getattr(spec, "origin", None) if spec is not None else None
    return Path(origin) if origin and origin not in {"built-in", "frozen"} else None


def _file_loader(path: Path) -> Callable[[], Any]:
    def load() -> Any:
        module = _import_file(path)
        if not hasattr(module, "plugin"):
            raise AttributeError(f"{path} has no module-level 'plugin' (write: plugin = YourPluginClass)")
        return module.plugin
    return load


def _import_file(path: Path) -> ModuleType:
    """Executes a plugin-directory module afresh, so a config reload picks up edits."""
    module_name = f"gatewayd_local_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def check_plugin_class(cls: Any) -> str | None:
    """Why ``cls`` cannot be used as a plugin, or None."""
    if not inspect.isclass(cls):
        return f"is {type(cls).__name__}, not a plugin class"
    if not callable(getattr(cls, "route", None)):
        return f"{cls.__qualname__} has no route() hook"
    version = getattr(cls, "api_version", None)
    if version is None:
        return f"{cls.__qualname__} does not declare api_version (this gatewayd provides {API_VERSION})"
    if version != API_VERSION:
        return (f"{cls.__qualname__} targets plugin API version {version!r}, "
                f"but this gatewayd provides version {API_VERSION}")
    return None


def build_chain(specs: Sequence[PluginSpec], *, supervisors: Mapping[str, str], fallback_team: str,
                agents: Sequence[str] = (), registry: PluginRegistry | None = None,
                observer: RoutingObserver | None = None, file: str = "<routing>",
                clock: Callable[[], datetime] | None = None, **chain_options: Any) -> RoutingChain:
    """Resolves and instantiates every spec; raises ConfigError listing every bad entry."""
    registry = registry if registry is not None else PluginRegistry()
    issues: list[ConfigIssue] = []
    links: list[Link] = []
    labels: dict[str, int] = {}
    for spec in specs:
        options = dict(spec.options)
        label = options.pop("name", None)
        plugin_name = spec.plugin if isinstance(spec.plugin, str) else spec.plugin.__name__
        label = plugin_name if label is None else label
        if not isinstance(label, str) or not _LABEL.match(label):
            issues.append(ConfigIssue(file, spec.option_lines.get("name") or spec.line, f"{spec.path}.name",
                                      f"{label!r} is not a valid entry name (letters, digits, '_', '.', '-')"))
            continue
        if label in labels:
            issues.append(ConfigIssue(file, spec.line, spec.path,
                                      f"{label!r} is already used by routing[{labels[label]}]; give one of "
                                      f"the entries a distinct name: (e.g. name: {label}_2)"))
            continue
        labels[label] = spec.index
        link = _instantiate(spec, label, options, registry, supervisors, agents, file, issues)
        if link is not None:
            links.append(link)
    if issues:
        raise ConfigError(issues)
    return RoutingChain(links, supervisors=supervisors, fallback_team=fallback_team, observer=observer,
                        clock=clock, **chain_options)


def _instantiate(spec: PluginSpec, label: str, options: dict[str, Any], registry: PluginRegistry,
                 supervisors: Mapping[str, str], agents: Sequence[str], file: str,
                 issues: list[ConfigIssue]) -> Link | None:
    plugin_line = spec.option_lines.get("plugin") or spec.line
    if isinstance(spec.plugin, str):
        try:
            cls = registry.resolve(spec.plugin)
        except LookupError as exc:
            issues.append(ConfigIssue(file, plugin_line, f"{spec.path}.plugin", str(exc)))
            return None
    else:
        cls = spec.plugin
    problem = check_plugin_class(cls)
    if problem:
        issues.append(ConfigIssue(file, plugin_line, f"{spec.path}.plugin", f"plugin {label!r}: {problem}"))
        return None
    reader = Options(options, teams=supervisors.keys(), agents=agents)
    try:
        instance = cls(reader)
        reader.finish()
    except OptionError as exc:
        for item in exc.problems:
            key = _top_key(item.option)
            path = f"{spec.path}.{item.option}" if item.option else spec.path
            issues.append(ConfigIssue(file, spec.option_lines.get(key) or spec.line, path,
                                      item.message))
        return None
    except Exception as exc:
        issues.append(ConfigIssue(file, spec.line, spec.path,
                                  f"plugin {label!r} failed to start: {type(exc).__name__}: {exc}"))
        return None
    return Link(name=label, plugin=instance, timeout=spec.timeout or DEFAULT_TIMEOUT)


def _top_key(option: str) -> str:
    """``rules`` for ``rules[0].match``: the entry key whose line locates a problem."""
    match = _TOP_KEY.match(option)
    return match.group(0) if match else ""


def plugin_directories(config: Config) -> tuple[Path, ...]:
    """``plugin_paths`` with relative entries resolved against the config file's directory."""
    base = config.source.parent
    return tuple(p if p.is_absolute() else base / p for p in config.plugin_paths)


def load_chain(config: Config, observer: RoutingObserver | None = None, *,
               clock: Callable[[], datetime] | None = None,
               registry: PluginRegistry | None = None) -> RoutingChain:
    """The chain for ``config.routing``; raises ConfigError naming ``routing[i]`` and its line."""
    specs = [PluginSpec(plugin=entry.plugin, options=entry.options, index=entry.index, line=entry.line,
                        timeout=entry.timeout, option_lines=entry.option_lines)
             for entry in config.routing]
    return build_chain(
        specs,
        supervisors={team.name: team.supervisor for team in config.teams},
        fallback_team=config.fallback.team,
        agents=[agent.name for agent in config.agents],
        registry=registry if registry is not None else PluginRegistry(plugin_directories(config)),
        observer=observer, file=str(config.source), clock=clock,
    )
