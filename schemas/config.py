"""Consumer settings: one Struct, filled from defaults < TOML file < environment < CLI flags.

Every field has a TOML key of the same name (in a ``[consume]`` table or at
top level) and an environment variable ``TALLY_<FIELD>`` (upper case); most
have a ``--field-name`` flag on `tally consume` too. `topics` maps table → topic; in the
environment it is ``TALLY_TOPICS="scores=pg.public.scores,users=users"``.
`topic_pattern` maps every other table (``"dbz.public.{table}"``: Debezium's topic names).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.errors import ConfigError
from schemas.typed import DEFAULT_PLACEHOLDER

__all__ = ["DEFAULT_HTTP", "TABLE_FIELD", "ConsumerSettings"]

DEFAULT_HTTP = "127.0.0.1:8750"

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]

TABLE_FIELD = "{table}"
"""What `ConsumerSettings.topic_pattern` replaces with a table's name."""


class ConsumerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a `tally consume` process needs to know."""

    definitions: str | None = None
    """Python file or module whose module-level `TableAggregate`s to maintain."""
    bootstrap_servers: str = "127.0.0.1:9092"
    data_dir: str = "./tally-data"
    topics: dict[str, str] = msgspec.field(default_factory=dict)
    """table → topic. A table without an entry is read from `topic_pattern`'s topic, else from
    the topic of its own name."""
    topic_pattern: str | None = None
    """The topic of every table without a `topics` entry: ``{table}`` is replaced by the table's
    name. Debezium names topics ``<topic.prefix>.<schema>.<table>``, so ``"dbz.public.{table}"``
    maps every table of a connector with ``topic.prefix=dbz``."""
    format: Literal["auto", "native", "debezium"] = "auto"
    decimal_handling: Literal["precise", "double", "string"] = "precise"
    """The connector's ``decimal.handling.mode``: how NUMERIC arrives when a record carries no
    schema to say so (with declared ``columns=`` types; a record's own schema always wins)."""
    time_precision: Literal["adaptive", "adaptive_time_microseconds", "connect"] = "adaptive"
    """The connector's ``time.precision.mode``: how timestamp/time columns declared with
    ``columns=`` arrive in records without a schema."""
    unavailable_placeholder: str = DEFAULT_PLACEHOLDER
    """The connector's ``unavailable.value.placeholder``: the value Debezium sends for an
    unchanged TOASTed column. It never becomes data (see `schemas.typed`)."""
    dlq_topic: str = "{topic}.dlq"
    """Dead-letter topic; ``{topic}`` is replaced by the source topic."""
    group_id: str = "tally"
    """Consumer group under which offsets are committed to Kafka, for lag monitoring only."""
    batch_size: Positive = 5000
    """Max records per getmany batch = per RocksDB commit. Bigger: faster, longer commits."""
    replay_batch_size: Positive = 50_000
    """Max records per replay batch/commit. Replays apply big batches as bulk tree rebuilds."""
    replay_chunk: Positive = 500_000
    """Events a replay gathers (last state per id) before one commit and bulk tree build.
    Bigger: fewer rebuilds and faster replays; a crash redoes at most this many events."""
    poll_timeout_ms: NonNegative = 200
    progress_interval: float = 10.0
    """Seconds between info-level progress lines."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    http: str | None = DEFAULT_HTTP
    """HOST:PORT of the HTTP API; None disables it. The host is required (``0.0.0.0`` for
    every interface, which is logged as a warning)."""
    http_max_connections: Positive | None = None
    """Open HTTP connections at most; a connection beyond it is answered 503 and closed at
    once. None (default): what the open-file limit leaves after RocksDB, Kafka and the
    process (`consumers.http.limits.fd_budget`), at most 4096. Higher admits more clients at
    once, each costing a file descriptor and some memory; a cap above what the file limit
    leaves lets clients starve RocksDB of files again."""
    http_idle_timeout: Seconds = 15.0
    """Seconds a connection may sit with no request in flight (after connecting, or after a
    response) before it is closed. Longer spares clients reconnects; shorter frees the
    connections of idle or abandoned clients sooner. A proxy in front should close its idle
    upstream connections sooner than this."""
    http_header_timeout: Seconds = 10.0
    """Seconds from a request's first byte to the end of its headers, else 408 and closed
    (slow-loris clients). Real clients send headers in one packet."""
    http_body_timeout: Seconds = 30.0
    """Seconds to receive a request body (at most 1 MiB) once its headers are in, else 408
    and closed. Raise it only for very slow links."""
    ready_max_lag: NonNegative = 1000
    """/readyz answers 200 while the total lag (events) is at most this."""
    token: str | None = None
    """Bearer token required by state-changing HTTP endpoints (none are served without one)."""
    cache_nodes: int | None = None
    max_node_size: int | None = None

    def topic_for(self, table: str) -> str:
        """The topic ``table``'s changes are read from: `topics`, else `topic_pattern`, else
        the table's own name."""
        topic = self.topics.get(table)
        if topic is not None:
            return topic
        if self.topic_pattern is not None:
            return self.topic_pattern.replace(TABLE_FIELD, table)
        return table

    def check_topic_pattern(self) -> None:
        """A pattern that does not name the table would map every table to one topic."""
        p = self.topic_pattern
        if p is not None and TABLE_FIELD not in p:
            raise ConfigError(
                f"--topic-pattern {p!r} has no {TABLE_FIELD}: it is the topic of every table with "
                f"{TABLE_FIELD} replaced by the table's name, e.g. 'dbz.public.{TABLE_FIELD}' for "
                "Debezium's <topic.prefix>.<schema>.<table>"
            )
