"""``check_golconde``: a Nagios (Icinga, Naemon...) plugin for golconded, built on nagiosplugin.

It polls the daemon's ``/stats`` (default) or ``/health`` (``--health``) and judges each listener
thread (``<destination>`` and ``<destination>_<target>``):

* connection state: a broker or database connection that is not ``connected`` is CRITICAL;
* problems: each standing problem a listener lists (``problems`` in ``/stats``) is CRITICAL;
* ``lag`` (seconds) against ``--lag-warning`` / ``--lag-critical``;
* ``backlog`` (packets) against ``--backlog-warning`` / ``--backlog-critical``;
* ``errors``: errors counted since the previous check (``/stats`` only; the totals are kept in a
  state file, ``--state-file``), against ``--errors-warning`` / ``--errors-critical``;
* ``unmatched``, of targets only: the updates and deletes a target applied without finding their
  row since the previous check (``/stats`` only; kept in the state file too), against
  ``--unmatched-warning`` / ``--unmatched-critical``. The canonical relation had that row: the
  target has diverged (a row deleted there by hand, an add dead-lettered). A destination's
  unmatched packets are a client's changes the canonical relation did not match, not a
  divergence: not judged.

Thresholds are Nagios ranges (``10`` alerts above 10, ``5:20`` outside 5..20, ``@5:20`` inside,
``~:`` never; ``--X-warning ''``: no threshold); ``-w LAG,BACKLOG,ERRORS,UNMATCHED`` and
``-c LAG,BACKLOG,ERRORS,UNMATCHED`` set them at once (an empty or missing part keeps the default).
``errors`` and ``unmatched`` are events, OK again at the next check: the service wants
``max_check_attempts 1`` and ``is_volatile 1`` (docs/operations.md).
Plugin conventions: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; one status line with performance
data ``'label'=value[UOM];warn;crit;min;max``; the daemon not answering is
CRITICAL, a timeout (``-t``) or an unreadable answer UNKNOWN. Example::

    $ check_golconde -H 127.0.0.1 -p 8080 --lag-warning 30 --lag-critical 300
    GOLCONDE OK - 3 listeners connected, max lag 0.1s, max backlog 0, 0 new errors, 0 new unmatched | ...
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import nagiosplugin

from . import __version__

#: Defaults of the thresholds (Nagios ranges; "": none): lag in seconds, backlog in packets, new
#: errors, new unmatched packets at a target (any warns: the target has diverged).
DEFAULTS = {"lag": ("30", "300"), "backlog": ("1000", "10000"), "errors": ("0", "10"),
            "unmatched": ("0", "")}
METRICS = ("lag", "backlog", "errors", "unmatched")


class DaemonUnreachable(Exception):
    """The daemon did not answer (connection refused, no route...): CRITICAL."""


def fetch(url: str, timeout: float) -> Tuple[int, Any]:
    """(HTTP status, decoded JSON body) of ``GET url``; 4xx/5xx answers are returned too.

    :raises nagiosplugin.Timeout: no answer within ``timeout`` seconds.
    :raises DaemonUnreachable: cannot connect.
    :raises ValueError: the body is not JSON.
    """
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
    except (socket.timeout, TimeoutError):
        raise nagiosplugin.Timeout("%gs" % timeout) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError)):
            raise nagiosplugin.Timeout("%gs" % timeout) from None
        raise DaemonUnreachable("cannot connect to %s: %s" % (url, exc.reason)) from None
    except OSError as exc:
        raise DaemonUnreachable("cannot read %s: %s" % (url, exc)) from None
    try:
        return status, json.loads(body)
    except ValueError:
        raise ValueError("%s did not answer JSON (HTTP %d)" % (url, status)) from None


def new_counts(threads: Dict[str, int], previous: Optional[Dict[str, int]]) -> Dict[str, int]:
    """A counter (errors, unmatched) of each thread since the previous check: ``current -
    previous``; the current total when the counter went down (the daemon restarted); 0 without a
    previous value."""
    previous = previous or {}
    result = {}
    for name, total in threads.items():
        before = previous.get(name)
        if before is None:
            result[name] = 0
        else:
            result[name] = total - before if total >= before else total
    return result


class Listeners(nagiosplugin.Resource):
    """The daemon's listener threads, as metrics (see the module docstring).

    :param base_url: ``http://host:port`` of the daemon's HTTP server.
    :param timeout: seconds for the HTTP request.
    :param state_file: where the totals of errors and of unmatched packets are kept between
        checks (``None``: not kept).
    :param health: poll ``/health`` instead of ``/stats``.
    """

    def __init__(self, base_url: str, timeout: float, state_file: Optional[str],
                 health: bool = False) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.state_file = state_file
        self.health = health

    @property
    def name(self) -> str:
        return "GOLCONDE"

    def probe(self) -> List[nagiosplugin.Metric]:
        """The metrics; a daemon that does not answer is one ``daemon`` metric (CRITICAL).

        :raises nagiosplugin.CheckError: an unexpected answer (UNKNOWN).
        :raises nagiosplugin.Timeout: no answer in time (UNKNOWN).
        """
        try:
            if self.health:
                status, document = fetch(self.base_url + "/health", self.timeout)
                return list(self.health_metrics(status, document))
            status, document = fetch(self.base_url + "/stats", self.timeout)
            if status != 200 or not isinstance(document, dict) or "threads" not in document:
                raise ValueError("unexpected answer from %s/stats (HTTP %d)" % (self.base_url, status))
            threads = [(name, stats) for entry in document["threads"] for name, stats in entry.items()]
            new = {}
            with nagiosplugin.Cookie(self.state_file) as cookie:
                # the errors' totals under the URL, as kept before unmatched was
                for counter, key in (("errors", self.base_url),
                                     ("unmatched", self.base_url + " unmatched")):
                    totals = {name: int(stats.get(counter) or 0) for name, stats in threads
                              if counter != "unmatched" or _judges_unmatched(stats)}
                    new[counter] = new_counts(totals, cookie.get(key))
                    cookie[key] = totals
            return list(self.stats_metrics(threads, new["errors"], new["unmatched"]))
        except DaemonUnreachable as exc:
            return [nagiosplugin.Metric("daemon", str(exc), context="daemon")]
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise nagiosplugin.CheckError(str(exc)) from None

    @staticmethod
    def stats_metrics(threads: Sequence[Tuple[str, Dict[str, Any]]], errors: Dict[str, int],
                      unmatched: Optional[Dict[str, int]] = None) -> Iterator[nagiosplugin.Metric]:
        """Metrics of ``/stats`` threads: state, standing problems, lag (s), backlog (packets,
        when known), new errors (``errors``: thread name -> errors since the last check) and, for
        targets, new unmatched packets (``unmatched``: thread name -> the same).

        :raises ValueError: the daemon reports no listener thread."""
        if not threads:
            raise ValueError("the daemon reports no listener thread")
        for name, stats in threads:
            yield _state_metric(name, stats.get("broker"), stats.get("database"))
            for problem in stats.get("problems") or ():
                yield nagiosplugin.Metric("%s problem" % name, problem, context="problem")
            if stats.get("lag") is not None:
                yield nagiosplugin.Metric("%s lag" % name, round(float(stats["lag"]), 3), "s",
                                          min=0, context="lag")
            if stats.get("backlog") is not None:
                yield nagiosplugin.Metric("%s backlog" % name, int(stats["backlog"]), min=0,
                                          context="backlog")
            yield nagiosplugin.Metric("%s errors" % name, errors.get(name, 0), min=0,
                                      context="errors")
            if _judges_unmatched(stats):
                yield nagiosplugin.Metric("%s unmatched" % name, (unmatched or {}).get(name, 0),
                                          min=0, context="unmatched")

    @staticmethod
    def health_metrics(status: int, document: Any) -> Iterator[nagiosplugin.Metric]:
        """Metrics of a ``/health`` answer (``status``: its HTTP status, ``document``: its JSON):
        its verdict, and each listener's state, lag (s), backlog (packets).

        :raises ValueError: the status is neither 200 nor 503, or the document is no object."""
        if status not in (200, 503) or not isinstance(document, dict):
            raise ValueError("unexpected answer from /health (HTTP %d)" % status)
        reasons = document.get("reasons") or []
        listeners = document.get("listeners") or {}
        yield nagiosplugin.Metric("health", "; ".join(reasons) if status == 503 else "ok",
                                  context="health")
        # the connection states are among the reasons: counted here, not judged twice
        yield nagiosplugin.Metric("listeners", len(listeners), context="null")
        for name, listener in listeners.items():
            if listener.get("lag") is not None:
                yield nagiosplugin.Metric("%s lag" % name, round(float(listener["lag"]), 3), "s",
                                          min=0,
                                          context="lag")
            if listener.get("backlog") is not None:
                yield nagiosplugin.Metric("%s backlog" % name, int(listener["backlog"]), min=0,
                                          context="backlog")


def _judges_unmatched(stats: Dict[str, Any]) -> bool:
    """Whether a thread's unmatched packets are judged: a target's, from a daemon that counts
    them (an older one has no ``unmatched``: no figure rather than a false 0)."""
    return stats.get("role") == "target" and "unmatched" in stats


def _state_metric(name: str, broker: Any, database: Any) -> nagiosplugin.Metric:
    problems = ["%s %s" % (what, state) for what, state in (("broker", broker), ("database", database))
                if state != "connected"]
    return nagiosplugin.Metric("%s state" % name, ", ".join(problems) or "connected",
                               context="connection")


class ConnectionContext(nagiosplugin.Context):
    """CRITICAL when a listener's broker or database connection is not ``connected``."""

    def __init__(self) -> None:
        super().__init__("connection")

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        listener = metric.name[:-len(" state")]
        if metric.value == "connected":
            return self.result_cls(nagiosplugin.Ok, None, metric)
        return self.result_cls(nagiosplugin.Critical, "%s: %s" % (listener, metric.value))


class ProblemContext(nagiosplugin.Context):
    """CRITICAL for each standing problem a listener lists in ``/stats`` (the metric's value is
    its text; :meth:`golconde.stats.ThreadStats.set_problem`)."""

    def __init__(self) -> None:
        super().__init__("problem")

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        return self.result_cls(nagiosplugin.Critical, "%s: %s" % (metric.name[:-len(" problem")],
                                                                  metric.value))


class DaemonContext(nagiosplugin.Context):
    """CRITICAL: the daemon did not answer (the metric's value says why)."""

    def __init__(self) -> None:
        super().__init__("daemon")

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        return self.result_cls(nagiosplugin.Critical, str(metric.value))


class HealthContext(nagiosplugin.Context):
    """CRITICAL when ``/health`` answered 503 (the metric's value is then its reasons)."""

    def __init__(self) -> None:
        super().__init__("health")

    def evaluate(self, metric: nagiosplugin.Metric, resource: Any) -> nagiosplugin.Result:
        if metric.value == "ok":
            return self.result_cls(nagiosplugin.Ok, None, metric)
        return self.result_cls(nagiosplugin.Critical, "unhealthy: %s" % metric.value)


class Summary(nagiosplugin.Summary):
    """One status line: a digest when all is well, else every problem."""

    def ok(self, results: nagiosplugin.Results) -> str:
        def values(context: str) -> List[Any]:
            return [r.metric.value for r in results if r.metric and r.metric.context == context]
        lags, backlogs, errors = values("lag"), values("backlog"), values("errors")
        unmatched = values("unmatched")
        if values("health"):
            parts = ["healthy, %d listeners" % sum(values("null"))]
        else:
            parts = ["%d listeners connected" % len(values("connection"))]
        if lags:
            parts.append("max lag %ss" % (("%.3f" % max(lags)).rstrip("0").rstrip(".") or "0"))
        if backlogs:
            parts.append("max backlog %d" % max(backlogs))
        if not values("health"):
            parts.append("%d new errors" % sum(errors))
        if unmatched:
            parts.append("%d new unmatched" % sum(unmatched))
        return ", ".join(parts)

    def problem(self, results: nagiosplugin.Results) -> str:
        problems = [r for r in results if r.state != nagiosplugin.Ok]
        problems.sort(key=lambda r: -r.state.code if r.state.code != 3 else -1.5)
        return "; ".join(str(r) for r in problems)


def _thresholds(args: argparse.Namespace) -> Dict[str, Tuple[str, str]]:
    """(warning, critical) range per metric: explicit options, then -w/-c parts, then defaults."""
    result = {}
    for level, combined in (("warning", args.warning), ("critical", args.critical)):
        if combined and len(combined.split(",")) > len(METRICS):
            raise ValueError("invalid %s ranges %r: at most %d, comma-separated (%s)"
                             % (level, combined, len(METRICS), ",".join(m.upper() for m in METRICS)))
    for index, metric in enumerate(METRICS):
        pair = []
        for level, combined in ((0, args.warning), (1, args.critical)):
            explicit = getattr(args, "%s_%s" % (metric, ("warning", "critical")[level]))
            parts = combined.split(",") if combined else []
            from_combined = parts[index].strip() if index < len(parts) else ""
            spec = explicit if explicit is not None else from_combined or DEFAULTS[metric][level]
            try:
                nagiosplugin.Range(spec)
            except ValueError:
                raise ValueError("invalid %s %s range %r (expected e.g. 10, 5:20, ~:10 or @5:20)"
                                 % (metric, ("warning", "critical")[level], spec)) from None
            pair.append(spec)
        result[metric] = (pair[0], pair[1])
    return result


def default_state_file(base_url: str) -> str:
    """``$XDG_CACHE_HOME/check_golconde/<hash of url>.state`` (else ``~/.cache/...``; the
    temporary directory when that cannot be created)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(cache, "check_golconde")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        directory = tempfile.gettempdir()
    digest = hashlib.sha256(base_url.encode("utf-8")).hexdigest()[:16]
    return os.path.join(directory, "check_golconde-%s.state" % digest)


class _Parser(argparse.ArgumentParser):
    """Usage errors are UNKNOWN (exit 3), on standard output as Nagios reads it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(3, "GOLCONDE UNKNOWN - %s (see --help)\n" % message)

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
        if message:
            sys.stdout.write(message)
        raise SystemExit(status)


def _port(text: str) -> int:
    """A TCP port, 1-65535 (0 or 99999 read as a daemon that is down: CRITICAL)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a TCP port, got %r" % text) from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("expected a TCP port 1-65535, got %r" % text)
    return value


def _url(text: str) -> str:
    """A base URL: http or https, with a host and a port (if any) of 1-65535."""
    import urllib.parse
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or port == 0
            or parts.netloc.endswith(":") or parts.query or parts.fragment):
        raise argparse.ArgumentTypeError("expected an http:// or https:// URL with a host (and a"
                                         " port 1-65535; no query or fragment: /stats is"
                                         " appended), got %r" % text)
    return text


def _positive(text: str) -> float:
    """A number of seconds above 0 (0 would make the socket non-blocking: every check fails)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of seconds, got %r" % text) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("expected a number of seconds above 0, got %r" % text)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="check_golconde", description="Nagios plugin: lag, backlog, errors, targets' unmatched "
        "packets and connection state of a golconded, from its HTTP server.",
        epilog="Thresholds are Nagios ranges. Exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.")
    parser.add_argument("-H", "--host", default="127.0.0.1",
                        help="daemon's HTTP address (default %(default)s)")
    parser.add_argument("-p", "--port", type=_port, default=8080,
                        help="daemon's HTTP port (default %(default)s)")
    parser.add_argument("-u", "--url", type=_url,
                        help="base URL instead of -H/-p, e.g. http://db1:8080")
    parser.add_argument("--health", action="store_true", help="poll /health instead of /stats")
    parser.add_argument("-w", "--warning",
                        help="warning ranges LAG,BACKLOG,ERRORS,UNMATCHED (e.g. 30,1000,0,0)")
    parser.add_argument("-c", "--critical",
                        help="critical ranges LAG,BACKLOG,ERRORS,UNMATCHED (e.g. 300,10000,10,100)")
    for metric, unit in (("lag", "seconds"), ("backlog", "packets"), ("errors", "new errors"),
                         ("unmatched", "new unmatched packets (targets only)")):
        for level, index in (("warning", 0), ("critical", 1)):
            parser.add_argument("--%s-%s" % (metric, level), metavar="RANGE",
                                help="%s range of the %s, in %s (default %s)"
                                     % (level, metric, unit, DEFAULTS[metric][index] or "none"))
    parser.add_argument("-t", "--timeout", type=_positive, default=10.0,
                        help="seconds before giving up, UNKNOWN (default %(default)s)")
    parser.add_argument("--state-file", help="where the totals of errors and unmatched packets are"
                        " kept between checks "
                        "(default: under ~/.cache/check_golconde/)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    parser.add_argument("-V", "--version", action="version", version="check_golconde " + __version__)
    return parser


def make_check(args: argparse.Namespace) -> nagiosplugin.Check:
    """The nagiosplugin Check for parsed arguments."""
    base_url = args.url or ("http://[%s]:%d" if ":" in args.host else "http://%s:%d") % (args.host, args.port)
    thresholds = _thresholds(args)
    return nagiosplugin.Check(
        Listeners(base_url, args.timeout, args.state_file or default_state_file(base_url),
                  health=args.health),
        nagiosplugin.ScalarContext("lag", *thresholds["lag"], fmt_metric="{name} {valueunit}"),
        nagiosplugin.ScalarContext("backlog", *thresholds["backlog"], fmt_metric="{name} {value}"),
        nagiosplugin.ScalarContext("errors", *thresholds["errors"], fmt_metric="{name} {value} new"),
        nagiosplugin.ScalarContext("unmatched", *thresholds["unmatched"],
                                   fmt_metric="{name} {value} new"),
        ConnectionContext(), ProblemContext(), HealthContext(), DaemonContext(), Summary())


@nagiosplugin.guarded(verbose=0)
def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of ``check_golconde``: prints one status line and exits 0-3."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check = make_check(args)
    except ValueError as exc:   # a malformed range
        parser.exit(3, "GOLCONDE UNKNOWN - %s\n" % exc)
    # the HTTP request gives up after --timeout (UNKNOWN); the alarm is a backstop
    check.main(verbose=args.verbose, timeout=max(int(args.timeout) + 1, 1))
