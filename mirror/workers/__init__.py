"""Worker processes: ``workers: N`` serves the listeners from N processes on one store.

One process, the supervisor (:mod:`.supervisor`: what ``twistd mirror`` runs when
``workers`` is above 1), opens every ``listen`` endpoint, accepts the connections and
hands each to a worker that is ready, in turn, by passing its file descriptor over a UNIX
socket pair (:mod:`.handoff`, :mod:`.dispatch`).  It does not accept on a shared socket
that every worker listens on: with epoll, the process that wakes first takes a burst of
connections, and the load is shared badly.  A TLS listener is accepted as plain TCP and
the worker does the handshake (:mod:`.endpoints`).

Each worker (:mod:`.worker`, ``python -m mirror.workers.worker``) builds the same registry
and site as a single process does (:mod:`mirror.tap`), and serves ``/_cluster/fills``,
``/metrics``, ``/healthz`` and ``/readyz`` on a listener of its own on 127.0.0.1.  The
workers are a cluster of their own (:mod:`mirror.registry.cluster`) on leases only this
machine sees, with a secret the supervisor makes at each start: one upstream fetch per
blob, and clients on other workers stream the growing fill from the worker fetching it.
Tags confirmed by the upstream are recorded in the store, so every worker sees them.

The supervisor's pool (:mod:`.pool`) restarts a worker that dies (:mod:`.backoff`) and on
stop ends every worker before twistd exits; a worker whose supervisor dies, however it
dies, exits too.  The supervisor runs the periodic GC (after asking every worker to write
its access record), serves ``metrics.listen`` with every worker's metrics labelled
``worker="<i>"`` (:mod:`.metrics`, :mod:`.health`), and forwards SIGHUP to every worker
once the new config is valid.
"""
