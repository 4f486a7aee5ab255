"""Storage backends behind one split interface (:mod:`mirror.storage.base`).

:func:`open_store` is the only place a store is built from configuration: the service,
``mirror gc``, ``warm``, ``export`` and ``import`` all call it.  Backends: the local
filesystem (:mod:`.fs`) and, for unit tests, memory (:mod:`.memory`).
:mod:`.sending` holds the responders that stream stored content to clients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from mirror.config import StorageConfig
from mirror.storage.base import Store
from mirror.storage.fs import StoreLayoutError, open_filesystem_store

__all__ = ["Store", "StoreLayoutError", "open_store"]


def open_store(config: StorageConfig, run_blocking: Callable[..., Deferred[Any]]) -> Store:
    """The store ``config`` describes.

    Args:
        config: the ``storage`` section.
        run_blocking: runs a blocking callable off the reactor thread
            (``deferToThread``), returning a Deferred.

    Raises:
        StoreLayoutError: the store exists but cannot be used by this release.
        OSError: the store's directory cannot be created or read.
    """
    return open_filesystem_store(config.root, run_blocking)
