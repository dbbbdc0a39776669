"""Shared fixtures: real PostgreSQL and a real STOMP broker.

Environment variables (defaults suit the project's set-up script):

* ``GOLCONDE_TEST_DSN``   libpq DSN of a maintenance database (default
  ``host=127.0.0.1 port=5432 user=postgres dbname=postgres``); test databases are created beside it.
* ``GOLCONDE_TEST_STOMP`` ``host:port`` of RabbitMQ's STOMP adapter (default ``127.0.0.1:61613``).
* ``GOLCONDE_TEST_STOMP_LOGIN`` / ``GOLCONDE_TEST_STOMP_PASSCODE`` (default guest / guest).
* ``GOLCONDE_TEST_ACTIVEMQ_STOMP`` ``host:port`` of ActiveMQ's STOMP connector (default
  ``127.0.0.1:61623``, as ``scripts/setup-activemq.sh`` starts it);
  ``GOLCONDE_TEST_ACTIVEMQ_LOGIN`` / ``GOLCONDE_TEST_ACTIVEMQ_PASSCODE`` (default: none sent; that
  broker has no authentication).
* ``GOLCONDE_TEST_BROKERS`` the brokers the ``broker`` fixture runs tests against, comma-separated
  (default ``rabbitmq,activemq``).

``STOMP``, ``STOMP_LOGIN``, ``STOMP_PASSCODE`` and :func:`stomp_address` describe RabbitMQ: tests
that do not take the ``broker`` fixture (and RabbitMQ-only tests such as ``test_faults.py``) use it.
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2 import sql

PG_DSN = os.environ.get("GOLCONDE_TEST_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
STOMP = os.environ.get("GOLCONDE_TEST_STOMP", "127.0.0.1:61613")
STOMP_LOGIN = os.environ.get("GOLCONDE_TEST_STOMP_LOGIN", "guest")
STOMP_PASSCODE = os.environ.get("GOLCONDE_TEST_STOMP_PASSCODE", "guest")
ACTIVEMQ_STOMP = os.environ.get("GOLCONDE_TEST_ACTIVEMQ_STOMP", "127.0.0.1:61623")
ACTIVEMQ_LOGIN = os.environ.get("GOLCONDE_TEST_ACTIVEMQ_LOGIN") or None
ACTIVEMQ_PASSCODE = os.environ.get("GOLCONDE_TEST_ACTIVEMQ_PASSCODE") or None


def split_address(address: str) -> Tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``."""
    host, _, port = address.rpartition(":")
    return host, int(port)


@dataclass(frozen=True)
class Broker:
    """A STOMP broker the integration tests run against.

    :ivar name: ``"rabbitmq"`` or ``"activemq"``.
    :ivar host, port: its STOMP address.
    :ivar login, passcode: credentials (``None``: no header sent).
    :ivar setup_hint: how to start it, for the error when it does not answer.
    """

    name: str
    host: str
    port: int
    login: Optional[str]
    passcode: Optional[str]
    setup_hint: str = ""

    @property
    def address(self) -> str:
        """``host:port``, as a configuration's ``stomp`` key takes it."""
        return "%s:%d" % (self.host, self.port)


BROKERS: Dict[str, Broker] = {
    "rabbitmq": Broker("rabbitmq", *split_address(STOMP), STOMP_LOGIN, STOMP_PASSCODE,
                       setup_hint="bash scripts/setup-services.sh"),
    "activemq": Broker("activemq", *split_address(ACTIVEMQ_STOMP), ACTIVEMQ_LOGIN, ACTIVEMQ_PASSCODE,
                       setup_hint="bash scripts/setup-activemq.sh"),
}
#: The default broker: RabbitMQ (what ``STOMP`` / ``stomp_address()`` describe).
RABBITMQ = BROKERS["rabbitmq"]
ACTIVEMQ = BROKERS["activemq"]


def selected_brokers() -> List[str]:
    """Names from ``GOLCONDE_TEST_BROKERS`` (default both). :raises pytest.UsageError: unknown name."""
    names = [n.strip().lower() for n in os.environ.get("GOLCONDE_TEST_BROKERS", "rabbitmq,activemq").split(",")
             if n.strip()]
    unknown = [n for n in names if n not in BROKERS]
    if unknown or not names:
        raise pytest.UsageError("GOLCONDE_TEST_BROKERS: expected a comma-separated subset of %s, got %r"
                                % (", ".join(BROKERS), os.environ.get("GOLCONDE_TEST_BROKERS")))
    return names


_reachable: Dict[str, Optional[str]] = {}


def require_broker(broker: Broker) -> Broker:
    """Fail the test (not skip it) with a hint when ``broker`` does not accept TCP connections."""
    if broker.name not in _reachable:
        try:
            socket.create_connection((broker.host, broker.port), timeout=5).close()
            _reachable[broker.name] = None
        except OSError as exc:
            _reachable[broker.name] = "%s STOMP at %s does not answer (%s): run %s, or leave it out" \
                " with GOLCONDE_TEST_BROKERS" % (broker.name, broker.address, exc, broker.setup_hint)
    if _reachable[broker.name]:
        pytest.fail(_reachable[broker.name], pytrace=False)
    return broker


def dsn_for(dbname: str) -> str:
    """The test DSN with its ``dbname`` replaced."""
    params = psycopg2.extensions.parse_dsn(PG_DSN)
    params["dbname"] = dbname
    return psycopg2.extensions.make_dsn(**params)


def create_database(prefix: str = "golconde_test") -> str:
    """Create a uniquely named empty database and return its DSN."""
    name = "%s_%s" % (prefix, uuid.uuid4().hex[:10])
    conn = psycopg2.connect(PG_DSN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()
    return dsn_for(name)


def drop_database(dsn: str) -> None:
    """Drop the database of ``dsn``, terminating its sessions first."""
    name = psycopg2.extensions.parse_dsn(dsn)["dbname"]
    conn = psycopg2.connect(PG_DSN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    conn.close()


@pytest.fixture
def make_database():
    """Factory fixture: ``make_database()`` returns the DSN of a new empty database, dropped at the
    end of the test."""
    created = []

    def factory(prefix: str = "golconde_test") -> str:
        dsn = create_database(prefix)
        created.append(dsn)
        return dsn

    yield factory
    for dsn in created:
        drop_database(dsn)


@pytest.fixture
def database(make_database):
    """DSN of one new empty database."""
    return make_database()


@pytest.fixture
def db(database):
    """An autocommit psycopg2 connection to a new empty database."""
    conn = psycopg2.connect(database)
    conn.autocommit = True
    yield conn
    conn.close()


#: Every queue a test creates is named ``golconde.test.<SESSION>....`` (:func:`unique_queue`), so
#: that the session can delete its own queues at the end, and only those.
SESSION = uuid.uuid4().hex[:6]
QUEUE_PREFIX = "golconde.test.%s." % SESSION


def unique_queue(label: str = "") -> str:
    """A unique queue name of this test session, ``/queue/golconde.test.<session>.<label><hex>``."""
    return "/queue/%s%s%s" % (QUEUE_PREFIX, label, uuid.uuid4().hex[:10])


@pytest.fixture
def queue_name():
    """A unique queue name (:func:`unique_queue`)."""
    return unique_queue()


@pytest.fixture(scope="session", autouse=True)
def delete_session_queues():
    """At the end of the session, delete the RabbitMQ queues its tests created (dead-letter and
    target queues included: they share the prefix) through the management API on port 15672 of
    the ``GOLCONDE_TEST_STOMP`` host. Best effort; on
    ActiveMQ the queues stay (it has no such API enabled here)."""
    yield
    from bench.rawstomp import delete_queues

    delete_queues(QUEUE_PREFIX, STOMP_LOGIN, STOMP_PASSCODE,
                  api="http://%s:15672" % split_address(STOMP)[0], timeout=3)


def stomp_address():
    """(host, port) of the default test broker (RabbitMQ)."""
    return split_address(STOMP)


@pytest.fixture(params=selected_brokers())
def broker(request) -> Broker:
    """Each STOMP broker of ``GOLCONDE_TEST_BROKERS`` in turn (test ids ``[rabbitmq]``,
    ``[activemq]``). A broker that does not answer fails the test with a set-up hint."""
    return require_broker(BROKERS[request.param])
