"""`TableAggregate`: an aggregate defined over the rows of a table.

A definition maps a row (a dict) to an item: ``sort_key`` → key,
``sum_value`` → sum, ``namespace`` → namespace, ``id_field`` → id, and
``filter`` decides whether the row belongs at all. Bound to a store it takes
row-level writes; consumers apply change events through exactly these.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    NamedTuple,
    ParamSpec,
    TypeVar,
    overload,
)

from tally.schemas.errors import ConfigError
from tally.schemas.reads import READ_OPS
from tally.schemas.typed import ColumnType, parse_column_type

from .aggregate import Aggregate
from .errors import InvalidArgument, ItemNotFound
from .keys import key_repr

if TYPE_CHECKING:
    from .store import Store

__all__ = ["BoundTableAggregate", "RowItem", "TableAggregate"]

Row = Mapping[str, Any]
P = ParamSpec("P")
R = TypeVar("R")
Extractor = Callable[[Row], Any] | str | Sequence[str] | None


class RowItem(NamedTuple):
    """What a row maps to."""

    namespace: Any
    key: Any
    id: Any
    sum_value: int | float


def _extractor(spec: Extractor, what: str, default: Any) -> Callable[[Row], Any]:
    if spec is None:
        return lambda row: default
    if callable(spec):
        return spec
    if isinstance(spec, str):
        field = spec

        def get_field(row: Row) -> Any:
            try:
                return row[field]
            except KeyError:
                raise InvalidArgument(
                    f"row has no field {field!r} needed for {what}: {key_repr(row)}"
                ) from None

        return get_field
    if isinstance(spec, (tuple, list)) and spec and all(isinstance(f, str) for f in spec):
        fields = tuple(spec)

        def get_fields(row: Row) -> Any:
            try:
                return tuple(row[f] for f in fields)
            except KeyError as e:
                raise InvalidArgument(
                    f"row has no field {e.args[0]!r} needed for {what}: {key_repr(row)}"
                ) from None

        return get_fields
    raise InvalidArgument(
        f"{what} must be a callable(row), a field name, or a tuple of field names, got {spec!r}"
    )


def _describe(spec: Any) -> str:
    """A stable description of an extractor for the definition fingerprint."""
    if spec is None or isinstance(spec, (str, tuple, list)):
        return repr(spec)
    try:
        return inspect.getsource(spec).strip()
    except (OSError, TypeError):
        code = getattr(spec, "__code__", None)
        if code is not None:
            return repr((code.co_code, code.co_consts, code.co_names))
        return repr(spec)


class TableAggregate:
    """Definition of an aggregate over a table's rows.

    ``sort_key``, ``sum_value`` and ``namespace`` are each a callable(row), a
    field name, or a tuple of field names (a tuple key). ``sum_value`` None
    sums 0; ``namespace`` None uses the default namespace. ``filter(row)``
    False keeps the row out (and removes it if it was in). ``id_field`` is a
    field name or a tuple of names for a composite primary key. ``version`` is
    yours to bump to force a rebuild when behaviour changes in a way the
    fingerprint cannot see (e.g. a helper function it calls). ``columns`` declares
    column types (``{"amount": "numeric(12,2)", "created_at": "timestamptz"}``) for
    records that carry no schema, so rows reach the functions typed (`tally.schemas.typed`).
    """

    def __init__(
        self,
        name: str,
        *,
        table: str,
        sort_key: Extractor,
        sum_value: Extractor = None,
        namespace: Extractor = None,
        filter: Callable[[Row], bool] | None = None,
        id_field: str | Sequence[str] = "id",
        version: str | None = None,
        columns: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or "#" in name:
            raise InvalidArgument(
                f"aggregate name must be a non-empty string without '#', got {name!r}"
            )
        if not isinstance(table, str) or not table:
            raise InvalidArgument(f"table must be a non-empty string, got {table!r}")
        if sort_key is None:
            raise InvalidArgument(
                "sort_key is required: a callable(row), a field name, or a tuple of field names"
            )
        if filter is not None and not callable(filter):
            raise InvalidArgument(f"filter must be a callable(row) -> bool, got {filter!r}")
        self.name = name
        self.table = table
        self.version = version
        self.id_field = id_field
        self._specs = (sort_key, sum_value, namespace, filter, id_field)
        self._key = _extractor(sort_key, "sort_key", None)
        self._sum = _extractor(sum_value, "sum_value", 0)
        self._ns = _extractor(namespace, "namespace", None)
        self._filter = filter
        if isinstance(id_field, str):
            self.id_fields: tuple[str, ...] = (id_field,)
        elif (
            isinstance(id_field, (tuple, list))
            and id_field
            and all(isinstance(f, str) for f in id_field)
        ):
            self.id_fields = tuple(id_field)
        else:
            raise InvalidArgument(
                f"id_field must be a field name or a tuple of field names, got {id_field!r}"
            )
        self._id = _extractor(id_field, "id", None)
        if columns is not None and not isinstance(columns, Mapping):
            raise InvalidArgument(f"columns must map column names to type names, got {columns!r}")
        self.columns: dict[str, ColumnType] = {}
        for col, spec in (columns or {}).items():
            try:
                self.columns[col] = parse_column_type(spec)
            except ConfigError as e:
                raise InvalidArgument(f"aggregate {name!r}: column {col!r}: {e}") from None

    def __repr__(self) -> str:
        return f"TableAggregate({self.name!r}, table={self.table!r})"

    @property
    def fingerprint(self) -> str:
        """Hash of the definition (table, functions' code, version): changes force a rebuild."""
        h = hashlib.sha256()
        typed = sorted((c, t.name, t.precision, t.scale, t.array) for c, t in self.columns.items())
        for part in (
            self.name,
            self.table,
            self.version,
            *(_describe(s) for s in self._specs),
            *typed,
        ):
            h.update(repr(part).encode())
            h.update(b"\x00")
        return h.hexdigest()[:16]

    @property
    def has_filter(self) -> bool:
        """True when a ``filter`` can keep rows out (so an absent id may be legitimate)."""
        return self._filter is not None

    def row_id(self, row: Row) -> Any:
        """The id of a row (a tuple for composite ids)."""
        return self._id(row)

    def item(self, row: Row, id: Any = None) -> RowItem | None:
        """The item a row maps to, or None if ``filter`` keeps it out."""
        if self._filter is not None and not self._filter(row):
            return None
        return RowItem(
            self._ns(row), self._key(row), self._id(row) if id is None else id, self._sum(row)
        )

    def item_tuple(self, row: Row) -> tuple[Any, Any, Any] | None:
        """(namespace, key, sum_value) of a row, or None if filtered out.

        The consumer's hot path: a plain tuple, no id extraction (the caller has the id).
        """
        if self._filter is not None and not self._filter(row):
            return None
        return self._ns(row), self._key(row), self._sum(row)

    def bind(self, store: Store) -> BoundTableAggregate:
        """This definition's aggregate in ``store``."""
        return BoundTableAggregate(self, store.aggregate(self.name))


class _Read(Generic[P, R]):
    """A read of `BoundTableAggregate`: the `Aggregate` method it is made from, of the bound
    aggregate (``bound.count`` is ``bound.aggregate.count``), typed with that method's
    signature, so the two cannot drift apart."""

    def __init__(self, method: Callable[Concatenate[Aggregate, P], R]) -> None:
        self.name = method.__name__
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, bound: None, owner: type[Any]) -> _Read[P, R]: ...
    @overload
    def __get__(self, bound: BoundTableAggregate, owner: type[Any]) -> Callable[P, R]: ...
    def __get__(self, bound: BoundTableAggregate | None, owner: type[Any]) -> Any:
        if bound is None:
            return self
        return getattr(bound.aggregate, self.name)


class BoundTableAggregate:
    """A `TableAggregate` bound to a store: row-level writes plus every read.

    The reads are the bound `Aggregate`'s own methods (``bound.count(...)`` is
    ``bound.aggregate.count(...)``), with their signatures.
    """

    def __init__(self, definition: TableAggregate, aggregate: Aggregate) -> None:
        self.definition = definition
        self.aggregate = aggregate

    # ---- row-level writes ----------------------------------------------------

    def insert(self, row: Row) -> None:
        """Strict: add the row's item; `ItemExists` if its id is taken. A filtered-out row is a no-op."""
        it = self.definition.item(row)
        if it is not None:
            self.aggregate.insert(it.key, it.id, it.sum_value, it.namespace)

    def delete(self, row: Row) -> None:
        """Strict: remove the row's item; `ItemNotFound` if absent."""
        self.aggregate.delete(self.definition.row_id(row))

    def replace(self, old: Row, new: Row) -> None:
        """Strict: the old row must be present; the new one replaces it (or removes it if filtered out)."""
        old_id = self.definition.row_id(old)
        if self.aggregate.get(old_id) is None:
            raise ItemNotFound(
                f"aggregate {self.aggregate.name!r} has no item with id {key_repr(old_id)} to replace"
            )
        it = self.definition.item(new)
        with self.aggregate.store.batch():
            if it is None:
                self.aggregate.delete(old_id)
                return
            if it.id != old_id:
                self.aggregate.delete(old_id)
            self.aggregate.upsert(it.key, it.id, it.sum_value, it.namespace)

    def upsert(self, row: Row, id: Any = None) -> bool:
        """Idempotent: converge to this row's item (removed if filtered out). True if anything changed."""
        it = self.definition.item(row, id)
        if it is None:
            return self.aggregate.delete_if_exists(
                self.definition.row_id(row) if id is None else id
            )
        return self.aggregate.upsert(it.key, it.id, it.sum_value, it.namespace)

    def delete_if_exists(self, row_or_id: Any) -> bool:
        """Idempotent: remove the item for a row (dict) or an id. True if it was there."""
        id = self.definition.row_id(row_or_id) if isinstance(row_or_id, Mapping) else row_or_id
        return self.aggregate.delete_if_exists(id)

    # ---- reads: the aggregate's own methods -------------------------------------

    count = _Read(Aggregate.count)
    sum = _Read(Aggregate.sum)
    at = _Read(Aggregate.at)
    index_of = _Read(Aggregate.index_of)
    min = _Read(Aggregate.min)
    max = _Read(Aggregate.max)
    random = _Read(Aggregate.random)
    paginate = _Read(Aggregate.paginate)
    iter = _Read(Aggregate.iter)
    count_batch = _Read(Aggregate.count_batch)
    sum_batch = _Read(Aggregate.sum_batch)
    at_batch = _Read(Aggregate.at_batch)
    namespaces = _Read(Aggregate.namespaces)
    get = _Read(Aggregate.get)
    validate = _Read(Aggregate.validate)


def _every_read_op(cls: type[Any]) -> None:
    """Give ``cls`` a read for each op of `READ_OPS` it does not declare (untyped for mypy
    until declared, but there: adding an op to the table is enough to have it here)."""
    for op in READ_OPS:
        if op not in cls.__dict__:
            method = getattr(Aggregate, op, None)
            assert method is not None, f"READ_OPS has {op!r}, engine.Aggregate no such method"
            setattr(cls, op, _Read(method))


_every_read_op(BoundTableAggregate)
