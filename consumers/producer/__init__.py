"""`ChangeProducer`: publish tally's native change events to Kafka (see `tally.schemas.keys` for the
key contract)."""

from tally.consumers.producer.producer import (
    DEFAULT_BOOTSTRAP_SERVERS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_BATCH_SIZE,
    BrokerUnavailable,
    BulkPublisher,
    ChangeProducer,
    ProduceError,
    SyncChangeProducer,
)

__all__ = [
    "DEFAULT_BOOTSTRAP_SERVERS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_BATCH_SIZE",
    "BrokerUnavailable",
    "BulkPublisher",
    "ChangeProducer",
    "ProduceError",
    "SyncChangeProducer",
]
