"""Helpers for tests that look into a store directly.

:class:`Sync` wraps a store (or any object with coroutine methods) so that tests can call
its methods without awaiting: every store method of the filesystem and memory backends
that does not wait for a thread completes at once.  :func:`blob_path` is where the
filesystem store keeps a blob, for tests that age or corrupt files.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mirror.core.oci import Digest


def run_now(awaitable: Any) -> Any:
    """The result of a coroutine (or Deferred) that completes without waiting (a plain
    value, as a :class:`Sync` call returns, is passed through)."""
    if not (inspect.iscoroutine(awaitable) or isinstance(awaitable, Deferred)):
        return awaitable
    d = Deferred.fromCoroutine(awaitable) if inspect.iscoroutine(awaitable) else awaitable
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the store call did not complete at once"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


class Sync:
    """``Sync(store).blobs.stat(d)`` is ``await store.blobs.stat(d)``, without the await."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if inspect.iscoroutinefunction(value):
            return lambda *a, **kw: run_now(value(*a, **kw))
        if callable(value) or isinstance(value, (str, int, float, bool, Path)) or value is None:
            return value
        return Sync(value)


def blob_path(root: Path, digest: Digest | str) -> Path:
    """Where the filesystem store under ``root`` keeps blob ``digest``."""
    d = digest if isinstance(digest, Digest) else Digest(*digest.split(":", 1))
    return Path(root) / "blobs" / d.algorithm / d.encoded[:2] / d.encoded
