"""Credentials kept out of the YAML: ``passcode_env``/``passcode_file`` (Broker, destinations,
targets) and ``pgsql_password_env``/``pgsql_password_file`` (merged into the DSN at load time).
Secrets must never show in repr, public_view or error messages."""
import json
import os
import uuid

import psycopg2.extensions
import pytest
import yaml

from golconde import config
from golconde.errors import ConfigError


def minimal(**destination):
    """A one-destination, one-target configuration mapping; keyword arguments replace destination
    keys, ``target=`` a dict of target keys."""
    target = {"stomp": "localhost:61613", "queue": "/queue/golconde.test1.t1",
              "pgsql": "host=localhost dbname=t1", "target": "friendships"}
    target.update(destination.pop("t1", {}))
    dest = {"stomp": "localhost:61613", "queue": "/queue/golconde.test1",
            "pgsql": "host=localhost dbname=gmr", "target": "friendships", "Targets": {"t1": target}}
    dest.update(destination)
    return {"Destinations": {"Test1": dest}}


def problems(mapping, source="<string>"):
    with pytest.raises(ConfigError) as info:
        config.parse(mapping, source)
    return list(info.value.problems)


@pytest.fixture
def secret():
    """A unique secret with characters a DSN must quote."""
    return "s3cr3t %s 'q' \\ =" % uuid.uuid4().hex


@pytest.fixture
def env(monkeypatch):
    """Set environment variables with unique names; returns a setter -> variable name."""
    def setter(value):
        name = "GOLCONDE_TEST_SECRET_%s" % uuid.uuid4().hex[:8].upper()
        monkeypatch.setenv(name, value)
        return name
    return setter


def every_text(cfg):
    """Every rendering of a configuration that could leak a secret."""
    dest = cfg.destinations[0]
    return [repr(cfg), str(cfg), json.dumps(cfg.public_view()), repr(dest), repr(dest.stomp),
            repr(dest.targets[0]), repr(dest.targets[0].stomp)]


def assert_hidden(cfg, *secrets):
    for text in every_text(cfg):
        for value in secrets:
            assert value not in text


# --- passcode ------------------------------------------------------------------------------------

def test_passcode_from_environment_at_every_level(env, secret):
    broker_var, dest_var, target_var = env(secret + "-broker"), env(secret + "-dest"), env(secret + "-t1")
    mapping = minimal(login="d", passcode_env=dest_var, t1={"login": "t", "passcode_env": target_var})
    mapping["Broker"] = {"login": "b", "passcode_env": broker_var}
    mapping["Destinations"]["Test2"] = {"stomp": "localhost:61613", "queue": "/queue/golconde.t2",
                                        "pgsql": "dbname=t2", "target": "t2"}
    cfg = config.parse(mapping)
    test1, test2 = cfg.destinations
    assert (test1.stomp.login, test1.stomp.passcode) == ("d", secret + "-dest")
    assert (test1.targets[0].stomp.login, test1.targets[0].stomp.passcode) == ("t", secret + "-t1")
    assert (test2.stomp.login, test2.stomp.passcode) == ("b", secret + "-broker")  # inherited
    assert_hidden(cfg, secret)


def test_passcode_env_is_inherited_as_a_pair_with_login(env, secret):
    mapping = minimal(login="d", passcode_env=env(secret))
    cfg = config.parse(mapping)
    target = cfg.destinations[0].targets[0]
    assert (target.stomp.login, target.stomp.passcode) == ("d", secret)


def test_passcode_from_file_trailing_newline_dropped(tmp_path, secret):
    path = tmp_path / "passcode"
    path.write_text(secret + "\n", encoding="utf-8")
    cfg = config.parse(minimal(passcode_file=str(path)))
    assert cfg.destinations[0].stomp.passcode == secret
    assert_hidden(cfg, secret)


def test_relative_file_starts_at_the_configuration_directory(tmp_path, secret):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "stomp").write_text(secret + "\r\n", encoding="utf-8")
    (tmp_path / "secrets" / "pg").write_text(secret, encoding="utf-8")
    path = tmp_path / "golconde.yaml"
    path.write_text(yaml.safe_dump(minimal(passcode_file="secrets/stomp",
                                           pgsql_password_file="secrets/pg")), encoding="utf-8")
    cwd = os.getcwd()
    os.chdir("/")
    try:
        cfg = config.load(path)
    finally:
        os.chdir(cwd)
    dest = cfg.destinations[0]
    assert dest.stomp.passcode == secret
    assert psycopg2.extensions.parse_dsn(dest.pgsql)["password"] == secret


def test_missing_variable_names_the_key_path_and_variable():
    name = "GOLCONDE_TEST_UNSET_%s" % uuid.uuid4().hex[:8].upper()
    mapping = minimal(t1={"passcode_env": name})
    mapping["Broker"] = {"passcode_env": name}
    found = problems(mapping)
    assert "Broker.passcode_env: environment variable %s is not set" % name in found
    assert "Destinations.Test1.Targets.t1.passcode_env: environment variable %s is not set" % name in found


def test_empty_variable_is_a_problem(env):
    name = env("")
    assert problems(minimal(passcode_env=name)) == [
        "Destinations.Test1.passcode_env: environment variable %s is empty" % name]


def test_unreadable_file_names_the_key_path(tmp_path):
    missing = tmp_path / "nope"
    found = problems(minimal(passcode_file=str(missing), t1={"pgsql_password_file": str(tmp_path)}))
    assert ("Destinations.Test1.passcode_file: cannot read %s: No such file or directory" % missing
            in found)
    assert ("Destinations.Test1.Targets.t1.pgsql_password_file: cannot read %s: Is a directory"
            % tmp_path in found)


def test_empty_and_non_utf8_files_are_problems(tmp_path):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    found = problems(minimal(passcode_file=str(tmp_path / "empty"),
                             pgsql_password_file=str(tmp_path / "latin1")))
    assert found == ["Destinations.Test1.passcode_file: %s is empty" % (tmp_path / "empty"),
                     "Destinations.Test1.pgsql_password_file: %s is not UTF-8 text"
                     % (tmp_path / "latin1")]


def test_only_one_source_per_secret(env, tmp_path, secret):
    var = env(secret)
    (tmp_path / "f").write_text(secret)
    found = problems(minimal(passcode=secret, passcode_env=var, t1={
        "passcode_env": var, "passcode_file": str(tmp_path / "f"),
        "pgsql": "host=x dbname=t1 password=%s" % "inline", "pgsql_password_env": var}))
    assert found == [
        "Destinations.Test1.passcode_env: give only one of passcode, passcode_env",
        "Destinations.Test1.Targets.t1.passcode_file: give only one of passcode_env, passcode_file",
        "Destinations.Test1.Targets.t1.pgsql_password_env: give only one of a password in pgsql, "
        "pgsql_password_env"]
    assert all(secret not in line for line in found)


def test_problems_never_show_the_secret(env, secret):
    """Another problem on the same listener (a bad queue) must not echo the secret either."""
    mapping = minimal(queue="not-a-queue", passcode_env=env(secret), pgsql_password_env=env(secret))
    found = problems(mapping)
    assert found and all(secret not in line for line in found)


# --- database password --------------------------------------------------------------------------

def test_pgsql_password_merged_into_key_value_dsn(env, secret):
    cfg = config.parse(minimal(pgsql_password_env=env(secret),
                               t1={"pgsql": "host=db port=5433 dbname=t1 user=u",
                                   "pgsql_password_env": env(secret + "-t1")}))
    dest, target = cfg.destinations[0], cfg.destinations[0].targets[0]
    assert psycopg2.extensions.parse_dsn(dest.pgsql) == {
        "host": "localhost", "dbname": "gmr", "password": secret}
    assert psycopg2.extensions.parse_dsn(target.pgsql) == {
        "host": "db", "port": "5433", "dbname": "t1", "user": "u", "password": secret + "-t1"}
    assert_hidden(cfg, secret)
    assert "password=***" in cfg.public_view()["Destinations"]["Test1"]["pgsql"]


def test_pgsql_password_merged_into_uri_dsn(tmp_path, secret):
    (tmp_path / "pw").write_text(secret)
    cfg = config.parse(minimal(pgsql="postgresql://gmr@db.example:5432/app",
                               pgsql_password_file=str(tmp_path / "pw")))
    params = psycopg2.extensions.parse_dsn(cfg.destinations[0].pgsql)
    assert params == {"user": "gmr", "host": "db.example", "port": "5432", "dbname": "app",
                      "password": secret}
    assert_hidden(cfg, secret)


def test_pgsql_password_keys_are_not_accepted_on_broker():
    mapping = minimal()
    mapping["Broker"] = {"pgsql_password_env": "X"}
    found = problems(mapping)
    assert len(found) == 1 and found[0].startswith("Broker.pgsql_password_env: unknown key")


def test_inline_dsn_password_still_works():
    cfg = config.parse(minimal(pgsql="host=db dbname=x password=inline"))
    assert psycopg2.extensions.parse_dsn(cfg.destinations[0].pgsql)["password"] == "inline"
