"""The benchmark harness (bench/): a small quick run end to end, its failure exit, and its
measuring pieces (CPU from /proc, percentiles, medians and ratios)."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench import procstat, report  # noqa: E402
from bench.harness import total  # noqa: E402
from bench.workload import KeyRange, percentiles  # noqa: E402

# Own clusters and work directory, apart from `make bench`'s (port 5544, var/bench).
PORT = 5564
WORKDIR = os.path.join(ROOT, "var", "bench-test")


@pytest.mark.bench
def test_quick_run_prints_figures_for_each_mode_and_exits_0(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--modes", "bare,golconde-trigger", "--runs", "1",
         "--rows", "800", "--latency-seconds", "1", "--raw-messages", "2000", "--port", str(PORT),
         "--workdir", WORKDIR, "--json", str(out), "--backlog", "3000", "--split"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = result.stdout
    assert text.startswith("machine: %d cores" % os.cpu_count())
    assert "== bare (median of 1 run)" in text and "== golconde-trigger (median of 1 run)" in text
    assert "all targets equal their source after every run" in text
    data = json.loads(out.read_text())
    bare = data["summary"]["bare"]["phases"]
    trigger = data["summary"]["golconde-trigger"]
    for phase in ("insert", "update", "delete", "total"):
        assert bare[phase]["rows_per_s"] > 0 and bare[phase]["db_cpu_src_s"] >= 0, bare[phase]
        figures = trigger["phases"][phase]
        assert figures["rows_per_s"] > 0 and figures["lag_s"] >= 0, figures
        # a few hundred rows can take less than /proc's 10 ms tick in a phase: positive in total
        minimum = 0 if phase != "total" else 1e-9
        assert figures["db_cpu_src_s"] >= minimum and figures["db_cpu_tgt_s"] >= minimum, figures
        assert figures["worker_cpu_s"] >= minimum and figures["worker_rss_mb"] > 10, figures
        # a phase ends when both targets hold every row: never before the source is done
        assert figures["rows_per_s"] <= figures["source_per_s"], figures
    assert data["runs"][0]["modes"]["golconde-trigger"]["phases"]["total"]["rows"] == 800 + 800 + 400
    latency = trigger["latency"]
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"], latency
    # the probe's own resolution: polls come about every 5 ms per database, in its own process
    assert 0 < latency["probe_gap_p50_ms"] <= latency["probe_gap_p99_ms"] <= latency["probe_gap_max_ms"]
    assert "late by at most the gap between the probe's polls" in text
    assert data["raw_broker"]["consume_cumulative_per_s"] > 0
    assert data["failed"] == []
    assert "golconded: two processes (--split)" in text
    # which capture ran, read from `golconde trigger install`'s words
    assert "capture trigger: C" in text or "capture trigger: PL/pgSQL" in text, text[-3000:]
    backlog = data["backlog"]
    assert backlog["packets"] == 3000 and backlog["equal"] and backlog["error"] is None, backlog
    assert backlog["drain_s"] > 0 and 10 < backlog["peak_rss_mb"] < 400, backlog
    assert "== backlog: 3,000 packets queued" in text
    for line in ("insert", "update", "delete", "total"):
        assert any(row.split()[:1] == [line] and row.split()[1][0].isdigit() for row in text.splitlines())


@pytest.mark.bench
def test_targets_that_never_receive_the_rows_fail_the_run(monkeypatch, capsys):
    import bench.__main__ as cli
    from bench.modes import Bare

    class NotReplicated(Bare):  # claims targets, but nothing carries the rows there
        replicated = True

    monkeypatch.setitem(cli.MODES, "bare", NotReplicated)
    status = cli.main(["--modes", "bare", "--runs", "1", "--rows", "80", "--timeout", "2",
                       "--raw-messages", "100", "--port", str(PORT), "--workdir", WORKDIR])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "timed out" in out and "FAILED" in out


def test_cluster_cpu_counts_children_that_exited():
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n"
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "subprocess.run([sys.executable, '-c', %r])\ntime.sleep(5)" % burn])
    try:
        before = procstat.tree_cpu(parent.pid)
        deadline = time.monotonic() + 10
        while procstat.tree_cpu(parent.pid) - before < 0.35 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procstat.tree_cpu(parent.pid) - before >= 0.35
        assert procstat.peak_rss_mb(parent.pid) > 1
    finally:
        parent.kill()
        parent.wait()
    assert procstat.tree_cpu(parent.pid) == 0.0


def test_percentiles_are_nearest_rank_in_milliseconds():
    values = [i / 1000.0 for i in range(1, 101)]  # 1..100 ms
    assert percentiles(values) == {"p50_ms": 50.0, "p99_ms": 99.0, "max_ms": 100.0}
    assert percentiles([]) == {"p50_ms": None, "p99_ms": None, "max_ms": None}


def test_key_ranges_use_every_key_once_and_delete_half():
    keys = KeyRange(0, 400, 4)
    inserted = keys.keys("insert")
    assert len(set(inserted)) == 400 and keys.count("delete") == 200
    assert set(keys.keys("delete")) < set(inserted) and len(keys.keys("delete")) == 200
    assert not set(KeyRange(10_000_000, 400, 4).keys()) & set(inserted)


def test_medians_and_ratios_are_taken_within_each_run():
    def run(lr, gt):
        return {"raw": {}, "modes": {
            "logical": {"phases": {"total": {"rows_per_s": lr}}, "latency": {}, "equal": True},
            "golconde-trigger": {"phases": {"total": {"rows_per_s": gt}}, "latency": {}, "equal": True}}}

    summary = report.summarize([run(100, 140), run(200, 220), run(50, 60)])
    figures = summary["golconde-trigger"]["phases"]["total"]
    # the medians alone would give 140 / 100 = 1.4; the ratios per run are 1.4, 1.1 and 1.2
    assert figures["rows_per_s"] == 140 and figures["rows_per_s_x_lr"] == 1.2
    bars = {b["bar"]: b for b in report.bars(summary, {})}
    assert bars["trigger flow rows/s >= 1.3 x logical (ratio)"]["ok"] is False
    assert bars["trigger flow DB CPU <= 0.8 x Londiste"]["ok"] is None  # not measured


def test_total_adds_rows_seconds_and_cpu():
    phases = {"insert": {"rows": 100, "seconds": 1.0, "source_per_s": 200, "lag_s": 0.2, "db_cpu_s": 1.0},
              "update": {"rows": 100, "seconds": 3.0, "source_per_s": 100, "lag_s": 0.1, "db_cpu_s": 2.0}}
    figures = total(phases)
    assert figures["rows_per_s"] == 50 and figures["lag_s"] == 0.2 and figures["db_cpu_s"] == 3.0
    assert figures["source_per_s"] == round(200 / 1.5)


@pytest.mark.bench
def test_apply_path_benchmark_prints_cpu_per_packet_for_each_role_and_batch():
    dsn = os.environ.get("GOLCONDE_TEST_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    result = subprocess.run([sys.executable, "-m", "bench.apply", "--dsn", dsn, "--packets", "60",
                             "--batches", "1,25"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: %d cores" % os.cpu_count())
    rows = [line.split() for line in lines if line.startswith(("destination", "target"))]
    assert [(r[0], r[1]) for r in rows] == [("destination", "1"), ("destination", "25"),
                                            ("target", "1"), ("target", "25")]
    for row in rows:    # "cpu / wall" for add, update, delete; CPU never above wall
        figures = [float(x) for x in row[2:] if x != "/"]
        assert len(figures) == 6 and all(f > 0 for f in figures), row
        assert all(figures[i] <= figures[i + 1] * 1.05 for i in (0, 2, 4)), row


def test_drain_benchmark_prints_the_cluster_cpu_of_each_way_of_draining(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.drain", "--rows", "2000", "--rounds", "1",
                             "--port", str(PORT + 2), "--workdir", WORKDIR], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: %d cores" % os.cpu_count())
    runs = [line.split() for line in lines if line.startswith("round ")]
    assert [(r[1], r[2]) for r in runs] == [("1", "delete"), ("1", "window"), ("1", "read")]
    assert runs[0][-1] == "0" and runs[1][-1] == "0"    # golconded's drains, then and now, miss nothing
    assert all(float(r[5]) > 0 for r in runs), runs
    assert lines[-1].startswith("median cluster CPU per row: delete ")
