"""Target mapping without code: rename, exclude, constants, SQL defaults and a row filter.

A target whose relation has another shape than the canonical one can be described in the YAML
instead of a custom handler (keys of a target, all optional)::

    Targets:
      t1:
        target: crm.customer                     # another relation name
        columns:   {name: full_name, id: user_id}   # canonical column -> target column
        exclude:   [password_hash]               # canonical columns not distributed
        constants: {source: canonical}           # target column -> value written on add/set
        defaults:  [created]                     # target columns left to the target's DEFAULT
        filter:    {status_id: {in: [1, 2]}, deleted: {is_null: true}}

:func:`parse_mapping` validates those keys (every problem named by its key path);
:meth:`TargetMapping.transform` turns one canonical :class:`~golconde.packet.Packet` into the
packets to apply to the target (zero, one or two; AutoSQL builds their SQL). This module is pure
logic: no database, no broker.

Transformation of a packet
--------------------------

* ``data`` and ``restriction`` keys are renamed (``columns``; a packet key matches a canonical name
  exactly, else case-insensitively). ``exclude`` (canonical names) and ``defaults`` (target names)
  columns are removed from ``data``. A ``restriction`` naming one of them, or a constant's column,
  cannot be applied (dropping it would widen the statement): :class:`~golconde.errors.PacketError`
  naming the key path.
* ``constants`` are added to the data of every ``add`` and ``set`` written; a packet value for a
  constant's column is never written (not by an ``update`` either). They also scope what the
  target's packets change, so that a table several sources share keeps the others' rows: they
  join every ``update``'s and ``delete``'s restriction, and AutoSQL's ``set`` updates an existing
  row only if it holds them (else the packet is dead-lettered at that target).
* The ``filter`` sees the canonical ``data`` (before renaming). Conditions on several columns, or
  several operators on one column, must all hold. Like SQL's ``WHERE``, ``null`` matches only
  ``is_null: true``. When the data match:

  - ``add``, ``set``: applied;
  - ``update``: applied, then followed by a ``set`` (upsert) of restriction + data, so that a row
    moving into the filter is inserted while a row already there (under its old or a new key)
    keeps its other columns. The upsert is added only when the target relation has a primary key
    and restriction + data hold all of it;
  - ``delete``: applied (a delete is never filtered).

  When they do not match:

  - ``add``: nothing;
  - ``set``: a delete by the target's primary key (the row may have been distributed while it
    matched);
  - ``update``: a delete by the restriction (the row moved out of the filter).

  The filter decides only on the columns a packet carries: when ``data`` lacks one of its columns,
  the packet is applied as it is (an ``update`` as a plain update). The capture triggers send the
  whole new row with every update, so the trigger flow is always decided; a client ``update``
  moving a row *into* the filter must carry the filter's columns and the whole row (or be sent as a
  ``set``), else the row inserted holds only what the update carried.

Comparisons: numbers numerically (a numeric string against a number filter value too); a boolean
filter value with the strings PostgreSQL reads as booleans (``"t"``, ``"on"``, ``"1"``...); two
ISO 8601 timestamps with UTC offsets as points in time (the capture trigger writes a timestamptz
in the writer's time zone); other strings as text (so timestamps without an offset order
correctly only when written in the same time zone); ``eq``/``ne``/``in``
between values of different kinds are simply unequal; ``gt``/``gte``/``lt``/``lte`` between a number
and a non-numeric string, or on a JSON object or array, raise
:class:`~golconde.errors.PacketError`.
"""
from __future__ import annotations

import datetime
import enum
import functools
import math
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import PacketError
from .packet import Action, Packet, dumps, loads

#: Target keys read by :func:`parse_mapping`.
MAPPING_KEYS = ("columns", "exclude", "constants", "defaults", "filter")
#: Filter operators, in the order error messages list them.
OPERATORS = ("in", "eq", "ne", "gt", "gte", "lt", "lte", "is_null")
_ORDERING = {"gt": lambda c: c > 0, "gte": lambda c: c >= 0, "lt": lambda c: c < 0, "lte": lambda c: c <= 0}


class Verdict(enum.Enum):
    """What a filter says about a packet's data."""

    MATCH = "match"          # every filter column present, every condition holds
    NO_MATCH = "no match"    # a condition on a present column fails
    UNKNOWN = "unknown"      # the present columns match but some filter column is missing


@dataclass(frozen=True)
class Condition:
    """One filter condition: ``column <operator> value`` (``value`` a tuple for ``in``)."""

    column: str
    operator: str
    value: Any

    def holds(self, value: Any) -> bool:
        """Whether the canonical ``value`` satisfies the condition.

        :raises PacketError: an ordering comparison between values that cannot be ordered.
        """
        if self.operator == "is_null":
            return (value is None) == self.value
        if value is None:
            return False                      # SQL: NULL compared with anything is not true
        if self.operator == "eq":
            return _equal(value, self.value)
        if self.operator == "ne":
            return not _equal(value, self.value)
        if self.operator == "in":
            return any(_equal(value, item) for item in self.value)
        order = _compare(value, self.value)
        if order is None:
            raise PacketError("filter %s %s %r cannot compare the packet's value %s"
                              % (self.column, self.operator, self.value, _short(value)))
        return _ORDERING[self.operator](order)


def _number(value: Any) -> Optional[Decimal]:
    """``value`` as a Decimal if it is a number or a numeric string, else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, Decimal)):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def _instant(text: str) -> Optional[datetime.datetime]:
    """``text`` as a point in time when it is an ISO 8601 timestamp with a UTC offset
    (``2026-01-01T09:00:00+09:00``, ``2026-01-01 00:00:00+00``: what PostgreSQL prints for a
    timestamptz, in the writer's time zone), else ``None``."""
    if len(text) < 19 or text[4:5] != "-" or not text[:4].isdigit():
        return None
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


def _texts(value: str, expected: str) -> Tuple[Any, Any]:
    """Two strings as they compare: as points in time when both are timestamps with offsets
    (the same instant written in two time zones is equal), else as text."""
    left, right = _instant(value), _instant(expected)
    if left is not None and right is not None:
        return left, right
    return value, expected


def _boolean(value: Any) -> Optional[bool]:
    """``value`` as PostgreSQL's boolean input reads it (``boolin``: ``true``/``false``,
    ``yes``/``no``, ``on``/``off``, ``1``/``0`` and any unique prefix, in any case, blanks around
    ignored; the packet may send a boolean column so), else ``None``."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    word = value.strip().lower()
    if not word:
        return None
    if "true".startswith(word) or "yes".startswith(word) or word == "on" or word == "1":
        return True
    if "false".startswith(word) or "no".startswith(word) or word in ("of", "off", "0"):
        return False
    return None


def _equal(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        left, right = _boolean(value), _boolean(expected)
        return left is not None and left == right
    if isinstance(expected, (int, float, Decimal)):
        number = _number(value)
        return number is not None and number == _number(expected)
    if not isinstance(value, str) or not isinstance(expected, str):
        return False
    left, right = _texts(value, expected)
    return bool(left == right)


def _compare(value: Any, expected: Any) -> Optional[int]:
    """-1, 0 or 1 comparing ``value`` with ``expected``; ``None`` if they cannot be ordered."""
    if isinstance(expected, (int, float, Decimal)) and not isinstance(expected, bool):
        left, right = _number(value), _number(expected)
    elif isinstance(expected, str) and isinstance(value, str):
        left, right = _texts(value, expected)
    else:
        return None
    if left is None or right is None:
        return None
    return (left > right) - (left < right)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Names:
    """Look-up of packet keys among configured names: exact, else case-insensitive."""

    def __init__(self, names: Sequence[str]) -> None:
        self.exact = set(names)
        self.folded: Dict[str, str] = {}
        for name in names:
            self.folded.setdefault(name.lower(), name)

    def find(self, key: str) -> Optional[str]:
        if key in self.exact:
            return key
        return self.folded.get(key.lower())


def _get(values: Mapping[str, Any], name: str) -> Tuple[bool, Any]:
    """(present, value) of column ``name`` in ``values``, matched exactly, else case-insensitively."""
    if name in values:
        return True, values[name]
    folded = [key for key in values if key.lower() == name.lower()]
    if len(folded) == 1:
        return True, values[folded[0]]
    return False, None


@dataclass(frozen=True)
class TargetMapping:
    """A target's mapping (see the module docstring). Build it with :func:`parse_mapping`.

    :ivar columns: ``((canonical, target), ...)`` renames.
    :ivar exclude: canonical columns never written to the target.
    :ivar constants: ``((target column, JSON text of the value), ...)`` written on add/set.
    :ivar defaults: target columns left to the target's DEFAULT.
    :ivar conditions: the filter, all of which must hold.
    :ivar path: the configuration key path (``Destinations.D.Targets.t``), for messages.
    """

    columns: Tuple[Tuple[str, str], ...] = ()
    exclude: Tuple[str, ...] = ()
    constants: Tuple[Tuple[str, str], ...] = ()
    defaults: Tuple[str, ...] = ()
    conditions: Tuple[Condition, ...] = ()
    path: str = field(default="", compare=False)

    def __bool__(self) -> bool:
        return bool(self.columns or self.exclude or self.constants or self.defaults or self.conditions)

    @functools.cached_property
    def _renames(self) -> Tuple[_Names, Dict[str, str]]:
        return _Names([canonical for canonical, _ in self.columns]), dict(self.columns)

    @functools.cached_property
    def _dropped(self) -> Tuple[_Names, _Names]:
        """(excluded canonical names, target names never written from a packet)."""
        return (_Names(list(self.exclude)),
                _Names(list(self.defaults) + [name for name, _ in self.constants]))

    @functools.cached_property
    def constant_values(self) -> Dict[str, Any]:
        """The constants as packet values (target column -> value)."""
        return {name: loads(text) for name, text in self.constants}

    def as_config(self) -> Dict[str, Any]:
        """The mapping in its YAML shape (keys that are not set are left out)."""
        out: Dict[str, Any] = {}
        if self.columns:
            out["columns"] = dict(self.columns)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        if self.constants:
            out["constants"] = self.constant_values
        if self.defaults:
            out["defaults"] = list(self.defaults)
        if self.conditions:
            conditions: Dict[str, Dict[str, Any]] = {}
            for condition in self.conditions:
                value = list(condition.value) if condition.operator == "in" else condition.value
                conditions.setdefault(condition.column, {})[condition.operator] = value
            out["filter"] = conditions
        return out

    # -- against the catalogs ----------------------------------------------------------------------
    def target_problems(self, columns: Sequence[str], relation: str) -> List[str]:
        """The target-side names of this mapping that are no column of the target ``relation``
        (whose columns are ``columns``): renamed-to, constant and default columns. Their values
        would be dropped without a word (a target ignores unknown data columns).

        :returns: one message per name, with its key path; ``[]`` when all are there.
        """
        names = _Names(list(columns))
        wanted = ([("columns.%s" % canonical, target) for canonical, target in self.columns]
                  + [("constants.%s" % name, name) for name, _ in self.constants]
                  + [("defaults", name) for name in self.defaults])
        return ["%s.%s: %r is no column of %s" % (self.path or "(target)", where, name, relation)
                for where, name in wanted if names.find(name) is None]

    def canonical_problems(self, columns: Sequence[str], relation: str) -> List[str]:
        """The canonical-side names of this mapping that are no column of the canonical
        ``relation``: renamed, excluded and filtered columns. A rename or an exclusion of a
        misspelt column never applies (the column reaches the target as it is), and a filter on
        one lets every row through. Also a rename to the name another canonical column keeps
        (neither renamed nor excluded): both would write that target column.

        :returns: one message per name, with its key path; ``[]`` when all are there.
        """
        names = _Names(list(columns))
        wanted = ([("columns", canonical) for canonical, _ in self.columns]
                  + [("exclude", name) for name in self.exclude]
                  + [("filter", name) for name in
                     dict.fromkeys(condition.column for condition in self.conditions)])
        problems = ["%s.%s: %r is no column of the canonical %s" % (self.path or "(target)", where,
                                                                     name, relation)
                    for where, name in wanted if names.find(name) is None]
        # a canonical column that reaches the target under its own name, which a rename gives
        # another column too: both write one target column (an update of either alone would
        # write the wrong value there)
        renamed = {canonical.lower() for canonical, _ in self.columns}
        excluded = self._dropped[0]
        for canonical, target in self.columns:
            for column in columns:
                if (column.lower() == target.lower() and column.lower() not in renamed
                        and excluded.find(column) is None and column.lower() != canonical.lower()):
                    problems.append("%s.columns.%s: renames it to %r, the name canonical column %r"
                                    " keeps at the target: both would write it (rename or exclude"
                                    " %r too)" % (self.path or "(target)", canonical, target,
                                                  column, column))
        return problems

    def excluded(self, canonical: str) -> bool:
        """Whether canonical column ``canonical`` is never written to the target (``exclude``)."""
        return self._dropped[0].find(canonical) is not None

    def written_by_mapping(self, target: str) -> bool:
        """Whether target column ``target`` is a constant's or left to its DEFAULT, never a
        canonical column's value."""
        return self._dropped[1].find(target) is not None

    # -- the parts -------------------------------------------------------------------------------
    def rename(self, key: str) -> str:
        """The target column for the canonical packet key ``key``."""
        names, targets = self._renames
        name = names.find(key)
        return targets[name] if name is not None else key

    def verdict(self, data: Mapping[str, Any]) -> Verdict:
        """What the filter says about canonical ``data`` (:attr:`Verdict.MATCH` without a filter).

        :raises PacketError: see :meth:`Condition.holds`.
        """
        missing = False
        for condition in self.conditions:
            present, value = _get(data, condition.column)
            if not present:
                missing = True
            elif not condition.holds(value):
                return Verdict.NO_MATCH
        return Verdict.UNKNOWN if missing else Verdict.MATCH

    def map_data(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        """Canonical ``data`` renamed, without excluded, SQL-default and constant columns (the
        constants are added by :meth:`with_constants`).

        :raises PacketError: two packet keys that end up naming the same target column.
        """
        excluded, defaults = self._dropped
        out: Dict[str, Any] = {}
        origin: Dict[str, str] = {}
        for key, value in data.items():
            if excluded.find(key) is not None:
                continue
            name = self.rename(key)
            if defaults.find(name) is not None:
                continue
            if name.lower() in origin:
                raise PacketError("%s.columns: data keys %r and %r both map to target column %r"
                                  % (self.path or "(target)", origin[name.lower()], key, name))
            origin[name.lower()] = key
            out[name] = value
        return out

    def map_restriction(self, restriction: Mapping[str, Any]) -> Dict[str, Any]:
        """Canonical ``restriction`` renamed.

        :raises PacketError: it names an excluded, SQL-default or constant column (its target value
            is not the canonical one, and leaving it out would widen the statement), or two keys
            map to the same target column.
        """
        excluded, unwritten = self._dropped
        out: Dict[str, Any] = {}
        for key, value in restriction.items():
            if excluded.find(key) is not None:
                raise PacketError("%s.exclude: the restriction names %r, which this target does not"
                                  " receive; it cannot select the target's rows"
                                  % (self.path or "(target)", key))
            name = self.rename(key)
            if unwritten.find(name) is not None:
                part = "defaults" if name.lower() in (d.lower() for d in self.defaults) else "constants"
                raise PacketError("%s.%s: the restriction names %r, whose target value is not the"
                                  " canonical one; it cannot select the target's rows"
                                  % (self.path or "(target)", part, name))
            if any(other.lower() == name.lower() for other in out):
                raise PacketError("%s.columns: two restriction keys map to target column %r"
                                  % (self.path or "(target)", name))
            out[name] = value
        return out

    def with_constants(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        """``data`` plus the constants (a constant replaces a packet value for its column)."""
        constants = self.constant_values
        out = {key: value for key, value in data.items()
               if not any(key.lower() == name.lower() for name in constants)}
        out.update(constants)
        return out

    # -- the whole ---------------------------------------------------------------------------------
    def transform(self, packet: Packet, key: Sequence[Any] = ()) -> List[Packet]:
        """The packets to apply to the target for the canonical ``packet``, in order (may be empty).

        :param key: the target relation's keys (target column names), used to delete a ``set``
            row that left the filter and to turn a matching ``update`` into an upsert: its unique
            keys, primary key first (``TableSchema.unique_keys``), the first one whose columns
            the row holds (constants included) without a NULL identifying the row; a single key
            as a sequence of names is accepted too. Empty when unknown or when it has none.
        :raises PacketError: see :meth:`map_data`, :meth:`map_restriction`, :meth:`verdict`.
        """
        keys = _keys(key)
        action = packet.action
        # the constants scope updates and deletes to the rows this target's packets wrote (a
        # table several sources share, each with its constant)
        restriction = self.with_constants(self.map_restriction(packet.restriction))
        if action is Action.DELETE:
            return [Packet(Action.DELETE, {}, restriction)]
        verdict = self.verdict(packet.data)
        data = self.map_data(packet.data)
        if action in (Action.ADD, Action.SET):
            written = self.with_constants(data)
            if verdict is Verdict.NO_MATCH:
                if action is Action.SET:
                    where = _key_values(written, keys)
                    # scoped by the constants too, as every delete (another source's row stays)
                    return [Packet(Action.DELETE, {}, self.with_constants(where))] if where else []
                return []
            return [Packet(action, written)] if written else []
        if verdict is Verdict.NO_MATCH:
            return [Packet(Action.DELETE, {}, restriction)]
        if verdict is Verdict.MATCH and self.conditions:
            row = dict(restriction)
            for name, value in data.items():
                for other in [other for other in row if other.lower() == name.lower()]:
                    del row[other]
                row[name] = value
            if _key_values(row, keys):
                # the update keeps a row already there (under its old or new key) whole; the upsert
                # then inserts the row if it was not (it moves into the filter)
                update = [Packet(Action.UPDATE, data, restriction)] if data else []
                return update + [Packet(Action.SET, self.with_constants(row))]
        return [Packet(Action.UPDATE, data, restriction)] if data else []


def _keys(key: Sequence[Any]) -> Tuple[Tuple[str, ...], ...]:
    """``transform``'s ``key`` as a tuple of keys: one key given as names, or several."""
    if not key:
        return ()
    if all(isinstance(name, str) for name in key):
        return (tuple(key),)
    return tuple(tuple(names) for names in key if names)


def _key_values(values: Mapping[str, Any], keys: Sequence[Sequence[str]]) -> Dict[str, Any]:
    """``{column: value}`` of the columns of the first of ``keys`` that ``values`` holds whole,
    without a NULL (a NULL identifies no row); empty if none."""
    for key in keys:
        out = {}
        for name in key:
            present, value = _get(values, name)
            if not present or value is None:
                break
            out[name] = value
        else:
            return out
    return {}


# --- configuration ---------------------------------------------------------------------------------

def _json_value(value: Any) -> Any:
    """A YAML value as a packet value: dates and times as ISO 8601 text, tuples as lists."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    return value


def _is_scalar(value: Any) -> bool:
    """A string or a finite number (not a boolean, which Python counts as an int: ordered
    operators would then refuse every packet's value)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int, Decimal)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple, set)):
        return "a list"
    return _short(value)


def _name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _names(raw: Any, path: str, problems: List[str]) -> Tuple[str, ...]:
    """A YAML list of column names (a single name is accepted as a list of one)."""
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)):
        problems.append("%s: expected a list of column names, got %s" % (path, _show(raw)))
        return ()
    out: List[str] = []
    for index, item in enumerate(items):
        if not _name(item):
            problems.append("%s[%d]: expected a column name, got %s" % (path, index, _show(item)))
        elif item.strip() in out:
            problems.append("%s[%d]: %r is listed twice" % (path, index, item.strip()))
        else:
            out.append(item.strip())
    return tuple(out)


def _pairs(raw: Any, path: str, problems: List[str], what: str) -> List[Tuple[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        problems.append("%s: expected a mapping of %s, got %s" % (path, what, _show(raw)))
        return []
    out = []
    for key, value in raw.items():
        if not _name(key):
            problems.append("%s: %s is not a column name" % (path, _show(key)))
        else:
            out.append((key.strip(), value))
    return out


def _conditions(raw: Any, path: str, problems: List[str]) -> Tuple[Condition, ...]:
    out: List[Condition] = []
    for column, operators in _pairs(raw, path, problems, "column: {operator: value}"):
        where = "%s.%s" % (path, column)
        if not isinstance(operators, Mapping) or not operators:
            problems.append("%s: expected a mapping of operator: value such as {eq: 1} (operators: %s),"
                            " got %s" % (where, ", ".join(OPERATORS), _show(operators)))
            continue
        for operator, value in operators.items():
            op = operator.strip().lower() if isinstance(operator, str) else operator
            if op not in OPERATORS:
                problems.append("%s: unknown operator %s (expected %s)"
                                % (where, _show(operator), ", ".join(OPERATORS)))
                continue
            value = _json_value(value)
            if op == "is_null":
                if not isinstance(value, bool):
                    problems.append("%s.is_null: expected true or false, got %s" % (where, _show(value)))
                    continue
            elif op == "in":
                if not isinstance(value, list) or not value:
                    problems.append("%s.in: expected a non-empty list of values, got %s"
                                    % (where, _show(value)))
                    continue
                bad = [item for item in value if not (_is_scalar(item) or isinstance(item, bool))]
                if bad:
                    problems.append("%s.in: expected strings, numbers or booleans, got %s"
                                    % (where, _show(bad[0])))
                    continue
                value = tuple(value)
            elif value is None:
                problems.append("%s.%s: null never compares equal; use is_null: true or false" % (where, op))
                continue
            elif not _is_scalar(value) and not (op in ("eq", "ne") and isinstance(value, bool)):
                problems.append("%s.%s: expected a string or a number%s, got %s"
                                % (where, op, " or a boolean" if op in ("eq", "ne") else "", _show(value)))
                continue
            out.append(Condition(column, op, value))
    return tuple(out)


def parse_mapping(raw: Mapping[str, Any], path: str) -> Tuple[Optional[TargetMapping], List[str]]:
    """Validate the mapping keys (:data:`MAPPING_KEYS`) of one target's YAML mapping.

    :param raw: the target's YAML mapping (other keys are ignored).
    :param path: its key path, ``Destinations.<destination>.Targets.<target>``.
    :returns: ``(mapping, problems)``: ``mapping`` is ``None`` when no mapping key is given or when
        there are problems; each problem reads ``<key path>: <what is wrong>``, e.g.
        ``Destinations.D.Targets.t.filter.status_id: unknown operator 'between' (expected in, eq,
        ne, gt, gte, lt, lte, is_null)``.
    """
    problems: List[str] = []
    if not any(raw.get(key) is not None for key in MAPPING_KEYS):
        return None, problems
    columns: List[Tuple[str, str]] = []
    renamed_to: Dict[str, str] = {}
    for canonical, target in _pairs(raw.get("columns"), path + ".columns", problems,
                                    "canonical column: target column"):
        if not _name(target):
            problems.append("%s.columns.%s: expected a target column name, got %s"
                            % (path, canonical, _show(target)))
            continue
        target = target.strip()
        if target.lower() in renamed_to:
            problems.append("%s.columns.%s: renames to %r, as columns.%s already does"
                            % (path, canonical, target, renamed_to[target.lower()]))
            continue
        renamed_to[target.lower()] = canonical
        columns.append((canonical, target))
    exclude = _names(raw.get("exclude"), path + ".exclude", problems)
    for name in exclude:
        if any(canonical.lower() == name.lower() for canonical, _ in columns):
            problems.append("%s.exclude: %r is also renamed by columns.%s; give only one of them"
                            % (path, name, name))
    defaults = _names(raw.get("defaults"), path + ".defaults", problems)
    for name in defaults:
        if name.lower() in renamed_to:
            problems.append("%s.defaults: %r is the target of columns.%s, whose values would never be"
                            " written; exclude the canonical column instead"
                            % (path, name, renamed_to[name.lower()]))
    constants: List[Tuple[str, str]] = []
    for name, value in _pairs(raw.get("constants"), path + ".constants", problems, "target column: value"):
        if name.lower() in renamed_to:
            problems.append("%s.constants.%s: is also the target of columns.%s; give only one of them"
                            % (path, name, renamed_to[name.lower()]))
        elif any(name.lower() == other.lower() for other in defaults):
            problems.append("%s.constants.%s: is also listed in defaults; give only one of them"
                            % (path, name))
        else:
            try:
                constants.append((name, dumps(_json_value(value))))
            except (TypeError, ValueError):
                problems.append("%s.constants.%s: %s cannot be written as a packet value"
                                % (path, name, _show(value)))
    conditions = _conditions(raw.get("filter"), path + ".filter", problems)
    if problems:
        return None, problems
    mapping = TargetMapping(columns=tuple(columns), exclude=exclude, constants=tuple(constants),
                            defaults=defaults, conditions=conditions, path=path)
    return (mapping if mapping else None), problems
