"""A real upstream for integration tests: CNCF Distribution plus a token issuer.

:class:`DistributionRegistry` runs ``/usr/bin/docker-registry serve`` (CNCF
Distribution 2.8) on a free 127.0.0.1 port with filesystem storage in a given
directory, deletes enabled, and its access log written to a file so tests can
count the requests it received. It can be stopped and started again on the
same port with the same data (to prove a mirror serves while its upstream is
down). Auth variants:

* ``auth=None``: anonymous pull and push;
* ``auth="htpasswd"``: Basic auth from a bcrypt htpasswd file (``bcrypt`` pip package);
* ``auth="token"``: Bearer tokens from a :class:`TokenIssuer` (Docker token
  protocol, ES256 JWTs whose key is trusted through ``rootcertbundle``).

:class:`RegistryClient` is a tiny synchronous OCI client (urllib) for tests
that need to look at or change the upstream directly (HEAD/GET/DELETE
manifests, GET blobs), including the Basic and Bearer auth dances.

Nothing listens on anything but 127.0.0.1, and all HTTP made from here
ignores proxy environment variables.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

try:
    from . import proc_util
except ImportError:  # imported as a top-level module (tests/integration on sys.path)
    import proc_util  # type: ignore[no-redef]

REGISTRY_BINARY = "/usr/bin/docker-registry"
LOOPBACK = "127.0.0.1"

MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)
"""Every manifest type we push. Distribution converts to schema1 if none matches."""

AuthMode = Literal["htpasswd", "token"] | None


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_is_open(port: int, host: str = LOOPBACK) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def skip_reason(binary: str = REGISTRY_BINARY) -> str | None:
    """A pytest skip reason if Distribution's binary is missing, else None."""
    if Path(binary).is_file() and os.access(binary, os.X_OK):
        return None
    return f"CNCF Distribution not installed ({binary} missing; apt-get install docker-registry)"


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(url: str, *, method: str = "GET", headers: Mapping[str, str] | None = None,
                 data: bytes | None = None, timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request without proxies; returns (status, lower-cased headers, body).

    HTTP error statuses are returned, not raised. Repeated headers are joined
    with ", " (except that only the first WWW-Authenticate matters here).
    """
    req = urllib.request.Request(url, method=method, data=data, headers=dict(headers or {}))
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ssl_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
    opener = urllib.request.build_opener(*handlers) if ssl_context is not None else _NO_PROXY_OPENER
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, _lower_headers(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        with e:
            body = e.read() if e.fp is not None else b""
            return e.code, _lower_headers(e.headers), body


def _lower_headers(msg: object) -> dict[str, str]:
    """Header mapping with lower-case names (multi-valued ones joined)."""
    out: dict[str, str] = {}
    for k, v in msg.items():  # type: ignore[attr-defined]
        k = k.lower()
        out[k] = v if k not in out else f"{out[k]}, {v}"
    return out


# --------------------------------------------------------------------------
# access log
# --------------------------------------------------------------------------

_ACCESS_RE = re.compile(
    r'^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" (?P<status>\d{3}) (?P<size>\d+|-) '
    r'"(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)"$')


@dataclass(frozen=True)
class AccessLogEntry:
    """One line of Distribution's access log (Apache combined format).

    Example line written by Distribution 2.8.2 (gorilla CombinedLoggingHandler)::

        127.0.0.1 - - [28/Nov/2026:01:49:31 +0000] "GET /v2/x/manifests/y?ns=docker.io HTTP/1.1" 404 91 "" "curl/7.88"
    """

    remote: str
    user: str
    time: str
    method: str
    uri: str
    status: int
    size: int
    user_agent: str

    @property
    def path(self) -> str:
        """The request path without the query string."""
        return self.uri.split("?", 1)[0]

    @property
    def query(self) -> str:
        """The raw query string ('' if none)."""
        return self.uri.split("?", 1)[1] if "?" in self.uri else ""


def parse_access_line(line: str) -> AccessLogEntry | None:
    """Parse one access-log line; None for anything else."""
    m = _ACCESS_RE.match(line.strip())
    if not m:
        return None
    size = m["size"]
    return AccessLogEntry(remote=m["remote"], user=m["user"], time=m["time"], method=m["method"],
                          uri=m["uri"], status=int(m["status"]),
                          size=0 if size == "-" else int(size), user_agent=m["user_agent"])


# --------------------------------------------------------------------------
# keys and certificates
# --------------------------------------------------------------------------

def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The libtrust fingerprint Distribution uses as a JWT ``kid``.

    base32(sha256(DER SubjectPublicKeyInfo)[:30]) without padding, in groups of
    four joined with ':' (``ABCD:EFGH:...``, 12 groups).
    """
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


def make_self_signed_cert(common_name: str, *, ip_sans: Iterable[str] = (LOOPBACK,),
                          dns_sans: Iterable[str] = ("localhost",), days: int = 7,
                          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A P-256 key and a self-signed CA:TRUE certificate for it."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_sans]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_sans]
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(key, hashes.SHA256())


def write_key_and_cert(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                       key_path: Path, cert_path: Path) -> None:
    """Write a PEM key (mode 0600) and a PEM certificate."""
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE wants it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    """Inverse of :func:`_b64url`."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt_unverified(token: str) -> tuple[dict[str, object], dict[str, object]]:
    """(header, claims) of a JWT, without checking the signature (for assertions)."""
    head, claims, _sig = token.split(".")
    return json.loads(_b64url_decode(head)), json.loads(_b64url_decode(claims))


# --------------------------------------------------------------------------
# token issuer
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenRequest:
    """One request the token issuer received."""

    method: str
    path: str
    service: str
    scopes: tuple[str, ...]
    username: str | None
    status: int
    granted: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    time: float = field(default_factory=time.time)


def parse_scope(scope: str) -> tuple[str, str, tuple[str, ...]] | None:
    """``repository:library/hello:pull,push`` → (type, name, actions); None if malformed."""
    if scope.count(":") < 2:
        return None
    rtype, rest = scope.split(":", 1)
    name, actions = rest.rsplit(":", 1)
    rtype = rtype.split("(", 1)[0]  # "repository(plugin)" → "repository"
    return rtype, name, tuple(a for a in actions.split(",") if a)


class TokenIssuer:
    """A Docker-token-protocol issuer on a free 127.0.0.1 port (stdlib HTTP in a thread).

    ``GET /token?service=S&scope=T:N:A[&scope=...]`` with optional Basic
    credentials returns ``{"token", "access_token", "expires_in", "issued_at"}``.
    ``POST /token`` (OAuth2 form: grant_type=password with username/password,
    or refresh_token) is answered too, as containerd tries it first when it has
    credentials. Tokens are ES256 JWTs; the header carries ``kid`` (libtrust
    fingerprint of the signing key) and/or ``x5c`` (the self-signed
    certificate), whichever ``key_ref`` selects; Distribution trusts either
    through its ``rootcertbundle`` (= :attr:`cert_path`).

    Every requested action is granted (optionally intersected with
    ``allowed_actions``). Distribution 2.8 needs ``aud`` as a plain string
    (an array makes the token "malformed") equal to its ``service``, ``iss``
    equal to its ``issuer``, and a key it can find: ``x5c`` verified against
    the bundle, or ``kid`` = libtrust fingerprint of a bundle certificate's key.
    With ``username``/``password`` set, wrong Basic credentials get 401; with
    ``anonymous=False`` missing ones do too.
    Every request is recorded in :attr:`requests`.
    """

    def __init__(self, workdir: Path, *, service: str = "mirror-test-registry",
                 issuer: str = "mirror-test-issuer", username: str | None = None,
                 password: str | None = None, anonymous: bool = True, expires_in: int = 300,
                 allowed_actions: Iterable[str] | None = None,
                 key_ref: Literal["kid", "x5c", "both"] = "kid", port: int | None = None,
                 jwt_lifetime: int | None = None) -> None:
        """Create the key/certificate in ``workdir``; :meth:`start` serves.

        ``expires_in`` is advertised in the response; ``jwt_lifetime`` (default:
        the same) sets the JWT's ``exp``. Both are plain attributes that tests
        may change at any time. Distribution allows 60 s of clock leeway, so a
        token it rejects as expired needs ``jwt_lifetime < -60``.
        """
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.service, self.issuer = service, issuer
        self.username, self.password, self.anonymous = username, password, anonymous
        self.expires_in = expires_in
        self.jwt_lifetime = jwt_lifetime
        self.allowed_actions = frozenset(allowed_actions) if allowed_actions is not None else None
        self.key_ref = key_ref
        self._fixed_port = port is not None
        self.port = port or free_port()
        self._key, self._cert = make_self_signed_cert(f"{issuer} token signer")
        self.cert_path = self.workdir / "token-signer.crt"
        write_key_and_cert(self._key, self._cert, self.workdir / "token-signer.key", self.cert_path)
        self.key_id = libtrust_key_id(self._key.public_key())
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def realm(self) -> str:
        """The token endpoint URL Distribution advertises (``.../token``)."""
        return f"{self.url}/token"

    def start(self) -> TokenIssuer:
        """Serve on 127.0.0.1:port in a daemon thread (idempotent)."""
        if self._server is not None:
            return self
        for attempt in range(5):
            try:
                server = ThreadingHTTPServer((LOOPBACK, self.port), _make_token_handler(self))
                break
            except OSError:
                if self._fixed_port or attempt == 4:
                    raise
                self.port = free_port()  # lost the free_port() race; try another port
        self._fixed_port = True  # restarts must keep the realm URL
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"token-issuer-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (it can be started again)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> TokenIssuer:
        """Start and return self."""
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop."""
        self.stop()

    # -- records ---------------------------------------------------------
    @property
    def requests(self) -> list[TokenRequest]:
        """A copy of every request received so far."""
        with self._lock:
            return list(self._requests)

    def count(self, *, granted_only: bool = True, scope_substring: str = "") -> int:
        """Number of token requests (by default: those that got a token)."""
        return sum(1 for r in self.requests
                   if (r.status == 200 or not granted_only)
                   and (not scope_substring or any(scope_substring in s for s in r.scopes)))

    def reset(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def _record(self, req: TokenRequest) -> None:
        """Append a request record (thread-safe)."""
        with self._lock:
            self._requests.append(req)

    # -- tokens ----------------------------------------------------------
    def check_credentials(self, username: str | None, password: str | None) -> bool:
        """Whether a request with these Basic credentials (or none) may get a token."""
        if username is None:
            return self.anonymous
        if self.username is None:
            return True  # any credentials accepted when none are configured
        return secrets.compare_digest(username, self.username) and \
            secrets.compare_digest(password or "", self.password or "")

    def grant(self, scopes: Iterable[str]) -> list[tuple[str, str, tuple[str, ...]]]:
        """The access entries to put in a token for the requested scopes."""
        out: list[tuple[str, str, tuple[str, ...]]] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            rtype, name, actions = parsed
            if self.allowed_actions is not None:
                actions = tuple(a for a in actions if a in self.allowed_actions)
            out.append((rtype, name, actions))
        return out

    def issue(self, access: Iterable[tuple[str, str, Iterable[str]]], subject: str = "",
              *, expires_in: int | None = None, now: float | None = None) -> str:
        """Sign a JWT for Distribution 2.8 (``aud`` must be a plain string there)."""
        now_i = int(now if now is not None else time.time())
        header: dict[str, object] = {"typ": "JWT", "alg": "ES256"}
        if self.key_ref in ("kid", "both"):
            header["kid"] = self.key_id
        if self.key_ref in ("x5c", "both"):
            header["x5c"] = [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()]
        claims = {
            "iss": self.issuer, "sub": subject, "aud": self.service,
            "exp": now_i + (expires_in if expires_in is not None else
                            self.jwt_lifetime if self.jwt_lifetime is not None else self.expires_in),
            "nbf": now_i - 1, "iat": now_i, "jti": secrets.token_hex(8),
            "access": [{"type": t, "name": n, "actions": list(a)} for t, n, a in access],
        }
        signing_input = f"{_b64url(_json(header))}.{_b64url(_json(claims))}"
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def token_response(self, scopes: list[str], subject: str
                       ) -> tuple[dict[str, object], list[tuple[str, str, tuple[str, ...]]]]:
        """The JSON body of a successful token response, and the access granted."""
        access = self.grant(scopes)
        token = self.issue(access, subject)
        issued = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return ({"token": token, "access_token": token, "expires_in": self.expires_in,
                 "issued_at": issued}, access)


def _json(obj: object) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(obj, separators=(",", ":")).encode()


def _make_token_handler(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``issuer``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Silence stderr logging (requests are recorded instead)."""

        def _basic(self) -> tuple[str | None, str | None, bool]:
            """(username, password, malformed) from the Authorization header."""
            value = self.headers.get("Authorization", "")
            if not value:
                return None, None, False
            kind, _, b64 = value.partition(" ")
            if kind.lower() != "basic":
                return None, None, True
            try:
                user, _, pw = base64.b64decode(b64).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None, None, True
            return user, pw, False

        def _send(self, status: int, body: dict[str, object], extra: Mapping[str, str] = {}) -> None:
            """Send a JSON response."""
            data = _json(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _answer(self, params: dict[str, list[str]], user: str | None, pw: str | None,
                    malformed: bool) -> None:
            """Common GET/POST logic."""
            path = urllib.parse.urlsplit(self.path).path
            service = (params.get("service") or [""])[0]
            scopes = [s for value in params.get("scope", []) for s in value.split(" ") if s]
            granted: list[tuple[str, str, tuple[str, ...]]] = []
            body: dict[str, object]
            if path != "/token":
                status, body = 404, {"errors": [{"code": "NOT_FOUND"}]}
            elif malformed or not issuer.check_credentials(user, pw):
                status = 401
                body = {"errors": [{"code": "UNAUTHORIZED", "message": "bad or missing credentials"}]}
            elif service and service != issuer.service:
                status, body = 400, {"errors": [{"code": "UNSUPPORTED", "message": "unknown service"}]}
            else:
                body, granted = issuer.token_response(scopes, user or "")
                status = 200
            issuer._record(TokenRequest(self.command, path, service, tuple(scopes), user, status,
                                        tuple(granted)))
            extra = {"WWW-Authenticate": f'Basic realm="{issuer.realm}"'} if status == 401 else {}
            self._send(status, body, extra)

        def do_GET(self) -> None:
            """Docker token endpoint (GET with optional Basic auth)."""
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            self._answer(query, *self._basic())

        def do_POST(self) -> None:
            """OAuth2 form variant: grant_type=password|refresh_token."""
            length = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
            grant = (form.get("grant_type") or [""])[0]
            if grant == "password":
                user: str | None = (form.get("username") or [""])[0] or None
                pw: str | None = (form.get("password") or [""])[0]
                self._answer(form, user, pw, user is None)
            elif grant == "refresh_token":
                self._answer(form, *self._basic())
            else:
                self._send(400, {"error": "unsupported_grant_type"})

    return Handler


# --------------------------------------------------------------------------
# Distribution
# --------------------------------------------------------------------------

def bcrypt_htpasswd_line(username: str, password: str) -> str:
    """``user:$2b$...`` (bcrypt, cost 5: fast, and Go's bcrypt accepts it).

    Uses the ``bcrypt`` pip package, else ``htpasswd -nbB`` (apache2-utils).
    """
    try:
        import bcrypt
    except ImportError:
        if shutil.which("htpasswd") is None:
            raise proc_util.HarnessError("htpasswd auth needs the bcrypt package (pip install bcrypt) "
                                         "or htpasswd (apt-get install apache2-utils)") from None
        out = proc_util.run(["htpasswd", "-nbB", "-C", "5", username, password], timeout=30).stdout
        return out.strip()
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    return f"{username}:{hashed}"


class DistributionRegistry:
    """``docker-registry serve`` on 127.0.0.1 with fs storage under ``workdir``.

    Files in ``workdir``: ``data/`` (storage), ``config.yml`` (JSON, which
    is valid YAML), ``access.log`` (stdout: one combined-format line per
    request, appended across restarts), ``registry.log`` (stderr), and for
    auth the htpasswd file or the token signer's certificate.

    Use as a context manager or call :meth:`start`/:meth:`close`. :meth:`stop`
    stops only the registry process; :meth:`start` brings it back on the same
    port with the same data. :meth:`close` also stops the token issuer.
    """

    def __init__(self, workdir: Path, *, auth: AuthMode = None, username: str = "mirror-test",
                 password: str | None = None, token_anonymous: bool = False,
                 token_expires_in: int = 300, token_key_ref: Literal["kid", "x5c", "both"] = "kid",
                 tls: bool = False, port: int | None = None, binary: str = REGISTRY_BINARY,
                 log_level: str = "info", start_timeout: float = 20.0,
                 env: Mapping[str, str] | None = None) -> None:
        """Prepare config and credentials; nothing runs until :meth:`start`.

        ``auth="token"`` creates :attr:`token_issuer`; by default it demands
        the credentials ``username``/``password`` (``token_anonymous=True``
        also hands tokens to anonymous clients, like Docker Hub).
        ``tls=True`` serves HTTPS with a fresh self-signed certificate for
        127.0.0.1 (:attr:`ca_cert_path`).
        ``env``: the process's environment (default: this process's), e.g. with
        ``SSL_CERT_FILE`` naming a CA bundle a proxy-mode registry must trust.
        """
        if auth not in (None, "htpasswd", "token"):
            raise ValueError(f"unknown auth mode {auth!r}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.auth: AuthMode = auth
        self.username = username if auth else None
        self.password = (password or secrets.token_urlsafe(12)) if auth else None
        self.tls = tls
        self.binary = binary
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.env = dict(env) if env is not None else None
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "config.yml"
        self.access_log_path = self.workdir / "access.log"
        self.log_path = self.workdir / "registry.log"
        self.ca_cert_path: Path | None = None
        self.token_issuer: TokenIssuer | None = None
        self._proc: proc_util.ManagedProcess | None = None
        self._secret = secrets.token_hex(16)
        if auth == "htpasswd":
            self.htpasswd_path = self.workdir / "htpasswd"
            self.htpasswd_path.write_text(bcrypt_htpasswd_line(self.username or "", self.password or "") + "\n")
        if auth == "token":
            self.token_issuer = TokenIssuer(self.workdir / "token", username=self.username,
                                            password=self.password, anonymous=token_anonymous,
                                            expires_in=token_expires_in, key_ref=token_key_ref)
        if tls:
            key, cert = make_self_signed_cert("mirror-test upstream registry")
            self.ca_cert_path = self.workdir / "tls.crt"
            self._tls_key_path = self.workdir / "tls.key"
            write_key_and_cert(key, cert, self._tls_key_path, self.ca_cert_path)

    # -- addresses -------------------------------------------------------
    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https://`` with tls=True)."""
        return f"{'https' if self.tls else 'http'}://{self.host_port}"

    @property
    def creds(self) -> tuple[str, str] | None:
        """(username, password) for the auth variants, else None."""
        if self.username is None or self.password is None:
            return None
        return self.username, self.password

    @property
    def creds_str(self) -> str | None:
        """``user:password`` (skopeo's --creds form), or None."""
        c = self.creds
        return f"{c[0]}:{c[1]}" if c else None

    @property
    def pid(self) -> int | None:
        """The registry's PID while running."""
        return self._proc.pid if self._proc and self._proc.alive() else None

    @property
    def running(self) -> bool:
        """True while the registry process is alive."""
        return self._proc is not None and self._proc.alive()

    # -- config ----------------------------------------------------------
    def config(self) -> dict[str, object]:
        """The Distribution configuration (written as JSON)."""
        http: dict[str, object] = {"addr": self.host_port, "secret": self._secret,
                                   "headers": {"X-Content-Type-Options": ["nosniff"]}}
        if self.tls:
            http["tls"] = {"certificate": str(self.ca_cert_path), "key": str(self._tls_key_path)}
        cfg: dict[str, object] = {
            "version": "0.1",
            "log": {"level": self.log_level, "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.data_dir)},
                        "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": http,
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.auth == "htpasswd":
            cfg["auth"] = {"htpasswd": {"realm": "mirror-test", "path": str(self.htpasswd_path)}}
        elif self.auth == "token":
            ti = self.token_issuer
            assert ti is not None
            cfg["auth"] = {"token": {"realm": ti.realm, "service": ti.service, "issuer": ti.issuer,
                                     "rootcertbundle": str(ti.cert_path)}}
        return cfg

    # -- lifecycle -------------------------------------------------------
    def start(self) -> DistributionRegistry:
        """Start (or restart) the registry and wait until ``GET /v2/`` answers."""
        if self.running:
            return self
        if self.token_issuer is not None:
            self.token_issuer.start()
        for attempt in range(5):
            self.config_path.write_text(json.dumps(self.config(), indent=1))
            self._proc = proc_util.ManagedProcess([self.binary, "serve", self.config_path],
                                                  stdout=self.access_log_path, stderr=self.log_path,
                                                  cwd=self.workdir, env=self.env)
            if self._wait_ready():
                self._fixed_port = True  # a restart must come back on the same port
                return self
            in_use = "address already in use" in self._proc.log_tail(5)
            self._proc.stop()
            self._proc = None
            if in_use and not self._fixed_port and attempt < 4:
                self.port = free_port()  # lost the free_port() race; try another port
                continue
            break
        raise proc_util.HarnessError(f"docker-registry did not start on {self.host_port}",
                                     proc_util.tail_file(self.log_path))

    def _wait_ready(self) -> bool:
        """Poll ``GET /v2/`` until 200/401 or the process dies or time runs out."""
        deadline = time.monotonic() + self.start_timeout
        ctx = self._ssl_context()
        while time.monotonic() < deadline:
            if self._proc is None or not self._proc.alive():
                return False
            try:
                status, _h, _b = http_request(f"{self.url}/v2/", timeout=2, ssl_context=ctx)
                if status in (200, 401):
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _ssl_context(self) -> ssl.SSLContext | None:
        """An SSL context trusting our certificate (None without TLS)."""
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.ca_cert_path))

    def stop(self) -> None:
        """Stop the registry process (TERM, then KILL); data and port are kept."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop(term_timeout=10)

    def restart(self) -> DistributionRegistry:
        """stop() then start() on the same port."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the registry and the token issuer."""
        try:
            self.stop()
        finally:
            if self.token_issuer is not None:
                self.token_issuer.stop()

    def __enter__(self) -> DistributionRegistry:
        """Start and return self (close() on exit, even if start fails)."""
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """close()."""
        self.close()

    # -- access log ------------------------------------------------------
    def access_log_lines(self) -> list[str]:
        """Raw access-log lines so far (all runs of this registry)."""
        return [line for line in proc_util.iter_lines(self.access_log_path) if line.strip()]

    def access_log(self, since: int = 0) -> list[AccessLogEntry]:
        """Parsed access-log entries, from index ``since`` (see :meth:`mark`)."""
        entries = [e for e in map(parse_access_line, self.access_log_lines()) if e is not None]
        return entries[since:]

    def mark(self) -> int:
        """The number of entries so far; pass it as ``since=`` to count only later ones."""
        return len(self.access_log())

    def requests(self, method: str | None = None, path_substring: str = "", *,
                 status: int | None = None, since: int = 0) -> list[AccessLogEntry]:
        """Entries matching method (e.g. "GET"), a substring of the path, and status."""
        return [e for e in self.access_log(since)
                if (method is None or e.method == method.upper())
                and path_substring in e.path
                and (status is None or e.status == status)]

    def count_requests(self, method: str | None = None, path_substring: str = "", *,
                       status: int | None = None, since: int = 0) -> int:
        """How many requests match (see :meth:`requests`)."""
        return len(self.requests(method, path_substring, status=status, since=since))

    def client(self) -> RegistryClient:
        """A :class:`RegistryClient` for this registry, with its credentials."""
        return RegistryClient(self.url, creds=self.creds, ssl_context=self._ssl_context())


# --------------------------------------------------------------------------
# a small synchronous registry client
# --------------------------------------------------------------------------

@dataclass
class RegistryResponse:
    """Status, lower-cased headers and body of one registry response."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def digest(self) -> str | None:
        """The Docker-Content-Digest header, if any."""
        return self.headers.get("docker-content-digest")

    @property
    def content_type(self) -> str | None:
        """The Content-Type header, if any."""
        return self.headers.get("content-type")

    def json(self) -> object:
        """The body parsed as JSON."""
        return json.loads(self.body)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="..",service=".."`` → ("bearer", {realm:.., service:..})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


class RegistryClient:
    """Minimal OCI distribution client for assertions and upstream changes.

    Handles anonymous, Basic and Bearer (token) auth by answering the 401
    challenge; tokens are cached per scope.
    """

    def __init__(self, base_url: str, *, creds: tuple[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0) -> None:
        """``base_url`` like ``http://127.0.0.1:5000``."""
        self.base_url = base_url.rstrip("/")
        self.creds = creds
        self.ssl_context = ssl_context
        self.timeout = timeout
        self._tokens: dict[str, str] = {}
        self._basic_mode = False  # set after the first Basic challenge: then send it up front

    def request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
                data: bytes | None = None, scope: str | None = None) -> RegistryResponse:
        """One request, retried once with credentials after a 401 challenge."""
        hdrs = dict(headers or {})
        auth = self._auth_header(scope)
        if auth:
            hdrs["Authorization"] = auth
        resp = RegistryResponse(*http_request(self.base_url + path, method=method, headers=hdrs,
                                              data=data, timeout=self.timeout,
                                              ssl_context=self.ssl_context))
        if resp.status != 401 or "www-authenticate" not in resp.headers:
            return resp
        new_auth = self._answer_challenge(resp.headers["www-authenticate"], scope)
        if not new_auth or new_auth == auth:
            return resp
        hdrs["Authorization"] = new_auth
        return RegistryResponse(*http_request(self.base_url + path, method=method, headers=hdrs,
                                              data=data, timeout=self.timeout,
                                              ssl_context=self.ssl_context))

    def _auth_header(self, scope: str | None) -> str | None:
        """A cached Authorization value for this scope, if any."""
        if self._basic_mode:
            return self._basic()
        token = self._tokens.get(scope or "")
        if token:
            return f"Bearer {token}"
        return None

    def _basic(self) -> str | None:
        """Basic credentials header value."""
        if not self.creds:
            return None
        return "Basic " + base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()

    def _answer_challenge(self, header: str, scope: str | None) -> str | None:
        """Get an Authorization value for a WWW-Authenticate challenge."""
        scheme, params = parse_challenge(header)
        if scheme == "basic":
            self._basic_mode = self.creds is not None
            return self._basic()
        if scheme != "bearer" or "realm" not in params:
            return None
        query = {"service": params.get("service", "")}
        wanted = scope or params.get("scope")
        if wanted:
            query["scope"] = wanted
        url = params["realm"] + "?" + urllib.parse.urlencode(query)
        hdrs = {"Authorization": b} if (b := self._basic()) else {}
        status, _h, body = http_request(url, headers=hdrs, timeout=self.timeout)
        if status != 200:
            return None
        data = json.loads(body)
        token = data.get("token") or data.get("access_token")
        self._tokens[scope or ""] = token
        return f"Bearer {token}"

    @staticmethod
    def _scope(repo: str, actions: str = "pull") -> str:
        """Token scope for a repository."""
        return f"repository:{repo}:{actions}"

    def get_manifest(self, repo: str, ref: str, *, accept: Iterable[str] = MANIFEST_ACCEPT,
                     method: str = "GET") -> RegistryResponse:
        """GET (or HEAD) ``/v2/<repo>/manifests/<ref>`` with the full Accept list."""
        return self.request(method, f"/v2/{repo}/manifests/{ref}",
                            headers={"Accept": ", ".join(accept)}, scope=self._scope(repo))

    def head_manifest(self, repo: str, ref: str) -> RegistryResponse:
        """HEAD ``/v2/<repo>/manifests/<ref>``."""
        return self.get_manifest(repo, ref, method="HEAD")

    def manifest_digest(self, repo: str, ref: str) -> str:
        """The digest the registry serves for a tag (sha256 of the GET body)."""
        resp = self.get_manifest(repo, ref)
        if resp.status != 200:
            raise proc_util.HarnessError(f"GET manifest {repo}:{ref} -> {resp.status}",
                                         resp.body[:500].decode("utf-8", "replace"))
        return "sha256:" + hashlib.sha256(resp.body).hexdigest()

    def delete_manifest(self, repo: str, digest: str) -> RegistryResponse:
        """DELETE ``/v2/<repo>/manifests/<digest>`` (removes every tag pointing to it)."""
        return self.request("DELETE", f"/v2/{repo}/manifests/{digest}",
                            scope=self._scope(repo, "pull,push,delete"))

    def get_blob(self, repo: str, digest: str, *, method: str = "GET",
                 headers: Mapping[str, str] | None = None) -> RegistryResponse:
        """GET (or HEAD) ``/v2/<repo>/blobs/<digest>`` (redirects are followed)."""
        return self.request(method, f"/v2/{repo}/blobs/{digest}", headers=headers,
                            scope=self._scope(repo))

    def tags(self, repo: str) -> list[str]:
        """``/v2/<repo>/tags/list`` tags ([] on 404)."""
        resp = self.request("GET", f"/v2/{repo}/tags/list", scope=self._scope(repo))
        if resp.status == 404:
            return []
        data = resp.json()
        assert isinstance(data, dict)
        return list(data.get("tags") or [])

    def ping(self) -> RegistryResponse:
        """``GET /v2/`` without answering any challenge."""
        return RegistryResponse(*http_request(self.base_url + "/v2/", timeout=self.timeout,
                                              ssl_context=self.ssl_context))
