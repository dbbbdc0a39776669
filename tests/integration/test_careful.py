"""The applier's careful path (each packet in its savepoint) against what the fast path cannot tell
apart:

* deferred constraints (DEFERRABLE INITIALLY DEFERRED, as Django creates every foreign key) are
  checked at COMMIT, where a failure would be the whole batch's. When the careful path's COMMIT
  fails so, it runs again with every constraint checked at once: the packet that breaks one is
  dead-lettered alone and the others are applied, at a destination and at a target. Packets that
  rely on the deferral (a child before its parent) are applied as long as the COMMIT does not fail;
* a column type changed since the schema was cached (``ALTER COLUMN id TYPE bigint``, the usual
  fix before an int key overflows) makes the cached cast refuse new values: a data error re-reads
  the schema once before the packet is dead-lettered."""
from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal

import psycopg2
import pytest

from golconde import ledger
from golconde.apply import DEAD_BEFORE, Applier, ConnectionLost
from golconde.errors import StopListener
from golconde.handlers.autosql import AutoSQL
from golconde.packet import dumps

SCHEMA = """
CREATE TABLE parent (id integer PRIMARY KEY);
CREATE TABLE child (id integer PRIMARY KEY,
                    parent_id integer REFERENCES parent DEFERRABLE INITIALLY DEFERRED);
INSERT INTO parent VALUES (1);
"""


def packet(action, data=None, restriction=None):
    document = {"action": action}
    if data:
        document["data"] = data
    if restriction:
        document["restriction"] = restriction
    return document


@pytest.fixture
def conn(database):
    connection = _ledgered(database, SCHEMA)
    yield connection
    connection.close()


def _ledgered(database, ddl):
    """A connection to ``database`` once ``ddl`` is committed there and the ledger is created."""
    conn = psycopg2.connect(database)
    with conn.cursor() as cur:
        cur.execute(ddl)
    conn.commit()
    ledger.ensure(conn)
    return conn


def rows(conn, query):
    with conn.cursor() as cur:
        cur.execute(query)
        result = cur.fetchall()
    conn.commit()
    return result


@pytest.mark.parametrize("role", ["destination", "target"])
def test_a_packet_breaking_a_deferred_foreign_key_is_dead_lettered_alone(conn, role):
    applier = Applier(AutoSQL("child", role=role), "deferred-" + role, store_fanout=role == "destination")
    items = [
        ("d1", dumps(packet("add", {"id": 1, "parent_id": 1})).encode()),
        ("d2", dumps(packet("add", {"id": 2, "parent_id": 99})).encode()),       # no parent 99
        ("d3", dumps(packet("add", {"id": 3, "parent_id": 1})).encode()),
        # a group may break the constraint in between: it is checked after the whole group
        ("d4", dumps({"group": [packet("add", {"id": 4, "parent_id": 1}),
                                packet("update", {"parent_id": 99}, {"id": 4}),
                                packet("update", {"parent_id": 1}, {"id": 4})]}).encode()),
    ]
    outcomes = applier.apply_batch(conn, items)
    assert [o.status for o in outcomes] == ["applied", "dead", "applied", "applied"]
    assert "parent" in outcomes[1].reason and "99" in outcomes[1].reason
    assert rows(conn, "SELECT id, parent_id FROM child ORDER BY id") == [(1, 1), (3, 1), (4, 1)]
    # the constraint is still deferred after the careful path: nothing of it leaked
    with conn.cursor() as cur:
        cur.execute("INSERT INTO child VALUES (5, 7)")
        cur.execute("INSERT INTO parent VALUES (7)")
    conn.commit()
    # the same batch again: duplicates, nothing applied twice, nothing fails at COMMIT
    again = applier.apply_batch(conn, items)
    assert [o.status for o in again] == ["duplicate", "dead", "duplicate", "duplicate"]


@pytest.mark.parametrize("role", ["destination", "target"])
def test_a_deferred_constraint_trigger_raising_its_own_error_dead_letters_only_its_packet(conn, role):
    """A deferred constraint trigger may raise any error at COMMIT (here P0001): the packet that
    trips it is dead-lettered alone, the others are applied, and the batch does not come back."""
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE checked (id integer PRIMARY KEY, v integer NOT NULL);"
                    "CREATE FUNCTION checked_v() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF NEW.v < 0 THEN RAISE EXCEPTION 'negative v %', NEW.v; END IF;"
                    " RETURN NULL; END $$;"
                    "CREATE CONSTRAINT TRIGGER checked_v AFTER INSERT OR UPDATE ON checked"
                    " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION checked_v()")
    conn.commit()
    applier = Applier(AutoSQL("checked", role=role), "trig-" + role, store_fanout=role == "destination")
    items = [("t1", dumps(packet("add", {"id": 1, "v": 1})).encode()),
             ("t2", dumps(packet("add", {"id": 2, "v": -1})).encode()),
             ("t3", dumps(packet("add", {"id": 3, "v": 3})).encode())]
    outcomes = applier.apply_batch(conn, items)
    assert [o.status for o in outcomes] == ["applied", "dead", "applied"]
    assert "negative v -1" in outcomes[1].reason and "P0001" in outcomes[1].reason
    assert rows(conn, "SELECT id, v FROM checked ORDER BY id") == [(1, 1), (3, 3)]


@pytest.mark.parametrize("role", ["destination", "target"])
def test_packets_relying_on_a_deferred_check_pass_the_careful_path(conn, role):
    """A bad packet sends the batch down the careful path; a node sent before its parent node
    (legal until COMMIT) is still applied there."""
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE node (id integer PRIMARY KEY,"
                    " parent integer REFERENCES node DEFERRABLE INITIALLY DEFERRED)")
    conn.commit()
    applier = Applier(AutoSQL("node", role=role), "relying-" + role, store_fanout=role == "destination")
    items = [("r1", dumps(packet("add", {"id": 2, "parent": 3})).encode()),     # before its parent
             ("r2", dumps(packet("add", {"id": "bad"})).encode()),
             ("r3", dumps(packet("add", {"id": 3})).encode())]
    outcomes = applier.apply_batch(conn, items)
    assert [o.status for o in outcomes] == ["applied", "dead", "applied"]
    assert rows(conn, "SELECT id, parent FROM node ORDER BY id") == [(2, 3), (3, None)]


def test_a_column_type_changed_since_the_schema_was_cached_is_read_again(conn):
    applier = Applier(AutoSQL("parent", role="target"), "widened")
    assert [o.status for o in applier.apply_batch(conn, [("w1", b'{"action": "add", "data": {"id": 2}}')])] \
        == ["applied"]
    with conn.cursor() as cur:
        cur.execute("ALTER TABLE child DROP CONSTRAINT child_parent_id_fkey;"
                    " ALTER TABLE parent ALTER COLUMN id TYPE bigint")
    conn.commit()
    items = [("w2", b'{"action": "add", "data": {"id": 3000000000}}'),
             ("w3", b'{"action": "add", "data": {"id": 3}}'),
             ("w4", b'{"action": "add", "data": {"id": 99999999999999999999}}')]   # over bigint
    outcomes = applier.apply_batch(conn, items)
    assert [o.status for o in outcomes] == ["applied", "applied", "dead"]
    assert "out of range" in outcomes[2].reason
    assert rows(conn, "SELECT id FROM parent ORDER BY id") == [(1,), (2,), (3,), (3000000000,)]


def test_a_row_a_trigger_skips_in_a_run_keeps_the_other_packets_generated_keys(conn):
    """A BEFORE INSERT trigger returns NULL for one row of a run of adds: the run's RETURNING has
    fewer rows than packets, so its keys cannot be paired by position; the packets are applied
    one by one instead, and each inserted row's generated key is still fanned out. The skipped
    one is not fanned out (review BB: the targets got a row the canonical table refused, under a
    key of their own)."""
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE skp (id serial PRIMARY KEY, v integer);"
                    "CREATE FUNCTION skip_zero() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF NEW.v = 0 THEN RETURN NULL; END IF; RETURN NEW; END $$;"
                    "CREATE TRIGGER skip_zero BEFORE INSERT ON skp FOR EACH ROW"
                    " EXECUTE FUNCTION skip_zero()")
    conn.commit()
    applier = Applier(AutoSQL("skp", role="destination"), "skp-destination", store_fanout=True)
    items = [("s%d" % v, dumps(packet("add", {"v": v})).encode()) for v in (1, 0, 3)]
    outcomes = applier.apply_batch(conn, items)
    assert [o.status for o in outcomes] == ["applied"] * 3
    stored = dict(rows(conn, "SELECT v, id FROM skp"))
    assert sorted(stored) == [1, 3]
    assert outcomes[1].fanout == ""                   # not inserted: not fanned out
    fanouts = [json.loads(o.fanout) for o in (outcomes[0], outcomes[2])]
    assert fanouts[0]["data"] == {"v": 1, "id": stored[1]}
    assert fanouts[1]["data"] == {"v": 3, "id": stored[3]}


def test_what_a_trigger_of_the_canonical_relation_skips_is_not_fanned_out(conn):
    """A BEFORE trigger returning NULL: an add or set it refused, or a delete it turned into a
    soft delete, changed no row there; the targets must not get them (review BB). A row it
    routed into an inheritance child is there, under the packet's key: fanned out. In runs
    (one statement for several packets) as one by one."""
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE sk (id integer PRIMARY KEY, v text, gone boolean DEFAULT false);"
                    "CREATE TABLE sk_child (PRIMARY KEY (id)) INHERITS (sk);"
                    "CREATE FUNCTION sk_rules() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF TG_OP = 'DELETE' AND OLD.v = 'gone' THEN RETURN OLD; END IF;"
                    " IF TG_OP = 'DELETE' THEN"
                    "   UPDATE sk SET gone = true WHERE id = OLD.id; RETURN NULL; END IF;"
                    " IF NEW.v = 'refuse' THEN RETURN NULL; END IF;"
                    " IF NEW.v = 'route' THEN INSERT INTO sk_child VALUES (NEW.*); RETURN NULL; END IF;"
                    " RETURN NEW; END $$;"
                    "CREATE TRIGGER sk_rules BEFORE INSERT OR DELETE ON sk FOR EACH ROW"
                    " EXECUTE FUNCTION sk_rules()")
    conn.commit()
    applier = Applier(AutoSQL("sk", role="destination"), "sk-destination", store_fanout=True)
    documents = [packet("add", {"id": 1, "v": "keep"}), packet("add", {"id": 2, "v": "refuse"}),
                 packet("add", {"id": 3, "v": "route"}), packet("add", {"id": 4, "v": "keep"}),
                 packet("set", {"id": 5, "v": "refuse"}), packet("set", {"id": 6, "v": "route"}),
                 packet("delete", restriction={"id": 1}), packet("delete", restriction={"id": 4}),
                 packet("delete", restriction={"id": 99})]
    items = [("k%d" % n, dumps(d).encode()) for n, d in enumerate(documents)]
    outcomes = applier.apply_batch(conn, items)
    assert [o.status for o in outcomes] == ["applied"] * len(items)
    assert rows(conn, "SELECT id, v, gone FROM sk ORDER BY id") == [
        (1, "keep", True), (3, "route", False), (4, "keep", True), (6, "route", False)]
    fanned = [json.loads(o.fanout) if o.fanout else None for o in outcomes]
    assert fanned == [documents[0], None, documents[2], documents[3], None, documents[5],
                      None, None, None], fanned
    # a run of deletes alone (one statement): each tells whether it removed a row
    with conn.cursor() as cur:
        cur.execute("INSERT INTO sk (id, v) VALUES (10, 'soft'), (11, 'gone'), (12, 'soft')")
    conn.commit()
    documents = [packet("delete", restriction={"id": n}) for n in (10, 11, 12, 99)]
    outcomes = applier.apply_batch(conn, [("d%d" % n, dumps(d).encode()) for n, d in enumerate(documents)])
    assert [json.loads(o.fanout) if o.fanout else None for o in outcomes] == [None, documents[1], None, None]
    assert rows(conn, "SELECT id, gone FROM sk WHERE id >= 10 ORDER BY id") == [(10, True), (12, True)]


@pytest.mark.parametrize("role", ["destination", "target"])
def test_a_type_widened_without_any_error_is_read_again_within_a_second(conn, role):
    """integer -> numeric(10,2) since the schema was cached: the cached cast would round 1.5 to
    2 without an error; the listener compares the catalog's signature at most once a second and
    reads the schema again."""
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE prices (id integer PRIMARY KEY, price integer)")
    conn.commit()
    applier = Applier(AutoSQL("prices", role=role), "prices-" + role, store_fanout=role == "destination")
    first = applier.apply_batch(conn, [("p1", dumps(packet("add", {"id": 1, "price": 1})).encode())])
    assert [o.status for o in first] == ["applied"]
    with conn.cursor() as cur:
        cur.execute("ALTER TABLE prices ALTER COLUMN price TYPE numeric(10,2)")
    conn.commit()
    time.sleep(1.1)
    items = [("p2", dumps(packet("add", {"id": 2, "price": Decimal("1.5")})).encode()),
             ("p3", dumps(packet("add", {"id": 3, "price": Decimal("2.25")})).encode())]
    assert [o.status for o in applier.apply_batch(conn, items)] == ["applied", "applied"]
    assert rows(conn, "SELECT id, price FROM prices ORDER BY id") == [
        (1, Decimal("1.00")), (2, Decimal("1.50")), (3, Decimal("2.25"))]


@pytest.mark.parametrize("role", ["destination", "target"])
def test_a_lone_surrogate_is_dead_lettered_alone_as_bad_input(conn, role, caplog):
    """A JSON escape of half a UTF-16 pair decodes to a string no encoding can write: the packet
    is dead-lettered alone with a reason that says so, as bad input (no "a bug?" error with a
    traceback), in a run of its own shape and alone."""
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.commit()
    applier = Applier(AutoSQL("notes", role=role), "c-" + role, store_fanout=role == "destination")
    bodies = [b'{"action": "add", "data": {"id": 1, "body": "ok"}}',
              b'{"action": "add", "data": {"id": 2, "body": "half \\ud800 a pair"}}',
              b'{"action": "add", "data": {"id": 3, "body": "pair \\ud83d\\ude00"}}',
              b'{"action": "update", "data": {"body": "\\udfff"}, "restriction": {"id": 1}}']
    with caplog.at_level("WARNING", logger="golconde.apply"):
        outcomes = applier.apply_batch(conn, [("p%d" % i, body) for i, body in enumerate(bodies)])
    assert [o.status for o in outcomes] == ["applied", "dead", "applied", "dead"]
    reason = ("a string holds a lone UTF-16 surrogate (U+%s, from a JSON \\u escape not in a"
              " pair), which is not Unicode text: no database can store it")
    assert (outcomes[1].reason, outcomes[3].reason) == (reason % "D800", reason % "DFFF")
    assert rows(conn, "SELECT id, body FROM notes ORDER BY id") == [(1, "ok"), (3, "pair \U0001F600")]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("role", ["destination", "target"])
def test_every_dead_letter_is_logged_with_its_id_and_reason(conn, role, caplog):
    """Refused for its form (not JSON, an unknown action), by the database, or again from the
    ledger when redelivered: each dead letter is a WARNING naming the packet and why (those
    refused before any SQL had none)."""
    applier = Applier(AutoSQL("parent", role=role), "l-" + role, store_fanout=role == "destination")
    bodies = [b'{"action": "add", "data": {"id": 2}}', b'not json', b'{"action": "upsert", "data": {"id": 3}}',
              b'{"action": "add", "data": {"id": 1}}']
    items = [("q%d" % i, body) for i, body in enumerate(bodies)]
    with caplog.at_level("WARNING", logger="golconde.apply"):
        outcomes = applier.apply_batch(conn, items)
    assert [o.status for o in outcomes] == ["applied", "dead", "dead", "dead"]
    logged = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert logged == ["[l-%s] packet %s dead-lettered: %s" % (role, pid, outcome.reason)
                      for (pid, _), outcome in zip(items[1:], outcomes[1:])]
    caplog.clear()
    with caplog.at_level("WARNING", logger="golconde.apply"):
        again = applier.apply_batch(conn, items[3:], redelivered=True)
    assert [o.status for o in again] == ["dead"]
    assert [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()] == [
        "[l-%s] packet q3 dead-lettered: %s%s" % (role, DEAD_BEFORE, outcomes[3].reason)]


def test_a_dead_letter_reason_shows_no_values_the_packet_did_not_carry(conn):
    """A constraint violation's DETAIL may show values the packet did not carry: a check or
    not-null violation's whole row, a unique or foreign key over several columns of which an
    update names one (the row's other columns): a sender allowed only to write would read
    through its outcome, the dead-letter queue or /stats any column of any row whose key it
    knows. The reason names the constraint only."""
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE accounts (id int PRIMARY KEY, qty int CHECK (qty >= 0),"
                    " note text NOT NULL DEFAULT '', login text, secret text,"
                    " UNIQUE (login, secret))")
        cur.execute("INSERT INTO accounts VALUES (1, 5, 'n', 'alice', 'the-secret'),"
                    " (2, 5, 'n', 'bob', 'the-secret')")
    conn.commit()
    applier = Applier(AutoSQL("accounts", role="target"), "leak")
    bodies = [dumps(packet("update", {"qty": -1}, {"id": 1})).encode(),
              dumps(packet("update", {"note": None}, {"id": 1})).encode(),
              dumps(packet("update", {"login": "alice"}, {"id": 2})).encode(),
              dumps(packet("add", {"id": 1, "qty": 2})).encode()]
    outcomes = applier.apply_batch(conn, [("k%d" % i, body) for i, body in enumerate(bodies)])
    reasons = [o.reason for o in outcomes]
    assert all(o.status == "dead" for o in outcomes), reasons
    assert "violates check constraint" in reasons[0] and "null value in column" in reasons[1]
    assert "duplicate key value violates unique constraint" in reasons[2]
    assert not any("the-secret" in r or "Failing row" in r for r in reasons), reasons
    assert "Key (" not in reasons[2]
    assert "Key (id)=(1) already exists" in reasons[3]      # an add's row is the packet's own


@pytest.fixture
def restricted(database):
    """A role of its own on ``database`` with USAGE on golconde and the ledger's rights, and
    ``notes`` (id, n) it may SELECT but nothing else; dropped at the end."""
    import uuid
    from psycopg2 import sql

    role = "golconde_r_%s" % uuid.uuid4().hex[:8]
    admin = psycopg2.connect(database)
    admin.autocommit = True
    ledger.ensure(admin)
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE notes (id int PRIMARY KEY, n int)")
        for statement in ("CREATE ROLE {} LOGIN", "GRANT USAGE ON SCHEMA golconde TO {}",
                          "GRANT SELECT, INSERT, DELETE ON golconde.applied TO {}",
                          "GRANT SELECT ON notes TO {}"):
            cur.execute(sql.SQL(statement).format(sql.Identifier(role)))
    params = psycopg2.extensions.parse_dsn(database)
    params["user"] = role
    conn = psycopg2.connect(psycopg2.extensions.make_dsn(**params))
    yield admin, conn, role
    conn.close()
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    admin.close()


def test_a_role_without_the_privilege_pauses_and_a_refusing_policy_dead_letters(restricted, caplog):
    """SQLSTATE 42501 either way: a role that lacks INSERT on the table (or the ledger's rights)
    would see every packet refused, so the applier stops the listener for a while, packets
    queued, rather than dead-letter them; once granted, a row-level security policy's refusal is
    that packet's own, and it is dead-lettered alone."""
    from psycopg2 import sql

    from golconde.errors import StopListener

    admin, conn, role = restricted
    applier = Applier(AutoSQL("notes", role="target"), "c-r")
    bodies = [("p%d" % n, dumps(packet("add", {"id": n, "n": n})).encode()) for n in range(1, 5)]
    with pytest.raises(StopListener) as info:
        applier.apply_batch(conn, bodies)
    assert "this role lacks INSERT on public.notes" in str(info.value)
    assert "SQLSTATE 42501" in str(info.value) and info.value.retry_after == 30.0
    with admin.cursor() as cur:
        cur.execute(sql.SQL("GRANT INSERT ON notes TO {}").format(sql.Identifier(role)))
        cur.execute(sql.SQL("REVOKE INSERT ON golconde.applied FROM {}").format(sql.Identifier(role)))
    conn.rollback()
    with pytest.raises(StopListener, match='this role lacks INSERT on golconde.applied'):
        applier.apply_batch(conn, bodies)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("GRANT INSERT ON golconde.applied TO {}").format(sql.Identifier(role)))
        cur.execute("ALTER TABLE notes ENABLE ROW LEVEL SECURITY")
        cur.execute(sql.SQL("CREATE POLICY even ON notes FOR ALL TO {} USING (true)"
                            " WITH CHECK (n % 2 = 0)").format(sql.Identifier(role)))
    conn.rollback()
    outcomes = applier.apply_batch(conn, bodies)
    assert [o.status for o in outcomes] == ["dead", "applied", "dead", "applied"]
    assert "SQLSTATE 42501: new row violates row-level security policy" in outcomes[0].reason
    assert rows(admin, "SELECT id FROM notes ORDER BY id") == [(2,), (4,)]
    # refused on another object, a table the target's own trigger writes: every packet would be,
    # so the listener pauses too (review DD: each was dead-lettered)
    with admin.cursor() as cur:
        cur.execute("DROP POLICY even ON notes")
        cur.execute("CREATE TABLE notes_log (id int)")
        cur.execute("CREATE FUNCTION notes_log() RETURNS trigger LANGUAGE plpgsql AS"
                    " $$BEGIN INSERT INTO notes_log VALUES (NEW.id); RETURN NEW; END$$")
        cur.execute("CREATE TRIGGER notes_log AFTER INSERT ON notes FOR EACH ROW"
                    " EXECUTE FUNCTION notes_log()")
        cur.execute(sql.SQL("CREATE POLICY every ON notes FOR ALL TO {} USING (true)").format(
            sql.Identifier(role)))
    conn.rollback()
    more = [("q%d" % n, dumps(packet("add", {"id": n, "n": n})).encode()) for n in range(5, 8)]
    with pytest.raises(StopListener, match="this role lacks a privilege on table notes_log"):
        applier.apply_batch(conn, more)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("GRANT INSERT ON notes_log TO {}").format(sql.Identifier(role)))
    conn.rollback()
    assert [o.status for o in applier.apply_batch(conn, more)] == ["applied"] * 3


def test_a_destination_role_that_may_not_read_the_key_back_pauses(restricted):
    """At a destination, add and set read the stored key back (RETURNING): without SELECT on the
    table every one is refused, so the listener pauses rather than dead-letter them."""
    from psycopg2 import sql

    from golconde.errors import StopListener

    admin, conn, role = restricted
    with admin.cursor() as cur:
        cur.execute(sql.SQL("GRANT INSERT ON notes TO {}").format(sql.Identifier(role)))
        cur.execute(sql.SQL("REVOKE SELECT ON notes FROM {}").format(sql.Identifier(role)))
    applier = Applier(AutoSQL("notes", role="destination"), "c-d", store_fanout=True)
    with pytest.raises(StopListener, match="this role lacks SELECT on public.notes"):
        applier.apply_batch(conn, [("p1", dumps(packet("add", {"id": 1, "n": 1})).encode())])


@pytest.mark.parametrize("role", ["destination", "target"])
def test_a_dead_letter_stays_dead_when_its_batch_comes_back_and_a_replay_applies_it(conn, role):
    """A packet dead-lettered for the table's state (a duplicate key) is recorded so in the ledger
    with the batch: the batch delivered again (its ack lost to a broker fault) dead-letters it
    again rather than apply it after the packets that followed it, which had changed the state
    it failed on; sent back by ``golconde dlq replay``, it is applied."""
    applier = Applier(AutoSQL("parent", role=role), "c-dead-" + role, store_fanout=role == "destination")
    batch = [("p-add", dumps(packet("add", {"id": 1})).encode()),         # parent 1 exists: dead
             ("p-del", dumps(packet("delete", restriction={"id": 1})).encode())]
    first = applier.apply_batch(conn, batch)
    assert [o.status for o in first] == ["dead", "applied"]
    assert "23505" in first[0].reason
    again = applier.apply_batch(conn, batch, redelivered=True)
    assert [o.status for o in again] == ["dead", "duplicate"]
    # the first time's reason, said to be that (review PP: the cause may be gone since)
    assert again[0].reason == DEAD_BEFORE + first[0].reason and again[0].fanout is None
    assert rows(conn, "SELECT id FROM parent") == []
    replay = applier.apply_batch(conn, batch[:1], replayed=["p-add"])
    assert [o.status for o in replay] == ["applied"]
    assert rows(conn, "SELECT id FROM parent") == [(1,)]
    assert [o.status for o in applier.apply_batch(conn, batch[:1], replayed=["p-add"])] == ["duplicate"]


class _BrokenCommit(psycopg2.extensions.connection):
    """A real connection whose next COMMITs fail for no packet's fault: just before each, a row
    breaking a deferred foreign key is written (as a deferred trigger of another application
    might), so PostgreSQL refuses the COMMIT (23503) on both careful passes."""

    broken = 0      # how many of the next COMMITs fail

    def commit(self):
        if self.broken and self.status != psycopg2.extensions.STATUS_READY:
            self.broken -= 1
            with self.cursor() as cur:
                cur.execute("SET CONSTRAINTS ALL DEFERRED;"
                            " INSERT INTO child VALUES (1000 + (random() * 1e6)::int, 424242)")
        return super().commit()


@pytest.mark.parametrize("role", ["destination", "target"])
def test_a_batch_whose_checked_commit_fails_is_dead_lettered_and_stays_so(database, role):
    """When even the checked COMMIT fails, every new packet of the batch is dead-lettered with
    that reason and recorded so in the ledger: delivered again (its ack lost), the batch is
    dead-lettered again rather than applied after what followed it. A packet applied before keeps
    its outcome (duplicate), and a replay applies the dead ones."""
    conn = psycopg2.connect(database, connection_factory=_BrokenCommit)
    try:
        with conn.cursor() as cur:
            cur.execute(SCHEMA)
        conn.commit()
        ledger.ensure(conn)
        applier = Applier(AutoSQL("parent", role=role), "broken-" + role,
                          store_fanout=role == "destination")
        earlier = [("b0", dumps(packet("add", {"id": 10})).encode())]
        assert [o.status for o in applier.apply_batch(conn, earlier)] == ["applied"]
        # b3's bad value sends the batch down the careful path, whose COMMITs then fail
        batch = earlier + [("b1", dumps(packet("add", {"id": 11})).encode()),
                           ("b2", dumps(packet("delete", restriction={"id": 10})).encode()),
                           ("b3", dumps(packet("add", {"id": "bad"})).encode())]
        conn.broken = 2      # the careful path's COMMIT, then its checked COMMIT
        outcomes = applier.apply_batch(conn, batch)
        assert [o.status for o in outcomes] == ["duplicate", "dead", "dead", "dead"]
        assert all("COMMIT failed" in o.reason and "23503" in o.reason for o in outcomes[1:3])
        assert "COMMIT" not in outcomes[3].reason and "bad" in outcomes[3].reason
        if role == "destination":
            assert json.loads(outcomes[0].fanout)["action"] == "add"
        assert conn.broken == 0
        assert rows(conn, "SELECT id FROM parent ORDER BY id") == [(1,), (10,)]
        assert rows(conn, "SELECT count(*) FROM child") == [(0,)]
        again = applier.apply_batch(conn, batch, redelivered=True)
        assert [o.status for o in again] == ["duplicate", "dead", "dead", "dead"]
        assert [o.reason for o in again[1:]] == [DEAD_BEFORE + o.reason for o in outcomes[1:]]
        assert rows(conn, "SELECT id FROM parent ORDER BY id") == [(1,), (10,)]
        replay = applier.apply_batch(conn, batch[1:3], replayed=["b1", "b2"])
        assert [o.status for o in replay] == ["applied", "applied"]
        assert rows(conn, "SELECT id FROM parent ORDER BY id") == [(1,), (11,)]
    finally:
        conn.close()


@pytest.mark.parametrize("role", ["destination", "target"])
@pytest.mark.parametrize("name", ["v", '"p%c""t"'])
def test_a_dead_letter_names_the_value_the_database_refused(database, role, name):
    """PostgreSQL's data errors seldom name the column ("smallint out of range"): the reason of a
    packet dead-lettered for one starts with the value at fault, data.<key> or
    restriction.<key>, found by casting each value alone to its column's type. A table named with
    a % is explained too (its name was bound with the % doubled: the explanation failed and
    aborted the batch's transaction, which then came back for ever). A bit string of the wrong
    length is named by its length (an explicit cast pads or cuts it)."""
    conn = _ledgered(database, "CREATE DOMAIN short4 AS varchar(4); CREATE DOMAIN shorter AS short4;"
                        " CREATE DOMAIN posint AS integer CHECK (VALUE > 0); CREATE DOMAIN bits3 AS bit(3);"
                        " CREATE TABLE %s (id integer PRIMARY KEY, a smallint, b smallint,"
                        " n numeric(5, 2), code varchar(3), at timestamptz, d shorter, p posint,"
                        " b3 bit(3), vb varbit(4), db bits3,"
                        " CHECK (a IS NULL OR b IS NULL OR a < b))" % name)
    try:
        applier = Applier(AutoSQL(name, role=role), "explain-" + role, store_fanout=role == "destination")
        cases = [({"action": "add", "data": {"id": 1, "a": 1, "b": 40000}}, "data.b: SQLSTATE 22003"),
                 ({"action": "add", "data": {"id": 2, "n": 1234.5}}, "data.n: SQLSTATE 22003"),
                 ({"action": "add", "data": {"id": 3, "code": "abcd"}}, "data.code: SQLSTATE 22001"),
                 ({"action": "add", "data": {"id": 4, "at": "not a time"}}, "data.at: SQLSTATE 22007"),
                 ({"action": "update", "data": {"a": 1}, "restriction": {"id": "x"}},
                  "restriction.id: SQLSTATE 22P02"),
                 ({"group": [{"action": "add", "data": {"id": 5}},
                             {"action": "add", "data": {"id": 6, "a": "many"}}]},
                  "group member 1 (0-based, of 2): data.a: SQLSTATE 22P02"),
                 # a domain's type modifier and CHECK (review BB: the column was not named)
                 ({"action": "add", "data": {"id": 7, "d": "abcde"}}, "data.d: SQLSTATE 22001"),
                 ({"action": "add", "data": {"id": 8, "p": 0}}, "data.p: SQLSTATE 23514"),
                 # bit strings of the wrong length, which an explicit cast pads or cuts
                 ({"action": "add", "data": {"id": 11, "b3": "1", "vb": "1"}}, "data.b3: SQLSTATE 22026"),
                 ({"action": "add", "data": {"id": 12, "b3": "101", "vb": "x1F"}}, "data.vb: SQLSTATE 22001"),
                 ({"action": "add", "data": {"id": 13, "db": "1010"}}, "data.db: SQLSTATE 22026"),
                 # a table's CHECK: no single value at fault, no name
                 ({"action": "add", "data": {"id": 10, "a": 5, "b": 1}}, "SQLSTATE 23514")]
        items = [("x%d" % n, dumps(body).encode()) for n, (body, _) in enumerate(cases)]
        items.append(("ok", dumps({"action": "add", "data": {"id": 9, "code": "abc"}}).encode()))
        outcomes = applier.apply_batch(conn, items)
        assert [o.status for o in outcomes] == ["dead"] * len(cases) + ["applied"]
        for outcome, (_, expected) in zip(outcomes, cases):
            assert outcome.reason.startswith(expected), (outcome.reason, expected)
        assert rows(conn, "SELECT id FROM %s" % name) == [(9,)]
    finally:
        conn.close()


class _BrokenExplanation(AutoSQL):
    """A handler whose explanation runs a statement that fails."""

    def explain_error(self, cursor, packet, error):
        cursor.execute("SELECT * FROM no_such_table")


def test_an_explanation_that_fails_does_not_abort_the_batch(database):
    """A handler's explain_error that fails in the database (a custom handler's, or a bug) runs in
    a savepoint of its own: the packet is dead-lettered with PostgreSQL's reason and the rest of
    the batch is applied."""
    conn = _ledgered(database, "CREATE TABLE v (id integer PRIMARY KEY, a smallint)")
    try:
        applier = Applier(_BrokenExplanation("v"), "broken-explanation")
        items = [("a", dumps({"action": "add", "data": {"id": 1}}).encode()),
                 ("b", dumps({"action": "add", "data": {"id": 2, "a": 40000}}).encode()),
                 ("c", dumps({"action": "add", "data": {"id": 3}}).encode())]
        outcomes = applier.apply_batch(conn, items)
        assert [o.status for o in outcomes] == ["applied", "dead", "applied"]
        assert outcomes[1].reason.startswith("SQLSTATE 22003")
        assert rows(conn, "SELECT id FROM v ORDER BY id") == [(1,), (3,)]
    finally:
        conn.close()


class _Unruly(AutoSQL):
    """AutoSQL doing what a handler must not, by the packet's ``v``: end the listener's
    transaction, or raise a psycopg2 "lost connection" error of its own (a side connection)."""

    def apply(self, cursor, packet):
        doing = packet.data.get("v")
        if doing == "commit":
            cursor.execute("COMMIT")
        elif doing == "rollback":
            cursor.connection.rollback()
        elif doing == "side":
            raise psycopg2.OperationalError("lookup service: connection refused")
        elif doing == "closed":
            raise psycopg2.InterfaceError("cursor already closed")
        elif doing == "exit":
            raise SystemExit(3)
        elif doing == "close":
            cursor.close()
        elif doing == "pause":
            cursor.execute("COMMIT")
            raise StopListener("pausing", retry_after=5)
        elif doing == "own savepoint":      # its own savepoint misused: its packet's error
            cursor.execute("SAVEPOINT mine; RELEASE SAVEPOINT mine; RELEASE SAVEPOINT mine")
        return super().apply(cursor, packet)

    def apply_batch(self, cursor, packets):
        return [self.apply(cursor, packet) for packet in packets]


def _items(*values):
    return [("u%d" % n, dumps({"action": "add", "data": {"id": n, "v": v}}).encode())
            for n, v in enumerate(values)]


@pytest.mark.parametrize("values,stop", [
    (("ok", "commit", "ok"), "ended the listener's transaction"),           # the fast path
    (("ok", "bad", "rollback", "ok"), "ended the listener's transaction"),  # the careful path
    (("ok", "bad", "commit", "ok"), "ended the listener's transaction"),
    (("ok", "pause", "ok"), "ended the listener's transaction"),  # not a pause: it committed
    (("ok", "close", "ok"), "closed the listener's cursor"),
    (("ok", "bad", "close", "ok"), "closed the listener's cursor"),
])
def test_a_handler_that_ends_the_transaction_stops_the_listener(database, values, stop):
    """A handler that commits or rolls back the listener's transaction, or closes its cursor
    (which the contract forbids), stops the listener with an error naming it: its packets were
    counted applied, or lost with their ledger records committed, as if the batch were whole,
    or the batch came back for ever."""
    conn = _ledgered(database, "CREATE TABLE u (id integer PRIMARY KEY, v text CHECK (v <> 'bad'))")
    try:
        applier = Applier(_Unruly("u"), "unruly", sleep=lambda seconds: None)
        with pytest.raises(StopListener, match="handler _Unruly " + stop) as info:
            applier.apply_batch(conn, _items(*values))
        assert info.value.retry_after is None
    finally:
        conn.close()


def test_a_lost_connection_error_of_the_handlers_own_is_retried_then_dead_lettered(database):
    """psycopg2 errors that mean a lost connection, raised by a handler while the listener's
    connection is fine (a side connection of its, a cursor it closed), are the packet's: retried
    max_retries times, then dead-lettered; the others are applied (the batch was replayed on new
    sessions for ever). A SystemExit from the handler is a bug: that packet is dead-lettered
    (it ended the listener's thread); so is an error with its own savepoints (3B001, taken for
    the end of the listener's transaction)."""
    conn = _ledgered(database, "CREATE TABLE u (id integer PRIMARY KEY, v text)")
    try:
        slept = []
        applier = Applier(_Unruly("u"), "unruly", max_retries=2, sleep=slept.append)
        outcomes = applier.apply_batch(conn, _items("ok", "side", "ok", "closed", "ok", "exit",
                                                    "own savepoint"))
        assert [o.status for o in outcomes] == ["applied", "dead", "applied", "dead", "applied", "dead",
                                                "dead"]
        assert outcomes[6].reason.startswith("SQLSTATE 3B001")
        # the whole batch was tried 3 times (its first try, 2 retries), then each packet alone
        assert outcomes[1].reason == ("gave up after 3 attempts alone, after 3 of its whole batch:"
                                      " OperationalError: lookup service: connection refused")
        assert outcomes[3].reason == ("gave up after 3 attempts alone, after 3 of its whole batch:"
                                      " InterfaceError: cursor already closed")
        assert outcomes[5].reason == "RuntimeError: the handler raised SystemExit(3)"
        assert rows(conn, "SELECT id FROM u ORDER BY id") == [(0,), (2,), (4,)]
        assert slept
    finally:
        conn.close()


def test_a_value_refused_by_a_column_type_changed_since_it_was_cached_is_applied(database):
    """ALTER COLUMN qty TYPE numeric: a packet with 1.5 that comes before the cached schema is
    checked again (every second) is not refused as a fraction for an integer column; the schema
    is read again and the packet applied. A value the new type refuses still is."""
    from golconde.schema import SchemaCache

    conn = _ledgered(database, "CREATE TABLE q (id integer PRIMARY KEY, qty integer)")
    try:
        clock = [1000.0]           # the cache's clock stands still: never checked again
        applier = Applier(AutoSQL("q", cache=SchemaCache(clock=lambda: clock[0])), "retyped")
        first = applier.apply_batch(conn, [("a", dumps(packet("add", {"id": 1, "qty": 1})).encode())])
        assert [o.status for o in first] == ["applied"]
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE q ALTER COLUMN qty TYPE numeric(10, 2)")
        conn.commit()
        outcomes = applier.apply_batch(conn, [
            ("b", dumps(packet("add", {"id": 2, "qty": 1.5})).encode()),
            ("c", dumps(packet("add", {"id": 3, "qty": 2.25})).encode()),
            ("d", dumps(packet("add", {"id": 4, "qty": {"n": 1}})).encode())])
        assert [o.status for o in outcomes] == ["applied", "applied", "dead"]
        assert "is numeric: an object is accepted only for json" in outcomes[2].reason
        assert rows(conn, "SELECT id, qty::text FROM q ORDER BY id") == [
            (1, "1.00"), (2, "1.50"), (3, "2.25")]
    finally:
        conn.close()


def test_a_second_type_change_within_the_second_is_seen_before_a_dead_letter(database):
    """Two ALTER COLUMN ... TYPE within a second: the first data error re-reads the schema (once
    a second at most); the second, in that second, dead-lettered good packets against the type
    before it (targets then differed from the canonical table). The catalog's signature is now
    compared first, and the packet applied."""
    from golconde.schema import SchemaCache

    conn = _ledgered(database, "CREATE TABLE r (id integer PRIMARY KEY, c integer)")
    try:
        clock = [1000.0]           # the cache's clock stands still: never checked again by itself
        applier = Applier(AutoSQL("r", cache=SchemaCache(clock=lambda: clock[0])), "retyped twice")
        assert [o.status for o in applier.apply_batch(
            conn, [("a", dumps(packet("add", {"id": 1, "c": 1})).encode())])] == ["applied"]
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE r ALTER COLUMN c TYPE numeric(10, 2)")
        conn.commit()
        assert [o.status for o in applier.apply_batch(
            conn, [("b", dumps(packet("add", {"id": 2, "c": 2.25})).encode())])] == ["applied"]
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE r ALTER COLUMN c TYPE text")
        conn.commit()
        outcomes = applier.apply_batch(conn, [
            ("c", dumps(packet("update", {"c": "r1-1"}, {"id": 1})).encode()),
            ("d", dumps(packet("add", {"id": 3, "c": "r1-3"})).encode())])
        assert [(o.status, o.reason) for o in outcomes] == [("applied", None), ("applied", None)]
        assert rows(conn, "SELECT id, c FROM r ORDER BY id") == [(1, "r1-1"), (2, "2.25"), (3, "r1-3")]
        # a value the current type refuses is still dead-lettered, after one look at the catalog
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE r ALTER COLUMN c TYPE integer USING 0")
        conn.commit()
        outcomes = applier.apply_batch(conn, [("e", dumps(packet("add", {"id": 4, "c": 1})).encode()),
                                              ("f", dumps(packet("add", {"id": 5, "c": "x"})).encode()),
                                              ("g", dumps(packet("add", {"id": 6, "c": "y"})).encode())])
        assert [o.status for o in outcomes] == ["applied", "dead", "dead"]
        assert rows(conn, "SELECT id, c FROM r ORDER BY id") == [(1, 0), (2, 0), (3, 0), (4, 1)]
    finally:
        conn.close()


class _ReturnsNothing(AutoSQL):
    """A custom handler that writes, then returns None (or, for value "dict", a dict)."""

    def apply(self, cursor, packet):
        super().apply(cursor, packet)
        return {"not": "a packet"} if packet.data.get("v") == "dict" else None


@pytest.mark.parametrize("batch", [True, False])
def test_a_destination_handler_returning_none_fans_its_packet_out_unchanged(database, batch):
    """apply() returning None at a destination dead-lettered the packet with an AttributeError
    ('NoneType' object has no attribute 'matched'); it now means the packet unchanged, as at a
    target. Anything else that is no Packet is dead-lettered, its reason naming the handler."""
    conn = _ledgered(database, "CREATE TABLE n (id integer PRIMARY KEY, v text)")
    try:
        applier = Applier(_ReturnsNothing("n", role="destination"), "returns-none", store_fanout=True)
        bodies = [packet("add", {"id": 1, "v": "a"}), packet("add", {"id": 2, "v": "dict"}),
                  packet("add", {"id": 3, "v": "c"})]
        items = [(str(n), dumps(body).encode()) for n, body in enumerate(bodies)]
        if batch:
            outcomes = applier.apply_batch(conn, items)
        else:
            outcomes = [applier.apply_batch(conn, [item])[0] for item in items]
        assert [o.status for o in outcomes] == ["applied", "dead", "applied"]
        assert outcomes[1].reason == ("handler _ReturnsNothing returned dict, not a Packet: return the"
                                      " packet it was given (or None when unchanged)")
        assert [json.loads(outcomes[i].fanout) for i in (0, 2)] == [bodies[0], bodies[2]]
        assert rows(conn, "SELECT id, v FROM n ORDER BY id") == [(1, "a"), (3, "c")]
    finally:
        conn.close()


class _ReturnsRowcount(AutoSQL):
    def apply(self, cursor, packet):
        super().apply(cursor, packet)
        return cursor.rowcount


def test_a_target_ignores_what_its_handler_returns(database):
    """A target fans nothing out: what apply() returns is not used there, in a batch that goes
    through whole or one replayed packet by packet (a good packet was dead-lettered in the
    latter when its handler returned no Packet)."""
    conn = _ledgered(database, "CREATE TABLE rt (id integer PRIMARY KEY, v text)")
    try:
        applier = Applier(_ReturnsRowcount("rt", role="target"), "returns-rowcount")
        first = applier.apply_batch(conn, [("a", dumps(packet("add", {"id": 1})).encode()),
                                           ("b", dumps(packet("add", {"id": 2})).encode())])
        assert [o.status for o in first] == ["applied", "applied"]
        second = applier.apply_batch(conn, [("c", dumps(packet("add", {"id": 3})).encode()),
                                            ("d", dumps(packet("add", {"id": 1})).encode())])
        assert [o.status for o in second] == ["applied", "dead"]
        assert rows(conn, "SELECT id FROM rt ORDER BY id") == [(1,), (2,), (3,)]
    finally:
        conn.close()


class _EndsInExplanation(AutoSQL):
    def explain_error(self, cursor, packet, error):
        cursor.connection.rollback()


def test_an_explanation_that_ends_the_transaction_stops_the_listener(database):
    """explain_error runs under the same watch as apply: ending the transaction there looped
    (the dead letter's ledger record failed, taken for a lost connection)."""
    conn = _ledgered(database, "CREATE TABLE v (id integer PRIMARY KEY, a smallint)")
    try:
        applier = Applier(_EndsInExplanation("v"), "ends-in-explanation")
        with pytest.raises(StopListener, match="ended the listener's transaction"):
            applier.apply_batch(conn, [("a", dumps({"action": "add", "data": {"id": 1, "a": 40000}}).encode())])
    finally:
        conn.close()


def test_a_packet_too_long_once_its_keys_are_filled_in_is_dead_lettered_at_the_destination(
        database, monkeypatch):
    """The keys a destination fills in lengthen a packet (a group of adds with uuid keys): one
    that no target would take any more is dead-lettered at the destination, its changes rolled
    back, instead of being applied there and dead-lettered at every target."""
    from golconde import apply as apply_module

    monkeypatch.setattr(apply_module, "MAX_PACKET_BYTES", 2000)
    conn = _ledgered(database, "CREATE TABLE g (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
                               " v text)")
    try:
        applier = Applier(AutoSQL("g", role="destination"), "grown", store_fanout=True)
        group = {"group": [{"action": "add", "data": {"v": "x"}} for _ in range(40)]}
        body = dumps(group).encode()
        assert len(body) < 2000
        outcomes = applier.apply_batch(conn, [
            ("a", dumps(packet("add", {"v": "before"})).encode()), ("big", body),
            ("b", dumps(packet("add", {"v": "after"})).encode())])
        assert [o.status for o in outcomes] == ["applied", "dead", "applied"]
        assert outcomes[1].reason.startswith("the packet with its generated keys filled in is")
        assert "more than the 2000 a target takes" in outcomes[1].reason
        assert len(json.loads(outcomes[0].fanout)["data"]["id"]) == 36
        assert rows(conn, "SELECT v FROM g ORDER BY v") == [("after",), ("before",)]
    finally:
        conn.close()


@pytest.mark.parametrize("role", ["destination", "target"])
def test_a_session_terminated_mid_batch_is_reported_with_its_cause(database, role):
    """The rollback after a terminated session fails too ("connection already closed"): the
    error raised names the statement's error first, which says why."""
    connection = _ledgered(database, """
        CREATE TABLE doomed (id integer PRIMARY KEY);
        CREATE FUNCTION doomed_end() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END$$;
        CREATE TRIGGER doomed_end BEFORE INSERT ON doomed FOR EACH ROW EXECUTE FUNCTION doomed_end();
    """)
    applier = Applier(AutoSQL("doomed", role=role), "doomed-" + role, store_fanout=role == "destination")
    try:
        with pytest.raises(ConnectionLost) as raised:
            applier.apply_batch(connection, [("t1", dumps(packet("add", {"id": 1})).encode())])
        message = str(raised.value)
        # libpq's words for a session its server ended ("terminating connection due to
        # administrator command" when it reads the FATAL message in time)
        assert message.startswith("OperationalError: "), message
        assert "terminat" in message, message
        assert message.endswith("; then rollback failed: InterfaceError: connection already closed")
    finally:
        connection.close()


@pytest.mark.parametrize("role", ["destination", "target"])
def test_a_plpgsql_trigger_planned_before_an_alter_column_type_does_not_dead_letter(database, role):
    """A PL/pgSQL trigger's plans are fixed at first use in a session: after ALTER COLUMN ...
    TYPE (by another session) every statement firing it failed in this session only, 'type of
    parameter N (character varying) does not match that when preparing the plan (text)' (42804),
    and every packet was dead-lettered until a restart (review DD). The schema path now discards
    the session's plans too."""
    conn = _ledgered(database, """
        CREATE TABLE audited (id integer PRIMARY KEY, tag text);
        CREATE TABLE audit_log (tag text);
        CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN INSERT INTO audit_log VALUES (NEW.tag); IF NEW.tag = 'x' THEN NULL; END IF;
          RETURN NEW; END$$;
        CREATE TRIGGER audit AFTER INSERT OR UPDATE ON audited FOR EACH ROW EXECUTE FUNCTION audit();
    """)
    other = psycopg2.connect(database)
    other.autocommit = True
    try:
        applier = Applier(AutoSQL("audited", role=role), "audit-" + role, store_fanout=role == "destination")
        first = applier.apply_batch(conn, [("a0", dumps(packet("add", {"id": 0, "tag": "a"})).encode())])
        assert [o.status for o in first] == ["applied"]
        with other.cursor() as cur:
            cur.execute("ALTER TABLE audited ALTER COLUMN tag TYPE varchar(200)")
        items = [("a%d" % n, dumps(packet("add", {"id": n, "tag": "t%d" % n})).encode()) for n in range(1, 4)]
        outcomes = applier.apply_batch(conn, items)
        assert [o.status for o in outcomes] == ["applied"] * 3, [o.reason for o in outcomes]
        assert rows(conn, "SELECT count(*) FROM audit_log") == [(4,)]
    finally:
        other.close()
        conn.close()


def test_a_refused_set_on_an_existing_row_and_a_refused_add_without_a_key_are_not_fanned_out(conn):
    """The review of a523482 (FF): a set a BEFORE UPDATE trigger refused finds its row there
    all the same, so "a row of that key exists" fanned it out; only a row in an inheritance child
    (routed) counts now. A key-only set of an existing row (DO NOTHING) is still fanned out; an
    add refused on a table without a primary key (nothing returned to miss) is not."""
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE acc (id integer PRIMARY KEY, v integer, locked boolean DEFAULT false);"
                    "CREATE FUNCTION acc_lock() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF OLD.locked THEN RETURN NULL; END IF; RETURN NEW; END $$;"
                    "CREATE TRIGGER acc_lock BEFORE UPDATE ON acc FOR EACH ROW EXECUTE FUNCTION acc_lock();"
                    "CREATE FUNCTION no_neg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF NEW.v < 0 THEN RETURN NULL; END IF; RETURN NEW; END $$;"
                    "CREATE TRIGGER no_neg BEFORE INSERT ON acc FOR EACH ROW EXECUTE FUNCTION no_neg();"
                    "INSERT INTO acc VALUES (1, 1, true), (2, 1, false);"
                    "CREATE TABLE nopk (v integer);"
                    "CREATE TRIGGER no_neg BEFORE INSERT ON nopk FOR EACH ROW EXECUTE FUNCTION no_neg();"
                    "CREATE TABLE link (a integer, b integer, PRIMARY KEY (a, b));"
                    "INSERT INTO link VALUES (1, 1);")
    conn.commit()

    def fanned(relation, documents):
        applier = Applier(AutoSQL(relation, role="destination"), relation + "-d", store_fanout=True)
        items = [("%s-%s" % (relation, uuid.uuid4().hex), dumps(d).encode()) for d in documents]
        outcomes = applier.apply_batch(conn, items)
        assert [o.status for o in outcomes] == ["applied"] * len(items), [o.reason for o in outcomes]
        return [json.loads(o.fanout) if o.fanout else None for o in outcomes]

    sets = [packet("set", {"id": 1, "v": 99}), packet("set", {"id": 2, "v": 99}),
            packet("add", {"id": 1, "v": -5}), packet("set", {"id": 3, "v": -1})]
    assert fanned("acc", sets) == [None, sets[1], None, None]
    assert rows(conn, "SELECT id, v FROM acc ORDER BY id") == [(1, 1), (2, 99)]
    adds = [packet("add", {"v": 1}), packet("add", {"v": -1}), packet("add", {"v": 2})]
    assert fanned("nopk", adds) == [adds[0], None, adds[2]]           # a run, replayed one by one
    assert fanned("nopk", [adds[1]]) == [None]
    assert fanned("nopk", [adds[0], adds[2]]) == [adds[0], adds[2]]    # a run that wrote every row
    keyed = [packet("set", {"a": 1, "b": 1}), packet("set", {"a": 2, "b": 2})]
    assert fanned("link", keyed) == keyed                              # DO NOTHING: the row is there
    assert rows(conn, "SELECT count(*) FROM nopk") == [(4,)]
    # a run of key-only sets with a row a trigger refused (review GG: 3b8bda9 fanned the whole
    # run out when DO NOTHING returned fewer rows), and the same in a group
    with conn.cursor() as cur:
        cur.execute("CREATE FUNCTION no_neg_a() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF NEW.a < 0 THEN RETURN NULL; END IF; RETURN NEW; END $$;"
                    "CREATE TRIGGER no_neg_a BEFORE INSERT ON link FOR EACH ROW EXECUTE FUNCTION no_neg_a()")
    conn.commit()
    run = [packet("set", {"a": 1, "b": 1}), packet("set", {"a": -2, "b": 2}), packet("set", {"a": 3, "b": 3})]
    assert fanned("link", run) == [run[0], None, run[2]]
    group = {"group": [packet("set", {"a": 1, "b": 1}), packet("set", {"a": -1, "b": 1})]}
    assert fanned("link", [group]) == [{"group": [group["group"][0]]}]
    assert rows(conn, "SELECT a, b FROM link ORDER BY a, b") == [(1, 1), (2, 2), (3, 3)]


def test_adds_a_trigger_routes_into_children_of_a_table_without_a_key_are_fanned_out(conn):
    """A log table without a key split by a routing trigger (review GG: 3b8bda9 no longer
    distributed its adds): a row of the same values in a child is a routed one; a refused row
    is nowhere, and not fanned out."""
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE logs (at date, msg text);"
                    "CREATE TABLE logs_2024 (CHECK (at < '2025-01-01')) INHERITS (logs);"
                    "CREATE TABLE logs_2025 (CHECK (at >= '2025-01-01')) INHERITS (logs);"
                    "CREATE FUNCTION logs_route() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF NEW.msg = 'refused' THEN RETURN NULL; END IF;"
                    " IF NEW.at < '2025-01-01' THEN INSERT INTO logs_2024 VALUES (NEW.*);"
                    " ELSE INSERT INTO logs_2025 VALUES (NEW.*); END IF; RETURN NULL; END $$;"
                    "CREATE TRIGGER logs_route BEFORE INSERT ON logs FOR EACH ROW EXECUTE FUNCTION logs_route()")
    conn.commit()
    applier = Applier(AutoSQL("logs", role="destination"), "logs-d", store_fanout=True)
    documents = [packet("add", {"at": "2024-05-01", "msg": "a"}), packet("add", {"at": "2025-05-01", "msg": None}),
                 packet("add", {"at": "2025-06-01", "msg": "refused"})]
    for batch in ([documents[0]], documents):          # alone, then in a run
        outcomes = applier.apply_batch(conn, [("l%s" % uuid.uuid4().hex, dumps(d).encode()) for d in batch])
        assert [json.loads(o.fanout) if o.fanout else None for o in outcomes] == (
            [documents[0]] if len(batch) == 1 else [documents[0], documents[1], None])
    assert rows(conn, "SELECT count(*) FROM logs") == [(3,)]
