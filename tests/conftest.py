"""Shared fixtures: real PostgreSQL and a real STOMP broker.

Environment variables (defaults suit the project's set-up script):

* ``GOLCONDE_TEST_DSN``   libpq DSN of a maintenance database (default
  ``host=127.0.0.1 port=5432 user=postgres dbname=postgres``); test databases are created beside it.
* ``GOLCONDE_TEST_STOMP`` ``host:port`` of the STOMP broker (default ``127.0.0.1:61613``, RabbitMQ).
* ``GOLCONDE_TEST_STOMP_LOGIN`` / ``GOLCONDE_TEST_STOMP_PASSCODE`` (default guest / guest).
"""
from __future__ import annotations

import os
import uuid

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2 import sql

PG_DSN = os.environ.get("GOLCONDE_TEST_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
STOMP = os.environ.get("GOLCONDE_TEST_STOMP", "127.0.0.1:61613")
STOMP_LOGIN = os.environ.get("GOLCONDE_TEST_STOMP_LOGIN", "guest")
STOMP_PASSCODE = os.environ.get("GOLCONDE_TEST_STOMP_PASSCODE", "guest")


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


@pytest.fixture
def queue_name():
    """A unique queue name, ``/queue/golconde.test.<hex>``."""
    return "/queue/golconde.test.%s" % uuid.uuid4().hex[:10]


def stomp_address():
    """(host, port) of the test broker."""
    host, _, port = STOMP.rpartition(":")
    return host, int(port)
