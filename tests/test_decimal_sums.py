"""Decimal sums are exact; one namespace never mixes float and Decimal sums.

A hypothesis state machine drives a real Store (tiny nodes, so splits, merges
and rebuilds are frequent) with int, float and Decimal sums and Decimal /
datetime keys, against an oracle that sums Decimals in an exact context —
totals and range sums, by value, by type and by exponent (a Decimal sum has as
many places as its most precise value, like SQL's sum of a numeric column).
Everything runs under a hostile decimal context (3 digits, rounding trapped):
the engine must neither use it nor set its flags. Then: the rejection of
mixed sums (before anything changes, so a caught error leaves a consistent
batch), the consumer's planning turning it into a dead letter, and stores
reopened and recovered after a SIGKILL keeping exact sums and typed keys.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from budget import examples, steps
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sortedcontainers import SortedList

from tally.engine import (
    Aggregate,
    Applier,
    InvalidArgument,
    Store,
    TableAggregate,
    decode_key,
    encode_key,
)
from tally.engine.aggregate import prepare_encoded_id
from tally.schemas import ChangeEvent

REPO = Path(__file__).resolve().parents[1]
ORACLE = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
E = encode_key


def hostile() -> decimal.Context:
    """A context in which any rounding raises: Decimal arithmetic done in it fails loudly."""
    return decimal.Context(
        prec=3, traps=[decimal.Inexact, decimal.Rounded, decimal.InvalidOperation]
    )


def exact_sum(values: list[Any]) -> Any:
    with decimal.localcontext(ORACLE):
        return sum(values)


def sum_of(agg: Aggregate, id_: Any) -> int | float | Decimal:
    """The stored sum_value of item ``id_``, which must be there."""
    item = agg.get(id_)
    assert item is not None, id_
    return item.sum_value


def check_sum(got: Any, values: list[Any]) -> None:
    """Ints: exact int. Any Decimal: exact Decimal with the oracle's exponent. Else float."""
    if any(type(v) is Decimal for v in values):
        expect = exact_sum(values)
        assert type(got) is Decimal, (got, expect)
        assert got == expect, (got, expect)
        assert got.as_tuple().exponent == expect.as_tuple().exponent, (got, expect)
    elif all(type(v) is int for v in values):
        assert type(got) is int and got == sum(values), (got, values)
    else:
        assert isinstance(got, float)
        scale = math.fsum(abs(v) for v in values)
        assert abs(got - math.fsum(values)) <= 1e-9 * scale + 1e-9, (got, values)


# ---------------------------------------------------------------------------
# The state machine

DECIMALS = [
    Decimal("0.01"),
    Decimal("12.10"),
    Decimal("-12.1"),
    Decimal("99999999999.99"),  # numeric(12,2)'s largest
    Decimal("-0.00"),
    Decimal("7"),
    Decimal("1E+3"),
    Decimal("1.000000000000000000000000000001"),  # 31 digits: the default context rounds it
    Decimal("123456789012345678901234567890.123"),
    Decimal("1E-20"),
]
decimal_sums = st.one_of(
    st.sampled_from(DECIMALS),
    st.integers(-(10**12), 10**12).map(lambda n: Decimal(f"{n}E-2")),
    st.builds(
        lambda c, e: Decimal(f"{c}E{e}"), st.integers(-(10**40), 10**40), st.integers(-30, 10)
    ),
)
other_sums = st.sampled_from([0, 1, -5, 2**53 + 1, 0.5, 0.1, -2.25])
KEYS = [
    1,
    Decimal("12.10"),
    Decimal("12.1000000000000000001"),
    12.1,
    Decimal("0.3"),
    dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    dt.datetime(2024, 1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))),  # the same instant
    dt.datetime(2024, 1, 1),
    dt.date(2024, 1, 1),
    "a",
]
BOUND_KEYS = [*KEYS, Decimal("12.1"), 12, dt.datetime(2023, 12, 31, tzinfo=dt.UTC), 0]
NAMESPACES = [None, "a", "b"]
IDS = list(range(30))


class DecimalSums(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tally-decimal-")
        self.ctx = hostile()
        self.saved_ctx = decimal.getcontext()
        decimal.setcontext(self.ctx)
        self.store = Store.open(self.dir, max_node_size=4, cache_nodes=16, checkpoint_changes=40)
        self.agg = self.store.aggregate("d")
        self.items: dict[bytes, tuple[bytes, bytes, Any]] = {}  # eid -> (ens, ek, sum)
        self.trees: dict[bytes, SortedList] = {}

    def teardown(self) -> None:
        decimal.setcontext(self.saved_ctx)
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- oracle --

    def _holds(self, ens: bytes, t: type) -> bool:
        return any(self.items[eid][2].__class__ is t for _, eid in self.trees.get(ens, ()))

    def _conflicts(self, ens: bytes, value: Any) -> bool:
        t = type(value)
        if t is float:
            return self._holds(ens, Decimal)
        return t is Decimal and self._holds(ens, float)

    def _put(self, eid: bytes, ens: bytes, ek: bytes, s: Any) -> None:
        self._remove(eid)
        self.items[eid] = (ens, ek, s)
        self.trees.setdefault(ens, SortedList()).add((ek, eid))

    def _remove(self, eid: bytes) -> None:
        old = self.items.pop(eid, None)
        if old is not None:
            self.trees[old[0]].remove((old[1], eid))

    # -- rules --

    @rule(
        key=st.sampled_from(KEYS),
        id=st.sampled_from(IDS),
        s=st.one_of(decimal_sums, decimal_sums, other_sums),
        ns=st.sampled_from(NAMESPACES),
    )
    def upsert(self, key: Any, id: int, s: Any, ns: Any) -> None:
        eid, ens = E(id), E(ns)
        if self._conflicts(ens, s):
            with pytest.raises(InvalidArgument, match=r"Decimal\(str\(x\)\) or float\(x\)"):
                self.agg.upsert(key, id, s, ns)
            return
        self.agg.upsert(key, id, s, ns)
        self._put(eid, ens, E(key), s)

    @rule(id=st.sampled_from(IDS))
    def delete(self, id: int) -> None:
        self.agg.delete_if_exists(id)
        self._remove(E(id))

    @rule(
        ops=st.lists(
            st.tuples(
                st.sampled_from(IDS),
                st.one_of(
                    st.none(),
                    st.tuples(
                        st.sampled_from(KEYS),
                        st.one_of(decimal_sums, other_sums),
                        st.sampled_from(NAMESPACES),
                    ),
                ),
            ),
            max_size=25,
        ),
        ratio=st.sampled_from([0.0, 0.25, 10.0]),
    )
    def apply_many(self, ops: list[tuple[int, Any]], ratio: float) -> None:
        """Bulk convergence (incremental or a bottom-up rebuild), inside a batch that goes on
        after a refused call: the refusal must have changed nothing."""
        changes = {}
        for id, new in ops:
            eid = E(id)
            changes[eid] = None if new is None else prepare_encoded_id(new[0], eid, new[1], new[2])
        types: dict[bytes, set[type]] = {}
        for p in changes.values():
            if p is not None and type(p.sum_value) is not int:
                types.setdefault(p.namespace, set()).add(type(p.sum_value))
        refused = any(
            len(ts) > 1 or self._conflicts(ens, 0.5 if float in ts else Decimal(1))
            for ens, ts in types.items()
        )
        with self.store.batch():
            if refused:
                with pytest.raises(InvalidArgument, match="floats and Decimals"):
                    self.agg.apply_many(changes, ratio)
            else:
                self.agg.apply_many(changes, ratio)
                for eid, p in changes.items():
                    if p is None:
                        self._remove(eid)
                    else:
                        self._put(eid, p.namespace, p.key, p.sum_value)
            self.agg.upsert("after", 999, 1)  # the batch goes on and commits
        self._put(E(999), E(None), E("after"), 1)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store.open(self.dir, max_node_size=4, cache_nodes=16, checkpoint_changes=40)
        self.agg = self.store.aggregate("d")

    @rule(
        ns=st.sampled_from(NAMESPACES),
        lo=st.one_of(st.none(), st.sampled_from(BOUND_KEYS)),
        hi=st.one_of(st.none(), st.sampled_from(BOUND_KEYS)),
    )
    def range_sum(self, ns: Any, lo: Any, hi: Any) -> None:
        ens = E(ns)
        bounds: dict[str, Any] = {}
        if lo is not None:
            bounds["lower"] = {"key": lo}
        if hi is not None:
            bounds["upper"] = {"key": hi, "inclusive": False}
        values = [
            self.items[eid][2]
            for ek, eid in self.trees.get(ens, ())
            if (lo is None or ek >= E(lo)) and (hi is None or ek < E(hi))
        ]
        check_sum(self.agg.sum(ns, bounds or None), values)

    @precondition(lambda self: bool(self.items))
    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        id_ = data.draw(st.sampled_from(sorted(decode_key(eid) for eid in self.items)))
        item = self.agg.get(id_)
        s = self.items[E(id_)][2]
        assert item is not None and type(item.sum_value) is type(s) and item.sum_value == s
        if type(s) is Decimal:
            assert str(item.sum_value) == str(s)  # the exponent is kept

    # -- invariants --

    @invariant()
    def totals_match(self) -> None:
        for ens in {*self.trees, *(E(n) for n in NAMESPACES)}:
            values = [self.items[eid][2] for _, eid in self.trees.get(ens, ())]
            check_sum(self.agg.sum(decode_key(ens)), values)

    @invariant()
    def valid(self) -> None:
        self.agg.validate()

    @invariant()
    def callers_context_untouched(self) -> None:
        assert decimal.getcontext() is self.ctx
        assert self.ctx.prec == 3
        assert not any(self.ctx.flags.values()), self.ctx.flags


TestDecimalSums = DecimalSums.TestCase
TestDecimalSums.settings = settings(
    max_examples=examples(60),
    stateful_step_count=steps(40),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------
# Exactness, stated plainly


def test_numeric_12_2_column_sums_exactly_to_sqls_sum(tmp_path: Path) -> None:
    """20,000 cents values: the total and every range sum equal the exact sum, with 2 places;
    the same values as floats drift (the issue's 261016261.4700203 vs 261016261.47)."""
    import random

    rnd = random.Random(12)
    amounts = [Decimal(f"{rnd.randrange(10**10)}E-2") for _ in range(20_000)]
    with Store.open(tmp_path / "s", max_node_size=16) as store:
        agg = store.aggregate("amounts")
        with store.batch():
            for i, a in enumerate(amounts):
                agg.insert(a, i, a)
        total = agg.sum()
        assert total == exact_sum(amounts) and str(total) == str(exact_sum(amounts))
        assert isinstance(total, Decimal)
        assert total.as_tuple().exponent == -2
        lo, hi = sorted(amounts)[5000], sorted(amounts)[15000]
        inside = [a for a in amounts if lo <= a < hi]
        got = agg.sum(bounds={"lower": {"key": lo}, "upper": {"key": hi, "inclusive": False}})
        assert got == exact_sum(inside)
        assert agg.count(bounds={"eq": lo}) == amounts.count(lo)
        floats = store.aggregate("floats")
        with store.batch():
            for i, a in enumerate(amounts):
                floats.insert(float(a), i, float(a))
        assert Decimal(floats.sum()) != total  # what exactness buys


def test_default_context_would_round_these_and_the_engine_does_not(tmp_path: Path) -> None:
    big = Decimal("123456789012345678901234567890.12")  # 32 digits: more than prec=28
    with Store.open(tmp_path / "s") as store:
        agg = store.aggregate("a")
        agg.insert(1, 1, big)
        agg.insert(2, 2, Decimal("0.01"))
        assert agg.sum() == Decimal("123456789012345678901234567890.13")


# ---------------------------------------------------------------------------
# Mixing float and Decimal sums


def test_mixed_sums_are_refused_before_anything_changes(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", max_node_size=4) as store:
        agg = store.aggregate("a")
        for i in range(20):
            agg.insert(i, i, Decimal("1.10"))
        with store.batch():
            with pytest.raises(InvalidArgument) as exc_info:
                agg.insert(100, 100, 2.5)
            msg = str(exc_info.value)
            assert "float" in msg and "Decimal(str(x)) or float(x)" in msg and "'a'" in msg
            with pytest.raises(InvalidArgument):
                agg.upsert(3, 3, 2.5)  # replacing an item: refused before it is taken out
            with pytest.raises(InvalidArgument):
                agg.replace(3, 3, 2.5)
            agg.insert(50, 50, 7)  # ints mix with either; the batch goes on
        agg.validate()
        assert agg.sum() == Decimal("29.00")
        assert sum_of(agg, 3) == Decimal("1.10")
        assert agg.get(100) is None
        agg.insert(1, 101, 2.5, namespace="other")  # another namespace, another type
        for i in range(20):
            agg.delete(i)
        agg.insert(0, 102, 0.25)  # no Decimal left: floats are welcome
        assert agg.sum() == 7.25
        with pytest.raises(InvalidArgument, match="a Decimal sum_value cannot join"):
            agg.insert(0, 103, Decimal(1))
        agg.validate()


def test_apply_many_refuses_a_batch_mixing_types_and_changes_nothing(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", max_node_size=4) as store:
        agg = store.aggregate("a")
        agg.insert(0, 0, 1.5)
        mixed = {
            E(i): prepare_encoded_id(i, E(i), Decimal(i) if i % 2 else float(i), None)
            for i in range(1, 9)
        }
        with store.batch():
            with pytest.raises(InvalidArgument, match="in one batch"):
                agg.apply_many(mixed)
            decimals = {E(i): prepare_encoded_id(i, E(i), Decimal(i), None) for i in range(1, 9)}
            with pytest.raises(InvalidArgument, match="a Decimal sum_value cannot join"):
                agg.apply_many(decimals, rebuild_ratio=0.0)  # against the stored float
        agg.validate()
        assert agg.count() == 1 and agg.sum() == 1.5


def test_a_decimal_with_another_exponent_is_a_change(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        agg = store.aggregate("a")
        agg.insert(1, 1, Decimal("1.0"))
        assert agg.upsert(1, 1, Decimal("1.0")) is False
        assert agg.upsert(1, 1, Decimal("1.00")) is True
        assert str(sum_of(agg, 1)) == "1.00"
        assert agg.upsert(1, 1, 1) is True and type(sum_of(agg, 1)) is int
        assert agg.upsert(1, 1, Decimal(1)) is True and type(sum_of(agg, 1)) is Decimal


@pytest.mark.parametrize(
    "bad",
    [Decimal("NaN"), Decimal("Infinity"), Decimal("1E+131072"), Decimal("1E-16384")],
    ids=["nan", "inf", "too-big", "too-precise"],
)
def test_bad_decimal_sums_are_refused(tmp_path: Path, bad: Decimal) -> None:
    with Store.open(tmp_path / "s") as store, pytest.raises(InvalidArgument, match="sum_value"):
        store.aggregate("a").insert(1, 1, bad)


def test_planning_dead_letters_the_event_that_would_mix_types(tmp_path: Path) -> None:
    """The consumer plans a batch before applying it: an event whose sum would mix types with
    the stored namespace, or with an earlier event of the batch, becomes a bad record."""
    agg = TableAggregate("t", table="t", sort_key="k", sum_value="v", namespace="ns")
    with Store.open(tmp_path / "s") as store:
        applier = Applier(store, [agg])

        def ev(i: int, v: Any, ns: str = "a") -> ChangeEvent:
            return ChangeEvent("t", "upsert", i, {"id": i, "k": i, "v": v, "ns": ns}, op="c")

        _, bad = applier.apply_events([ev(1, Decimal("1.10")), ev(2, 2.5), ev(3, 2.5, "b")])
        assert [i for i, _ in bad] == [1]
        assert bad[0][1].reason == "apply" and "Decimal(str(x)) or float(x)" in str(bad[0][1])
        _, bad = applier.apply_events(
            [ev(4, 0.5), ev(5, Decimal("2.20")), ev(6, Decimal("0.5"), "b")]
        )
        assert [i for i, _ in bad] == [0, 2]  # the stored namespaces' types
        a = store.aggregate("t")
        assert a.sum("a") == Decimal("3.30") and a.sum("b") == 2.5
        assert a.get(2) is None and a.get(4) is None
        a.validate()


# ---------------------------------------------------------------------------
# Storage: reopen, crash recovery, compatibility


CHILD = textwrap.dedent(
    """
    import datetime as dt, os, signal, sys
    from decimal import Decimal
    from tally.engine import Store
    store = Store.open(sys.argv[1], max_node_size=4, checkpoint_changes=10**9)
    agg = store.aggregate("a")
    for b in range(30):
        with store.batch():
            for i in range(b * 10, b * 10 + 10):
                key = (dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
                       + dt.timedelta(minutes=i), Decimal(i) / 8 + Decimal("0.1"))
                value = Decimal(i).scaleb(-2) + Decimal("1E+20")
                agg.upsert(key, i, value, "ns" if i % 3 else None)
        if b == 14:
            store.checkpoint()  # half in nodes, half only in the log
    print("committed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkilled_store_recovers_exact_sums_and_typed_keys(tmp_path: Path) -> None:
    path = tmp_path / "s"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "committed" in proc.stdout
    values = {i: Decimal(i).scaleb(-2) + Decimal("1E+20") for i in range(300)}
    with Store.open(path, max_node_size=4) as store:
        agg = store.aggregate("a")
        agg.validate()
        assert agg.count(None) + agg.count("ns") == 300
        ns_sum = agg.sum("ns")
        expect = exact_sum([v for i, v in values.items() if i % 3])
        assert ns_sum == expect and str(ns_sum) == str(expect)
        item = agg.get(7)
        assert item is not None and item.sum_value == values[7]
        t, k = item.key
        assert t == dt.datetime(2024, 1, 1, 0, 7, tzinfo=dt.UTC) and t.tzinfo is dt.UTC
        assert k == Decimal(7) / 8 + Decimal("0.1") and type(k) is Decimal  # 0.975
        first = agg.min("ns")
        assert first is not None and first.id == 1
