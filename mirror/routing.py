"""Pure routing of a repository name to the upstream that serves it.

Rules, in order (issue #2, and what real clients send, see README):

1. ``?ns=<registry>`` (containerd sends it on every request to a mirror) picks the
   upstream whose ``registry`` is ``ns``; an ``ns`` no upstream serves is an error.
2. A name whose first component is an upstream's ``registry``
   (``/v2/ghcr.io/org/app/...``) goes to that upstream, prefix removed.
3. Anything else goes to the first upstream (so docker's ``registry-mirrors``, which
   only ever talks to the root, works).

On Docker Hub a one-component name means ``library/<name>``.  The cache key of a
mirrored repository is ``<registry>/<name upstream>``; ``ns`` is never part of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from mirror.config import UpstreamConfig
from mirror.errors import RegistryError

__all__ = ["Route", "route"]

DOCKER_HUB = "docker.io"


@attrs.frozen
class Route:
    """Where a request for a repository goes."""

    upstream: UpstreamConfig
    remote_name: str  # the repository name as the upstream knows it
    repo_key: str  # the repository's name in the store and in _catalog


def route(name: str, ns: str | None, upstreams: Sequence[UpstreamConfig]) -> Route:
    """Route a validated repository ``name`` (and containerd's ``ns``) to an upstream.

    Raises:
        RegistryError: ``NAME_UNKNOWN`` when no upstream is configured for it.
    """
    by_registry = {u.registry: u for u in upstreams}
    first, _, rest = name.partition("/")
    if ns is not None:
        upstream = by_registry.get(ns.lower())
        if upstream is None:
            raise RegistryError("NAME_UNKNOWN", f"this mirror serves no upstream for registry {ns[:100]!r} (ns=)")
        if first == upstream.registry and rest:
            name = rest
    elif first in by_registry and rest:
        upstream = by_registry[first]
        name = rest
    elif upstreams:
        upstream = upstreams[0]
    else:
        raise RegistryError("NAME_UNKNOWN", f"repository {name!r} is not served here: no upstream is configured")
    if upstream.registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    return Route(upstream=upstream, remote_name=name, repo_key=f"{upstream.registry}/{name}")
