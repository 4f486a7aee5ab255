"""The ``mirror`` command.

``mirror serve --config FILE`` runs the service (the same as ``twistd -n mirror``);
``mirror check-config --config FILE`` validates a configuration and exits;
``mirror gc --config FILE [--dry-run] [--delete-untagged]`` collects garbage and evicts
mirrored content per the ``gc`` settings, safely while the service runs.
"""

from __future__ import annotations

import argparse
import sys

from mirror.config import ConfigError, MirrorConfig, load_config

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mirror`` console script."""
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through caching registry mirror.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service in the foreground")
    serve.add_argument("--config", "-c", default="conf/mirror.yaml")
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("--config", "-c", default="conf/mirror.yaml")
    gc = sub.add_parser("gc", help="garbage-collect the store (safe while the service runs)")
    gc.add_argument("--config", "-c", default="conf/mirror.yaml")
    gc.add_argument("--dry-run", action="store_true", help="print what would go; delete nothing")
    gc.add_argument("--delete-untagged", action="store_true", help="also drop hosted manifests no tag reaches")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"mirror: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.config}: ok")
        return 0
    if args.command == "gc":
        return _gc(config, dry_run=args.dry_run, delete_untagged=args.delete_untagged)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "mirror", "--config", args.config]
    run()
    return 0


def _gc(config: MirrorConfig, *, dry_run: bool, delete_untagged: bool) -> int:
    from mirror.fsstore import FilesystemStore
    from mirror.gc import collect, format_report

    store = FilesystemStore(config.storage.root)
    sizes = {d: size for d, size, _ in store.scan_blobs()}
    report = collect(store, config, dry_run=dry_run, delete_untagged=delete_untagged or None)
    print(format_report(report, sizes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
