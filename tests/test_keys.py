"""Property tests of the order-preserving key encoding (engine/keys.py).

The oracle below is written from the documented total order, independently of
the encoder::

    None < numbers < bool < str < bytes < tuple/list < date < datetime < time
         < timedelta < UUID

numbers (int, float, Decimal) compared exactly (fractions.Fraction; +-inf at
the ends), str by code point, bytes lexicographically, tuples element-wise with
a shorter prefix first; datetimes as instants (naive ones as UTC wall time), a
naive one just before an aware one of the same instant; aware times in UTC by
whole seconds of their offset (as Python compares them), naive first; dates,
timedeltas and UUIDs as Python orders them. Within each type the encoding is
also checked against Python's own comparison.
"""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
import math
import sys
import uuid
from decimal import Decimal
from fractions import Fraction
from typing import Any, cast

import pytest
from budget import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tally.engine import InvalidKey, TallyError, decode_key, encode_key
from tally.schemas.keys import key_for_id, murmur2, partition_for_id

# ---------------------------------------------------------------------------
# Oracle


def _type_rank(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, bool):
        return 2
    if isinstance(v, (int, float, Decimal)):
        return 1
    if isinstance(v, str):
        return 3
    if isinstance(v, bytes):
        return 4
    if isinstance(v, (tuple, list)):
        return 5
    if isinstance(v, dt.datetime):
        return 7
    if isinstance(v, dt.date):
        return 6
    if isinstance(v, dt.time):
        return 8
    if isinstance(v, dt.timedelta):
        return 9
    if isinstance(v, uuid.UUID):
        return 10
    raise AssertionError(f"oracle: unsupported value {v!r}")


def _num(v: int | float | Decimal) -> tuple[int, Fraction]:
    """(infinity rank, exact value): -inf < every finite number < +inf."""
    if (isinstance(v, Decimal) and v.is_infinite()) or (isinstance(v, float) and math.isinf(v)):
        return (1 if v > 0 else -1), Fraction(0)
    return 0, Fraction(v)


_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=dt.UTC)


def _instant(v: dt.datetime) -> tuple[dt.timedelta, bool]:
    """A datetime as (time since the epoch, aware): naive ones are UTC wall time."""
    if v.utcoffset() is None:
        return v - _EPOCH, False
    return v - _EPOCH_UTC, True


def _time_point(v: dt.time) -> tuple[int, bool]:
    """A time as (microseconds, aware); aware ones minus their offset's whole seconds."""
    us = ((v.hour * 60 + v.minute) * 60 + v.second) * 10**6 + v.microsecond
    off = v.utcoffset()
    if off is None:
        return us, False
    return us - (off.days * 86400 + off.seconds) * 10**6, True


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def cmp(a: Any, b: Any) -> int:
    """Three-way comparison in the documented total order."""
    ra, rb = _type_rank(a), _type_rank(b)
    if ra != rb:
        return _sign(ra - rb)
    if ra == 0:
        return 0
    if ra == 1:
        na, nb = _num(a), _num(b)
        return (na > nb) - (na < nb)
    if ra == 7:
        a, b = _instant(a), _instant(b)
    elif ra == 8:
        a, b = _time_point(a), _time_point(b)
    if ra != 5:  # keys of one rank: built-in values whose comparisons are bools
        return cast(int, (a > b) - (a < b))
    for x, y in zip(a, b, strict=False):
        c = cmp(x, y)
        if c:
            return c
    return _sign(len(a) - len(b))


def canonical(v: Any) -> Any:
    """What a key reads back as: lists -> tuples, integral numbers -> int, a Decimal -> the
    float equal to it if there is one, aware datetimes -> UTC."""
    if isinstance(v, Decimal) and v.is_finite():
        if v == v.to_integral_value():
            return int(v)
        if Fraction(float(v)) == Fraction(v):
            return float(v)
        return v
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    if isinstance(v, (tuple, list)):
        return tuple(canonical(x) for x in v)
    if isinstance(v, dt.datetime) and v.utcoffset() is not None:
        return v.astimezone(dt.UTC)
    return v


def same_value_and_type(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(
            same_value_and_type(x, y) for x, y in zip(a, b, strict=True)
        )
    if isinstance(a, float) and math.isnan(a):
        return False
    if isinstance(a, (dt.datetime, dt.time)):
        # An aware time outside the UTC day reads back with another offset: same instant.
        return (
            a == b
            and (a.utcoffset() is None) == (b.utcoffset() is None)
            and (isinstance(a, dt.time) or a.utcoffset() == b.utcoffset())
        )
    return cast(bool, a == b)  # same built-in type: == is a bool


# ---------------------------------------------------------------------------
# Strategies

_EDGE_INTS = [
    0,
    1,
    -1,
    2**53 - 1,
    2**53,
    2**53 + 1,
    -(2**53) - 1,
    2**63 - 1,
    2**63,
    -(2**63),
    2**64 + 1,
    2**1023,
    2**1024,
    2**1024 + 1,
    -(2**1024) - 1,
    2**2000,
    2**2000 + 1,
    -(2**2000),
    1023,
    1024,
    1025,
    127,
    128,
    255,
    256,
]
_EDGE_FLOATS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1.5,
    -1.5,
    float(2**53),
    float(2**53 + 2),
    -float(2**53),
    sys.float_info.max,
    -sys.float_info.max,
    sys.float_info.min,
    5e-324,
    -5e-324,
    2.2250738585072014e-308 / 3,
    math.inf,
    -math.inf,
    0.1,
    1 / 3,
    1e300,
    1e-300,
    1023.5,
    1024.0,
]

ints = st.one_of(
    st.integers(-5, 5),
    st.integers(-(2**70), 2**70),
    st.integers(-(2**2100), 2**2100),
    st.sampled_from(_EDGE_INTS),
    st.sampled_from(_EDGE_INTS).flatmap(lambda n: st.integers(n - 3, n + 3)),
)
floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=True),
    st.floats(
        allow_nan=False,
        allow_infinity=False,
        allow_subnormal=True,
        min_value=-1e-300,
        max_value=1e-300,
    ),
    st.sampled_from(_EDGE_FLOATS),
    st.integers(-(2**60), 2**60).map(float),
)


def _dec(coefficient: int, exponent: int) -> Decimal:
    return Decimal(f"{coefficient}E{exponent}")


def _dyadic(n: int, shift: int) -> Decimal:
    """n / 2**shift as an exact Decimal."""
    return _dec(n * 5**shift, -shift)


_EDGE_DECIMALS = [
    Decimal("12.10"),
    Decimal("12.1"),
    Decimal("-12.10"),
    Decimal("0.1"),
    Decimal("-0.1"),
    Decimal("0.30"),
    Decimal("1.00"),
    Decimal("-0"),
    Decimal("0E-9"),
    Decimal("1E+30"),
    Decimal("Infinity"),
    Decimal("-Infinity"),
    _dyadic(2**67 + 1, 67),  # 1 + 2**-67: dyadic, more bits than a float
    _dyadic(2**55 * 4 + 1, 2),  # 2**55 + 2**-2: one bit beyond N(55) = 56
    _dyadic(2**55 * 2 + 1, 1),  # 2**55 + 2**-1: exactly N(55) bits, written as a number
    _dyadic(2**56 * 2 + 1, 1),  # 2**56 + 2**-1: N(56) = 64
    Decimal(0.1),  # noqa: RUF032 -- the exact expansion of the float 0.1
    Decimal(2**53 + 1),
    Decimal(5e-324),  # noqa: RUF032
    Decimal("1E-16383"),
    Decimal("9" * 40 + "E+131032"),
]
decimals = st.one_of(
    st.sampled_from(_EDGE_DECIMALS),
    # numeric(12,2)-like
    st.integers(-(10**12), 10**12).map(lambda n: _dec(n, -2)),
    # various precisions and exponents
    st.builds(_dec, st.integers(-(10**30), 10**30), st.integers(-60, 60)),
    st.builds(_dec, st.integers(-(10**5), 10**5), st.integers(-400, 400)),
    # exact expansions of floats, and values next to them
    floats.filter(math.isfinite).map(Decimal),
    floats.filter(math.isfinite).flatmap(
        lambda f: st.sampled_from([-1, 1]).map(
            lambda d: Decimal(f) + d * _dec(1, Decimal(f).adjusted() - 60) if f else _dec(d, -60)
        )
    ),
    # dyadic values around N(e): integer part 2**a, fraction 2**-b
    st.builds(
        lambda a, b, neg: (-1 if neg else 1) * _dyadic(2**a * 2**b + 1, b),
        st.integers(0, 80),
        st.integers(1, 80),
        st.booleans(),
    ),
    ints.filter(lambda n: abs(n) < 10**1000).map(Decimal),
)
numbers = st.one_of(ints, floats)
all_numbers = st.one_of(ints, floats, decimals)

_offsets = st.one_of(
    st.just(dt.UTC),
    st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: dt.timezone(dt.timedelta(minutes=m))),
    st.timedeltas(
        min_value=dt.timedelta(hours=-23, minutes=59, seconds=59),
        max_value=dt.timedelta(hours=23, minutes=59, seconds=59),
    ).map(dt.timezone),
)
naive_datetimes = st.datetimes()
aware_datetimes = st.datetimes(
    min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31), timezones=_offsets
)
naive_times = st.times()
aware_times = st.times(timezones=_offsets)
_INSTANT = dt.datetime(2024, 3, 1, 12, 0)
typed = st.one_of(
    naive_datetimes,
    aware_datetimes,
    # equal instants with different offsets, and naive/aware twins
    _offsets.map(lambda tz: (_INSTANT.replace(tzinfo=dt.UTC)).astimezone(tz)),
    st.just(_INSTANT),
    st.dates(),
    naive_times,
    aware_times,
    st.timedeltas(),
    st.uuids(),
    st.sampled_from([uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), dt.timedelta(0), dt.time(0)]),
)
_chars = st.one_of(
    st.characters(),
    st.sampled_from(["\x00", "\x01", "\xff", "\u0100", "\uffff", "\U0010ffff", "a", "b"]),
    st.integers(0xD800, 0xDFFF).map(chr),  # lone surrogates: still ordered by code point
)
texts = st.text(_chars, max_size=8)
byte_strings = st.one_of(
    st.binary(max_size=8),
    st.lists(st.sampled_from([b"\x00", b"\x01", b"\xff", b"\xfe", b"a"]), max_size=5).map(b"".join),
)
scalars = st.one_of(st.none(), numbers, decimals, st.booleans(), texts, byte_strings, typed)
keys = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(tuple),
        st.lists(inner, max_size=4),
    ),
    max_leaves=10,
)
# Values drawn from a small pool so that equal and nearly-equal pairs are common.
_POOL = [
    None,
    0,
    -0.0,
    1,
    1.0,
    1.5,
    -1,
    2**53,
    float(2**53),
    2**53 + 1,
    math.inf,
    -math.inf,
    False,
    True,
    "",
    "a",
    "a\x00",
    "ab",
    b"",
    b"\x00",
    b"a",
    (),
    (1,),
    [1.0],
    (1, 2),
    (1, None),
    ((),),
    ("a", b"a"),
    Decimal("1.0"),
    Decimal("1.5"),
    Decimal("1.1"),
    Decimal("1.10"),
    Decimal("-0.0"),
    _INSTANT,
    _INSTANT.replace(tzinfo=dt.UTC),
    _INSTANT.replace(tzinfo=dt.timezone(dt.timedelta(hours=1))),
    _INSTANT.replace(tzinfo=dt.UTC).astimezone(dt.timezone(dt.timedelta(hours=-5))),
    _INSTANT.date(),
    dt.time(12),
    dt.time(12, tzinfo=dt.UTC),
    dt.time(13, tzinfo=dt.timezone(dt.timedelta(hours=1))),
    dt.timedelta(hours=12),
    uuid.UUID(int=12),
]
pool_keys = st.recursive(
    st.sampled_from(_POOL),
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=5,
)
any_key = st.one_of(keys, pool_keys)


# ---------------------------------------------------------------------------
# Order


def _check_pair(a: Any, b: Any) -> None:
    ea, eb = encode_key(a), encode_key(b)
    assert isinstance(ea, bytes) and isinstance(eb, bytes)
    c = cmp(a, b)
    assert (ea < eb) == (c < 0), (a, b, ea, eb)
    assert (ea == eb) == (c == 0), (a, b, ea, eb)
    assert (ea > eb) == (c > 0), (a, b, ea, eb)


@settings(max_examples=examples(1500), deadline=None)
@given(any_key, any_key)
@example(2**53 + 1, float(2**53))
@example(float(2**53), 2**53 + 1)
@example(2**53, float(2**53))
@example(-0.0, 0.0)
@example(-0.0, 0)
@example(1, 1.0)
@example(2**2000, math.inf)
@example(-(2**2000), -math.inf)
@example(2**1024, sys.float_info.max)
@example(5e-324, 0)
@example(-5e-324, 0)
@example(5e-324, 1e-323)
@example(1, True)
@example(0, False)
@example(False, True)
@example(math.inf, False)
@example(None, -math.inf)
@example("", b"")
@example("\uffff", "\U00010000")
@example("a", "a\x00")
@example(b"a", b"a\x00")
@example(b"\xff", ())
@example((), (None,))
@example((1,), (1, None))
@example((1, 2), [1, 2])
@example((1.5,), (1.5, 0))
@example((b"a\x00",), (b"a",))
def test_encoding_order_matches_oracle(a: Any, b: Any) -> None:
    _check_pair(a, b)


@settings(max_examples=examples(1000), deadline=None)
@given(numbers, numbers)
def test_number_order_is_exact(a: int | float, b: int | float) -> None:
    _check_pair(a, b)


@settings(max_examples=examples(500), deadline=None)
@given(st.lists(any_key, min_size=2, max_size=12))
def test_sorting_by_encoding_sorts_by_oracle(values: list[Any]) -> None:
    by_encoding = sorted(values, key=encode_key)
    for x, y in itertools.pairwise(by_encoding):
        assert cmp(x, y) <= 0, (x, y)


def test_documented_type_order() -> None:
    chain = [
        None,
        -math.inf,
        -(2**2000),
        -1,
        -0.5,
        0,
        5e-324,
        1,
        2**53 + 1,
        2**2000,
        math.inf,
        False,
        True,
        "",
        "a",
        "\U0010ffff",
        b"",
        b"\x00",
        b"\xff",
        (),
        (None,),
        (1,),
        (1, 2),
        (2,),
        dt.date(1, 1, 1),
        dt.date(9999, 12, 31),
        dt.datetime(1, 1, 1),
        dt.datetime(2024, 1, 1),
        dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        dt.datetime(2024, 1, 1, 0, 0, 0, 1),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999),
        dt.time(0),
        dt.time(0, tzinfo=dt.UTC),
        dt.time(23, 59, 59, 999999),
        dt.timedelta.min,
        dt.timedelta(0),
        dt.timedelta.max,
        uuid.UUID(int=0),
        uuid.UUID(int=2**128 - 1),
    ]
    encs = [encode_key(v) for v in chain]
    assert encs == sorted(encs)
    assert len(set(encs)) == len(encs)


def test_big_ints_versus_floats() -> None:
    assert encode_key(2**53 + 1) > encode_key(float(2**53))
    assert encode_key(2**53 + 1) < encode_key(float(2**53 + 2))
    assert encode_key(2**53) == encode_key(float(2**53))
    assert encode_key(-(2**53) - 1) < encode_key(-float(2**53))
    assert encode_key(2**1024) > encode_key(sys.float_info.max)
    assert encode_key(2**2000) < encode_key(math.inf)
    assert encode_key(-(2**2000)) > encode_key(-math.inf)
    assert encode_key(10**400) < encode_key(10**400 + 1)


def test_negative_zero_equals_zero() -> None:
    assert encode_key(-0.0) == encode_key(0.0) == encode_key(0)
    assert encode_key((-0.0, "x")) == encode_key((0, "x"))


def test_subnormals_are_ordered() -> None:
    tiny = [
        -sys.float_info.min,
        -5e-324,
        0.0,
        5e-324,
        1e-323,
        2.2250738585072014e-308 / 3,
        sys.float_info.min,
    ]
    encs = [encode_key(v) for v in tiny]
    assert encs == sorted(encs)
    assert len(set(encs)) == len(encs)
    for v in tiny:
        assert decode_key(encode_key(v)) == v


# ---------------------------------------------------------------------------
# Prefix-freedom: encode(a) + encode(x) orders like the pair (a, x)


@settings(max_examples=examples(1500), deadline=None)
@given(any_key, any_key, any_key, any_key)
@example("a", "b", "a\x00", "a")
@example(b"a", b"\xff", b"a\x00", b"")
@example(1, 2, 1.5, 0)
@example((1,), 2, (1, 2), None)
@example((), 5, (None,), 0)
@example(1.5, "z", 1.5000000000000002, None)
@example(-1.5, "z", -1.5000000000000002, None)
@example(-1, (), -1.0, None)
def test_concatenation_orders_like_pairs(a: Any, x: Any, b: Any, y: Any) -> None:
    left = encode_key(a) + encode_key(x)
    right = encode_key(b) + encode_key(y)
    c = cmp(a, b) or cmp(x, y)
    assert (left < right) == (c < 0), (a, x, b, y)
    assert (left == right) == (c == 0), (a, x, b, y)


@settings(max_examples=examples(500), deadline=None)
@given(any_key, any_key)
def test_no_encoding_is_a_proper_prefix_of_another(a: Any, b: Any) -> None:
    ea, eb = encode_key(a), encode_key(b)
    if ea != eb:
        assert not eb.startswith(ea)
        assert not ea.startswith(eb)


# ---------------------------------------------------------------------------
# Round trip


@settings(max_examples=examples(1500), deadline=None)
@given(any_key)
@example(1.0)
@example(-0.0)
@example([1, [2.0, "x"]])
@example(2**2000)
@example(-(2**2000) - 1)
@example(5e-324)
@example(-5e-324)
@example(math.inf)
@example(-math.inf)
@example(-1.5)
@example(-(2**53) - 1)
@example(sys.float_info.max)
@example(-sys.float_info.max)
@example(b"\x00\xff\x00")
@example("\x00\x01")
@example("\ud800")
def test_decode_inverts_encode(v: Any) -> None:
    enc = encode_key(v)
    back = decode_key(enc)
    assert cmp(back, v) == 0
    assert same_value_and_type(back, canonical(v)), (v, back)
    assert encode_key(back) == enc


@settings(max_examples=examples(500), deadline=None)
@given(st.lists(any_key, max_size=4))
def test_decode_of_lists_gives_tuples(v: list[Any]) -> None:
    back = decode_key(encode_key(v))
    assert type(back) is tuple
    assert same_value_and_type(back, canonical(v))


def test_integral_floats_read_back_as_int() -> None:
    assert type(decode_key(encode_key(1.0))) is int
    assert decode_key(encode_key(1.0)) == 1
    assert type(decode_key(encode_key(-0.0))) is int
    assert decode_key(encode_key(float(2**60))) == 2**60
    assert type(decode_key(encode_key(1.5))) is float
    assert type(decode_key(encode_key(math.inf))) is float


# ---------------------------------------------------------------------------
# Rejected values


@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        (1, float("nan")),
        [float("nan")],
        ("a", (2, float("nan"))),
        Decimal("NaN"),
        Decimal("-sNaN"),
        (1, Decimal("NaN")),
    ],
    ids=["nan", "nan-in-tuple", "nan-in-list", "nan-nested", "decimal", "snan", "decimal-in-tuple"],
)
def test_nan_is_rejected(bad: Any) -> None:
    with pytest.raises(InvalidKey, match="NaN") as exc_info:
        encode_key(bad)
    assert isinstance(exc_info.value, TallyError)


@pytest.mark.parametrize(
    "bad",
    [{"a": 1}, {1, 2}, object(), frozenset([3]), 1j, Fraction(1, 3)],
    ids=["dict", "set", "object", "frozenset", "complex", "fraction"],
)
@pytest.mark.parametrize("nest", ["bare", "in-tuple", "in-list", "deep"])
def test_unsupported_types_are_rejected_naming_the_value(bad: Any, nest: str) -> None:
    value = {
        "bare": bad,
        "in-tuple": (1, bad),
        "in-list": ["x", bad],
        "deep": (1, ("a", [bad])),
    }[nest]
    with pytest.raises(InvalidKey) as exc_info:
        encode_key(value)
    assert isinstance(exc_info.value, TallyError)
    assert repr(bad) in str(exc_info.value)


@settings(max_examples=examples(200), deadline=None)
@given(any_key, st.sampled_from([float("nan"), {"k": 1}, {1}]))
def test_bad_value_anywhere_in_a_tuple_is_rejected(good: Any, bad: Any) -> None:
    with pytest.raises(InvalidKey):
        encode_key((good, bad))
    with pytest.raises(InvalidKey):
        encode_key([bad, good])


# ---------------------------------------------------------------------------
# Nesting depth (MAX_KEY_DEPTH)


def _nested(depth: int, kind: type = tuple) -> Any:
    """``1`` inside ``depth`` tuples (or lists), built without recursion."""
    v: Any = 1
    for level in range(depth):
        v = kind([v, level])
    return v


@pytest.mark.parametrize("kind", [tuple, list])
def test_keys_nested_up_to_max_depth_round_trip(kind: type) -> None:
    from tally.engine import MAX_KEY_DEPTH

    deepest = _nested(MAX_KEY_DEPTH, kind)
    assert decode_key(encode_key(deepest)) == _nested(MAX_KEY_DEPTH, tuple)
    # depth is the deepest branch, not the number of tuples: siblings add nothing
    wide = kind([_nested(MAX_KEY_DEPTH - 1, kind)] * 50)
    assert decode_key(encode_key(wide)) == tuple([_nested(MAX_KEY_DEPTH - 1, tuple)] * 50)


@pytest.mark.parametrize("depth", [33, 980, 5000])
@pytest.mark.parametrize("kind", [tuple, list])
def test_keys_nested_deeper_than_max_depth_are_rejected_clearly(depth: int, kind: type) -> None:
    from tally.engine import MAX_KEY_DEPTH

    assert MAX_KEY_DEPTH == 32
    value = _nested(depth, kind)
    with pytest.raises(InvalidKey, match=r"more than 32 levels deep .*flatten") as exc_info:
        encode_key(value)
    assert isinstance(exc_info.value, TallyError)
    with pytest.raises(InvalidKey, match="more than 32 levels deep"):
        encode_key(("ok", value))  # inside a composite key too
    wide = kind([_nested(MAX_KEY_DEPTH - 1, kind), _nested(MAX_KEY_DEPTH, kind)])
    with pytest.raises(InvalidKey, match="more than 32 levels deep"):
        encode_key(wide)  # one branch one level too deep


def test_forged_deep_encodings_are_corrupt_not_a_recursion_error() -> None:
    forged = b"\x0a" * 5000 + b"\x02" + b"\x01" * 5000  # encode_key never writes this
    with pytest.raises(InvalidKey, match="corrupt key encoding: tuples nested far deeper than 32"):
        decode_key(forged)
    from tally.engine.keys import decode_keys

    with pytest.raises(InvalidKey, match="corrupt key encoding"):
        decode_keys(forged, 0)


# Decimals: one number line with ints and floats


@settings(max_examples=examples(3000), deadline=None)
@given(all_numbers, all_numbers)
@example(Decimal("12.10"), 12.1)
@example(Decimal("0.1"), 0.1)
@example(Decimal(0.1), 0.1)  # noqa: RUF032
@example(Decimal("12.10"), Decimal("12.1"))
@example(_dyadic(2**67 + 1, 67), 1.0)
@example(_dyadic(2**67 + 1, 67), 1.0000000000000002)
@example(_dyadic(2**55 * 4 + 1, 2), 2**55)
@example(_dyadic(2**55 * 4 + 1, 2), _dyadic(2**55 * 2 + 1, 1))
@example(Decimal("Infinity"), math.inf)
@example(Decimal("-0"), -0.0)
@example(Decimal("1E+400"), 10**400)
@example(Decimal("1E+400") + 1, 10**400)
def test_numbers_order_like_python_across_int_float_decimal(a: Any, b: Any) -> None:
    """Python compares int, float and Decimal exactly: the encodings agree, and equal numbers
    are one key (the same bytes) whatever their types."""
    ea, eb = encode_key(a), encode_key(b)
    assert (ea < eb) == (a < b), (a, b)
    assert (ea == eb) == (a == b), (a, b)
    assert not ea.startswith(eb) or ea == eb  # prefix-free


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(all_numbers, min_size=2, max_size=20))
def test_sorting_numbers_by_encoding_is_python_sort(values: list[Any]) -> None:
    by_python = sorted(values)
    by_encoding = sorted(values, key=encode_key)
    assert all(x == y for x, y in zip(by_python, by_encoding, strict=True))


@settings(max_examples=examples(1000), deadline=None)
@given(st.one_of(ints, floats.filter(math.isfinite)))
def test_a_decimal_equal_to_an_int_or_float_has_its_bytes(x: int | float) -> None:
    assert encode_key(Decimal(x)) == encode_key(x)
    assert encode_key(Decimal(-x)) == encode_key(-x)


@settings(max_examples=examples(1000), deadline=None)
@given(decimals)
def test_decimal_reads_back_as_int_float_or_exact_decimal(d: Decimal) -> None:
    back = decode_key(encode_key(d))
    assert back == d
    if d.is_finite() and d == d.to_integral_value():
        assert type(back) is int
    elif d.is_infinite() or Fraction(float(d)) == Fraction(d):
        assert type(back) is float
    else:
        assert type(back) is Decimal
        assert back.as_tuple().digits[-1] != 0  # no trailing zeros: one spelling per value


def test_decimal_readback_examples() -> None:
    assert repr(decode_key(encode_key(Decimal("12.10")))) == "Decimal('12.1')"
    assert decode_key(encode_key(Decimal("12.50"))) == 12.5
    assert type(decode_key(encode_key(Decimal("12.50")))) is float
    assert decode_key(encode_key(Decimal("7.00"))) == 7
    assert type(decode_key(encode_key(Decimal("7.00")))) is int
    assert decode_key(encode_key(Decimal("-0.00"))) == 0
    one_plus = _dyadic(2**67 + 1, 67)
    assert decode_key(encode_key(one_plus)) == one_plus
    assert decode_key(encode_key(-one_plus)) == -one_plus
    assert decode_key(encode_key((Decimal("0.30"), "x"))) == (Decimal("0.3"), "x")
    assert decode_key(encode_key(Decimal("-Infinity"))) == -math.inf


def test_decimal_keys_ignore_and_keep_the_callers_context() -> None:
    """A 3-digit context that traps rounding would make any Decimal arithmetic in it fail or
    round: the codec does none, and leaves the context's flags as they were."""
    long = Decimal("1234567890.123456789012345678901234567890")
    with decimal.localcontext() as ctx:
        ctx.prec = 3
        ctx.traps[decimal.Inexact] = True
        ctx.traps[decimal.Rounded] = True
        ctx.clear_flags()
        one_plus = _dyadic(2**67 + 1, 67)
        for v in (long, long.copy_negate(), one_plus, one_plus.copy_negate()):
            assert decode_key(encode_key(v)) == v
        assert encode_key(long) < encode_key(long.next_plus(decimal.Context(prec=60)))
        assert not any(ctx.flags.values())


@pytest.mark.parametrize(
    "bad",
    [
        Decimal("1E+131072"),
        Decimal("1E-16384"),
        Decimal("1.5E-16383"),
        (1, Decimal("1E+999999999")),
    ],
    ids=["too-big", "too-small", "too-many-places", "in-tuple"],
)
def test_decimal_beyond_numeric_range_is_rejected(bad: Any) -> None:
    with pytest.raises(InvalidKey, match="out of range: it has more than"):
        encode_key(bad)


# ---------------------------------------------------------------------------
# Dates, datetimes, times, timedeltas, UUIDs


def _native_pair(a: Any, b: Any) -> None:
    ea, eb = encode_key(a), encode_key(b)
    assert (ea < eb) == (a < b), (a, b)
    assert (ea == eb) == (a == b), (a, b)


@settings(max_examples=examples(300), deadline=None)
@given(
    st.one_of(
        st.tuples(naive_datetimes, naive_datetimes),
        st.tuples(aware_datetimes, aware_datetimes),
        st.tuples(st.dates(), st.dates()),
        st.tuples(naive_times, naive_times),
        st.tuples(aware_times, aware_times),
        st.tuples(st.timedeltas(), st.timedeltas()),
        st.tuples(st.uuids(), st.uuids()),
    )
)
def test_each_type_orders_like_python(pair: tuple[Any, Any]) -> None:
    _native_pair(*pair)


@settings(max_examples=examples(300), deadline=None)
@given(aware_datetimes, _offsets)
def test_equal_instants_are_one_key_and_read_back_in_utc(v: dt.datetime, tz: dt.tzinfo) -> None:
    other = v.astimezone(tz)
    assert encode_key(v) == encode_key(other)
    back = decode_key(encode_key(other))
    assert back == v and back.tzinfo is dt.UTC


@settings(max_examples=examples(300), deadline=None)
@given(st.datetimes(min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31)))
def test_naive_and_aware_twins_are_adjacent_naive_first(v: dt.datetime) -> None:
    """Naive is UTC wall time: the aware datetime of the same instant follows it directly."""
    naive, aware = encode_key(v), encode_key(v.replace(tzinfo=dt.UTC))
    assert naive < aware
    assert naive[:-1] == aware[:-1]
    later = encode_key(v + dt.timedelta(microseconds=1))
    assert aware < later
    assert type(decode_key(naive)) is dt.datetime and decode_key(naive).tzinfo is None


def test_aware_time_outside_the_utc_day_keeps_its_instant() -> None:
    plus1 = dt.timezone(dt.timedelta(hours=1))
    early = dt.time(0, 30, tzinfo=plus1)  # 23:30 the day before, in UTC
    assert early < dt.time(0, 0, tzinfo=dt.UTC)  # Python does not wrap either
    assert encode_key(early) < encode_key(dt.time(0, 0, tzinfo=dt.UTC))
    back = decode_key(encode_key(early))
    assert back == early and encode_key(back) == encode_key(early)
    assert decode_key(encode_key(dt.time(13, tzinfo=plus1))) == dt.time(12, tzinfo=dt.UTC)


def test_aware_datetime_beyond_utc_range_is_rejected() -> None:
    v = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    with pytest.raises(InvalidKey, match="outside years 1-9999"):
        encode_key(v)


def test_unsupported_type_error_lists_the_supported_ones() -> None:
    with pytest.raises(InvalidKey) as exc_info:
        encode_key({"tier": "gold"})
    msg = str(exc_info.value)
    for name in ("Decimal", "date", "datetime", "time", "timedelta", "UUID"):
        assert name in msg
    assert "extract a value" in msg


def test_truncated_fixed_width_encoding_is_corrupt() -> None:
    enc = encode_key(dt.datetime(2024, 1, 1))
    with pytest.raises(InvalidKey, match="truncated"):
        decode_key(enc[:-2])


@settings(max_examples=examples(2000), deadline=None)
@given(st.binary(max_size=64))
def test_murmur2_is_kafkas(data: bytes) -> None:
    from aiokafka.partitioner import murmur2 as kafka_murmur2

    assert murmur2(data) & 0x7FFFFFFF == kafka_murmur2(data) & 0x7FFFFFFF


@settings(max_examples=examples(500), deadline=None)
@given(
    st.one_of(st.integers(), st.text(max_size=20), st.tuples(st.integers(), st.text(max_size=5))),
    st.integers(min_value=1, max_value=64),
)
def test_partition_for_id_is_where_the_default_partitioner_puts_the_key(
    rid: Any, partitions: int
) -> None:
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(partitions))
    assert partition_for_id(rid, partitions) == DefaultPartitioner()(key_for_id(rid), parts, parts)


def test_partition_for_id_refuses_a_partition_count_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="positive int"):
        partition_for_id(1, 0)


# ---- key shapes: where a row no event has brought yet belongs ---------------------------


def _catalog_keys() -> list[tuple[bytes, Any, tuple[str, ...]]]:
    """Every record key the real Debezium connector wrote in tests/data/debezium, with the
    row id tally reads for it (the key's fields, in their order)."""
    import glob
    import json
    import os

    out = []
    here = os.path.join(os.path.dirname(__file__), "data", "debezium", "*.jsonl")
    for path in sorted(glob.glob(here)):
        with open(path) as f:
            for line in f:
                key = json.loads(line).get("key")
                if not key:
                    continue
                doc = json.loads(key)
                payload = doc.get("payload", doc) if isinstance(doc, dict) else None
                if not isinstance(payload, dict) or not payload:
                    continue
                fields = tuple(payload)
                values = tuple(payload[f] for f in fields)
                out.append((key.encode(), values[0] if len(values) == 1 else values, fields))
    return out


def test_key_shapes_reproduce_every_key_the_connector_wrote() -> None:
    """Learned from one key of a topic, the shape rebuilds the keys of other rows byte for
    byte: Debezium's keys with and without their schema, and tally's producer's."""
    from tally.schemas.keys import key_for_id, learn_key_shape, partition_for_id

    keys = _catalog_keys()
    assert len(keys) > 100
    by_shape: dict[tuple[bytes, tuple[str, ...]], list[tuple[bytes, Any, tuple[str, ...]]]] = {}
    for key, rid, fields in keys:
        shape = learn_key_shape(key, rid, fields)
        assert shape is not None, key
        assert shape.kind in ("fields", "schema")
        assert shape.key(rid, fields) == key
        by_shape.setdefault((shape.prefix, shape.fields), []).append((key, rid, fields))
    for group in by_shape.values():  # one topic's keys: learn from the first, build the rest
        first = learn_key_shape(*group[0])
        assert first is not None
        for key, rid, fields in group[1:]:
            assert first.key(rid, fields) == key
    for rid in (5, "x", (1, "a"), -(2**40)):
        shape = learn_key_shape(
            key_for_id(rid), rid, ("a", "b") if isinstance(rid, tuple) else ("id",)
        )
        assert shape is not None and shape.kind == "tally"
        assert shape.partition(rid, ("id",), 6) == partition_for_id(rid, 6)


def test_a_key_no_shape_reproduces_is_not_guessed() -> None:
    from tally.schemas.keys import learn_key_shape

    assert learn_key_shape(b"7", 8, ("id",)) is None  # not this row's key
    assert learn_key_shape(b'{"id": 7}', 7, ("id",)) is None  # spacing tally cannot rebuild
    assert learn_key_shape(b'{"other":7}', 7, ("id",)) is None  # not the id fields
    assert learn_key_shape(b"\xff\x00", 7, ("id",)) is None  # not JSON
    assert learn_key_shape(None, 7, ("id",)) is None
