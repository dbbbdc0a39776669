"""Tests of golconde.config: the example file, defaults, every kind of error, secrets."""
import copy
import dataclasses
import json
import os
import pickle

import psycopg2.extensions
import pytest
import yaml

from golconde import config
from golconde.errors import ConfigError

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "golconde.yaml")

#: The configuration of the 2009 slides, as it was written then.
CONFIG_2009 = """%YAML 1.2
---
Locations:
  base: /Users/gmr/Source/golconde
  logs: logs
Logging:
  filename: log.txt
  format: "%(levelname) -10s %(asctime)s %(message)s"
  level: debug
HTTPServer:
  enabled: True
  listen: 127.0.0.1
  port: 8000
Destinations:
  Test1:
    stomp: localhost:61613
    queue: /queue/golconde.test1
    pgsql: host=localhost user=gmr dbname=gmr
    target: friendships
    function_name: AutoSQL
    Targets:
      target1:
        stomp: localhost:61613
        queue: /queue/golconde.test1.target1
        pgsql: host=localhost user=gmr dbname=destination
        target: public.friendships
        function_name: AutoSQL
      target2:
        stomp: localhost:61613
        queue: /queue/golconde.test1.target2
        pgsql: host=localhost user=gmr dbname=destination_two
        target: public.friendships
        function_name: AutoSQL
"""


def minimal(**destination):
    """A one-destination configuration mapping; keyword arguments replace destination keys
    (``None`` removes one)."""
    dest = {"stomp": "localhost:61613", "queue": "/queue/golconde.test1",
            "pgsql": "host=localhost dbname=gmr", "target": "friendships"}
    dest.update(destination)
    return {"Destinations": {"Test1": {k: v for k, v in dest.items() if v is not None}}}


def target(name="t1", **keys):
    """A ``Targets`` entry for :func:`minimal`."""
    entry = {"stomp": "localhost:61613", "queue": "/queue/golconde.test1.%s" % name,
             "pgsql": "host=localhost dbname=%s" % name, "target": "public.friendships"}
    entry.update(keys)
    return {name: {k: v for k, v in entry.items() if v is not None}}


def problems(mapping):
    """The lines of the ConfigError raised by parse(mapping)."""
    with pytest.raises(ConfigError) as info:
        config.parse(mapping)
    assert info.value.problems == tuple(str(info.value).splitlines())
    return str(info.value).splitlines()


# --- valid configurations --------------------------------------------------------------------------

def test_example_file_parses():
    cfg = config.load(EXAMPLE)
    assert cfg.source == EXAMPLE
    assert cfg.http == config.HTTPConfig(enabled=True, listen="127.0.0.1", port=8080)
    (dest,) = cfg.destinations
    assert (dest.name, dest.mode, dest.thread_name) == ("Friendships", "client", "Friendships")
    assert dest.stomp.address == "127.0.0.1:61613"
    assert (dest.stomp.login, dest.stomp.passcode) == ("guest", "guest")
    assert dest.queue == "/queue/golconde.friendships"
    assert dest.target == "public.friendships"
    assert "dbname=golconde_canonical" in dest.pgsql
    assert [t.name for t in dest.targets] == ["target1", "target2"]
    target1, target2 = dest.targets
    assert target1.thread_name == "Friendships_target1"
    assert target1.destination == "Friendships"
    assert target1.queue == "/queue/golconde.friendships.target1"
    assert target1.dead_letter_queue == "/queue/golconde.friendships.target1.dlq"
    assert "dbname=golconde_target2" in target2.pgsql
    assert (target1.batch_size, target2.batch_size) == (500, 100)
    assert cfg.logging["level"] == "INFO"


def test_2009_configuration_parses_with_defaults():
    cfg = config.loads(CONFIG_2009, "golconde-2009.yaml")
    assert cfg.http.port == 8000 and cfg.http.enabled is True
    assert cfg.locations == {"base": "/Users/gmr/Source/golconde", "logs": "logs"}
    assert cfg.logging["filename"] == "log.txt" and cfg.logging["level"] == "DEBUG"
    (dest,) = cfg.destinations
    assert dest.mode == "client"
    assert dest.function_name == "AutoSQL"
    assert dest.dead_letter_queue == "/queue/golconde.test1.dlq"
    assert dest.settings == {}
    assert (dest.prefetch, dest.batch_size, dest.max_retries) == (1500, 500, 5)
    assert dest.poll_interval == 0.05
    assert dest.stomp == config.BrokerConfig("localhost", 61613, None, None, None, 10000)
    assert [t.thread_name for t in dest.targets] == ["Test1_target1", "Test1_target2"]


def test_defaults_when_sections_are_absent():
    cfg = config.parse(minimal())
    assert cfg.http == config.HTTPConfig(True, "127.0.0.1", 8080)
    assert cfg.logging == {} and cfg.locations == {}
    assert cfg.destinations[0].targets == ()
    assert cfg.source == "<string>"


def test_broker_and_defaults_are_inherited_and_overridden():
    mapping = minimal(login="dest", passcode="dest-secret", max_retries=2, Targets={
        **target("t1"), **target("t2", login="t2", passcode="t2-secret", prefetch=7)})
    mapping["Broker"] = {"login": "guest", "passcode": "guest", "heartbeat": 0, "vhost": "/golconde"}
    mapping["Defaults"] = {"prefetch": 50, "batch_size": 20, "max_retries": 9}
    dest = config.parse(mapping).destinations[0]
    t1, t2 = dest.targets
    assert (dest.stomp.login, dest.stomp.passcode) == ("dest", "dest-secret")
    assert (t1.stomp.login, t1.stomp.passcode) == ("dest", "dest-secret")
    assert (t2.stomp.login, t2.stomp.passcode) == ("t2", "t2-secret")
    assert dest.stomp.vhost == t2.stomp.vhost == "/golconde"
    assert dest.stomp.heartbeat_ms == 0
    assert (dest.prefetch, dest.batch_size, dest.max_retries) == (50, 20, 2)
    assert (t1.prefetch, t1.batch_size, t1.max_retries) == (50, 20, 2)
    assert t2.prefetch == 7
    assert dest.ledger_retention == t1.ledger_retention == config.DEFAULT_LEDGER_RETENTION == 604800


def test_batch_bytes_is_inherited_overridden_and_checked():
    assert config.parse(minimal()).destinations[0].batch_bytes == config.DEFAULT_BATCH_BYTES == 4194304
    mapping = minimal(Targets={**target("t1"), **target("t2", batch_bytes="2048")})
    mapping["Defaults"] = {"batch_bytes": 65536}
    dest = config.parse(mapping).destinations[0]
    assert (dest.batch_bytes, dest.targets[0].batch_bytes, dest.targets[1].batch_bytes) == (65536, 65536, 2048)
    assert config.parse(mapping).public_view()["Destinations"]["Test1"]["Targets"]["t2"]["batch_bytes"] == 2048
    assert problems(minimal(batch_bytes=256 * 1024 ** 2 + 1)) == [
        "Destinations.Test1.batch_bytes: expected an integer 1024-268435456, got 268435457"]
    mapping = minimal(batch_bytes=1000, Targets=target("t1", batch_bytes=True))
    mapping["Defaults"] = {"batch_bytes": "lots"}
    assert problems(mapping) == [
        "Defaults.batch_bytes: expected an integer 1024-268435456, got 'lots'",
        "Destinations.Test1.batch_bytes: expected an integer 1024-268435456, got 1000",
        "Destinations.Test1.Targets.t1.batch_bytes: expected an integer 1024-268435456, got True",
    ]


def test_ledger_retention_is_inherited_overridden_and_checked():
    mapping = minimal(ledger_retention=3600, Targets={**target("t1"), **target("t2", ledger_retention=60)})
    mapping["Defaults"] = {"ledger_retention": 86400}
    dest = config.parse(mapping).destinations[0]
    assert (dest.ledger_retention, [t.ledger_retention for t in dest.targets]) == (3600, [3600, 60])
    del mapping["Destinations"]["Test1"]["ledger_retention"]
    dest = config.parse(mapping).destinations[0]
    assert (dest.ledger_retention, [t.ledger_retention for t in dest.targets]) == (86400, [86400, 60])
    view = config.parse(mapping).public_view()["Destinations"]["Test1"]
    assert view["ledger_retention"] == 86400 and view["Targets"]["t2"]["ledger_retention"] == 60
    mapping["Defaults"] = {"ledger_retention": 59}
    mapping["Destinations"]["Test1"]["Targets"]["t2"]["ledger_retention"] = "a week"
    with pytest.raises(config.ConfigError) as caught:
        config.parse(mapping)
    assert caught.value.problems == (
        "Defaults.ledger_retention: expected a number of seconds >= 60 and <= 31536000 (a year), got 59",
        "Destinations.Test1.Targets.t2.ledger_retention: expected a number of seconds >= 60 and"
        " <= 31536000 (a year), got 'a week'")


def test_trigger_mode_defaults_its_queue():
    dest = config.parse(minimal(queue=None, mode="Trigger", poll_interval=0.5)).destinations[0]
    assert dest.mode == "trigger"
    assert dest.queue == "/queue/golconde.test1"
    assert dest.dead_letter_queue == "/queue/golconde.test1.dlq"
    assert dest.poll_interval == 0.5


def test_handler_alias_settings_and_amq_queue():
    dest = config.parse(minimal(handler="myapp.handlers.Audit", queue="/amq/queue/golconde.x",
                                settings={"columns": ["a", "b"], "extra": {"x": 1}},
                                dead_letter_queue="/queue/golconde.x.failed")).destinations[0]
    assert dest.function_name == "myapp.handlers.Audit"
    assert dest.queue == "/amq/queue/golconde.x"
    assert dest.dead_letter_queue == "/queue/golconde.x.failed"
    assert dest.settings["columns"] == ("a", "b") and dest.settings["extra"]["x"] == 1
    same = config.parse(minimal(function_name="AutoSQL", handler="AutoSQL")).destinations[0]
    assert same.function_name == "AutoSQL"


def test_objects_are_frozen_and_hashable():
    cfg = config.load(EXAMPLE)
    assert hash(cfg) == hash(config.load(EXAMPLE))
    assert cfg == config.load(EXAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.destinations[0].queue = "/queue/other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.destinations[0].settings["x"] = 1  # type: ignore[index]
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert copy.deepcopy(cfg) == cfg


def test_ipv6_broker_address():
    dest = config.parse(minimal(stomp="[::1]:61613")).destinations[0]
    assert (dest.stomp.host, dest.stomp.port, dest.stomp.address) == ("::1", 61613, "[::1]:61613")


# --- errors ----------------------------------------------------------------------------------------

def test_missing_key_in_target():
    assert problems(minimal(Targets=target("t1", queue=None))) == [
        "Destinations.Test1.Targets.t1.queue: missing"]


def test_key_without_value_is_missing():
    assert problems(minimal(pgsql="")) == [
        "Destinations.Test1.pgsql: expected a libpq DSN string ('host=... dbname=...' or a "
        "postgresql:// URI)"]
    assert problems({"Destinations": {"Test1": {**minimal()["Destinations"]["Test1"], "target": None}}}) == [
        "Destinations.Test1.target: missing (the key has no value)"]


def test_client_mode_requires_a_queue():
    assert problems(minimal(queue=None)) == [
        "Destinations.Test1.queue: missing (required in client mode)"]


def test_wrong_types():
    mapping = minimal(prefetch="many", batch_size=0, poll_interval="soon", settings=[1])
    mapping["HTTPServer"] = {"port": "abc", "enabled": "maybe"}
    assert problems(mapping) == [
        "HTTPServer.enabled: expected true or false, got 'maybe'",
        "HTTPServer.port: expected an integer 1-65535, got 'abc'",
        "Destinations.Test1.settings: expected a mapping, got a list",
        "Destinations.Test1.prefetch: expected an integer 1-65535, got 'many'",
        "Destinations.Test1.batch_size: expected an integer 1-1000000, got 0",
        "Destinations.Test1.poll_interval: expected a number of seconds > 0 and <= 3600, got 'soon'",
    ]


def test_reply_queues_lists_queue_patterns_of_a_client_mode_destination():
    assert config.parse(minimal()).destinations[0].reply_queues is None
    parsed = config.parse(minimal(reply_queues=["/queue/app.replies.*", " /reply-queue/amq.gen-* "]))
    assert parsed.destinations[0].reply_queues == ("/queue/app.replies.*", "/reply-queue/amq.gen-*")
    assert parsed.public_view()["Destinations"]["Test1"]["reply_queues"] == ["/queue/app.replies.*",
                                                                           "/reply-queue/amq.gen-*"]
    expected = ("expected a list of queue names or patterns such as /queue/app.replies.* (under"
                " /queue/, /amq/queue/ or /reply-queue/, no comma), got ")
    assert problems(minimal(reply_queues="/queue/app.replies.*")) == [
        "Destinations.Test1.reply_queues: " + expected + "'/queue/app.replies.*'"]
    assert problems(minimal(reply_queues=["/topic/x", "/queue/a,b", 5, "/queue/ok"])) == [
        "Destinations.Test1.reply_queues: " + expected + "'/topic/x', '/queue/a,b', 5"]
    # patterns that would let every queue through, or never match
    assert problems(minimal(reply_queues=["/reply-queue/*"])) == [
        "Destinations.Test1.reply_queues: '/reply-queue/*' starts with a wildcard, so it may match"
        " any application's queues (RabbitMQ reads /reply-queue/x as /queue/x): start it with a"
        " literal part (/queue/app.replies.*)"]
    assert problems(minimal(reply_queues=["/queue/ok", "/amq/queue/?x"]))[0].startswith(
        "Destinations.Test1.reply_queues: '/amq/queue/?x' starts with a wildcard, so it may match")
    assert problems(minimal(reply_queues=["/temp-queue/mine"])) == [
        "Destinations.Test1.reply_queues: '/temp-queue/mine': the broker rewrites a /temp-queue/"
        " reply-to before golconded reads it (RabbitMQ to /reply-queue/amq.gen-..., ActiveMQ to"
        " /remote-temp-queue/...): for RabbitMQ's temporary queues list /reply-queue/amq.gen-*"]
    assert problems(minimal(mode="trigger", queue=None, reply_queues=["/queue/r"])) == [
        "Destinations.Test1.reply_queues: applies to client mode only (a trigger-mode destination"
        " sends no replies)"]


def test_reply_allowed_matches_patterns_under_any_name_of_a_queue():
    assert config.reply_allowed("/queue/anything", None)
    patterns = ("/queue/app.replies.*", "/reply-queue/amq.gen-*")
    assert config.reply_allowed("/queue/app.replies.1", patterns)
    assert config.reply_allowed("/amq/queue/app.replies.1", patterns)       # the same queue
    assert config.reply_allowed("/reply-queue/app.replies.x", patterns)
    assert config.reply_allowed("/reply-queue/amq.gen-Xy0Z", patterns)      # RabbitMQ's temporary
    assert not config.reply_allowed("/queue/App.replies.1", patterns)       # case-sensitive
    assert not config.reply_allowed("/queue/app.orders", patterns)
    assert not config.reply_allowed("/reply-queue/app.orders", patterns)
    assert config.reply_allowed("/queue/x", ("/amq/queue/x",))
    assert not config.reply_allowed("/queue/x", ())


def test_batch_linger_is_seconds_from_0_to_1_with_a_default_of_20_ms():
    assert config.parse(minimal()).destinations[0].batch_linger == 0.02
    for value in (0, 0.5, 1):
        parsed = config.parse(minimal(mode="trigger", queue=None, batch_linger=value))
        assert parsed.destinations[0].batch_linger == value
        assert parsed.public_view()["Destinations"]["Test1"]["batch_linger"] == value
    for value, shown in ((-0.1, "-0.1"), (1.5, "1.5"), ("soon", "'soon'"), (True, "True")):
        assert problems(minimal(batch_linger=value)) == [
            "Destinations.Test1.batch_linger: expected a number of seconds >= 0 and <= 1, got "
            + shown]


def test_trigger_mode_settings_are_refused_in_client_mode():
    assert problems(minimal(poll_interval=0.5, batch_linger=0.1)) == [
        "Destinations.Test1.poll_interval: applies to trigger mode only (this destination is in client mode)",
        "Destinations.Test1.batch_linger: applies to trigger mode only (this destination is in client mode)"]
    assert problems(minimal(mode="client", batch_linger=0)) == [
        "Destinations.Test1.batch_linger: applies to trigger mode only (this destination is in client mode)"]
    dest = config.parse(minimal(mode="TRIGGER", queue=None, poll_interval=0.5, batch_linger=0.1)).destinations[0]
    assert (dest.mode, dest.poll_interval, dest.batch_linger) == ("trigger", 0.5, 0.1)


def test_numbers_and_nesting_beyond_what_python_converts_are_errors_of_the_file():
    """These raised OverflowError, ValueError and RecursionError (a reload then ended the daemon)."""
    huge = "9" * 400
    good = yaml.safe_dump(minimal())
    for text, expected in [
        (good + "Defaults: {ledger_retention: %s}\n" % huge,
         "Defaults.ledger_retention: expected a number of seconds >= 60"),
        (yaml.safe_dump(minimal(mode="trigger", queue=None, poll_interval=int(huge))),
         "Destinations.Test1.poll_interval: expected a number of seconds > 0"),
        (good + "Defaults: {prefetch: '%s'}\n" % ("9" * 5000), "Defaults.prefetch: expected an integer 1-65535"),
        (good + "Defaults: {prefetch: %s}\n" % ("9" * 5000), "<string>: YAML value cannot be read: Exceeds the limit"),
        (good + "Locations: %s%s\n" % ("[" * 5000, "]" * 5000), "<string>: the YAML is nested too deeply"),
        (good + "Locations: %s1%s\n" % ("{a: " * 3000, "}" * 3000), "<string>: the YAML is nested too deeply"),
    ]:
        with pytest.raises(ConfigError) as info:
            config.loads(text)
        assert str(info.value).startswith(expected), str(info.value)[:300]


def test_bad_host_port():
    assert problems(minimal(stomp="localhost")) == [
        "Destinations.Test1.stomp: expected host:port, got 'localhost'"]
    assert problems(minimal(stomp="localhost:99999")) == [
        "Destinations.Test1.stomp: expected host:port with a port 1-65535, got 'localhost:99999'"]


def test_unknown_key_suggests_the_right_one():
    (line,) = problems(minimal(qeue="/queue/x"))
    assert line.startswith("Destinations.Test1.qeue: unknown key (did you mean 'queue'?); "
                           "accepted keys: stomp, queue, pgsql")
    (line,) = problems({**minimal(), "destinations": {}})
    assert line.startswith("destinations: unknown key (did you mean 'Destinations'?)")
    (line,) = problems({**minimal(), "HTTPServer": {"prot": 80}})
    assert line.startswith("HTTPServer.prot: unknown key (did you mean 'port'?)")


def test_free_form_sections_accept_any_key():
    mapping = {**minimal(settings={"anything": {"goes": True}}),
               "Locations": {"whatever": 1}, "Logging": {"datefmt": "%H:%M"}}
    cfg = config.parse(mapping)
    assert cfg.logging == {"datefmt": "%H:%M"} and cfg.locations == {"whatever": 1}


def test_logging_is_checked_before_the_daemon_starts_logging(tmp_path):
    """Each of these passed the check and then ended golconded at start with a traceback (or, for
    an unknown field, broke every log line); the 2009 release's format is still accepted."""
    for section, expected in [
        ({"filename": str(tmp_path)}, "Logging.filename: %r is a directory" % str(tmp_path)),
        ({"filename": str(tmp_path / "no" / "x.log")}, "Logging.filename: the directory of"),
        ({"filename": ["a", "b"]}, "Logging.filename: expected a file path, got a list"),
        ({"format": "{message}"}, "Logging.format: expected a logging format"),
        ({"format": 42}, "Logging.format: expected a logging format"),
        ({"format": "%(nosuch)s"}, "Logging.format: expected a logging format"),
        ({"datefmt": 5}, "Logging.datefmt: expected a time.strftime format"),
        ({"filemode": "x"}, "Logging.filemode: expected 'a' (append) or 'w'"),
        ({"levle": "debug"}, "Logging.levle: unknown key (did you mean 'level'?)"),
    ]:
        (line,) = problems({**minimal(), "Logging": section})
        assert line.startswith(expected), line
    old = {"filename": str(tmp_path / "log.txt"), "format": "%(levelname) -10s %(asctime)s %(message)s",
           "level": "debug", "datefmt": "%H:%M", "filemode": "w"}
    assert config.parse({**minimal(), "Logging": old}).logging["level"] == "DEBUG"


def test_duplicate_queue_names_both_paths():
    mapping = minimal(Targets=target("t1", queue="/queue/golconde.test1"))
    assert problems(mapping) == [
        "Destinations.Test1.Targets.t1.queue: '/queue/golconde.test1' is also the queue of "
        "Destinations.Test1; every destination and target needs its own queue"]


def test_amq_queue_and_queue_of_one_name_are_one_queue():
    mapping = minimal(Targets=target("t1", queue="/amq/queue/golconde.test1"))
    assert problems(mapping) == [
        "Destinations.Test1.Targets.t1.queue: '/amq/queue/golconde.test1' is also the queue of "
        "Destinations.Test1; every destination and target needs its own queue"]
    mapping = minimal(dead_letter_queue="/amq/queue/golconde.t1", Targets=target("t1", queue="/queue/golconde.t1"))
    assert problems(mapping) == [
        "Destinations.Test1.dead_letter_queue: '/amq/queue/golconde.t1' is the queue of "
        "Destinations.Test1.Targets.t1; a dead-letter queue must not be consumed"]


def test_dead_letter_queue_must_not_be_consumed():
    mapping = minimal(Targets=target("t1", queue="/queue/golconde.test1.dlq"))
    assert problems(mapping) == [
        "Destinations.Test1.dead_letter_queue: '/queue/golconde.test1.dlq' is the queue of "
        "Destinations.Test1.Targets.t1; a dead-letter queue must not be consumed"]


def test_topics_and_bad_queue_names_are_refused():
    (line,) = problems(minimal(queue="/topic/golconde.test1"))
    assert line.startswith("Destinations.Test1.queue: expected a queue name starting with /queue/ "
                           "or /amq/queue/")
    assert line.endswith("got '/topic/golconde.test1'")


def test_bad_mode():
    assert problems(minimal(mode="push")) == [
        "Destinations.Test1.mode: expected one of client, trigger, got 'push'"]


def test_function_name_and_handler_conflict():
    assert problems(minimal(function_name="AutoSQL", handler="myapp.Other")) == [
        "Destinations.Test1.handler: 'myapp.Other' conflicts with function_name 'AutoSQL'; "
        "give only one of them"]
    assert problems(minimal(function_name="not a path")) == [
        "Destinations.Test1.function_name: expected AutoSQL or a dotted path such as "
        "package.module.Handler, got 'not a path'"]


def test_target_applying_to_the_destination_relation():
    mapping = minimal(Targets=target("t1", pgsql="dbname=gmr  host=localhost", target="FRIENDSHIPS"))
    assert problems(mapping) == [
        "Destinations.Test1.Targets.t1: pgsql and target name the same relation as "
        "Destinations.Test1: its packets would be applied twice"]


def test_bad_names_relation_and_dsn():
    mapping = minimal(target="a.b.c", pgsql="host=x nonsense",
                      Targets={"bad name": target("x")["x"]})
    assert problems(mapping) == [
        "Destinations.Test1.pgsql: expected a libpq DSN ('host=... dbname=...' or a postgresql:// "
        "URI), could not parse it: invalid dsn: missing \"=\" after \"nonsense\" in connection "
        "info string",
        "Destinations.Test1.target: expected [schema.]relation, got 'a.b.c'",
        "Destinations.Test1.Targets.bad name: invalid name 'bad name'; expected letters, digits, "
        "'_', '.' or '-'"]


def test_an_unparsable_dsn_with_a_password_is_not_quoted():
    """libpq's message quotes the DSN around what it could not parse: with a password in it
    ('password=Super SecretPW1'), the error (printed, and logged at a reload) would show part of
    the password."""
    mapping = minimal(pgsql="host=x password=Super SecretPW1")
    assert problems(mapping) == [
        "Destinations.Test1.pgsql: expected a libpq DSN ('host=... dbname=...' or a postgresql:// "
        "URI), could not parse it"]


@pytest.mark.parametrize("dsn, problem", [
    ('host=127.0.0.1 port= ="', "port must be a whole number (or one per host, comma-separated),"
                                " got '=\"'"),
    ("postgresql://u:secret@h/db?connect_timeout=ten", "connect_timeout must be a whole number, got 'ten'"),
    ("host=x sslmode=bogus", "sslmode must be one of disable, allow, prefer, require, verify-ca,"
                             " verify-full, got 'bogus'"),
    ("host=x target_session_attrs=primary-only", "target_session_attrs must be one of any,"
     " read-write, read-only, primary, standby, prefer-standby, got 'primary-only'"),
])
def test_dsn_values_libpq_checks_only_when_connecting_are_checked_first(dsn, problem):
    assert problems(minimal(pgsql=dsn)) == ["Destinations.Test1.pgsql: DSN parameter " + problem]


@pytest.mark.parametrize("dsn", ["host=a,b port=5432,5433 dbname=x", "host=a,b port=,5433",
                                 "host=a,b port='5432, 5433'", "host=x connect_timeout=+5",
                                 "postgresql://u@h:5432/db?sslmode=require&connect_timeout=5",
                                 "host=x keepalives=1 keepalives_idle=30 target_session_attrs=read-write"])
def test_good_dsn_values_pass(dsn):
    assert config.parse(minimal(pgsql=dsn)).destinations[0].pgsql == dsn


def test_thread_names_must_be_unique():
    mapping = minimal(Targets=target("t1"))
    mapping["Destinations"]["Test1_t1"] = {
        "stomp": "localhost:61613", "queue": "/queue/other", "pgsql": "dbname=other", "target": "x"}
    assert problems(mapping) == [
        "Destinations.Test1_t1: its listener name 'Test1_t1' is also that of "
        "Destinations.Test1.Targets.t1"]


def test_logging_level():
    assert config.parse({**minimal(), "Logging": {"level": "Warning"}}).logging["level"] == "WARNING"
    assert problems({**minimal(), "Logging": {"level": "verbose"}}) == [
        "Logging.level: expected one of debug, info, warning, error, critical, got 'verbose'"]


def test_destinations_required_and_not_empty():
    assert problems({}) == ["Destinations: missing"]
    assert problems({"Destinations": {}}) == ["Destinations: expected at least one destination"]
    assert problems({"Destinations": ["Test1"]}) == ["Destinations: expected a mapping, got a list"]
    assert problems({"Destinations": {"Test1": "x"}}) == [
        "Destinations.Test1: expected a mapping, got 'x'"]


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- Destinations\n")
    with pytest.raises(ConfigError, match=r"^\(top level\): expected a mapping of sections"):
        config.load(path)
    with pytest.raises(ConfigError, match="got an empty document"):
        config.loads("")


def test_several_errors_reported_together():
    mapping = minimal(stomp="nowhere", mode="push", Targets={
        **target("t1", queue=None), **target("t2", prefetch=-1, colour="red")})
    mapping["HTTPServer"] = {"port": 0}
    mapping["Broker"] = {"heartbeat": "often"}
    lines = problems(mapping)
    assert lines == [
        "HTTPServer.port: expected an integer 1-65535, got 0",
        "Broker.heartbeat: expected an integer 0-3600000, got 'often'",
        "Destinations.Test1.stomp: expected host:port, got 'nowhere'",
        "Destinations.Test1.mode: expected one of client, trigger, got 'push'",
        "Destinations.Test1.Targets.t1.queue: missing",
        "Destinations.Test1.Targets.t2.prefetch: expected an integer 1-65535, got -1",
        lines[-1],
    ]
    assert lines[-1].startswith("Destinations.Test1.Targets.t2.colour: unknown key")


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "golconde.yaml"
    path.write_text("Destinations:\n  Test1:\n    stomp: localhost:61613\n   queue: [oops\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith("%s:4:" % path)
    assert "YAML syntax error" in message


def test_duplicate_yaml_keys_are_reported(tmp_path):
    path = tmp_path / "golconde.yaml"
    path.write_text(yaml.safe_dump(minimal())
                    + "  Test1:\n    stomp: x:1\n")
    with pytest.raises(ConfigError, match=r"golconde.yaml:\d+:3: duplicate key 'Test1' \(first given "
                                          r"on line 2\)"):
        config.load(path)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError, match="nowhere.yaml: cannot read the configuration file: No such"):
        config.load(path)


# --- secrets ---------------------------------------------------------------------------------------

SECRETS = ("s3cr3t-dsn", "s3cr3t-uri", "s3cr3t-passcode", "s3cr3t-broker", "s3cr3t-settings")


def secret_config():
    mapping = minimal(pgsql="host=localhost dbname=gmr user=gmr password=s3cr3t-dsn",
                      passcode="s3cr3t-passcode", login="gmr",
                      settings={"api_token": "s3cr3t-settings", "url": "x"},
                      Targets=target("t1", pgsql="postgresql://gmr:s3cr3t-uri@db.example/t1"))
    mapping["Broker"] = {"login": "guest", "passcode": "s3cr3t-broker"}
    mapping["Destinations"]["Test2"] = {
        "stomp": "localhost:61613", "queue": "/queue/golconde.test2", "pgsql": "dbname=t2",
        "target": "t2"}
    return config.parse(mapping)


def test_secrets_are_absent_from_public_view_and_repr():
    cfg = secret_config()
    test1, test2 = cfg.destinations
    assert test1.stomp.passcode == "s3cr3t-passcode" and test2.stomp.passcode == "s3cr3t-broker"
    view = json.dumps(cfg.public_view())
    texts = [view, repr(cfg), str(cfg), repr(test1), repr(test1.targets[0]), repr(test1.stomp)]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
    public = cfg.public_view()["Destinations"]["Test1"]
    assert "passcode" not in public and public["login"] == "gmr"
    assert "password=***" in public["pgsql"]
    assert "password=***" in public["Targets"]["t1"]["pgsql"]
    assert public["settings"] == {"api_token": "***", "url": "x"}


def test_secrets_are_absent_from_error_messages():
    mapping = minimal(pgsql="postgresql://gmr:s3cr3t@[db/x", passcode=["s3cr3t"])
    text = "\n".join(problems(mapping))
    assert "s3cr3t" not in text
    assert "Destinations.Test1.passcode: expected a string" in text


@pytest.mark.parametrize("dsn, expected", [
    ("host=db dbname=x password=pw", {"host": "db", "dbname": "x", "password": "***"}),
    ("host=db dbname=x sslpassword=pw", {"host": "db", "dbname": "x", "sslpassword": "***"}),
    ("host=db dbname=x", {"host": "db", "dbname": "x"}),
    ("postgresql://u:pw@db:5433/x", {"user": "u", "password": "***", "dbname": "x", "host": "db",
                                     "port": "5433"}),
])
def test_redact_dsn(dsn, expected):
    assert psycopg2.extensions.parse_dsn(config.redact_dsn(dsn)) == expected


def test_redact_unparsable_dsn():
    assert config.redact_dsn("password=pw oops") == "<unparsable DSN>"


@pytest.mark.parametrize("listen, good", [
    ("127.0.0.1", True), ("0.0.0.0", True), ("::1", True), ("::", True), ("localhost", True),
    ("stats.example.org", True), ("db-2.local.", True),
    ("1.2.3.4.5", False), ("256.1.1.1", False), ("", False), ("a b", False), ("-bad.example", False),
    ("http://127.0.0.1", False), (8080, False),
])
def test_the_stats_server_listen_address_is_checked(listen, good):
    """A wrong HTTPServer.listen was accepted, and the daemon then started without its stats
    server (from a review)."""
    mapping = {**minimal(), "HTTPServer": {"listen": listen}}
    if good:
        assert config.parse(mapping).http.listen == listen
    else:
        assert problems(mapping) == ["HTTPServer.listen: expected an IP address (127.0.0.1, 0.0.0.0,"
                                     " ::1) or a host name, got %r" % (listen,)]
