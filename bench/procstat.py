"""CPU seconds and peak memory of processes, read from Linux's /proc.

Method (documented in bench/README.md):

* A process's CPU = ``utime + stime`` (its own threads) ``+ cutime + cstime`` (its children that
  exited and were waited for), fields 14-17 of ``/proc/<pid>/stat``, in clock ticks.
* A PostgreSQL cluster's CPU = the postmaster's CPU as above (the postmaster reaps every backend
  and background worker, so a backend that exited is already in its ``cutime``/``cstime``) plus the
  CPU of each live child of the postmaster. That sum is exact at any instant, so two samples (at
  the start and the end of a phase) give the cluster's CPU over the phase, short-lived backends
  included, without polling.
* The harness's own polling sessions are excluded: their backend pids are known and their CPU is
  subtracted (see :class:`CpuMeter`).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> Optional[list]:
    """Fields of /proc/<pid>/stat after the command name, or None if the process is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            text = handle.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces and parentheses: cut after the last ')'
    return text[text.rfind(")") + 2:].split()


def process_cpu(pid: int, children: bool = True) -> float:
    """CPU seconds of process ``pid`` (all its threads), plus with ``children`` those of its
    waited-for children. 0.0 when the process is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # after the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def children_of(pid: int) -> Iterable[int]:
    """Pids of the live children of ``pid`` (a scan of /proc)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                yield int(entry)


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its waited-for children plus its live children (see the module
    documentation: exact for a PostgreSQL postmaster). 0.0 when ``pid`` is gone."""
    total = process_cpu(pid)
    for child in children_of(pid):
        total += process_cpu(child)
    return total


def peak_rss_mb(pid: int) -> Optional[float]:
    """Peak resident set size (``VmHWM``) of ``pid`` in MiB, or None if the process is gone."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class CpuMeter:
    """CPU seconds consumed between :meth:`start` and :meth:`read` by named groups of processes.

    :param trees: name -> postmaster pid (whole cluster, see :func:`tree_cpu`).
    :param excluded: name -> pids of backends whose CPU is subtracted from that tree (the
        harness's polling sessions); they must stay alive from start to read.
    :param processes: name -> pid of a plain process (golconded, a worker), children included.
    """

    def __init__(self) -> None:
        self.trees: Dict[str, int] = {}
        self.excluded: Dict[str, list] = {}
        self.processes: Dict[str, list] = {}
        self._base: Dict[str, float] = {}
        self._gone: Dict[str, float] = {}

    def add_tree(self, name: str, pid: int, excluded: Iterable[int] = ()) -> None:
        self.trees[name] = pid
        self.excluded[name] = list(excluded)

    def add_process(self, name: str, pid: int) -> None:
        """Count ``pid`` under ``name`` (several pids may share a name: their CPU is summed).
        Call :meth:`process_ending` before the process exits, so its CPU is kept."""
        self.processes.setdefault(name, []).append(pid)

    def process_ending(self, name: str, pid: int) -> None:
        """Keep the last reading of ``pid`` (about to exit) in ``name``'s total."""
        if pid in self.processes.get(name, []):
            self._gone[name] = self._gone.get(name, 0.0) + process_cpu(pid)
            self.processes[name].remove(pid)

    def _now(self) -> Dict[str, float]:
        values = {}
        for name, pid in self.trees.items():
            values[name] = tree_cpu(pid) - sum(process_cpu(p) for p in self.excluded[name])
        for name, pids in self.processes.items():
            values[name] = self._gone.get(name, 0.0) + sum(process_cpu(p) for p in pids)
        return values

    def start(self) -> None:
        self._base = self._now()

    def read(self) -> Dict[str, float]:
        """CPU seconds per name since :meth:`start` (names added later count from 0)."""
        now = self._now()
        return {name: round(value - self._base.get(name, 0.0), 2) for name, value in now.items()}
