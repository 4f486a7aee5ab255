"""The ``mirror`` command.

``mirror serve --config FILE`` runs the service (the same as ``twistd -n mirror``);
``mirror check-config --config FILE`` validates a configuration and exits.
"""

from __future__ import annotations

import argparse
import sys

from mirror.config import ConfigError, load_config

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mirror`` console script."""
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through caching registry mirror.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service in the foreground")
    serve.add_argument("--config", "-c", default="conf/mirror.yaml")
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("--config", "-c", default="conf/mirror.yaml")
    args = parser.parse_args(argv)
    try:
        load_config(args.config)
    except ConfigError as e:
        print(f"mirror: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.config}: ok")
        return 0
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "mirror", "--config", args.config]
    run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
