"""RocksDB-backed state, in layers: `StateStore` → node cache and `Transaction` → `Database`.

`StateStore` is the facade (open, batches, registries, checkpoints, recovery); see its module
for how commits and checkpoints make a kill -9 at any instant safe.
"""

from .codec import IdEntry
from .store import (
    DEFAULT_CACHE_NODES,
    DEFAULT_CHECKPOINT_CHANGES,
    DEFAULT_MAX_NODE_SIZE,
    StateStore,
    check_node_size,
)
from .transaction import Batch, Transaction

__all__ = [
    "DEFAULT_CACHE_NODES",
    "DEFAULT_CHECKPOINT_CHANGES",
    "DEFAULT_MAX_NODE_SIZE",
    "Batch",
    "IdEntry",
    "StateStore",
    "Transaction",
    "check_node_size",
]
