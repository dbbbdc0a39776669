"""What operators use, against a real daemon, PostgreSQL and RabbitMQ: /health with the YAML
thresholds, /metrics while packets flow, the check_golconde plugin, `golconde status` (backlog from
RabbitMQ's management API), golconded daemonized with a pid file, syslog logging, the systemd unit,
and progress bars on a terminal."""
from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from golconde import cli
from golconde.daemon import Daemon

from .flow_support import (execute, make_config, parse_config, query, send_raw, wait_for,
                           write_config)
from .operators_support import ITEMS, Pump, free_port, get_json, health_code, http_get, thread_stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECK = [sys.executable, os.path.join(ROOT, "bin", "check_golconde")]


@pytest.fixture
def ops(make_database, tmp_path):
    """A running in-process daemon: destination with targets t1 and t2 on public.items, HTTP on a
    free port, health thresholds max_backlog 10000 and max_lag 120; its configuration file too."""
    canonical, t1, t2 = make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, ITEMS)
    port = free_port()
    mapping = make_config(canonical, {"t1": t1, "t2": t2}, "public.items", http_port=port)
    mapping["HTTPServer"]["health"] = {"max_backlog": 10000, "max_lag": 120}
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    config = parse_config(mapping)
    daemon = Daemon(config, config_path=path)
    daemon.start()
    destination = config.destinations[0]
    state = {"daemon": daemon, "port": port, "destination": destination, "config": config,
             "path": path, "mapping": mapping, "canonical": canonical, "targets": [t1, t2],
             "tmp": tmp_path}
    wait_for(lambda: health_code(port) == 200, timeout=60, message="daemon healthy")
    yield state
    assert daemon.stop(), "daemon did not stop in time"


def stop_listener(ops, thread):
    listener = ops["daemon"].listeners[thread]
    listener.stop()
    listener.join(10)
    assert not listener.is_alive()


def pump_some(ops, seconds=3.0):
    pump = Pump(ops["destination"].queue, rate=100.0, limit=seconds)
    pump.start()
    pump.join(seconds + 15)
    assert pump.error is None, pump.error
    return pump.sent


def rows(dsn):
    return query(dsn, "SELECT count(*) FROM public.items")[0][0]


# -- /health -----------------------------------------------------------------------------------
def test_health_follows_connections_and_yaml_thresholds(ops, make_database):
    port, destination = ops["port"], ops["destination"]
    status, doc = get_json(port, "/health")
    assert status == 200 and doc["status"] == "ok" and doc["reasons"] == []
    assert doc["thresholds"] == {"max_backlog": 10000, "max_lag": 120.0}
    assert set(doc["listeners"]) == {destination.name, destination.name + "_t1",
                                     destination.name + "_t2"}
    stopped = destination.targets[1].thread_name
    stop_listener(ops, stopped)
    status, doc = get_json(port, "/health")
    assert status == 503 and doc["status"] == "fail"
    assert doc["reasons"] == ["%s: broker stopped" % stopped, "%s: database stopped" % stopped]
    assert doc["listeners"][stopped]["status"] == "fail"
    assert doc["listeners"][destination.name]["status"] == "ok"


def test_health_lag_threshold_from_yaml(make_database, tmp_path):
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, ITEMS)
    port = free_port()
    mapping = make_config(canonical, {"t1": t1}, "public.items", http_port=port)
    mapping["HTTPServer"]["health"] = {"max_lag": 0.000001}
    daemon = Daemon(parse_config(mapping))
    daemon.start()
    try:
        wait_for(lambda: health_code(port) == 200, timeout=60, message="healthy")
        pump_some({"destination": daemon.config.destinations[0]}, seconds=1.0)
        wait_for(lambda: get_json(port, "/health")[0] == 503, timeout=30, message="lag over 1 us")
        reasons = get_json(port, "/health")[1]["reasons"]
        assert reasons and all(" lag " in reason and "> 1e-06 s" in reason for reason in reasons)
    finally:
        assert daemon.stop()


# -- /metrics ----------------------------------------------------------------------------------
def scrape(port):
    status, headers, body = http_get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_while_packets_flow(ops):
    port, destination = ops["port"], ops["destination"]
    name = destination.name
    t1 = dict(destination=name, target="t1", thread=name + "_t1", role="target")
    before = scrape(port)
    assert sample(before, "golconde_up", **t1) == 1
    assert sample(before, "golconde_packets_total", action="add", **t1) == 0
    sent = pump_some(ops)
    # what the destination fanned out, to each of the two targets: all it applied but what changed
    # no canonical row (unmatched); counted once confirmed and acked, after the applied count
    def done(stats):
        return stats["applied"] == sent and stats["fanned_out"] == 2 * (sent - stats["unmatched"])
    wait_for(lambda: done(thread_stats(port, name)), timeout=60,
             message="the destination applied and fanned out everything")
    fanned = thread_stats(port, name)["fanned_out"] // 2
    assert 0 < fanned <= sent
    wait_for(lambda: thread_stats(port, name + "_t1")["applied"] == fanned, timeout=60,
             message="t1 applied everything")
    after = scrape(port)
    adds = sample(after, "golconde_packets_total", action="add", **t1)
    assert adds > 0
    assert sum(sample(after, "golconde_packets_total", action=a, **t1)
               for a in ("add", "set", "update", "delete")) == fanned
    assert sample(after, "golconde_applied_total", **t1) == fanned
    assert sample(after, "golconde_fanned_out_total", destination=name, target="", thread=name,
                  role="destination") == 2 * fanned
    assert sample(after, "golconde_apply_duration_seconds_count", **t1) == fanned
    assert sample(after, "golconde_apply_duration_seconds_bucket", le="+Inf", **t1) == fanned
    assert sample(after, "golconde_apply_duration_seconds_sum", **t1) > 0
    assert 0 <= sample(after, "golconde_lag_seconds", **t1) < 60
    assert sample(after, "golconde_connection_state", connection="broker", state="connected", **t1) == 1
    assert sample(after, "golconde_listeners") == 3
    stop_listener(ops, name + "_t2")
    stopped = scrape(port)
    t2 = dict(t1, target="t2", thread=name + "_t2")
    assert sample(stopped, "golconde_up", **t2) == 0
    assert sample(stopped, "golconde_connection_state", connection="database", state="stopped", **t2) == 1


# -- check_golconde ------------------------------------------------------------------------------
def check(*args, timeout=30):
    return subprocess.run(CHECK + list(args), capture_output=True, text=True, timeout=timeout)


def test_nagios_plugin_against_the_daemon(ops):
    port, destination = ops["port"], ops["destination"]
    state = str(ops["tmp"] / "check.state")
    base = ["-H", "127.0.0.1", "-p", str(port), "--state-file", state]
    names = [destination.name, destination.name + "_t1", destination.name + "_t2"]
    wait_for(lambda: all(thread_stats(port, name)["lag"] == 0.0 for name in names), timeout=30,
             message="every listener idle once")
    result = check(*base)
    assert result.returncode == 0, result.stdout + result.stderr
    line, _, perfdata = result.stdout.strip().partition(" | ")
    assert result.stdout.count("\n") == 1
    # idle listeners: nothing held, so nothing late (lag 0) and nothing waiting (backlog 0)
    assert line == ("GOLCONDE OK - 3 listeners connected, max lag 0s, max backlog 0, 0 new errors,"
                    " 0 new unmatched")
    assert "'%s_t1 errors'=0;0;10;0" % destination.name in perfdata
    assert "'%s_t1 unmatched'=0;0;;0" % destination.name in perfdata
    assert "'%s unmatched'" % destination.name not in perfdata     # a destination's: not judged

    pump_some(ops, seconds=1.0)
    wait_for(lambda: thread_stats(port, destination.name + "_t2")["lag"] is not None, timeout=30,
             message="lag known")
    result = check(*base, "--lag-warning", "30", "--lag-critical", "300")
    assert result.returncode == 0 and "max lag" in result.stdout
    assert "'%s_t1 lag'=" % destination.name in result.stdout

    # a packet that cannot be applied: one new error since the last check -> WARNING, then OK again
    send_raw(destination.queue, ["{not json"])
    wait_for(lambda: thread_stats(port, destination.name)["errors"] == 1, timeout=30,
             message="error counted")
    result = check(*base)
    assert result.returncode == 1, result.stdout
    assert result.stdout.startswith("GOLCONDE WARNING - %s errors 1 new" % destination.name)
    assert check(*base).returncode == 0
    assert check(*base, "--errors-warning", "@0:0").returncode == 1   # inside 0:0 alerts

    # a row gone at t1 only (deleted there by hand): the update of that row finds nothing there,
    # one new unmatched packet at t1 -> WARNING; the destination's update of an absent row is not
    send_raw(destination.queue, ['{"action": "add", "data": {"id": 9001, "value": "x"}}'])
    t1_dsn = ops["targets"][0]
    wait_for(lambda: query(t1_dsn, "SELECT value FROM public.items WHERE id = 9001") == [("x",)],
             timeout=30, message="the add applied at t1")
    execute(t1_dsn, "DELETE FROM public.items WHERE id = 9001")
    # (the pump's updates of keys it never added were the destination's unmatched packets)
    before = thread_stats(port, destination.name)["unmatched"]
    assert thread_stats(port, destination.name + "_t1")["unmatched"] == 0
    send_raw(destination.queue, ['{"action": "update", "data": {"value": "y"},'
                                 ' "restriction": {"id": 9001}}',
                                 '{"action": "delete", "restriction": {"id": 9002}}'])
    wait_for(lambda: thread_stats(port, destination.name + "_t1")["unmatched"] == 1
             and thread_stats(port, destination.name)["unmatched"] == before + 1, timeout=30,
             message="one unmatched packet at t1 and one more at the destination")
    result = check(*base)
    assert result.returncode == 1, result.stdout
    assert result.stdout.startswith("GOLCONDE WARNING - %s_t1 unmatched 1 new (outside range 0:0)"
                                    % destination.name), result.stdout
    assert check(*base).returncode == 0                               # none new since
    send_raw(destination.queue, ['{"action": "update", "data": {"value": "z"},'
                                 ' "restriction": {"id": 9001}}'])
    wait_for(lambda: thread_stats(port, destination.name + "_t1")["unmatched"] == 2, timeout=30,
             message="a second unmatched packet at t1")
    result = check(*base, "-w", ",,,~:")                             # never judged
    assert result.returncode == 0, result.stdout
    assert ", 0 new errors, 1 new unmatched |" in result.stdout

    # thresholds -> CRITICAL; a stopped target -> CRITICAL naming it; /health mode
    assert check(*base, "--lag-warning", "@0:1000", "--lag-critical", "@0:1000").returncode == 2
    stop_listener(ops, destination.name + "_t2")
    result = check(*base)
    assert result.returncode == 2
    assert "%s_t2: broker stopped, database stopped" % destination.name in result.stdout
    result = check("-u", "http://127.0.0.1:%d" % port, "--health")
    assert result.returncode == 2
    assert result.stdout.startswith("GOLCONDE CRITICAL - unhealthy: %s_t2: broker stopped"
                                    % destination.name)


def test_nagios_plugin_unreachable_and_timeout(tmp_path):
    state = ["--state-file", str(tmp_path / "state")]
    result = check("-p", str(free_port()), *state)               # nothing listens: CRITICAL
    assert result.returncode == 2
    assert result.stdout.startswith("GOLCONDE CRITICAL - cannot connect to")
    with socket.socket() as silent:                               # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        result = check("-p", str(silent.getsockname()[1]), "-t", "1", *state)
        assert time.monotonic() - started < 10
    assert result.returncode == 3, result.stdout
    assert result.stdout.startswith("GOLCONDE UNKNOWN")
    assert "Timeout" in result.stdout
    result = check("--lag-warning", "x:y", *state)
    assert result.returncode == 3 and "invalid lag warning range" in result.stdout


# -- golconde status -----------------------------------------------------------------------------
def status(ops, capsys, *extra):
    """(exit status, stdout) of `golconde status -c <file> ...` run in this process (its logging
    set-up replaces the root handlers: they are put back)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        code = cli.admin_main(["status", "-c", ops["path"], "--interval", "0.5"] + list(extra))
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    return code, capsys.readouterr().out


def test_status_tree_and_json_with_broker_backlog(ops, capsys):
    destination = ops["destination"]
    name = destination.name
    code, out = status(ops, capsys)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("golconded 1.") and "http://127.0.0.1:%d" % ops["port"] in lines[0]
    assert lines[1] == "%s  destination (client mode)  UP  %s -> public.items" % (name, destination.queue)
    assert "+-- t1  UP  %s.t1 -> public.items" % destination.queue in lines
    assert "+-- t2  UP  %s.t2 -> public.items" % destination.queue in lines
    assert "|   broker connected, database connected" in lines

    # t2 stops: its packets wait in its queue, and the broker says how many
    stop_listener(ops, name + "_t2")
    sent = pump_some(ops, seconds=1.0)
    queue = destination.queue[len("/queue/"):] + ".t2"

    def t2_backlog():
        reported = json.loads(status(ops, capsys, "--json")[1])["destinations"][0]["targets"][1]
        return reported["backlog"], reported["backlog_source"]

    # the destination fans out batch messages: the broker counts messages, not packets
    wait_for(lambda: rows(ops["targets"][0]) == rows(ops["canonical"]) > 0
             and t2_backlog() == (rabbitmq_depth(queue), "broker") and t2_backlog()[0] > 0,
             timeout=60, message="t2's backlog on the broker")
    backlog = t2_backlog()[0]
    code, out = status(ops, capsys, "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["daemon"]["reachable"] is True
    dest = doc["destinations"][0]
    assert dest["name"] == name and dest["state"] == "up" and dest["mode"] == "client"
    assert dest["backlog"] == 0 and dest["backlog_source"] == "broker"
    assert dest["applied"] == sent and dest["errors"] == 0
    t1, t2 = dest["targets"]
    assert (t1["name"], t1["state"], t1["backlog"], t1["backlog_source"]) == ("t1", "up", 0, "broker")
    # what the destination matched, t1 matched too (a client's update of an absent row is the
    # destination's unmatched alone: it is not fanned out)
    assert t1["unmatched"] == 0 and isinstance(dest["unmatched"], int)
    assert (t2["name"], t2["state"], t2["backlog"], t2["backlog_source"]) == ("t2", "down", backlog, "broker")
    assert t2["broker"] == "stopped" and t2["dead_letter_backlog"] == 0
    code, out = status(ops, capsys)
    assert code == 1
    assert "+-- t2  DOWN  %s.t2 -> public.items" % destination.queue in out
    assert "backlog %d (broker)" % backlog in out


def rabbitmq_depth(queue):
    """Messages in ``queue`` per RabbitMQ's management API, asked directly."""
    request = urllib.request.Request("http://127.0.0.1:15672/api/queues/%%2F/%s" % queue)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read()).get("messages")


def test_status_without_management_api_and_without_daemon(ops, capsys):
    code, out = status(ops, capsys, "--json", "--management-url", "")
    doc = json.loads(out)
    assert code == 0
    assert all(t["backlog_source"] in ("daemon", None) for t in doc["destinations"][0]["targets"])
    # the management API refusing (wrong port): backlog falls back to the daemon's
    code, out = status(ops, capsys, "--json", "--management-url", "http://127.0.0.1:%d" % free_port())
    target = json.loads(out)["destinations"][0]["targets"][0]
    assert target["backlog_source"] in ("daemon", None) and "management API" in target["backlog_note"]
    # no daemon: every listener unknown, exit 1
    code, out = status(ops, capsys, "--url", "http://127.0.0.1:%d" % free_port())
    assert code == 1
    assert out.splitlines()[0].startswith("golconded: cannot read http://127.0.0.1:")
    assert "UNKNOWN" in out


def test_status_of_a_configuration_spread_over_two_daemons(make_database, tmp_path, capsys):
    """golconded --only: one process runs the destination, another its targets; `golconde status`
    with both --url reads each listener from the daemon that runs it (with one, the others are
    UNKNOWN and the status fails)."""
    canonical, t1, t2 = make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, ITEMS)
    ports = [free_port(), free_port()]
    mapping = make_config(canonical, {"t1": t1, "t2": t2}, "public.items", http_port=ports[0])
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    config = parse_config(mapping)
    destination = config.destinations[0]
    daemons = [Daemon(config, config_path=path, only=[destination.thread_name]),
               Daemon(config, config_path=path, only=[t.thread_name for t in destination.targets],
                      http_port=ports[1])]
    for daemon in daemons:
        daemon.start()
    state = {"path": path}
    urls = ["http://127.0.0.1:%d" % port for port in ports]
    try:
        wait_for(lambda: status(state, capsys, "--url", urls[0], "--url", urls[1])[0] == 0,
                 timeout=60, message="both daemons' listeners up")
        code, out = status(state, capsys, "--url", urls[0], "--url", urls[1])
        lines = out.splitlines()
        assert [line.split(" at ")[1].split(" (")[0] for line in lines[:2]] == urls
        assert "UNKNOWN" not in out and "+-- t2  UP" in out
        doc = json.loads(status(state, capsys, "--json", "--url", urls[0], "--url", urls[1])[1])
        assert [d["url"] for d in doc["daemons"]] == urls and doc["daemon"]["reachable"]
        code, out = status(state, capsys, "--url", urls[0])
        assert code == 1 and "+-- t1  UNKNOWN" in out
        unreachable = "http://127.0.0.1:%d" % free_port()
        code, out = status(state, capsys, "--json", "--url", urls[0], "--url", unreachable)
        doc = json.loads(out)
        assert code == 1 and not doc["daemon"]["reachable"]
        assert doc["daemon"]["error"].startswith("cannot read %s/stats" % unreachable)
    finally:
        for daemon in daemons:
            assert daemon.stop()


# -- the daemon as a service ---------------------------------------------------------------------
def test_daemon_mode_pidfile_and_sigterm(make_database, tmp_path):
    canonical = make_database()
    execute(canonical, ITEMS)
    port = free_port()
    # the configuration's port is not the one served: --http-port, like --only, survives the
    # daemon's rebuild after the fork
    mapping = make_config(canonical, {}, "public.items", http_port=free_port())
    log = tmp_path / "golconded.log"
    mapping["Logging"] = {"level": "info", "filename": str(log)}
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    pidfile = tmp_path / "golconded.pid"
    command = [sys.executable, "-m", "golconde.daemon_entry", "-c", path, "--pidfile", str(pidfile),
               "--http-port", str(port)]
    parent = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert parent.returncode == 0, parent.stderr          # the parent returns once detached
    assert "log goes nowhere" not in parent.stderr
    wait_for(pidfile.exists, timeout=20, message="pid file")
    pid = int(pidfile.read_text().strip())
    try:
        wait_for(lambda: health_code(port) == 200, timeout=60, message="daemon healthy")
        assert os.getsid(pid) != os.getsid(0)            # detached: a session of its own
        again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert again.returncode == 1 and "already running as pid %d" % pid in again.stderr
        # SIGHUP with an unchanged file restarts nothing (listeners built before the fork would
        # all look stopped in the daemon, and be started a second time)
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in log.read_text(), timeout=20, message="reload")
        assert "configuration reloaded: 0 listeners stopped, 0 started" in log.read_text()
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pidfile.exists(), timeout=20, message="pid file removed")
        wait_for(lambda: not _alive(pid), timeout=20, message="process gone")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert "signal %d: stopping" % signal.SIGTERM in text
    assert "[%s] destination listener stopped" % mapping_name(mapping) in text

    # without a log file or syslog, a detached daemon's log goes nowhere: said before detaching
    mapping["Logging"] = {"level": "info"}
    write_config(path, mapping)
    parent = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert parent.returncode == 0 and "the daemon's log goes nowhere" in parent.stderr
    wait_for(pidfile.exists, timeout=20, message="pid file")
    pid = int(pidfile.read_text().strip())
    try:
        wait_for(lambda: health_code(port) == 200, timeout=60, message="daemon healthy")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid), timeout=20, message="process gone")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def mapping_name(mapping):
    return next(iter(mapping["Destinations"]))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def test_syslog_handler_lines_carry_the_listener_name(make_database, tmp_path, monkeypatch):
    address = str(tmp_path / "log.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(0.2)
    monkeypatch.setattr(cli, "SYSLOG_ADDRESS", address)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    canonical = make_database()
    execute(canonical, ITEMS)
    mapping = make_config(canonical, {}, "public.items")
    mapping["Logging"] = {"level": "info", "handler": "journald"}
    config = parse_config(mapping)
    name = config.destinations[0].name
    try:
        cli.setup_logging(config.logging)
        assert isinstance(root.handlers[0], logging.handlers.SysLogHandler)
        daemon = Daemon(config)
        daemon.start()
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("subscribed to" in line for line in lines):
            try:
                lines.append(receiver.recv(65536).decode("utf-8"))
            except socket.timeout:
                pass
        assert daemon.stop()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        receiver.close()
    subscribed = [line for line in lines if "subscribed to" in line]
    assert subscribed, lines
    # <facility daemon (3) * 8 + info (6)>, the tag, the level, and the listener's name
    assert subscribed[0].startswith("<30>golconded[%d]: INFO " % os.getpid())
    assert "[%s] subscribed to %s" % (name, config.destinations[0].queue) in subscribed[0]


def test_systemd_unit():
    unit = open(os.path.join(ROOT, "etc", "golconded.service")).read()
    for line in ("Type=simple", "Restart=on-failure", "User=golconde",
                 "ExecReload=/bin/kill -HUP $MAINPID",
                 "ExecStart=/usr/local/bin/golconded -f -c /etc/golconde/golconde.yaml"):
        assert line in unit.splitlines(), line
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    local = unit.replace("/usr/local/bin/golconded", os.path.join(os.path.dirname(sys.executable),
                                                                  "golconded"))
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "golconded-%d.service" % os.getpid())
    with open(path, "w") as handle:
        handle.write(local)
    try:
        result = subprocess.run([analyze, "verify", path], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(path)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "golconded-" in line]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr


# -- progress bars -------------------------------------------------------------------------------
def run_on_terminal(command, timeout=60):
    """(exit status, everything written) of ``command`` with stdout and stderr on a pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100 chars
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT,
                            env=dict(os.environ, COLUMNS="100"))
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(10), b"".join(chunks).decode("utf-8", "replace")


def test_trigger_install_shows_progress_only_on_a_terminal(make_database):
    canonical = make_database()
    tables = ["t%d" % i for i in range(6)]
    for table in tables:
        execute(canonical, "CREATE TABLE %s (id integer PRIMARY KEY)" % table)  # fixed test names
    command = [sys.executable, "-m", "golconde.cli", "trigger", "install", "--dsn", canonical,
               "--destination", "Many"] + [arg for t in tables for arg in ("--table", t)]
    code, out = run_on_terminal(command)
    assert code == 0, out
    assert "trigger install:" in out and "6/6" in out and "table" in out   # tqdm's bar
    assert "[6/6]" in out
    plain = subprocess.run(command + [], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.count("\n") == 6 and plain.stdout.startswith("[1/6] ")
    assert "trigger install:" not in plain.stdout + plain.stderr
