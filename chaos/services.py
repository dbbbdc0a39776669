"""Services of the chaos suite: databases and queues on the shared servers, and the private RabbitMQ
node and PostgreSQL cluster that the restart scenarios stop and start.

Other people use the machine's RabbitMQ (61613) and PostgreSQL (5432) at the same time, so nothing
here restarts them: the broker-restart scenario runs its own RabbitMQ node
(:class:`PrivateRabbit`, STOMP on 61633) and the target-restart scenario its own PostgreSQL cluster
(:class:`PrivateCluster`, port 5545), both with their data under ``var/chaos/`` of the checkout.
"""
from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
import uuid
from typing import Dict, Iterable, List, Optional

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from bench.cluster import Cluster, data_directory

LOGGER = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A private service could not be started or stopped, or a shared one does not answer."""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex((host, port)) == 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a daemon's HTTP server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- PostgreSQL -----------------------------------------------------------------------------------

def with_dbname(dsn: str, dbname: str) -> str:
    params = psycopg2.extensions.parse_dsn(dsn)
    params["dbname"] = dbname
    return psycopg2.extensions.make_dsn(**params)


def create_database(server_dsn: str, prefix: str) -> str:
    """Create ``<prefix>_<hex>`` on the server of ``server_dsn``; returns its DSN."""
    name = "%s_%s" % (prefix, uuid.uuid4().hex[:8])
    conn = psycopg2.connect(server_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    return with_dbname(server_dsn, name)


def drop_database(dsn: str) -> None:
    """Drop the database of ``dsn`` (its sessions terminated). Errors are logged, not raised."""
    name = psycopg2.extensions.parse_dsn(dsn)["dbname"]
    try:
        conn = psycopg2.connect(with_dbname(dsn, "postgres"), connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.close()
    except psycopg2.Error as exc:
        LOGGER.warning("could not drop database %s: %s", name, exc)


def terminate_sessions(dsn: str, application_prefix: str = "golconde") -> int:
    """``pg_terminate_backend`` on the sessions of ``dsn``'s database whose application_name starts
    with ``application_prefix``. Returns how many were terminated."""
    dbname = psycopg2.extensions.parse_dsn(dsn)["dbname"]
    conn = psycopg2.connect(with_dbname(dsn, "postgres"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = %s AND application_name LIKE %s",
                        (dbname, application_prefix + "%"))
            return cur.fetchone()[0]
    finally:
        conn.close()


class PrivateCluster(Cluster):
    """A PostgreSQL cluster of the suite's own (``bench.cluster.Cluster``: initdb and pg_ctl, as
    user postgres when run as root), which the target-restart scenario restarts."""

    def __init__(self, workdir: str, port: int) -> None:
        super().__init__("chaos-pg", data_directory(workdir, "target1"), port)

    def pg_ctl(self, *args: str) -> None:
        """Run ``pg_ctl -D <datadir> <args>``. :raises ClusterError:"""
        self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir] + list(args))

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m <mode>`` (``fast``: sessions terminated, clean shutdown;
        ``immediate``: a crash, recovered at start). Not ``pg_ctl restart``: it takes no ``-l``,
        and the server would keep our pipes open."""
        self.halt(mode)
        self.start()

    def halt(self, mode: str = "immediate") -> None:
        """Stop it (``immediate``: as a crash)."""
        self.pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    def start(self) -> None:
        self.pg_ctl("-w", "-t", "60", "-l", os.path.join(self.datadir, "server.log"), "start")


# -- RabbitMQ -------------------------------------------------------------------------------------

def rabbitmqctl(*args: str, node: Optional[str] = None, check: bool = True, timeout: float = 60) -> str:
    """Run ``rabbitmqctl -q [-n node] args``; returns its output.
    :raises ServiceError: it failed (with ``check``)."""
    argv = ["rabbitmqctl", "-q"] + (["-n", node] if node else []) + list(args)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ServiceError("%s timed out" % " ".join(argv)) from None
    if check and result.returncode != 0:
        raise ServiceError("%s failed (%d): %s %s" % (" ".join(argv), result.returncode,
                                                      result.stdout[-500:], result.stderr[-500:]))
    return result.stdout


def amqp_name(stomp_queue: str) -> str:
    """``/queue/x`` -> ``x``, RabbitMQ's name of the queue."""
    return stomp_queue[len("/queue/"):] if stomp_queue.startswith("/queue/") else stomp_queue


def queue_depths(node: Optional[str] = None) -> Dict[str, int]:
    """``{queue: messages (ready + unacknowledged)}`` for the default vhost of ``node``."""
    depths = {}
    for line in rabbitmqctl("list_queues", "--no-table-headers", "name", "messages", node=node).splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[1].strip().isdigit():
            depths[parts[0]] = int(parts[1])
    return depths


def delete_queues(names: Iterable[str], node: Optional[str] = None) -> None:
    """Delete queues (missing ones ignored) in one ``rabbitmqctl eval`` (as tests/integration/
    test_faults.py does); errors are logged."""
    names = [name for name in names if re.fullmatch(r"[A-Za-z0-9_.-]+", name)]
    if not names:
        return
    expression = ("lists:foreach(fun(N) -> case rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>,"
                  " queue, N)) of {ok, Q} -> rabbit_amqqueue:delete(Q, false, false, <<\"chaos\">>);"
                  " _ -> ok end end, [%s]), ok." % ", ".join('<<"%s">>' % n for n in names))
    try:
        rabbitmqctl("eval", expression, node=node)
    except ServiceError as exc:
        LOGGER.warning("could not delete queues %s: %s", names, exc)


class PrivateRabbit:
    """A RabbitMQ node of the suite's own, stopped and started by the broker-restart scenario.

    Node ``golconde_chaos@localhost``, STOMP on 127.0.0.1:``stomp_port``, AMQP on ``amqp_port``,
    Erlang distribution on ``dist_port``; its configuration, Mnesia database and logs in
    ``<workdir>/rabbit`` (owned by user rabbitmq). It shares the machine's epmd and Erlang cookie
    (``rabbitmqctl -n golconde_chaos@localhost ...`` reaches it). Run as root (the server runs as
    user rabbitmq through ``runuser``) or as user rabbitmq.
    """

    node = "golconde_chaos@localhost"

    def __init__(self, workdir: str, stomp_port: int = 61633, amqp_port: int = 5682,
                 dist_port: int = 25682) -> None:
        self.base = os.path.join(os.path.abspath(workdir), "rabbit")
        self.stomp_port, self.amqp_port, self.dist_port = stomp_port, amqp_port, dist_port
        self.started_here = False
        self.restarts = 0

    def _server(self) -> str:
        for candidate in ("/usr/lib/rabbitmq/bin/rabbitmq-server",):
            if os.path.exists(candidate):
                return candidate
        found = shutil.which("rabbitmq-server")
        if not found:
            raise ServiceError("rabbitmq-server not found (run scripts/setup-services.sh)")
        return os.path.join(os.path.dirname(os.path.realpath(found)), "rabbitmq-server")

    def _write_files(self) -> None:
        os.makedirs(self.base, exist_ok=True)
        files = {
            "enabled_plugins": "[rabbitmq_stomp].\n",
            "rabbitmq.conf": ("listeners.tcp.default = 127.0.0.1:%d\n"
                              "stomp.listeners.tcp.1 = 127.0.0.1:%d\n" % (self.amqp_port, self.stomp_port)),
            "rabbitmq-env.conf": "# the chaos suite's node: everything comes from the environment\n",
        }
        for name, text in files.items():
            with open(os.path.join(self.base, name), "w") as handle:
                handle.write(text)
        if os.geteuid() == 0:
            record = pwd.getpwnam("rabbitmq")
            for path in [self.base] + [os.path.join(self.base, name) for name in files]:
                os.chown(path, record.pw_uid, record.pw_gid)

    def environment(self) -> Dict[str, str]:
        return {
            "HOME": pwd.getpwnam("rabbitmq").pw_dir,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.base, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.base, "log"),
            "RABBITMQ_PID_FILE": os.path.join(self.base, "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.base, "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": os.path.join(self.base, "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.base, "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def running(self) -> bool:
        """True when the node answers ``rabbitmqctl status``."""
        try:
            rabbitmqctl("status", node=self.node, timeout=30)
            return True
        except ServiceError:
            return False

    def start(self, timeout: float = 120.0) -> None:
        """Start the node (reusing it when it already runs) and wait until STOMP answers and the
        node accepts commands. :raises ServiceError:"""
        if port_open(self.stomp_port):
            if self.running():
                return
            raise ServiceError("port %d is used by something else than node %s"
                               % (self.stomp_port, self.node))
        self._write_files()
        env = dict(os.environ, **self.environment())
        argv = [self._server(), "-detached"]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "rabbitmq", "--", "env"] + \
                   ["%s=%s" % item for item in self.environment().items()] + argv
        elif pwd.getpwuid(os.geteuid()).pw_name != "rabbitmq":
            raise ServiceError("the private RabbitMQ node needs root or user rabbitmq")
        result = subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise ServiceError("rabbitmq-server -detached failed (%d): %s"
                               % (result.returncode, result.stderr or result.stdout))
        self.started_here = True
        deadline = time.monotonic() + timeout
        while not port_open(self.stomp_port):
            if time.monotonic() > deadline:
                raise ServiceError("node %s: STOMP does not answer on %d after %.0fs (log in %s/log)"
                                   % (self.node, self.stomp_port, timeout, self.base))
            time.sleep(0.2)
        while not self.running():
            if time.monotonic() > deadline:
                raise ServiceError("node %s does not answer rabbitmqctl" % self.node)
            time.sleep(0.5)

    def stop(self, timeout: float = 60.0) -> None:
        """``rabbitmqctl stop`` (graceful: persistent messages are on disk) and wait for the port
        to close. Does nothing when it does not run."""
        if not port_open(self.stomp_port) and not self.running():
            return
        rabbitmqctl("stop", node=self.node, check=False, timeout=timeout)
        deadline = time.monotonic() + timeout
        while port_open(self.stomp_port):
            if time.monotonic() > deadline:
                raise ServiceError("node %s still answers after stop" % self.node)
            time.sleep(0.2)

    def queue_depths(self) -> Dict[str, int]:
        return queue_depths(self.node)

    def delete_queues(self, names: List[str]) -> None:
        delete_queues(names, self.node)
