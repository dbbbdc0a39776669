"""The ways of moving workload W from the source to the two targets, each behind one interface.

A mode sets itself up on fresh databases (``src`` on the source cluster, ``t1`` and ``t2`` on the
target cluster, each holding an empty friendships table), then :meth:`Mode.drive` runs one phase
of the workload at the source and returns when the source side is done; the harness
(:mod:`bench.harness`) times, waits for the targets and reads the CPU. Golconde is used as a black
box: its commands (``golconded``, ``golconde trigger install``), a generated configuration, its
Python client and ``/stats``.
"""
from __future__ import annotations

import datetime
import json
import logging
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

import psycopg2
import yaml
from psycopg2 import sql

from .workload import BenchError, KeyRange, pgbench

LOGGER = logging.getLogger(__name__)


class Mode:
    """Base class. Attributes: ``name``; ``replicated`` (False: no targets, bare workload);
    ``enqueue_column``: how a row's enqueue time is read at the source for latency (``commit``:
    the source transaction's commit time; ``ts``: the row's ts, set by the client at send);
    ``applies_canonical``: golconded writes the source table (the client flow), so the harness
    also times the source, measures the destination's intake and splits the latency there."""

    name = "?"
    replicated = True
    enqueue_column = "commit"
    applies_canonical = False

    def __init__(self, env: Any) -> None:
        self.env = env

    def setup(self) -> None:
        """Prepare replication on the fresh databases; return once changes flow."""

    def drive(self, phase: str, keys: KeyRange, rate: Optional[float] = None) -> Tuple[float, float]:
        """Run ``phase`` over ``keys`` at the source (throttled to ``rate`` rows/s if given).
        :returns: ``(start, end)`` in ``time.monotonic()`` seconds."""
        env = self.env
        return pgbench(env.scripts[phase], env.src.port, "src", keys, phase, env.args.jobs,
                       rate=rate, log=env.path("pgbench.log"))

    def workers(self) -> List[int]:
        """Pids of the mode's own processes outside the database servers (CPU, peak RSS)."""
        return []

    def notes(self) -> List[str]:
        """Anything worth reporting about the run (dead letters, errors)."""
        return []

    def teardown(self) -> None:
        """Stop what :meth:`setup` started (also after a failure)."""


class Bare(Mode):
    """The workload alone on the source: no capture, no replication."""

    name = "bare"
    replicated = False


class Logical(Mode):
    """Native logical replication: one publication on src, one subscription in each target."""

    name = "logical"

    def setup(self) -> None:
        env = self.env
        env.execute(env.src.dsn("src"), "CREATE PUBLICATION bench_pub FOR TABLE public.friendships")
        for target in ("t1", "t2"):
            env.execute(env.tgt.dsn(target), sql.SQL(
                "CREATE SUBSCRIPTION {} CONNECTION %s PUBLICATION bench_pub").format(
                    sql.Identifier("bench_%s_%s" % (env.prefix_id, target))), (env.src.dsn("src"),))
        deadline = time.monotonic() + 120
        for target in ("t1", "t2"):
            while True:
                rows = env.query(env.tgt.dsn(target),
                                 "SELECT count(*) FILTER (WHERE srsubstate <> 'r'),"
                                 " (SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL)"
                                 " FROM pg_subscription_rel")
                if rows[0][0] == 0 and rows[0][1] > 0:
                    break
                if time.monotonic() > deadline:
                    raise BenchError("logical: subscription of %s not ready within 120 s" % target)
                time.sleep(0.2)

    def teardown(self) -> None:
        env = self.env
        for target in ("t1", "t2"):
            try:
                env.execute(env.tgt.dsn(target), sql.SQL("DROP SUBSCRIPTION IF EXISTS {}").format(
                    sql.Identifier("bench_%s_%s" % (env.prefix_id, target))))
            except psycopg2.Error as exc:
                LOGGER.warning("logical: cannot drop the subscription of %s: %s", target, exc)


class _Golconde(Mode):
    """golconded as a subprocess on a generated configuration (one destination, two targets)."""

    mode = "?"
    destination = "W"

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self.daemons: List[subprocess.Popen] = []
        #: --split: the destination in one golconded process, its targets in another
        self.split = bool(getattr(env.args, "split", False))
        self.http_ports: List[int] = []
        self.config_path = env.path("golconde-%s.yaml" % self.name)
        self.queue = "/queue/%s.%s" % (env.prefix, self.name)

    def write_config(self) -> None:
        env = self.env
        self.http_ports = []
        for _ in range(2 if self.split else 1):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.http_ports.append(probe.getsockname()[1])
        stomp = "%s:%d" % (env.stomp_host, env.stomp_port)
        destination: Dict[str, Any] = {
            "mode": self.mode, "stomp": stomp, "queue": self.queue, "pgsql": env.src.dsn("src"),
            "target": "public.friendships",
            "Targets": {t: {"stomp": stomp, "queue": "%s.%s" % (self.queue, t),
                            "pgsql": env.tgt.dsn(t), "target": "public.friendships"}
                        for t in ("t1", "t2")},
        }
        config = {
            "Logging": {"filename": env.path("golconded-%s.log" % self.name), "level": "info"},
            "HTTPServer": {"enabled": True, "listen": "127.0.0.1", "port": self.http_ports[0]},
            "Broker": {"login": env.stomp_login, "passcode": env.stomp_passcode, "heartbeat": 10000},
            "Destinations": {self.destination: destination},
        }
        with open(self.config_path, "w") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)

    def setup(self) -> None:
        self.write_config()
        self.start_daemon()

    def start_daemon(self) -> None:
        env = self.env
        log = open(env.path("golconded-%s.out" % self.name), "a")
        command = [env.bin("golconded"), "-f", "-c", self.config_path]
        if self.split:
            shares = [(self.destination, self.http_ports[0]),
                      ("%s_t1,%s_t2" % (self.destination, self.destination), self.http_ports[1])]
            self.daemons = [subprocess.Popen(command + ["--only", only, "--http-port", str(port)],
                                             stdout=log, stderr=subprocess.STDOUT)
                            for only, port in shares]
        else:
            self.daemons = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)]
        log.close()
        deadline = time.monotonic() + 60
        while True:
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise BenchError("golconded exited with status %d (see %s)"
                                     % (daemon.returncode, env.path("golconded-%s.log" % self.name)))
            threads = (self.stats() or {}).get("threads", [])
            states = [state for thread in threads for state in thread.values()]
            if len(states) == 3 and all(s.get("broker") == "connected" and s.get("database") == "connected"
                                        for s in states):
                return
            if time.monotonic() > deadline:
                raise BenchError("golconded not connected within 60 s: %s" % states)
            time.sleep(0.1)

    def stats(self) -> Optional[Dict[str, Any]]:
        """``/stats`` of the golconded process(es), their ``threads`` lists joined."""
        threads: List[Any] = []
        for port in self.http_ports:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/stats" % port, timeout=5) as resp:
                    threads.extend(json.loads(resp.read().decode()).get("threads", []))
            except (OSError, ValueError):
                return None
        return {"threads": threads}

    def stop_daemon(self) -> None:
        daemons, self.daemons = self.daemons, []
        for daemon in daemons:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
        for daemon in daemons:
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                LOGGER.warning("golconded did not stop within 30 s: killed")
                daemon.kill()
                daemon.wait(10)

    def workers(self) -> List[int]:
        return [daemon.pid for daemon in self.daemons if daemon.poll() is None]

    def notes(self) -> List[str]:
        stats = self.stats() or {}
        notes = []
        for thread in stats.get("threads", []):
            for name, values in thread.items():
                for key in ("dead_lettered", "errors", "reconnects"):
                    if values.get(key):
                        notes.append("%s: %s %s" % (name, key, values[key]))
        return notes

    def teardown(self) -> None:
        self.stop_daemon()


class GolcondeTrigger(_Golconde):
    """Trigger flow: pgbench writes the canonical table; golconde's capture trigger queues each
    change; golconded drains the queue table to the targets."""

    name = "golconde-trigger"
    mode = "trigger"

    def setup(self) -> None:
        env = self.env
        self.write_config()
        result = subprocess.run([env.bin("golconde"), "trigger", "install", "-c", self.config_path,
                                 "--destination", self.destination], capture_output=True, text=True)
        if result.returncode:
            raise BenchError("golconde trigger install failed: %s" % (result.stderr or result.stdout))
        # the install reports the capture function's language (C where the library is installed):
        # "... (key: aid; capture in c)"
        found = re.search(r"capture in (\w+)", result.stdout)
        self.capture = found.group(1) if found else "unknown"
        self.start_daemon()

    def notes(self) -> List[str]:
        capture = getattr(self, "capture", "not installed")
        return ["capture trigger: %s" % {"c": "C", "plpgsql": "PL/pgSQL"}.get(capture, capture)] + super().notes()


class GolcondeClient(_Golconde):
    """Client flow: producer threads send the rows as packets with golconde.client.Client;
    golconded applies them to the canonical table and fans them out."""

    name = "golconde-client"
    mode = "client"
    enqueue_column = "ts"
    applies_canonical = True
    chunk = 500

    @staticmethod
    def packets(phase: str, keys: List[Tuple[int, int]], ts: str) -> List[Dict[str, Any]]:
        if phase == "insert":
            return [{"action": "add", "data": {"friend_id": f, "user_id": u, "status_id": 1, "ts": ts}}
                    for f, u in keys]
        if phase == "update":
            return [{"action": "update", "data": {"status_id": 2},
                     "restriction": {"friend_id": f, "user_id": u}} for f, u in keys]
        return [{"action": "delete", "restriction": {"friend_id": f, "user_id": u}} for f, u in keys]

    def drive(self, phase: str, keys: KeyRange, rate: Optional[float] = None) -> Tuple[float, float]:
        from golconde.client import Client

        env = self.env
        producers = env.args.producers
        rows = keys.keys(phase)
        shares = [rows[i::producers] for i in range(producers)]
        plain = bool(getattr(env.args, "plain_messages", False))
        # one Client shared by the producer threads (what sends from several threads at once
        # coalesce in), or, with --client-per-producer, one each
        own = bool(getattr(env.args, "client_per_producer", False))
        clients = [Client(self.queue, env.stomp_host, env.stomp_port, env.stomp_login,
                          env.stomp_passcode, batch_messages=not plain) for _ in range(producers if own else 1)]
        errors: List[BaseException] = []
        for client in clients:
            client.connect()

        def now_text() -> str:
            return datetime.datetime.now(datetime.timezone.utc).isoformat()

        def produce(client: Any, share: List[Tuple[int, int]]) -> None:
            try:
                if rate is None:
                    for i in range(0, len(share), self.chunk):
                        client.send_many(self.packets(phase, share[i:i + self.chunk], now_text()))
                    return
                per_thread = rate / producers
                begin = time.monotonic()
                sent = 0
                while sent < len(share):
                    due = min(int((time.monotonic() - begin) * per_thread) + 1, len(share))
                    if due > sent:
                        client.send_many(self.packets(phase, share[sent:due], now_text()))
                        sent = due
                    else:
                        time.sleep(max(0.0005, begin + (sent + 1) / per_thread - time.monotonic()))
            except BaseException as exc:  # reported after join
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(clients[i % len(clients)], share),
                                    name="producer-%d" % i) for i, share in enumerate(shares)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        end = time.monotonic()
        for client in clients:
            client.close()
        if errors:
            raise BenchError("producer failed: %r" % errors[0])
        return start, end


MODES = {cls.name: cls for cls in (Bare, Logical, GolcondeTrigger, GolcondeClient)}
