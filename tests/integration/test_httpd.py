"""Tests of golconde.httpd against a real StatsServer on a free port (no database or broker needed)."""
from __future__ import annotations

import http.client
import json
import logging
import re
import socket
from importlib import resources

import pytest
from prometheus_client.parser import text_string_to_metric_families

from golconde.httpd import StatsServer
from golconde.stats import Registry

LEGACY_KEYS = {"add", "set", "update", "delete", "command_duration", "errors"}
PUBLIC_CONFIG = {"Destinations": {"Test1": {"queue": "/queue/golconde.Test1", "pgsql": "dbname=x"}}}


@pytest.fixture
def server():
    registry = Registry()
    dest = registry.thread("Test1", "destination", "Test1")
    dest.count("add", 3)
    dest.set_state(broker="connected", database="connected")
    target = registry.thread("Test1_t1", "target", "Test1")
    target.count("errors")
    target.set_error("<script>alert(1)</script>")
    srv = StatsServer(registry, host="127.0.0.1", port=0, public_config=PUBLIC_CONFIG)
    srv.start()
    yield srv
    srv.stop()


def request(server, method, path, body=None):
    """(status, headers dict with lower-case names, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw(server, data: bytes) -> bytes:
    """Send raw bytes and return whatever comes back before the server closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_port_zero_picks_a_free_port(server):
    assert server.port > 0


def test_stats_is_2009_compatible_json(server):
    status, headers, body = request(server, "GET", "/stats")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert headers["cache-control"] == "no-store"
    doc = json.loads(body)
    assert doc["worker_threads"] == 2
    assert isinstance(doc["threads"], list)
    names = [name for entry in doc["threads"] for name in entry]
    assert names == ["Test1", "Test1_t1"]
    for entry in doc["threads"]:
        for stats in entry.values():
            assert LEGACY_KEYS <= set(stats)
    assert doc["threads"][0]["Test1"]["add"] == 3
    assert doc["threads"][0]["Test1"]["broker"] == "connected"
    assert doc["threads"][1]["Test1_t1"]["errors"] == 1
    assert "uptime" in doc and "version" in doc


@pytest.mark.parametrize("callback", ["cb", "jQuery_123", "$.golconde.update"])
def test_stats_jsonp(server, callback):
    status, headers, body = request(server, "GET", "/stats?callback=" + callback)
    assert status == 200
    assert headers["content-type"].startswith("application/javascript")
    prefix = ("/**/%s(" % callback).encode()
    assert body.startswith(prefix) and body.endswith(b");")
    assert json.loads(body[len(prefix):-2])["worker_threads"] == 2


@pytest.mark.parametrize("query", [
    "callback=", "callback=alert(1)", "callback=1abc", "callback=a..b", "callback=a.",
    "callback=%3Cscript%3E", "callback=cb%0A", "callback=" + "a" * 65, "callback=a&callback=b",
    "callback=caf%C3%A9",
])
def test_stats_jsonp_invalid_callback(server, query):
    status, headers, body = request(server, "GET", "/stats?" + query)
    assert status == 400
    assert json.loads(body) == {"error": "invalid callback"}


def test_config_returns_what_was_given(server):
    status, headers, body = request(server, "GET", "/config")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == PUBLIC_CONFIG


def test_config_defaults_to_empty():
    srv = StatsServer(Registry(), port=0)
    srv.start()
    try:
        assert json.loads(request(srv, "GET", "/config")[2]) == {}
    finally:
        srv.stop()


def test_index_loads_only_files_of_this_server(server):
    status, headers, body = request(server, "GET", "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    page = body.decode("utf-8")
    assert "Realtime Activity" in page
    assert "http://" not in page and "https://" not in page
    loaded = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert "vendor/uPlot.iife.min.js" in loaded and "app.js" in loaded
    for path in loaded:
        if path.startswith("data:"):
            continue
        assert not path.startswith("/") and "//" not in path and ".." not in path
        status, headers, asset = request(server, "GET", "/" + path)
        assert status == 200, path
        assert len(asset) > 100


@pytest.mark.parametrize("path, content_type, marker", [
    ("/app.js", "application/javascript", b"textContent"),
    ("/vendor/uPlot.iife.min.js", "application/javascript", b"uPlot (v1.6.32)"),
    ("/vendor/uPlot.min.css", "text/css", b".uplot"),
    ("/vendor/uPlot.LICENSE", "text/plain", b"MIT License"),
])
def test_assets(server, path, content_type, marker):
    status, headers, body = request(server, "GET", path)
    assert status == 200
    assert headers["content-type"].startswith(content_type)
    assert headers["x-content-type-options"] == "nosniff"
    assert marker in body


def test_app_never_inserts_html():
    app = resources.files("golconde").joinpath("web/app.js").read_text(encoding="utf-8")
    assert "textContent" in app
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in app


def test_health_fails_with_reasons_then_passes(server):
    status, headers, body = request(server, "GET", "/health")
    assert status == 503
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["status"] == "fail"
    assert "Test1_t1: broker disconnected" in doc["reasons"]
    assert "Test1_t1: database disconnected" in doc["reasons"]
    assert doc["listeners"]["Test1"]["status"] == "ok"
    assert doc["thresholds"] == {"max_backlog": 10000, "max_lag": 300.0}
    server.registry.get("Test1_t1").set_state(broker="connected", database="connected")
    status, _, body = request(server, "GET", "/health")
    assert status == 200
    assert json.loads(body) == {
        "status": "ok", "reasons": [], "thresholds": {"max_backlog": 10000, "max_lag": 300.0},
        "listeners": {name: {"status": "ok", "broker": "connected", "database": "connected",
                             "backlog": None, "lag": None} for name in ("Test1", "Test1_t1")}}


def test_health_thresholds():
    registry = Registry()
    stats = registry.thread("D", "destination", "D")
    stats.set_state(broker="connected", database="connected")
    srv = StatsServer(registry, port=0, max_backlog=100, max_lag=5)
    srv.start()
    try:
        stats.set_backlog(100)
        stats.set_lag(5.0)
        assert request(srv, "GET", "/health")[0] == 200          # thresholds are inclusive
        stats.set_backlog(101)
        stats.set_lag(5.5)
        status, _, body = request(srv, "GET", "/health")
        assert status == 503
        assert json.loads(body)["reasons"] == ["D: backlog 101 > 100", "D: lag 5.5 s > 5 s"]
    finally:
        srv.stop()


def test_metrics_prometheus_text(server):
    server.registry.get("Test1").observe_duration(0.004, packets=2)
    status, headers, body = request(server, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    dest = {"destination": "Test1", "target": "", "thread": "Test1", "role": "destination"}
    target = {"destination": "Test1", "target": "t1", "thread": "Test1_t1", "role": "target"}

    def value(family, labels, sample_name=None):
        for sample in families[family].samples:
            if sample.labels == labels and (sample_name is None or sample.name == sample_name):
                return sample.value
        raise KeyError((family, labels, sample_name))

    assert families["golconde_packets"].type == "counter"
    assert value("golconde_packets", dict(dest, action="add")) == 3
    assert value("golconde_packets", dict(target, action="add")) == 0
    assert value("golconde_errors", target) == 1
    assert value("golconde_up", dest) == 1 and value("golconde_up", target) == 0
    assert value("golconde_connection_state", dict(dest, connection="broker", state="connected")) == 1
    assert value("golconde_connection_state", dict(target, connection="database",
                                                   state="disconnected")) == 1
    histogram = families["golconde_apply_duration_seconds"]
    assert histogram.type == "histogram"
    assert value("golconde_apply_duration_seconds", dict(dest, le="0.0025"),
                 "golconde_apply_duration_seconds_bucket") == 2       # 2 packets of 2 ms
    assert value("golconde_apply_duration_seconds", dict(dest, le="0.001"),
                 "golconde_apply_duration_seconds_bucket") == 0
    assert value("golconde_apply_duration_seconds", dest,
                 "golconde_apply_duration_seconds_count") == 2
    assert value("golconde_apply_duration_seconds", dest,
                 "golconde_apply_duration_seconds_sum") == pytest.approx(0.004)
    assert value("golconde_last_error_timestamp_seconds", target) > 1.6e9
    assert value("golconde_listeners", {}) == 2
    assert "golconde_backlog_packets" not in families or not families["golconde_backlog_packets"].samples


def test_metrics_openmetrics_on_request(server):
    status, headers, body = request_with(server, "/metrics",
                                         {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def request_with(server, path, headers):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_head_has_headers_but_no_body(server):
    status, headers, body = request(server, "HEAD", "/stats")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) > 0
    assert body == b""
    assert request(server, "HEAD", "/nowhere")[0] == 404


@pytest.mark.parametrize("path", ["/nowhere", "/stats/", "/index.html", "/assets/app.js", "/config.yaml",
                                  "/vendor/", "/vendor/README.md", "/web/app.js", "/app.js/",
                                  "/vendor/../app.js", "/metrics/x"])
def test_unknown_path_is_404(server, path):
    status, headers, body = request(server, "GET", path)
    assert status == 404
    assert json.loads(body) == {"error": "not found"}


@pytest.mark.parametrize("path", [
    "/../etc/passwd", "/%2e%2e/", "/%2e%2e/etc/passwd", "/assets/../../etc/passwd", "/..%2f..%2fetc/passwd",
    "/stats/../config",
])
def test_path_traversal_is_404(server, path):
    # http.client sends the path as is: no client-side normalisation.
    status, headers, body = request(server, "GET", path)
    assert status == 404
    assert b"root:" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FROBNICATE"])
def test_other_methods_are_405(server, method):
    status, headers, body = request(server, method, "/stats", body=b'{"x": 1}')
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert json.loads(body) == {"error": "method not allowed"}


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /stats HTTP/9.9\r\n\r\n",
    b"\x00\xff\xfe binary junk \r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    b"GET /stats HTTP/1.1\r\nBroken header line\r\n\r\n",
    b"",
])
def test_malformed_request_does_not_stop_the_server(server, data):
    raw(server, data)
    status, headers, body = request(server, "GET", "/stats")
    assert status == 200
    assert json.loads(body)["worker_threads"] == 2


def test_garbage_request_line_is_400(server):
    # A one-word request line is answered the HTTP/0.9 way: a body without a status line.
    assert b"Error code: 400" in raw(server, b"GARBAGE\r\n\r\n")
    assert b"Error code: 400" in raw(server, b"GET / HTTP/1.0 extra\r\n\r\n")


def test_handler_error_is_500_and_server_survives(server, monkeypatch, caplog):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(server.registry, "snapshot", broken)
    with caplog.at_level(logging.ERROR, logger="golconde.httpd"):
        status, headers, body = request(server, "GET", "/stats")
    assert status == 500
    assert json.loads(body) == {"error": "internal error"}
    assert "boom" in caplog.text
    monkeypatch.undo()
    assert request(server, "GET", "/stats")[0] == 200


def test_access_log_goes_to_logging_not_stderr(server, caplog, capfd):
    with caplog.at_level(logging.DEBUG, logger="golconde.httpd"):
        request(server, "GET", "/stats")
    assert any("/stats" in record.getMessage() for record in caplog.records)
    assert "GET /stats" not in capfd.readouterr().err


def test_stats_are_live(server):
    server.registry.thread("Test1", "destination", "Test1").count("add")
    server.registry.thread("Test2", "destination", "Test2")
    doc = json.loads(request(server, "GET", "/stats")[2])
    assert doc["worker_threads"] == 3
    assert doc["threads"][0]["Test1"]["add"] == 4


def test_stop_is_bounded_and_idempotent():
    srv = StatsServer(Registry(), port=0)
    srv.start()
    port = srv.port
    # An idle connection must not keep stop() waiting.
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        srv.stop(timeout=2)
        srv.stop()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        idle.close()


def test_start_on_a_used_port_raises(server):
    other = StatsServer(Registry(), port=server.port)
    with pytest.raises(OSError):
        other.start()


def test_unserialisable_public_config_is_refused():
    with pytest.raises(TypeError):
        StatsServer(Registry(), port=0, public_config={"x": object()})
