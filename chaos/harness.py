"""One scenario on one flow: three databases, one destination with two targets, golconded as a
subprocess, the stream, and the figures at the end (:class:`FlowRun`, :class:`Result`)."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import psycopg2
import psycopg2.extensions

from golconde import trigger
from tests.conftest import Broker
from tests.integration.flow_support import DaemonProcess, make_config, write_config

from . import services, workload
from .workload import Effect, Model

LOGGER = logging.getLogger(__name__)

#: STOMP heart-beat of the daemon under test, ms (a dead broker is noticed within ~2 heart-beats).
HEARTBEAT_MS = 2000


@dataclass
class Result:
    """The figures of one scenario on one flow (one row of the final table)."""

    scenario: str
    flow: str
    sent: int = 0
    applied: Dict[str, int] = field(default_factory=dict)     # database label -> packets applied
    dead_lettered: int = 0
    lost: int = 0
    double: int = 0
    restarts: int = 0
    duration: float = 0.0
    equal: Dict[str, bool] = field(default_factory=dict)      # target label -> equal to canonical
    notes: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.lost == 0 and self.double == 0 and self.dead_lettered == 0 \
            and all(self.equal.values()) and bool(self.equal)

    def as_dict(self) -> Dict[str, Any]:
        return {"scenario": self.scenario, "flow": self.flow, "sent": self.sent,
                "applied": self.applied, "dead_lettered": self.dead_lettered, "lost": self.lost,
                "double_applied": self.double, "restarts_survived": self.restarts,
                "duration_s": round(self.duration, 1), "equal": self.equal, "ok": self.ok,
                "notes": self.notes, "problems": self.problems}


def in_transaction(state: Optional[str]) -> bool:
    return state in ("active", "idle in transaction", "idle in transaction (aborted)")


class FlowRun:
    """Canonical + target1 + target2 (each with :data:`workload.SCHEMA`), one destination in
    ``flow`` mode (``client`` or ``trigger``) on ``broker``, golconded as a subprocess with its
    HTTP server on a free port, and the stream's feeder (not started).

    :param server_dsn: maintenance DSN of the shared PostgreSQL.
    :param target1_server: maintenance DSN of the server of target1 (default: the shared one).
    :param node: the RabbitMQ node of ``broker`` for rabbitmqctl (``None``: the default node).
    """

    def __init__(self, scenario: str, flow: str, packets: int, rate: float, workdir: str,
                 server_dsn: str, broker: Broker, rng: random.Random,
                 target1_server: Optional[str] = None, node: Optional[str] = None) -> None:
        self.scenario, self.flow, self.packets = scenario, flow, packets
        self.broker, self.node, self.rng = broker, node, rng
        self.workdir = workdir
        self.run_id = uuid.uuid4().hex[:6]
        self.name = "Chaos_%s_%s_%s" % (scenario.replace("-", ""), flow, self.run_id)
        self.result = Result(scenario, flow)
        self.dsns: Dict[str, str] = {}
        self.extra_queues: List[str] = []
        self.began = time.monotonic()
        prefix = "golconde_chaos_%s" % flow[0]
        try:
            self.dsns["canonical"] = services.create_database(server_dsn, prefix)
            self.dsns["target1"] = services.create_database(target1_server or server_dsn, prefix)
            self.dsns["target2"] = services.create_database(server_dsn, prefix)
            for dsn in self.dsns.values():
                workload.create_schema(dsn)
        except psycopg2.Error:
            for dsn in self.dsns.values():
                services.drop_database(dsn)
            raise
        self.http_port = services.free_port()
        self.mapping = make_config(self.dsns["canonical"],
                                   {"target1": self.dsns["target1"], "target2": self.dsns["target2"]},
                                   workload.TABLE, mode=flow, name=self.name, http_port=self.http_port,
                                   broker=broker)
        self.mapping["Broker"]["heartbeat"] = HEARTBEAT_MS
        self.mapping["Logging"] = {"level": "info",
                                   "format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
        if flow == "trigger":
            conn = psycopg2.connect(self.dsns["canonical"])
            try:
                trigger.install(conn, workload.TABLE, self.name)
            finally:
                conn.close()
        os.makedirs(workdir, exist_ok=True)
        self.config_path = write_config(os.path.join(workdir, self.name + ".yaml"), self.mapping)
        self.log_path = os.path.join(workdir, self.name + ".log")
        self.daemon = DaemonProcess(self.config_path, self.log_path)
        self.model = Model(self.run_id, rng)
        destination = self.mapping["Destinations"][self.name]
        self.queue = destination["queue"]
        self._stat_connections: Dict[str, Any] = {}
        self.duplicates_banked = 0       # /stats "duplicates" of the daemon's earlier lives
        if flow == "client":
            self.feeder: workload.Feeder = workload.Sender(
                self.model, packets, rate, self.queue,
                (broker.host, broker.port, broker.login, broker.passcode))
        else:
            self.feeder = workload.Writer(self.model, packets, rate, self.dsns["canonical"])

    # -- queues ------------------------------------------------------------------------------------
    def amqp_queues(self) -> List[str]:
        """Every queue of this run on the broker, dead-letter queues included."""
        destination = self.mapping["Destinations"][self.name]
        names = [services.amqp_name(destination["queue"])]
        names += [services.amqp_name(t["queue"]) for t in destination["Targets"].values()]
        names += [services.amqp_name(q) for q in self.extra_queues]
        return sorted(set(names + [n + ".dlq" for n in names]))

    def depths(self) -> Dict[str, int]:
        mine = set(self.amqp_queues())
        return {name: depth for name, depth in services.queue_depths(self.node).items() if name in mine}

    def dead_letters(self) -> int:
        return sum(depth for name, depth in self.depths().items() if name.endswith(".dlq"))

    def queue_table_backlog(self) -> int:
        """Rows of this destination waiting in the canonical ``golconde.queue`` (trigger flow)."""
        if self.flow != "trigger":
            return 0
        conn = psycopg2.connect(self.dsns["canonical"])
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM golconde.queue WHERE destination = %s", (self.name,))
                return cur.fetchone()[0]
        finally:
            conn.close()

    # -- daemon ------------------------------------------------------------------------------------
    def start_daemon(self) -> None:
        self.daemon = DaemonProcess(self.config_path, self.log_path).start()

    @property
    def pid(self) -> Optional[int]:
        proc = self.daemon.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def kill_daemon(self) -> None:
        self.daemon.kill()

    def signal_daemon(self, signum: int) -> None:
        assert self.daemon.proc is not None
        self.daemon.proc.send_signal(signum)

    def stats(self) -> Optional[Dict[str, Dict[str, Any]]]:
        """``/stats`` of the daemon by thread name, or None when it does not answer."""
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/stats" % self.http_port, timeout=3) as reply:
                body = json.loads(reply.read().decode("utf-8"))
        except (OSError, ValueError):
            return None
        threads: Dict[str, Dict[str, Any]] = {}
        for entry in body.get("threads", []):
            threads.update(entry)
        return threads

    def duplicates(self) -> int:
        """Packets the running daemon received again and skipped as already applied (the
        ledger), summed over its threads; 0 when it does not answer."""
        stats = self.stats() or {}
        return sum(thread.get("duplicates", 0) for thread in stats.values())

    def bank_duplicates(self) -> None:
        """Before the daemon dies: keep its duplicates count (its counters die with it)."""
        self.duplicates_banked += self.duplicates()

    def wait_connected(self, timeout: float = 90.0, threads: Optional[Sequence[str]] = None) -> float:
        """Wait until ``/stats`` shows every thread (or ``threads``) with broker and database
        connected. Returns the seconds waited. :raises RuntimeError: not in time."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            stats = self.stats()
            if stats and all(name in stats for name in (threads or ())):
                wanted = [stats[n] for n in threads] if threads else list(stats.values())
                if wanted and all(s["broker"] == "connected" and s["database"] == "connected"
                                  for s in wanted):
                    return time.monotonic() - began
            time.sleep(0.3)
        raise RuntimeError("daemon not connected after %.0fs: %s" % (timeout, self.stats()))

    def reconnects(self, thread: str) -> int:
        """The ``reconnects`` counter of ``thread`` in ``/stats`` (-1 when it does not answer)."""
        stats = self.stats() or {}
        return stats.get(thread, {}).get("reconnects", -1)

    def wait_reconnected(self, thread: str, before: int, timeout: float = 120.0) -> float:
        """Wait until ``thread`` counted a reconnect more than ``before`` and is connected again.
        Returns the seconds waited. :raises RuntimeError: not in time."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            stats = (self.stats() or {}).get(thread)
            if stats and stats["reconnects"] > before and stats["database"] == "connected" \
                    and stats["broker"] == "connected":
                return time.monotonic() - began
            time.sleep(0.2)
        raise RuntimeError("%s did not reconnect within %.0fs: %s" % (thread, timeout, self.stats()))

    def log_text(self) -> str:
        try:
            return self.daemon.log()
        except OSError:
            return ""

    # -- progress ----------------------------------------------------------------------------------
    def count(self, label: str) -> int:
        """Row changes committed so far in database ``label``."""
        return workload.log_count(self.dsns[label])

    def target_progress(self) -> float:
        """Fraction of the whole stream applied at both targets (0..1)."""
        done = sum(self.count(label) for label in ("target1", "target2"))
        return done / (2.0 * self.packets)

    def wait_progress(self, fraction: float, stall: float = 180.0) -> None:
        """Wait until the targets applied ``fraction`` of the stream.

        :raises RuntimeError: no progress at all for ``stall`` seconds, or the feeder failed."""
        best, since = -1.0, time.monotonic()
        while True:
            progress = self.target_progress()
            if progress >= fraction:
                return
            if self.feeder.error is not None:
                raise RuntimeError("feeder failed: %r" % self.feeder.error)
            if progress > best:
                best, since = progress, time.monotonic()
            elif time.monotonic() - since > stall:
                raise RuntimeError("no progress for %.0fs at %.1f%% (waiting for %.1f%%)"
                                   % (stall, 100 * progress, 100 * fraction))
            time.sleep(0.25)

    def sessions(self) -> Dict[str, Optional[str]]:
        """State (pg_stat_activity) of the daemon's session in each database: ``canonical`` (the
        destination's), ``target1``, ``target2``; None when it has none."""
        states: Dict[str, Optional[str]] = {label: None for label in self.dsns}
        by_server: Dict[Tuple[str, str], List[str]] = {}
        for label, dsn in self.dsns.items():
            params = psycopg2.extensions.parse_dsn(dsn)
            by_server.setdefault((params.get("host", ""), params.get("port", "5432")), []).append(label)
        for labels in by_server.values():
            names = {psycopg2.extensions.parse_dsn(self.dsns[l])["dbname"]: l for l in labels}
            conn = self._stat_connection(self.dsns[labels[0]])
            with conn.cursor() as cur:
                cur.execute("SELECT datname, state FROM pg_stat_activity WHERE datname = ANY(%s)"
                            " AND application_name LIKE 'golconde %%'"
                            " AND application_name NOT LIKE 'golconde listen %%'", (list(names),))
                for datname, state in cur.fetchall():
                    label = names[datname]
                    if states[label] is None or in_transaction(state):
                        states[label] = state
        return states

    def _stat_connection(self, dsn: str) -> Any:
        key = services.with_dbname(dsn, "postgres")
        conn = self._stat_connections.get(key)
        if conn is None or conn.closed:
            conn = psycopg2.connect(key, application_name="chaos monitor")
            conn.autocommit = True
            self._stat_connections[key] = conn
        return conn

    def close_monitor(self) -> None:
        for conn in self._stat_connections.values():
            try:
                conn.close()
            except psycopg2.Error:
                pass
        self._stat_connections.clear()

    # -- the end -------------------------------------------------------------------------------------
    def settled(self) -> bool:
        """Everything sent is applied everywhere and nothing waits in a queue."""
        if not self.feeder.done:
            return False
        sent = self.feeder.sent
        if any(self.count(label) < sent for label in ("canonical", "target1", "target2")):
            return False
        if self.queue_table_backlog():
            return False
        return all(depth == 0 for depth in self.depths().values())

    def wait_settled(self, timeout: float, stall: float = 120.0) -> bool:
        """Wait for :meth:`settled`, twice 2 s apart (nothing more arriving). False after
        ``timeout`` seconds, or when nothing moved (applied counts, queue depths) for ``stall``
        seconds (something is lost or stuck: no point waiting longer)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        moved = time.monotonic()
        while time.monotonic() < deadline:
            try:
                if self.settled():
                    time.sleep(2.0)
                    if self.settled():
                        return True
                state = ({l: self.count(l) for l in self.dsns}, self.depths(), self.feeder.sent)
                if state != last:
                    last, moved = state, time.monotonic()
                elif time.monotonic() - moved > stall:
                    LOGGER.warning("%s: nothing moved for %.0fs: %s", self.name, stall, state)
                    return False
            except (psycopg2.Error, services.ServiceError) as exc:
                LOGGER.info("settling: %s", exc)
            time.sleep(1.0)
        return False

    def finish(self, timeout: float, labels: Sequence[str] = ("canonical", "target1", "target2")) -> Result:
        """Wait for the stream and for the daemon to drain it, then measure: packets applied per
        database, lost and double-applied effects, dead letters, each target compared with the
        canonical table (count + hash), the canonical table checked against the model."""
        result = self.result
        try:
            self.feeder.finish(timeout)
        except RuntimeError as exc:
            result.problems.append(str(exc))
        result.sent = self.feeder.sent
        if not self.wait_settled(timeout):
            result.problems.append("not settled: sent %d, applied %s, queues %s, queue table %d"
                                   % (self.feeder.sent, {l: self.count(l) for l in labels},
                                      self.depths(), self.queue_table_backlog()))
        expected: Set[Effect] = set(self.feeder.effects)
        for label in labels:
            counted = workload.count_database(self.dsns[label], expected)
            result.applied[label] = counted.applied
            result.lost += counted.lost
            result.double += counted.double
            if counted.unexpected or counted.counter_low:
                result.problems.append("%s: %d unexpected effects, %d updates missing by the counter"
                                       % (label, counted.unexpected, counted.counter_low))
            if counted.lost or counted.double:
                result.notes.append("%s: lost %d, double-applied %d" % (label, counted.lost, counted.double))
        differing = workload.rows_differing_from_model(self.dsns["canonical"], self.model)
        if differing:
            result.problems.append("canonical: %d rows differ from the stream's model" % differing)
        for label in labels:
            if label != "canonical":
                equal, summary = workload.equal_to_canonical(self.dsns["canonical"], self.dsns[label])
                result.equal[label] = equal
                result.notes.append("compare canonical -> %s: %s" % (label, summary))
        result.dead_lettered = self.dead_letters()
        result.notes.append("redeliveries skipped as already applied (ledger; /stats duplicates"
                            " summed over the daemon's lives, at least): %d"
                            % (self.duplicates_banked + self.duplicates()))
        result.duration = time.monotonic() - self.began
        return result

    def cleanup(self, keep: bool = False) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL), then unless ``keep`` drop the databases and
        delete the queues."""
        self.feeder.halt()
        self.close_monitor()
        proc = self.daemon.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: force it
                self.daemon.kill()
        if keep:
            LOGGER.info("kept databases %s and queues %s", list(self.dsns.values()), self.amqp_queues())
            return
        for dsn in self.dsns.values():
            services.drop_database(dsn)
        services.delete_queues(self.amqp_queues(), self.node)
