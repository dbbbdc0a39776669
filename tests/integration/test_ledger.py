"""The ledger at a destination: read before applying, recorded (with the fanned-out packet) in one
INSERT after applying; a concurrent transaction recording the same id in between makes the batch
retry, and the retry sees a duplicate: nothing is applied twice. Pruning: only rows older than the
retention, in chunks, within a time budget; each listener with its configured ledger_retention."""
from __future__ import annotations

import json

import psycopg2
import psycopg2.extensions
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
        with pytest.raises(RetryPacket, match="recorded as applied by another transaction"):
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


class Counting(psycopg2.extensions.connection):
    """A connection that keeps the text of every query sent (one entry per round trip)."""

    def cursor(self, *args, **kwargs):
        kwargs.setdefault("cursor_factory", CountingCursor)
        return super().cursor(*args, **kwargs)

    @property
    def sent(self):
        return self.__dict__.setdefault("_sent", [])


def test_claim_tries_a_plain_insert_then_claims_only_the_new_ids(database):
    """claim(begin=True) opens the transaction with a plain INSERT; when an id was recorded before,
    it rolls back and claims again, skipping it; the transaction it leaves open then commits the
    new ids only. An id given twice is claimed once."""
    dsn, _ = database
    conn = psycopg2.connect(dsn, connection_factory=Counting)
    conn.autocommit = True            # as inside apply.explicit_transaction
    try:
        with conn.cursor() as cur:
            assert ledger.claim(cur, "T", ["a", "b"], begin=True) == {"a", "b"}
            cur.execute("COMMIT")
            assert len(conn.sent) == 2 and "ON CONFLICT" not in conn.sent[0]
            del conn.sent[:]
            assert ledger.claim(cur, "T", ["b", "c", "d"], begin=True) == {"c", "d"}
            assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
            cur.execute("COMMIT")
            assert [q.split(" INSERT")[0] for q in conn.sent] == ["BEGIN;", "ROLLBACK", "BEGIN;", "COMMIT"]
            assert "ON CONFLICT" in conn.sent[2]
            assert ledger.claim(cur, "T", ["e", "e"], begin=True) == {"e"}
            cur.execute("ROLLBACK")         # nothing of a rolled-back claim stays
            cur.execute("SELECT packet_id FROM golconde.applied WHERE consumer = 'T' ORDER BY 1")
            assert [r[0] for r in cur.fetchall()] == ["a", "b", "c", "d"]
    finally:
        conn.close()


def _plan_nodes(plan):
    yield plan
    for child in plan.get("Plans", ()):
        yield from _plan_nodes(child)


def test_ledger_lookups_use_the_primary_key_without_statistics(database):
    """A destination reads which ids of a batch it applied before. With no statistics on the
    ledger (new, or autovacuum off), ``packet_id = ANY(ids)`` was planned as a scan of all the
    consumer's rows; the lookup is one primary key probe per id, whatever the statistics."""
    dsn, conn = database
    with conn.cursor() as cur:
        cur.execute("ALTER TABLE golconde.applied SET (autovacuum_enabled = false)")
        cur.execute("INSERT INTO golconde.applied (consumer, packet_id, packet)"
                    " SELECT 'C', 'id-' || n, 'p' || n FROM generate_series(1, 20000) AS n")
        conn.commit()
        ids = ["id-%d" % n for n in range(19000, 19500)] + ["new-%d" % n for n in range(10)]
        assert ledger.applied_ids(cur, "C", ids) == set(ids[:500])
        assert ledger.stored_packets(cur, "C", ["id-7", "new-1", "id-7"]) == {"id-7": "p7"}
        cur.execute("UPDATE golconde.applied SET packet = NULL WHERE packet_id = 'id-8'")
        assert ledger.stored_packets(cur, "C", ["id-8"]) == {"id-8": None}    # recorded, no text
        assert ledger.applied_ids(cur, "C", ["id-8", "id-8", "new-1"]) == {"id-8"}
        conn.commit()
        for found in ("true", "ARRAY[a.packet]"):
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + ledger._LOOKUP.format(found=found), ("C", ids))
            nodes = list(_plan_nodes(cur.fetchone()[0][0]["Plan"]))
            probes = [n for n in nodes if n.get("Relation Name") == "applied"]
            assert len(probes) == 1, nodes     # one probe per id, not one more for the filter
            assert probes[0]["Node Type"] in ("Index Scan", "Index Only Scan"), probes
            assert "packet_id" in probes[0]["Index Cond"], probes
            assert probes[0]["Actual Loops"] == len(ids), probes
            assert probes[0].get("Rows Removed by Filter", 0) == 0, probes
    conn.rollback()


@pytest.mark.parametrize("redelivered", [False, True])
def test_a_target_applies_a_partly_repeated_batch_once(database, redelivered):
    """A target's batch where some packets were applied before: those are duplicates, the rest
    applied, in one transaction, and the connection is left idle and out of autocommit mode. A
    batch marked redelivered claims with ON CONFLICT at once (no failed INSERT, no ROLLBACK)."""
    dsn, conn = database
    counting = psycopg2.connect(dsn, connection_factory=Counting)
    applier = Applier(AutoSQL("items", role="target"), "T", sleep=lambda seconds: None)
    first = applier.apply_batch(counting, [("a", upsert(1, 1)), ("b", upsert(2, 2))])
    assert [o.status for o in first] == [APPLIED, APPLIED]
    del counting.sent[:]
    again = applier.apply_batch(counting, [("b", upsert(2, 20)), ("c", upsert(3, 3)), ("a", upsert(1, 10))],
                                redelivered=redelivered)
    assert [o.status for o in again] == [DUPLICATE, APPLIED, DUPLICATE]
    assert ("ROLLBACK" in counting.sent) is not redelivered, counting.sent
    assert not counting.autocommit
    assert counting.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    with conn.cursor() as cur:
        cur.execute("SELECT id, qty FROM items ORDER BY id")
        assert cur.fetchall() == [(1, 1), (2, 2), (3, 3)]
    conn.rollback()
    counting.close()


class CountingCursor(psycopg2.extensions.cursor):
    def execute(self, query, params=None):
        if isinstance(query, bytes):
            query = query.decode()
        self.connection.sent.append(query if isinstance(query, str) else query.as_string(self))
        return super().execute(query, params)


@pytest.mark.parametrize("role, trips", [("target", 3), ("destination", 3)])
def test_the_fast_path_sends_begin_and_commit_with_its_own_statements(database, role, trips):
    """3 round trips per batch (ledger + BEGIN, apply, COMMIT or ledger + COMMIT): psycopg2 alone
    would send BEGIN on its own. Both before and after, the connection is out of autocommit mode
    and idle; a failing batch leaves no transaction open either."""
    dsn, conn = database
    counting = psycopg2.connect(dsn, connection_factory=Counting)
    handler = AutoSQL("items", role=role)
    applier = Applier(handler, "C", store_fanout=role == "destination", sleep=lambda seconds: None)
    applier.apply_batch(counting, [("w", upsert(9, 9))])       # reads the schema once
    del counting.sent[:]
    outcomes = applier.apply_batch(counting, [("a", upsert(1, 1)), ("b", upsert(2, 2)), ("c", upsert(3, 3))])
    assert [o.status for o in outcomes] == [APPLIED] * 3
    assert len(counting.sent) == trips, counting.sent
    assert counting.sent[0].startswith("BEGIN; ")
    assert counting.sent[-1].endswith("COMMIT")
    # psycopg2 sent no BEGIN of its own ("there is already a transaction in progress")
    assert not counting.notices, counting.notices
    assert not counting.autocommit and counting.status == psycopg2.extensions.STATUS_READY
    assert counting.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    # one bad packet: the fast path fails and rolls back, the careful path applies the rest
    outcomes = applier.apply_batch(counting, [("d", upsert(4, 4)), ("e", upsert("x", 5))])
    assert [o.status for o in outcomes] == [APPLIED, "dead"]
    assert not counting.autocommit and counting.status == psycopg2.extensions.STATUS_READY
    assert counting.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    with conn.cursor() as cur:
        cur.execute("SELECT id, qty FROM items ORDER BY id")
        assert cur.fetchall() == [(1, 1), (2, 2), (3, 3), (4, 4), (9, 9)]
        cur.execute("SELECT packet_id, coalesce(packet LIKE '!dead %', false)"
                    " FROM golconde.applied WHERE consumer = 'C' ORDER BY 1")
        # the dead-lettered packet is recorded as such (dead again should its batch come back)
        assert cur.fetchall() == [("a", False), ("b", False), ("c", False), ("d", False),
                                  ("e", True), ("w", False)]
    conn.rollback()
    counting.close()


def age_rows(conn, consumer, ids, seconds):
    """Record ``ids`` for ``consumer`` as applied ``seconds`` ago."""
    with conn.cursor() as cur:
        ledger.record(cur, consumer, {pid: None for pid in ids})
        cur.execute("UPDATE golconde.applied SET applied_at = now() - make_interval(secs => %s)"
                    " WHERE consumer = %s AND packet_id = ANY(%s)", (seconds, consumer, list(ids)))
    conn.commit()


def ledger_ids(conn, consumer):
    with conn.cursor() as cur:
        cur.execute("SELECT packet_id FROM golconde.applied WHERE consumer = %s ORDER BY 1", (consumer,))
        rows = [r[0] for r in cur.fetchall()]
    conn.rollback()
    return rows


def test_prune_deletes_only_old_rows_of_its_consumer_in_chunks_within_a_time_budget(database, monkeypatch):
    dsn, conn = database
    old = ["old-%03d" % i for i in range(25)]
    age_rows(conn, "Dest", old, 7200)
    age_rows(conn, "Dest", ["recent"], 10)
    age_rows(conn, "Other", ["other-old"], 7200)
    monkeypatch.setattr(ledger, "PRUNE_CHUNK", 10)
    # a budget already spent: one chunk, then it stops and says old rows are left
    assert ledger.prune(conn, "Dest", 3600, time_budget=0) == (10, False)
    assert len(ledger_ids(conn, "Dest")) == 16
    assert ledger.prune(conn, "Dest", 3600) == (15, True)           # the rest, chunk by chunk
    assert ledger_ids(conn, "Dest") == ["recent"]
    assert ledger_ids(conn, "Other") == ["other-old"]                 # another consumer's rows stay
    assert ledger.prune(conn, "Dest", 3600) == (0, True)
    assert ledger.prune(conn, "Dest", 5) == (1, True)                 # a shorter retention


def test_listeners_prune_their_ledgers_with_the_configured_retention(make_database, broker):
    from golconde.daemon import Daemon

    from .flow_support import make_config, parse_config, query, send_raw, wait_for

    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        conn = psycopg2.connect(dsn)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE items (id integer PRIMARY KEY, qty integer)")
        conn.commit()
        ledger.ensure(conn)
        conn.close()
    mapping = make_config(canonical, {"t1": t1}, "public.items", broker=broker, ledger_retention=120)
    name = next(iter(mapping["Destinations"]))
    mapping["Destinations"][name]["Targets"]["t1"]["ledger_retention"] = 600
    config = parse_config(mapping)
    conn = psycopg2.connect(t1)
    age_rows(conn, "%s_t1" % name, ["t1-old"], 900)          # older than t1's 600 s
    age_rows(conn, "%s_t1" % name, ["t1-kept"], 300)         # older than the destination's 120 s only
    conn.close()
    conn = psycopg2.connect(canonical)
    age_rows(conn, name, ["dest-old"], 300)
    conn.close()
    daemon = Daemon(config)
    daemon.start()
    try:
        send_raw(config.destinations[0].queue, [upsert(i, i) for i in range(1, 21)], broker=broker)
        wait_for(lambda: len(query(t1, "SELECT id FROM items")) == 20, message="packets applied")
        for dsn, consumer, gone, kept in ((canonical, name, "dest-old", None),
                                          (t1, "%s_t1" % name, "t1-old", "t1-kept")):
            conn = psycopg2.connect(dsn)
            try:
                wait_for(lambda: gone not in ledger_ids(conn, consumer), message="%s pruned" % gone)
                ids = ledger_ids(conn, consumer)
                assert len(ids) == 20 + (kept is not None), ids        # the new packets stay
                assert kept is None or kept in ids
            finally:
                conn.close()
    finally:
        assert daemon.stop(), "daemon did not stop in time"
