"""The read API, declared once: the shapes of every read and the table of read ops.

`READ_OPS` maps each op name to its `ReadOp`: the Struct of its arguments, the type of
its result, and its documentation. The names are those of `engine.Aggregate`'s methods and
the argument fields those of the method's parameters (in order), so every reader dispatches
the same way: ``getattr(aggregate, op)(**msgspec.structs.asdict(args))``. The HTTP server
decodes request bodies into the args Struct, the OpenAPI document is generated from these
Structs (`msgspec.json.schema_components`), `TallyClient` decodes answers with the result
types, and `tally query` builds the args Struct from its flags.

Adding a read op: the engine method, and one `ReadOp` here.

A key (sort key, id or namespace) is `Key`: any JSON value the engine accepts (null,
numbers, booleans, strings, arrays as tuples); the engine validates it and says what is
wrong, so the shapes here leave it open.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta

__all__ = [
    "KEY_SCHEMA",
    "READ_OPS",
    "REF_TEMPLATE",
    "TYPED_VALUE_SCHEMA",
    "AtArgs",
    "BatchArgs",
    "Bound",
    "Bounds",
    "IndexOfArgs",
    "Item",
    "Key",
    "NoArgs",
    "Order",
    "Page",
    "PaginateArgs",
    "Query",
    "RangeArgs",
    "ReadOp",
    "args_error",
]

REF_TEMPLATE = "#/components/schemas/{name}"
"""Where the generated JSON schemas refer to each other (an OpenAPI document's components)."""

KEY_SCHEMA: dict[str, Any] = {
    "description": (
        "A sort key, id or namespace: null, number, boolean, string, an array of keys "
        "(a tuple), or a typed value (`TypedValue`). Total order: null < numbers < false "
        "< true < strings < bytes < arrays < dates < datetimes < times < timedeltas < "
        "UUIDs; numbers compare exactly across ints, floats and decimals; arrays compare "
        "element-wise, a shorter prefix first. In answers a decimal is a JSON number with "
        "its exact digits, dates and times ISO 8601 strings (aware datetimes in UTC), a "
        "UUID its string. In requests a plain number is an int or a float (12.1 is the "
        "float, not the decimal 12.1): write other types as a `TypedValue`. "
        "(bytes keys, possible from msgpack events, are rendered as base64 strings.)"
    ),
    "anyOf": [
        {
            "type": ["null", "number", "boolean", "string", "array"],
            "items": {"$ref": REF_TEMPLATE.format(name="Key")},
        },
        {"$ref": REF_TEMPLATE.format(name="TypedValue")},
    ],
}
"""The ``Key`` component: what a Struct field of type `Key` refers to (JSON Schema)."""

TYPED_VALUE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        'A value JSON has no type for, in requests: {"$decimal": "12.10"} (or a number: '
        'its digits as written), {"$datetime": "2024-01-01T00:00:00Z"} (RFC 3339; no '
        'offset: naive), {"$date": "2024-01-01"}, {"$time": "12:30:00"}, '
        '{"$timedelta": "PT90S"} (ISO 8601 duration), {"$uuid": "..."} (`tally.schemas.values`).'
    ),
    "minProperties": 1,
    "maxProperties": 1,
    "additionalProperties": False,
    "properties": {
        "$decimal": {"type": ["string", "number"]},
        "$datetime": {"type": "string", "format": "date-time"},
        "$date": {"type": "string", "format": "date"},
        "$time": {"type": "string", "format": "time"},
        "$timedelta": {"type": "string", "format": "duration"},
        "$uuid": {"type": "string", "format": "uuid"},
    },
}
"""The ``TypedValue`` component (see `tally.schemas.values`)."""

Key = Annotated[Any, Meta(extra_json_schema={"$ref": REF_TEMPLATE.format(name="Key")})]
"""A key, id or namespace (see `KEY_SCHEMA`); decoded as is and checked by the engine."""

Order = Literal["asc", "desc"]


def _doc(description: str) -> Meta:
    return Meta(description=description)


# ---- values -----------------------------------------------------------------------


class Item(msgspec.Struct, frozen=True):
    """One item of an aggregate: ordered by ``(key, id)``."""

    key: Key
    id: Key
    sum_value: int | float | Decimal
    namespace: Key = None


class Page(msgspec.Struct, frozen=True):
    """A page of `paginate`. ``cursor`` is opaque; ``is_done`` is exact."""

    items: list[Item]
    cursor: str | None
    is_done: bool


class Bound(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One end of a range. ``id`` cuts a tie group of equal keys at that id."""

    key: Key
    inclusive: bool = True
    id: Key = None


class Bounds(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A key range: ``lower``/``upper``, or ``eq``, or ``prefix`` (tuple keys).

    Several given together intersect.
    """

    lower: Bound | None = None
    upper: Bound | None = None
    eq: Annotated[Key, _doc("Only items with exactly this key.")] = UNSET
    prefix: Annotated[
        tuple[Key, ...] | None, _doc("Only array (tuple) keys starting with these elements.")
    ] = None


class Query(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One entry of `count_batch` / `sum_batch` / `at_batch`."""

    namespace: Key = None
    bounds: Bounds | None = None
    offset: Annotated[int, _doc("Used by at_batch only.")] = 0


# ---- the arguments of each read (field names = the Aggregate method's parameters) ----

_Namespace = Annotated[Key, _doc("Namespace to read (default null: the default namespace).")]
_Range = Annotated[Bounds | None, _doc("Key range (default: everything).")]
_Order = Annotated[Order, _doc("asc (default) or desc.")]


class RangeArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Arguments of count, sum, min, max and random: a namespace and a key range."""

    namespace: _Namespace = None
    bounds: _Range = None


class AtArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Arguments of at."""

    offset: Annotated[int, _doc("Position in (key, id) order; negative counts from the end.")]
    namespace: _Namespace = None
    bounds: _Range = None


class IndexOfArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Arguments of index_of."""

    key: Annotated[Key, _doc("The sort key to rank.")]
    id: Annotated[Key, _doc("Item id cutting the tie group of `key` (default null: none).")] = None
    order: _Order = "asc"
    namespace: _Namespace = None
    bounds: _Range = None


class PaginateArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Arguments of paginate."""

    cursor: Annotated[
        str | None, _doc("Opaque cursor of a previous page (default null: start).")
    ] = None
    page_size: Annotated[int, Meta(ge=1, description="Items per page.")] = 100
    order: _Order = "asc"
    namespace: _Namespace = None
    bounds: _Range = None


class BatchArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Arguments of count_batch, sum_batch and at_batch."""

    queries: Annotated[list[Query], _doc("The queries, answered in order.")]


class NoArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """No arguments (namespaces)."""


# ---- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadOp:
    """One read op: its arguments, its result type and its documentation."""

    name: str
    """The `engine.Aggregate` method (and the HTTP route's last segment)."""
    args: type[msgspec.Struct]
    """Its keyword arguments (a Struct; field names = the method's parameters, in order)."""
    result: Any
    """The type of its result."""
    summary: str
    description: str = ""
    example: Mapping[str, Any] = field(default_factory=dict)
    """Arguments of a typical call (error messages show it)."""
    answer: type[msgspec.Struct] = field(init=False, repr=False, compare=False)
    """Its answer over HTTP, ``{"result": ...}`` (a Struct named e.g. ``CountResult``)."""

    def __post_init__(self) -> None:
        camel = "".join(part.capitalize() for part in self.name.split("_"))
        answer = msgspec.defstruct(f"{camel}Result", [("result", self.result)], frozen=True)
        object.__setattr__(self, "answer", answer)

    @property
    def fields(self) -> tuple[str, ...]:
        """The argument names, in the method's order."""
        return self.args.__struct_fields__

    @property
    def required(self) -> tuple[str, ...]:
        """The argument names without a default."""
        n = len(self.args.__struct_fields__) - len(self.args.__struct_defaults__)
        return self.args.__struct_fields__[:n]


_Count = Annotated[int, Meta(ge=0)]
_Sum = int | float | Decimal
_SAME_STATE = "all answered from the same committed state"

READ_OPS: dict[str, ReadOp] = {
    op.name: op
    for op in (
        ReadOp("count", RangeArgs, _Count, "Number of items in range"),
        ReadOp("sum", RangeArgs, _Sum, "Sum of the items' sum values in range"),
        ReadOp(
            "at",
            AtArgs,
            Item,
            "The item at `offset` in (key, id) order; a negative offset counts from the end",
            "An offset outside the range answers 400 `offset_out_of_range`, naming the count.",
            {"offset": 0},
        ),
        ReadOp(
            "index_of",
            IndexOfArgs,
            _Count,
            "Rank of (key, id): asc = items in range before it, desc = items in range after it",
            "Without `id` the whole tie group of `key` counts as one position.",
            {"key": 1000, "order": "desc"},
        ),
        ReadOp("min", RangeArgs, Item | None, "The first item in range, or null"),
        ReadOp("max", RangeArgs, Item | None, "The last item in range, or null"),
        ReadOp("random", RangeArgs, Item | None, "A uniformly random item in range, or null"),
        ReadOp(
            "paginate",
            PaginateArgs,
            Page,
            "One page of items after `cursor` (null: from the start)",
            "Pass the returned `cursor` back to get the next page; `is_done` is exact.",
            {"page_size": 50, "cursor": "<cursor of the previous page>"},
        ),
        ReadOp(
            "count_batch",
            BatchArgs,
            list[_Count],
            f"`count` of each query, in order, {_SAME_STATE}",
            example={"queries": [{"namespace": "x"}]},
        ),
        ReadOp(
            "sum_batch",
            BatchArgs,
            list[_Sum],
            f"`sum` of each query, in order, {_SAME_STATE}",
            example={"queries": [{"namespace": "x"}]},
        ),
        ReadOp(
            "at_batch",
            BatchArgs,
            list[Item],
            f"`at` of each query (its `offset`), in order, {_SAME_STATE}",
            example={"queries": [{"offset": 0}, {"offset": -1}]},
        ),
        ReadOp(
            "namespaces", NoArgs, list[Key], "Namespaces holding at least one item, in key order"
        ),
    )
}

# ---- validation errors, said in words ------------------------------------------------------

_AT = re.compile(r"^(?P<what>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")
_JSON_TYPES = {
    "int": "an int",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


_WORDS = {"an int >= 1": "a positive int", "an int >= 0": "a non-negative int"}


def _strip(tp: Any) -> Any:
    """``tp`` without `Annotated` metadata."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _type_at(tp: Any, path: str) -> Any:
    """The type at a msgspec error path (``$.bounds.lower``, ``$.queries[0]``), or None."""
    for name, index in _STEP.findall(path.removeprefix("$")):
        tp = _strip(tp)
        options = (
            [_strip(t) for t in typing.get_args(tp)]
            if typing.get_origin(tp)
            in (
                typing.Union,
                type(int | None),
            )
            else [tp]
        )
        found = None
        for t in options:
            if name and isinstance(t, type) and issubclass(t, msgspec.Struct):
                found = typing.get_type_hints(t, include_extras=True).get(name)
            elif index and typing.get_origin(t) in (list, tuple):
                found = typing.get_args(t)[0]
            if found is not None:
                break
        if found is None:
            return None
        tp = found
    return tp


def _struct(tp: Any) -> type[msgspec.Struct] | None:
    """The Struct ``tp`` is (or is an optional of), if any."""
    tp = _strip(tp)
    for t in (tp, *typing.get_args(tp)):
        t = _strip(t)
        if isinstance(t, type) and issubclass(t, msgspec.Struct):
            return t
    return None


def _expected(text: str, tp: Any) -> str:
    """msgspec's ``Expected `object | null``` in words, Structs with their fields."""
    words = []
    for part in text.split("|"):
        part = part.strip()
        name, _, constraint = part.partition(" ")
        word = _JSON_TYPES.get(name, f"`{name}`")
        struct = _struct(tp)
        if name == "object" and struct is not None:
            word = f"an object {{{', '.join(struct.__struct_fields__)}}}"
        elif name == "array" and typing.get_origin(_strip(tp)) is list:
            item = _struct(typing.get_args(_strip(tp))[0])
            if item is not None:
                word = f"an array of objects {{{', '.join(item.__struct_fields__)}}}"
        words.append(f"{word} {constraint}".strip())
    return " or ".join(words)


def args_error(op: ReadOp, error: msgspec.ValidationError) -> tuple[str, str]:
    """(code, message) for arguments of ``op`` that do not fit its args Struct.

    Codes: ``unknown_field`` / ``missing_field`` for the op's own arguments, ``bad_request``
    when the arguments are not an object at all, ``invalid_argument`` for anything inside
    one (a bound, a query...). The message names the argument (``bounds.lower``,
    ``queries[2].offset``), what it must be and what to do.
    """
    m = _AT.match(str(error))
    assert m is not None  # the pattern matches any text
    what, path = m["what"], m["path"] or "$"
    where = path.removeprefix("$").removeprefix(".") or "the arguments"
    tp = _type_at(op.args, path)
    takes = ", ".join(op.fields) or "no arguments"
    example = msgspec.json.encode(op.example).decode()
    if got := re.match(r"Object contains unknown field `(.*)`$", what):
        if path == "$":
            return "unknown_field", f"{op.name} does not take {got[1]}; it takes {takes}"
        struct = _struct(tp)
        fields = ", ".join(struct.__struct_fields__) if struct is not None else "?"
        return "invalid_argument", f"{where} has no field {got[1]!r}; it takes {fields}"
    if got := re.match(r"Object missing required field `(.*)`$", what):
        if path == "$":
            return "missing_field", f"{op.name} needs {got[1]!r}, e.g. {example}"
        struct = _struct(tp)
        fields = ", ".join(struct.__struct_fields__) if struct is not None else "?"
        return "invalid_argument", f"{where} needs {got[1]!r} (it takes {fields})"
    if got := re.match(r"Expected `(.*?)`(.*?)(?:, got `(.*)`)?$", what):
        expected = _expected(got[1], tp) + got[2]
        expected = _WORDS.get(expected, expected)
        given = f", got {_JSON_TYPES.get(got[3], got[3])}" if got[3] else ""
        if path == "$":
            return "bad_request", (
                f"the arguments of {op.name} must be a JSON object{given}; it takes {takes}, "
                f"e.g. {example}"
            )
        return "invalid_argument", f"{where} must be {expected}{given}"
    if got := re.match(r"Invalid enum value (.*)$", what):
        choices = ", ".join(repr(c) for c in typing.get_args(_strip(tp))) or "?"
        return "invalid_argument", f"{where} must be one of {choices}, got {got[1]}"
    return "invalid_argument", f"{where}: {what}"
