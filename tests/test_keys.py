"""Property tests of the order-preserving key encoding (engine/keys.py).

The oracle below is written from the documented total order, independently of
the encoder::

    None < numbers < bool < str < bytes < tuple/list

numbers compared exactly (fractions.Fraction; +-inf at the ends), str by code
point, bytes lexicographically, tuples element-wise with a shorter prefix first.
"""

from __future__ import annotations

import itertools
import math
import sys
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine import InvalidKey, TallyError, decode_key, encode_key

# ---------------------------------------------------------------------------
# Oracle


def _type_rank(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, bool):
        return 2
    if isinstance(v, (int, float)):
        return 1
    if isinstance(v, str):
        return 3
    if isinstance(v, bytes):
        return 4
    if isinstance(v, (tuple, list)):
        return 5
    raise AssertionError(f"oracle: unsupported value {v!r}")


def _num(v: int | float) -> tuple[int, Fraction]:
    """(infinity rank, exact value): -inf < every finite number < +inf."""
    if isinstance(v, float) and math.isinf(v):
        return (1 if v > 0 else -1), Fraction(0)
    return 0, Fraction(v)


def _sign(x: Any) -> int:
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
    if ra in (2, 3, 4):
        return (a > b) - (a < b)
    for x, y in zip(a, b, strict=False):
        c = cmp(x, y)
        if c:
            return c
    return _sign(len(a) - len(b))


def canonical(v: Any) -> Any:
    """What a key reads back as: lists -> tuples, integral numbers -> int."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    if isinstance(v, (tuple, list)):
        return tuple(canonical(x) for x in v)
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
    return a == b


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
numbers = st.one_of(ints, floats)
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
scalars = st.one_of(st.none(), numbers, st.booleans(), texts, byte_strings)
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


@settings(max_examples=1500)
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


@settings(max_examples=1000)
@given(numbers, numbers)
def test_number_order_is_exact(a: int | float, b: int | float) -> None:
    _check_pair(a, b)


@settings(max_examples=500)
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


@settings(max_examples=1500)
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


@settings(max_examples=500)
@given(any_key, any_key)
def test_no_encoding_is_a_proper_prefix_of_another(a: Any, b: Any) -> None:
    ea, eb = encode_key(a), encode_key(b)
    if ea != eb:
        assert not eb.startswith(ea)
        assert not ea.startswith(eb)


# ---------------------------------------------------------------------------
# Round trip


@settings(max_examples=1500)
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


@settings(max_examples=500)
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
    [float("nan"), (1, float("nan")), [float("nan")], ("a", (2, float("nan")))],
    ids=["nan", "nan-in-tuple", "nan-in-list", "nan-nested"],
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


@settings(max_examples=200)
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
    from engine import MAX_KEY_DEPTH

    deepest = _nested(MAX_KEY_DEPTH, kind)
    assert decode_key(encode_key(deepest)) == _nested(MAX_KEY_DEPTH, tuple)
    # depth is the deepest branch, not the number of tuples: siblings add nothing
    wide = kind([_nested(MAX_KEY_DEPTH - 1, kind)] * 50)
    assert decode_key(encode_key(wide)) == tuple([_nested(MAX_KEY_DEPTH - 1, tuple)] * 50)


@pytest.mark.parametrize("depth", [33, 980, 5000])
@pytest.mark.parametrize("kind", [tuple, list])
def test_keys_nested_deeper_than_max_depth_are_rejected_clearly(depth: int, kind: type) -> None:
    from engine import MAX_KEY_DEPTH

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
    from engine.keys import decode_keys

    with pytest.raises(InvalidKey, match="corrupt key encoding"):
        decode_keys(forged, 0)
