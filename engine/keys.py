"""Order-preserving byte encoding of keys, ids and namespaces.

Comparing two encodings with plain bytes comparison gives the documented total
order of the values::

    None < numbers < False < True < str < bytes < tuple/list

* Numbers compare numerically and exactly across int and float, big ints
  included; -0.0 == 0.0; NaN is rejected.  An integral number decodes as an
  int (``1.0`` reads back as ``1``; they are the same key).
* Strings compare by code point (UTF-8 order is code-point order).
* Tuples and lists compare element-wise, a shorter prefix first; both decode
  as tuples.

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

A number ``|x| = 2**e * 1.f`` writes ``e`` as an order-preserving signed
integer, then the fraction bits ``f`` left-aligned in bytes (trailing zero
bits dropped), escaped and terminated like a string: a longer fraction with
the same prefix is larger, exactly as bytes order says.
"""

from __future__ import annotations

import math
from typing import Any, TypeAlias

from .errors import InvalidKey

__all__ = ["MAX_KEY_DEPTH", "Key", "decode_key", "decode_keys", "encode_key", "key_repr"]

Key: TypeAlias = Any
"""None, bool, int, float, str, bytes, or a tuple/list of keys."""

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
        raise InvalidKey("NaN cannot be a key, id or namespace: NaN is unordered; use None or a sentinel number")
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
        raise InvalidKey(
            f"unsupported key value {key_repr(value)} of type {type(value).__name__}: "
            "keys, ids and namespaces must be None, bool, int, float, str, bytes, "
            "or tuples/lists of those"
        )


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
            nbits = value.bit_length() - 1
            nbytes = (nbits + 7) >> 3
            frac = ((value ^ (1 << nbits)) << ((nbytes << 3) - nbits)).to_bytes(nbytes, "big").rstrip(b"\x00")
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
_POS_EXP = [b"\x05" + _encode_exp(e) for e in range(64)]


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


def _decode_magnitude(b: bytes, i: int) -> tuple[int | float, int]:
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
        return -mag, j
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
    raise InvalidKey(f"corrupt key encoding: unknown tag 0x{tag:02x} at byte {i} of {b!r}")


def _nested_too_deep(b: bytes) -> InvalidKey:
    # encode_key never nests deeper than MAX_KEY_DEPTH: only forged or corrupt bytes get here.
    return InvalidKey(f"corrupt key encoding: tuples nested far deeper than {MAX_KEY_DEPTH} in {key_repr(b)}")


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
