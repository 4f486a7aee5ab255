"""Client auth with real clients: the real ``twistd mirror`` as a private registry whose
users come from an htpasswd file (bcrypt), in Basic mode and in token mode (the Docker token
flow, ``/auth/token``), with these rules::

    public/*  anonymous: pull        users: pull, push, delete
    *                                 users: pull, push, delete

For each mode:

* docker: ``docker login --password-stdin`` on a private dockerd (a wrong password fails,
  private pulls before login fail; in token mode ``public/*`` pulls before login), then
  pull, push, pull back;
* skopeo: ``--dest-creds`` push and ``--src-creds`` pull; without creds a private repository
  is refused with an auth error (pull and push), a wrong password too;
* anonymous pull of ``public/*``: plain HTTP and skopeo without credentials (skopeo sends
  ``Basic Og==``, an empty user and password, which must count as anonymous);
* podman: ``podman login`` (a wrong password fails), push, pull back; after ``podman logout``
  the private pull is refused.

After every test the password (plain, and as the Basic ``user:password`` base64) appears
nowhere in the registry's log, nor does the wrong one.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from tests.integration import images
from tests.integration.clients import (
    ClientError,
    PodmanSession,
    docker_login,
    docker_push,
    docker_repo_digest,
    podman_login,
    private_docker,
    skopeo_copy,
)
from tests.integration.clients import (
    skip_reason as client_skip_reason,
)
from tests.integration.mirror_proc import MirrorProcess
from tests.integration.proc_util import HarnessError
from tests.integration.upstream_registry import http_request

pytestmark = [pytest.mark.integration, pytest.mark.clients]

USER = "alice"
PASSWORD = f"Pw-{secrets.token_hex(12)}"  # random per run: its presence in a log is never a coincidence
WRONG = f"Wrong-{secrets.token_hex(12)}"
AUTH_ERROR_WORDS = ("unauthorized", "authentication required", "401", "no basic auth credentials",
                    "invalid username/password")


def _need(client: str) -> None:
    reason = client_skip_reason(client)
    if reason:
        pytest.skip(reason)


@dataclass
class AuthRegistry:
    mirror: MirrorProcess
    mode: str  # "basic" or "token"

    @property
    def host_port(self) -> str:
        return self.mirror.host_port

    def _authorization(self, repository: str) -> dict[str, str]:
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if self.mode == "basic":
            return {"Authorization": basic}
        status, _, body = http_request(f"{self.mirror.url}/auth/token?service=mirror&scope=repository:{repository}:pull",
                                       headers={"Authorization": basic}, timeout=30)
        assert status == 200, body
        return {"Authorization": f"Bearer {json.loads(body)['token']}"}

    def served_digest(self, repository: str, tag: str) -> str:
        """The digest the registry serves for ``repository:tag`` (as alice), checked against the body."""
        accept = ", ".join([images.MT_OCI_MANIFEST, images.MT_OCI_INDEX, images.MT_DOCKER_MANIFEST, images.MT_DOCKER_LIST])
        status, headers, body = http_request(f"{self.mirror.url}/v2/{repository}/manifests/{tag}",
                                             headers={"Accept": accept, **self._authorization(repository)}, timeout=30)
        assert status == 200, (repository, tag, status, body[:300])
        assert headers["docker-content-digest"] == images.sha256_digest(body)
        return images.sha256_digest(body)


def _write_htpasswd(path: Path) -> None:
    lines = [f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=5)).decode()}"
             for user, pw in ((USER, PASSWORD), ("bob", f"bob-{secrets.token_hex(8)}"))]
    path.write_text("\n".join(lines) + "\n")


def assert_no_secret_in_log(m: MirrorProcess) -> None:
    text = m.log_text() + "\n" + ((m.workdir / "twistd.out").read_text(errors="replace")
                                  if (m.workdir / "twistd.out").exists() else "")
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, WRONG, basic, base64.b64encode(f"{USER}:{WRONG}".encode()).decode()):
        assert secret not in text, f"a credential appears in {m.log}"


@pytest.fixture(params=["basic", "token"])
def auth_registry(request, workdir: Path) -> Iterator[AuthRegistry]:
    """A private registry (``hosted: ["*"]``) with htpasswd users, in Basic or token mode."""
    htpasswd = workdir / "htpasswd"
    _write_htpasswd(htpasswd)
    d = workdir / f"registry-{request.param}"
    d.mkdir()
    auth = {
        "htpasswd": str(htpasswd),
        "token": request.param == "token",
        "access": [
            {"repository": "public/*", "anonymous": ["pull"], "users": ["pull", "push", "delete"]},
            {"repository": "*", "users": ["pull", "push", "delete"]},
        ],
    }
    m = MirrorProcess(d, [], hosted=["*"], auth=auth)
    m.start()
    try:
        # the mode is what the config says: the challenge on /v2/
        status, headers, _ = http_request(f"{m.url}/v2/", timeout=10)
        challenge = headers.get("www-authenticate", "")
        assert status == 401
        assert challenge.startswith("Bearer realm=" if request.param == "token" else "Basic "), challenge
        yield AuthRegistry(m, request.param)
    finally:
        m.stop()
    assert_no_secret_in_log(m)
    problems = [line for line in m.log_text().splitlines() if "Traceback" in line or "Unhandled" in line]
    assert not problems, f"{m.log}:\n" + "\n".join(problems[:10])


@pytest.fixture
def layout(workdir: Path) -> images.OciLayout:
    return images.build_standard_layout(workdir / "src-layout", big_layer_sizes=None)


def _is_auth_error(text: str) -> bool:
    lower = text.lower()
    return any(word in lower for word in AUTH_ERROR_WORDS)


# --------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------

def test_skopeo_creds_push_pull_and_refusals(auth_registry, layout, workdir):
    """``--dest-creds`` push and ``--src-creds`` pull round-trip; without creds (or with a wrong
    password) a private repository refuses pull and push with an auth error; ``public/*`` refuses
    anonymous pushes too."""
    _need("skopeo")
    r = auth_registry
    creds = (USER, PASSWORD)
    pushed = images.push(layout.path, "latest", r.host_port, "private/app", "1", creds=creds)
    assert r.served_digest("private/app", "1") == pushed
    assert skopeo_copy(f"{r.host_port}/private/app:1", workdir / "pulled", creds=creds) == pushed

    with pytest.raises(ClientError) as anonymous:
        skopeo_copy(f"{r.host_port}/private/app:1")
    assert _is_auth_error(str(anonymous.value)), str(anonymous.value)
    with pytest.raises(ClientError) as wrong:
        skopeo_copy(f"{r.host_port}/private/app:1", creds=(USER, WRONG))
    assert _is_auth_error(str(wrong.value)), str(wrong.value)
    with pytest.raises(HarnessError) as anonymous_push:
        images.push(layout.path, "latest", r.host_port, "private/app", "anon")
    assert _is_auth_error(str(anonymous_push.value)), str(anonymous_push.value)

    # public/*: pushing still needs a user
    images.push(layout.path, "latest", r.host_port, "public/app", "1", creds=creds)
    with pytest.raises(HarnessError) as public_push:
        images.push(layout.path, "latest", r.host_port, "public/app", "anon")
    assert _is_auth_error(str(public_push.value)), str(public_push.value)




def test_anonymous_pull_of_public_repositories(auth_registry, layout, request):
    """``public/*`` is pullable without credentials: a bare HTTP GET (Basic: no header at all;
    token: an anonymous token), then skopeo with no credentials at all."""
    _need("skopeo")
    r = auth_registry
    public = images.push(layout.path, "latest", r.host_port, "public/app", "1", creds=(USER, PASSWORD))
    url = f"{r.mirror.url}/v2/public/app/manifests/1"
    headers = {"Accept": images.MT_DOCKER_MANIFEST}
    if r.mode == "token":
        status, _, body = http_request(f"{r.mirror.url}/auth/token?service=mirror&scope=repository:public/app:pull",
                                       timeout=30)
        assert status == 200
        headers["Authorization"] = f"Bearer {json.loads(body)['token']}"
    status, resp_headers, _ = http_request(url, headers=headers, timeout=30)
    assert status == 200 and resp_headers["docker-content-digest"] == public
    # ... but the same for a private name is refused
    status, _, _ = http_request(f"{r.mirror.url}/v2/private/app/manifests/1", headers=headers, timeout=30)
    assert status == 401

    assert skopeo_copy(f"{r.host_port}/public/app:1") == public  # no credentials


# --------------------------------------------------------------------------
# docker
# --------------------------------------------------------------------------

def test_docker_login_push_and_pull(auth_registry, layout, workdir):
    """A private dockerd: a private pull before login is refused (in token mode a ``public/*``
    pull works anonymously); ``docker login`` with a wrong password fails; with the right one it
    succeeds, and docker pulls, pushes (under a new name) and pulls back: RepoDigests are what
    the registry serves.

    In Basic mode docker cannot pull anonymously at all: ``GET /v2/`` answers a Basic
    challenge, and docker then refuses to send a request without credentials ("no basic auth
    credentials", client-side), whatever the access rules say."""
    _need("docker")
    _need("skopeo")
    r = auth_registry
    seeded = images.push(layout.path, "latest", r.host_port, "private/seed", "1", creds=(USER, PASSWORD))
    assert images.push(layout.path, "latest", r.host_port, "public/seed", "1", creds=(USER, PASSWORD)) == seeded
    seed_ref = f"{r.host_port}/private/seed:1"
    public_ref = f"{r.host_port}/public/seed:1"
    target = f"{r.host_port}/private/docker:1"
    with private_docker(workdir, r.host_port) as docker:
        with pytest.raises(ClientError) as before_login:
            docker.docker("pull", "-q", seed_ref, timeout=120)
        assert _is_auth_error(str(before_login.value)) or "denied" in str(before_login.value).lower(), str(before_login.value)

        if r.mode == "token":  # an anonymous token: public/* pulls without login
            docker.docker("pull", "-q", public_ref, timeout=120)
            assert docker_repo_digest(docker, public_ref) == seeded

        rc, out = docker_login(docker, r.host_port, USER, WRONG, check=False)
        assert rc != 0 and _is_auth_error(out), out
        rc, out = docker_login(docker, r.host_port, USER, PASSWORD)
        assert "Login Succeeded" in out, out

        docker.docker("pull", "-q", seed_ref, timeout=120)
        assert docker_repo_digest(docker, seed_ref) == seeded
        docker.docker("tag", seed_ref, target)
        pushed = docker_push(docker, target)
        assert r.served_digest("private/docker", "1") == pushed
        docker.docker("image", "rm", seed_ref, target)
        docker.docker("pull", "-q", target, timeout=120)
        assert docker_repo_digest(docker, target) == pushed


# --------------------------------------------------------------------------
# podman
# --------------------------------------------------------------------------

def test_podman_login_push_and_pull(auth_registry, layout):
    """``podman login`` with a wrong password fails; with the right one podman pushes and pulls
    back the same digest; after ``podman logout`` the pull is refused."""
    _need("podman")
    r = auth_registry
    target = f"{r.host_port}/private/podman:1"
    with PodmanSession(r.host_port.rsplit(":", 1)[0]) as podman:
        rc, out = podman_login(podman, r.host_port, USER, WRONG, check=False)
        assert rc != 0 and _is_auth_error(out), out
        rc, out = podman_login(podman, r.host_port, USER, PASSWORD)
        assert "Login Succeeded" in out, out

        image_id = podman.pull_layout(layout.path, "latest")
        podman.podman("tag", image_id, target, timeout=30)
        pushed = podman.push(target)
        assert r.served_digest("private/podman", "1") == pushed
        podman.podman("rmi", "--all", "--force", timeout=60)
        assert podman.pull(target) == pushed
        assert podman.image_ids() == [image_id]

        podman.podman("logout", r.host_port, timeout=30)
        podman.podman("rmi", "--all", "--force", timeout=60)
        with pytest.raises(ClientError) as logged_out:
            podman.pull(target)
        assert _is_auth_error(str(logged_out.value)), str(logged_out.value)
