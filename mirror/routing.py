"""Pure routing of a repository name to the upstream that serves it.

Rules, in order (what real clients send is in the README):

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
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import attrs

from mirror.config import UpstreamConfig
from mirror.errors import RegistryError

__all__ = ["Route", "is_hosted", "route"]

DOCKER_HUB = "docker.io"


@attrs.frozen
class Route:
    """Where a request for a repository goes."""

    upstream: UpstreamConfig | None  # None for a hosted repository
    remote_name: str  # the repository name as the upstream knows it (hosted: the name)
    repo_key: str  # the repository's name in the store and in _catalog

    @property
    def hosted(self) -> bool:
        """A hosted repository: pushable, never fetched from an upstream."""
        return self.upstream is None


def is_hosted(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the ``hosted`` patterns (``*`` spans ``/``)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def route(
    name: str, ns: str | None, upstreams: Sequence[UpstreamConfig], hosted: Sequence[str] = ()
) -> Route:
    """Route a validated repository ``name`` (and containerd's ``ns``).

    Raises:
        RegistryError: ``NAME_UNKNOWN`` when neither an upstream nor a hosted pattern
            serves it.
    """
    by_registry = {u.registry: u for u in upstreams}
    first, _, rest = name.partition("/")
    upstream = by_registry.get(ns.lower()) if ns is not None else None
    if upstream is not None:
        if first == upstream.registry and rest:
            name = rest
    elif first in by_registry and rest:
        upstream = by_registry[first]
        name = rest
    elif is_hosted(name, hosted):
        return Route(upstream=None, remote_name=name, repo_key=name)
    elif ns is not None:
        raise RegistryError("NAME_UNKNOWN", f"this registry serves no upstream for registry {ns[:100]!r} (ns=)")
    elif upstreams:
        upstream = upstreams[0]
    else:
        raise RegistryError(
            "NAME_UNKNOWN", f"repository {name!r} is not served here: it matches no hosted pattern and no upstream is configured"
        )
    if upstream.registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    return Route(upstream=upstream, remote_name=name, repo_key=f"{upstream.registry}/{name}")
