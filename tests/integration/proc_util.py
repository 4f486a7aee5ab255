"""Process, temp-dir and isolation helpers shared by the integration harness.

Everything here is standard library only. The rules it enforces:

* every subprocess runs with a timeout (:func:`run`) or is a tracked
  :class:`ManagedProcess` that is stopped by its PID (TERM, then KILL);
* every work directory comes from :class:`WorkDir`, which unmounts anything
  left below it and deletes it on exit (set ``MIRROR_TEST_KEEP=1`` to keep it);
* clients get a "blackhole" proxy environment (:func:`blackhole_env`) so any
  request that is not for a 127.0.0.1 address fails at once instead of
  leaving the machine;
* containers/image tools (skopeo, podman) running as root always write their
  blob-info cache below ``/var/lib/containers``; :func:`isolated_argv` runs
  them in a private mount namespace with an overlay on ``/var/lib`` whose
  upper layer lives in the work dir, so nothing is written to the host.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

BLACKHOLE_PROXY = "http://127.0.0.1:9"
"""A refused port: Go clients fail at once when they try to use it as a proxy."""

KEEP_ENV = "MIRROR_TEST_KEEP"
"""Set this environment variable to ``1`` to keep work dirs for debugging."""

_CHILD_ENV_DROP = (
    "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CONFIG",
    "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY", "REGISTRY_AUTH_FILE", "CONTAINERS_CONF",
    "CONTAINERS_REGISTRIES_CONF", "CONTAINERS_STORAGE_CONF", "REGISTRIES_CONFIG_PATH",
    "CONTAINER_HOST", "CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE",
)


class HarnessError(RuntimeError):
    """A harness step failed; ``log_tail`` holds the relevant log lines."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        """Build the error; the log tail is appended to the message."""
        self.log_tail = log_tail
        text = message if not log_tail else f"{message}\n--- log tail ---\n{log_tail}"
        super().__init__(text)


def tail(text: str | bytes, lines: int = 30) -> str:
    """Return the last ``lines`` non-empty lines of ``text``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def tail_file(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` non-empty lines of a file ('' if missing)."""
    try:
        return tail(path.read_bytes(), lines)
    except OSError:
        return ""


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """A child environment: ours minus proxy/client settings, HOME/TMPDIR in ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), TMPDIR=str(tmp), XDG_RUNTIME_DIR=str(home),
               XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local/share"),
               XDG_CACHE_HOME=str(home / ".cache"), LC_ALL="C")
    env.update(extra)
    return env


def blackhole_env(env: Mapping[str, str], *direct_hosts: str) -> dict[str, str]:
    """Add HTTP(S)_PROXY=blackhole and NO_PROXY for loopback plus ``direct_hosts``."""
    out = dict(env)
    no_proxy = ",".join(dict.fromkeys([*direct_hosts, "127.0.0.1", "localhost", "::1"]))
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        out[key] = BLACKHOLE_PROXY
    out["NO_PROXY"] = out["no_proxy"] = no_proxy
    return out


def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float, env: Mapping[str, str] | None = None,
        cwd: Path | None = None, log: Path | None = None, check: bool = True,
        what: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to completion with a timeout, capturing its output.

    stdout and stderr are captured (and appended to ``log`` if given). With
    ``check`` a non-zero exit or a timeout raises :class:`HarnessError` with
    the output's tail. The child runs in its own session so a timeout can
    kill its whole process group.
    """
    args = [os.fspath(a) for a in argv]
    shown = " ".join(display_argv(args))
    label = what or Path(args[0]).name
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(env) if env is not None else None,
                            cwd=cwd, text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        _append_log(log, args, out, err, None)
        raise HarnessError(f"{label} timed out after {timeout}s: {shown}",
                           tail(out + "\n" + err)) from None
    finally:
        if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt): never leak it
            _kill_group(proc.pid)
            proc.wait()
    _append_log(log, args, out, err, proc.returncode)
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise HarnessError(f"{label} exited {proc.returncode}: {shown}",
                           tail(out + "\n" + err))
    return result


def display_argv(args: Sequence[str]) -> list[str]:
    """The command line without the :func:`isolated_argv` wrapper (for messages)."""
    if len(args) > 3 and args[0] == "unshare" and "isolate" in args:
        i = args.index("isolate")
        try:
            return list(args[i + 3 + int(args[i + 2]):])
        except (IndexError, ValueError):
            pass
    return list(args)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (our own session child)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _append_log(log: Path | None, args: list[str], out: str, err: str, rc: int | None) -> None:
    """Append one command's output to a log file."""
    if log is None:
        return
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(display_argv(args))}\n{out}{err}[exit {rc}]\n")


class ManagedProcess:
    """A long-running child process whose output goes to files.

    It is started in its own session. :meth:`stop` sends SIGTERM to its PID,
    waits up to ``term_timeout`` seconds, then sends SIGKILL; finally it kills
    any member of its process group that is still alive.
    """

    def __init__(self, argv: Sequence[str | os.PathLike[str]], *, stdout: Path, stderr: Path | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        """Start the process now; stdout/stderr are appended to the given files."""
        self.argv = [os.fspath(a) for a in argv]
        self.stdout_path = stdout
        self.stderr_path = stderr or stdout
        with open(stdout, "ab") as out, open(self.stderr_path, "ab") as err:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=err if stderr else subprocess.STDOUT,
                                          env=dict(env) if env is not None else None,
                                          cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        """The child's PID."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def stop(self, term_timeout: float = 10.0) -> int | None:
        """TERM, wait, KILL; returns the exit code (None if it could not be reaped)."""
        if self.alive():
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=term_timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                try:
                    self.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    return None
        _kill_group(self.pid)  # stragglers in its group (it led a new session)
        return self.popen.returncode

    def log_tail(self, lines: int = 30) -> str:
        """The tail of the stderr log (or the combined log)."""
        return tail_file(self.stderr_path, lines)


def stop_pid(pid: int, term_timeout: float = 10.0) -> None:
    """Stop a process that is not our child (e.g. a daemon's own child) by PID."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + term_timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate()`` until it is truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` from /proc/mounts, deepest first."""
    root = os.path.realpath(path)
    found: list[str] = []
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 2:
                    continue
                target = fields[1].encode().decode("unicode_escape")
                if target == root or target.startswith(root + "/"):
                    found.append(target)
    except OSError:
        return []
    return sorted(set(found), key=len, reverse=True)


def unmount_under(path: Path) -> None:
    """Lazily unmount everything mounted at or below ``path``."""
    for _ in range(3):
        targets = mounts_under(path)
        if not targets:
            return
        for target in targets:
            subprocess.run(["umount", "-l", target], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=30, check=False)


class WorkDir:
    """A ``mktemp -d`` directory that is unmounted below and removed on exit."""

    def __init__(self, prefix: str) -> None:
        """Create ``/tmp/<prefix>XXXXXX`` (or under ``$TMPDIR``)."""
        self.path = Path(tempfile.mkdtemp(prefix=prefix))

    def __enter__(self) -> Path:
        """Return the directory path."""
        return self.path

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Unmount and delete (unless MIRROR_TEST_KEEP=1)."""
        self.cleanup()

    def cleanup(self) -> None:
        """Unmount leftovers and delete the directory."""
        unmount_under(self.path)
        if os.environ.get(KEEP_ENV) == "1":
            print(f"kept {self.path}")
            return
        remove_tree(self.path)


def remove_tree(path: Path) -> None:
    """Delete a tree, making read-only dirs writable first if needed."""
    if not path.exists():
        return

    def _onerror(func: Callable[[str], object], p: str, _exc: object) -> None:
        """Retry a failed removal after making the path and its parent writable."""
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=_onerror)


def is_root() -> bool:
    """True when running as euid 0."""
    return os.geteuid() == 0


_ISOLATION_OK: bool | None = None


def isolation_supported() -> bool:
    """True if we can make a private mount namespace with an overlay on /var/lib."""
    global _ISOLATION_OK
    if _ISOLATION_OK is None:
        _ISOLATION_OK = False
        if is_root() and shutil.which("unshare") and Path("/var/lib").is_dir():
            probe = ".mirror-isolation-probe"
            with WorkDir("mirror-isolation-probe.") as w:
                try:
                    res = run(isolated_argv(w, ["mkdir", "-p", f"/var/lib/{probe}"], force=True),
                              timeout=20, check=False)
                except HarnessError:
                    return False
                _ISOLATION_OK = (res.returncode == 0 and (w / "ovl_var_lib" / "upper" / probe).is_dir()
                                 and not Path("/var/lib", probe).exists())
    return _ISOLATION_OK


_ISOLATE_SCRIPT = r'''
w=$1; n=$2; shift 2
i=0
while [ "$i" -lt "$n" ]; do
  d=$1; shift; i=$((i+1))
  k=$(printf %s "$d" | tr / _)
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$w/ovl$k/upper,workdir=$w/ovl$k/work" "$d" || exit 125
done
exec "$@"
'''


def isolated_argv(workdir: Path, argv: Sequence[str | os.PathLike[str]], *, force: bool = False,
                  overlays: Sequence[str] = ("/var/lib",)) -> list[str]:
    """Wrap ``argv`` so it runs with private, copy-on-write views of ``overlays``.

    The command runs in a new private mount namespace in which each directory
    of ``overlays`` (default ``/var/lib``) is an overlay whose upper layer is
    ``workdir/ovl_<path>/upper``: reads see the host, writes (such as the
    containers/image blob-info cache in ``/var/lib/containers/cache``) land
    in the work dir and vanish with the namespace. ``exec`` keeps the PID, so
    timeouts kill the real client. Without root/unshare support the command
    is returned unchanged.
    """
    args = [os.fspath(a) for a in argv]
    if not force and not isolation_supported():
        return args
    for d in overlays:
        base = workdir / ("ovl" + d.replace("/", "_"))
        (base / "upper").mkdir(parents=True, exist_ok=True)
        (base / "work").mkdir(exist_ok=True)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _ISOLATE_SCRIPT,
            "isolate", str(workdir), str(len(overlays)), *overlays, *args]


def iter_lines(path: Path) -> Iterator[str]:
    """Yield the lines of a text file (none if it does not exist)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from (line.rstrip("\n") for line in f)
    except FileNotFoundError:
        return
