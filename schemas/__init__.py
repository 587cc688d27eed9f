"""Shapes of the data crossing tally's boundaries (msgspec Structs); imports nothing else of ours.

This module only re-exports; each shape lives in its own submodule.
"""

from tally.schemas.decode import DEFAULT_ID_FIELDS, DecodeFormat, EventDecoder
from tally.schemas.errors import BadRecord, ConfigError, InvalidEvent, TallyError
from tally.schemas.events import (
    DEBEZIUM_OPS,
    NATIVE_OPS,
    ChangeEvent,
    ChangeKind,
    DebeziumEnvelope,
    DebeziumMessage,
    DebeziumOp,
    DebeziumSource,
    NativeEvent,
    NativeOp,
    decode_native,
    encode_native,
)
from tally.schemas.keys import IdField, encode_event, key_for_id, row_id, truncate_key

__all__ = [
    "DEBEZIUM_OPS",
    "DEFAULT_ID_FIELDS",
    "NATIVE_OPS",
    "BadRecord",
    "ChangeEvent",
    "ChangeKind",
    "ConfigError",
    "DebeziumEnvelope",
    "DebeziumMessage",
    "DebeziumOp",
    "DebeziumSource",
    "DecodeFormat",
    "EventDecoder",
    "IdField",
    "InvalidEvent",
    "NativeEvent",
    "NativeOp",
    "TallyError",
    "decode_native",
    "encode_event",
    "encode_native",
    "key_for_id",
    "row_id",
    "truncate_key",
]
