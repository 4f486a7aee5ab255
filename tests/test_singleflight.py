"""Tests of SingleFlight with Deferreds the test controls."""

from twisted.internet.defer import CancelledError, Deferred

from mirror.registry.singleflight import SingleFlight


def test_concurrent_calls_share_one_run():
    """Two calls for one key run the work once and both get its result."""
    flight = SingleFlight()
    runs = []

    async def work():
        d = Deferred()
        runs.append(d)
        return await d

    a = flight.run("k", work)
    b = flight.run("k", work)
    assert len(runs) == 1
    assert flight.in_flight("k")
    runs[0].callback("result")
    assert a.result == "result" and b.result == "result"
    assert not flight.in_flight("k")


def test_failure_reaches_every_waiter():
    """A failing run fails every waiter; the next call runs again."""
    flight = SingleFlight()
    runs = []

    async def work():
        d = Deferred()
        runs.append(d)
        return await d

    a = flight.run("k", work)
    b = flight.run("k", work)
    runs[0].errback(ValueError("boom"))
    for d in (a, b):
        failures = []
        d.addErrback(failures.append)
        assert failures[0].check(ValueError)
    flight.run("k", work)
    assert len(runs) == 2


def test_cancelling_one_waiter_does_not_cancel_the_work():
    """A client that goes away cancels only its own wait."""
    flight = SingleFlight()
    runs = []

    async def work():
        d = Deferred()
        runs.append(d)
        return await d

    a = flight.run("k", work)
    b = flight.run("k", work)
    a.cancel()
    a.addErrback(lambda f: f.trap(CancelledError))
    assert not runs[0].called
    runs[0].callback(7)
    assert b.result == 7
