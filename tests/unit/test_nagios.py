"""Pure logic of the check_golconde plugin (golconde.nagios): thresholds, error deltas, verdicts
and the status line, on given /stats and /health documents (the plugin against a real daemon is in
tests/integration/test_operators.py)."""
from __future__ import annotations

import nagiosplugin
import pytest

from golconde import nagios


def stats(broker="connected", database="connected", lag=0.2, backlog=3, errors=0, role=None):
    return {"broker": broker, "database": database, "lag": lag, "backlog": backlog, "errors": errors,
            "role": role, "unmatched": 0}


class Fixed(nagios.Listeners):
    """Listeners whose probe reads given documents instead of HTTP."""

    def __init__(self, threads=None, errors=None, health=None, unmatched=None):
        super().__init__("http://127.0.0.1:1", 1.0, None, health=health is not None)
        self.threads, self.errors, self.health_answer = threads, errors or {}, health
        self.unmatched = unmatched or {}

    def probe(self):
        if self.health_answer is not None:
            return list(self.health_metrics(*self.health_answer))
        return list(self.stats_metrics(self.threads, self.errors, self.unmatched))


def run(resource, argv=()):
    args = nagios.build_parser().parse_args(list(argv))
    check = nagios.make_check(args)
    check.resources = [resource]
    check()
    return check


def test_ok_status_line_and_perfdata():
    check = run(Fixed([("D", stats()), ("D_t1", stats(lag=1.5, backlog=0))]))
    assert check.exitcode == 0
    assert check.summary_str == "2 listeners connected, max lag 1.5s, max backlog 3, 0 new errors"
    assert "'D_t1 lag'=1.5s;30;300;0" in check.perfdata
    assert "'D backlog'=3;1000;10000;0" in check.perfdata
    assert "'D errors'=0;0;10;0" in check.perfdata


@pytest.mark.parametrize("argv, lag, code", [
    ([], 29.9, 0), ([], 30.5, 1), ([], 300.5, 2),
    (["--lag-warning", "5", "--lag-critical", "10"], 7, 1),
    (["--lag-warning", "5", "--lag-critical", "10"], 11, 2),
    (["-w", "5", "-c", "10"], 11, 2),
    (["-w", "5,,", "-c", ",,"], 400, 2),             # empty parts keep the defaults
    (["-w", "50", "--lag-warning", "5"], 7, 1),        # the explicit option wins
    (["--lag-warning", "@0:1"], 0.5, 1),               # inside the range alerts
])
def test_lag_thresholds(argv, lag, code):
    assert run(Fixed([("D", stats(lag=lag))]), argv).exitcode == code


def test_backlog_and_errors_thresholds():
    assert run(Fixed([("D", stats(backlog=1001))])).exitcode == 1
    assert run(Fixed([("D", stats(backlog=10001))])).exitcode == 2
    assert run(Fixed([("D", stats())], errors={"D": 1})).exitcode == 1
    check = run(Fixed([("D", stats())], errors={"D": 11}))
    assert check.exitcode == 2 and "D errors 11 new" in check.summary_str
    assert run(Fixed([("D", stats())], errors={"D": 3}), ["-w", ",,5"]).exitcode == 0


def test_unknown_values_are_not_judged():
    check = run(Fixed([("D", stats(lag=None, backlog=None))]))
    assert check.exitcode == 0
    assert not any("lag" in p or "backlog" in p for p in check.perfdata)


def test_a_connection_down_is_critical_and_named():
    check = run(Fixed([("D", stats()), ("D_t2", stats(broker="stopped", database="stopped")),
                       ("D_t1", stats(lag=40))]))
    assert check.exitcode == 2
    # the worst first, every problem on the one line
    assert check.summary_str == ("D_t2: broker stopped, database stopped; "
                                 "D_t1 lag 40s (outside range 0:30)")


def test_health_answers():
    ok = {"status": "ok", "reasons": [], "listeners": {"D": stats(lag=0.1)}}
    check = run(Fixed(health=(200, ok)))
    assert check.exitcode == 0 and check.summary_str == "healthy, 1 listeners, max lag 0.1s, max backlog 3"
    fail = {"status": "fail", "reasons": ["D: broker disconnected"],
            "listeners": {"D": stats(broker="disconnected")}}
    check = run(Fixed(health=(503, fail)))
    assert check.exitcode == 2 and check.summary_str == "unhealthy: D: broker disconnected"
    with pytest.raises(ValueError):
        list(nagios.Listeners.health_metrics(500, {"error": "internal error"}))


def test_no_listener_is_an_error():
    with pytest.raises(ValueError):
        list(nagios.Listeners.stats_metrics([], {}))


def test_new_counts():
    assert nagios.new_counts({"D": 5, "E": 2}, None) == {"D": 0, "E": 0}
    assert nagios.new_counts({"D": 5, "E": 2}, {"D": 3}) == {"D": 2, "E": 0}
    assert nagios.new_counts({"D": 1}, {"D": 9}) == {"D": 1}          # the daemon restarted


def test_unmatched_is_judged_at_targets_only():
    threads = [("D", stats(role="destination")), ("D_t1", stats(role="target")),
               ("D_t2", stats(role="target"))]
    check = run(Fixed(threads, unmatched={"D": 50}))
    assert check.exitcode == 0
    assert check.summary_str.endswith(", 0 new errors, 0 new unmatched")
    assert "'D_t1 unmatched'=0;0;;0" in check.perfdata
    assert not any(p.startswith("'D unmatched'") for p in check.perfdata)
    check = run(Fixed(threads, unmatched={"D_t2": 2}))
    assert check.exitcode == 1
    assert check.summary_str == "D_t2 unmatched 2 new (outside range 0:0)"
    assert run(Fixed(threads, unmatched={"D_t2": 2}), ["-w", ",,,~:"]).exitcode == 0
    assert run(Fixed(threads, unmatched={"D_t2": 2}), ["-w", ",,,5"]).exitcode == 0
    assert run(Fixed(threads, unmatched={"D_t2": 20}), ["-c", ",,,10"]).exitcode == 2
    assert run(Fixed(threads, unmatched={"D_t2": 20}),
               ["--unmatched-critical", "10"]).exitcode == 2
    assert run(Fixed(threads, unmatched={"D_t2": 2}), ["-w", ",,,"]).exitcode == 1   # defaults
    assert run(Fixed(threads, unmatched={"D_t2": 2}), ["--unmatched-warning", ""]).exitcode == 0
    # a daemon that does not count them (older): no figure, rather than a false 0
    older = [(name, {k: v for k, v in figures.items() if k != "unmatched"}) for name, figures in threads]
    check = run(Fixed(older))
    assert "unmatched" not in check.summary_str
    assert not any("unmatched" in p for p in check.perfdata)


def test_counters_since_the_previous_check_are_kept_in_the_state_file(tmp_path, monkeypatch):
    """probe() reads /stats, keeps the errors' and unmatched totals per URL, and judges what is
    new; the errors' totals stay where they were before unmatched was (the URL's key)."""
    document = {"threads": [{"D": dict(stats(role="destination"), unmatched=7)},
                            {"D_t1": dict(stats(role="target", errors=1), unmatched=3)}]}

    answers = [document]
    state = str(tmp_path / "state")
    monkeypatch.setattr(nagios, "fetch", lambda url, timeout: (200, answers.pop(0)))
    first = {m.name: m.value for m in nagios.Listeners("http://127.0.0.1:1", 1.0, state).probe()}
    assert (first["D_t1 errors"], first["D_t1 unmatched"]) == (0, 0)
    answers.append({"threads": [{"D": dict(stats(role="destination"), unmatched=9)},
                                {"D_t1": dict(stats(role="target", errors=4), unmatched=5)}]})
    second = {m.name: m.value for m in nagios.Listeners("http://127.0.0.1:1", 1.0, state).probe()}
    assert (second["D_t1 errors"], second["D_t1 unmatched"]) == (3, 2)
    assert "D unmatched" not in second
    with nagiosplugin.Cookie(state) as cookie:
        assert cookie["http://127.0.0.1:1"] == {"D": 0, "D_t1": 4}
        assert cookie["http://127.0.0.1:1 unmatched"] == {"D_t1": 5}      # the judged ones


def test_invalid_range_is_reported():
    args = nagios.build_parser().parse_args(["--backlog-critical", "10:5"])
    with pytest.raises(ValueError, match="invalid backlog critical range '10:5'"):
        nagios.make_check(args)


def test_default_state_file_is_per_url(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    one = nagios.default_state_file("http://a:8080")
    assert one.startswith(str(tmp_path / "check_golconde"))
    assert one != nagios.default_state_file("http://b:8080")


def test_performance_labels_are_nagios_safe():
    perf = nagiosplugin.Performance("D_t1 lag", 1.5, "s", 30, 300, 0)
    assert str(perf) == "'D_t1 lag'=1.5s;30;300;0"


def test_a_standing_problem_is_critical_and_named():
    problem = "capture trigger t on public.a restricts by (id), but the primary key is now (id, x)"
    check = run(Fixed([("D", dict(stats(), problems=[problem])), ("D_t1", stats())]))
    assert check.exitcode == 2
    assert check.summary_str == "D: " + problem
    check = run(Fixed([("D", dict(stats(), problems=[])), ("D_t1", stats())]))
    assert check.exitcode == 0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_that_is_no_positive_number_is_a_usage_error(value):
    """-t 0 made the socket non-blocking: every check failed with "Operation now in progress"."""
    from golconde.nagios import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["-t", value])


@pytest.mark.parametrize("value", ["0", "99999", "-1", "http"])
def test_a_port_outside_1_to_65535_is_a_usage_error(value, capsys):
    """-p 0 or 99999 was read as a daemon that is down: CRITICAL, where it is a usage error."""
    with pytest.raises(SystemExit) as info:
        nagios.build_parser().parse_args(["-p", value])
    assert info.value.code == 3
    assert capsys.readouterr().out.startswith("GOLCONDE UNKNOWN - argument -p/--port: expected a TCP port")


def test_more_ranges_than_metrics_are_refused():
    """-w 1,2,3,4,5 (or ,,,,,) was accepted, its extra parts ignored."""
    for combined in ("1,2,3,4,5", ",,,,,"):
        args = nagios.build_parser().parse_args(["-w", combined])
        with pytest.raises(ValueError, match="invalid warning ranges %r: at most 4, comma-separated"
                                             r" \(LAG,BACKLOG,ERRORS,UNMATCHED\)" % combined):
            nagios.make_check(args)
    assert nagios.make_check(nagios.build_parser().parse_args(["-c", "300,10000,10"]))


@pytest.mark.parametrize("value", ["http://127.0.0.1:0", "http://127.0.0.1:99999", "ftp://h:1", "db1:8080",
                                   "http://h:", "http://h:8080?x", "http://h:8080#f"])
def test_a_url_without_a_usable_port_or_scheme_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as info:
        nagios.build_parser().parse_args(["-u", value])
    assert info.value.code == 3
    assert capsys.readouterr().out.startswith("GOLCONDE UNKNOWN - argument -u/--url: expected an http")
    assert nagios.build_parser().parse_args(["-u", "http://db1:8080"]).url == "http://db1:8080"
