"""Settings of every `tally` command: one Struct per command, and every default, here.

Each command's settings are resolved by `tally.consumers.cli.settings` from, highest first:

1. its command-line flag (``--data-dir``; `consume` also takes ``--topic`` for `topics`),
2. the environment variable ``TALLY_<FIELD>`` (upper case: ``TALLY_DATA_DIR``),
3. a TOML file (``--config FILE``, else ``$TALLY_CONFIG``, else ``./tally.toml`` if present):
   the command's own section (``[consume]``, ``[query]`` ...) over top-level keys, which
   every command that has a setting of that name shares,
4. the default declared below.

A field's name is its TOML key (``-`` may stand for ``_``), its environment variable and
(with dashes) its flag. `topics` maps table → topic; in the environment it is
``TALLY_TOPICS="scores=pg.public.scores,users=users"``. An empty environment variable
counts as unset. Options that say what one invocation does (produce's ``--topic``,
reconcile's ``--source``, a query's bounds ...) are flags only, not settings.
`topic_pattern` maps every other table (``"dbz.public.{table}"``: Debezium's topic names).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Final, Literal

import msgspec

from tally.schemas.errors import ConfigError
from tally.schemas.typed import DEFAULT_PLACEHOLDER

__all__ = [
    "COMMANDS",
    "DEFAULT_BOOTSTRAP_SERVERS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DATA_DIR",
    "DEFAULT_HTTP",
    "DEFAULT_URL",
    "TABLE_FIELD",
    "ConsumerSettings",
    "DemoSettings",
    "ProduceSettings",
    "ProgressMode",
    "QuerySettings",
    "RebuildSettings",
    "ReconcileSettings",
    "Settings",
    "StatusSettings",
]

DEFAULT_BOOTSTRAP_SERVERS: Final = "127.0.0.1:9092"
"""Kafka brokers, for every command that talks to Kafka (and `ChangeProducer`)."""
DEFAULT_DATA_DIR: Final = "./tally-data"
"""Where a consumer keeps its state, and where the reading commands look for it."""
DEFAULT_HTTP: Final = "127.0.0.1:8750"
"""Where `tally consume` serves its HTTP API."""
DEFAULT_URL: Final = f"http://{DEFAULT_HTTP}"
"""The HTTP API of a consumer with the default address (`TallyClient`'s default)."""
DEFAULT_CONNECT_TIMEOUT: Final = 15.0
"""Seconds `ChangeProducer` (and `tally produce`) wait for a broker to answer."""
DEFAULT_READ_TIMEOUT: Final = 10.0
"""Seconds a command waits for a consumer's HTTP API to answer."""

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
Interval = Annotated[float, msgspec.Meta(ge=0)]
ProgressMode = Literal["auto", "bar", "lines", "none"]
"""Progress on stderr: auto = a bar on a terminal, a line every `progress_interval` s
otherwise; bar; lines; none."""

TABLE_FIELD = "{table}"
"""What `ConsumerSettings.topic_pattern` replaces with a table's name."""


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of the per-command settings; `command` names its TOML section."""

    command: ClassVar[str] = ""


class ConsumerSettings(Settings):
    """What a `tally consume` process needs to know."""

    command: ClassVar[str] = "consume"

    definitions: str | None = None
    """Python file or module whose module-level `TableAggregate`s to maintain."""
    bootstrap_servers: str = DEFAULT_BOOTSTRAP_SERVERS
    data_dir: str = DEFAULT_DATA_DIR
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
    unchanged TOASTed column. It never becomes data (see `tally.schemas.typed`)."""
    dlq_topic: str = "{topic}.dlq"
    """Dead-letter topic; ``{topic}`` is replaced by the source topic."""
    group_id: str | None = None
    """The deployment this process is a member of (Kafka consumer group): every process started
    with the same group id shares the topics' partitions, each keeping the state of the
    partitions it owns under `data_dir` (`tally.consumers.cluster.member`). None (default): one
    process owns every partition; its offsets go to Kafka under ``tally``, for lag tools only."""
    advertise: str | None = None
    """Where the other members reach this member's HTTP API (its URL), when it differs from
    ``http://`` + `http` (a container, NAT, a proxy). Members only."""
    session_timeout_ms: Annotated[int, msgspec.Meta(ge=1000)] = 10_000
    """How long the group waits for a member that stopped heartbeating (killed, frozen, cut
    off) before its partitions move to the others: the failover time. Members only."""
    batch_size: Positive = 5000
    """Max records per getmany batch = per RocksDB commit. Bigger: faster, longer commits."""
    replay_batch_size: Positive = 50_000
    """Max records per replay batch/commit. Replays apply big batches as bulk tree rebuilds."""
    replay_chunk: Positive = 500_000
    """Events a replay gathers (last state per id) before one commit and bulk tree build.
    Bigger: fewer rebuilds and faster replays; a crash redoes at most this many events."""
    poll_timeout_ms: NonNegative = 200
    progress_interval: Interval = 10.0
    """Seconds between info-level progress lines."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    http: str | None = DEFAULT_HTTP
    """HOST:PORT of the HTTP API; None disables it. The host is required (``0.0.0.0`` for
    every interface, which is logged as a warning)."""
    http_max_connections: Positive | None = None
    """Open HTTP connections at most; a connection beyond it is answered 503 and closed at
    once. None (default): what the open-file limit leaves after RocksDB, Kafka and the
    process (`tally.consumers.http.limits.fd_budget`), at most 4096. Higher admits more clients at
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
    stale: Literal["serve", "drop"] = "serve"
    """While a changed definition is rebuilt by replay: serve its old generation, or not."""
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


class RebuildSettings(Settings):
    """`tally rebuild`: through a running consumer (`url`) or in a data dir for its next start."""

    command: ClassVar[str] = "rebuild"
    url: str | None = None
    """A running consumer's HTTP API; None: mark the rebuild in `data_dir` instead."""
    data_dir: str = DEFAULT_DATA_DIR
    token: str | None = None
    """The consumer's bearer token (its `token` setting)."""
    timeout: Seconds = DEFAULT_READ_TIMEOUT


class QuerySettings(Settings):
    """`tally query`: where the answers come from.

    The source is `url` or `data_dir`, whichever the highest layer names (a flag beats
    the environment beats the file); named in the same layer, `url` wins.
    """

    command: ClassVar[str] = "query"
    url: str | None = None
    data_dir: str = DEFAULT_DATA_DIR
    timeout: Seconds = DEFAULT_READ_TIMEOUT
    """Seconds to wait for the HTTP API's answer."""


class StatusSettings(QuerySettings):
    """`tally status`: the query source, and the broker to ask for lag."""

    command: ClassVar[str] = "status"
    bootstrap_servers: str = DEFAULT_BOOTSTRAP_SERVERS


class ProduceSettings(Settings):
    """`tally produce`: the broker, and how to show progress."""

    command: ClassVar[str] = "produce"
    bootstrap_servers: str = DEFAULT_BOOTSTRAP_SERVERS
    timeout: Seconds = DEFAULT_CONNECT_TIMEOUT
    """Seconds to wait for the broker to answer."""
    progress: ProgressMode = "auto"
    progress_interval: Interval = 10.0
    """Seconds between progress lines (``progress = "lines"``, or auto off a terminal)."""


class ReconcileSettings(Settings):
    """`tally reconcile`: the definitions, the store, the consumer to patch through."""

    command: ClassVar[str] = "reconcile"
    definitions: str | None = None
    data_dir: str = DEFAULT_DATA_DIR
    url: str | None = None
    """With ``--patch``: the running consumer to apply the fixes through."""
    token: str | None = None
    bootstrap_servers: str = DEFAULT_BOOTSTRAP_SERVERS
    """Kafka, for a ``kafka:TOPIC`` source."""
    progress: ProgressMode = "auto"
    progress_interval: Interval = 10.0


class DemoSettings(Settings):
    """`tally demo`: only the broker is a setting (its data dir is a new temp dir unless
    ``--data-dir``, so a ``TALLY_DATA_DIR`` meant for a real consumer is never written to)."""

    command: ClassVar[str] = "demo"
    bootstrap_servers: str = DEFAULT_BOOTSTRAP_SERVERS


COMMANDS: Final[dict[str, type[Settings]]] = {
    kind.command: kind
    for kind in (
        ConsumerSettings,
        RebuildSettings,
        QuerySettings,
        StatusSettings,
        ProduceSettings,
        ReconcileSettings,
        DemoSettings,
    )
}
"""TOML section name → the settings of that command."""
