"""Credentials from the environment and from files reach the broker and PostgreSQL, and never the
logs, the stats, ``/config`` or ``golconded --check``.

A RabbitMQ user with a unique password is created for the test (management API), so that the
passcode is a string no other output can contain by chance. One target is given a wrong passcode
(from a file) and another a database that does not exist (with the password from a file), so that
the daemon logs connection errors too, at DEBUG level, while packets flow to the good target.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
import uuid

import pytest
import yaml

from golconde import config as config_module
from golconde.daemon import Daemon

from ..conftest import RABBITMQ, STOMP_LOGIN, STOMP_PASSCODE, dsn_for
from .flow_support import drain_queue, execute, make_config, query, send_raw, wait_for

MANAGEMENT = "http://%s:15672" % RABBITMQ.host
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def management(method: str, path: str, body=None) -> int:
    auth = base64.b64encode(("%s:%s" % (STOMP_LOGIN, STOMP_PASSCODE)).encode()).decode()
    request = urllib.request.Request(MANAGEMENT + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": "Basic " + auth,
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status


@pytest.fixture
def rabbit_user():
    """(login, password): a RabbitMQ user with a unique password and full rights on vhost /."""
    login = "golconde-secret-%s" % uuid.uuid4().hex[:8]
    password = "pw-%s-%s" % (uuid.uuid4().hex, "q'uote;$$")
    try:
        management("PUT", "/api/users/%s" % login, {"password": password, "tags": ""})
    except OSError as exc:
        pytest.skip("RabbitMQ management API not available: %s" % exc)
    management("PUT", "/api/permissions/%%2F/%s" % login,
               {"configure": ".*", "write": ".*", "read": ".*"})
    yield login, password
    management("DELETE", "/api/users/%s" % login)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def thread_stats(daemon: Daemon) -> dict:
    return {k: v for entry in daemon.registry.snapshot()["threads"] for k, v in entry.items()}


def test_secrets_never_appear_in_logs_stats_or_config(make_database, rabbit_user, tmp_path, caplog,
                                                      monkeypatch):
    login, passcode = rabbit_user
    db_password = "db-%s 'with quotes' and spaces" % uuid.uuid4().hex
    wrong_passcode = "wrong-%s" % uuid.uuid4().hex
    secrets = (passcode, db_password, wrong_passcode)
    variable = "GOLCONDE_TEST_PASSCODE_%s" % uuid.uuid4().hex[:8].upper()
    monkeypatch.setenv(variable, passcode)
    (tmp_path / "db_password").write_text(db_password + "\n")
    (tmp_path / "wrong_passcode").write_text(wrong_passcode)

    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, "CREATE TABLE items (id integer PRIMARY KEY, note text);"
                     " CREATE TABLE other (LIKE items)")
    port = free_port()
    mapping = make_config(canonical, {"t1": t1, "t2": t1, "t3": dsn_for("golconde_no_such_db")},
                          "public.items", http_port=port)
    mapping["Broker"] = {"login": login, "passcode_env": variable, "heartbeat": 2000}
    name, destination = next(iter(mapping["Destinations"].items()))
    destination["pgsql_password_file"] = "db_password"          # relative to the file
    destination["Targets"]["t1"]["pgsql_password_file"] = str(tmp_path / "db_password")
    destination["Targets"]["t2"].update(target="public.other", login=login,
                                        passcode_file="wrong_passcode")
    destination["Targets"]["t3"]["pgsql_password_file"] = "db_password"
    path = tmp_path / "golconde.yaml"
    path.write_text(yaml.safe_dump(mapping))
    assert not any(secret in path.read_text() for secret in secrets)

    config = config_module.load(path)
    assert config.destinations[0].stomp.passcode == passcode
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="stomp")     # as golconded -v configures it
    daemon = Daemon(config)
    daemon.start()
    try:
        queue = config.destinations[0].queue
        send_raw(queue, ['{"action": "add", "data": {"id": %d, "note": "n"}}' % i for i in range(3)],
                 [{"golconde-id": str(uuid.uuid4())} for _ in range(3)])
        wait_for(lambda: len(query(t1, "SELECT 1 FROM items")) == 3, message="applied at t1")
        wait_for(lambda: all(thread_stats(daemon)["%s_%s" % (name, t)]["last_error"]
                             for t in ("t2", "t3")), timeout=30,
                 message="the broken targets failing (and logging)")
        with urllib.request.urlopen("http://127.0.0.1:%d/config" % port, timeout=10) as answer:
            config_page = answer.read().decode("utf-8")
        with urllib.request.urlopen("http://127.0.0.1:%d/stats" % port, timeout=10) as answer:
            stats_page = answer.read().decode("utf-8")
        stats = thread_stats(daemon)
    finally:
        daemon.stop()
        # a listener waiting for a refused login's CONNECTED may take up to its 10 s timeout
        for listener in daemon.listeners.values():
            listener.join(15)
        assert not any(listener.is_alive() for listener in daemon.listeners.values())
        for target in config.destinations[0].targets:
            drain_queue(target.queue, wait=0.2)
    check = subprocess.run([sys.executable, "-m", "golconde.daemon_entry", "--check", "-c", str(path)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env=dict(os.environ, **{variable: passcode}))
    assert check.returncode == 0, check.stderr

    # the failures were logged (so the logs were worth searching) ...
    log = caplog.text
    assert "refused" in log or "Access refused" in log or "ACCESS_REFUSED" in log, log[-2000:]
    assert "golconde_no_such_db" in log
    assert stats["%s_t1" % name]["applied"] == 3
    # ... and no secret is anywhere
    outputs = {"log": log, "/config": config_page, "/stats": stats_page, "repr": repr(config),
               "public_view": json.dumps(config.public_view()),
               "--check": check.stdout + check.stderr}
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, "secret found in %s" % where
    for record in caplog.records:
        rendered = "%s %s %s" % (record.getMessage(), record.exc_text or "", record.stack_info or "")
        assert not any(secret in rendered for secret in secrets)
