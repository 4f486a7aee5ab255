"""The one router: which upstream a repository name belongs to, or whether it is hosted.

Every caller asks :class:`Router` — the web layer for each request, hosted writes, GC,
``mirror warm``, ``export`` and ``import`` — so they cannot disagree.

Rules for a request's name, in order (what real clients send is in the README):

1. ``?ns=<registry>`` (containerd sends it on every request to a mirror) naming a
   configured upstream picks that upstream.
2. A name whose first component is an upstream's ``registry``
   (``/v2/ghcr.io/org/app/...``) goes to that upstream, prefix removed.
3. A name matching a ``hosted`` pattern is a hosted repository: it accepts pushes and
   never asks an upstream.  (Rules 1 and 2 come first, so a hosted name can never
   shadow or collide with a mirrored one.)
4. An ``ns`` that no upstream serves is an error.
5. Anything else goes to the first upstream (so docker's ``registry-mirrors``, which
   only ever talks to the root, works).

On Docker Hub a one-component name means ``library/<name>``.  The store key of a
mirrored repository is ``<registry>/<name upstream>``, of a hosted one its name;
``ns`` is never part of it.

**Stored keys.**  A stored key routes back to itself, with the same answer as the request
that stored it: a mirrored key is its upstream's registry and the upstream's name for
the repository (rules 1 and 2), a hosted key matched a pattern and starts with no
upstream's registry.  :meth:`Router.route_stored` relies on that, and answers ``None``
for a key this configuration would no longer store there (its upstream or pattern was
removed).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import attrs

from mirror.config import UpstreamConfig
from mirror.core.errors import RegistryError
from mirror.core.oci import validate_name

__all__ = ["DOCKER_HUB", "Route", "Router", "matches_pattern"]

DOCKER_HUB = "docker.io"


@attrs.frozen
class Route:
    """Where a repository lives."""

    upstream: UpstreamConfig | None  # None for a hosted repository
    remote_name: str  # the repository name as the upstream knows it (hosted: the name)
    key: str  # the repository's name in the store and in _catalog

    @property
    def hosted(self) -> bool:
        """A hosted repository: pushable, never fetched from an upstream."""
        return self.upstream is None


def matches_pattern(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the repository-name ``patterns`` (``*`` spans ``/``)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


class Router:
    """Routes repository names for one configuration (rebuilt when it is reloaded)."""

    def __init__(self, upstreams: Sequence[UpstreamConfig], hosted: Sequence[str] = ()) -> None:
        self.upstreams = tuple(upstreams)
        self.hosted_patterns = tuple(hosted)
        self._by_registry = {u.registry: u for u in self.upstreams}

    def serves(self, registry: str) -> bool:
        """Whether ``registry`` (containerd's ``ns``) is a configured upstream."""
        return registry.lower() in self._by_registry

    def route(self, name: str, ns: str | None = None) -> Route:
        """Check a request's repository ``name`` (and containerd's ``ns``) and route it.

        Raises:
            RegistryError: ``NAME_INVALID`` for a malformed name; ``NAME_UNKNOWN`` when
                neither an upstream nor a hosted pattern serves it.
        """
        validate_name(name)
        first, _, rest = name.partition("/")
        upstream = self._by_registry.get(ns.lower()) if ns is not None else None
        if upstream is not None:
            if first == upstream.registry and rest:
                name = rest
        elif first in self._by_registry and rest:
            upstream = self._by_registry[first]
            name = rest
        elif matches_pattern(name, self.hosted_patterns):
            return Route(upstream=None, remote_name=name, key=name)
        elif ns is not None:
            raise RegistryError("NAME_UNKNOWN", f"this registry serves no upstream for registry {ns[:100]!r}")
        elif self.upstreams:
            upstream = self.upstreams[0]
        else:
            raise RegistryError(
                "NAME_UNKNOWN",
                f"repository {name!r} is not served here: it matches no hosted pattern and no upstream is configured",
            )
        if upstream.registry == DOCKER_HUB and "/" not in name:
            name = f"library/{name}"
        return Route(upstream=upstream, remote_name=name, key=f"{upstream.registry}/{name}")

    def rule_names(self, route: Route) -> tuple[str, ...]:
        """The names access rules match for a repository, whatever name a request used: its
        key (what ``_catalog`` lists), and its upstream name when a request for that name
        alone reaches it (``library/alpine`` for ``docker.io/library/alpine`` when Docker
        Hub is the first upstream and no hosted pattern takes the name).  So a rule written
        for a hosted namespace never covers a mirrored repository of the same name."""
        if route.hosted:
            return (route.key,)
        try:
            bare = self.route(route.remote_name)
        except RegistryError:
            return (route.key,)
        return (route.key, route.remote_name) if bare.key == route.key else (route.key,)

    def candidates(self, name: str) -> list[Route]:
        """Every route a request naming ``name`` may get, with or without an ``ns``
        (a token's scope names a repository without one)."""
        routes = []
        for ns in (None, *self._by_registry):
            try:
                route = self.route(name, ns)
            except RegistryError:
                continue
            if route not in routes:
                routes.append(route)
        return routes

    def route_stored(self, key: str) -> Route | None:
        """The route of a repository already in the store, by its key.

        The same answer as for the request that stored it (see the module docstring);
        ``None`` when this configuration routes the key elsewhere or nowhere.  A mirrored
        key is routed as containerd asks (``ns`` = its registry), because a registry may
        have a port (``localhost:5000/app``), which no repository name can.
        """
        first, _, rest = key.partition("/")
        try:
            r = self.route(rest, first) if first in self._by_registry and rest else self.route(key)
        except RegistryError:
            return None
        return r if r.key == key else None
