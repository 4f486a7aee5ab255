"""Storage backends behind one split interface (:mod:`mirror.storage.base`).

:func:`open_store` is the only place a store is built from configuration: the service,
``mirror gc``, ``warm``, ``export`` and ``import`` all call it.  Backends: the local
filesystem (:mod:`.fs`), an S3-compatible bucket shared by several nodes (:mod:`.s3`),
and, for unit tests, memory (:mod:`.memory`).  :mod:`.spool` is the local scratch space
both real backends write new blobs to; :mod:`.sending` holds the responders that stream
stored content to clients.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mirror.config import StorageConfig
from mirror.storage.base import Store
from mirror.storage.fs import StoreLayoutError, open_filesystem_store
from mirror.storage.iothreads import IoThreads

__all__ = ["Store", "StoreLayoutError", "default_spool", "open_store"]


def default_spool() -> Path:
    """Where an s3 store spools without ``storage.spool``: one directory per user under
    the temp dir, the same across restarts so that a restart cleans up after a crash."""
    return Path(tempfile.gettempdir()) / f"mirror-spool-{os.getuid()}"


def open_store(config: StorageConfig, run_blocking: Callable[..., Deferred[Any]], reactor: IReactorTime | None = None) -> Store:
    """The store ``config`` describes.

    Args:
        config: the ``storage`` section.
        run_blocking: runs a blocking callable off the reactor thread
            (``deferToThread``), returning a Deferred.
        reactor: for an s3 store's requests and timers (default: the global reactor);
            given to a filesystem store (the service does), the store's short file work
            runs in :class:`~mirror.storage.iothreads.IoThreads` on it, else with
            ``run_blocking``.

    Raises:
        StoreLayoutError: the store exists but cannot be used by this release.
        OSError: the store's directory cannot be created or read, or its bucket cannot be
            reached or created (:class:`~mirror.storage.s3.client.S3Error`).
    """
    if config.s3 is None:
        assert config.root is not None
        # With a reactor (the service), the short file work gets threads of its own.
        small = IoThreads.of(cast(Any, reactor)) if reactor is not None else None
        return open_filesystem_store(config.root, run_blocking, small)
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from mirror.storage.s3.client import S3Client, ensure_bucket
    from mirror.storage.s3.store import open_s3_store

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    assert reactor is not None
    ensure_bucket(config.s3)  # blocking, once, before anything is served
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 32
    client = S3Client(config.s3, HTTPClient(Agent(reactor, pool=pool)), reactor)
    return open_s3_store(client, config.spool or default_spool(), run_blocking, reactor)
