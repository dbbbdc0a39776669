"""Configuration: YAML -> validated, frozen objects that the rest of Golconde receives.

Shape (the 2009 keys, plus those marked NEW)::

    Locations:  {...}                                # optional, free-form (kept for compatibility)
    Logging:    {filename, filemode, format, datefmt, level, handler}   # optional, checked;
                                    # level debug..critical; NEW handler: stderr|file|syslog|journald
    HTTPServer: {enabled: true, listen: 127.0.0.1, port: 8080,            # optional
                 health: {max_backlog: 10000, max_lag: 300}}  # NEW: /health thresholds (packets, s)
    Broker:     {login, passcode, heartbeat: 10000 (ms, 0 = off), vhost}  # NEW, optional
    Defaults:   {prefetch: 1500, batch_size: 500, max_retries: 5,         # NEW, optional
                 batch_bytes: 4194304,       # bytes of packets per batch (1024-268435456)
                 ledger_retention: 604800}   # s a packet id stays in the ledger (>= 60)
    Destinations:                                    # required, at least one
      <name>:                                        # [A-Za-z0-9_.-]+
        stomp: host:port            pgsql: <libpq DSN>     target: [schema.]relation
        queue: /queue/...           # required in client mode; trigger mode: /queue/golconde.<name>
        mode: client | trigger      function_name: AutoSQL | dotted.path (alias: handler)
        dead_letter_queue           # default <queue>.dlq
        settings: {...}             # free-form, given to the handler
        login, passcode, prefetch, batch_size, batch_bytes, max_retries, ledger_retention,
        poll_interval (s, trigger mode; 0.05)
        batch_linger (s, trigger mode; 0.02): NEW, how long a batch that was not full may
            gather more packets before the next fetch (0-1; 0 = fetch again at once)
        (poll_interval and batch_linger are refused in client mode, where they would do nothing)
        reply_queues: [pattern, ...]: NEW, client mode only: the queues a sender's reply-to may
            name (fnmatch patterns such as /queue/app.replies.*); default: any queue that is
            not one of the configuration's (see destination.ClientDestination.send_replies)
        Targets: {<name>: {stomp, queue, pgsql, target, function_name | handler, dead_letter_queue,
                           settings, login, passcode, prefetch, batch_size, batch_bytes,
                           max_retries, ledger_retention,
                           columns, exclude, constants, defaults, filter}}   # NEW: golconde.mapping

login, passcode, prefetch, batch_size, batch_bytes, max_retries and ledger_retention are inherited
target -> destination -> ``Broker``/``Defaults`` -> built-in default. Queues must be durable queues
(``/queue/...`` or ``/amq/queue/...``) and each destination and target needs its own.

Secrets may stay out of the YAML (NEW): instead of ``passcode`` (``Broker``, destinations,
targets) give ``passcode_env: VAR`` or ``passcode_file: path``; for the database password of a
destination or target give ``pgsql_password_env: VAR`` or ``pgsql_password_file: path``, merged
into ``pgsql`` as ``password=...`` at load time. Relative paths start at the configuration file's
directory; trailing line breaks of a file are dropped. A variable that is not set, or a file that
cannot be read, is a problem naming the key path; secrets never appear in repr, ``public_view``,
logs or error messages.

:func:`load` and :func:`parse` raise :class:`~golconde.errors.ConfigError` listing every problem,
one per line, as ``<key path>: <what was wrong>``; the exception also carries ``problems`` (a tuple
of those lines) and ``source``.
"""
import difflib
import fnmatch
import ipaddress
import logging
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Type

import psycopg2
import psycopg2.extensions
import yaml
from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from . import ledger
from .errors import ConfigError
from .mapping import MAPPING_KEYS, TargetMapping, parse_mapping
from .schema import parse_relation

DEFAULT_HANDLER = "AutoSQL"
DEFAULT_HTTP_LISTEN = "127.0.0.1"
DEFAULT_HTTP_PORT = 8080
DEFAULT_HEARTBEAT_MS = 10000
DEFAULT_PREFETCH = 1500
DEFAULT_BATCH_SIZE = 500
#: Bytes of packets (their JSON as received or queued) a batch holds at most; a larger packet or
#: message is taken alone. The inbox of a listener holds at most twice this (see listener.Inbox).
DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_RETRIES = 5
DEFAULT_POLL_INTERVAL = 0.05
DEFAULT_BATCH_LINGER = 0.02
#: Destination settings of trigger mode only: a client-mode destination that sets one is refused.
TRIGGER_ONLY = ("poll_interval", "batch_linger")
#: What a reply-to, and so a ``reply_queues`` pattern, may name: one queue (no comma: ActiveMQ's
#: composite destinations), under a prefix both brokers read as a queue.
REPLY_TO_RE = re.compile(r"/(?:queue|amq/queue|temp-queue|reply-queue)/[^\s,]+")
DEFAULT_LEDGER_RETENTION = float(ledger.DEFAULT_RETENTION)
MODES = ("client", "trigger")
LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_HANDLERS = ("stderr", "file", "syslog", "journald")
DEFAULT_HEALTH_MAX_BACKLOG = 10000
DEFAULT_HEALTH_MAX_LAG = 300.0

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
QUEUE_RE = re.compile(r"/(?:amq/)?queue/\S+")
_IDENT = r'(?:[^\W\d][\w$]*|"(?:[^"]|"")+")'
RELATION_RE = re.compile(r"%s(?:\.%s)?" % (_IDENT, _IDENT))
HANDLER_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_SECRET_KEY_RE = re.compile(r"pass(?:word|code|wd|phrase)|^pass$|secret|token|credential|"
                            r"api[_-]?key|private[_-]?key", re.IGNORECASE)
_DSN_SECRET_RE = re.compile(r"password\s*=|://[^/@\s]*:[^/@\s]*@", re.IGNORECASE)
_DSN_SECRET_KEYS = ("password", "sslpassword")


class FrozenDict(dict):
    """A read-only, hashable ``dict`` (free-form mappings: ``settings``, ``Logging``...)."""

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("configuration mappings are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (dict(self),))


def freeze(value: Any) -> Any:
    """Deep copy of a YAML value with mappings as :class:`FrozenDict`, lists as tuples."""
    if isinstance(value, Mapping):
        return FrozenDict((key, freeze(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(freeze(item) for item in value)
    return value


def redact_dsn(dsn: str) -> str:
    """``dsn`` (libpq ``key=value`` string or ``postgresql://`` URI) as a ``key=value`` string with
    any password replaced by ``***``; ``<unparsable DSN>`` if libpq cannot parse it."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except (psycopg2.Error, TypeError):
        return "<unparsable DSN>"
    for key in _DSN_SECRET_KEYS:
        if key in params:
            params[key] = "***"
    return psycopg2.extensions.make_dsn(**params)


def _public(value: Any) -> Any:
    """JSON-able copy of a free-form value, secret-looking keys masked and DSNs redacted."""
    if isinstance(value, Mapping):
        return {str(key): "***" if _SECRET_KEY_RE.search(str(key)) else _public(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_public(item) for item in value]
    if isinstance(value, str):
        return redact_dsn(value) if _DSN_SECRET_RE.search(value) else value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


class _SafeRepr:
    """``repr()`` of the dataclass fields with DSNs redacted and free-form mappings scrubbed."""

    def __repr__(self) -> str:
        parts = []
        for item in fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if item.name == "pgsql":
                value = redact_dsn(value)
            elif isinstance(value, Mapping):
                value = _public(value)
            parts.append("%s=%r" % (item.name, value))
        return "%s(%s)" % (type(self).__name__, ", ".join(parts))


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how a listener connects to the STOMP broker (``passcode`` is kept out of repr)."""

    host: str
    port: int
    login: Optional[str] = None
    passcode: Optional[str] = field(default=None, repr=False)
    vhost: Optional[str] = None
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS

    @property
    def address(self) -> str:
        """``host:port`` (``[host]:port`` for an IPv6 address)."""
        return ("[%s]:%d" if ":" in self.host else "%s:%d") % (self.host, self.port)


@dataclass(frozen=True, repr=False)
class TargetConfig(_SafeRepr):
    """A target: consumes ``queue`` and applies packets to ``target`` in ``pgsql``.
    ``dead_letter_queue=None`` means ``<queue>.dlq``; ``settings`` is frozen on construction."""

    name: str
    destination: str
    stomp: BrokerConfig
    queue: str
    dead_letter_queue: Optional[str]
    pgsql: str
    target: str
    function_name: str = DEFAULT_HANDLER
    settings: Mapping[str, Any] = field(default_factory=FrozenDict)
    prefetch: int = DEFAULT_PREFETCH
    batch_size: int = DEFAULT_BATCH_SIZE
    #: bytes of packets per batch at most (one larger message or queued packet goes alone)
    batch_bytes: int = DEFAULT_BATCH_BYTES
    max_retries: int = DEFAULT_MAX_RETRIES
    #: seconds a packet id stays in the ledger (golconde.ledger.prune)
    ledger_retention: float = DEFAULT_LEDGER_RETENTION
    #: columns/exclude/constants/defaults/filter (:class:`golconde.mapping.TargetMapping`), or None
    mapping: Optional[TargetMapping] = None

    def __post_init__(self) -> None:
        if self.dead_letter_queue is None:
            object.__setattr__(self, "dead_letter_queue", self.queue + ".dlq")
        object.__setattr__(self, "settings", freeze(self.settings or {}))

    @property
    def thread_name(self) -> str:
        """``<destination>_<target>``, the 2009 thread (and stats) name."""
        return "%s_%s" % (self.destination, self.name)


@dataclass(frozen=True, repr=False)
class DestinationConfig(_SafeRepr):
    """A destination: applies packets to its canonical relation, then fans them out to ``targets``.
    In ``trigger`` mode the canonical relation's trigger produces the packets."""

    name: str
    mode: str
    stomp: BrokerConfig
    queue: str
    dead_letter_queue: Optional[str]
    pgsql: str
    target: str
    function_name: str = DEFAULT_HANDLER
    settings: Mapping[str, Any] = field(default_factory=FrozenDict)
    prefetch: int = DEFAULT_PREFETCH
    batch_size: int = DEFAULT_BATCH_SIZE
    #: bytes of packets per batch at most (one larger message or queued packet goes alone)
    batch_bytes: int = DEFAULT_BATCH_BYTES
    max_retries: int = DEFAULT_MAX_RETRIES
    ledger_retention: float = DEFAULT_LEDGER_RETENTION
    poll_interval: float = DEFAULT_POLL_INTERVAL
    #: trigger mode: seconds a batch that was not full lets packets gather before the next fetch
    batch_linger: float = DEFAULT_BATCH_LINGER
    targets: Tuple[TargetConfig, ...] = ()
    #: client mode: fnmatch patterns of the queues replies may go to (None: any queue that is
    #: not one of the configuration's); see :func:`reply_allowed`
    reply_queues: Optional[Tuple[str, ...]] = None

    def __post_init__(self) -> None:
        TargetConfig.__post_init__(self)  # type: ignore[arg-type]
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def thread_name(self) -> str:
        """The destination's name."""
        return self.name


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of ``GET /health``: it answers 503 when a listener's backlog is over
    ``max_backlog`` packets or its lag over ``max_lag`` seconds."""

    max_backlog: int = DEFAULT_HEALTH_MAX_BACKLOG
    max_lag: float = DEFAULT_HEALTH_MAX_LAG


@dataclass(frozen=True)
class HTTPConfig:
    """The statistics HTTP server."""

    enabled: bool = True
    listen: str = DEFAULT_HTTP_LISTEN
    port: int = DEFAULT_HTTP_PORT
    health: HealthConfig = field(default_factory=HealthConfig)


@dataclass(frozen=True, repr=False)
class Config(_SafeRepr):
    """The whole configuration. ``logging`` is the ``Logging`` section (``level`` upper-cased,
    e.g. ``"DEBUG"``), ``locations`` the free-form ``Locations``, ``source`` the file it came
    from; free-form mappings are :class:`FrozenDict`."""

    logging: Mapping[str, Any]
    http: HTTPConfig
    locations: Mapping[str, Any]
    destinations: Tuple[DestinationConfig, ...]
    source: str = "<string>"

    def public_view(self) -> Dict[str, Any]:
        """The configuration as a JSON-able dict in the YAML's shape, with defaults applied,
        passcodes removed, DSN passwords and secret-looking free-form values replaced by ``***``."""
        return {"Locations": _public(self.locations), "Logging": _public(self.logging),
                "HTTPServer": {"enabled": self.http.enabled, "listen": self.http.listen,
                               "port": self.http.port,
                               "health": {"max_backlog": self.http.health.max_backlog,
                                          "max_lag": self.http.health.max_lag}},
                "Destinations": {d.name: _listener_view(d) for d in self.destinations}}


def _listener_view(item: Any) -> Dict[str, Any]:
    """JSON-able view of a destination or target: no passcode, DSN redacted."""
    view = dict(stomp=item.stomp.address, login=item.stomp.login, vhost=item.stomp.vhost,
                heartbeat=item.stomp.heartbeat_ms, queue=item.queue,
                dead_letter_queue=item.dead_letter_queue, pgsql=redact_dsn(item.pgsql),
                target=item.target, function_name=item.function_name,
                settings=_public(item.settings), prefetch=item.prefetch,
                batch_size=item.batch_size, batch_bytes=item.batch_bytes,
                max_retries=item.max_retries,
                ledger_retention=item.ledger_retention)
    if getattr(item, "mapping", None):
        view.update(_public(item.mapping.as_config()))
    if isinstance(item, DestinationConfig):
        view.update(mode=item.mode, poll_interval=item.poll_interval, batch_linger=item.batch_linger,
                    reply_queues=None if item.reply_queues is None else list(item.reply_queues),
                    Targets={target.name: _listener_view(target) for target in item.targets})
    return view


# --- validation of the raw YAML values (pydantic) ------------------------------------------------

def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple, set)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(message: str) -> None:
    raise PydanticCustomError("golconde", "{msg}", {"msg": message})


def _text(secret: bool) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not (secret or value.strip()):
            _fail("expected a string" if secret else  # never show a secret
                  "expected a non-empty string, got %s" % _show(value))
        return value if secret else value.strip()
    return check


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
            try:
                value = int(value)
            except ValueError:          # more digits than Python converts (sys.int_info)
                _fail("expected an integer %d-%d, got %s" % (low, high, _show(value)))
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            _fail("expected an integer %d-%d, got %s" % (low, high, _show(value)))
        return value
    return check


def _seconds_check(within: Callable[[float], bool], text: str) -> Callable[[Any], float]:
    """A check of a number of seconds that ``within`` accepts (``text`` says which ones)."""
    def check(value: Any) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError, OverflowError):     # OverflowError: an int beyond float
            number = math.nan
        if not within(number):          # NaN is within nothing
            _fail("expected a number of seconds %s, got %s" % (text, _show(value)))
        return number
    return check


_seconds = _seconds_check(lambda n: 0 < n <= 3600, "> 0 and <= 3600")
_lag_seconds = _seconds_check(lambda n: 0 < n <= 604800, "> 0 and <= 604800 (a week)")
_linger_seconds = _seconds_check(lambda n: 0 <= n <= 1, ">= 0 and <= 1")
_retention_seconds = _seconds_check(lambda n: 60 <= n <= 31536000, ">= 60 and <= 31536000 (a year)")


def _boolean(value: Any) -> bool:
    words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    if not isinstance(value, bool):
        _fail("expected true or false, got %s" % _show(value))
    return value


def _choice(options: Tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in options:
            _fail("expected one of %s, got %s" % (", ".join(options), _show(value)))
        return value.strip().lower()
    return check


def _pattern(regex: "re.Pattern[str]", expected: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value.strip()):
            _fail("expected %s, got %s" % (expected, _show(value)))
        return value.strip()
    return check


def _host_port(value: Any) -> Tuple[str, int]:
    host, sep, port = value.strip().rpartition(":") if isinstance(value, str) else ("", "", "")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or re.search(r"[\s/]", host) or not re.fullmatch(r"\d{1,5}", port):
        _fail("expected host:port, got %s" % _show(value))
    if not 1 <= int(port) <= 65535:
        _fail("expected host:port with a port 1-65535, got %s" % _show(value))
    return host, int(port)


def _listen(value: Any) -> str:
    """An address to listen on: an IP address, or a host name (RFC 1123 labels, the last not all
    digits: ``1.2.3.4.5`` is neither)."""
    host = value.strip() if isinstance(value, str) else ""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if (host and len(host) <= 253 and not labels[-1].isdigit()
            and all(re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label)
                    for label in labels)):
        return host
    _fail("expected an IP address (127.0.0.1, 0.0.0.0, ::1) or a host name, got %s" % _show(value))
    raise AssertionError("unreachable")


#: libpq connection parameters whose values libpq checks only when it connects (Source: the
#: PostgreSQL documentation, "Parameter Key Words", 34.1.2), checked here instead so that a wrong
#: file is refused before anything connects: whole numbers (a port: a list, one per host), and
#: the choices of the enumerated ones.
_DSN_NUMBER = r"\s*[+-]?\d+\s*"        # as libpq reads them (strtol: spaces and a sign)
_DSN_NUMBERS = {"port": r"\s*(\d{1,5})?\s*(,\s*(\d{1,5})?\s*)*", "connect_timeout": _DSN_NUMBER,
                "keepalives": _DSN_NUMBER, "keepalives_idle": _DSN_NUMBER,
                "keepalives_interval": _DSN_NUMBER, "keepalives_count": _DSN_NUMBER,
                "tcp_user_timeout": _DSN_NUMBER}
_DSN_CHOICES = {"sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
                "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby",
                                         "prefer-standby"),
                "gssencmode": ("disable", "prefer", "require")}


def _dsn(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail("expected a libpq DSN string ('host=... dbname=...' or a postgresql:// URI)")
    try:
        params = psycopg2.extensions.parse_dsn(value)
    except psycopg2.Error as exc:
        # libpq quotes part of the string in its message: keep it only for key=value strings
        # without a secret (a URI would be echoed whole, and "password=Super Secret" gives
        # 'missing "=" after "Secret"')
        reason = ("" if "://" in value or _DSN_SECRET_RE.search(value)
                  else ": " + str(exc).strip().splitlines()[0])
        _fail("expected a libpq DSN ('host=... dbname=...' or a postgresql:// URI), "
              "could not parse it" + reason)
    wrong = []      # every wrong parameter, not only the first
    for key, pattern in _DSN_NUMBERS.items():
        if key in params and not re.fullmatch(pattern, params[key]):
            wrong.append("DSN parameter %s must be a whole number%s, got %s"
                         % (key, " (or one per host, comma-separated)" if key == "port" else "",
                            _show(params[key])))
    for key, choices in _DSN_CHOICES.items():
        if key in params and params[key] not in choices:
            wrong.append("DSN parameter %s must be one of %s, got %s"
                         % (key, ", ".join(choices), _show(params[key])))
    if wrong:
        _fail("; ".join(wrong))
    return value.strip()


def _reply_queues(value: Any) -> Tuple[str, ...]:
    """A list of reply queue patterns (:func:`fnmatch.fnmatchcase`), each one queue's name
    (:data:`REPLY_TO_RE`) where ``*``, ``?`` and ``[...]`` may stand after a literal start.
    Refused: a pattern whose name starts with a wildcard (``/queue/*``, and ``/reply-queue/*``,
    which RabbitMQ reads as ``/queue/*``: every queue), and ``/temp-queue/`` ones, which no
    reply-to holds once the broker has rewritten it (RabbitMQ to ``/reply-queue/amq.gen-...``,
    ActiveMQ to ``/remote-temp-queue/...``)."""
    expected = ("a list of queue names or patterns such as /queue/app.replies.* (under /queue/,"
                " /amq/queue/ or /reply-queue/, no comma)")
    if not isinstance(value, (list, tuple)):
        _fail("expected %s, got %s" % (expected, _show(value)))
    wrong = [item for item in value if not isinstance(item, str) or not REPLY_TO_RE.fullmatch(item.strip())]
    if wrong:
        _fail("expected %s, got %s" % (expected, ", ".join(_show(item) for item in wrong[:5])))
    patterns = tuple(item.strip() for item in value)
    for pattern in patterns:
        prefix, name = pattern[1:].split("/", 1) if not pattern.startswith("/amq/queue/") \
            else ("amq/queue", pattern[len("/amq/queue/"):])
        if prefix == "temp-queue":
            _fail("%r: the broker rewrites a /temp-queue/ reply-to before golconded reads it"
                  " (RabbitMQ to /reply-queue/amq.gen-..., ActiveMQ to /remote-temp-queue/...):"
                  " for RabbitMQ's temporary queues list /reply-queue/amq.gen-*" % pattern)
        if name[:1] in "*?[":
            _fail("%r starts with a wildcard, so it may match any application's queues%s: start"
                  " it with a literal part (/queue/app.replies.*)"
                  % (pattern, " (RabbitMQ reads /reply-queue/x as /queue/x)"
                     if prefix == "reply-queue" else ""))
    return patterns


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail("expected a mapping, got %s" % _show(value))
    return value


def _field(check: Callable[[Any], Any], required: bool = False) -> Any:
    """Annotation running ``check`` on a YAML value; ``None`` (``key:`` with no value) means
    "not given" for an optional key and is an error for a required one."""
    def run(value: Any) -> Any:
        if value is None:
            if required:
                _fail("missing (the key has no value)")
            return None
        return check(value)
    return Annotated[Any, PlainValidator(run)]


QUEUE_TEXT = ("a queue name starting with /queue/ or /amq/queue/ (a durable queue: "
               "a topic would lose packets)")
_queue = _pattern(QUEUE_RE, QUEUE_TEXT)
Queue, RequiredQueue = _field(_queue), _field(_queue, required=True)
Handler = _field(_pattern(HANDLER_RE, "AutoSQL or a dotted path such as package.module.Handler"))
Relation = _field(_pattern(RELATION_RE, "[schema.]relation"), required=True)
HostPort, DSN = _field(_host_port, required=True), _field(_dsn, required=True)
Listen = _field(_listen)
OptString, OptSecret = _field(_text(secret=False)), _field(_text(secret=True))
OptMapping, RequiredMapping = _field(_mapping), _field(_mapping, required=True)
Bool, Mode, Seconds = _field(_boolean), _field(_choice(MODES)), _field(_seconds)
Linger = _field(_linger_seconds)
ReplyQueues = _field(_reply_queues)
Port, Heartbeat = _field(_integer(1, 65535)), _field(_integer(0, 3600000))
Prefetch, BatchSize = _field(_integer(1, 65535)), _field(_integer(1, 1000000))
#: at most 256 MiB: a listener's STOMP receiver reads no heart-beat while its inbox is full
BatchBytes = _field(_integer(1024, 256 * 1024 ** 2))
MaxRetries, Retention = _field(_integer(0, 1000000)), _field(_retention_seconds)
TargetOnly = _field(lambda value: _fail("a mapping key of targets only (columns, exclude, constants,"
                                        " defaults, filter); the canonical relation is not mapped"))
MaxBacklog, MaxLag = _field(_integer(0, 1000000000)), _field(_lag_seconds)


class _Raw(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _RawTop(_Raw):
    Locations: OptMapping = None
    Logging: OptMapping = None
    HTTPServer: OptMapping = None
    Broker: OptMapping = None
    Defaults: OptMapping = None
    Destinations: RequiredMapping


class _RawHTTP(_Raw):
    enabled: Bool = None
    listen: Listen = None
    port: Port = None
    health: OptMapping = None


class _RawHealth(_Raw):
    max_backlog: MaxBacklog = None
    max_lag: MaxLag = None


class _RawBroker(_Raw):
    login: OptString = None
    passcode: OptSecret = None
    passcode_env: OptString = None
    passcode_file: OptString = None
    heartbeat: Heartbeat = None
    vhost: OptString = None


class _RawDefaults(_Raw):
    prefetch: Prefetch = None
    batch_size: BatchSize = None
    batch_bytes: BatchBytes = None
    max_retries: MaxRetries = None
    ledger_retention: Retention = None


class _RawTarget(_Raw):
    stomp: HostPort
    queue: RequiredQueue
    pgsql: DSN
    target: Relation
    function_name: Handler = None
    handler: Handler = None
    dead_letter_queue: Queue = None
    settings: OptMapping = None
    login: OptString = None
    passcode: OptSecret = None
    passcode_env: OptString = None
    passcode_file: OptString = None
    pgsql_password_env: OptString = None
    pgsql_password_file: OptString = None
    prefetch: Prefetch = None
    batch_size: BatchSize = None
    batch_bytes: BatchBytes = None
    max_retries: MaxRetries = None
    ledger_retention: Retention = None
    columns: Any = None    # columns, exclude, constants, defaults, filter: checked by
    exclude: Any = None    # golconde.mapping.parse_mapping()
    constants: Any = None
    defaults: Any = None
    filter: Any = None


class _RawDestination(_RawTarget):
    queue: Queue = None  # required in client mode only: checked by _destination()
    columns: TargetOnly = None
    exclude: TargetOnly = None
    constants: TargetOnly = None
    defaults: TargetOnly = None
    filter: TargetOnly = None
    mode: Mode = None
    poll_interval: Seconds = None
    batch_linger: Linger = None
    reply_queues: ReplyQueues = None
    Targets: OptMapping = None


def _validate(model: Type[_Raw], data: Any, path: str, problems: List[str]) -> Optional[Any]:
    """``model`` validated from ``data`` (``None`` = empty); ``None`` with ``problems`` appended
    (``<path>.<key>: <message>``, unknown keys listing the accepted ones) if it is invalid."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append("%s: expected a mapping, got %s" % (path, _show(data)))
        return None
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        accepted = list(model.model_fields)
        for error in exc.errors(include_url=False):
            where = ".".join([path] * bool(path) + [str(part) for part in error["loc"]])
            if error["type"] == "extra_forbidden":
                message = _unknown_key(error["loc"][-1], accepted)
            elif error["type"] == "missing":
                message = "missing"
            else:
                message = error["msg"]
            problems.append("%s: %s" % (where, message))
        return None


def _unknown_key(key: Any, accepted: List[str]) -> str:
    """``unknown key (did you mean 'x'?); accepted keys: ...`` for ``key``, not in ``accepted``."""
    lower = {name.lower(): name for name in accepted}
    close = difflib.get_close_matches(str(key).lower(), list(lower), n=1, cutoff=0.6)
    return "unknown key%s; accepted keys: %s" % (
        " (did you mean %r?)" % lower[close[0]] if close else "", ", ".join(accepted))


def _pick(*values: Any) -> Any:
    """The first value that is not ``None`` (``None`` if there is none)."""
    return next((value for value in values if value is not None), None)


def _handler(raw: Any, path: str, problems: List[str]) -> str:
    if raw.function_name and raw.handler and raw.function_name != raw.handler:
        problems.append("%s.handler: %r conflicts with function_name %r; give only one of them"
                        % (path, raw.handler, raw.function_name))
    return _pick(raw.function_name, raw.handler, DEFAULT_HANDLER)


def _target_mapping(raw: Any, path: str, problems: List[str]) -> Optional[TargetMapping]:
    mapping, found = parse_mapping({key: getattr(raw, key) for key in MAPPING_KEYS}, path)
    problems.extend(found)
    return mapping


def _credentials(raw: Any, inherited: Tuple[Any, Any]) -> Tuple[Any, Any]:
    """(login, passcode) of the first level that sets either: they are inherited as a pair."""
    return inherited if raw.login is None and raw.passcode is None else (raw.login, raw.passcode)


def _secret(raw: Any, key: str, given: Any, path: str, problems: List[str],
            base_dir: str) -> Optional[str]:
    """The secret given inline (``given``), or read from the environment variable named by
    ``<key>_env`` or the file named by ``<key>_file`` (relative to ``base_dir``; trailing line
    breaks removed). Problems name the key path, the variable or the file, never the secret."""
    env, filename = getattr(raw, key + "_env"), getattr(raw, key + "_file")
    inline = "a password in pgsql" if key == "pgsql_password" else key
    given_keys = [name for name, value in ((inline, given), (key + "_env", env),
                                           (key + "_file", filename)) if value is not None]
    if len(given_keys) > 1:
        problems.append("%s.%s: give only one of %s" % (path, given_keys[1], ", ".join(given_keys)))
        return None
    if env is not None:
        value = os.environ.get(env)
        if not value:
            problems.append("%s.%s_env: environment variable %s is %s"
                            % (path, key, env, "empty" if value == "" else "not set"))
        return value or None
    if filename is not None:
        full = os.path.join(base_dir, os.path.expanduser(filename))
        try:
            with open(full, encoding="utf-8") as handle:
                value = handle.read().rstrip("\r\n")
        except OSError as exc:
            problems.append("%s.%s_file: cannot read %s: %s"
                            % (path, key, full, exc.strerror or type(exc).__name__))
            return None
        except UnicodeDecodeError:
            problems.append("%s.%s_file: %s is not UTF-8 text" % (path, key, full))
            return None
        if not value:
            problems.append("%s.%s_file: %s is empty" % (path, key, full))
        return value or None
    return given


def _with_secrets(raw: Any, path: str, problems: List[str], base_dir: str) -> Any:
    """``raw`` with ``passcode`` from ``passcode_env``/``passcode_file`` and, for a listener, the
    password from ``pgsql_password_env``/``pgsql_password_file`` merged into ``pgsql``."""
    if raw is None:
        return None
    update = {"passcode": _secret(raw, "passcode", raw.passcode, path, problems, base_dir)}
    if hasattr(raw, "pgsql_password_env") and raw.pgsql is not None:
        dsn_password = psycopg2.extensions.parse_dsn(raw.pgsql).get("password")
        password = _secret(raw, "pgsql_password", dsn_password, path, problems, base_dir)
        if password is not None and password != dsn_password:
            update["pgsql"] = psycopg2.extensions.make_dsn(raw.pgsql, password=password)
    return raw.model_copy(update=update)


def _valid_name(name: Any, path: str, problems: List[str]) -> bool:
    if isinstance(name, str) and NAME_RE.fullmatch(name):
        return True
    problems.append("%s: invalid name %s; expected letters, digits, '_', '.' or '-'"
                    % (path, _show(name)))
    return False


def _destination(name: Any, data: Any, broker: Any, defaults: Any,
                 problems: List[str], base_dir: str = "") -> Optional[DestinationConfig]:
    """One validated destination with its targets, or ``None`` if it has problems
    (``base_dir``: where relative ``*_file`` paths start)."""
    path = "Destinations.%s" % name
    before = len(problems)
    _valid_name(name, path, problems)
    raw = _with_secrets(_validate(_RawDestination, data, path, problems), path, problems, base_dir)
    if (isinstance(data, Mapping) and data.get("queue") is None
            and str(data.get("mode") or "client").strip().lower() == "client"):
        problems.append("%s.queue: missing (required in client mode)" % path)
    targets_data = data.get("Targets") if isinstance(data, Mapping) else None
    raw_targets = []
    if not isinstance(targets_data, Mapping):
        targets_data = {}  # the problem, if any, is reported by _validate()
    for target_name, target_data in targets_data.items():
        target_path = "%s.Targets.%s" % (path, target_name)
        if _valid_name(target_name, target_path, problems):
            raw_target = _with_secrets(_validate(_RawTarget, target_data, target_path, problems),
                                       target_path, problems, base_dir)
            if raw_target is not None:
                raw_targets.append((target_name, target_path, raw_target))
    if raw is None:
        return None
    mode = raw.mode or "client"
    if mode == "client":
        problems.extend("%s.%s: applies to trigger mode only (this destination is in client mode)"
                        % (path, setting) for setting in TRIGGER_ONLY if getattr(raw, setting) is not None)
    elif raw.reply_queues is not None:
        problems.append("%s.reply_queues: applies to client mode only (a trigger-mode destination"
                        " sends no replies)" % path)
    queue = _pick(raw.queue, "/queue/golconde.%s" % str(name).lower())
    function_name = _handler(raw, path, problems)
    credentials = _credentials(raw, _credentials(broker, (None, None)))
    prefetch = _pick(raw.prefetch, defaults.prefetch, DEFAULT_PREFETCH)
    batch_size = _pick(raw.batch_size, defaults.batch_size, DEFAULT_BATCH_SIZE)
    batch_bytes = _pick(raw.batch_bytes, defaults.batch_bytes, DEFAULT_BATCH_BYTES)
    max_retries = _pick(raw.max_retries, defaults.max_retries, DEFAULT_MAX_RETRIES)
    retention = _pick(raw.ledger_retention, defaults.ledger_retention, DEFAULT_LEDGER_RETENTION)

    def connection(host_port: Tuple[str, int], login_passcode: Tuple[Any, Any]) -> BrokerConfig:
        return BrokerConfig(host_port[0], host_port[1], *login_passcode, vhost=broker.vhost,
                            heartbeat_ms=_pick(broker.heartbeat, DEFAULT_HEARTBEAT_MS))

    targets = tuple(TargetConfig(
        name=target_name, destination=name, queue=target.queue,
        stomp=connection(target.stomp, _credentials(target, credentials)),
        dead_letter_queue=target.dead_letter_queue, pgsql=target.pgsql, target=target.target,
        function_name=_handler(target, target_path, problems), settings=target.settings or {},
        prefetch=_pick(target.prefetch, prefetch), batch_size=_pick(target.batch_size, batch_size),
        batch_bytes=_pick(target.batch_bytes, batch_bytes),
        max_retries=_pick(target.max_retries, max_retries),
        ledger_retention=_pick(target.ledger_retention, retention),
        mapping=_target_mapping(target, target_path, problems))
        for target_name, target_path, target in raw_targets)
    if len(problems) > before:
        return None
    return DestinationConfig(
        name=name, mode=mode, stomp=connection(raw.stomp, credentials), queue=queue,
        dead_letter_queue=raw.dead_letter_queue, pgsql=raw.pgsql, target=raw.target,
        function_name=function_name, settings=raw.settings or {}, prefetch=prefetch,
        batch_size=batch_size, batch_bytes=batch_bytes, max_retries=max_retries,
        ledger_retention=retention, poll_interval=_pick(raw.poll_interval, DEFAULT_POLL_INTERVAL),
        batch_linger=_pick(raw.batch_linger, DEFAULT_BATCH_LINGER), targets=targets,
        reply_queues=raw.reply_queues)


#: Keys of the ``Logging`` section: :func:`logging.basicConfig`'s that apply (the 2009 release
#: passed the section to the logging module), and ``handler``.
LOGGING_KEYS = ("filename", "filemode", "format", "datefmt", "level", "handler")


def _check_logging(section: Mapping[str, Any], problems: List[str]) -> None:
    """Problems of the ``Logging`` section's keys, ``format`` and ``filename`` (``level`` and
    ``handler`` are checked by the caller): what would otherwise fail only when the daemon starts
    logging (a format :class:`logging.Formatter` refuses or cannot fill, a file in a directory
    that does not exist, a directory)."""
    for key in section:
        if key not in LOGGING_KEYS:
            problems.append("Logging.%s: %s" % (key, _unknown_key(key, list(LOGGING_KEYS))))
    fmt = section.get("format")
    if fmt is not None:
        try:
            if not isinstance(fmt, str):
                raise TypeError("not text")
            record = logging.LogRecord("golconde", logging.INFO, __file__, 1, "message", None, None)
            logging.Formatter(fmt).format(record)   # raises on a bad format or an unknown field
        except (TypeError, ValueError, KeyError) as exc:
            problems.append("Logging.format: expected a logging format such as '%%(asctime)s"
                            " %%(message)s', got %s (%s)" % (_show(fmt), exc))
    if section.get("datefmt") is not None and not isinstance(section["datefmt"], str):
        problems.append("Logging.datefmt: expected a time.strftime format such as '%%H:%%M:%%S', got %s"
                        % _show(section["datefmt"]))
    if section.get("filemode") not in (None, "a", "w"):
        problems.append("Logging.filemode: expected 'a' (append) or 'w' (truncate at start), got %s"
                        % _show(section["filemode"]))
    filename = section.get("filename")
    if filename is not None:
        if not isinstance(filename, str) or not filename.strip():
            problems.append("Logging.filename: expected a file path, got %s" % _show(filename))
        elif os.path.isdir(filename):
            problems.append("Logging.filename: %s is a directory" % _show(filename))
        elif not os.path.isdir(os.path.dirname(os.path.abspath(filename))):
            problems.append("Logging.filename: the directory of %s does not exist" % _show(filename))


def _relation_key(dsn: str, relation: str) -> Tuple[Any, ...]:
    """Identity of a relation in a database: libpq parameters and the normalised relation name."""
    try:
        parsed = parse_relation(relation)
        names: Tuple[str, ...] = (parsed.schema, parsed.name)
    except ConfigError:        # reported where the relation is checked
        names = (relation,)
    return (frozenset(psycopg2.extensions.parse_dsn(dsn).items()), names)


def _cross_check(destinations: Tuple[DestinationConfig, ...], problems: List[str]) -> None:
    """Problems between listeners: shared queues, names, dead-letter queues, relations."""
    listeners: List[Tuple[Any, str]] = []
    for dest in destinations:
        listeners.append((dest, "Destinations.%s" % dest.name))
        listeners.extend((target, "Destinations.%s.Targets.%s" % (dest.name, target.name))
                         for target in dest.targets)
    queues: Dict[str, str] = {}
    threads: Dict[str, str] = {}
    for item, path in listeners:
        key = queue_key(item.queue)
        if key in queues:
            problems.append("%s.queue: %r is also the queue of %s; every destination and target "
                            "needs its own queue" % (path, item.queue, queues[key]))
        queues.setdefault(key, path)
        if item.thread_name in threads:
            problems.append("%s: its listener name %r is also that of %s"
                            % (path, item.thread_name, threads[item.thread_name]))
        threads.setdefault(item.thread_name, path)
    for item, path in listeners:
        owner = queues.get(queue_key(item.dead_letter_queue))
        if owner is not None:
            problems.append("%s.dead_letter_queue: %r is the queue of %s; a dead-letter queue "
                            "must not be consumed" % (path, item.dead_letter_queue, owner))
    for dest in destinations:
        seen = {_relation_key(dest.pgsql, dest.target): "Destinations.%s" % dest.name}
        for target in dest.targets:
            path = "Destinations.%s.Targets.%s" % (dest.name, target.name)
            key = _relation_key(target.pgsql, target.target)
            if key in seen:
                problems.append("%s: pgsql and target name the same relation as %s: its packets "
                                "would be applied twice" % (path, seen[key]))
            seen.setdefault(key, path)


#: Prefixes under which RabbitMQ's STOMP plugin reaches the queue named by what follows, as
#: ``/queue/x`` does: ``/amq/queue/x``, and for a SEND ``/reply-queue/x`` (its documentation,
#: "Destinations").
_QUEUE_ALIASES = ("/amq/queue/", "/reply-queue/")


def queue_key(queue: str) -> str:
    """The queue a destination names: ``/queue/x`` for each name RabbitMQ reads as queue ``x``
    (:data:`_QUEUE_ALIASES`)."""
    for prefix in _QUEUE_ALIASES:
        if queue.startswith(prefix):
            return "/queue/" + queue[len(prefix):]
    return queue


def reply_allowed(reply_to: str, patterns: Optional[Tuple[str, ...]]) -> bool:
    """Whether a ``reply-to`` matches one of ``patterns`` (a destination's ``reply_queues``;
    ``None``: any queue matches), both read by :func:`queue_key` (``/amq/queue/x`` matches
    ``/queue/x*``), compared as :func:`fnmatch.fnmatchcase` does (case-sensitive, as queue names are)."""
    if patterns is None:
        return True
    key = queue_key(reply_to)
    return any(fnmatch.fnmatchcase(key, queue_key(pattern)) for pattern in patterns)


def consumed_queues(config: Any) -> FrozenSet[str]:
    """Every queue ``config`` consumes or dead-letters to (each destination's and target's queue
    and dead-letter queue), as :func:`queue_key` names them: where no reply may go."""
    queues = set()
    for dest in config.destinations:
        for item in (dest,) + tuple(dest.targets):
            queues.update((queue_key(item.queue), queue_key(item.dead_letter_queue)))
    return frozenset(queues)


def _config_error(problems: List[str], source: str) -> ConfigError:
    error = ConfigError("\n".join(problems))
    error.problems = tuple(problems)  # type: ignore[attr-defined]
    error.source = source  # type: ignore[attr-defined]
    return error


def parse(mapping: Any, source: str = "<string>") -> Config:
    """Validate a configuration already read from YAML (a mapping of sections).

    :param source: where it came from (a file name), kept in :attr:`Config.source`.
    :raises ConfigError: listing every problem, one per line, ``<key path>: <what was wrong>``.
    """
    if not isinstance(mapping, Mapping):
        raise _config_error(["(top level): expected a mapping of sections (%s), got %s" % (
            ", ".join(_RawTop.model_fields),
            "an empty document" if mapping is None else _show(mapping))], source)
    problems: List[str] = []
    _validate(_RawTop, mapping, "", problems)

    def section(key: str) -> Optional[Mapping[str, Any]]:
        value = mapping.get(key)
        return value if isinstance(value, Mapping) else None

    http = _validate(_RawHTTP, section("HTTPServer"), "HTTPServer", problems) or _RawHTTP()
    health_data = (section("HTTPServer") or {}).get("health")   # checked even if HTTPServer is not
    health = (_validate(_RawHealth, health_data, "HTTPServer.health", problems)
              if isinstance(health_data, Mapping) else None) or _RawHealth()
    base_dir = os.path.dirname(os.path.abspath(source)) if not source.startswith("<") else ""
    broker = _with_secrets(_validate(_RawBroker, section("Broker"), "Broker", problems)
                           or _RawBroker(), "Broker", problems, base_dir)
    defaults = _validate(_RawDefaults, section("Defaults"), "Defaults", problems) or _RawDefaults()
    logging_section = dict(section("Logging") or {})
    _check_logging(logging_section, problems)
    if logging_section.get("level") is not None:
        level = logging_section["level"]
        if isinstance(level, str) and level.strip().lower() in LEVELS:
            logging_section["level"] = level.strip().upper()
        else:
            problems.append("Logging.level: expected one of %s, got %s"
                            % (", ".join(LEVELS), _show(level)))
    if logging_section.get("handler") is not None:
        handler = logging_section["handler"]
        if isinstance(handler, str) and handler.strip().lower() in LOG_HANDLERS:
            logging_section["handler"] = handler = handler.strip().lower()
            if handler == "file" and not logging_section.get("filename"):
                problems.append("Logging.filename: missing (required with handler: file)")
            elif handler != "file" and logging_section.get("filename"):
                problems.append("Logging.filename: only used with handler: file, not %s" % handler)
        else:
            problems.append("Logging.handler: expected one of %s, got %s"
                            % (", ".join(LOG_HANDLERS), _show(handler)))
    raw_destinations = section("Destinations")
    if raw_destinations is not None and not raw_destinations:
        problems.append("Destinations: expected at least one destination")
    destinations = []
    for name, data in (raw_destinations or {}).items():
        destination = _destination(name, data, broker, defaults, problems, base_dir)
        if destination is not None:
            destinations.append(destination)
    _cross_check(tuple(destinations), problems)
    if problems:
        raise _config_error(problems, source)
    return Config(
        logging=freeze(logging_section), locations=freeze(section("Locations") or {}),
        http=HTTPConfig(enabled=_pick(http.enabled, True),
                        listen=_pick(http.listen, DEFAULT_HTTP_LISTEN),
                        port=_pick(http.port, DEFAULT_HTTP_PORT),
                        health=HealthConfig(
                            max_backlog=_pick(health.max_backlog, DEFAULT_HEALTH_MAX_BACKLOG),
                            max_lag=_pick(health.max_lag, DEFAULT_HEALTH_MAX_LAG))),
        destinations=tuple(destinations), source=source)


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate keys (PyYAML silently keeps the last one)."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.duplicates: List[str] = []

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: Dict[Tuple[str, str], Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                first = seen.setdefault((key_node.tag, key_node.value), key_node.start_mark)
                if first is not key_node.start_mark:
                    mark = key_node.start_mark
                    self.duplicates.append("%s:%d:%d: duplicate key %r (first given on line %d)" % (
                        self.source, mark.line + 1, mark.column + 1, key_node.value,
                        first.line + 1))
        return super().construct_mapping(node, deep=deep)


def loads(text: str, source: str = "<string>") -> Config:
    """Parse and validate YAML text (``source`` names it in messages and :attr:`Config.source`).

    :raises ConfigError: YAML errors and duplicate keys as ``<source>:<line>:<column>: ...``, YAML
        nested too deeply to read, then everything :func:`parse` raises.
    """
    try:
        return _loads(text, source)
    except RecursionError:
        raise _config_error(["%s: the YAML is nested too deeply" % source], source) from None


def _loads(text: str, source: str) -> Config:
    loader = _Loader(text, source)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = "%s:%d:%d" % (source, mark.line + 1, mark.column + 1) if mark else source
        what = "; ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise _config_error(["%s: YAML syntax error: %s" % (where, what)], source) from None
    except yaml.YAMLError as exc:
        raise _config_error(["%s: YAML error: %s" % (source, exc)], source) from None
    except ValueError as exc:   # a scalar PyYAML cannot convert: an integer of over 4300 digits
        raise _config_error(["%s: YAML value cannot be read: %s" % (source, exc)], source) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise _config_error(loader.duplicates, source)
    return parse(data, source)


def load(path: "os.PathLike[str] | str") -> Config:
    """Read, parse and validate the YAML file at ``path``.

    :raises ConfigError: the file cannot be read (``<path>: cannot read ...``), is not valid YAML,
        or the configuration is invalid (see :func:`loads`, :func:`parse`).
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise _config_error(["%s: cannot read the configuration file: %s"
                             % (source, exc.strerror or exc)], source) from None
    except UnicodeDecodeError as exc:
        raise _config_error(["%s: not UTF-8 text (%s)" % (source, exc.reason)], source) from None
    return loads(text, source)
