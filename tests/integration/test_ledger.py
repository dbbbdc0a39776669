"""The ledger at a destination: read before applying, recorded (with the fanned-out packet) in one
INSERT after applying; a concurrent transaction recording the same id in between makes the batch
retry, and the retry sees a duplicate: nothing is applied twice."""
from __future__ import annotations

import json

import psycopg2
import pytest

from golconde import ledger
from golconde.apply import APPLIED, DUPLICATE, Applier
from golconde.errors import RetryPacket
from golconde.handlers.autosql import AutoSQL


@pytest.fixture
def database(make_database):
    dsn = make_database()
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id integer PRIMARY KEY, qty integer)")
    conn.commit()
    ledger.ensure(conn)
    yield dsn, conn
    conn.close()


def upsert(item_id, qty):
    return json.dumps({"action": "set", "data": {"id": item_id, "qty": qty}}).encode()


def test_record_refuses_an_id_recorded_meanwhile(database):
    dsn, conn = database
    with conn.cursor() as cur:
        assert ledger.applied_ids(cur, "Dest", ["a", "b"]) == set()
        ledger.record(cur, "Dest", {"a": '{"x":1}'})
    conn.commit()
    with conn.cursor() as cur:
        assert ledger.applied_ids(cur, "Dest", ["a", "b"]) == {"a"}
        assert ledger.stored_packets(cur, "Dest", ["a"]) == {"a": '{"x":1}'}
        with pytest.raises(RetryPacket, match="1 of 2 packet ids"):
            ledger.record(cur, "Dest", {"a": None, "b": None})
    conn.rollback()


def test_destination_batch_raced_by_a_redelivery_is_applied_once(database):
    dsn, conn = database

    class Racing(AutoSQL):
        """Before applying, another session applies packet 'p2' and records it (as a concurrent
        redelivery would): the fast path's INSERT into the ledger then finds it, the batch is
        retried, and 'p2' is a duplicate (its upsert, with qty 21 here, is not applied again)."""
        raced = False

        def apply_batch(self, cursor, packets):
            if not Racing.raced:
                Racing.raced = True
                other = psycopg2.connect(dsn)
                with other.cursor() as cur:
                    cur.execute("INSERT INTO items VALUES (2, 20)")
                    ledger.record(cur, "Dest", {"p2": '{"action":"set","data":{"id":2,"qty":20}}'})
                other.commit()
                other.close()
            return super().apply_batch(cursor, packets)

    applier = Applier(Racing("items", role="destination"), "Dest", store_fanout=True,
                      sleep=lambda seconds: None)
    outcomes = applier.apply_batch(conn, [("p1", upsert(1, 10)), ("p2", upsert(2, 21)),
                                          ("p3", upsert(3, 30))])
    assert [o.status for o in outcomes] == [APPLIED, DUPLICATE, APPLIED]
    assert applier.retries == 1
    assert outcomes[1].fanout == '{"action":"set","data":{"id":2,"qty":20}}'
    with conn.cursor() as cur:
        cur.execute("SELECT id, qty FROM items ORDER BY id")
        assert cur.fetchall() == [(1, 10), (2, 20), (3, 30)]
        cur.execute("SELECT packet_id, packet IS NOT NULL FROM golconde.applied ORDER BY packet_id")
        assert cur.fetchall() == [("p1", True), ("p2", True), ("p3", True)]
    conn.rollback()
