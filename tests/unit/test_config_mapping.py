"""The mapping keys of a target in the YAML configuration (columns, exclude, constants, defaults,
filter) and the handler's part in them."""
import pickle
import textwrap

import pytest

from golconde import config
from golconde.errors import ConfigError
from golconde.handlers.autosql import AutoSQL
from golconde.handlers.base import Handler
from golconde.mapping import Condition, TargetMapping

BASE = """
Destinations:
  Users:
    stomp: localhost:61613
    queue: /queue/golconde.users
    pgsql: dbname=canonical
    target: public.users
    Targets:
      crm:
        stomp: localhost:61613
        queue: /queue/golconde.users.crm
        pgsql: dbname=crm
        target: crm.customer
%s
      plain:
        stomp: localhost:61613
        queue: /queue/golconde.users.plain
        pgsql: dbname=plain
        target: public.users
"""


def load(target_keys: str, destination_keys: str = ""):
    text = BASE % textwrap.indent(textwrap.dedent(target_keys).strip("\n"), " " * 8)
    if destination_keys:
        text = text.replace("    target: public.users\n    Targets:",
                            "    target: public.users\n%s\n    Targets:"
                            % textwrap.indent(textwrap.dedent(destination_keys).strip("\n"), " " * 4))
    return config.loads(text, "test.yaml")


def errors(target_keys: str, destination_keys: str = ""):
    with pytest.raises(ConfigError) as info:
        load(target_keys, destination_keys)
    return info.value.problems


def test_mapping_keys_build_a_target_mapping():
    cfg = load("""
        columns: {id: customer_id, name: full_name}
        exclude: [password_hash]
        constants: {source: canonical}
        defaults: [created]
        filter:
          status_id: {in: [1, 2]}
          deleted_at: {is_null: true}
        """)
    crm, plain = cfg.destinations[0].targets
    assert plain.mapping is None
    assert crm.mapping == TargetMapping(
        columns=(("id", "customer_id"), ("name", "full_name")), exclude=("password_hash",),
        constants=(("source", '"canonical"'),), defaults=("created",),
        conditions=(Condition("status_id", "in", (1, 2)), Condition("deleted_at", "is_null", True)))
    assert crm.mapping.path == "Destinations.Users.Targets.crm"
    assert crm.target == "crm.customer"
    hash(crm)
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_public_view_shows_the_mapping():
    cfg = load("""
        columns: {id: customer_id}
        filter: {status_id: {eq: 1}}
        """)
    view = cfg.public_view()["Destinations"]["Users"]["Targets"]
    assert view["crm"]["columns"] == {"id": "customer_id"}
    assert view["crm"]["filter"] == {"status_id": {"eq": 1}}
    assert "columns" not in view["plain"]


def test_unknown_filter_operator_names_the_key_path():
    assert errors("filter: {status_id: {between: [1, 2]}}") == (
        "Destinations.Users.Targets.crm.filter.status_id: unknown operator 'between' "
        "(expected in, eq, ne, gt, gte, lt, lte, is_null)",)


def test_several_mapping_problems_are_all_reported():
    problems = errors("""
        columns: {a: x, b: x}
        exclude: [a]
        filter: {doc: {eq: [1]}}
        """)
    assert problems == (
        "Destinations.Users.Targets.crm.columns.b: renames to 'x', as columns.a already does",
        "Destinations.Users.Targets.crm.exclude: 'a' is also renamed by columns.a; give only one of them",
        "Destinations.Users.Targets.crm.filter.doc.eq: expected a string or a number or a boolean, got a list",
    )


def test_mapping_keys_are_refused_on_a_destination():
    problems = errors("", destination_keys="columns: {a: b}\nfilter: {s: {eq: 1}}")
    assert "Destinations.Users.columns: a mapping key of targets only (columns, exclude, constants," \
           " defaults, filter); the canonical relation is not mapped" in problems
    assert any(p.startswith("Destinations.Users.filter: a mapping key of targets only") for p in problems)


def test_misspelt_mapping_key_is_suggested():
    problems = errors("colums: {a: b}")
    assert problems[0].startswith("Destinations.Users.Targets.crm.colums: unknown key (did you mean 'columns'?)")


def test_a_changed_mapping_changes_the_target_configuration():
    """SIGHUP restarts the listeners whose configuration changed: a mapping edit must count."""
    one = load("filter: {status_id: {eq: 1}}").destinations[0].targets[0]
    two = load("filter: {status_id: {eq: 2}}").destinations[0].targets[0]
    same = load("filter: {status_id: {eq: 1}}").destinations[0].targets[0]
    assert one != two and one == same


def test_autosql_takes_a_mapping_and_a_plain_handler_refuses_it():
    mapping = load("columns: {id: customer_id}").destinations[0].targets[0].mapping

    class Plain(Handler):
        def apply(self, cursor, packet):
            return packet

    assert AutoSQL("crm.customer", mapping=mapping).mapping is mapping
    with pytest.raises(ConfigError, match="handler Plain does not apply columns, exclude, constants,"
                                          " defaults or filter"):
        Plain("crm.customer", mapping=mapping, name="Users_crm")
    assert Plain("crm.customer").mapping is None
