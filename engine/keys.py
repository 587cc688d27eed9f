"""Order-preserving byte encoding of keys, ids and namespaces.

Comparing two encodings with plain bytes comparison gives the documented total
order of the values::

    None < numbers < False < True < str < bytes < tuple/list
         < date < datetime < time < timedelta < UUID

* Numbers (int, float, `decimal.Decimal`) compare numerically and exactly
  across types, big ints and long Decimals included; -0.0 == 0 ==
  Decimal('-0'); NaN (float or Decimal) is rejected; Decimal infinities are the
  float infinities. Equal numbers are the same key whatever their type: a
  number reads back as an int if it is integral (``1.0`` and ``Decimal('1.00')``
  read back as ``1``), else as a float if a float equals it exactly
  (``Decimal('12.5')`` reads back as ``12.5``), else as a Decimal equal to it
  (``Decimal('12.10')`` reads back as ``Decimal('12.1')``: trailing zeros are
  not kept). Decimals must fit PostgreSQL's numeric (`tally.engine.decimals`).
* Strings compare by code point (UTF-8 order is code-point order).
* Tuples and lists compare element-wise, a shorter prefix first; both decode
  as tuples.
* ``datetime`` is an instant: an aware one is compared in UTC (equal instants
  with different offsets are the same key) and reads back as an aware
  datetime in UTC (its offset is not kept); a naive one is taken as UTC wall
  time and reads back naive. A naive and an aware datetime of the same instant
  are different keys (Python never calls them equal), adjacent, naive first.
* ``time`` likewise: one with a fixed UTC offset is compared in UTC (as Python
  does, without wrapping at midnight) and reads back in UTC — or, when the UTC
  time falls outside the day, with an offset that keeps its instant.
* ``date`` by day, ``timedelta`` by length (negative first), ``UUID`` by its 16
  bytes (PostgreSQL's uuid order).

Every encoding is *prefix-free* (self-delimiting), so ``encode(k) + encode(id)``
orders exactly like the pair ``(k, id)``.  The tree relies on that.

Tuples may nest at most `MAX_KEY_DEPTH` levels (``(1, (2, (3,)))`` nests 3); a
deeper value is rejected with `InvalidKey` when it is encoded, so nothing stored
can be too deep to decode or to render in a read's answer.

Layout (first byte is a type tag; ``0x01`` ends a tuple and sorts first)::

    0x02                      None
    0x03 ~(exp, mantissa)     negative number (bytes inverted)
    0x04                      zero
    0x05 exp mantissa         positive number
    0x06 / 0x07               False / True
    0x08 escaped-utf8 00      str   (inside, 01 is written 01 02 and 00 as 01 01)
    0x09 escaped 00           bytes
    0x0A elements... 01       tuple / list
    0x0B days(4)              date: proleptic ordinal (0001-01-01 is 1)
    0x0C us(8) flag(1)        datetime: microseconds since 1970 (+2**63); 00 naive, 01 aware
    0x0D us(5) flag(1)        time: microseconds since midnight, in UTC if aware (+2**39)
    0x0E us(9)                timedelta: microseconds (+2**71)
    0x0F bytes(16)            UUID

A number ``|x| = 2**e * 1.f`` writes ``e`` as an order-preserving signed
integer, then the fraction bits ``f`` left-aligned in bytes (trailing zero
bits dropped), escaped and terminated like a string: a longer fraction with
the same prefix is larger, exactly as bytes order says.

Let ``N(e) = 8 * ceil(max(56, e + 1) / 8)``: every int and float with exponent
``e`` has at most ``N(e)`` fraction bits. A Decimal equal to an int or a float
is written exactly like it. Any other Decimal (12.10, 1 + 2**-54) writes the
first ``N(e)`` fraction bits of ``|x|`` in full (trailing zeros kept), escaped,
then a marker ``FF`` (above every escaped byte and the terminator), then the
decimal digits of the remainder ``r`` (``|x| * 2**(N-e)`` minus its floor, in
[0, 1), a finite decimal; 0 only for a dyadic beyond a float's precision) after
the point without trailing zeros, then ``00``.
Why that is exact: an int or float ``y`` of the same exponent has at most ``N``
bits, so it either differs from ``x`` within the first ``N`` bits, or equals
the ``N``-bit prefix — then ``r > 0`` (``x`` is no int or float), and ``y``'s
bytes end at ``00`` or continue with escaped zero bytes where ``x`` has more
bytes or ``FF``: smaller, as it is. Two such Decimals with the same prefix
compare by ``r``, whose digit strings compare like the fractions. The decoder
tells the forms apart by length: more than ``N / 8`` fraction bytes.
"""

from __future__ import annotations

import datetime as _dt
import math
import uuid as _uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeAlias

from .decimals import EXACT, MAX_DIGITS_AFTER_POINT, MAX_DIGITS_BEFORE_POINT, decimal_range_error
from .errors import InvalidKey

__all__ = ["MAX_KEY_DEPTH", "Key", "decode_key", "decode_keys", "encode_key", "key_repr"]

Key: TypeAlias = Any
"""None, bool, int, float, Decimal, str, bytes, date, datetime, time, timedelta, UUID,
or a tuple/list of keys."""

MAX_KEY_DEPTH = 32
"""Deepest nesting of tuples/lists in a key, id or namespace (a flat tuple nests 1).

Real keys nest one or two levels (a tuple of columns, an array column inside
one); 32 leaves ample room while keeping every recursive walk over a stored key
(encode, decode, rendering it as JSON or msgpack in a read, an HTTP client
parsing that answer) far below Python's recursion limit of 1000, including the
frames of the server and the caller around it. A key nested ~1000 deep used to
be stored and then broke every read that returned it."""

TAG_END = 0x01
TAG_NONE = 0x02
TAG_NEG = 0x03
TAG_ZERO = 0x04
TAG_POS = 0x05
TAG_FALSE = 0x06
TAG_TRUE = 0x07
TAG_STR = 0x08
TAG_BYTES = 0x09
TAG_TUPLE = 0x0A
TAG_DATE = 0x0B
TAG_DATETIME = 0x0C
TAG_TIME = 0x0D
TAG_TIMEDELTA = 0x0E
TAG_UUID = 0x0F

_NONE = b"\x02"
_ZERO = b"\x04"
_FALSE = b"\x06"
_TRUE = b"\x07"
_INVERT = bytes(255 - i for i in range(256))
# Small non-negative ints are by far the most common keys and ids.
_SMALL_INTS: list[bytes] = []


def key_repr(value: object) -> str:
    """A short repr for error messages."""
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _encode_exp(e: int) -> bytes:
    if -0x40 <= e < 0x40:
        return bytes((0x80 + e,))
    if e >= 0x40:
        v = e - 0x40
        n = (v.bit_length() + 7) // 8 or 1
        return bytes((0xC0 + n,)) + v.to_bytes(n, "big")
    v = -0x41 - e
    n = (v.bit_length() + 7) // 8 or 1
    return bytes((0x3F - n,)) + ((1 << (8 * n)) - 1 - v).to_bytes(n, "big")


_EXP1 = [bytes((0x80 + e,)) for e in range(-0x40, 0x40)]


def _encode_magnitude(n: int, shift: int) -> bytes:
    """Encode the positive value ``n * 2**-shift`` (n > 0)."""
    if not n & 1:
        tz = (n & -n).bit_length() - 1
        n >>= tz
        shift -= tz
    nbits = n.bit_length() - 1  # fraction bits after the leading 1
    if nbits:
        nbytes = (nbits + 7) >> 3
        frac = ((n ^ (1 << nbits)) << ((nbytes << 3) - nbits)).to_bytes(nbytes, "big")
        if 1 in frac or 0 in frac:
            frac = frac.replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01")
        e = nbits - shift
        if -0x40 <= e < 0x40:
            return _EXP1[e + 0x40] + frac + b"\x00"
        return _encode_exp(e) + frac + b"\x00"
    return _encode_exp(-shift) + b"\x00"


def _encode_number(x: int | float) -> bytes:
    if type(x) is int or isinstance(x, int):
        if x > 0:
            return b"\x05" + _encode_magnitude(x, 0)
        if x == 0:
            return _ZERO
        return b"\x03" + _encode_magnitude(-x, 0).translate(_INVERT)
    if x != x:
        raise InvalidKey(
            "NaN cannot be a key, id or namespace: NaN is unordered; use None or a sentinel number"
        )
    if math.isinf(x):
        # +/-inf sort beyond every finite number: an exponent no finite value has.
        return b"\x05\xff" if x > 0 else b"\x03\x00"
    if x == 0.0:
        return _ZERO
    num, den = x.as_integer_ratio()
    shift = den.bit_length() - 1
    if num > 0:
        return b"\x05" + _encode_magnitude(num, shift)
    return b"\x03" + _encode_magnitude(-num, shift).translate(_INVERT)


def _escape(b: bytes) -> bytes:
    if b"\x01" in b:
        b = b.replace(b"\x01", b"\x01\x02")
    if b"\x00" in b:
        b = b.replace(b"\x00", b"\x01\x01")
    return b + b"\x00"


def _unescape(b: bytes) -> bytes:
    if b"\x01" in b:
        b = b.replace(b"\x01\x01", b"\x00").replace(b"\x01\x02", b"\x01")
    return b


def _too_deep() -> InvalidKey:
    return InvalidKey(
        f"a key, id or namespace nests tuples/lists more than {MAX_KEY_DEPTH} levels deep "
        f"(MAX_KEY_DEPTH is {MAX_KEY_DEPTH}): flatten it, e.g. into one tuple of its columns"
    )


def _encode_into(value: Any, out: list[bytes], depth: int) -> None:
    """Append the encoding of ``value``; ``depth`` = tuples/lists already open around it."""
    t = type(value)
    if t is int:
        if 0 <= value < 1024:
            out.append(_SMALL_INTS[value])
        else:
            out.append(_encode_number(value))
    elif t is str:
        out.append(b"\x08" + _escape(value.encode("utf-8", "surrogatepass")))
    elif value is None:
        out.append(_NONE)
    elif t is float:
        out.append(_encode_number(value))
    elif t is bool:
        out.append(_TRUE if value else _FALSE)
    elif t is tuple or t is list:
        if depth >= MAX_KEY_DEPTH:
            raise _too_deep()
        out.append(b"\x0a")
        for v in value:
            _encode_into(v, out, depth + 1)
        out.append(b"\x01")
    elif isinstance(value, bool):
        out.append(_TRUE if value else _FALSE)
    elif isinstance(value, (int, float)):
        out.append(_encode_number(value))
    elif isinstance(value, str):
        out.append(b"\x08" + _escape(str(value).encode("utf-8", "surrogatepass")))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.append(b"\x09" + _escape(bytes(value)))
    elif isinstance(value, (tuple, list)):
        if depth >= MAX_KEY_DEPTH:
            raise _too_deep()
        out.append(b"\x0a")
        for v in value:
            _encode_into(v, out, depth + 1)
        out.append(b"\x01")
    else:
        out.append(_encode_other(value))


def encode_key(value: Key) -> bytes:
    """Encode a key to order-preserving, prefix-free bytes. O(size of the key)."""
    t = type(value)
    if t is int:
        if 0 <= value < 1024:
            return _SMALL_INTS[value]
        if 0 < value < _2_63:
            # Inlined _encode_magnitude for the commonest keys: positive ints.
            # Left-aligning the fraction into bytes and dropping trailing zero
            # bytes equals stripping trailing zero bits first.
            nbits: int = value.bit_length() - 1
            nbytes = (nbits + 7) >> 3
            frac: bytes = (
                ((value ^ (1 << nbits)) << ((nbytes << 3) - nbits))
                .to_bytes(nbytes, "big")
                .rstrip(b"\x00")
            )
            if 1 in frac or 0 in frac:
                frac = frac.replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01")
            return _POS_EXP[nbits] + frac + b"\x00"
        return _encode_number(value)
    if t is str:
        return b"\x08" + _escape(value.encode("utf-8", "surrogatepass"))
    if value is None:
        return _NONE
    if t is float:
        return _encode_number(value)
    if t is bytes:
        return b"\x09" + _escape(value)
    out: list[bytes] = []
    _encode_into(value, out, 0)
    return b"".join(out)


_SMALL_INTS.extend(_encode_number(i) for i in range(1024))
_2_63 = 1 << 63
_POS_EXP: list[bytes] = [b"\x05" + _encode_exp(e) for e in range(64)]


# ---- Decimals ------------------------------------------------------------------------


def _digits(n: int, width: int) -> bytes:
    """``n`` in decimal ASCII, zero-padded to ``width`` (past the int/str digit limit too)."""
    s = str(n) if width <= 600 else str(Decimal(n))
    return s.rjust(width, "0").encode("ascii")


_FIVE_MAX = 5**MAX_DIGITS_AFTER_POINT
_POW10 = [10**k for k in range(64)]


def _encode_decimal(d: Decimal) -> bytes:
    if not d.is_finite():
        if d.is_nan():
            raise InvalidKey(
                f"{d!r} cannot be a key, id or namespace: NaN is unordered; "
                "use None or a sentinel number"
            )
        return b"\x03\x00" if d.is_signed() else b"\x05\xff"
    if d.is_zero():
        return _ZERO
    adj = d.adjusted()
    if not -MAX_DIGITS_AFTER_POINT <= adj < MAX_DIGITS_BEFORE_POINT:
        raise _decimal_out_of_range(d)
    # Cheap now: the exponent is within the digits written plus the range.
    num, den = d.as_integer_ratio()
    if den == 1:
        return _encode_number(num)
    neg = num < 0
    if neg:
        num = -num
    a = (den & -den).bit_length() - 1  # den = 2**a * 5**b
    five = den >> a
    if five == 1 and num.bit_length() <= 53 and a <= 1074:
        # A float holds it (a dyadic num / 2**a, num odd, within a float's bits): its bytes.
        mag = _encode_magnitude(num, a)
        return b"\x03" + mag.translate(_INVERT) if neg else b"\x05" + mag
    if a > MAX_DIGITS_AFTER_POINT or five > _FIVE_MAX:
        raise _decimal_out_of_range(d)
    # The value's decimal places are max(a, b); 5**b has > 2.32 * b bits: k >= them.
    mag = _encode_exotic(num, den, max(a, five.bit_length() * 431 // 1000 + 1))
    return b"\x03" + mag.translate(_INVERT) if neg else b"\x05" + mag


def _decimal_out_of_range(d: Decimal) -> InvalidKey:
    why = decimal_range_error(d) or (
        f"it has more than {MAX_DIGITS_AFTER_POINT} digits after the decimal point"
    )
    return InvalidKey(
        f"Decimal key {key_repr(d)} is out of range: {why} (PostgreSQL numeric's limits)"
    )


def _encode_exotic(num: int, den: int, k: int) -> bytes:
    """The magnitude of ``num / den`` (> 0, ``den`` divides ``10**k``) beyond N(e) bits."""
    e = num.bit_length() - den.bit_length()
    if (num << -e if e < 0 else num) < (den << e if e > 0 else den):
        e -= 1  # now 2**e <= x < 2**(e + 1)
    nb = max(7, (e + 8) >> 3)  # N(e) / 8
    q, rem = divmod(num << ((nb << 3) - e), den)  # rem 0: a dyadic within N bits
    frac = (q ^ (1 << (nb << 3))).to_bytes(nb, "big")
    if 1 in frac or 0 in frac:
        frac = frac.replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01")
    if rem:
        digits = _digits(rem * (_POW10[k] if k < 64 else 10**k) // den, k).rstrip(b"0")
    else:
        digits = b""
    exp = _EXP1[e + 0x40] if -0x40 <= e < 0x40 else _encode_exp(e)
    return exp + frac + b"\xff" + digits + b"\x00"


# ---- dates, times, timedeltas, UUIDs ---------------------------------------------------

_UTC = _dt.UTC
_EPOCH = _dt.datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=_UTC)
_DAY_US = 86_400_000_000
_B39 = 1 << 39
_B63 = 1 << 63
_B71 = 1 << 71


def _us(td: _dt.timedelta) -> int:
    return (td.days * 86_400 + td.seconds) * 1_000_000 + td.microseconds


_MIN_US = _us(_dt.datetime.min - _EPOCH)
_MAX_US = _us(_dt.datetime.max - _EPOCH)


def _encode_datetime(v: _dt.datetime) -> bytes:
    if v.utcoffset() is None:
        return b"\x0c" + (_us(v - _EPOCH) + _B63).to_bytes(8, "big") + b"\x00"
    us = _us(v - _EPOCH_UTC)
    if not _MIN_US <= us <= _MAX_US:
        raise InvalidKey(
            f"datetime key {key_repr(v)} cannot be a key: its instant in UTC is outside "
            "years 1-9999 (datetime's range)"
        )
    return b"\x0c" + (us + _B63).to_bytes(8, "big") + b"\x01"


def _encode_date(v: _dt.date) -> bytes:
    return b"\x0b" + v.toordinal().to_bytes(4, "big")


def _encode_time(v: _dt.time) -> bytes:
    us = ((v.hour * 60 + v.minute) * 60 + v.second) * 1_000_000 + v.microsecond
    off = v.utcoffset()
    if off is None:
        return b"\x0d" + (us + _B39).to_bytes(5, "big") + b"\x00"
    # Whole seconds of the offset (floored), as Python compares aware times.
    us -= (off.days * 86_400 + off.seconds) * 1_000_000
    return b"\x0d" + (us + _B39).to_bytes(5, "big") + b"\x01"


def _encode_timedelta(v: _dt.timedelta) -> bytes:
    return b"\x0e" + (_us(v) + _B71).to_bytes(9, "big")


def _encode_uuid(v: _uuid.UUID) -> bytes:
    return b"\x0f" + v.bytes


_OTHER: dict[type, Callable[[Any], bytes]] = {
    Decimal: _encode_decimal,
    _dt.datetime: _encode_datetime,
    _dt.date: _encode_date,
    _dt.time: _encode_time,
    _dt.timedelta: _encode_timedelta,
    _uuid.UUID: _encode_uuid,
}
"""Encoders of the key types beyond the builtins; subclasses by isinstance, in this order
(datetime before date, its base class)."""


def _encode_other(value: Any) -> bytes:
    enc = _OTHER.get(type(value))
    if enc is None:
        for base, f in _OTHER.items():
            if isinstance(value, base):
                enc = f
                break
        else:
            raise InvalidKey(
                f"unsupported key value {key_repr(value)} of type {type(value).__name__}: "
                "keys, ids and namespaces must be None, bool, int, float, Decimal, str, "
                "bytes, date, datetime, time, timedelta, UUID, or tuples/lists of those "
                "(for a JSON object or array column, extract a value from it in the "
                "definition)"
            )
    return enc(value)


def _decode_exp(b: bytes, i: int) -> tuple[int, int]:
    c = b[i]
    if 0x40 <= c < 0xC0:
        return c - 0x80, i + 1
    if c >= 0xC0:
        n = c - 0xC0
        return int.from_bytes(b[i + 1 : i + 1 + n], "big") + 0x40, i + 1 + n
    n = 0x3F - c
    v = (1 << (8 * n)) - 1 - int.from_bytes(b[i + 1 : i + 1 + n], "big")
    return -0x41 - v, i + 1 + n


def _decode_magnitude(b: bytes, i: int) -> tuple[int | float | Decimal, int]:
    c = b[i]
    if 0x40 <= c < 0xC0:
        e = c - 0x80
        i += 1
    else:
        e, i = _decode_exp(b, i)
    j = b.index(0, i)  # escaped data never holds a zero byte
    if j > i:
        frac = b[i:j]
        if 1 in frac:
            frac = _unescape(frac)
        nbits = len(frac) << 3
        if nbits > 56 and nbits > e + 8:  # more than N(e) bits: a Decimal (see the notes)
            return _decode_exotic(e, frac), j + 1
        n = (1 << nbits) | int.from_bytes(frac, "big")
    else:
        nbits = 0
        n = 1
    shift = e - nbits
    if shift >= 0:
        return n << shift, j + 1
    tz = (n & -n).bit_length() - 1
    n >>= tz
    shift += tz
    if shift >= 0:
        return n << shift, j + 1
    return math.ldexp(n, shift), j + 1


def _decode_exotic(e: int, frac: bytes) -> Decimal:
    """A Decimal written as N(e) fraction bits, FF, the remainder's digits (see top)."""
    nb = max(7, (e + 8) >> 3)  # N(e) / 8
    if frac[nb] != 0xFF:
        raise InvalidKey(f"corrupt key encoding: a number's fraction is too long in {frac!r}")
    digits = frac[nb + 1 :]
    k = len(digits)
    d = int(digits) if 0 < k <= 600 else int(Decimal(digits.decode("ascii") or "0"))
    q = (1 << (nb << 3)) | int.from_bytes(frac[:nb], "big")
    s = (nb << 3) - e
    return Decimal((q * 10**k + d) * 5**s).scaleb(-(k + s), EXACT).normalize(EXACT)


def _decode_at(b: bytes, i: int) -> tuple[Any, int]:
    tag = b[i]
    if tag == TAG_POS:
        if b[i + 1] == 0xFF:
            return math.inf, i + 2
        return _decode_magnitude(b, i + 1)
    if tag in (TAG_STR, TAG_BYTES):
        k = b.index(b"\x00", i + 1)
        raw = _unescape(b[i + 1 : k])
        if tag == TAG_STR:
            return raw.decode("utf-8", "surrogatepass"), k + 1
        return raw, k + 1
    if tag == TAG_ZERO:
        return 0, i + 1
    if tag == TAG_NONE:
        return None, i + 1
    if tag == TAG_NEG:
        if b[i + 1] == 0x00:
            return -math.inf, i + 2
        # Re-invert only this number's bytes: it ends at the inverted terminator FF.
        j = i + 1
        c = 255 - b[j]
        if c >= 0xC0:
            j += 1 + (c - 0xC0)
        elif c < 0x40:
            j += 1 + (0x3F - c)
        else:
            j += 1
        j = b.index(b"\xff", j) + 1
        mag, _ = _decode_magnitude(b[i + 1 : j].translate(_INVERT), 0)
        # Decimal's unary minus rounds to the caller's context; copy_negate is exact.
        return (mag.copy_negate() if type(mag) is Decimal else -mag), j
    if tag == TAG_FALSE:
        return False, i + 1
    if tag == TAG_TRUE:
        return True, i + 1
    if tag == TAG_TUPLE:
        items = []
        j = i + 1
        while b[j] != TAG_END:
            v, j = _decode_at(b, j)
            items.append(v)
        return tuple(items), j + 1
    if TAG_DATE <= tag <= TAG_UUID:
        return _decode_fixed(b, i, tag)
    raise InvalidKey(f"corrupt key encoding: unknown tag 0x{tag:02x} at byte {i} of {b!r}")


def _nested_too_deep(b: bytes) -> InvalidKey:
    # encode_key never nests deeper than MAX_KEY_DEPTH: only forged or corrupt bytes get here.
    return InvalidKey(
        f"corrupt key encoding: tuples nested far deeper than {MAX_KEY_DEPTH} in {key_repr(b)}"
    )


_WIDTH = {TAG_DATE: 4, TAG_DATETIME: 9, TAG_TIME: 6, TAG_TIMEDELTA: 9, TAG_UUID: 16}


def _time_of(us: int, tz: _dt.tzinfo | None) -> _dt.time:
    s, micro = divmod(us, 1_000_000)
    return _dt.time(s // 3600, s // 60 % 60, s % 60, micro, tz)


def _decode_fixed(b: bytes, i: int, tag: int) -> tuple[Any, int]:
    """The fixed-width encodings: date, datetime, time, timedelta, UUID."""
    j = i + 1 + _WIDTH[tag]
    if j > len(b):
        raise InvalidKey(f"corrupt key encoding: truncated value at byte {i} of {b!r}")
    if tag == TAG_UUID:
        return _uuid.UUID(bytes=b[i + 1 : j]), j
    if tag == TAG_DATE:
        return _dt.date.fromordinal(int.from_bytes(b[i + 1 : j], "big")), j
    if tag == TAG_TIMEDELTA:
        return _dt.timedelta(microseconds=int.from_bytes(b[i + 1 : j], "big") - _B71), j
    flag = b[j - 1]
    if flag > 1:
        raise InvalidKey(f"corrupt key encoding: bad flag {flag} at byte {j - 1} of {b!r}")
    if tag == TAG_DATETIME:
        us = int.from_bytes(b[i + 1 : j - 1], "big") - _B63
        return (_EPOCH_UTC if flag else _EPOCH) + _dt.timedelta(microseconds=us), j
    us = int.from_bytes(b[i + 1 : j - 1], "big") - _B39
    if not flag:
        return _time_of(us, None), j
    if 0 <= us < _DAY_US:
        return _time_of(us, _UTC), j
    # The UTC time is outside the day (e.g. 00:30+01:00): keep the instant with the
    # smallest whole-second offset that brings the wall time into the day.
    off_s = -(us // 1_000_000) if us < 0 else (_DAY_US - 1 - us) // 1_000_000
    return _time_of(us + off_s * 1_000_000, _dt.timezone(_dt.timedelta(seconds=off_s))), j


def decode_key(b: bytes) -> Key:
    """Decode one encoded key. Inverse of `encode_key` up to numeric equality."""
    try:
        v, j = _decode_at(b, 0)
    except RecursionError:
        raise _nested_too_deep(b) from None
    if j != len(b):
        raise InvalidKey(f"corrupt key encoding: {len(b) - j} trailing bytes in {b!r}")
    return v


def decode_keys(b: bytes, start: int = 0) -> tuple[Key, int]:
    """Decode the key at ``b[start:]``; return it and the offset just past it."""
    try:
        return _decode_at(b, start)
    except RecursionError:
        raise _nested_too_deep(b) from None
