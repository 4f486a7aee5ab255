"""Fixtures shared by the unit and the integration tests. Shared test helpers live in
tests/storeutil.py; integration fixtures in tests/integration/conftest.py."""

from __future__ import annotations

import os

import bcrypt
import pytest

from mirror.core.oci import DOCKER_MANIFEST
from tests.test_ociarchive import FilesystemStore, config_for, put_image, put_index
from tests.test_web_auth import PASSWORD


@pytest.fixture
def htpasswd(tmp_path):
    """An htpasswd file (bcrypt) with the users alice and bob, both with PASSWORD."""
    path = tmp_path / "htpasswd"
    lines = [f"{user}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}" for user in ("alice", "bob")]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def source(tmp_path):
    """A store holding a schema2 image, an OCI image, a two-platform index and a ghcr.io image."""
    root = tmp_path / "source"
    store = FilesystemStore(root)
    put_image(store, "docker.io/library/hello", "latest", [os.urandom(5000), b"shared"], media_type=DOCKER_MANIFEST)
    put_image(store, "docker.io/library/hello", "oci", [os.urandom(3000), b"shared"])
    put_index(store, "docker.io/library/hello", "multi", ["amd64", "arm64"])
    put_image(store, "ghcr.io/org/app", "v1", [os.urandom(100)])
    return store, config_for(root)
