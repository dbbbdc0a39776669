"""The chaos workload: one keyed table in which every applied change is counted, in every database.

The same table exists in the canonical database and in each target::

    chaos_counter (id integer PRIMARY KEY, n integer NOT NULL, tag text NOT NULL,
                   applies integer NOT NULL DEFAULT 0)
    chaos_log     (seq bigserial, op "char", id integer, tag text)      -- not distributed

* Every packet carries a ``tag`` of its own (``<run>-<sequence>``), written into the row.
* ``applies`` is raised by one by a BEFORE UPDATE trigger on every UPDATE a database executes,
  whatever the statement sets. ``n`` counts the updates the row received in the canonical
  history (0 when inserted), and every packet sets it to an absolute value. So in every database
  ``applies == n`` for every row: a packet applied twice leaves ``applies > n`` (the double apply
  a replayed absolute UPDATE would otherwise hide), a lost one ``applies < n`` or a wrong row.
* An AFTER ROW trigger writes each committed row change into ``chaos_log`` as ``(op, tag)``
  (``I``/``U`` with the new tag, ``D`` with the deleted row's last tag). Each packet has exactly
  one such effect and all effects are distinct, so per database: applied = log rows,
  double-applied = rows - distinct effects, lost = expected effects missing.

The stream (:class:`Model`) mixes ADD (new ids), UPDATE (``n`` + 1), SET (upsert: an update of a
live row, or the re-insertion of a deleted one) and DELETE. The client flow sends it as packets
(:class:`Sender`); the trigger flow runs it as SQL on the canonical table (:class:`Writer`,
``UPDATE ... SET n = n + 1``: the captured packet carries the new absolute value).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import psycopg2

from golconde.broker import CREATED_HEADER, ID_HEADER, BrokerConnection, BrokerError
from golconde.compare import compare
from golconde.packet import parse

LOGGER = logging.getLogger(__name__)

TABLE = "public.chaos_counter"

SCHEMA = """
CREATE TABLE public.chaos_counter (
    id      integer PRIMARY KEY,
    n       integer NOT NULL,
    tag     text    NOT NULL,
    applies integer NOT NULL DEFAULT 0
);
CREATE TABLE public.chaos_log (
    seq bigserial PRIMARY KEY,
    op  "char"  NOT NULL,
    id  integer NOT NULL,
    tag text    NOT NULL
);
CREATE FUNCTION public.chaos_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.applies := OLD.applies + 1;
    RETURN NEW;
END $$;
CREATE FUNCTION public.chaos_log_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO public.chaos_log (op, id, tag) VALUES ('D', OLD.id, OLD.tag);
    ELSE
        INSERT INTO public.chaos_log (op, id, tag) VALUES (left(TG_OP, 1), NEW.id, NEW.tag);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_count BEFORE UPDATE ON public.chaos_counter
    FOR EACH ROW EXECUTE FUNCTION public.chaos_count_update();
CREATE TRIGGER chaos_log AFTER INSERT OR UPDATE OR DELETE ON public.chaos_counter
    FOR EACH ROW EXECUTE FUNCTION public.chaos_log_change();
"""

Effect = Tuple[str, str]      # (op I/U/D, tag)


def create_schema(dsn: str) -> None:
    """Create the workload's tables and triggers in the (empty) database ``dsn``."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(SCHEMA)
        conn.commit()
    finally:
        conn.close()


@dataclass(frozen=True)
class Op:
    """One change of the stream.

    :ivar kind: ``add``, ``update``, ``set`` or ``delete``.
    :ivar id: the row's key.
    :ivar n: the row's ``n`` after the change (``delete``: before it).
    :ivar tag: the change's own tag, unique in the stream; also its packet id (``golconde-id``).
    :ivar effect: ``(op, tag)`` as ``chaos_log`` records it (``delete``: ``("D", <the tag of the
        deleted row's last change>)``).
    """

    kind: str
    id: int
    n: int
    tag: str
    effect: Effect

    def packet(self) -> Dict[str, Any]:
        """The client-flow packet (values absolute, so the packet alone cannot reveal a replay)."""
        if self.kind == "add":
            return {"action": "add", "data": {"id": self.id, "n": 0, "tag": self.tag}}
        if self.kind == "update":
            return {"action": "update", "data": {"n": self.n, "tag": self.tag},
                    "restriction": {"id": self.id}}
        if self.kind == "set":
            return {"action": "set", "data": {"id": self.id, "n": self.n, "tag": self.tag}}
        return {"action": "delete", "restriction": {"id": self.id}}

    def statement(self) -> Tuple[str, tuple]:
        """The trigger-flow SQL run on the canonical table (relative update: ``n = n + 1``)."""
        if self.kind == "add":
            return "INSERT INTO public.chaos_counter (id, n, tag) VALUES (%s, 0, %s)", (self.id, self.tag)
        if self.kind == "update":
            return "UPDATE public.chaos_counter SET n = n + 1, tag = %s WHERE id = %s", (self.tag, self.id)
        if self.kind == "set":
            return ("INSERT INTO public.chaos_counter AS c (id, n, tag) VALUES (%s, 0, %s)"
                    " ON CONFLICT (id) DO UPDATE SET n = c.n + 1, tag = EXCLUDED.tag",
                    (self.id, self.tag))
        return "DELETE FROM public.chaos_counter WHERE id = %s", (self.id,)


class Model:
    """Generates the stream and keeps the canonical state it must lead to.

    :param prefix: unique per run; tags are ``<prefix>-<sequence>``.
    :param rng: the random generator (seeded by the caller, for reproducible streams).
    """

    def __init__(self, prefix: str, rng: random.Random) -> None:
        self.prefix = prefix
        self.rng = rng
        self.rows: Dict[int, Tuple[int, str]] = {}      # id -> (n, tag)
        self._live: List[int] = []                       # ids of rows, for O(1) random picks
        self._where: Dict[int, int] = {}
        self._gone: List[int] = []                       # deleted ids (SET may bring them back)
        self._next_id = 1
        self.sequence = 0

    def _tag(self) -> str:
        self.sequence += 1
        return "%s-%d" % (self.prefix, self.sequence)

    def _insert(self, key: int, tag: str) -> None:
        self.rows[key] = (0, tag)
        self._where[key] = len(self._live)
        self._live.append(key)

    def _remove(self, key: int) -> None:
        index = self._where.pop(key)
        last = self._live.pop()
        if last != key:
            self._live[index] = last
            self._where[last] = index
        del self.rows[key]

    def next(self) -> Op:
        """The next change, applied to the model."""
        tag = self._tag()
        roll = self.rng.random()
        if len(self._live) < 50 or roll < 0.35:
            key, self._next_id = self._next_id, self._next_id + 1
            self._insert(key, tag)
            return Op("add", key, 0, tag, ("I", tag))
        if roll < 0.75:
            key = self.rng.choice(self._live)
            n = self.rows[key][0] + 1
            self.rows[key] = (n, tag)
            return Op("update", key, n, tag, ("U", tag))
        if roll < 0.88:
            if self._gone and self.rng.random() < 0.4:
                key = self._gone.pop(self.rng.randrange(len(self._gone)))
                self._insert(key, tag)
                return Op("set", key, 0, tag, ("I", tag))
            key = self.rng.choice(self._live)
            n = self.rows[key][0] + 1
            self.rows[key] = (n, tag)
            return Op("set", key, n, tag, ("U", tag))
        key = self.rng.choice(self._live)
        n, last_tag = self.rows[key]
        self._remove(key)
        self._gone.append(key)
        return Op("delete", key, n, tag, ("D", last_tag))


class Feeder(threading.Thread):
    """Base of the stream's producers: ``total`` changes from ``model`` at about ``rate`` per second
    (0: as fast as possible). ``sent`` counts the confirmed (client flow) or committed (trigger
    flow) ones, ``ops`` holds them in order."""

    def __init__(self, name: str, model: Model, total: int, rate: float, batch: int) -> None:
        super().__init__(name=name, daemon=True)
        self.model = model
        self.total = total
        self.rate = rate
        self.batch_size = batch
        self.sent = 0
        self.ops: List[Op] = []          # the changes confirmed or committed, in order
        self.retries = 0
        self.error: Optional[BaseException] = None
        self.started_at = 0.0
        self.finished_at: Optional[float] = None
        self._halt = threading.Event()
        self._paused = threading.Event()

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self.open()
            while self.sent < self.total and not self._halt.is_set():
                if self._paused.is_set():
                    time.sleep(0.05)
                    continue
                ops = [self.model.next() for _ in range(min(self.batch_size, self.total - self.sent))]
                self.deliver(ops)
                self.ops.extend(ops)
                self.sent += len(ops)
                if self.rate:
                    ahead = self.sent / self.rate - (time.monotonic() - self.started_at)
                    if ahead > 0:
                        self._halt.wait(ahead)
        except BaseException as exc:  # reported by finish()
            LOGGER.exception("%s failed after %d changes", self.name, self.sent)
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.close()

    def open(self) -> None:
        raise NotImplementedError

    def deliver(self, ops: Sequence[Op]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def effects(self) -> List[Effect]:
        """The expected ``chaos_log`` entry of each change sent so far."""
        return [op.effect for op in self.ops[:self.sent]]

    @property
    def done(self) -> bool:
        return not self.is_alive() and self.sent >= self.total

    def pause(self, paused: bool = True) -> None:
        """Hold the stream (e.g. while checking a quiet state); ``pause(False)`` resumes it."""
        if paused:
            self._paused.set()
        else:
            self._paused.clear()

    def halt(self) -> None:
        self._halt.set()
        self.join(30)

    def finish(self, timeout: float) -> None:
        """Wait for the whole stream. :raises RuntimeError: it failed or did not end in time."""
        self.join(timeout)
        if self.is_alive():
            self.halt()
            raise RuntimeError("%s did not finish within %.0fs (%d of %d sent)"
                               % (self.name, timeout, self.sent, self.total))
        if self.error is not None:
            raise RuntimeError("%s failed after %d changes: %r" % (self.name, self.sent, self.error))


class Sender(Feeder):
    """Client flow: sends the stream as packets to a destination queue, ``batch`` per confirmation.

    Each packet has a ``golconde-id`` of its own (``<prefix>-<sequence>``). A batch whose
    confirmation fails (broker down) is re-sent, with the same ids, until it is confirmed: a
    message the broker had stored before failing is then there twice, and the destination's ledger
    must apply it once.
    """

    def __init__(self, model: Model, total: int, rate: float, queue: str,
                 broker: Tuple[str, int, Optional[str], Optional[str]], batch: int = 100) -> None:
        super().__init__("chaos-sender", model, total, rate, batch)
        self.queue = queue
        self.broker = broker
        self.connection: Optional[BrokerConnection] = None

    def _connect(self) -> BrokerConnection:
        host, port, login, passcode = self.broker
        connection = BrokerConnection(host, port, login, passcode, heartbeat_ms=0, name="chaos-sender")
        connection.connect(10)
        return connection

    def open(self) -> None:
        pass

    def deliver(self, ops: Sequence[Op]) -> None:
        now = "%.3f" % time.time()
        messages = [(self.queue, parse(op.packet()).to_json(),
                     {ID_HEADER: op.tag, CREATED_HEADER: now, "content-type": "application/json"})
                     for op in ops]
        failures = 0
        while not self._halt.is_set():
            try:
                if self.connection is None or not self.connection.connected:
                    self.connection = self._connect()
                self.connection.send_confirmed(messages, 20)
                if failures:
                    LOGGER.info("sender: %d packets confirmed after %d attempts", len(messages),
                                failures + 1)
                return
            except BrokerError as exc:
                if not failures:
                    LOGGER.info("sender: %s; re-sending %d packets (same ids) until confirmed",
                                exc, len(messages))
                failures += 1
                self.retries += 1
                if self.connection is not None:
                    self.connection.close()
                    self.connection = None
                self._halt.wait(0.5)
        raise RuntimeError("halted")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


class Writer(Feeder):
    """Trigger flow: runs the stream as SQL on the canonical table, ``batch`` changes per
    transaction (the capture trigger queues each row change)."""

    def __init__(self, model: Model, total: int, rate: float, dsn: str, batch: int = 10) -> None:
        super().__init__("chaos-writer", model, total, rate, batch)
        self.dsn = dsn
        self.db: Any = None

    def open(self) -> None:
        self.db = psycopg2.connect(self.dsn, application_name="chaos writer")

    def deliver(self, ops: Sequence[Op]) -> None:
        with self.db.cursor() as cur:
            for op in ops:
                cur.execute(*op.statement())
                if cur.rowcount != 1:
                    raise RuntimeError("%s changed %d rows, expected 1" % (op, cur.rowcount))
        self.db.commit()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


# -- counting ------------------------------------------------------------------------------------

@dataclass
class DatabaseCount:
    """What one database holds, measured against the expected effects.

    :ivar applied: row changes committed (``chaos_log`` rows): packets applied.
    :ivar distinct: distinct effects among them.
    :ivar lost: expected effects missing.
    :ivar double: effects applied more than once (``applied - distinct``), or more UPDATEs than
        the canonical history has (``applies - n`` summed), whichever is larger.
    :ivar unexpected: effects that no packet should have had.
    :ivar counter_low: rows with fewer UPDATEs than ``n`` says (an update lost on the way).
    """

    applied: int = 0
    distinct: int = 0
    lost: int = 0
    double: int = 0
    unexpected: int = 0
    counter_low: int = 0


def read_effects(dsn: str) -> List[Effect]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT op, tag FROM public.chaos_log")
            return [(str(op), tag) for op, tag in cur.fetchall()]
    finally:
        conn.close()


def count_database(dsn: str, expected: Set[Effect], window: Optional[Set[Effect]] = None) -> DatabaseCount:
    """Count ``dsn``'s effects against ``expected``. With ``window`` (a target added or removed
    mid-stream), only those effects must be there, and any expected effect may be."""
    effects = read_effects(dsn)
    present = set(effects)
    result = DatabaseCount(applied=len(effects), distinct=len(present))
    must = expected if window is None else window
    result.lost = len(must - present)
    result.unexpected = len(present - expected)
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT coalesce(sum(applies - n) FILTER (WHERE applies > n), 0),"
                        " coalesce(sum(n - applies) FILTER (WHERE applies < n), 0)"
                        " FROM public.chaos_counter")
            excess, low = cur.fetchone()
    finally:
        conn.close()
    result.double = max(result.applied - result.distinct, int(excess))
    result.counter_low = int(low)
    return result


def rows_differing_from_model(dsn: str, model: Model) -> int:
    """Rows of ``dsn``'s table that differ from the model's state (missing, extra, or another
    ``n``/``tag``, or ``applies != n``)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, n, tag, applies FROM public.chaos_counter")
            rows = cur.fetchall()
    finally:
        conn.close()
    differing = 0
    seen = set()
    for key, n, tag, applies in rows:
        seen.add(key)
        if model.rows.get(key) != (n, tag) or applies != n:
            differing += 1
    return differing + len(set(model.rows) - seen)


def equal_to_canonical(canonical: str, target: str) -> Tuple[bool, str]:
    """:func:`golconde.compare.compare` of the workload table: (equal, one-line summary)."""
    result = compare(canonical, TABLE, target, TABLE)
    return result.equal, result.summary()


def log_count(dsn: str) -> int:
    """Row changes committed so far in ``dsn`` (cheap progress measure)."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM public.chaos_log")
            return cur.fetchone()[0]
    finally:
        conn.close()


def self_check(dsn: str) -> Dict[str, int]:
    """Prove on ``dsn`` (an empty database) that the counting sees a double apply and a loss: an
    ADD, an UPDATE run twice and an UPDATE never run must give double = 1 and lost = 1.

    :raises AssertionError: the counting is blind to either."""
    create_schema(dsn)
    model = Model("selfcheck", random.Random(1))
    add = model.next()
    assert add.kind == "add"
    first = Op("update", add.id, 1, "selfcheck-u1", ("U", "selfcheck-u1"))
    second = Op("update", add.id, 2, "selfcheck-u2", ("U", "selfcheck-u2"))
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(*add.statement())
            for _ in range(2):   # the first update applied twice, with its absolute values
                cur.execute("UPDATE public.chaos_counter SET n = %s, tag = %s WHERE id = %s",
                            (first.n, first.tag, first.id))
        conn.commit()            # ... and the second one lost
    finally:
        conn.close()
    counted = count_database(dsn, {add.effect, first.effect, second.effect})
    assert counted.double == 1 and counted.lost == 1, counted
    return {"double": counted.double, "lost": counted.lost}

