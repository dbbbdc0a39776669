"""golconde status: the tree and the verdict of a status document (pure functions)."""
from __future__ import annotations

import copy

from golconde import status


def listener(name, **overrides):
    entry = {"name": name, "state": "up", "broker": "connected", "database": "connected",
             "backlog": 0, "backlog_source": "daemon", "dead_letter_backlog": None, "lag": 0.01,
             "applied_rate": None, "applied": 3, "errors": 0, "dead_lettered": 0, "last_error": None,
             "last_error_at": None, "problems": [], "queue": "/queue/q." + name,
             "relation": "public.t"}
    entry.update(overrides)
    return entry


DOCUMENT = {"daemon": {"url": "http://127.0.0.1:8080", "reachable": True, "error": None,
                       "version": "1.0.0", "uptime": 3.0},
            "destinations": [dict(listener("D", mode="trigger"), targets=[listener("t1")])]}


def test_a_standing_problem_is_shown_and_makes_the_status_unhealthy():
    assert status.healthy(DOCUMENT)
    assert "problem" not in status.render(DOCUMENT)
    document = copy.deepcopy(DOCUMENT)
    document["destinations"][0]["problems"] = ["capture trigger x on public.t: key changed"]
    assert not status.healthy(document)
    lines = status.render(document).splitlines()
    assert "|   problem: capture trigger x on public.t: key changed" in lines
    document = copy.deepcopy(DOCUMENT)
    document["destinations"][0]["targets"][0]["state"] = "down"
    assert not status.healthy(document)


def test_unmatched_packets_are_shown_when_there_are_some():
    """A target's unmatched packets (updates and deletes that found no row: it lacks rows it should
    hold) are on its figures' line; none, nothing is added to the line."""
    assert "unmatched" not in status.render(DOCUMENT)
    document = copy.deepcopy(DOCUMENT)
    document["destinations"][0]["targets"][0]["unmatched"] = 2
    lines = status.render(document).splitlines()
    assert any(line.endswith("errors 0, dead-lettered 0, unmatched 2") for line in lines), lines
    assert status.healthy(document)         # a count, not a standing problem


def test_a_404_that_is_not_rabbitmq_s_answer_is_no_backlog_of_0():
    """A --management-url that is not RabbitMQ's API (here a server answering 404 to all) gives no
    depth and says why, instead of "0 (broker)"; RabbitMQ's own 404 ("Object Not Found") is a
    queue it does not have yet, 0."""
    import http.server
    import json
    import threading
    from types import SimpleNamespace

    from golconde.status import Management

    bodies = {"/api/queues/%2F/rabbit": json.dumps({"error": "Object Not Found", "reason": "Not Found"}).encode()}

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()
            self.wfile.write(bodies.get(self.path.split("?")[0], b"<html>not here</html>"))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        management = Management("http://127.0.0.1:%d" % server.server_address[1])
        broker = SimpleNamespace(host="127.0.0.1", port=61613, login=None, passcode=None, vhost=None)
        depth, why = management.depth(broker, "/queue/other")
        assert depth is None and "HTTP 404" in why
        assert Management("http://127.0.0.1:%d" % server.server_address[1]).depth(broker, "/queue/rabbit") == (0, None)
    finally:
        server.shutdown()
        server.server_close()
