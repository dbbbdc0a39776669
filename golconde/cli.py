"""Command-line entry points.

* ``golconded`` - the daemon: ``-c/--config``, ``-f/--foreground``, ``-v/--verbose``, ``--pidfile``,
  ``--check`` (validate the configuration and exit).
* ``golconde`` - the admin tool: ``trigger install|remove``, ``compare``, ``send``, ``check-config``,
  ``dlq list|replay|purge``, ``ledger list|prune``, ``status``.

Exit statuses: 0 success, 1 failure or difference found, 2 usage or configuration error (and
``dlq purge`` or ``ledger prune`` without ``--yes``: nothing was deleted).
"""
from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import __version__
from .errors import ConfigError, GolcondeError, PacketError

LOGGER = logging.getLogger("golconde")

DEFAULT_CONFIGS = ("etc/golconde.yaml", "/etc/golconde/golconde.yaml", "/etc/golconde.yaml")


#: ``-c``'s help: where the configuration is looked for when it is not given.
CONFIG_HELP = ("YAML configuration (default: $GOLCONDE_CONFIG, else the first of %s that exists)"
               % ", ".join(DEFAULT_CONFIGS))


def default_config_path() -> str:
    """``$GOLCONDE_CONFIG``, else the first of :data:`DEFAULT_CONFIGS` that exists."""
    env = os.environ.get("GOLCONDE_CONFIG")
    if env:
        return env
    for path in DEFAULT_CONFIGS:
        if os.path.exists(path):
            return path
    return DEFAULT_CONFIGS[0]


#: The local syslog socket (journald listens on it too).
SYSLOG_ADDRESS = "/dev/log"


def _syslog_handler(ident: str) -> logging.Handler:
    """A SysLogHandler on :data:`SYSLOG_ADDRESS` (facility daemon, tagged ``ident``), or standard
    error with a warning when there is no such socket."""
    if os.path.exists(SYSLOG_ADDRESS):
        handler = logging.handlers.SysLogHandler(SYSLOG_ADDRESS,
                                                 logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.ident = "%s[%d]: " % (ident, os.getpid())
        return handler
    logging.getLogger("golconde").warning("no %s: logging to standard error", SYSLOG_ADDRESS)
    return logging.StreamHandler(sys.stderr)


def _log_destination(settings: Optional[dict]) -> str:
    """Where :func:`setup_logging` sends the log for a ``Logging`` section: ``"syslog"`` (handler
    ``syslog`` or ``journald``), ``"file"`` (a ``filename`` otherwise) or ``"stderr"``."""
    settings = settings or {}
    if settings.get("handler") in ("syslog", "journald"):
        return "syslog"
    return "file" if settings.get("filename") else "stderr"


def setup_logging(settings: Optional[dict], verbose: bool = False, foreground: bool = True) -> None:
    """Configure logging from the YAML ``Logging`` section (``filename``, ``filemode``, ``format``,
    ``datefmt``, ``level``, ``handler``: ``stderr``, ``file`` (the default when ``filename`` is set), ``syslog`` or
    ``journald`` - both through :data:`SYSLOG_ADDRESS`, without the time stamp, which syslog adds)."""
    settings = dict(settings or {})
    level_name = "debug" if verbose else str(settings.get("level", "info"))
    level = getattr(logging, level_name.upper(), logging.INFO)
    fmt = settings.get("format") or "%(asctime)s %(levelname)-8s %(threadName)s %(name)s: %(message)s"
    filename = settings.get("filename")
    root = logging.getLogger()
    destination = _log_destination(settings)
    if destination == "syslog":
        handler: logging.Handler = _syslog_handler("golconded")
        if not settings.get("format") and isinstance(handler, logging.handlers.SysLogHandler):
            fmt = "%(levelname)s %(threadName)s %(name)s: %(message)s"
    elif destination == "file":
        handler = logging.handlers.WatchedFileHandler(filename, mode=settings.get("filemode") or "a")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, settings.get("datefmt")))
    for old in list(root.handlers):     # only once the new one exists (a reload keeps the old
        root.removeHandler(old)         # ones when the file cannot be opened)
        old.close()
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
    parser.add_argument("-c", "--config", default=None, help=CONFIG_HELP)
    parser.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--pidfile", help="write the daemon's pid to this file")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--only", metavar="NAMES",
                        help="run only these listener threads (comma-separated: Dest for a"
                             " destination, Dest_target for a target), to spread one"
                             " configuration over several processes: one Python process uses"
                             " about one core (the interpreter lock)")
    parser.add_argument("--http-port", type=int, metavar="PORT",
                        help="stats server port instead of HTTPServer.port (one per process)")
    parser.add_argument("--version", action="version", version="golconde " + __version__)
    args = parser.parse_args(argv)
    if args.http_port is not None and not 1 <= args.http_port <= 65535:
        parser.error("--http-port must be between 1 and 65535")
    only = None
    if args.only is not None:
        only = [name.strip() for name in args.only.split(",") if name.strip()]
        if not only:
            parser.error("--only names no listener")
    path = args.config or default_config_path()
    config = _load_config(path, "golconded")
    from .daemon import Daemon
    try:
        daemon = Daemon(config, config_path=os.path.abspath(path), only=only,
                        http_port=args.http_port)
    except ConfigError as exc:
        print("golconded: configuration error in %s:\n%s" % (path, _indent(str(exc))), file=sys.stderr)
        return 2
    if args.check:
        from .daemon import discard_listeners
        discard_listeners(daemon.listeners.values())
        print("%s: configuration OK (%d destinations, %d listener threads)"
              % (path, len(config.destinations), len(daemon.listeners)))
        return 0
    running = _running_pid(args.pidfile)
    taken = None if running else _stats_port_taken(config, args.http_port)
    if running or taken:
        from .daemon import discard_listeners
        discard_listeners(daemon.listeners.values())    # their handlers' shutdown()
        if running:
            print("golconded: already running as pid %d (pid file %s)" % (running, args.pidfile),
                  file=sys.stderr)
            return 1
        print("golconded: %s" % taken, file=sys.stderr)
        return 2
    filename = (config.logging or {}).get("filename")
    if _log_destination(config.logging) == "file":
        try:        # before daemonizing, which closes stderr: say it here
            open(filename, "a").close()
        except OSError as exc:
            print("golconded: cannot open the log file %s (Logging.filename): %s"
                  % (filename, exc.strerror or exc), file=sys.stderr)
            return 2
    if not args.foreground:
        if _log_destination(config.logging) == "stderr":
            print("golconded: warning: Logging sets no filename and no syslog handler: once"
                  " detached, the daemon's log goes nowhere (set Logging.filename or handler:"
                  " syslog, or run with -f)", file=sys.stderr)
        return _daemonize(daemon, config, args)
    setup_logging(config.logging, args.verbose)
    daemon.on_logging_change = lambda settings: setup_logging(settings, args.verbose)
    _write_pidfile(args.pidfile)
    try:
        return daemon.run()
    finally:
        _remove_pidfile(args.pidfile)


def _stats_port_taken(config: Any, http_port: Optional[int]) -> Optional[str]:
    """Why the stats server could not listen where the configuration (or ``--http-port``) says,
    or ``None``: checked by binding that address once before starting, as the server will (a
    daemon started without it, its port held by another process, left check_golconde and
    ``golconde status`` reading that other process)."""
    import socket
    http = config.http
    port = http.port if http_port is None else http_port
    if not http.enabled or not port:
        return None
    family = socket.AF_INET6 if ":" in http.listen else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server does
            probe.bind((http.listen, port))
    except OSError as exc:
        return ("the stats server cannot listen on %s:%d (%s): %s; give another port"
                " (HTTPServer.port, or --http-port for each process of a configuration spread"
                " with --only) or disable it (HTTPServer.enabled: false)"
                % (http.listen, port, "--http-port" if http_port is not None else "HTTPServer.port",
                   exc.strerror or exc))
    return None


def _daemonize(daemon: Any, config: Any, args: argparse.Namespace) -> int:
    import daemon as python_daemon  # python-daemon (PEP 3143)
    settings = dict(config.logging or {})
    with python_daemon.DaemonContext(working_directory=os.getcwd(), umask=0o022):
        setup_logging(settings, args.verbose, foreground=False)
        # Build the listeners again in the daemon process: threading marks every Thread object
        # created before a fork as stopped in the child (is_alive() stays False once started), so
        # stop would not wait for them and a reload would start a second copy of each.
        daemon = type(daemon)(config, config_path=daemon.config_path,
                              stop_timeout=daemon.stop_timeout, only=daemon.only,
                              http_port=daemon.http_port)
        daemon.on_logging_change = lambda changed: setup_logging(changed, args.verbose,
                                                                 foreground=False)
        _write_pidfile(args.pidfile)
        try:
            return daemon.run()
        finally:
            _remove_pidfile(args.pidfile)


def _running_pid(path: Optional[str]) -> Optional[int]:
    """The pid in pid file ``path`` if that process still runs (else ``None``: no file, or stale)."""
    try:
        with open(path or "") as handle:
            pid = int(handle.read().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def _write_pidfile(path: Optional[str]) -> None:
    """Write this process's pid to ``path`` atomically (a temporary file renamed over it), so that
    a reader never sees the file empty or half written."""
    if path:
        temporary = "%s.%d.tmp" % (path, os.getpid())
        with open(temporary, "w") as handle:
            handle.write("%d\n" % os.getpid())
        os.replace(temporary, path)


def _remove_pidfile(path: Optional[str]) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


# -- golconde ---------------------------------------------------------------------------------------
def admin_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``golconde``. Its output read by a command that stops early
    (``golconde compare | head -1``) ends it quietly, exit status 1, as the Python documentation
    advises ("Note on SIGPIPE", module signal), not with a BrokenPipeError traceback."""
    try:
        status = _admin_main(argv)
        sys.stdout.flush()          # here, not at exit: a closed pipe is caught below
        return status
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())     # Python flushes stdout again at exit
        return 1


def _admin_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="golconde", description="Golconde administration")
    parser.add_argument("--version", action="version", version="golconde " + __version__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    trig = sub.add_parser("trigger", help="install or remove a capture trigger (trigger-based flow)")
    trig.add_argument("operation", choices=["install", "remove"])
    trig.add_argument("--dsn", help="libpq DSN of the canonical database (default: the destination's pgsql)")
    trig.add_argument("--table", action="append", help="[schema.]table (repeatable; default: the destination's target)")
    trig.add_argument("--destination", required=True, type=_destination_name,
                      help="destination name (as in the configuration)")
    trig.add_argument("--events", "--actions", dest="events", metavar="EVENTS",
                      help="the SQL events to capture, a comma-separated subset of"
                           " insert,update,delete (default: all; --actions is its older name)")
    trig.add_argument("-c", "--config", help="take --dsn/--table from this configuration")
    trig.add_argument("--force", action="store_true",
                      help="install even on a destination the configuration has in client mode")

    comp = sub.add_parser("compare", help="compare each target with its canonical relation")
    comp.add_argument("-c", "--config", default=None, help=CONFIG_HELP)
    comp.add_argument("--destination", help="only this destination")
    comp.add_argument("--rows", type=_count, default=0, metavar="N",
                      help="for a target that differs, list at most N differing rows by the"
                           " canonical primary key (it reads both tables whole, in key order)")
    comp.add_argument("--handlers", action="store_true",
                      help="also compare targets with a custom handler, column by column as for"
                           " AutoSQL (by default they are not compared: a handler writes its own way)")

    send = sub.add_parser("send", help="enqueue packets (JSON arguments, or one per line on stdin)")
    send.add_argument("-c", "--config", default=None, help=CONFIG_HELP)
    send.add_argument("--destination", required=True)
    send.add_argument("--to-targets", action="store_true",
                      help="send to each target's queue instead (the canonical relation is not"
                           " written: a repair, or a trigger-mode destination's dead letters)")
    send.add_argument("--target", action="append", metavar="NAME", dest="targets",
                      help="with --to-targets: only this target (its name under the destination's"
                           " Targets); repeat it for several; default: every target")
    send.add_argument("packets", nargs="*", help="JSON packets; none = read lines from stdin")

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("-c", "--config", default=None, help=CONFIG_HELP)

    stat = sub.add_parser("status", help="tree of destinations and targets: state, backlog, lag, "
                          "rates, last error (from the daemon and the broker)")
    stat.add_argument("-c", "--config", default=None, help=CONFIG_HELP)
    stat.add_argument("--destination", help="only this destination")
    stat.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    stat.add_argument("--url", action="append", type=_daemon_url,
                      help="the daemon's HTTP server (default: from HTTPServer); repeat it for a "
                           "configuration spread over several daemons (golconded --only)")
    stat.add_argument("--management-url", type=_http_url, default=None,
                      help="RabbitMQ management API (default http://<broker host>:15672; "
                           "'' = backlog from the daemon only)")
    stat.add_argument("--interval", type=_seconds(0, strict=False), default=1.0,
                      help="seconds between the two samples that give rates (0: no rates)")
    stat.add_argument("--timeout", type=_seconds(0, strict=True), default=5.0,
                      help="seconds per HTTP request")

    dlq = sub.add_parser("dlq", help="list, replay or purge a dead-letter queue")
    dlq.add_argument("operation", choices=["list", "replay", "purge"])
    dlq.add_argument("-c", "--config", default=None, help=CONFIG_HELP)
    dlq.add_argument("--destination", help="use this destination's dead-letter queue")
    dlq.add_argument("--target", help="with --destination: that target's dead-letter queue")
    dlq.add_argument("--queue", type=_queue_name,
                     help="the dead-letter queue itself, e.g. /queue/golconde.x.dlq")
    dlq.add_argument("--limit", type=_count, default=None,
                     help="at most N packets (list: default 100; replay, purge: default all)")
    dlq.add_argument("--id", action="append", help="only the packet with this golconde-id (repeatable)")
    dlq.add_argument("--json", action="store_true", help="print JSON")
    dlq.add_argument("--yes", action="store_true", help="purge: confirm dropping the packets")
    dlq.add_argument("--body-limit", type=_count, default=200, help="list: body characters shown")
    dlq.add_argument("--management-url", type=_http_url, default=None,
                     help="RabbitMQ management API (default http://<broker host>:15672; "
                          "'' = STOMP only)")

    led = sub.add_parser("ledger", help="list the consumers of the ledger (golconde.applied) in each"
                         " database of the configuration, or delete a removed one's rows")
    led.add_argument("operation", choices=["list", "prune"])
    led.add_argument("-c", "--config", default=None, help=CONFIG_HELP)
    led.add_argument("--consumer", metavar="NAME",
                     help="prune: the consumer whose rows go (a removed or renamed destination's or"
                          " target's thread name, e.g. Items_t1; not one of the configuration's)")
    led.add_argument("--older-than", type=_seconds(0, strict=False), default=None, metavar="SECONDS",
                     help="prune: only its rows applied more than SECONDS ago (default 0: all)")
    led.add_argument("--yes", action="store_true", help="prune: confirm the deletion")
    led.add_argument("--json", action="store_true", help="print JSON")

    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:      # called in-process (tests, scripts): keep their logging
        setup_logging({"level": "warning"}, args.verbose)
    try:
        return {"trigger": _cmd_trigger, "compare": _cmd_compare, "send": _cmd_send,
                "check-config": _cmd_check, "dlq": _cmd_dlq, "ledger": _cmd_ledger,
                "status": _cmd_status}[args.command](args)
    except GolcondeError as exc:
        print("golconde: %s" % exc, file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("expected an integer >= 0, got %r" % text)
    return value


def _url(text: str, allow_empty: bool) -> str:
    """An http(s) URL with a host and no ``user:password@`` (or '' when ``allow_empty``).
    :raises argparse.ArgumentTypeError: it is not."""
    import urllib.parse
    parts = urllib.parse.urlsplit(text)
    if (text or not allow_empty) and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise argparse.ArgumentTypeError("expected an http:// or https:// URL%s, got %r"
                                         % (" (or '')" if allow_empty else "", text))
    if parts.username is not None or parts.password is not None:
        # it would be echoed in messages; the API is read with the broker's login
        raise argparse.ArgumentTypeError("expected a URL without user:password@ (the broker's"
                                         " login and passcode of the configuration are used)")
    return text


def _http_url(text: str) -> str:
    """argparse type: an http(s) URL with a host, or '' (none)."""
    return _url(text, allow_empty=True)


def _daemon_url(text: str) -> str:
    """argparse type: a daemon's HTTP server, an http(s) URL (not '')."""
    return _url(text, allow_empty=False)


def _seconds(minimum: float, strict: bool) -> Any:
    """argparse type: seconds, a number of at least (``strict``: more than) ``minimum``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > minimum if strict else value >= minimum) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError("expected a number of seconds %s %g, got %r"
                                             % (">" if strict else ">=", minimum, text))
        return value
    return parse


def _queue_name(text: str) -> str:
    """argparse type: a queue as the configuration names them (``/queue/...``, ``/amq/queue/...``)."""
    from .config import QUEUE_RE
    if not QUEUE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError("expected /queue/<name> or /amq/queue/<name>, got %r" % text)
    return text


def _destination_name(text: str) -> str:
    """argparse type: a destination name the configuration accepts (so its drain can exist)."""
    from .config import NAME_RE
    if not NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError("expected letters, digits, '_', '.' or '-' (a destination name"
                                         " of the configuration), got %r" % text)
    return text


def _cmd_check(args: argparse.Namespace) -> int:
    path = args.config or default_config_path()
    config = _load_config(path, "golconde")
    from .daemon import discard_listeners, build_listeners
    from .stats import Registry
    try:
        listeners = build_listeners(config, Registry())     # handlers loaded, set up: none starts
    except ConfigError as exc:     # the same words as a file that does not load, and as golconded
        print("golconde: configuration error in %s:\n%s" % (path, _indent(str(exc))), file=sys.stderr)
        return 2
    discard_listeners(listeners.values())
    print("%s: configuration OK" % path)
    return 0


def _warn_trigger_mismatch(destination: Any, tables: Sequence[str]) -> None:
    """Warn (stderr) when the configuration will not drain what is being captured as one might
    expect: a destination in client mode (installed with ``--force``) drains no queue table; a
    table other than the destination's has its changes sent to that destination's targets all
    the same."""
    from .schema import parse_relation
    if getattr(destination, "mode", "trigger") != "trigger":
        print("golconde: warning: destination %s is in %s mode: no daemon drains the changes the"
              " trigger captures until its mode is trigger" % (destination.name, destination.mode),
              file=sys.stderr)
    try:
        own = parse_relation(destination.target)
        others = [table for table in tables if parse_relation(table) != own]
    except GolcondeError:
        return
    for table in others:
        print("golconde: warning: %s is not destination %s's relation (%s): its changes go to"
              " that destination's targets all the same, applied to their relations (fine for a"
              " partition of it)" % (table, destination.name, destination.target), file=sys.stderr)


def _same_relation(table: str, relation: str) -> bool:
    """Whether ``table`` names ``relation`` (``items`` is ``public.items``); one that does not
    parse is not (``trigger install`` refuses it on its own)."""
    from .schema import parse_relation
    try:
        return parse_relation(table) == parse_relation(relation)
    except GolcondeError:
        return False


def _refused_install(args: argparse.Namespace, destination: Any, tables: Sequence[str]) -> bool:
    """Refuse (stderr) a capture trigger for a destination the configuration has in client mode,
    unless ``--force``: golconded applies its packets to the table itself, so the trigger would
    queue every one of them for no one and, once the mode is switched, send them to the targets
    a second time. :returns: whether refused."""
    if destination.mode == "trigger" or args.force:
        return False
    print("golconde: destination %s is in %s mode: golconded writes its packets to %s itself and"
          " drains no queue table, so the trigger would capture those writes for no one (and, once"
          " the mode is switched to trigger, send them to the targets again); set its mode to"
          " trigger first, or pass --force" % (args.destination, destination.mode, tables[0]),
          file=sys.stderr)
    return True


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
        if args.operation == "install":
            if _refused_install(args, matches[0], tables):
                return 2
            _warn_trigger_mismatch(matches[0], tables)
    elif args.operation == "install" and not args.force:
        # --dsn and --table given: the configuration found by default, where it names this
        # destination and its relation is among the tables, still tells a client-mode one
        from .config import load
        path = default_config_path()
        if os.path.exists(path):
            try:
                known = [d for d in load(path).destinations if d.name == args.destination]
            except (ConfigError, OSError) as exc:
                known = []
                print("golconde: warning: %s could not be read (%s): whether destination %s is in"
                      " client mode there is not checked" % (path, str(exc).splitlines()[0],
                                                             args.destination), file=sys.stderr)
            own = [table for table in tables if known and _same_relation(table, known[0].target)]
            if own and _refused_install(args, known[0], own):
                return 2
    actions = [a.strip().lower() for a in args.events.split(",")] if args.events else None
    from .progress import echo, progress
    try:
        conn = psycopg2.connect(dsn)
    except psycopg2.Error as exc:
        print("golconde: cannot connect to the canonical database: %s" % trigger.first_line(exc), file=sys.stderr)
        return 1
    status = 0
    try:
        for number, table in enumerate(progress(tables, "trigger " + args.operation, unit="table"), 1):
            if args.operation == "install":
                result = trigger.install(conn, table, args.destination, actions=actions)
                conn.commit()
                echo("[%d/%d] %s" % (number, len(tables), result))
            else:
                echo("[%d/%d] %s" % (number, len(tables), trigger.remove(conn, table, args.destination)))
                conn.commit()
    except (GolcondeError, psycopg2.Error) as exc:
        conn.rollback()
        reason = exc if isinstance(exc, GolcondeError) else "database error: " + trigger.first_line(exc)
        print("golconde: %s" % reason, file=sys.stderr)
        status = 1
    finally:
        conn.close()
    return status



def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_config
    config = _load_config(args.config or default_config_path(), "golconde")
    if args.destination and args.destination not in [d.name for d in config.destinations]:
        raise ConfigError("Destinations.%s: no such destination" % args.destination)
    differences = errors = skipped = 0
    relations = {d.name: (d.target, {t.name: t.target for t in d.targets}) for d in config.destinations}
    results = compare_config(config, args.destination or None, handlers=args.handlers,
                             rows=args.rows)
    for destination, target, result in results:
        if result.skipped:
            skipped += 1
        elif result.error:
            errors += 1
        elif not result.equal:
            differences += 1
        canonical_relation, targets = relations[destination]
        print("%s %s -> %s %s: %s" % (destination, canonical_relation, target,
                                      targets.get(target, "?"), result.summary()))
        # a column on one side only is not compared: a rename on one side shows here only
        for side, names in (("only in the canonical relation", result.canonical_only),
                            ("only in the target", result.target_only)):
            if names:
                print("  not compared, %s: %s" % (side, ", ".join(names)))
        for what, key in result.rows:
            print("  (%s)=(%s): %s" % (", ".join(key), ", ".join(key.values()), what))
        if result.rows_note:
            print("  %s" % result.rows_note)
    summary = ["%d target(s) differ" % differences] if differences else []
    if errors:
        summary.append("%d could not be compared" % errors)
    if not summary:
        compared = len(results) - skipped
        summary.append("no target to compare" if not results else
                       "all targets equal" if not skipped else
                       "no target compared" if not compared else "all the targets compared equal")
    if skipped:
        summary.append("%d with a custom handler not compared" % skipped)
    print(", ".join(summary))
    return 0 if not (differences or errors) else 1


def _cmd_status(args: argparse.Namespace) -> int:
    import json
    from . import status
    from .progress import progress
    config = _load_config(args.config or default_config_path(), "golconde")
    if args.destination and args.destination not in [d.name for d in config.destinations]:
        raise ConfigError("Destinations.%s: no such destination" % args.destination)
    management = (None if args.management_url == ""
                  else status.Management(args.management_url, timeout=args.timeout))
    document = status.collect(config, url=args.url, management=management, interval=args.interval,
                              timeout=args.timeout, destination=args.destination,
                              progress=lambda items: progress(items, "status", unit="listener"))
    print(json.dumps(document, indent=2) if args.json else status.render(document))
    return 0 if status.healthy(document) else 1


def _cmd_send(args: argparse.Namespace) -> int:
    if args.targets is not None and not args.to_targets:
        raise ConfigError("--target needs --to-targets (a packet for the destination reaches"
                          " every target)")
    from .client import Client, packet_text
    from .packet import parse
    config = _load_config(args.config or default_config_path(), "golconde")
    if args.packets:
        packets = [("argument %d" % number, text) for number, text in enumerate(args.packets, 1)]
    else:
        try:        # bytes, strictly: a text stream may have replaced bytes that are not UTF-8
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PacketError("standard input is not UTF-8 text: %s at byte %d" % (exc.reason, exc.start)) from None
        # lines end at "\n" only: str.splitlines() also splits at U+2028 and others, which JSON
        # strings may hold unescaped
        packets = [("line %d" % number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), 1)
                   if line.strip()]
    if not packets:     # an empty pipe (its producer failed?) is not a success
        raise PacketError("no packet to send (no argument, and no line on standard input)")
    parsed = []
    for where, text in packets:     # all checked before anything is sent
        try:
            packet = parse(text)
            packet_text(packet)
        except PacketError as exc:
            raise PacketError("packet of %s: %s" % (where, exc)) from None
        parsed.append(packet)
    if args.to_targets:
        clients = Client.for_targets(config, args.destination, targets=args.targets)
        for client in clients:
            with client, client.batch():
                for packet in parsed:
                    client.send(packet)
        print("sent %d packet(s) to each of the %d target(s) of %s: %s" % (
            len(parsed), len(clients), args.destination, ", ".join(c.queue for c in clients)))
        return 0
    with Client.for_destination(config, args.destination) as client:
        with client.batch():
            ids = [client.send(packet) for packet in parsed]
    print("sent %d packet(s) to %s" % (len(ids), args.destination))
    return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    from . import dlq
    config = _load_config(args.config or default_config_path(), "golconde")
    return dlq.run(args, config, sys.stdout)


def _ledger_databases(config: Any) -> List[Tuple[str, List[str]]]:
    """The databases of ``config``'s listeners, each DSN once (libpq parameters compared), with
    the thread names that keep a ledger there (targets and client-mode destinations: a
    trigger-mode destination's drain keeps none): ``[(dsn, [names])]`` in configuration order."""
    import psycopg2.extensions
    found: Dict[Any, Tuple[str, List[str]]] = {}
    for destination in config.destinations:
        for item in [destination] + list(destination.targets):
            key = frozenset(psycopg2.extensions.parse_dsn(item.pgsql).items())
            names = found.setdefault(key, (item.pgsql, []))[1]
            if item is not destination or destination.mode != "trigger":
                names.append(item.thread_name)
    return list(found.values())


def _server_database(connection: Any) -> Tuple[str, str]:
    """Which database ``connection`` reached, whatever the DSN's spelling: the cluster's system
    identifier (the server's address where pg_control_system() is not granted) and the
    database's name."""
    import psycopg2
    with connection.cursor() as cur:
        try:
            cur.execute("SELECT system_identifier::text FROM pg_control_system()")
            server = cur.fetchone()[0]
        except psycopg2.Error:
            connection.rollback()
            server = "%s:%s" % (connection.info.host, connection.info.port)
        cur.execute("SELECT current_database()")
        database = cur.fetchone()[0]
    connection.rollback()
    return server, database


def _cmd_ledger(args: argparse.Namespace) -> int:
    """``golconde ledger list|prune``: each listener prunes its own ledger rows only, so those of
    a destination or target removed or renamed stay; this lists every consumer with rows in each
    database and deletes a named one's (in transactions of ledger.PRUNE_CHUNK rows) where no
    listener of the configuration keeps a ledger under that name."""
    import json

    import psycopg2

    from . import ledger
    from .config import redact_dsn
    from .errors import printable
    from .listener import connect
    config = _load_config(args.config or default_config_path(), "golconde")
    prune = args.operation == "prune"
    if prune and not args.consumer:
        raise ConfigError("ledger prune: give --consumer NAME (golconde ledger list names them)")
    if not prune and (args.consumer or args.yes or args.older_than is not None):
        raise ConfigError("ledger list: --consumer, --older-than and --yes are prune's")
    older_than = args.older_than or 0.0
    report: List[Dict[str, Any]] = []
    reached: Dict[Tuple[str, str], Tuple[Dict[str, Any], Any, List[str]]] = {}
    for dsn, names in _ledger_databases(config):
        entry: Dict[str, Any] = {"database": redact_dsn(dsn), "error": None}
        conn = None
        try:
            conn = connect(dsn, "golconde ledger")
            key = _server_database(conn)
        except psycopg2.Error as exc:
            if conn is not None:
                conn.close()
            entry["error"] = str(exc).strip()
            report.append(entry)
            continue
        if key in reached:          # the same database under another spelling
            reached[key][2].extend(names)
            conn.close()
            continue
        reached[key] = (entry, conn, list(names))
        report.append(entry)
    found = 0
    skipped = []
    for entry, conn, names in reached.values():
        try:
            if not prune:
                entry["consumers"] = [
                    {"consumer": name, "rows": count, "oldest": oldest.isoformat(),
                     "newest": newest.isoformat(), "configured": name in names}
                    for name, count, oldest, newest in ledger.consumers(conn)]
            elif args.consumer in names:
                # its listener keeps its rows here, pruned after ledger_retention
                entry["skipped"] = "a listener of the configuration keeps its ledger here"
                skipped.append(entry["database"])
            else:
                entry["rows"] = ledger.prunable(conn, args.consumer, older_than)
                found += entry["rows"]
                if args.yes and entry["rows"]:
                    entry["deleted"] = ledger.prune(conn, args.consumer, older_than)[0]
            conn.rollback()
        except psycopg2.Error as exc:
            entry["error"] = str(exc).strip()
        finally:
            conn.close()
    failed = sum(1 for entry in report if entry["error"])
    if prune and not found and not failed and skipped:
        raise ConfigError("ledger prune: %s is a listener of the configuration, which prunes its own"
                          " rows (ledger_retention), in %s; no other database holds rows of it"
                          % (printable(args.consumer), ", ".join(skipped)))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for entry in report:
            if entry["error"]:
                print("%s: error: %s" % (entry["database"], entry["error"]))
            elif not prune:
                print(entry["database"] + (":" if entry["consumers"] else ": no ledger rows"))
                for row in entry["consumers"]:
                    print("  %s  %d rows, %s .. %s%s" % (
                        printable(row["consumer"]), row["rows"], row["oldest"], row["newest"],
                        "" if row["configured"] else "  (not in this configuration)"))
            elif entry.get("skipped"):
                print("%s: skipped: %s" % (entry["database"], entry["skipped"]))
            elif entry.get("rows"):
                print("%s: %s %d rows of %s" % (entry["database"],
                                                "deleted" if args.yes else "would delete",
                                                entry.get("deleted", entry["rows"]),
                                                printable(args.consumer)))
    if prune and not found and not failed:
        if not args.json:
            print("no ledger rows of %s%s to delete in the configuration's databases" % (
                printable(args.consumer), " older than %gs" % older_than if older_than else ""))
        return 0
    if prune and not args.yes:
        if not args.json:
            print("%d rows of %s in all; give --yes to delete them" % (found, printable(args.consumer)))
        return 2 if not failed else 1
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(admin_main())
