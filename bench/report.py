"""Medians over runs, ratios to logical replication, the printed tables, the bars, the machine."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import urllib.request
from typing import Any, Dict, List, Optional

FIGURES = ("rows_per_s", "source_per_s", "intake_per_s", "lag_s", "db_cpu_src_s", "db_cpu_tgt_s",
           "db_cpu_s", "worker_cpu_s", "worker_rss_mb", "seconds")
LATENCY = ("p50_ms", "p99_ms", "max_ms", "rate_per_s", "canonical_p50_ms", "canonical_p99_ms",
           "probe_gap_p50_ms", "probe_gap_p99_ms", "probe_gap_max_ms")
PHASE_ORDER = ("insert", "update", "delete", "total", "intake")
BASELINE = "logical"


def median(values: List[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or base in (None, 0):
        return None
    return round(value / base, 2)


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``{mode: {"phases": {phase: {figure: median, figure + "_x_lr": median ratio}},
    "latency": {...}, "runs": n, "errors": [...]}}`` over every run in which the mode ran; each
    ratio is taken within a run (the mode's figure / logical replication's in that same run)."""
    names: List[str] = []
    for run in runs:
        names += [n for n in run["modes"] if n not in names]
    summary: Dict[str, Any] = {}
    for name in names:
        results = [(run["modes"][name], run["modes"].get(BASELINE)) for run in runs if name in run["modes"]]
        done = [(r, b) for r, b in results if not r.get("skipped")]
        entry: Dict[str, Any] = {"runs": len(done), "phases": {}, "latency": {},
                                 "errors": [r["error"] for r, _ in done if r.get("error")],
                                 "notes": sorted({n for r, _ in done for n in r.get("notes", [])}),
                                 "skipped": next((r["skipped"] for r, _ in results if r.get("skipped")), None)}
        for phase in PHASE_ORDER:
            rows = [(r["phases"].get(phase), (b or {}).get("phases", {}).get("total" if phase == "intake" else phase))
                    for r, b in done if r["phases"].get(phase)]
            if not rows:
                continue
            figures = {}
            for key in FIGURES:
                figures[key] = median([p.get(key) for p, _ in rows])
                figures[key + "_x_lr"] = median([ratio(p.get(key), (b or {}).get(key)) for p, b in rows])
            entry["phases"][phase] = figures
        lat = [(r.get("latency") or {}, (b or {}).get("latency") or {}) for r, b in done if r.get("latency")]
        for key in LATENCY:
            entry["latency"][key] = median([l.get(key) for l, _ in lat])
            entry["latency"][key + "_x_lr"] = median([ratio(l.get(key), b.get(key)) for l, b in lat])
        entry["latency"]["fixed_rate"] = any(l.get("fixed_rate") for l, _ in lat)
        summary[name] = entry
    return summary


def _fmt(value: Optional[float], digits: int = 0) -> str:
    if value is None:
        return "-"
    return "{:,.{}f}".format(value, digits)


def _x(value: Optional[float]) -> str:
    return "x%.2f" % value if value is not None else ""


def table(summary: Dict[str, Any], raw: Dict[str, Any]) -> str:
    """The printed report: one table per mode, then the raw broker rates."""
    lines = []
    header = ("  %-7s %9s %6s %9s %9s %7s %6s %8s %8s %8s %6s %9s %7s"
              % ("phase", "rows/s", "xLR", "source/s", "intake/s", "lag s", "xLR", "src cpu", "tgt cpu",
                 "db cpu", "xLR", "proc cpu", "RSS MB"))
    for name, entry in summary.items():
        if entry.get("skipped"):
            lines.append("\n== %s: skipped (%s)" % (name, entry["skipped"]))
            continue
        lines.append("\n== %s (median of %d run%s)" % (name, entry["runs"], "" if entry["runs"] == 1 else "s"))
        lines.append(header)
        for phase, f in entry["phases"].items():
            lines.append("  %-7s %9s %6s %9s %9s %7s %6s %8s %8s %8s %6s %9s %7s" % (
                phase, _fmt(f["rows_per_s"]), _x(f["rows_per_s_x_lr"]), _fmt(f["source_per_s"]),
                _fmt(f["intake_per_s"]),
                _fmt(f["lag_s"], 3), _x(f["lag_s_x_lr"]), _fmt(f["db_cpu_src_s"], 1),
                _fmt(f["db_cpu_tgt_s"], 1), _fmt(f["db_cpu_s"], 1), _x(f["db_cpu_s_x_lr"]),
                _fmt(f["worker_cpu_s"], 1), _fmt(f["worker_rss_mb"], 1)))
        lat = entry["latency"]
        if lat.get("p99_ms") is not None:
            lines.append("  latency enqueue -> committed on both targets, paced at %s rows/s:"
                         " p50 %s ms %s, p99 %s ms %s, max %s ms %s" % (
                             _fmt(lat["rate_per_s"]), _fmt(lat["p50_ms"], 1), _x(lat["p50_ms_x_lr"]),
                             _fmt(lat["p99_ms"], 1), _x(lat["p99_ms_x_lr"]), _fmt(lat["max_ms"], 1),
                             _x(lat["max_ms_x_lr"])))
            if lat.get("probe_gap_p99_ms") is not None:
                lines.append("  (late by at most the gap between the probe's polls: p50 %s ms, p99 %s ms,"
                             " max %s ms)" % (_fmt(lat["probe_gap_p50_ms"], 1),
                                              _fmt(lat["probe_gap_p99_ms"], 1),
                                              _fmt(lat["probe_gap_max_ms"], 1)))
            if lat.get("canonical_p99_ms") is not None:
                lines.append("  of which enqueue -> committed on the canonical table: p50 %s ms, p99 %s ms"
                             % (_fmt(lat["canonical_p50_ms"], 1), _fmt(lat["canonical_p99_ms"], 1)))
        for error in entry["errors"]:
            lines.append("  ERROR: %s" % error)
        for note in entry["notes"]:
            lines.append("  note: %s" % note)
    if raw:
        lines.append("\n== broker, plain stomp.py (median): publish %s msg/s; consume %s msg/s with a"
                     " cumulative ack every 500, %s msg/s acking each" % (
                         _fmt(raw.get("publish_per_s")), _fmt(raw.get("consume_cumulative_per_s")),
                         _fmt(raw.get("consume_each_per_s"))))
    return "\n".join(lines)


def bars(summary: Dict[str, Any], raw: Dict[str, Any],
         backlog: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The issue's bars, each ``{"bar", "value", "limit", "ok"}`` (``ok`` None: not measured)."""
    def get(mode: str, phase: str, key: str) -> Optional[float]:
        return summary.get(mode, {}).get("phases", {}).get(phase, {}).get(key)

    out = []

    def check(text: str, value: Optional[float], limit: Optional[float], less: bool) -> None:
        ok = None if value is None or limit is None else (value < limit if less else value >= limit)
        out.append({"bar": text, "value": value, "limit": limit, "ok": ok})

    # against logical replication: the median of the ratios taken within each run
    check("trigger flow rows/s >= 1.3 x logical (ratio)", get("golconde-trigger", "total", "rows_per_s_x_lr"),
          1.3, False)
    ld_cpu = get("londiste", "total", "db_cpu_s")
    check("trigger flow DB CPU <= 0.8 x Londiste", get("golconde-trigger", "total", "db_cpu_s"),
          ld_cpu * 0.8 + 1e-9 if ld_cpu else None, True)
    check("trigger flow DB CPU < logical (ratio)", get("golconde-trigger", "total", "db_cpu_s_x_lr"),
          1.0, True)
    check("trigger flow lag after the source stops < 0.1 s", get("golconde-trigger", "total", "lag_s"), 0.1, True)
    consume = raw.get("consume_cumulative_per_s") if raw else None
    check("client flow intake >= 0.7 x raw stomp.py consume (cumulative acks)",
          get("golconde-client", "intake", "intake_per_s"), consume * 0.7 if consume else None, False)
    latency = summary.get("golconde-client", {}).get("latency", {})
    check("client flow p99 latency < 50 ms at half the maximum rate",
          None if latency.get("fixed_rate") else latency.get("p99_ms"), 50.0, True)
    if backlog:
        check("golconded peak RSS with %s packets queued < 150 MB" % _fmt(backlog["packets"]),
              backlog.get("peak_rss_mb") if backlog.get("equal") else None, 150.0, True)
    return out


def backlog_text(backlog: Dict[str, Any]) -> str:
    """One line: the backlog run's figures (bench/backlog.py)."""
    if backlog.get("error"):
        return "\n== backlog of %s packets: FAILED: %s" % (_fmt(backlog["packets"]), backlog["error"])
    return ("\n== backlog: %s packets queued on the destination's queue and on each target's (golconded"
            " stopped), queued in %s s; golconded drained all three in %s s, peak RSS %s MB"
            % (_fmt(backlog["packets"]), _fmt(backlog["preload_s"], 1), _fmt(backlog["drain_s"], 1),
               _fmt(backlog["peak_rss_mb"], 1)))


def bars_text(results: List[Dict[str, Any]]) -> str:
    lines = ["\n== bars (issue)"]
    for bar in results:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[bar["ok"]]
        lines.append("  %s  %-70s %s (limit %s)" % (verdict, bar["bar"], _fmt(bar["value"], 3),
                                                   _fmt(bar["limit"], 3)))
    return "\n".join(lines)


def _version(argv: List[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def machine(pg_version: str, stomp_login: str, stomp_passcode: str) -> Dict[str, Any]:
    """Cores, CPU model, memory, and the versions of everything measured."""
    import base64

    import psycopg2
    import stomp

    import golconde

    model = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kb = int(handle.readline().split()[1])
    rabbit = "?"
    try:
        auth = "Basic " + base64.b64encode(("%s:%s" % (stomp_login, stomp_passcode)).encode()).decode()
        request = urllib.request.Request("http://127.0.0.1:15672/api/overview", headers={"Authorization": auth})
        with urllib.request.urlopen(request, timeout=5) as response:
            rabbit = json.loads(response.read().decode()).get("rabbitmq_version", "?")
    except (OSError, ValueError):
        pass
    return {
        "cores": os.cpu_count(), "cpu": model, "memory_gib": round(mem_kb / 1048576, 1),
        "kernel": platform.release(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "postgresql": pg_version, "pgbench": _version(["pgbench", "--version"]),
        "rabbitmq": rabbit, "python": platform.python_version(), "stomp.py": stomp.__version__
        if isinstance(getattr(stomp, "__version__", None), str) else ".".join(map(str, stomp.__version__)),
        "psycopg2": psycopg2.__version__.split()[0], "golconde": golconde.__version__,
    }


def machine_text(info: Dict[str, Any]) -> str:
    return ("machine: %(cores)s cores (%(cpu)s), %(memory_gib)s GiB, Linux %(kernel)s, load %(load_average)s\n"
            "versions: %(postgresql)s; %(pgbench)s; RabbitMQ %(rabbitmq)s; Python %(python)s;"
            " stomp.py %(stomp.py)s; psycopg2 %(psycopg2)s; golconde %(golconde)s" % info)
