"""golconde.mapping: validation of the mapping keys and the transformation of packets (pure logic)."""
from decimal import Decimal

import pytest

from golconde.errors import PacketError
from golconde.mapping import OPERATORS, Condition, TargetMapping, Verdict, parse_mapping
from golconde.packet import Action, Packet, parse

PATH = "Destinations.D.Targets.t"


def build(**raw):
    mapping, problems = parse_mapping(raw, PATH)
    assert problems == []
    assert mapping is not None
    return mapping


def problems_of(**raw):
    mapping, problems = parse_mapping(raw, PATH)
    assert mapping is None
    return problems


def pk(text):
    return parse(text)


# --- validation ----------------------------------------------------------------------------------

def test_no_mapping_keys_means_no_mapping():
    assert parse_mapping({"queue": "/queue/x", "columns": None}, PATH) == (None, [])
    assert parse_mapping({"columns": {}, "exclude": [], "filter": {}}, PATH) == (None, [])


def test_a_valid_mapping_keeps_everything():
    mapping = build(columns={"name": "full_name"}, exclude=["password"],
                    constants={"source": "canonical", "weight": 1.5, "tags": ["a"]},
                    defaults=["created"], filter={"status_id": {"in": [1, 2]}, "deleted": {"is_null": True}})
    assert mapping.columns == (("name", "full_name"),)
    assert mapping.exclude == ("password",)
    assert mapping.constant_values == {"source": "canonical", "weight": Decimal("1.5"), "tags": ["a"]}
    assert mapping.defaults == ("created",)
    assert mapping.conditions == (Condition("status_id", "in", (1, 2)), Condition("deleted", "is_null", True))
    assert mapping.path == PATH
    assert mapping.as_config()["filter"] == {"status_id": {"in": [1, 2]}, "deleted": {"is_null": True}}
    hash(mapping)


def test_yaml_dates_become_iso_text():
    import datetime
    mapping = build(constants={"since": datetime.date(2020, 1, 2)},
                    filter={"created": {"gte": datetime.date(2020, 1, 1)}})
    assert mapping.constant_values == {"since": "2020-01-02"}
    assert mapping.conditions[0].value == "2020-01-01"


@pytest.mark.parametrize("raw, expected", [
    ({"filter": {"status_id": {"between": [1, 2]}}},
     PATH + ".filter.status_id: unknown operator 'between' (expected in, eq, ne, gt, gte, lt, lte, is_null)"),
    ({"columns": {"a": "x", "b": "x"}}, PATH + ".columns.b: renames to 'x', as columns.a already does"),
    ({"columns": {"a": "x", "b": "X"}}, PATH + ".columns.b: renames to 'X', as columns.a already does"),
    ({"filter": {"doc": {"eq": {"k": 1}}}}, PATH + ".filter.doc.eq: expected a string or a number or a boolean, got a mapping"),
    ({"filter": {"tags": {"gt": [1]}}}, PATH + ".filter.tags.gt: expected a string or a number, got a list"),
    ({"filter": {"z": {"gt": True}}}, PATH + ".filter.z.gt: expected a string or a number, got True"),
    ({"filter": {"z": {"lte": False}}}, PATH + ".filter.z.lte: expected a string or a number, got False"),
    ({"filter": {"a": {"in": [[1], 2]}}}, PATH + ".filter.a.in: expected strings, numbers or booleans, got a list"),
    ({"filter": {"a": {"in": []}}}, PATH + ".filter.a.in: expected a non-empty list of values, got a list"),
    ({"filter": {"a": {"in": 3}}}, PATH + ".filter.a.in: expected a non-empty list of values, got 3"),
    ({"filter": {"a": {"is_null": "yes"}}}, PATH + ".filter.a.is_null: expected true or false, got 'yes'"),
    ({"filter": {"a": {"eq": None}}}, PATH + ".filter.a.eq: null never compares equal; use is_null: true or false"),
    ({"filter": {"a": 1}}, PATH + ".filter.a: expected a mapping of operator: value such as {eq: 1}"
                                  " (operators: in, eq, ne, gt, gte, lt, lte, is_null), got 1"),
    ({"filter": [1]}, PATH + ".filter: expected a mapping of column: {operator: value}, got a list"),
    ({"columns": {"a": ""}}, PATH + ".columns.a: expected a target column name, got ''"),
    ({"columns": ["a"]}, PATH + ".columns: expected a mapping of canonical column: target column, got a list"),
    ({"exclude": {"a": 1}}, PATH + ".exclude: expected a list of column names, got a mapping"),
    ({"exclude": ["a", "a"]}, PATH + ".exclude[1]: 'a' is listed twice"),
    ({"exclude": ["a", 3]}, PATH + ".exclude[1]: expected a column name, got 3"),
    ({"columns": {"a": "x"}, "exclude": ["a"]},
     PATH + ".exclude: 'a' is also renamed by columns.a; give only one of them"),
    ({"columns": {"a": "x"}, "defaults": ["x"]},
     PATH + ".defaults: 'x' is the target of columns.a, whose values would never be written;"
            " exclude the canonical column instead"),
    ({"columns": {"a": "x"}, "constants": {"x": 1}},
     PATH + ".constants.x: is also the target of columns.a; give only one of them"),
    ({"defaults": ["x"], "constants": {"x": 1}},
     PATH + ".constants.x: is also listed in defaults; give only one of them"),
    ({"constants": {"x": float("nan")}}, PATH + ".constants.x: nan cannot be written as a packet value"),
])
def test_invalid_mappings_name_the_key_path(raw, expected):
    assert expected in problems_of(**raw)


def test_every_problem_is_reported():
    problems = problems_of(columns={"a": "x", "b": "x"}, filter={"s": {"like": "x"}, "t": {"gt": None}})
    assert len(problems) == 3


def test_operators_are_case_insensitive_and_listed():
    mapping = build(filter={"s": {"EQ": 1}})
    assert mapping.conditions == (Condition("s", "eq", 1),)
    assert OPERATORS == ("in", "eq", "ne", "gt", "gte", "lt", "lte", "is_null")


# --- conditions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("operator, expected, value, holds", [
    ("eq", 1, 1, True), ("eq", 1, Decimal("1.0"), True), ("eq", 1, "1", True), ("eq", 1, 2, False),
    ("eq", 1, True, False), ("eq", True, True, True), ("eq", True, 1, False),
    # a boolean column's value as PostgreSQL reads the strings a packet may send for it
    ("eq", True, "t", True), ("eq", True, " Yes", True), ("eq", True, "on", True), ("eq", True, "1", True),
    ("eq", False, "off", True), ("eq", False, "F", True), ("eq", False, "0", True), ("eq", True, "f", False),
    ("eq", True, "o", False), ("eq", True, "maybe", False), ("ne", True, "t", False), ("in", (True,), "y", True),
    ("eq", "a", "a", True), ("eq", "a", "A", False), ("eq", "1", 1, False),
    ("eq", 1, None, False), ("ne", 1, None, False), ("ne", 1, 2, True), ("ne", 1, 1, False),
    ("ne", 1, {"a": 1}, True), ("eq", 1, [1], False),
    ("in", (1, 2), 2, True), ("in", (1, 2), 3, False), ("in", ("a", 1), "a", True), ("in", (1,), None, False),
    ("gt", 3, 4, True), ("gt", 3, 3, False), ("gte", 3, 3, True), ("lt", 3, Decimal("2.5"), True),
    ("lte", 3, "3", True), ("lt", 3, None, False),
    ("gt", "2020-01-01", "2020-06-01T00:00:00+00:00", True), ("lt", "b", "a", True),
    ("is_null", True, None, True), ("is_null", True, 0, False), ("is_null", False, None, False),
    ("is_null", False, "", True),
])
def test_condition_semantics(operator, expected, value, holds):
    assert Condition("c", operator, expected).holds(value) is holds


@pytest.mark.parametrize("expected, value", [(3, "abc"), (3, {"a": 1}), ("a", 1), (3, [1]), (3, True)])
def test_ordering_incomparable_values_is_a_packet_error(expected, value):
    with pytest.raises(PacketError, match="filter c gt"):
        Condition("c", "gt", expected).holds(value)


def test_verdict():
    mapping = build(filter={"s": {"in": [1, 2]}, "k": {"eq": "x"}})
    assert mapping.verdict({"s": 1, "k": "x", "other": 5}) is Verdict.MATCH
    assert mapping.verdict({"S": 1, "K": "x"}) is Verdict.MATCH        # case-insensitive keys
    assert mapping.verdict({"s": 3, "k": "x"}) is Verdict.NO_MATCH
    assert mapping.verdict({"s": 3}) is Verdict.NO_MATCH                # one present column fails
    assert mapping.verdict({"s": 1}) is Verdict.UNKNOWN
    assert mapping.verdict({}) is Verdict.UNKNOWN
    assert TargetMapping().verdict({"a": 1}) is Verdict.MATCH


# --- renames, exclude, defaults, constants ----------------------------------------------------------

def test_data_and_restriction_are_renamed_and_trimmed():
    mapping = build(columns={"id": "user_id", "name": "full_name"}, exclude=["password"],
                    defaults=["created"], constants={"source": "canonical"})
    out = mapping.transform(pk('{"action": "add", "data": {"id": 1, "NAME": "a", "password": "x",'
                               ' "created": "2020-01-01", "email": "e"}}'))
    assert out == [Packet(Action.ADD, {"user_id": 1, "full_name": "a", "email": "e", "source": "canonical"})]
    out = mapping.transform(pk('{"action": "update", "data": {"name": "b", "password": "y"},'
                               ' "restriction": {"id": 1}}'))
    assert out == [Packet(Action.UPDATE, {"full_name": "b"}, {"user_id": 1, "source": "canonical"})]   # constants scope it, never set
    out = mapping.transform(pk('{"action": "delete", "restriction": {"ID": 1}}'))
    assert out == [Packet(Action.DELETE, {}, {"user_id": 1, "source": "canonical"})]


def test_constants_win_over_packet_values_on_add_and_set():
    mapping = build(constants={"source": "canonical"})
    out = mapping.transform(pk('{"action": "set", "data": {"id": 1, "Source": "packet"}}'))
    assert out == [Packet(Action.SET, {"id": 1, "source": "canonical"})]
    # an update never writes a constant's column from the packet
    out = mapping.transform(pk('{"action": "update", "data": {"n": 1, "source": null}, "restriction": {"id": 1}}'))
    assert out == [Packet(Action.UPDATE, {"n": 1}, {"id": 1, "source": "canonical"})]


def test_update_whose_data_maps_to_nothing_is_dropped():
    mapping = build(exclude=["password"])
    assert mapping.transform(pk('{"action": "update", "data": {"password": "x"}, "restriction": {"id": 1}}')) == []


def test_restriction_on_excluded_or_default_column_is_refused():
    mapping = build(exclude=["email"], defaults=["created"], columns={"made": "created2"})
    with pytest.raises(PacketError, match=r"Targets\.t\.exclude: the restriction names 'email'"):
        mapping.transform(pk('{"action": "delete", "restriction": {"email": "x"}}'))
    mapping = build(defaults=["created"], constants={"source": "c"})
    with pytest.raises(PacketError, match=r"Targets\.t\.defaults: the restriction names 'created'"):
        mapping.transform(pk('{"action": "update", "data": {"a": 1}, "restriction": {"created": "x"}}'))
    with pytest.raises(PacketError, match=r"Targets\.t\.constants: the restriction names 'Source'"):
        mapping.transform(pk('{"action": "delete", "restriction": {"id": 1, "Source": "x"}}'))


def test_a_rename_colliding_with_a_passed_through_column_is_refused():
    mapping = build(columns={"a": "b"})
    with pytest.raises(PacketError, match=r"columns: data keys 'a' and 'b' both map to target column 'b'"):
        mapping.transform(pk('{"action": "add", "data": {"a": 1, "b": 2}}'))


def test_swapping_two_names_is_fine():
    mapping = build(columns={"a": "b", "b": "a"})
    assert mapping.transform(pk('{"action": "add", "data": {"a": 1, "b": 2}}')) == [
        Packet(Action.ADD, {"b": 1, "a": 2})]


# --- the filter ----------------------------------------------------------------------------------

@pytest.fixture
def active():
    """Rows with status 1 or 2 only; the target calls the key user_id."""
    return build(columns={"id": "user_id"}, filter={"status_id": {"in": [1, 2]}},
                 constants={"origin": "c"})


def test_add_in_and_out_of_the_filter(active):
    assert active.transform(pk('{"action": "add", "data": {"id": 1, "status_id": 1}}'), key=("user_id",)) == [
        Packet(Action.ADD, {"user_id": 1, "status_id": 1, "origin": "c"})]
    assert active.transform(pk('{"action": "add", "data": {"id": 1, "status_id": 3}}'), key=("user_id",)) == []
    assert active.transform(pk('{"action": "add", "data": {"id": 1, "status_id": null}}'), key=("user_id",)) == []


def test_add_without_the_filter_column_is_applied(active):
    assert active.transform(pk('{"action": "add", "data": {"id": 1}}')) == [
        Packet(Action.ADD, {"user_id": 1, "origin": "c"})]


def test_set_leaving_the_filter_deletes_by_the_target_key(active):
    # scoped by the constants, as every delete: another source's row of that key stays
    assert active.transform(pk('{"action": "set", "data": {"id": 7, "status_id": 3}}'), key=("user_id",)) == [
        Packet(Action.DELETE, {}, {"user_id": 7, "origin": "c"})]
    assert active.transform(pk('{"action": "set", "data": {"id": 7, "status_id": 3}}'), key=()) == []
    assert active.transform(pk('{"action": "set", "data": {"id": 7, "status_id": 2}}'), key=("user_id",)) == [
        Packet(Action.SET, {"user_id": 7, "status_id": 2, "origin": "c"})]


def test_update_moving_out_deletes(active):
    out = active.transform(pk('{"action": "update", "data": {"status_id": 3},'
                              ' "restriction": {"id": 7}}'), key=("user_id",))
    assert out == [Packet(Action.DELETE, {}, {"user_id": 7, "origin": "c"})]


def test_update_matching_is_followed_by_an_upsert_of_the_row(active):
    # the trigger flow: the whole new row, the old key as restriction
    out = active.transform(pk('{"action": "update", "data": {"id": 7, "status_id": 1, "name": "n"},'
                              ' "restriction": {"id": 7}}'), key=("user_id",))
    assert out == [Packet(Action.UPDATE, {"user_id": 7, "status_id": 1, "name": "n"}, {"user_id": 7, "origin": "c"}),
                   Packet(Action.SET, {"user_id": 7, "status_id": 1, "name": "n", "origin": "c"})]
    # the key is taken from the restriction when data lacks it
    out = active.transform(pk('{"action": "update", "data": {"status_id": 2}, "restriction": {"id": 7}}'),
                           key=("user_id",))
    assert out == [Packet(Action.UPDATE, {"status_id": 2}, {"user_id": 7, "origin": "c"}),
                   Packet(Action.SET, {"user_id": 7, "status_id": 2, "origin": "c"})]


def test_update_changing_the_key_updates_then_upserts_the_new_key(active):
    out = active.transform(pk('{"action": "update", "data": {"id": 8, "status_id": 1},'
                              ' "restriction": {"id": 7}}'), key=("user_id",))
    assert out == [Packet(Action.UPDATE, {"user_id": 8, "status_id": 1}, {"user_id": 7, "origin": "c"}),
                   Packet(Action.SET, {"user_id": 8, "status_id": 1, "origin": "c"})]


def test_update_matching_with_only_excluded_data_upserts_the_key():
    mapping = build(exclude=["status_id"], filter={"status_id": {"eq": 1}})
    out = mapping.transform(pk('{"action": "update", "data": {"status_id": 1}, "restriction": {"id": 7}}'),
                            key=("id",))
    assert out == [Packet(Action.SET, {"id": 7})]


def test_update_matching_without_a_usable_key_stays_an_update(active):
    out = active.transform(pk('{"action": "update", "data": {"status_id": 1}, "restriction": {"email": "e"}}'),
                           key=("user_id",))
    assert out == [Packet(Action.UPDATE, {"status_id": 1}, {"email": "e", "origin": "c"})]
    out = active.transform(pk('{"action": "update", "data": {"status_id": 1}, "restriction": {"id": 7}}'), key=())
    assert out == [Packet(Action.UPDATE, {"status_id": 1}, {"user_id": 7, "origin": "c"})]


def test_update_without_filter_columns_is_a_plain_update(active):
    out = active.transform(pk('{"action": "update", "data": {"name": "x"}, "restriction": {"id": 7}}'),
                           key=("user_id",))
    assert out == [Packet(Action.UPDATE, {"name": "x"}, {"user_id": 7, "origin": "c"})]


def test_delete_ignores_the_filter(active):
    assert active.transform(pk('{"action": "delete", "restriction": {"id": 7}}'), key=("user_id",)) == [
        Packet(Action.DELETE, {}, {"user_id": 7, "origin": "c"})]


def test_without_a_filter_an_update_stays_an_update():
    mapping = build(columns={"id": "user_id"})
    out = mapping.transform(pk('{"action": "update", "data": {"id": 7, "s": 1}, "restriction": {"id": 7}}'),
                            key=("user_id",))
    assert out == [Packet(Action.UPDATE, {"user_id": 7, "s": 1}, {"user_id": 7})]


def test_filter_on_an_excluded_column_still_filters():
    mapping = build(exclude=["status_id"], filter={"status_id": {"eq": 1}})
    assert mapping.transform(pk('{"action": "add", "data": {"id": 1, "status_id": 1}}')) == [
        Packet(Action.ADD, {"id": 1})]
    assert mapping.transform(pk('{"action": "add", "data": {"id": 2, "status_id": 2}}')) == []


def test_moving_in_and_out_uses_a_key_with_constants_or_another_unique_key(active):
    """The target's key may hold a constant's column (a table several sources share) or be
    another unique key (a serial primary key the packets do not carry): rows leaving the filter
    are deleted, and rows entering it upserted, by the first key the row holds whole."""
    shared = (("origin", "user_id"),)
    leave = pk('{"action": "set", "data": {"id": 1, "status_id": 5}}')
    assert active.transform(leave, key=shared) == [Packet(Action.DELETE, {}, {"origin": "c", "user_id": 1})]
    enter = pk('{"action": "update", "data": {"id": 2, "status_id": 2}, "restriction": {"id": 2}}')
    assert active.transform(enter, key=shared) == [
        Packet(Action.UPDATE, {"user_id": 2, "status_id": 2}, {"user_id": 2, "origin": "c"}),
        Packet(Action.SET, {"user_id": 2, "status_id": 2, "origin": "c"})]
    serial = (("sid",), ("user_id",))          # primary key first, then the unique keys
    assert active.transform(leave, key=serial) == [Packet(Action.DELETE, {}, {"user_id": 1, "origin": "c"})]
    assert active.transform(enter, key=serial)[1] == Packet(
        Action.SET, {"user_id": 2, "status_id": 2, "origin": "c"})
    # a NULL identifies no row: the next key, or none
    nullable = pk('{"action": "set", "data": {"id": 1, "email": null, "status_id": 5}}')
    assert active.transform(nullable, key=(("email",), ("user_id",))) == [
        Packet(Action.DELETE, {}, {"user_id": 1, "origin": "c"})]
    assert active.transform(nullable, key=(("email",),)) == []


def test_timestamps_with_offsets_compare_as_points_in_time():
    """The capture trigger writes a timestamptz in the writer's time zone: the filter compares
    instants, not text, when both sides carry an offset; without one, as text."""
    since = build(filter={"at": {"gte": "2026-01-01T00:00:00+00:00"}})
    tokyo = pk('{"action": "add", "data": {"id": 1, "at": "2026-01-01T05:00:00+09:00"}}')  # 20:00 UTC
    york = pk('{"action": "add", "data": {"id": 2, "at": "2025-12-31T22:00:00-05:00"}}')   # 03:00 UTC
    assert since.verdict(tokyo.data) is Verdict.NO_MATCH
    assert since.verdict(york.data) is Verdict.MATCH
    assert build(filter={"at": {"eq": "2026-01-01 00:00:00+00"}}).verdict(
        {"at": "2026-01-01T09:00:00+09:00"}) is Verdict.MATCH
    assert build(filter={"at": {"in": ["2026-01-01T00:00:00Z"]}}).verdict(
        {"at": "2025-12-31 19:00:00-05"}) is Verdict.MATCH
    naive = build(filter={"day": {"lt": "2026-01-01"}})
    assert naive.verdict({"day": "2025-12-31"}) is Verdict.MATCH
    assert naive.verdict({"day": "infinity"}) is Verdict.NO_MATCH   # as text: "i" > "2"


def test_names_checked_against_the_catalogs():
    mapping = build(columns={"id": "user_id", "nmae": "full_name"}, exclude=["pasword"],
                    constants={"sourc": "x"}, defaults=["created"],
                    filter={"statusid": {"eq": 1}, "id": {"gt": 0}})
    assert mapping.target_problems(["user_id", "Full_Name", "created"], "crm.c") == [
        "Destinations.D.Targets.t.constants.sourc: 'sourc' is no column of crm.c"]
    assert mapping.canonical_problems(["id", "name", "password", "status_id"], "public.users") == [
        "Destinations.D.Targets.t.columns: 'nmae' is no column of the canonical public.users",
        "Destinations.D.Targets.t.exclude: 'pasword' is no column of the canonical public.users",
        "Destinations.D.Targets.t.filter: 'statusid' is no column of the canonical public.users"]
    assert build(columns={"id": "user_id"}).canonical_problems(["ID"], "t") == []
    # a rename onto the name another canonical column keeps: both would write that column
    assert build(columns={"id": "customer_id", "name": "email"}).canonical_problems(
        ["id", "name", "email"], "t") == [
        "Destinations.D.Targets.t.columns.name: renames it to 'email', the name canonical column 'email' keeps at"
        " the target: both would write it (rename or exclude 'email' too)"]
    assert build(columns={"name": "email", "email": "name"}).canonical_problems(
        ["name", "email"], "t") == []                                       # swapped: fine
    assert build(columns={"name": "Email"}, exclude=["email"]).canonical_problems(
        ["name", "email"], "t") == []                                       # excluded: fine
