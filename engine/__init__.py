"""tally's aggregate engine: counted B-trees on RocksDB, usable as a library.

Knows nothing about Kafka or HTTP. Start with `Store.open(path)`, then
`store.aggregate(name)` or a `TableAggregate(...).bind(store)`.
"""

from .aggregate import Aggregate, Prepared
from .btree import Node, Tree, TreeMeta
from .catalog import Generation, physical_name
from .errors import (
    AggregateNotReady,
    InvalidArgument,
    InvalidKey,
    ItemExists,
    ItemNotFound,
    OffsetOutOfRange,
    ReadOnlyStore,
    StoreCorrupted,
    StoreLocked,
    StoreNotFound,
    TallyError,
)
from .keys import MAX_KEY_DEPTH, decode_key, encode_key
from .state import DEFAULT_CACHE_NODES, DEFAULT_MAX_NODE_SIZE, Batch, IdEntry
from .store import Store
from .table import BoundTableAggregate, RowItem, TableAggregate
from .triggers import DRIFT_KINDS, Applier, ApplyResult
from .types import Bound, Bounds, Item, Order, Page, Query

__all__ = [
    "DEFAULT_CACHE_NODES",
    "DEFAULT_MAX_NODE_SIZE",
    "DRIFT_KINDS",
    "MAX_KEY_DEPTH",
    "Aggregate",
    "AggregateNotReady",
    "Applier",
    "ApplyResult",
    "Batch",
    "Bound",
    "BoundTableAggregate",
    "Bounds",
    "Generation",
    "IdEntry",
    "InvalidArgument",
    "InvalidKey",
    "Item",
    "ItemExists",
    "ItemNotFound",
    "Node",
    "OffsetOutOfRange",
    "Order",
    "Page",
    "Prepared",
    "Query",
    "ReadOnlyStore",
    "RowItem",
    "Store",
    "StoreCorrupted",
    "StoreLocked",
    "StoreNotFound",
    "TableAggregate",
    "TallyError",
    "Tree",
    "TreeMeta",
    "decode_key",
    "encode_key",
    "physical_name",
]
