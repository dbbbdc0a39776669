"""golconde status: the tree and the verdict of a status document (pure functions)."""
from __future__ import annotations

import copy

from golconde import status


def listener(name, **overrides):
    entry = {"name": name, "state": "up", "broker": "connected", "database": "connected",
             "backlog": 0, "backlog_source": "daemon", "dead_letters": None, "lag": 0.01,
             "rate": None, "applied": 3, "errors": 0, "dead_lettered": 0, "last_error": None,
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
