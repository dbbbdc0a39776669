"""The faults, one function per scenario. Each runs against a started :class:`~chaos.harness.FlowRun`
(daemon and stream running), injects its faults while the stream flows, and records what it saw in
``run.result`` (``restarts``, ``notes``, ``problems``); the caller then waits for the end state and
counts.

* ``kill``      golconded killed with SIGKILL ``--kills`` times and restarted at once; the moments
                are chosen from the daemon's sessions: mid-batch (a transaction open), just after
                a commit (fan-out or ack in progress), or at random.
* ``broker``    the suite's private RabbitMQ node stopped and started ``--broker-restarts`` times,
                each time with a backlog in its queues and the targets mid-batch.
* ``target-pg`` target1 on the suite's private PostgreSQL: restarted (fast), crashed and kept down
                ``--pg-down`` seconds, its sessions terminated; then target2's sessions (shared
                server) terminated.
* ``stuck``     target1's table locked ACCESS EXCLUSIVE for ``--lock-seconds``.
* ``reload``    SIGHUP: a target added, then removed; two broken configurations refused.
* ``sigterm``   SIGTERM mid-batch ``--sigterms`` times (exit within 5 s, status 0), restarted.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Set

import psycopg2
import psycopg2.extensions
import yaml

from . import services, workload
from .harness import FlowRun, in_transaction
from .workload import Effect, Op

LOGGER = logging.getLogger(__name__)

#: Seconds SIGTERM may take (the issue's bound).
STOP_BOUND = 5.0


def say(run: FlowRun, message: str, *args: Any) -> None:
    LOGGER.info("[%s/%s] " + message, run.scenario, run.flow, *args)


def fractions(count: int, low: float = 0.05, high: float = 0.85) -> List[float]:
    """``count`` points spread evenly over [low, high] of the stream."""
    if count <= 0:
        return []
    step = (high - low) / count
    return [low + step * (i + 0.5) for i in range(count)]


# -- kill -9 ---------------------------------------------------------------------------------------

def wait_moment(run: FlowRun, mode: str, timeout: float = 5.0) -> Dict[str, Optional[str]]:
    """Poll the daemon's sessions until the moment ``mode`` asks for: ``mid-batch`` (a session in
    a transaction), ``after-commit`` (a session that was in a transaction is idle now: it
    committed and is fanning out or acking) or ``random`` (a random delay). Returns the states
    seen at that moment (at ``timeout``, whatever they are)."""
    if mode == "random":
        time.sleep(run.rng.uniform(0.0, 1.5))
        return run.sessions()
    deadline = time.monotonic() + timeout
    previous = run.sessions()
    states = previous
    while time.monotonic() < deadline:
        states = run.sessions()
        if mode == "mid-batch" and any(in_transaction(s) for s in states.values()):
            return states
        if mode == "after-commit" and any(in_transaction(previous[l]) and states[l] == "idle"
                                          for l in states):
            return {l: ("committed" if in_transaction(previous[l]) and states[l] == "idle" else s)
                    for l, s in states.items()}
        previous = states
    return states


def kill(run: FlowRun, opts: Any) -> None:
    moments: collections.Counter = collections.Counter()
    modes = ("mid-batch", "after-commit", "random")
    in_flight = 0
    for index, fraction in enumerate(fractions(opts.kills)):
        run.wait_progress(fraction)
        time.sleep(run.rng.uniform(0.5, 2.0))        # not at start-up: mid-stream
        mode = modes[index % len(modes)]
        run.bank_duplicates()
        states = wait_moment(run, mode)
        run.kill_daemon()
        progress = run.target_progress()
        if progress < 1.0:
            in_flight += 1
        where = set()
        for label, state in states.items():
            role = "destination" if label == "canonical" else "target"
            if state == "committed":
                where.add("%s just committed" % role)
            elif in_transaction(state):
                where.add("%s mid-%s" % (role, "batch" if role == "target" or run.flow == "client"
                                         else "fan-out"))
        for item in where or {"all idle"}:
            moments[item] += 1
        say(run, "kill -9 #%d at %.0f%% (%s): %s", index + 1, 100 * progress, mode,
            ", ".join("%s=%s" % item for item in states.items()))
        time.sleep(run.rng.uniform(0.0, 0.5))
        run.start_daemon()
        run.result.restarts += 1
    run.result.notes.append("kill -9 x%d, %d with packets still to apply; moments (one kill may"
                            " count twice): %s" % (opts.kills, in_flight, ", ".join(
                                "%s %d" % (name, moments[name]) for name in sorted(moments))))
    if in_flight < opts.kills:
        run.result.notes.append("%d kills came after the targets had applied the whole stream"
                                " (a stream too short for this many kills: lower --rate)"
                                % (opts.kills - in_flight))


# -- broker restart ------------------------------------------------------------------------------------

def broker(run: FlowRun, opts: Any, rabbit: services.PrivateRabbit) -> None:
    pid = run.pid
    run.wait_connected()
    for index, fraction in enumerate(fractions(opts.broker_restarts, 0.1, 0.8)):
        run.wait_progress(fraction)
        # let a backlog build up first (both target tables locked for 3 s while the stream goes
        # on), so that the broker stops with persistent messages in its durable queues and with
        # batches the targets are applying: they commit after the stop and cannot ack
        lockers = [lock_table(run, label) for label in ("target1", "target2")]
        try:
            time.sleep(3.0)
            queued = sum(d for n, d in run.depths().items() if not n.endswith(".dlq"))
            began = time.monotonic()
            rabbit.stop()
        finally:
            for locker in lockers:
                locker.rollback()
                locker.close()
        down = run.rng.uniform(2.0, 6.0)
        time.sleep(down)
        rabbit.start()
        unavailable = time.monotonic() - began
        kept = sum(d for n, d in run.depths().items() if not n.endswith(".dlq"))
        back = run.wait_connected(timeout=120)
        run.result.restarts += 1
        run.result.notes.append("broker restart %d at %.0f%%: %d messages in the queues at the stop,"
                                " %d right after the start (a fan-out message holds up to 500"
                                " packets); broker unavailable %.1fs; daemon"
                                " reconnected %.1fs after it was back"
                                % (index + 1, 100 * fraction, queued, kept, unavailable, back))
        say(run, "%s", run.result.notes[-1])
    if run.pid != pid:
        run.result.problems.append("the daemon process was restarted (pid %s -> %s)" % (pid, run.pid))
    stats = run.stats() or {}
    reconnects = {name: s.get("reconnects", 0) for name, s in stats.items()}
    if opts.broker_restarts and not all(reconnects.values()):
        run.result.problems.append("threads that never reconnected: %s" % reconnects)
    run.result.notes.append("reconnects per thread: %s; %d sends of the stream failed and were"
                            " repeated with the same packet ids" % (reconnects, run.feeder.retries))


# -- target PostgreSQL restarted / sessions terminated ---------------------------------------------------

def not_held_back(run: FlowRun, began: Dict[str, int], ended: Dict[str, int], down: str) -> None:
    """The other databases advanced while ``down`` did not apply (when they had work left)."""
    for label in ("canonical", "target1", "target2"):
        if label == down or began[label] >= run.packets:
            continue
        if ended[label] <= began[label]:
            run.result.problems.append("%s held back while %s was down: %d -> %d"
                                       % (label, down, began[label], ended[label]))


def target_pg(run: FlowRun, opts: Any, cluster: services.PrivateCluster) -> None:
    name = run.name + "_target1"
    run.wait_connected()
    points = fractions(4, 0.1, 0.8)
    # 1. a clean restart (fast shutdown: the session is terminated)
    run.wait_progress(points[0])
    before = run.reconnects(name)
    began = time.monotonic()
    cluster.restart("fast")
    took = time.monotonic() - began
    back = run.wait_reconnected(name, before)
    run.result.restarts += 1
    run.result.notes.append("target1 PostgreSQL restarted (fast) in %.1fs; the daemon had"
                            " reconnected %.1fs later" % (took, back))
    # 2. a crash, down for a while: the others go on
    run.wait_progress(points[1])
    before = run.reconnects(name)
    counts = {l: run.count(l) for l in ("canonical", "target2")}
    cluster.halt("immediate")
    time.sleep(opts.pg_down)
    after = {l: run.count(l) for l in ("canonical", "target2")}
    cluster.start()
    back = run.wait_reconnected(name, before)
    run.result.restarts += 1
    not_held_back(run, dict(counts, target1=0), dict(after, target1=0), "target1")
    run.result.notes.append("target1 PostgreSQL crashed (immediate) and down %.0fs: meanwhile canonical"
                            " +%d, target2 +%d; the daemon had reconnected %.1fs after the restart"
                            % (opts.pg_down, after["canonical"] - counts["canonical"],
                               after["target2"] - counts["target2"], back))
    # 3. and 4. sessions terminated, on the private server then on the shared one
    for point, label in zip(points[2:], ("target1", "target2")):
        run.wait_progress(point)
        thread = run.name + "_" + label
        before = run.reconnects(thread)
        terminated = services.terminate_sessions(run.dsns[label])
        if not terminated:
            run.result.problems.append("no golconde session to terminate in %s" % label)
        try:
            back = "the daemon had reconnected %.1fs later" % run.wait_reconnected(thread, before, 60)
        except RuntimeError:
            if run.target_progress() < 1.0:
                raise
            back = "nothing left to apply: it reconnects on its next packet"
        run.result.restarts += 1
        run.result.notes.append("%s: %d golconde session(s) terminated; %s" % (label, terminated, back))
    for note in run.result.notes:
        say(run, "%s", note)


# -- a stuck target ------------------------------------------------------------------------------------

def waiting_on_lock(run: FlowRun, label: str) -> bool:
    dbname = psycopg2.extensions.parse_dsn(run.dsns[label])["dbname"]
    conn = psycopg2.connect(services.with_dbname(run.dsns[label], "postgres"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                        " AND application_name LIKE 'golconde %%' AND wait_event_type = 'Lock'", (dbname,))
            return bool(cur.fetchone()[0])
    finally:
        conn.close()


def lock_table(run: FlowRun, label: str) -> Any:
    """A connection holding ACCESS EXCLUSIVE on ``label``'s table (until its rollback)."""
    locker = psycopg2.connect(run.dsns[label], application_name="chaos locker")
    with locker.cursor() as cur:
        cur.execute("LOCK TABLE public.chaos_counter IN ACCESS EXCLUSIVE MODE")
    return locker


def stuck(run: FlowRun, opts: Any) -> None:
    run.wait_progress(0.2)
    locker = lock_table(run, "target1")
    try:
        locked_at = time.monotonic()
        before = {l: run.count(l) for l in ("canonical", "target1", "target2")}
        waited = False
        while time.monotonic() - locked_at < opts.lock_seconds:
            waited = waited or waiting_on_lock(run, "target1")
            time.sleep(1.0)
        after = {l: run.count(l) for l in ("canonical", "target1", "target2")}
        if not waited:
            run.result.problems.append("target1's session never waited on the lock")
        if after["target1"] != before["target1"]:
            run.result.problems.append("target1 applied while its table was locked: %d -> %d"
                                       % (before["target1"], after["target1"]))
        not_held_back(run, before, after, "target1")
    finally:
        locker.rollback()
        locker.close()
    released = time.monotonic()
    run.result.notes.append("target1 locked %.0fs: meanwhile canonical +%d, target2 +%d, target1 +%d"
                            % (released - locked_at, after["canonical"] - before["canonical"],
                               after["target2"] - before["target2"], after["target1"] - before["target1"]))
    backlog = after["target2"] - after["target1"]
    while run.count("target1") < after["target2"] and time.monotonic() - released < 600:
        time.sleep(0.5)
    run.result.notes.append("after the release, target1 applied its backlog of %d in %.1fs"
                            % (backlog, time.monotonic() - released))
    for note in run.result.notes:
        say(run, "%s", note)


# -- SIGTERM -------------------------------------------------------------------------------------------

def sigterm(run: FlowRun, opts: Any) -> None:
    times = []
    for index, fraction in enumerate(fractions(opts.sigterms)):
        run.wait_progress(fraction)
        time.sleep(run.rng.uniform(0.5, 2.0))
        run.bank_duplicates()
        states = wait_moment(run, "mid-batch")
        log_before = len(run.log_text())
        began = time.monotonic()
        run.signal_daemon(signal.SIGTERM)
        try:
            status = run.daemon.proc.wait(30)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            status = None
            run.kill_daemon()
        took = time.monotonic() - began
        times.append(took)
        if status != 0 or took > STOP_BOUND:
            run.result.problems.append("SIGTERM #%d: exit status %s after %.1fs" % (index + 1, status, took))
        if "did not stop" in run.log_text()[log_before:]:
            run.result.problems.append("SIGTERM #%d: a listener did not stop in time" % (index + 1))
        say(run, "SIGTERM #%d (%s): exit %s in %.2fs", index + 1,
            ", ".join("%s=%s" % item for item in states.items()), status, took)
        run.start_daemon()
        run.result.restarts += 1
    if times:
        run.result.notes.append("SIGTERM mid-batch x%d: exit status 0 in %.2fs at most (mean %.2fs)"
                                % (len(times), max(times), sum(times) / len(times)))


# -- SIGHUP reload ---------------------------------------------------------------------------------------

def write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def sighup(run: FlowRun, marker: str, timeout: float = 60.0) -> None:
    """Send SIGHUP and wait for one more ``marker`` line in the daemon's log."""
    seen = run.log_text().count(marker)
    run.signal_daemon(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while run.log_text().count(marker) <= seen:
        if time.monotonic() > deadline:
            raise RuntimeError("no %r in the log %.0fs after SIGHUP" % (marker, timeout))
        time.sleep(0.2)


def window_effects(ops: List[Op]) -> Set[Effect]:
    """The effects a target added mid-stream must hold from ``ops`` (the packets sent while it was
    configured): those on the rows ADDed within the window (it has these rows from their first
    packet on, so it must hold each of their changes exactly as the canonical table does). Other
    rows may or may not be there (no back-fill), so they are not required."""
    known: Set[int] = set()
    effects: Set[Effect] = set()
    for op in ops:
        if op.kind == "add":
            known.add(op.id)
        if op.id in known:
            effects.add(op.effect)
    return effects


def reload(run: FlowRun, opts: Any, server_dsn: str) -> Callable[[], None]:
    """Returns the check to run once the stream is drained (target3's window)."""
    pid = run.pid
    run.wait_connected()
    destination = run.mapping["Destinations"][run.name]
    good = yaml.safe_dump(run.mapping)
    # 1. add target3 (new database, new queue)
    run.wait_progress(0.15)
    target3 = services.create_database(server_dsn, "golconde_chaos_r")
    workload.create_schema(target3)
    run.dsns["target3"] = target3
    queue3 = destination["queue"] + ".target3"
    run.extra_queues.append(queue3)
    destination["Targets"]["target3"] = {"stomp": run.broker.address, "queue": queue3,
                                         "pgsql": target3, "target": workload.TABLE}
    write_atomically(run.config_path, yaml.safe_dump(run.mapping))
    sighup(run, "configuration reloaded")
    run.wait_connected(threads=[run.name + "_target3"])
    start = run.feeder.sent
    run.result.restarts += 1
    say(run, "target3 added by SIGHUP after %d packets", start)
    # 2. remove it, once the destination fanned out what was sent so far and target3 applied it
    run.wait_progress(0.35)
    run.feeder.pause()
    end = run.feeder.sent
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if run.flow == "client":
            drained = run.count("canonical") >= end and \
                run.depths().get(services.amqp_name(destination["queue"]), 0) == 0
        else:
            drained = run.queue_table_backlog() == 0
        if drained and run.depths().get(services.amqp_name(queue3), 0) == 0:
            break
        time.sleep(0.3)
    else:
        run.result.problems.append("target3 did not catch up before its removal")
    del destination["Targets"]["target3"]
    write_atomically(run.config_path, yaml.safe_dump(run.mapping))
    sighup(run, "configuration reloaded")
    run.feeder.pause(False)
    run.result.restarts += 1
    stats = run.stats() or {}
    if run.name + "_target3" in stats:
        run.result.problems.append("target3 still in /stats after its removal")
    at_removal = run.count("target3")
    say(run, "target3 removed by SIGHUP after %d packets (it applied %d)", end, at_removal)
    # 3. broken configurations are refused; the running one goes on
    run.wait_progress(0.5)
    invalid = yaml.safe_load(good)
    invalid["Destinations"][run.name]["Targets"]["target2"]["queue"] = ""
    invalid["Destinations"][run.name]["stomp"] = "localhost"
    broken = {
        "a YAML syntax error": good + "\n  : [unclosed\n",
        "an invalid configuration": yaml.safe_dump(invalid),
    }
    threads = {run.name, run.name + "_target1", run.name + "_target2"}
    for what, text in broken.items():
        write_atomically(run.config_path, text)
        sighup(run, "reload refused")
        flowing = run.count("target2")
        stats = run.stats()
        if stats is None or set(stats) != threads:
            run.result.problems.append("after a refused reload (%s), /stats shows %s"
                                       % (what, None if stats is None else sorted(stats)))
        time.sleep(3.0)
        if run.count("target2") <= flowing and flowing < run.packets:
            run.result.problems.append("packets stopped flowing after a refused reload (%s)" % what)
        run.result.restarts += 1
        line = [l for l in run.log_text().splitlines() if "reload refused" in l][-1]
        reason = line.split("keeping the running configuration:", 1)[-1].strip()
        run.result.notes.append("SIGHUP with %s: refused (%s), old configuration kept, /stats"
                                " answers, packets still flowing" % (what, reason[:160]))
    write_atomically(run.config_path, good)
    sighup(run, "configuration reloaded")
    last = [l for l in run.log_text().splitlines() if "configuration reloaded" in l][-1]
    if "0 listeners stopped, 0 started" not in last:
        run.result.problems.append("the unchanged configuration, reloaded, restarted listeners: " + last)
    if run.pid != pid:
        run.result.problems.append("the daemon process was restarted (pid %s -> %s)" % (pid, run.pid))

    def check() -> None:
        window = window_effects(run.feeder.ops[start:end])
        counted = workload.count_database(target3, set(run.feeder.effects), window=window)
        run.result.applied["target3"] = counted.applied
        run.result.lost += counted.lost
        run.result.double += counted.double
        if counted.applied != at_removal:
            run.result.problems.append("target3 applied %d packets after its removal"
                                       % (counted.applied - at_removal))
        run.result.notes.append("target3 (added after packet %d, removed after %d, no back-fill):"
                                " %d applied, %d expected in its window, lost %d, double %d"
                                % (start, end, counted.applied, len(window), counted.lost, counted.double))
    return check
