"""Transient database errors are retried with backoff; permanent ones are dead-lettered at once.

Each transient error is provoked for real at a target database, by another session:

* serialization failure (SQLSTATE 40001): the target's sessions run SERIALIZABLE (DSN
  ``options='-c default_transaction_isolation=serializable'``); another session updates the row
  the packet updates and commits while the daemon's transaction waits for that row;
* lock timeout (55P03): DSN ``options='-c lock_timeout=200'``, another session holds the row lock
  for longer;
* deadlock (40P01): a trigger on the target table locks row 1 then row 2 of another table; another
  session holds row 2 and then asks for row 1; the daemon's session has the shorter
  ``deadlock_timeout`` (DSN option), so it is the one PostgreSQL aborts.

Each time the packet is applied in the end, ``retried`` grows in ``/stats`` (read over HTTP) and
nothing is dead-lettered; a packet with a permanent error is dead-lettered without any retry.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
import uuid
from typing import Any, Dict

import psycopg2
import pytest

from golconde.daemon import Daemon

from .flow_support import drain_queue, execute, make_config, parse_config, query, send_raw, wait_for

ACCOUNTS = """
CREATE TABLE public.accounts (id integer PRIMARY KEY, balance integer NOT NULL);
INSERT INTO public.accounts VALUES (1, 100), (2, 200);
"""
#: The daemon's sessions are named "golconde <listener>" (application_name).
DAEMON_BACKENDS = "SELECT pid, wait_event_type, wait_event FROM pg_stat_activity" \
                  " WHERE datname = current_database() AND application_name LIKE 'golconde %'"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_options(dsn: str, options: str) -> str:
    return "%s options='%s'" % (dsn, options)


class Flow:
    """A canonical database and one target ``t1`` whose DSN carries ``t1_options``, a running
    daemon with its HTTP server."""

    def __init__(self, make_database: Any, t1_options: str, max_retries: int = 5,
                 t1_setup: str = "") -> None:
        self.canonical, self.t1 = make_database(), make_database()
        for dsn in (self.canonical, self.t1):
            execute(dsn, ACCOUNTS)
        if t1_setup:
            execute(self.t1, t1_setup)
        self.port = free_port()
        mapping = make_config(self.canonical, {"t1": with_options(self.t1, t1_options)},
                              "public.accounts", http_port=self.port)
        destination = next(iter(mapping["Destinations"].values()))
        destination["Targets"]["t1"]["max_retries"] = max_retries
        self.config = parse_config(mapping)
        self.destination = self.config.destinations[0]
        self.daemon = Daemon(self.config)
        self.daemon.start()

    def stats(self) -> Dict[str, Dict[str, Any]]:
        """``GET /stats``: thread name -> counters."""
        with urllib.request.urlopen("http://127.0.0.1:%d/stats" % self.port, timeout=10) as answer:
            document = json.loads(answer.read().decode("utf-8"))
        return {name: values for entry in document["threads"] for name, values in entry.items()}

    def t1_stats(self) -> Dict[str, Any]:
        return self.stats()["%s_t1" % self.destination.name]

    def send(self, body: str) -> str:
        pid = str(uuid.uuid4())
        send_raw(self.destination.queue, [body], [{"golconde-id": pid}])
        return pid

    def balance(self, dsn: str, account: int = 1) -> int:
        return query(dsn, "SELECT balance FROM accounts WHERE id = %s", (account,))[0][0]

    def wait_daemon_waiting(self, event_type: str = "Lock", event: str = "", timeout: float = 30):
        """Until a daemon session at t1 waits (``wait_event_type``, optionally ``wait_event``)."""
        def waiting() -> bool:
            return any(row[1] == event_type and (not event or row[2] == event)
                       for row in query(self.t1, DAEMON_BACKENDS))
        wait_for(waiting, timeout=timeout, interval=0.02,
                 message="the daemon's t1 session waiting on %s %s" % (event_type, event))

    def stop(self) -> None:
        assert self.daemon.stop(), "daemon did not stop in time"
        for queue in (self.destination.queue, self.destination.dead_letter_queue,
                      self.destination.targets[0].queue, self.destination.targets[0].dead_letter_queue):
            drain_queue(queue, wait=0.2)


@pytest.fixture
def flows(make_database):
    started = []

    def factory(*args: Any, **kwargs: Any) -> Flow:
        flow = Flow(make_database, *args, **kwargs)
        started.append(flow)
        return flow

    yield factory
    for flow in started:
        flow.stop()


def blocker(dsn: str) -> Any:
    conn = psycopg2.connect(dsn, application_name="test blocker")
    return conn


def test_serialization_failure_is_retried_then_applied(flows):
    flow = flows("-c default_transaction_isolation=serializable")
    other = blocker(flow.t1)
    try:
        with other.cursor() as cur:                      # holds row 1 of t1, uncommitted
            cur.execute("UPDATE accounts SET balance = balance + 1000 WHERE id = 1")
        flow.send('{"action": "update", "data": {"balance": 5}, "restriction": {"id": 1}}')
        wait_for(lambda: flow.balance(flow.canonical) == 5, message="applied at the canonical")
        flow.wait_daemon_waiting("Lock")                # its snapshot predates the commit below
        other.commit()                                  # -> 40001 in the daemon's transaction
    finally:
        other.close()
    wait_for(lambda: flow.balance(flow.t1) == 5, message="applied at t1 after the retry")
    wait_for(lambda: flow.t1_stats()["applied"] == 1, message="stats updated")
    t1 = flow.t1_stats()
    assert t1["retried"] == 1 and t1["dead_lettered"] == 0 and t1["errors"] == 0
    assert flow.stats()[flow.destination.name]["retried"] == 0


def test_lock_timeout_is_retried_with_backoff_then_applied(flows, caplog):
    caplog.set_level(logging.INFO, logger="golconde.apply")
    flow = flows("-c lock_timeout=200", max_retries=50)
    other = blocker(flow.t1)
    try:
        with other.cursor() as cur:
            cur.execute("SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        flow.send('{"action": "update", "data": {"balance": 7}, "restriction": {"id": 1}}')
        flow.wait_daemon_waiting("Lock")
        time.sleep(1.0)                                 # several 200 ms lock waits time out
        assert flow.balance(flow.t1) == 100
    finally:
        other.rollback()
        other.close()
    wait_for(lambda: flow.balance(flow.t1) == 7, message="applied at t1 after the lock was released")
    wait_for(lambda: flow.t1_stats()["applied"] == 1, message="stats updated")
    t1 = flow.t1_stats()
    retries = [r for r in caplog.records if "55P03" in r.getMessage() and "_t1]" in r.getMessage()]
    assert t1["retried"] >= 2 and t1["retried"] == len(retries), (t1, len(retries))
    assert t1["dead_lettered"] == 0


DEADLOCK_SETUP = """
CREATE TABLE public.locks (id integer PRIMARY KEY, n integer NOT NULL);
INSERT INTO public.locks VALUES (1, 0), (2, 0);
CREATE FUNCTION public.lock_both() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('application_name') LIKE 'golconde %' THEN
        UPDATE public.locks SET n = n + 1 WHERE id = 1;
        PERFORM pg_sleep(0.5);
        UPDATE public.locks SET n = n + 1 WHERE id = 2;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER lock_both BEFORE UPDATE ON public.accounts
    FOR EACH ROW EXECUTE FUNCTION public.lock_both();
"""


def test_deadlock_is_retried_then_applied(flows, caplog):
    caplog.set_level(logging.INFO, logger="golconde.apply")
    flow = flows("-c deadlock_timeout=100ms", t1_setup=DEADLOCK_SETUP)
    other = blocker(flow.t1)
    waiter = None
    try:
        with other.cursor() as cur:
            cur.execute("SET deadlock_timeout = '60s'")    # the daemon's session is the victim
            cur.execute("UPDATE locks SET n = n + 10 WHERE id = 2")
        flow.send('{"action": "update", "data": {"balance": 9}, "restriction": {"id": 1}}')
        flow.wait_daemon_waiting("Timeout", "PgSleep")    # it holds row 1, row 2 comes next

        def lock_row_1() -> None:
            with other.cursor() as cur:
                cur.execute("UPDATE locks SET n = n + 10 WHERE id = 1")
        waiter = threading.Thread(target=lock_row_1)
        waiter.start()
        waiter.join(30)                                 # returns once the daemon was aborted
        assert not waiter.is_alive()
    finally:
        other.rollback()
        other.close()
    wait_for(lambda: flow.balance(flow.t1) == 9, message="applied at t1 after the deadlock")
    wait_for(lambda: flow.t1_stats()["applied"] == 1, message="stats updated")
    t1 = flow.t1_stats()
    assert [r for r in caplog.records if "40P01" in r.getMessage()], "no deadlock was logged"
    assert t1["retried"] >= 1 and t1["dead_lettered"] == 0
    # the trigger ran to completion exactly once in a committed transaction
    assert query(flow.t1, "SELECT n FROM locks ORDER BY id") == [(1,), (1,)]


def test_permanent_errors_are_dead_lettered_at_once(flows, caplog):
    caplog.set_level(logging.INFO, logger="golconde.apply")
    flow = flows("-c lock_timeout=200",
                 t1_setup="ALTER TABLE accounts ADD CONSTRAINT small CHECK (balance < 1000)")
    name = flow.destination.name
    started = time.monotonic()
    bad_type = flow.send('{"action": "update", "data": {"balance": "lots"}, "restriction": {"id": 1}}')
    too_big = flow.send('{"action": "update", "data": {"balance": 5000}, "restriction": {"id": 2}}')
    wait_for(lambda: flow.stats()[name]["dead_lettered"] == 1, message="22P02 at the canonical")
    wait_for(lambda: flow.t1_stats()["dead_lettered"] == 1, message="23514 at t1")
    elapsed = time.monotonic() - started
    stats = flow.stats()
    assert stats[name]["retried"] == 0 and flow.t1_stats()["retried"] == 0
    assert stats[name]["applied"] == 1 and flow.balance(flow.canonical, 2) == 5000
    assert flow.balance(flow.t1, 2) == 200
    assert not [r for r in caplog.records if "transient error" in r.getMessage()]
    assert elapsed < 10, elapsed
    dead = drain_queue(flow.destination.dead_letter_queue, wait=0.5)
    assert [(d.headers["golconde-id"], "22P02" in d.headers["golconde-reason"]) for d in dead] == [
        (bad_type, True)]
    dead = drain_queue(flow.destination.targets[0].dead_letter_queue, wait=0.5)
    assert [(d.headers["golconde-id"], "23514" in d.headers["golconde-reason"]) for d in dead] == [
        (too_big, True)]


def test_a_lock_held_past_max_retries_waits_without_dead_lettering(flows):
    """A packet still blocked after max_retries retries of its batch, and max_retries more alone
    (which packet of a batch held it back is not known), is not dead-lettered: it was, and the
    later changes of its row were applied over it, the target differing for good with /health
    ok (review DD). The batch waits, without limit and with backoff, 'failing' from the third
    time with the cause, and is applied once the lock is let go; `retried` counts every retry."""
    flow = flows("-c lock_timeout=100", max_retries=2)
    other = blocker(flow.t1)
    try:
        with other.cursor() as cur:
            cur.execute("SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        flow.send('{"action": "update", "data": {"balance": 7}, "restriction": {"id": 1}}')
        wait_for(lambda: any("failed attempts in a row, the last: blocked: still waiting after 3"
                             " attempts alone, after 3 of its whole batch: SQLSTATE 55P03" in problem
                             for problem in flow.t1_stats()["problems"]),
                 timeout=60, message="t1 reports it is blocked")
        assert flow.t1_stats()["dead_lettered"] == 0 and flow.balance(flow.t1) == 100
    finally:
        other.rollback()
        other.close()
    wait_for(lambda: flow.balance(flow.t1) == 7, timeout=60, message="applied at t1 once let go")
    wait_for(lambda: flow.t1_stats()["problems"] == [], timeout=10, message="t1's problem cleared")
    stats = flow.t1_stats()
    assert stats["dead_lettered"] == 0 and stats["retried"] >= 12, stats
    assert drain_queue(flow.destination.targets[0].dead_letter_queue, wait=0.5) == []
