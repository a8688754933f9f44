"""The backbone registry: plugins found through the entry-point group `capcli.backbones`.

Listing imports the plugin modules but never torch. A plugin that fails to load is reported
with its error and the others still work. `CAPCLI_PLUGINS` (comma list; empty = none) restricts
which entry points are loaded, for reproducible runs and tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from capcli.backbone import Backbone
from capcli.errors import CapcliError

ENTRY_POINT_GROUP = "capcli.backbones"


@dataclass(frozen=True)
class Plugin:
    """One entry point: the backbone it provides, or the error it failed with."""

    name: str
    distribution: str
    version: str
    backbone: Backbone | None
    error: str | None = None


def _allowed() -> set[str] | None:
    raw = os.environ.get("CAPCLI_PLUGINS")
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _load(ep: EntryPoint) -> Plugin:
    dist = ep.dist.name if ep.dist is not None else "?"
    version = ep.dist.version if ep.dist is not None else "?"
    try:
        obj = ep.load()
        if not isinstance(obj, Backbone):
            raise TypeError(f"entry point gives {type(obj).__name__}, not capcli.backbone.Backbone")
        if obj.name != ep.name:
            raise ValueError(f"entry point '{ep.name}' provides a backbone named '{obj.name}'")
        return Plugin(ep.name, dist, version, obj)
    except (Exception, SystemExit) as exc:  # a plugin calling sys.exit on import must not end capcli
        return Plugin(ep.name, dist, version, None, f"{type(exc).__name__}: {exc}")


def plugins() -> list[Plugin]:
    """All registered plugins (restricted by CAPCLI_PLUGINS), sorted by name, broken ones included."""
    allowed = _allowed()
    seen: dict[str, Plugin] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if ep.name not in seen:  # the same distribution can be visible twice on sys.path
            seen[ep.name] = _load(ep)
    return sorted(seen.values(), key=lambda p: p.name)


def unmatched_names() -> list[str]:
    """Names in CAPCLI_PLUGINS that no installed entry point has (a typo silently loading nothing)."""
    allowed = _allowed()
    if not allowed:
        return []
    return sorted(allowed - {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def list_backbones() -> list[Backbone]:
    """The backbones that loaded."""
    return [p.backbone for p in plugins() if p.backbone is not None]


def get_backbone(name: str) -> Backbone:
    """The backbone called `name`, or one clear error naming the installed ones."""
    found = plugins()
    for plugin in found:
        if plugin.name == name:
            if plugin.backbone is None:
                raise CapcliError(f"backbone '{name}' is installed but failed to load: {plugin.error}")
            return plugin.backbone
    available = ", ".join(p.name for p in found if p.backbone is not None) or "none installed"
    restricted = "" if _allowed() is None else f" (CAPCLI_PLUGINS={os.environ['CAPCLI_PLUGINS']!r} limits which load)"
    raise CapcliError(f"unknown backbone '{name}'{restricted}; available: {available}")
