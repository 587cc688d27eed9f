"""The stored encodings of sums (engine/state/codec.py) keep their exact type and digits.

A Decimal sum is stored as a msgpack string of its digits and read back as a Decimal with
the same exponent; ints (beyond 64 bits too) and floats read back as before, and a node
without Decimals is stored byte for byte as it was.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from tally.engine import IdEntry, Node, TreeMeta
from tally.engine.state.codec import (
    decode_id,
    decode_log,
    decode_node,
    decode_tree,
    encode,
    encode_node,
)


def test_node_sums_keep_their_type_and_exponent() -> None:
    n = Node([b"a", b"b", b"c", b"d"], [Decimal("12.10"), 5, 1.5, Decimal("-0.00")])
    back = decode_node(encode_node(n))
    assert [type(v) for v in back.sums] == [Decimal, int, float, Decimal]
    assert [str(v) for v in back.sums] == ["12.10", "5", "1.5", "-0.00"]


def test_node_with_a_bigint_and_decimals_takes_the_slow_path_exactly() -> None:
    n = Node([], [Decimal("1E+40"), 2**70, -(2**64)], [1, 2, 3], [1, 2, 3])
    back = decode_node(encode_node(n))
    assert back.sums == n.sums
    assert [type(v) for v in back.sums] == [Decimal, int, int]
    assert str(back.sums[0]) == "1E+40"
    assert back.children == [1, 2, 3] and back.counts == [1, 2, 3]


def test_nodes_without_decimals_are_stored_as_before() -> None:
    n = Node([b"k"], [1, 2.5, -3], [], [])
    assert encode_node(n) == msgspec.msgpack.encode([[b"k"], [1, 2.5, -3], [], []])


def test_id_entries_and_log_records_keep_decimal_sums() -> None:
    e = IdEntry(b"\x02", b"\x05\x80\x00", Decimal("99999999999.99"))
    back = decode_id(encode(e))
    assert type(back.sum) is Decimal and str(back.sum) == "99999999999.99"
    assert type(decode_id(encode(IdEntry(b"", b"", 7))).sum) is int
    assert type(decode_id(encode(IdEntry(b"", b"", 7.0))).sum) is float
    log = decode_log(encode([(b"id", None, e), (b"id", e, IdEntry(b"", b"", 0.5))]))
    assert log[0][2] == e and str(log[0][2].sum) == "99999999999.99"
    assert log[1][2] is not None
    assert log[1][1] == e and type(log[1][2].sum) is float


def test_tree_meta_decimal_flag_reads_both_ways() -> None:
    """Metas stored before the flag existed read back without it; a reader of the old five
    fields reads new metas."""
    assert decode_tree(msgspec.msgpack.encode([1, 2, 3, 4, 5])) == TreeMeta(1, 2, 3, 4, 5)
    assert decode_tree(encode(TreeMeta(1, 2, 3, 4, 5, True))).decimal is True

    class OldMeta(msgspec.Struct, array_like=True):
        tid: int
        root: int
        height: int
        max_node_size: int
        next_nid: int = 1

    old = msgspec.msgpack.decode(encode(TreeMeta(1, 2, 3, 4, 5, True)), type=OldMeta)
    assert old == OldMeta(1, 2, 3, 4, 5)
