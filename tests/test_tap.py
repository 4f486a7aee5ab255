"""Tests of the twistd plugin, makeService and the mirror command."""

from pathlib import Path

import pytest

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from mirror.tap import Options, makeService
from mirror.tools import cli

REPO = Path(__file__).resolve().parent.parent


def write_config(tmp_path, text):
    path = tmp_path / "mirror.yaml"
    path.write_text(text)
    return path


def test_plugin_is_discovered():
    """`twistd mirror` exists: the plugin in twisted/plugins/ is found."""
    names = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "mirror" in names
    assert names["mirror"].module == "mirror.tap"


def test_make_service_builds_listeners_and_flush_timer(tmp_path):
    """One endpoint service per `listen` entry, plus the access-record, upload-expiry and GC timers."""
    path = write_config(
        tmp_path,
        f"listen: ['tcp:0:interface=127.0.0.1', 'tcp:0:interface=127.0.0.1']\n"
        f"storage: {{root: '{tmp_path}/store', access_flush_interval: 5}}\n"
        "upstreams: [{registry: docker.io, url: 'http://127.0.0.1:9'}]\n",
    )
    options = Options()
    options.parseOptions(["--config", str(path)])
    top = makeService(options)
    services = list(top)
    assert sum(isinstance(s, StreamServerEndpointService) for s in services) == 2
    timers = {getattr(s.call[0], "__name__", type(s.call[0]).__name__): s.step for s in services if isinstance(s, TimerService)}
    assert timers == {"flush": 5, "expire_uploads": 600, "_PeriodicGc": 3600}
    assert (tmp_path / "store" / "blobs").is_dir()


def test_listeners_get_limited_sites_and_a_reload_changes_their_limits(tmp_path, monkeypatch):
    """Registry and metrics listeners serve LimitedSites: the registry's max_connections
    comes from the fd limit when not configured, the metrics one takes a few of its own;
    a reload (SIGHUP) gives both the new limits."""
    import mirror.tap
    from mirror.tap import _ReloadOnHangup
    from mirror.web.site import METRICS_MAX_CONNECTIONS, LimitedSite

    monkeypatch.setattr(mirror.tap, "getrlimit", lambda which: (1024, 4096))
    text = (
        "listen: 'tcp:0:interface=127.0.0.1'\nmetrics: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        f"storage: {{root: '{tmp_path}/store'}}\nhosted: ['*']\nlimits: {{header_timeout: 10}}\n"
    )
    path = write_config(tmp_path, text)
    options = Options()
    options.parseOptions(["--config", str(path)])
    services = list(makeService(options))
    registry_site, health_site = (s.factory for s in services if isinstance(s, StreamServerEndpointService))
    assert isinstance(registry_site, LimitedSite) and isinstance(health_site, LimitedSite)
    assert (registry_site.limits.header_timeout, registry_site.limits.max_connections) == (10, 448)
    assert (health_site.limits.header_timeout, health_site.limits.max_connections) == (10, METRICS_MAX_CONNECTIONS)

    path.write_text(text.replace("header_timeout: 10", "header_timeout: 5, max_connections: 100"))
    (hangup,) = (s for s in services if isinstance(s, _ReloadOnHangup))
    assert hangup._reload()
    assert (registry_site.limits.header_timeout, registry_site.limits.max_connections) == (5, 100)
    assert (health_site.limits.header_timeout, health_site.limits.max_connections) == (5, METRICS_MAX_CONNECTIONS)


def test_a_max_connections_the_fd_limit_cannot_hold_is_kept_with_a_warning(monkeypatch):
    """A configured max_connections above what the open-file limit holds is a warning,
    not an error (the operator may raise the limit); the default stays within it."""
    from twisted.logger import globalLogPublisher

    import mirror.tap
    from mirror.config import LimitsConfig
    from mirror.tap import connection_limits

    monkeypatch.setattr(mirror.tap, "getrlimit", lambda which: (1024, 4096))
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        assert connection_limits(LimitsConfig(max_connections=5000)).max_connections == 5000
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert any(e.get("max_connections") == 5000 and e.get("budget") == 448 for e in seen)
    monkeypatch.setattr(mirror.tap, "getrlimit", lambda which: (1 << 20, 1 << 20))
    assert connection_limits(LimitsConfig()).max_connections == 10_000


def test_bad_config_stops_with_one_line(tmp_path, capsys):
    """A config mistake stops start-up with exit code 2 and one line naming file and key."""
    path = write_config(
        tmp_path, "listen: x\nstorage: {root: /tmp/x}\nupstreams: [{registry: d.io, url: 'http://x', tag_tl: 3}]\n"
    )
    options = Options()
    options.parseOptions(["--config", str(path)])
    with pytest.raises(SystemExit) as info:
        makeService(options)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"mirror: {path}: upstreams[0].tag_tl: unknown key\n"


MANY_PROBLEMS = "listen: 5\nstorage: {root: x, rot: 1}\ngc: {low_watermark: 0.9, high_watermark: 0.5}\nbogus: 1\n"


def many_problems_lines(path):
    return [
        f"mirror: {path}: listen: expected an endpoint string or a list of them",
        f"mirror: {path}: storage.rot: unknown key",
        f"mirror: {path}: gc.low_watermark: must be below high_watermark",
        f"mirror: {path}: bogus: unknown key",
    ]


def test_bad_config_stops_with_one_line_per_problem(tmp_path, capsys):
    """Start-up with a config of several mistakes prints each, one line each, and exits 2."""
    path = write_config(tmp_path, MANY_PROBLEMS)
    options = Options()
    options.parseOptions(["--config", str(path)])
    with pytest.raises(SystemExit) as info:
        makeService(options)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == many_problems_lines(path)


def test_cli_check_config_lists_every_problem(tmp_path, capsys):
    """`mirror check-config` (and `mirror serve`, which checks first) prints every problem
    of a bad file on stderr, one per line, and exits 2; a good file is `FILE: ok`, exit 0."""
    bad = write_config(tmp_path, MANY_PROBLEMS)
    for command in ("check-config", "serve"):
        assert cli.main([command, "--config", str(bad)]) == 2
        out, err = capsys.readouterr()
        assert (out, err.splitlines()) == ("", many_problems_lines(bad))
    good = REPO / "conf" / "mirror.yaml"
    assert cli.main(["check-config", "--config", str(good)]) == 0
    assert capsys.readouterr() == (f"{good}: ok\n", "")


def test_a_refused_reload_logs_every_problem(tmp_path):
    """SIGHUP with a bad file logs one refusal naming every problem and keeps the old config."""
    from twisted.logger import globalLogPublisher

    from mirror.tap import reload_config

    path = write_config(tmp_path, MANY_PROBLEMS)
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        # a refused file never reaches the registry, so none is needed here
        assert reload_config(None, str(path)) is False
    finally:
        globalLogPublisher.removeObserver(seen.append)
    (refusal,) = [e for e in seen if "config reload refused" in e.get("log_format", "")]
    assert refusal["error"] == "; ".join(line.removeprefix("mirror: ") for line in many_problems_lines(path))


def test_cli_check_config(tmp_path, capsys):
    """`mirror check-config` accepts the sample config and rejects a bad one with exit code 2."""
    assert cli.main(["check-config", "--config", str(REPO / "conf" / "mirror.yaml")]) == 0
    bad = write_config(tmp_path, "listen: x\n")
    assert cli.main(["check-config", "--config", str(bad)]) == 2
    assert "storage: missing value" in capsys.readouterr().err


def test_the_mirror_command_is_installed_and_points_at_the_cli():
    """The `mirror` console script of the installed package is mirror.tools.cli:main."""
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "mirror"]
    assert script.load() is cli.main


def test_a_store_of_another_layout_stops_start_up_and_commands_with_one_line(tmp_path, capsys):
    """A store written by a newer release (another layout.json) is refused, naming the key,
    by the service and by `mirror gc`, with no traceback."""
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "layout.json").write_text('{"layout": 99}')
    path = write_config(tmp_path, f"listen: tcp:0\nstorage: {{root: '{tmp_path}/store'}}\nhosted: ['*']\n")
    options = Options()
    options.parseOptions(["--config", str(path)])
    with pytest.raises(SystemExit) as info:
        makeService(options)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mirror: {path}: storage.root: ") and "layout version 99" in err and err.count("\n") == 1
    assert cli.main(["gc", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "storage.root: " in err and "layout version 99" in err and err.count("\n") == 1


def test_a_periodic_job_that_fails_is_logged_and_runs_again():
    """A timer's job that raises (the store unavailable) does not stop its TimerService:
    the tick succeeds, the failure is logged, and the next tick runs the job again."""
    from twisted.logger import globalLogPublisher

    from mirror.tap import _every

    calls = []

    async def flush():
        calls.append(1)
        raise OSError("bucket unreachable")

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        tick = _every(flush)
        for _ in range(2):
            outcome = []
            tick().addBoth(outcome.append)
            assert outcome == [None]
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert len(calls) == 2
    assert any("bucket unreachable" in str(e.get("error", "")) for e in seen)


class _Endpoint:
    """A server endpoint whose listen() returns the Deferred the test holds."""

    def __init__(self, result):
        self.result = result

    def listen(self, factory):
        return self.result


def test_a_listener_that_cannot_open_stops_start_up_with_one_line(capsys):
    """A listen failure while the service starts (before the reactor runs): SystemExit(2)
    and one line naming the endpoint, its key and the reason."""
    from twisted.internet.defer import fail
    from twisted.internet.error import CannotListenError
    from twisted.internet.testing import MemoryReactor

    from mirror.tap import _Listener

    error = CannotListenError("127.0.0.1", 5000, OSError(98, "Address already in use"))
    listener = _Listener(_Endpoint(fail(error)), object(), "tcp:5000:interface=127.0.0.1", "listen[1]", MemoryReactor())
    with pytest.raises(SystemExit) as info:
        listener.privilegedStartService()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "mirror: cannot listen on tcp:5000:interface=127.0.0.1 (listen[1]): Address already in use\n"


def test_a_listener_that_fails_after_start_up_stops_the_reactor_with_exit_code_2(capsys):
    """An endpoint that opens later (not one Twisted ships) and fails: the same line, the
    reactor stops and the process exits 2 after shutdown; stopping a pending listen is quiet."""
    import os

    from twisted.internet.defer import Deferred
    from twisted.internet.testing import MemoryReactor

    from mirror.tap import _Listener

    reactor = MemoryReactor()
    pending = Deferred()
    listener = _Listener(_Endpoint(pending), object(), "onion:443", "listen", reactor)
    listener.privilegedStartService()
    assert not reactor.hasStopped
    pending.errback(OSError(13, "Permission denied"))
    assert capsys.readouterr().err == "mirror: cannot listen on onion:443 (listen): Permission denied\n"
    assert reactor.hasStopped
    assert reactor.triggers["after"]["shutdown"] == [(os._exit, (2,), {})]

    quiet = _Listener(_Endpoint(Deferred()), object(), "onion:443", "listen", MemoryReactor())
    quiet.privilegedStartService()
    quiet.startService()
    stopped = []
    quiet.stopService().addBoth(stopped.append)
    assert stopped == [None]
    assert capsys.readouterr().err == ""


def test_an_endpoint_that_cannot_be_parsed_stops_start_up_with_one_line(tmp_path, capsys):
    """`listen: bogus:1` (a config the loader cannot judge) stops makeService with one line."""
    path = write_config(tmp_path, f"listen: 'bogus:1'\nstorage: {{root: '{tmp_path}/store'}}\n")
    options = Options()
    options.parseOptions(["--config", str(path)])
    with pytest.raises(SystemExit) as info:
        makeService(options)
    assert info.value.code == 2
    assert capsys.readouterr().err == "mirror: cannot listen on bogus:1 (listen): Unknown endpoint type: 'bogus'\n"
