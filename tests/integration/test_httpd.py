"""Tests of golconde.httpd against a real StatsServer on a free port (no database or broker needed)."""
from __future__ import annotations

import http.client
import json
import logging
import socket

import pytest

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


def test_index_is_self_contained_html(server):
    status, headers, body = request(server, "GET", "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"]
    page = body.decode("utf-8")
    assert "Realtime Activity" in page
    assert "stats" in page and "textContent" in page
    assert "innerHTML" not in page
    assert "http://" not in page and "https://" not in page and "src=" not in page


def test_head_has_headers_but_no_body(server):
    status, headers, body = request(server, "HEAD", "/stats")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) > 0
    assert body == b""
    assert request(server, "HEAD", "/nowhere")[0] == 404


@pytest.mark.parametrize("path", ["/nowhere", "/stats/", "/index.html", "/assets/app.js", "/config.yaml"])
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
