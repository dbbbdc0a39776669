"""The built-in HTTP server: live statistics for people and monitoring.

Routes (``HEAD`` is answered like ``GET``, without a body; other methods get 405)::

    GET /stats                 Registry.snapshot() as JSON (see golconde.stats for its shape)
    GET /stats?callback=f.g    the same as JSONP: ``/**/f.g({...});``, 400 if the name is invalid
    GET /config                the public configuration given to StatsServer, as JSON
    GET /health                200 {"status": "ok", ...} when every listener is connected and no
                               backlog or lag is over its threshold, else 503 {"status": "fail",
                               "reasons": [...], ...} (see golconde.metrics.health)
    GET /metrics               Prometheus exposition (golconde.metrics; OpenMetrics on request)
    GET /                      the "Realtime Activity" page (golconde/web/index.html), and the
                               fixed set of files it loads (ASSETS: app.js, vendor/uPlot...)
    anything else              404 {"error": "not found"}

Only the files named in :data:`ASSETS` are served, read once at start: there is no path to
traverse. The server only reads counters: it never talks to a database or a broker. It runs the
standard library's ``ThreadingHTTPServer`` in a daemon thread; each request has its own daemon
thread and a socket timeout, an exception in a handler is logged and answered with 500, and the
access log goes to this module's logger at DEBUG.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import re
import socket
import socketserver
import threading
import time
from importlib import resources
from typing import Any, Dict, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .config import DEFAULT_HEALTH_MAX_BACKLOG, DEFAULT_HEALTH_MAX_LAG
from .metrics import health, prometheus_registry, render
from .stats import Registry

LOGGER = logging.getLogger(__name__)

#: A JSONP callback: dotted JavaScript identifiers (ASCII only).
CALLBACK_RE = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]{0,63}(?:\.[A-Za-z_$][A-Za-z0-9_$]{0,63})*")
#: Longest JSONP callback accepted, in characters.
MAX_CALLBACK = 255
#: Most bytes of a refused request's body read before answering 405.
MAX_DISCARD = 64 * 1024
#: Seconds a client may stay silent on a connection before it is closed.
REQUEST_TIMEOUT = 10.0

_COMMON_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                   ("Referrer-Policy", "no-referrer"))

#: URL path -> (file under golconde/web/, content type): everything the page loads.
ASSETS = {
    "/app.js": ("app.js", "application/javascript; charset=utf-8"),
    "/vendor/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "application/javascript; charset=utf-8"),
    "/vendor/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "/vendor/uPlot.LICENSE": ("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
}


def _load_page() -> Tuple[bytes, str]:
    """The Realtime Activity page, and a Content-Security-Policy allowing only scripts and styles
    from this server (plus any inline script by hash, and inline styles), and requests to it."""
    html = resources.files("golconde").joinpath("web/index.html").read_text(encoding="utf-8")
    hashes = "".join(
        " 'sha256-%s'" % base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
        for script in re.findall(r"<script>(.*?)</script>", html, re.S))
    csp = ("default-src 'none'; script-src 'self'%s; style-src 'self' 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'" % hashes)
    return html.encode("utf-8"), csp


def _load_assets() -> Dict[str, Tuple[bytes, str]]:
    """URL path -> (body, content type) of every file in :data:`ASSETS`."""
    web = resources.files("golconde").joinpath("web")
    return {path: (web.joinpath(name).read_bytes(), content_type)
            for path, (name, content_type) in ASSETS.items()}


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer carrying what the handlers need, with quiet error handling."""

    daemon_threads = True
    block_on_close = False
    #: the listen backlog (socketserver's default is 5: about ten clients at once, dashboards,
    #: Prometheus and Nagios polling together, had connections dropped and retried for seconds)
    request_queue_size = 128

    def __init__(self, address: Tuple[str, int], registry: Registry, config_json: bytes,
                 page: Tuple[bytes, str], thresholds: Tuple[int, float]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry = registry
        self.config_json = config_json
        self.page = page
        self.assets = _load_assets()
        self.thresholds = thresholds
        self.collectors = prometheus_registry(registry)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS look-up of the host (socket.getfqdn)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log (instead of printing to stderr) an exception that escaped a request's handling."""
        LOGGER.debug("HTTP: error while serving %s", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    """One HTTP request. ``self.server`` is the :class:`_Server`."""

    server: _Server
    server_version = "Golconde/" + __version__
    sys_version = ""

    def version_string(self) -> str:
        """``Server`` header: ``Golconde/<version>`` (without the Python version, nor the space
        BaseHTTPRequestHandler puts before it)."""
        return self.server_version
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:
        self._dispatch(with_body=True)

    def do_HEAD(self) -> None:
        self._dispatch(with_body=False)

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler looks up ``do_<METHOD>``; every method but GET and HEAD gets 405
        # (rather than the default 501).
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        # Read (a bounded amount of) the request body, so that closing the socket with unread data
        # does not reset the connection before the client reads the answer.
        try:
            length = min(max(int(self.headers.get("Content-Length", 0)), 0), MAX_DISCARD)
        except ValueError:
            length = 0
        if length:
            self.rfile.read(length)
        self.close_connection = True
        self._send(405, *self._json({"error": "method not allowed"}), with_body=True,
                   extra=(("Allow", "GET, HEAD"),))

    def _dispatch(self, with_body: bool) -> None:
        self._started = False
        try:
            status, content_type, body, extra = self._route()
            self._send(status, content_type, body, with_body, extra)
        except (ConnectionError, socket.timeout):
            LOGGER.debug("HTTP: client %s went away", self.client_address)
        except Exception:
            LOGGER.exception("HTTP: error while answering %s %r", self.command, self.path)
            if not self._started:
                try:
                    self._send(500, *self._json({"error": "internal error"}), with_body=with_body)
                except OSError:
                    pass
            self.close_connection = True

    def _route(self) -> Tuple[int, str, bytes, Tuple[Tuple[str, str], ...]]:
        """(status, content type, body, extra headers) for the request."""
        parts = urlsplit(self.path)
        path = parts.path
        if path == "/stats":
            body = json.dumps(self.server.registry.snapshot(), allow_nan=False).encode("utf-8")
            callbacks = parse_qs(parts.query, keep_blank_values=True).get("callback")
            if callbacks is None:
                return (200, "application/json", body, ())
            callback = callbacks[0]
            if (len(callbacks) != 1 or len(callback) > MAX_CALLBACK
                    or CALLBACK_RE.fullmatch(callback) is None):
                return (400, *self._json({"error": "invalid callback"}), ())
            # "/**/" keeps the response from being read as anything but JavaScript.
            return (200, "application/javascript", b"/**/%s(%s);" % (callback.encode("ascii"), body), ())
        if path == "/config":
            return (200, "application/json", self.server.config_json, ())
        if path == "/health":
            healthy, document = health(self.server.registry.snapshot(), *self.server.thresholds)
            return (200 if healthy else 503, *self._json(document), ())
        if path == "/metrics":
            body, content_type = render(self.server.collectors, self.headers.get("Accept"))
            return (200, content_type, body, ())
        if path == "/":
            html, csp = self.server.page
            return (200, "text/html; charset=utf-8", html,
                    (("Content-Security-Policy", csp), ("X-Frame-Options", "DENY")))
        if path in self.server.assets:
            body, content_type = self.server.assets[path]
            return (200, content_type, body, ())
        return (404, *self._json({"error": "not found"}), ())

    @staticmethod
    def _json(document: Dict[str, Any]) -> Tuple[str, bytes]:
        return "application/json", json.dumps(document).encode("utf-8")

    def _send(self, status: int, content_type: str, body: bytes, with_body: bool,
              extra: Tuple[Tuple[str, str], ...] = ()) -> None:
        self._started = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _COMMON_HEADERS + tuple(extra):
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's signature)
        """Access and error log lines go to logging at DEBUG, not to stderr."""
        message = "".join(c if c.isprintable() else "\\x%02x" % ord(c) for c in format % args)
        LOGGER.debug("HTTP: %s %s", self.address_string(), message)


class StatsServer:
    """The HTTP server of the daemon, serving ``registry`` (see the module docstring for routes).

    :param registry: the daemon's :class:`~golconde.stats.Registry`.
    :param host: address to listen on (an IPv6 address if it contains ``:``).
    :param port: TCP port; 0 picks a free one, available as :attr:`port` after :meth:`start`.
    :param public_config: what ``GET /config`` returns, already redacted by the caller (no
        passwords); nothing else is ever added. It is serialised once, here.
    :param max_backlog: ``GET /health`` fails when a listener's backlog is over this (packets).
    :param max_lag: ``GET /health`` fails when a listener's lag is over this (seconds).
    :raises TypeError: if ``public_config`` is not JSON-serialisable.
    """

    def __init__(self, registry: Registry, host: str = "127.0.0.1", port: int = 8080,
                 public_config: Optional[Dict[str, Any]] = None,
                 max_backlog: int = DEFAULT_HEALTH_MAX_BACKLOG,
                 max_lag: float = DEFAULT_HEALTH_MAX_LAG) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.thresholds = (int(max_backlog), float(max_lag))
        self._config_json = json.dumps(public_config if public_config is not None else {},
                                       allow_nan=False).encode("utf-8")
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Bind and serve in a daemon thread named ``golconde-http``.

        :raises OSError: if the address cannot be bound (e.g. the port is in use).
        :raises RuntimeError: if the server was already started.
        """
        if self._server is not None:
            raise RuntimeError("StatsServer already started")
        self._server = _Server((self.host, self.port), self.registry, self._config_json, _load_page(),
                               self.thresholds)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="golconde-http", daemon=True)
        self._thread.start()
        LOGGER.info("HTTP: serving statistics on http://%s:%d/", self.host, self.port)

    def update(self, public_config: Optional[Dict[str, Any]], max_backlog: int,
               max_lag: float) -> None:
        """Serve another ``public_config`` and health thresholds from now on, without closing
        the socket (a reload that keeps the address: no request is refused meanwhile).

        :raises TypeError: if ``public_config`` is not JSON-serialisable."""
        self._config_json = json.dumps(public_config if public_config is not None else {},
                                       allow_nan=False).encode("utf-8")
        self.thresholds = (int(max_backlog), float(max_lag))
        server = self._server
        if server is not None:
            server.config_json, server.thresholds = self._config_json, self.thresholds

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket, waiting at most about ``timeout`` seconds. Requests
        being answered are not waited for (their threads are daemons). Idempotent."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        deadline = time.monotonic() + timeout
        if thread.is_alive():
            # shutdown() waits for serve_forever() without a timeout: call it from a helper thread.
            stopper = threading.Thread(target=server.shutdown, name="golconde-http-stop", daemon=True)
            stopper.start()
            stopper.join(timeout)
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                LOGGER.warning("HTTP: server thread did not stop within %.1f s", timeout)
        server.server_close()
        LOGGER.info("HTTP: stopped")
