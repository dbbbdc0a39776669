"""Tests of golconde.stats: counters, durations, states and the registry's snapshot."""
from __future__ import annotations

import json
import logging
import threading
import time

import pytest

import golconde
from golconde.stats import COUNTER_KEYS, DURATION_BUCKETS, Registry, ThreadStats

LEGACY_KEYS = {"add", "set", "update", "delete", "command_duration", "errors"}


def test_new_thread_stats_are_zero_and_disconnected():
    snap = ThreadStats("Test1", "destination", "Test1").snapshot()
    assert {key: snap[key] for key in COUNTER_KEYS} == dict.fromkeys(COUNTER_KEYS, 0)
    assert snap["command_duration"] == 0.0
    assert snap["last_duration"] is None
    assert snap["role"] == "destination" and snap["destination"] == "Test1"
    assert snap["broker"] == snap["database"] == "disconnected"
    assert snap["backlog"] is None and snap["lag"] is None
    assert snap["last_error"] is None and snap["last_error_at"] is None
    assert LEGACY_KEYS <= set(snap)


def test_count():
    stats = ThreadStats("Test1_t1", "target", "Test1")
    stats.count("received")
    stats.count("add", 3)
    stats.count("add")
    stats.count("errors", 0)
    snap = stats.snapshot()
    assert snap["received"] == 1 and snap["add"] == 4 and snap["errors"] == 0


@pytest.mark.parametrize("n", [-1, 1.5, "1", None])
def test_count_rejects_bad_amounts(n):
    stats = ThreadStats("Test1", "destination", "Test1")
    with pytest.raises(ValueError):
        stats.count("add", n)


def test_unknown_counter_is_ignored_with_one_warning(caplog):
    stats = ThreadStats("Test1", "destination", "Test1")
    with caplog.at_level(logging.WARNING, logger="golconde.stats"):
        stats.count("unknown")
        stats.count("unknown", 2)
    assert len(caplog.records) == 1 and "'unknown'" in caplog.text
    assert "unknown" not in stats.snapshot()


def test_count_many_adds_together_or_not_at_all(caplog):
    """A batch's counters are added under one lock: a reader sees the batch's applied with its
    unmatched, never one without the other; a bad amount adds nothing."""
    stats = ThreadStats("Test1_t1", "target", "Test1")
    reads, torn = [0], []
    done = threading.Event()

    def read():
        while not done.is_set():
            snap = stats.snapshot()
            reads[0] += 1
            if snap["applied"] != 2 * snap["unmatched"]:
                torn.append((snap["applied"], snap["unmatched"]))
            time.sleep(0)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(3000):
            stats.count_many({"applied": 2, "unmatched": 1, "update": 2})
    finally:
        done.set()
        reader.join()
    assert reads[0] and torn == []
    snap = stats.snapshot()
    assert (snap["applied"], snap["unmatched"], snap["update"]) == (6000, 3000, 6000)
    with pytest.raises(ValueError, match="'unmatched'"):
        stats.count_many({"applied": 1, "unmatched": -1})
    with caplog.at_level(logging.WARNING, logger="golconde.stats"):
        stats.count_many({"applied": 1, "nope": 1})
    assert "'nope'" in caplog.text
    assert stats.snapshot()["applied"] == 6001 and "nope" not in stats.snapshot()


def test_role_is_checked():
    with pytest.raises(ValueError):
        ThreadStats("Test1", "consumer", "Test1")


def test_command_duration_is_the_mean_per_packet():
    stats = ThreadStats("Test1", "destination", "Test1")
    stats.observe_duration(0.2)
    stats.observe_duration(0.4)
    assert stats.snapshot()["command_duration"] == pytest.approx(0.3)
    stats.observe_duration(0.6, packets=4)  # a batch of 4 packets in 0.6 s
    snap = stats.snapshot()
    assert snap["command_duration"] == pytest.approx(1.2 / 6)
    assert snap["last_duration"] == pytest.approx(0.6)


@pytest.mark.parametrize("seconds, packets", [(-0.1, 1), (float("nan"), 1), (float("inf"), 1), (0.1, 0)])
def test_observe_duration_rejects_bad_values(seconds, packets):
    with pytest.raises(ValueError):
        ThreadStats("Test1", "destination", "Test1").observe_duration(seconds, packets)


def test_set_state():
    stats = ThreadStats("Test1", "destination", "Test1")
    stats.set_state(broker="connecting")
    stats.set_state(database="connected")
    snap = stats.snapshot()
    assert (snap["broker"], snap["database"]) == ("connecting", "connected")
    stats.set_state(broker="connected", database="stopped")
    snap = stats.snapshot()
    assert (snap["broker"], snap["database"]) == ("connected", "stopped")
    with pytest.raises(ValueError):
        stats.set_state(broker="up")
    assert stats.snapshot()["broker"] == "connected"


def test_set_error_and_clear():
    stats = ThreadStats("Test1", "destination", "Test1")
    stats.set_error("SQLSTATE 23505: duplicate key")
    snap = stats.snapshot()
    assert snap["last_error"] == "SQLSTATE 23505: duplicate key"
    assert snap["last_error_at"].endswith("+00:00") and "T" in snap["last_error_at"]
    assert snap["errors"] == 0  # counting is separate
    stats.set_error(None)
    snap = stats.snapshot()
    assert snap["last_error"] is None and snap["last_error_at"] is None


def test_backlog_and_lag():
    stats = ThreadStats("Test1", "destination", "Test1")
    stats.set_backlog(12)
    stats.set_lag(0.25)
    snap = stats.snapshot()
    assert snap["backlog"] == 12 and snap["lag"] == 0.25
    stats.set_lag(-3.0)  # clock skew between hosts
    assert stats.snapshot()["lag"] == 0.0
    stats.set_backlog(None)
    stats.set_lag(None)
    snap = stats.snapshot()
    assert snap["backlog"] is None and snap["lag"] is None
    with pytest.raises(ValueError):
        stats.set_backlog(-1)
    with pytest.raises(ValueError):
        stats.set_lag(float("nan"))


def test_live_figures_raise_backlog_and_lag_while_the_thread_is_busy():
    """A thread stuck applying a batch (a lock wait) reports what it holds and how old the oldest
    packet is, though it set neither; a failing source does not fail the snapshot."""
    stats = ThreadStats("Test1", "target", "Test1")
    stats.set_backlog(0)
    stats.set_lag(0.5)
    held = {"value": (40, time.time() - 30.0)}
    stats.set_live(lambda: held["value"])
    snap = stats.snapshot()
    assert snap["backlog"] == 40 and 29.0 < snap["lag"] < 40.0
    held["value"] = (0, None)                      # nothing held: the figures it set
    assert stats.snapshot()["backlog"] == 0 and stats.snapshot()["lag"] == 0.5
    held["value"] = (3, None)                      # packets without a creation time
    assert stats.snapshot()["backlog"] == 3 and stats.snapshot()["lag"] == 0.5

    def broken():
        raise RuntimeError("boom")
    stats.set_live(broken)
    assert stats.snapshot()["backlog"] == 0


def test_registry_get_or_create_and_remove():
    registry = Registry()
    first = registry.thread("Test1", "destination", "Test1")
    assert registry.thread("Test1", "destination", "Test1") is first
    assert registry.get("Test1") is first
    with pytest.raises(ValueError):
        registry.thread("Test1", "target", "Test1")
    registry.remove("Test1")
    registry.remove("Test1")  # unknown: no error
    assert registry.get("Test1") is None
    assert registry.snapshot()["worker_threads"] == 0


def test_registry_snapshot_shape():
    registry = Registry()
    registry.thread("Test1", "destination", "Test1").count("add", 2)
    registry.thread("Test1_t1", "target", "Test1").count("delete")
    snap = registry.snapshot()
    assert snap["worker_threads"] == 2
    assert [list(entry) for entry in snap["threads"]] == [["Test1"], ["Test1_t1"]]
    assert snap["threads"][0]["Test1"]["add"] == 2
    assert snap["threads"][1]["Test1_t1"]["delete"] == 1
    assert snap["threads"][1]["Test1_t1"]["role"] == "target"
    assert snap["uptime"] >= 0
    assert snap["version"] == golconde.__version__
    for entry in snap["threads"]:
        for inner in entry.values():
            assert LEGACY_KEYS <= set(inner)
    assert json.loads(json.dumps(snap, allow_nan=False)) == snap


def test_counting_is_thread_safe():
    registry = Registry()
    stats = registry.thread("Test1", "destination", "Test1")
    rounds, workers = 2000, 8

    def work():
        for _ in range(rounds):
            stats.count("received")
            stats.count("applied")
            stats.observe_duration(0.001)
            registry.snapshot()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = stats.snapshot()
    assert snap["received"] == snap["applied"] == rounds * workers
    assert snap["command_duration"] == pytest.approx(0.001)


def test_apply_duration_histogram_counts_packets_per_bucket():
    stats = ThreadStats("Test1", "destination", "Test1")
    empty = stats.snapshot()["apply_duration"]
    assert empty["le"] == list(DURATION_BUCKETS)
    assert empty["cumulative"] == [0] * (len(DURATION_BUCKETS) + 1)
    assert (empty["sum"], empty["count"]) == (0.0, 0)
    stats.observe_duration(0.0004)               # <= 0.0005
    stats.observe_duration(0.001)                # exactly on a bound: in that bucket (le)
    stats.observe_duration(0.03, packets=3)      # 3 packets of 0.01 s
    stats.observe_duration(120.0)                # beyond the last bound: +Inf only
    histogram = stats.snapshot()["apply_duration"]
    cumulative = dict(zip(histogram["le"], histogram["cumulative"]))
    assert cumulative[0.0005] == 1
    assert cumulative[0.001] == 2
    assert cumulative[0.005] == 2
    assert cumulative[0.01] == 5
    assert cumulative[60.0] == 5
    assert histogram["cumulative"][-1] == histogram["count"] == 6
    assert histogram["sum"] == pytest.approx(0.0004 + 0.001 + 0.03 + 120.0)
    # consistent with the 2009 mean
    assert stats.snapshot()["command_duration"] == pytest.approx(histogram["sum"] / histogram["count"])
    assert histogram["cumulative"] == sorted(histogram["cumulative"])


def test_histogram_is_unchanged_by_rejected_observations():
    stats = ThreadStats("Test1", "destination", "Test1")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            stats.observe_duration(bad)
    with pytest.raises(ValueError):
        stats.observe_duration(0.1, packets=0)
    assert stats.snapshot()["apply_duration"]["count"] == 0


def test_standing_problems_are_listed_until_cleared_and_fail_the_health_check():
    from golconde.metrics import health

    registry = Registry()
    stats = registry.thread("Test1", "destination", "Test1")
    stats.set_state(broker="connected", database="connected")
    assert stats.snapshot()["problems"] == []
    assert health(registry.snapshot(), max_backlog=10, max_lag=1.0)[0]
    assert stats.set_problem("keys", "trigger t on public.a: key (id) is not the primary key (id, x)")
    assert stats.set_problem("other", "second")
    assert not stats.set_problem("other", "second")          # unchanged: not logged again
    assert stats.set_problem("keys", "trigger t on public.a: key (id) is not the primary key (x)")
    assert stats.snapshot()["problems"] == [
        "trigger t on public.a: key (id) is not the primary key (x)", "second"]
    assert stats.snapshot()["last_error"] is None and stats.snapshot()["errors"] == 0
    ok, document = health(registry.snapshot(), max_backlog=10, max_lag=1.0)
    assert not ok and document["reasons"] == [
        "Test1: trigger t on public.a: key (id) is not the primary key (x)", "Test1: second"]
    assert document["listeners"]["Test1"]["status"] == "fail"
    assert stats.set_problem("keys", None)
    stats.set_problem("other", None)
    assert not stats.set_problem("never set", None)
    assert stats.snapshot()["problems"] == []
    assert health(registry.snapshot(), max_backlog=10, max_lag=1.0)[0]


def test_a_listener_failing_sets_the_problem_and_its_replacement_starts_clear():
    """Three failed attempts in a row set the standing problem "failing"; a cycle that gets
    through clears it; a listener that takes over the same statistics (a reload) starts clear."""
    import types

    from golconde.listener import FAILING_AFTER, Listener

    stats = ThreadStats("D_t1", "target", "D")

    class Flaky(Listener):
        backoff_base, backoff_cap = 0.0, 0.0

        def __init__(self, failures):
            super().__init__(types.SimpleNamespace(thread_name="D_t1"), stats, "target")
            self.failures, self.cycles = failures, 0

        def ready(self):
            return True

        def close(self):
            pass

        def reset(self):
            pass

        def cycle(self):
            self.cycles += 1
            if self.cycles <= self.failures:
                if self.cycles == FAILING_AFTER + 1:
                    self.seen = list(stats.snapshot()["problems"])
                raise RuntimeError("attempt %d fails" % self.cycles)
            self.stop()

    first = Flaky(FAILING_AFTER + 2)
    first.run()
    assert first.seen == ["%d failed attempts in a row, the last: RuntimeError: attempt %d fails"
                          % (FAILING_AFTER, FAILING_AFTER)]
    assert stats.snapshot()["problems"] == []

    stats.set_problem("failing", "left by a listener a reload replaced")
    second = Flaky(0)
    second.run()
    assert stats.snapshot()["problems"] == []
