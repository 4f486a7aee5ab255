"""The ``mirror`` command.

``mirror serve --config FILE`` runs the service (the same as ``twistd -n mirror``);
``mirror check-config --config FILE`` validates a configuration: every problem, one line
each on stderr, and exit status 2, or ``FILE: ok``;
``mirror gc --config FILE [--dry-run] [--delete-untagged]`` collects garbage and evicts
mirrored content per the ``gc`` settings, safely while the service runs.
``mirror warm --config FILE [IMAGE ...] [-f LIST] [--platform P] [-j N]`` pre-fetches images
into the cache; ``mirror export --config FILE --out FILE.tar [IMAGE ...]`` writes cached
images as an OCI image-layout archive and ``mirror import FILE.tar --config FILE`` loads
one, verified (see the README's "Offline CI cache").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mirror.config import ConfigError, MirrorConfig, load_config
from mirror.storage.base import Store

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
    gc.add_argument("--json", action="store_true", help="print one JSON summary line (the service reads it)")
    warm = sub.add_parser("warm", help="pre-fetch images into the cache (safe while the service runs)")
    warm.add_argument("--config", "-c", default="conf/mirror.yaml")
    warm.add_argument("images", nargs="*", metavar="IMAGE", help="e.g. alpine:3.19, ghcr.io/org/app:1, name@sha256:...")
    warm.add_argument(
        "-f",
        "--file",
        action="append",
        default=[],
        metavar="LIST",
        help="read image references from LIST, one per line (# comments); - for stdin",
    )
    warm.add_argument(
        "--platform",
        default=None,
        help="platforms to take from multi-platform images: all, or os/arch[/variant],... (default: this host's)",
    )
    warm.add_argument("-j", "--jobs", type=_positive_int, default=4, help="images warmed at a time (default 4)")
    export = sub.add_parser("export", help="write cached images as an OCI image-layout tar")
    export.add_argument("--config", "-c", default="conf/mirror.yaml")
    export.add_argument("--out", "-o", required=True, metavar="FILE.tar")
    export.add_argument("images", nargs="*", metavar="IMAGE", help="images to export (default: every tagged image)")
    load = sub.add_parser("import", help="load an OCI image-layout tar into the store, verified")
    load.add_argument("archive", metavar="FILE.tar")
    load.add_argument("--config", "-c", default="conf/mirror.yaml")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(f"mirror: {problem}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.config}: ok")
        return 0
    if args.command == "gc":
        return _gc(config, dry_run=args.dry_run, delete_untagged=args.delete_untagged, as_json=args.json)
    if args.command == "warm":
        return _warm(config, args.images, args.file, args.platform, args.jobs)
    if args.command == "export":
        return _export(config, args.images, args.out)
    if args.command == "import":
        return _import(config, args.archive)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "mirror", "--config", args.config]
    run()
    return 0


def _run(main: Callable[[IReactorTime], Awaitable[int]]) -> int:
    """Run ``main(reactor)`` on the global reactor until it returns; its exit code."""
    from twisted.internet import reactor

    outcome: list[int | Failure] = []

    def start() -> None:
        d = Deferred.fromCoroutine(_call(main, reactor))
        d.addBoth(outcome.append).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    result = outcome[0] if outcome else 130  # the reactor stopped first: interrupted
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, int)
    return result


async def _call(main: Callable[[IReactorTime], Awaitable[int]], reactor: IReactorTime) -> int:
    return await main(reactor)


def _open_store(config: MirrorConfig, command: str) -> Store | None:
    from twisted.internet.threads import deferToThread

    from mirror.storage import StoreLayoutError, open_store

    try:
        return open_store(config.storage, deferToThread)
    except (OSError, StoreLayoutError) as e:
        print(f"mirror {command}: {config.source}: {config.storage.where}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return None


def _gc(config: MirrorConfig, *, dry_run: bool, delete_untagged: bool, as_json: bool = False) -> int:
    import json

    from mirror.registry.gc import GcBusy, collect, format_report, summary

    store = _open_store(config, "gc")
    if store is None:
        return 2

    async def main(reactor: IReactorTime) -> int:
        assert store is not None
        try:
            report = await collect(store, config, dry_run=dry_run, delete_untagged=delete_untagged or None, clock=reactor)
        except GcBusy as e:  # another node sharing the store collects: one run at a time is enough
            print(json.dumps({"skipped": str(e)}) if as_json else f"mirror gc: skipped: {e}")
            return 0
        print(json.dumps(summary(report)) if as_json else format_report(report))
        return 0

    return _run(main)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _warm(config: MirrorConfig, images: list[str], lists: list[str], platform: str | None, jobs: int) -> int:
    from mirror.core.platforms import PlatformChoice, PlatformError, host_platform, parse_platforms
    from mirror.tools.warm import read_image_list, run_warm

    wanted = list(images)
    for path in lists:
        try:
            if path == "-":
                wanted += read_image_list(sys.stdin)
            else:
                with open(path) as f:
                    wanted += read_image_list(f)
        except OSError as e:
            print(f"mirror warm: {path}: cannot read: {e.strerror}", file=sys.stderr)
            return 2
    if not wanted:
        print("mirror warm: no images given (name them, or -f LIST)", file=sys.stderr)
        return 2
    try:
        choice = parse_platforms(platform) if platform is not None else PlatformChoice((host_platform(),))
    except PlatformError as e:
        print(f"mirror warm: {e}", file=sys.stderr)
        return 2
    return run_warm(config, wanted, platforms=choice, jobs=jobs)


def _export(config: MirrorConfig, images: list[str], out: str) -> int:
    from pathlib import Path

    from mirror.tools.archive import ArchiveError, export_archive, plan_export
    from mirror.tools.progress import format_bytes

    store = _open_store(config, "export")
    if store is None:
        return 2

    async def main(reactor: IReactorTime) -> int:
        assert store is not None
        try:
            entries, warnings = await plan_export(store, config, images)
            for warning in warnings:
                print(f"mirror export: warning: {warning}", file=sys.stderr)
            if not entries:
                print("mirror export: nothing to export: the store holds no tagged image", file=sys.stderr)
                return 1
            result = await export_archive(store, entries, Path(out), report=print)
        except (ArchiveError, OSError) as e:
            print(f"mirror export: {e}; no archive written", file=sys.stderr)
            return 1
        print(
            f"wrote {out}: {result.images} images, {result.blobs} blobs, {format_bytes(result.bytes)} in {result.seconds:.1f} s"
        )
        return 0

    return _run(main)


def _import(config: MirrorConfig, archive: str) -> int:
    import zlib
    from pathlib import Path

    from mirror.tools.archive import ArchiveError, import_archive

    store = _open_store(config, "import")
    if store is None:
        return 2

    async def main(reactor: IReactorTime) -> int:
        assert store is not None
        try:
            result = await import_archive(store, config, Path(archive), reactor, report=print)
        except (ArchiveError, OSError, zlib.error) as e:
            what = e if isinstance(e, ArchiveError) else (e.strerror if isinstance(e, OSError) and e.strerror else e)
            print(f"mirror import: {archive}: refused: {what}; nothing was imported", file=sys.stderr)
            return 1
        for warning in result.warnings:
            print(f"mirror import: warning: {warning}", file=sys.stderr)
        print(result.summary(Path(archive)))
        return 0

    return _run(main)


if __name__ == "__main__":
    raise SystemExit(main())
