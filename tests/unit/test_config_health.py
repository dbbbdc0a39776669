"""Configuration of the /health thresholds (HTTPServer.health) and of the log handler
(Logging.handler)."""
from __future__ import annotations

import copy

import pytest

from golconde import config as config_module
from golconde.config import DEFAULT_HEALTH_MAX_BACKLOG, DEFAULT_HEALTH_MAX_LAG, HealthConfig
from golconde.errors import ConfigError

BASE = {"Destinations": {"D": {"stomp": "127.0.0.1:61613", "queue": "/queue/golconde.d",
                               "pgsql": "dbname=x", "target": "public.t"}}}


def parse(**sections):
    mapping = copy.deepcopy(BASE)
    mapping.update(sections)
    return config_module.parse(mapping)


def problems(**sections):
    with pytest.raises(ConfigError) as info:
        parse(**sections)
    return list(info.value.problems)


def test_defaults():
    health = parse().http.health
    assert health == HealthConfig(max_backlog=10000, max_lag=300.0)
    assert (DEFAULT_HEALTH_MAX_BACKLOG, DEFAULT_HEALTH_MAX_LAG) == (10000, 300.0)
    assert parse(HTTPServer={"port": 8081}).http.health == health
    assert parse(HTTPServer={"health": None}).http.health == health
    assert parse(HTTPServer={"health": {}}).http.health == health


def test_given_values():
    health = parse(HTTPServer={"health": {"max_backlog": 0, "max_lag": 2.5}}).http.health
    assert (health.max_backlog, health.max_lag) == (0, 2.5)
    health = parse(HTTPServer={"health": {"max_backlog": "50", "max_lag": "60"}}).http.health
    assert (health.max_backlog, health.max_lag) == (50, 60.0)
    assert parse(HTTPServer={"health": {"max_lag": 10}}).http.health.max_backlog == 10000


def test_public_view_shows_the_thresholds():
    view = parse(HTTPServer={"health": {"max_backlog": 7}}).public_view()
    assert view["HTTPServer"]["health"] == {"max_backlog": 7, "max_lag": 300.0}


@pytest.mark.parametrize("health, expected", [
    ({"max_backlog": -1}, "HTTPServer.health.max_backlog: expected an integer 0-1000000000, got -1"),
    ({"max_backlog": 1.5}, "HTTPServer.health.max_backlog: expected an integer 0-1000000000, got 1.5"),
    ({"max_backlog": True}, "HTTPServer.health.max_backlog: expected an integer"),
    ({"max_lag": 0}, "HTTPServer.health.max_lag: expected a number of seconds > 0"),
    ({"max_lag": "soon"}, "HTTPServer.health.max_lag: expected a number of seconds > 0"),
    ({"max_lag": 10 ** 7}, "HTTPServer.health.max_lag: expected a number of seconds > 0 and <= 604800"),
    ({"max_lagg": 3}, "HTTPServer.health.max_lagg: unknown key (did you mean 'max_lag'?)"),
    ("often", "HTTPServer.health: expected a mapping, got 'often'"),
])
def test_invalid_health(health, expected):
    found = problems(HTTPServer={"health": health})
    assert len(found) == 1 and found[0].startswith(expected), found


def test_every_problem_is_reported():
    found = problems(HTTPServer={"port": 0, "health": {"max_backlog": -1, "max_lag": -1}})
    assert {p.split(":")[0] for p in found} == {
        "HTTPServer.port", "HTTPServer.health.max_backlog", "HTTPServer.health.max_lag"}


@pytest.mark.parametrize("handler", ["stderr", "syslog", "journald", "SysLog "])
def test_log_handlers(handler):
    assert parse(Logging={"handler": handler}).logging["handler"] == handler.strip().lower()


def test_file_handler_needs_a_filename():
    assert parse(Logging={"handler": "file", "filename": "/tmp/x.log"}).logging["handler"] == "file"
    assert problems(Logging={"handler": "file"}) == [
        "Logging.filename: missing (required with handler: file)"]
    assert problems(Logging={"handler": "journald", "filename": "/tmp/x.log"}) == [
        "Logging.filename: only used with handler: file, not journald"]


@pytest.mark.parametrize("handler", ["kafka", 3, ["syslog"]])
def test_unknown_log_handler(handler):
    found = problems(Logging={"handler": handler})
    assert len(found) == 1
    assert found[0].startswith("Logging.handler: expected one of stderr, file, syslog, journald")
