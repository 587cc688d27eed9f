"""Diff-and-patch repair: compare a source of truth with an aggregate's id index.

The source is an iterator of ``(encoded id, row)`` pairs **sorted by encoded
id** (`tally.engine.encode_key` order: numbers numerically, strings by code point,
tuples element-wise) with each id at most once. `diff` walks it and the
aggregate's id index (also in encoded-id order) in ONE streaming merge, so
memory stays bounded by the number of examples kept (and, with a patch sink,
by the patch batch size), never by the size of the aggregate or the source.

Every id falls in one class:

* **missing** — the source has a row that maps to an item, the aggregate has
  no item for that id;
* **extra** — the aggregate has an item whose id the source lacks, or whose
  source row the definition's ``filter`` keeps out (a filtered row is absent);
* **wrong** — both have it but namespace, key or sum differ. Sums compare by
  value (``5 == 5.0``): a source that types a column differently from the
  change events does not make every item "wrong".

The expected item of a row is computed exactly like the consumer does
(`TableAggregate.item_tuple` then `prepare_encoded_id`), and a patch is
written through the consumer's write path (`Aggregate.apply_many`), so a
repaired aggregate is byte-for-byte what a replay would have built.

An out-of-order or duplicated source id raises `SourceOrderError` at once
(rather than reporting nonsense): the caller must sort by encoded id.

No Kafka, HTTP or Postgres here: sources live in ``tally.consumers.reconcile.sources``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import msgspec

from .aggregate import Prepared, prepare_encoded_id
from .btree import Sum
from .errors import InvalidArgument, TallyError
from .keys import decode_key, encode_key, key_repr
from .state import IdEntry

if TYPE_CHECKING:
    from .aggregate import Aggregate
    from .table import TableAggregate

__all__ = [
    "CLASSES",
    "Example",
    "Patcher",
    "Report",
    "SourceOrderError",
    "decode_fixes",
    "diff",
    "encode_fixes",
    "keyed",
    "patch",
    "reconcile",
]

CLASSES = ("missing", "extra", "wrong")

Change = tuple[bytes, Prepared | None]
"""One fix: encoded id → the item it must be (None: absent)."""


class SourceOrderError(InvalidArgument):
    """The source did not yield strictly increasing encoded ids."""


class Example(msgspec.Struct, kw_only=True):
    """One difference: ``expected`` (from the source) vs ``actual`` (in the aggregate).

    Each side is ``{"namespace": ..., "key": ..., "sum": ...}`` or None (absent).
    """

    id: Any
    expected: dict[str, Any] | None
    actual: dict[str, Any] | None


class Report(msgspec.Struct, kw_only=True):
    """Outcome of a `diff` (and of a patch, if one was applied)."""

    aggregate: str
    physical: str
    rows_scanned: int = 0
    """Rows read from the source."""
    rows_filtered: int = 0
    """Source rows the definition's filter keeps out (they count as absent)."""
    items_scanned: int = 0
    """Entries read from the aggregate's id index."""
    missing: int = 0
    extra: int = 0
    wrong: int = 0
    examples: dict[str, list[Example]] = msgspec.field(
        default_factory=lambda: {c: [] for c in CLASSES}
    )
    """The first N differences of each class, in id order."""
    patched: int | None = None
    """Ids the patch changed (None: dry run)."""
    skipped_live: int | None = None
    """Live patch only: fixes not applied because a live event wrote the id after the
    reconcile began (the live stream is authoritative for those ids)."""
    unplaced: int | None = None
    """Patch of a deployment only: fixes of missing rows left out because the partition their
    events would land in is not known (`tally.consumers.cluster.reconcile`)."""
    elapsed_s: float = 0.0

    @property
    def differences(self) -> int:
        return self.missing + self.extra + self.wrong

    @property
    def in_sync(self) -> bool:
        return self.differences == 0


def keyed(
    definition: TableAggregate, rows: Iterable[Mapping[str, Any]]
) -> Iterator[tuple[bytes, Mapping[str, Any]]]:
    """``(encode_key(row id), row)`` for rows in any order that already follows encoded-id order."""
    row_id = definition.row_id
    for row in rows:
        yield encode_key(row_id(row)), row


def _side(ns: bytes, key: bytes, s: Sum) -> dict[str, Any]:
    return {"namespace": decode_key(ns), "key": decode_key(key), "sum": s}


def _expected(definition: TableAggregate, eid: bytes, row: Mapping[str, Any]) -> Prepared | None:
    try:
        it = definition.item_tuple(row)
        if it is None:
            return None
        return prepare_encoded_id(it[1], eid, it[2], it[0])
    except TallyError as e:
        raise InvalidArgument(
            f"source row with id {key_repr(decode_key(eid))} does not map to an item: {e}"
        ) from e
    except Exception as e:  # user code in sort_key / filter / ...
        raise InvalidArgument(
            f"source row with id {key_repr(decode_key(eid))}: the definition raised {type(e).__name__}: {e}"
        ) from e


def diff(
    aggregate: Aggregate,
    definition: TableAggregate,
    source: Iterable[tuple[bytes, Mapping[str, Any]]],
    *,
    examples: int = 10,
    on_change: Callable[[bytes, Prepared | None], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    progress_every: int = 10_000,
) -> Report:
    """Compare ``source`` (sorted ``(encoded id, row)``) with ``aggregate``; one streaming merge.

    ``on_change(eid, item_or_None)`` is called for every difference, in id
    order, with the item the id must become (a `Patcher` applies them in
    batches). ``progress(rows, differences)`` is called every
    ``progress_every`` source rows and at the end. Nothing is written by
    `diff` itself.
    """
    t0 = time.perf_counter()
    rep = Report(aggregate=aggregate.name, physical=aggregate.physical)
    ex = rep.examples
    counts = {"missing": 0, "extra": 0, "wrong": 0}

    def note(cls: str, eid: bytes, exp: Prepared | None, act: IdEntry | None) -> None:
        counts[cls] += 1
        lst = ex[cls]
        if len(lst) < examples:
            lst.append(
                Example(
                    id=decode_key(eid),
                    expected=None if exp is None else _side(exp[2], exp[0], exp[3]),
                    actual=None if act is None else _side(act.ns, act.key, act.sum),
                )
            )
        if on_change is not None:
            on_change(eid, exp)

    idx = aggregate.id_entries()
    cur = next(idx, None)
    prev: bytes | None = None
    rows = filtered = items = 0
    for eid, row in source:
        if prev is not None and eid <= prev:
            what = "twice" if eid == prev else f"after {key_repr(decode_key(prev))}"
            raise SourceOrderError(
                f"source yields id {key_repr(decode_key(eid))} {what}: a reconcile source must be sorted "
                "by encoded id (numbers numerically, strings by code point) with unique ids"
            )
        prev = eid
        rows += 1
        # aggregate ids before this row's id are not in the source: extra
        while cur is not None and cur[0] < eid:
            items += 1
            note("extra", cur[0], None, cur[1])
            cur = next(idx, None)
        exp = _expected(definition, eid, row)
        if exp is None:
            filtered += 1
        if cur is not None and cur[0] == eid:
            items += 1
            act = cur[1]
            cur = next(idx, None)
            if exp is None:
                note("extra", eid, None, act)
            elif not (act.ns == exp[2] and act.key == exp[0] and act.sum == exp[3]):
                note("wrong", eid, exp, act)
        elif exp is not None:
            note("missing", eid, exp, None)
        if progress is not None and rows % progress_every == 0:
            progress(rows, counts["missing"] + counts["extra"] + counts["wrong"])
    while cur is not None:
        items += 1
        note("extra", cur[0], None, cur[1])
        cur = next(idx, None)
    rep.rows_scanned, rep.rows_filtered, rep.items_scanned = rows, filtered, items
    rep.missing, rep.extra, rep.wrong = counts["missing"], counts["extra"], counts["wrong"]
    if progress is not None:
        progress(rows, rep.differences)
    rep.elapsed_s = round(time.perf_counter() - t0, 3)
    return rep


def patch(aggregate: Aggregate, changes: Iterable[Change], batch_size: int = 10_000) -> int:
    """Apply fixes through the consumer's write path (`apply_many`), ``batch_size`` ids per commit.

    Returns the number of ids changed. Each batch is atomic; a crash between
    batches leaves a partly repaired aggregate that a new diff finishes.
    """
    p = Patcher(aggregate, batch_size)
    for eid, item in changes:
        p(eid, item)
    return p.close()


class Patcher:
    """A `diff` ``on_change`` sink that applies fixes in batches while the diff streams."""

    def __init__(self, aggregate: Aggregate, batch_size: int = 10_000) -> None:
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be at least 1, got {batch_size}")
        self.aggregate = aggregate
        self.batch_size = batch_size
        self.pending: dict[bytes, Prepared | None] = {}
        self.changed = 0

    def __call__(self, eid: bytes, item: Prepared | None) -> None:
        self.pending[eid] = item
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        store = self.aggregate.store
        with store.batch():
            self.changed += self.aggregate.apply_many(self.pending)
        self.pending = {}

    def close(self) -> int:
        self.flush()
        return self.changed


def reconcile(
    aggregate: Aggregate,
    definition: TableAggregate,
    source: Iterable[tuple[bytes, Mapping[str, Any]]],
    *,
    apply: bool = False,
    examples: int = 10,
    batch_size: int = 10_000,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """`diff`, and with ``apply=True`` patch every difference while streaming (``report.patched``)."""
    if not apply:
        return diff(aggregate, definition, source, examples=examples, progress=progress)
    p = Patcher(aggregate, batch_size)
    t0 = time.perf_counter()
    rep = diff(aggregate, definition, source, examples=examples, on_change=p, progress=progress)
    rep.patched = p.close()
    rep.elapsed_s = round(time.perf_counter() - t0, 3)
    return rep


# ---- fixes on the wire (live patching: `tally reconcile --patch --url`) ----

_enc = msgspec.msgpack.Encoder()


class _Chunk(msgspec.Struct):
    changes: list[list[Any]]


_chunk_dec = msgspec.msgpack.Decoder(_Chunk)


def encode_fixes(changes: Iterable[Change]) -> bytes:
    """msgpack ``{"changes": [[eid, key, namespace, sum] | [eid], ...]}`` (keys encoded)."""
    out: list[list[Any]] = []
    for eid, item in changes:
        out.append([eid] if item is None else [eid, item[0], item[2], item[3]])
    return _enc.encode({"changes": out})


def _canonical(raw: Any, what: str) -> Any:
    if not isinstance(raw, bytes):
        raise InvalidArgument(
            f"{what} must be msgpack bin (an encoded key), got {type(raw).__name__}"
        )
    value = decode_key(raw)  # raises InvalidKey on garbage
    if encode_key(value) != raw:
        raise InvalidArgument(f"{what} is not a canonical encoded key")
    return value


def decode_fixes(body: bytes) -> list[Change]:
    """Parse and validate a chunk: every key must be a canonical `encode_key` output."""
    try:
        chunk = _chunk_dec.decode(body)
    except msgspec.DecodeError as e:
        raise InvalidArgument(
            f"a patch chunk is msgpack {{'changes': [[eid, key, namespace, sum] | [eid]]}}: {e}"
        ) from None
    out: list[Change] = []
    for i, c in enumerate(chunk.changes):
        if len(c) == 1:
            _canonical(c[0], f"changes[{i}] id")
            out.append((c[0], None))
        elif len(c) == 4:
            eid = c[0]
            _canonical(eid, f"changes[{i}] id")
            key = _canonical(c[1], f"changes[{i}] key")
            ns = _canonical(c[2], f"changes[{i}] namespace")
            sv = c[3]
            if type(sv) is str:  # a Decimal sum travels as its digits
                try:
                    sv = Decimal(sv)
                except InvalidOperation:
                    raise InvalidArgument(f"changes[{i}] sum {sv!r} is not a Decimal") from None
            out.append((eid, prepare_encoded_id(key, eid, sv, ns)))
        else:
            raise InvalidArgument(
                f"changes[{i}] has {len(c)} elements: use [eid, key, namespace, sum] or [eid]"
            )
    return out
