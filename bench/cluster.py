"""The benchmark's own PostgreSQL clusters: created with initdb, started and stopped with pg_ctl.

Two clusters, so that the CPU of the source and of the targets can be told apart (each is one
postmaster's process tree, see :mod:`bench.procstat`) and so that nothing runs on the shared
server at 5432: ``src`` (port P) holds the source/canonical database, ``tgt`` (port P+1) the two
target databases. Both have ``wal_level = logical`` (the same for every mode). When the harness
runs as root, initdb and pg_ctl run as user ``postgres`` (PostgreSQL refuses to run as root).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import pwd
import socket
import subprocess
import time
from typing import List, Optional

import psycopg2
from psycopg2 import sql

LOGGER = logging.getLogger(__name__)

SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_logical_replication_workers": "8",
    "max_worker_processes": "16",
    "max_connections": "100",
    "shared_buffers": "128MB",
    "max_wal_size": "2GB",
    "log_min_messages": "warning",
    "logging_collector": "off",
    "track_commit_timestamp": "on",  # latency: commit time of each row on every side
}
#: Settings that need a restart when a running cluster has other values.
RESTART_SETTINGS = ("wal_level", "track_commit_timestamp", "max_replication_slots",
                    "max_wal_senders", "max_worker_processes", "shared_buffers")


class ClusterError(RuntimeError):
    """A cluster could not be created, started or stopped."""


def bindir() -> str:
    """Directory of PostgreSQL's server programs (the newest under /usr/lib/postgresql, or
    ``pg_config --bindir``)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return os.path.dirname(candidates[-1])
    try:
        return subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ClusterError("PostgreSQL server programs not found: %s" % exc) from None


def data_directory(workdir: str, name: str) -> str:
    """``<workdir>/pg/<name>``, or when user postgres (used when running as root) cannot reach
    ``workdir`` (e.g. a checkout under a private home directory),
    ``/var/tmp/golconde-bench/<hash of workdir>/<name>``."""
    os.makedirs(workdir, exist_ok=True)
    probe = ["runuser", "-u", "postgres", "--", "test", "-x", workdir]
    if os.geteuid() != 0 or subprocess.run(probe).returncode == 0:
        return os.path.join(workdir, "pg", name)
    digest = hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:10]
    base = os.path.join("/var/tmp/golconde-bench", digest)
    os.makedirs(base, exist_ok=True)
    os.chmod("/var/tmp/golconde-bench", 0o755)
    os.chmod(base, 0o755)
    return os.path.join(base, name)


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


class Cluster:
    """One PostgreSQL cluster in ``datadir`` listening on 127.0.0.1:``port``, user postgres."""

    def __init__(self, name: str, datadir: str, port: int) -> None:
        self.name, self.datadir, self.port = name, datadir, port
        self.bindir = bindir()
        self.started_here = False
        self.as_postgres = os.geteuid() == 0

    def _run(self, argv: List[str], timeout: float = 120) -> str:
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if result.returncode:
            raise ClusterError("%s: %s failed: %s" % (self.name, " ".join(argv),
                                                      (result.stderr or result.stdout)[-2000:]))
        return result.stdout

    def dsn(self, dbname: str = "postgres") -> str:
        return "host=127.0.0.1 port=%d user=postgres dbname=%s" % (self.port, dbname)

    @property
    def version(self) -> str:
        return os.path.basename(os.path.dirname(self.bindir))

    def ensure(self) -> None:
        """Create the cluster if its data directory is empty, then start it if it is not running.

        :raises ClusterError: initdb or pg_ctl failed, or the port is used by something else.
        """
        if not os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            os.makedirs(self.datadir, exist_ok=True)
            if self.as_postgres:
                record = pwd.getpwnam("postgres")
                os.chown(self.datadir, record.pw_uid, record.pw_gid)
            os.chmod(self.datadir, 0o700)
            LOGGER.info("initdb %s", self.datadir)
            self._run([os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", "postgres",
                       "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"], timeout=300)
        with open(os.path.join(self.datadir, "postgresql.auto.conf"), "w") as handle:
            handle.write("# written by the golconde benchmark harness (bench/cluster.py)\n")
            for key, value in dict(SETTINGS, port=str(self.port)).items():
                handle.write("%s = %s\n" % (key, value))
        if self.pid() is not None:
            if self._answers():
                if self._needs_restart():
                    LOGGER.info("%s: restarting to apply its settings", self.name)
                    self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-m", "fast",
                               "-w", "-t", "60", "restart"])
                return
            raise ClusterError("%s: postmaster %d runs but does not answer on port %d"
                               % (self.name, self.pid(), self.port))
        if not port_free(self.port):
            raise ClusterError("%s: port %d is already used (choose another with --port)"
                               % (self.name, self.port))
        log = os.path.join(self.datadir, "server.log")
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-l", log, "-w",
                   "-t", "60", "start"])
        self.started_here = True
        deadline = time.monotonic() + 30
        while not self._answers():
            if time.monotonic() > deadline:
                raise ClusterError("%s: started but does not answer on port %d" % (self.name, self.port))
            time.sleep(0.2)

    def _answers(self) -> bool:
        try:
            psycopg2.connect(self.dsn(), connect_timeout=3).close()
            return True
        except psycopg2.Error:
            return False

    def _needs_restart(self) -> bool:
        conn = psycopg2.connect(self.dsn())
        try:
            with conn.cursor() as cur:
                for name in RESTART_SETTINGS:
                    cur.execute("SELECT current_setting(%s)", (name,))
                    current = cur.fetchone()[0]
                    wanted = SETTINGS[name].strip("'")
                    if current.lower() != wanted.lower():
                        return True
        finally:
            conn.close()
        return False

    def pid(self) -> Optional[int]:
        """The postmaster's pid (from postmaster.pid) if it is alive, else None."""
        try:
            with open(os.path.join(self.datadir, "postmaster.pid")) as handle:
                pid = int(handle.readline().strip())
        except (OSError, ValueError):
            return None
        return pid if os.path.exists("/proc/%d" % pid) else None

    def stop(self) -> None:
        """Stop the cluster (fast shutdown). Does nothing if it is not running."""
        if self.pid() is None:
            return
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-m", "fast", "-w",
                   "-t", "60", "stop"])

    def recreate_databases(self, names: List[str]) -> None:
        """Drop (terminating their sessions) and create each database in ``names``."""
        self.drop_databases(names, create=True)

    def drop_databases(self, names: List[str], create: bool = False) -> None:
        """Drop each database in ``names`` with its subscriptions and replication slots; with
        ``create``, create it again, empty."""
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in names:
                self._drop(cur, name)
                if create:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        conn.close()

    def _drop(self, cur, name: str) -> None:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            return
        cur.execute("SELECT s.subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid"
                    " WHERE d.datname = %s", (name,))
        subscriptions = [row[0] for row in cur.fetchall()]
        if subscriptions:  # a subscription can only be dropped from its own database
            inner = psycopg2.connect(self.dsn(name))
            inner.autocommit = True
            with inner.cursor() as icur:
                for sub in subscriptions:
                    ident = sql.Identifier(sub)
                    icur.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                    icur.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                    icur.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))
            inner.close()
        cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE database = %s AND NOT active", (name,))
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def drop_slots(self, prefix: str) -> None:
        """Drop the inactive replication slots whose name starts with ``prefix``."""
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE slot_name LIKE %s AND NOT active", (prefix + "%",))
        conn.close()
