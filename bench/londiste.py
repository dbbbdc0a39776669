"""Londiste 3 (PgQ + pgqd): a root node on src and a leaf node on each target, default settings.

Installed from the package registries only: Debian's ``postgresql-15-pgq3``, ``pgqd``,
``postgresql-15-pgq-node``, ``postgresql-15-londiste-sql`` (apt-get, when running as root) and
PyPI's ``londiste`` (with skytools and pgq) into its own virtualenv ``<workdir>/londiste-venv``.
When any of that fails, :func:`prepare` returns the reason and the harness prints
``londiste: skipped (<reason>)``.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, List, Union

from .modes import Mode
from .workload import BenchError

LOGGER = logging.getLogger(__name__)

APT_PACKAGES = ("postgresql-{v}-pgq3", "pgqd", "postgresql-{v}-pgq-node", "postgresql-{v}-londiste-sql")
PIP_PACKAGES = ("londiste", "psycopg2-binary")
EXTENSIONS = ("pgq", "pgq_node", "londiste")


@dataclass(frozen=True)
class Tools:
    londiste: str
    pgqd: str


def _share_dir(version: str) -> str:
    return "/usr/share/postgresql/%s/extension" % version


def prepare(workdir: str, version: str = "15") -> Union[Tools, str]:
    """Install what is missing; return the tools, or why Londiste cannot run (a string)."""
    missing = [e for e in EXTENSIONS if not os.path.exists(os.path.join(_share_dir(version), e + ".control"))]
    pgqd = shutil.which("pgqd")
    if missing or not pgqd:
        if os.geteuid() != 0:
            return "PgQ/Londiste server packages missing and not root to install them"
        packages = [p.format(v=version) for p in APT_PACKAGES]
        print("londiste: installing %s with apt-get" % " ".join(packages), flush=True)
        result = subprocess.run(["apt-get", "install", "-y", "-q"] + packages, capture_output=True, text=True,
                                env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if result.returncode:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            result = subprocess.run(["apt-get", "install", "-y", "-q"] + packages, capture_output=True,
                                    text=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if result.returncode:
            return "apt-get install %s failed: %s" % (" ".join(packages), result.stderr.strip()[-300:])
        pgqd = shutil.which("pgqd")
        if not pgqd:
            return "pgqd not found after installing it"
    venv = os.path.join(workdir, "londiste-venv")
    londiste = os.path.join(venv, "bin", "londiste")
    if not os.path.exists(londiste):
        print("londiste: installing %s from PyPI into %s" % (" ".join(PIP_PACKAGES), venv), flush=True)
        try:
            python = os.path.join(sys.base_prefix, "bin", "python3")
            subprocess.run([python if os.path.exists(python) else "python3", "-m", "venv", venv],
                           check=True, capture_output=True)
            subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q"] + list(PIP_PACKAGES),
                           check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            return "pip install %s failed: %s" % (" ".join(PIP_PACKAGES), str(detail).strip()[-300:])
    return Tools(londiste, pgqd)


class Londiste(Mode):
    """Londiste 3: pgq.logutriga on the source table, pgqd ticking, one worker per node."""

    name = "londiste"
    nodes = ("root", "t1", "t2")

    def __init__(self, env: Any, tools: Tools) -> None:
        super().__init__(env)
        self.tools = tools
        self.procs: List[subprocess.Popen] = []

    def _ini(self, node: str) -> str:
        env = self.env
        path = env.path("londiste-%s.ini" % node)
        dsn = env.src.dsn("src") if node == "root" else env.tgt.dsn(node)
        with open(path, "w") as handle:
            handle.write("[londiste]\njob_name = bench_%s\ndb = %s\nqueue_name = bench_w\n"
                         "logfile = %s\npidfile = %s\n"
                         % (node, dsn, env.path("londiste-%s.log" % node), env.path("londiste-%s.pid" % node)))
        return path

    def _londiste(self, ini: str, *args: str, timeout: float = 300) -> str:
        argv = [self.tools.londiste, ini] + list(args)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        with open(self.env.path("londiste-admin.log"), "a") as log:
            log.write("$ %s\n%s%s\n" % (" ".join(argv), result.stdout, result.stderr))
        if result.returncode:
            raise BenchError("londiste %s failed: %s" % (" ".join(args[:1]),
                                                          (result.stderr or result.stdout).strip()[-400:]))
        return result.stdout

    def _spawn(self, argv: List[str], name: str) -> None:
        out = open(self.env.path("%s.out" % name), "a")
        self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
        out.close()

    def setup(self) -> None:
        env = self.env
        inis = {node: self._ini(node) for node in self.nodes}
        self._londiste(inis["root"], "create-root", "root", env.src.dsn("src"))
        for node in ("t1", "t2"):
            self._londiste(inis[node], "create-leaf", node, env.tgt.dsn(node), "--provider=" + env.src.dsn("src"))
        pgqd_ini = env.path("pgqd.ini")
        with open(pgqd_ini, "w") as handle:
            handle.write("[pgqd]\nbase_connstr = host=127.0.0.1 port=%d user=postgres\n"
                         "initial_database = postgres\ndatabase_list = src\nlogfile = %s\npidfile = %s\n"
                         % (env.src.port, env.path("pgqd.log"), env.path("pgqd.pid")))
        self._spawn([self.tools.pgqd, pgqd_ini], "pgqd")
        for node in self.nodes:
            self._spawn([self.tools.londiste, inis[node], "worker"], "londiste-worker-%s" % node)
        self._londiste(inis["root"], "add-table", "public.friendships")
        for node in ("t1", "t2"):
            self._londiste(inis[node], "add-table", "public.friendships")
        for node in ("t1", "t2"):
            self._londiste(inis[node], "wait-sync", timeout=300)
        for proc in self.procs:
            if proc.poll() is not None:
                raise BenchError("londiste: %s exited with status %d" % (proc.args[1], proc.returncode))

    def workers(self) -> List[int]:
        return [proc.pid for proc in self.procs if proc.poll() is None]

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if proc.args[0] != self.tools.pgqd else signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs = []
        self._stop_strays()

    def _stop_strays(self) -> None:
        """Stop the processes Londiste's workers daemonized themselves (``londiste ... copy -d``,
        one per table still being synchronized: a run interrupted during ``wait-sync`` left
        them running), found by this run's configuration files on their command lines."""
        marker = self.env.workdir.encode() + b"/"
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    argv = handle.read()
                if marker not in argv or b"londiste" not in argv:
                    continue
                os.kill(int(entry), signal.SIGTERM)
            except (OSError, ValueError):
                continue                    # gone meanwhile, or not ours to stop
