"""Command-line entry points.

* ``golconded`` - the daemon: ``-c/--config``, ``-f/--foreground``, ``-v/--verbose``, ``--pidfile``,
  ``--check`` (validate the configuration and exit).
* ``golconde`` - the admin tool: ``trigger install|remove``, ``compare``, ``send``, ``check-config``.

Exit statuses: 0 success, 1 failure or difference found, 2 usage or configuration error.
"""
from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from typing import Any, List, Optional

from . import __version__
from .errors import ConfigError, GolcondeError

LOGGER = logging.getLogger("golconde")

DEFAULT_CONFIGS = ("etc/golconde.yaml", "/etc/golconde/golconde.yaml", "/etc/golconde.yaml")


def default_config_path() -> str:
    """``$GOLCONDE_CONFIG``, else the first of :data:`DEFAULT_CONFIGS` that exists."""
    env = os.environ.get("GOLCONDE_CONFIG")
    if env:
        return env
    for path in DEFAULT_CONFIGS:
        if os.path.exists(path):
            return path
    return DEFAULT_CONFIGS[0]


def setup_logging(settings: Optional[dict], verbose: bool = False, foreground: bool = True) -> None:
    """Configure logging from the YAML ``Logging`` section (``filename``, ``format``, ``level``)."""
    settings = dict(settings or {})
    level_name = "debug" if verbose else str(settings.get("level", "info"))
    level = getattr(logging, level_name.upper(), logging.INFO)
    fmt = settings.get("format") or "%(asctime)s %(levelname)-8s %(threadName)s %(name)s: %(message)s"
    filename = settings.get("filename")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if filename:
        handler: logging.Handler = logging.handlers.WatchedFileHandler(filename)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("stomp").setLevel(logging.WARNING if not verbose else logging.INFO)


def _load_config(path: str, prog: str) -> Any:
    from .config import load
    try:
        return load(path)
    except ConfigError as exc:
        print("%s: configuration error in %s:\n%s" % (prog, path, _indent(str(exc))), file=sys.stderr)
        raise SystemExit(2)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# -- golconded --------------------------------------------------------------------------------------
def daemon_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``golconded``."""
    parser = argparse.ArgumentParser(prog="golconded", description="Golconde data distribution daemon")
    parser.add_argument("-c", "--config", default=None, help="YAML configuration (default: %s)"
                        % default_config_path())
    parser.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--pidfile", help="write the daemon's pid to this file")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version="golconde " + __version__)
    args = parser.parse_args(argv)
    path = args.config or default_config_path()
    config = _load_config(path, "golconded")
    from .daemon import Daemon
    try:
        daemon = Daemon(config, config_path=os.path.abspath(path))
    except ConfigError as exc:
        print("golconded: configuration error in %s:\n%s" % (path, _indent(str(exc))), file=sys.stderr)
        return 2
    if args.check:
        print("%s: configuration OK (%d destinations, %d listener threads)"
              % (path, len(config.destinations), len(daemon.listeners)))
        return 0
    if not args.foreground:
        return _daemonize(daemon, config, args)
    setup_logging(config.logging, args.verbose)
    _write_pidfile(args.pidfile)
    try:
        return daemon.run()
    finally:
        _remove_pidfile(args.pidfile)


def _daemonize(daemon: Any, config: Any, args: argparse.Namespace) -> int:
    import daemon as python_daemon  # python-daemon (PEP 3143)
    settings = dict(config.logging or {})
    with python_daemon.DaemonContext(working_directory=os.getcwd(), umask=0o022):
        setup_logging(settings, args.verbose, foreground=False)
        _write_pidfile(args.pidfile)
        try:
            return daemon.run()
        finally:
            _remove_pidfile(args.pidfile)


def _write_pidfile(path: Optional[str]) -> None:
    if path:
        with open(path, "w") as handle:
            handle.write("%d\n" % os.getpid())


def _remove_pidfile(path: Optional[str]) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


# -- golconde ---------------------------------------------------------------------------------------
def admin_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``golconde``."""
    parser = argparse.ArgumentParser(prog="golconde", description="Golconde administration")
    parser.add_argument("--version", action="version", version="golconde " + __version__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    trig = sub.add_parser("trigger", help="install or remove a capture trigger (trigger-based flow)")
    trig.add_argument("operation", choices=["install", "remove"])
    trig.add_argument("--dsn", help="libpq DSN of the canonical database (default: the destination's pgsql)")
    trig.add_argument("--table", action="append", help="[schema.]table (repeatable; default: the destination's target)")
    trig.add_argument("--destination", required=True, help="destination name (as in the configuration)")
    trig.add_argument("--actions", help="comma-separated subset of insert,update,delete (default: all)")
    trig.add_argument("-c", "--config", help="take --dsn/--table from this configuration")

    comp = sub.add_parser("compare", help="compare each target with its canonical relation")
    comp.add_argument("-c", "--config", default=None)
    comp.add_argument("--destination", help="only this destination")

    send = sub.add_parser("send", help="enqueue packets (JSON arguments, or one per line on stdin)")
    send.add_argument("-c", "--config", default=None)
    send.add_argument("--destination", required=True)
    send.add_argument("packets", nargs="*", help="JSON packets; none = read lines from stdin")

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("-c", "--config", default=None)

    args = parser.parse_args(argv)
    setup_logging({"level": "warning"}, args.verbose)
    try:
        return {"trigger": _cmd_trigger, "compare": _cmd_compare, "send": _cmd_send,
                "check-config": _cmd_check}[args.command](args)
    except GolcondeError as exc:
        print("golconde: %s" % exc, file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def _cmd_check(args: argparse.Namespace) -> int:
    path = args.config or default_config_path()
    config = _load_config(path, "golconde")
    from .daemon import build_listeners
    from .stats import Registry
    build_listeners(config, Registry())
    print("%s: configuration OK" % path)
    return 0


def _cmd_trigger(args: argparse.Namespace) -> int:
    import psycopg2
    from . import trigger
    dsn, tables = args.dsn, args.table
    if args.config or not (dsn and tables):
        config = _load_config(args.config or default_config_path(), "golconde")
        matches = [d for d in config.destinations if d.name == args.destination]
        if not matches:
            raise ConfigError("Destinations.%s: no such destination" % args.destination)
        dsn = dsn or matches[0].pgsql
        tables = tables or [matches[0].target]
    actions = [a.strip().lower() for a in args.actions.split(",")] if args.actions else None
    conn = psycopg2.connect(dsn)
    status = 0
    try:
        for number, table in enumerate(tables, 1):
            if args.operation == "install":
                result = trigger.install(conn, table, args.destination, actions=actions)
                conn.commit()
                print("[%d/%d] %s" % (number, len(tables), result))
            else:
                print("[%d/%d] %s" % (number, len(tables), trigger.remove(conn, table, args.destination)))
                conn.commit()
    except GolcondeError as exc:
        conn.rollback()
        print("golconde: %s" % exc, file=sys.stderr)
        status = 1
    finally:
        conn.close()
    return status


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_config
    config = _load_config(args.config or default_config_path(), "golconde")
    differences = 0
    relations = {d.name: (d.target, {t.name: t.target for t in d.targets}) for d in config.destinations}
    for destination, target, result in compare_config(config):
        if args.destination and destination != args.destination:
            continue
        differences += 0 if result.equal else 1
        canonical_relation, targets = relations[destination]
        print("%s %s -> %s %s: %s" % (destination, canonical_relation, target,
                                      targets.get(target, "?"), result.summary()))
    print("%s" % ("all targets equal" if not differences else "%d target(s) differ" % differences))
    return 0 if not differences else 1


def _cmd_send(args: argparse.Namespace) -> int:
    from .client import Client
    config = _load_config(args.config or default_config_path(), "golconde")
    lines = args.packets or [line for line in sys.stdin.read().splitlines() if line.strip()]
    with Client.for_destination(config, args.destination) as client:
        with client.batch():
            ids = [client.send(line) for line in lines]
    print("sent %d packet(s) to %s" % (len(ids), args.destination))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(admin_main())
