"""`tally demo`: a live leaderboard from a change stream, in one command.

What it does, in order:

1. makes sure a Kafka broker answers (on the default 127.0.0.1:9092 it runs
   the local broker launcher shipped in this package, `tally.consumers.demo.broker`, when
   none does: it fetches Apache Kafka from Maven Central on first use);
2. creates the compacted topic ``tally-demo.scores`` (3 partitions);
3. reads what earlier demo runs left in that topic, so the in-memory oracle
   starts from the same rows the consumer will replay;
4. starts a `ConsumerProcess` in this process (the definitions of
   ``consumers/demo/leaderboard.py``, a fresh data dir under the temp dir unless
   ``--data-dir``, the HTTP API unless ``--no-http``);
5. produces a realistic change stream with `ChangeProducer` — players
   inserting, updating and deleting scores across eight games, with skewed
   player activity and score distributions — while printing, every second
   or two, the answers a leaderboard needs, read from the consumer's store:
   totals, a player's rank, p50/p95, the top 10, how many scores are above
   1000, page 40, per-game counts and a sum;
6. waits until the consumer has committed every produced event, checks the
   final answers (and every item of the three aggregates) against an
   in-memory oracle computed from the produced stream, prints the commands
   to try next, and stops (``--serve`` keeps the consumer and the HTTP API
   running until Ctrl-C).

Exit status (`tally.schemas.errors.EXIT_CODES`): 0 verified, 1 a mismatch or a
runtime failure (broker, store), 2 bad usage, 130 interrupted. Errors are
raised (`DemoFailed` and the rest of the tree) and reported by
`tally.consumers.cli.errors`. The broker address is the one setting
(`tally.schemas.config.DemoSettings`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from decimal import Decimal
from itertools import accumulate
from pathlib import Path
from typing import Any, Final

import msgspec

from tally.consumers.cli.parser import add_config, add_setting, given_settings
from tally.consumers.cli.settings import load
from tally.consumers.signals import on_stop_signals
from tally.engine import AggregateNotReady, Store, TallyError
from tally.schemas import ConfigError
from tally.schemas.config import (
    DEFAULT_BOOTSTRAP_SERVERS,
    DEFAULT_HTTP,
    ConsumerSettings,
    DemoSettings,
)
from tally.schemas.errors import Interrupted, Unreachable, UsageError

__all__ = ["Answers", "ScoreStream", "engine_answers", "oracle_answers", "register"]

PROG: Final = "tally demo"
EXIT_OK: Final = 0

DEFAULT_BOOTSTRAP: Final = DEFAULT_BOOTSTRAP_SERVERS
DEFAULT_TOPIC: Final = "tally-demo.scores"
TABLE: Final = "scores"
PARTITIONS: Final = 3
DEFAULT_EVENTS: Final = 50_000
SHORT_EVENTS: Final = 2_000
DEFAULT_SECONDS: Final = 25.0
"""The stream's target duration without --rate: long enough to watch, short enough to wait for."""
SHORT_SECONDS: Final = 2.0
TOPIC_ALREADY_EXISTS: Final = 36

AGGREGATES: Final = ("by_game", "high_scores", "leaderboard")  # consumers/demo/leaderboard.py
TRACKED_PLAYER: Final = "ana"  # the most active player (Zipf rank 1)
TRACKED_GAME: Final = "chess"  # the most popular game
PAGE_NUMBER: Final = 40
PAGE_SIZE: Final = 25
THRESHOLD: Final = 1000

# name, popularity weight, typical (median) score
GAMES: Final = (
    ("chess", 30, 700),
    ("go", 18, 650),
    ("poker", 14, 520),
    ("tetris", 12, 820),
    ("snake", 9, 450),
    ("pong", 7, 400),
    ("sudoku", 6, 560),
    ("scrabble", 4, 610),
)
NAMES: Final = (
    "ana", "bo", "chen", "dara", "eli", "farah", "gus", "hana", "ivan", "jo", "kai", "lena", "mo",
    "nia", "omar", "pia", "quinn", "ravi", "sol", "tara", "uma", "vik", "wen", "xia", "yara", "zed",
)  # fmt: skip


class DemoFailed(TallyError):
    """The demo could not show what it promised: a mismatch with the oracle, or a broker,
    topic or consumer failure (exit 1, or the exit code of the consumer's error)."""


# ------------------------------------------------------------------ the stream


def player_name(i: int) -> str:
    """ana, bo, …, zed, ana2, bo2, …: player 0 is the tracked (most active) one."""
    base = NAMES[i % len(NAMES)]
    return base if i < len(NAMES) else f"{base}{i // len(NAMES) + 1}"


class ScoreStream:
    """Generates change events of the ``scores`` table and keeps the resulting rows (the oracle).

    One row per (player, game): a player's first score in a game inserts a row,
    later ones update it (usually keeping the personal best), and now and then a
    row is deleted (a reset; the next score inserts a new row with a new id).
    Players' activity is Zipf-like, games' popularity skewed, and scores
    log-normal, so percentiles and the top of the board are interesting.
    """

    def __init__(
        self, rng: random.Random, players: int, rows: dict[Any, dict[str, Any]] | None = None
    ) -> None:
        self.rng = rng
        self.rows: dict[Any, dict[str, Any]] = rows if rows is not None else {}
        self.pairs: dict[tuple[str, str], Any] = {}
        for rid, row in self.rows.items():
            p, g = row.get("player"), row.get("game")
            if isinstance(p, str) and isinstance(g, str):
                self.pairs[(p, g)] = rid
        int_ids = [i for i in self.rows if isinstance(i, int) and not isinstance(i, bool)]
        self.next_id = max(int_ids, default=0) + 1
        self.players = [player_name(i) for i in range(max(1, players))]
        self._cum_players = list(accumulate(1.0 / (i + 1) ** 0.9 for i in range(len(self.players))))
        self.games = [g for g, _, _ in GAMES]
        self._cum_games = list(accumulate(w for _, w, _ in GAMES))
        self._scale = {g: s for g, _, s in GAMES}
        self._skill: dict[str, float] = {}
        self.counts = {"insert": 0, "update": 0, "delete": 0}

    def _score(self, player: str, game: str) -> int:
        skill = self._skill.get(player)
        if skill is None:
            # The tracked player is good, not the best: her rank moves as others play.
            skill = 1.45 if player == TRACKED_PLAYER else self.rng.lognormvariate(0.0, 0.35)
            self._skill[player] = skill
        return max(1, int(self._scale.get(game, 600) * skill * self.rng.lognormvariate(0.0, 0.45)))

    def next(self) -> tuple[str, Any, dict[str, Any] | None]:
        """The next event: (op, row id, new row or None for a delete). Applies it to `rows`."""
        rng = self.rng
        player = rng.choices(self.players, cum_weights=self._cum_players)[0]
        game = rng.choices(self.games, cum_weights=self._cum_games)[0]
        rid = self.pairs.get((player, game))
        if rid is None or rid not in self.rows:
            rid = self.next_id
            self.next_id += 1
            row = {"id": rid, "player": player, "game": game, "score": self._score(player, game)}
            self.rows[rid] = row
            self.pairs[(player, game)] = rid
            self.counts["insert"] += 1
            return "insert", rid, row
        if rng.random() < 0.04:
            del self.rows[rid]
            del self.pairs[(player, game)]
            self.counts["delete"] += 1
            return "delete", rid, None
        old = self.rows[rid].get("score")
        new = self._score(player, game)
        if isinstance(old, int) and rng.random() < 0.75:
            new = max(old, new)  # a personal best stands
        row = {"id": rid, "player": player, "game": game, "score": new}
        self.rows[rid] = row
        self.counts["update"] += 1
        return "update", rid, row

    def tracked_id(self) -> Any:
        return self.pairs.get((TRACKED_PLAYER, TRACKED_GAME))


# ------------------------------------------------------------------ the answers


@dataclass
class Answers:
    """What the demo asks the leaderboard; from the engine, or from the oracle."""

    total: int = 0
    total_sum: int | float | Decimal = 0
    p50: Any = None
    p95: Any = None
    above_threshold: int = 0
    minimum: Any = None
    maximum: Any = None
    top10: list[tuple[Any, Any]] = field(default_factory=list)
    page: list[tuple[Any, Any]] = field(default_factory=list)
    per_game: dict[Any, int] = field(default_factory=dict)
    tracked: tuple[Any, int, int] | None = None
    """(score, rank overall, rank in its game) of the tracked player's row."""
    game_high: int = 0
    """high_scores items with the prefix (TRACKED_GAME,): players with a score >= 1000 there."""


def pct_offset(n: int, p: float) -> int:
    """Nearest-rank percentile: the offset (ascending) of the p-quantile of n items."""
    return max(0, math.ceil(p * n) - 1)


PAGE_OFFSET: Final = (PAGE_NUMBER - 1) * PAGE_SIZE


def engine_answers(store: Store, tracked_id: Any) -> Answers:
    """The answers, read from the store: every read O(log n) (plus the items returned)."""
    lb = store.aggregate("leaderboard")
    bg = store.aggregate("by_game")
    hs = store.aggregate("high_scores")
    a = Answers()
    n = a.total = lb.count()
    a.total_sum = lb.sum()
    if n:
        a.p50 = lb.at(pct_offset(n, 0.50)).key
        a.p95 = lb.at(pct_offset(n, 0.95)).key
        lo, hi = lb.min(), lb.max()
        a.minimum = None if lo is None else (lo.key, lo.id)
        a.maximum = None if hi is None else (hi.key, hi.id)
    a.above_threshold = lb.count(bounds={"lower": {"key": THRESHOLD, "inclusive": False}})
    a.top10 = [(i.key, i.id) for i in lb.paginate(page_size=10, order="desc").items]
    if n > PAGE_OFFSET:
        first = lb.at(n - 1 - PAGE_OFFSET)  # the page's first item, counted from the top
        page = lb.paginate(
            page_size=PAGE_SIZE,
            order="desc",
            bounds={"upper": {"key": first.key, "id": first.id, "inclusive": True}},
        )
        a.page = [(i.key, i.id) for i in page.items]
    a.per_game = {ns: bg.count(namespace=ns) for ns in bg.namespaces()}
    if tracked_id is not None:
        item = bg.get(tracked_id)
        if item is not None:
            a.tracked = (
                item.key,
                lb.index_of(item.key, item.id, order="desc") + 1,
                bg.index_of(item.key, item.id, order="desc", namespace=item.namespace) + 1,
            )
    a.game_high = hs.count(bounds={"prefix": [TRACKED_GAME]})
    return a


def _rank_desc(sorted_asc: list[tuple[Any, Any]], x: tuple[Any, Any]) -> int:
    import bisect

    return len(sorted_asc) - bisect.bisect_right(sorted_asc, x) + 1


def oracle_items(
    rows: dict[Any, dict[str, Any]],
) -> dict[str, dict[Any, list[tuple[Any, Any, Any]]]]:
    """Every item of the three example aggregates, per namespace, sorted: (key, id, sum)."""
    lb: list[tuple[Any, Any, Any]] = []
    bg: dict[Any, list[tuple[Any, Any, Any]]] = {}
    hs: list[tuple[Any, Any, Any]] = []
    for rid, row in rows.items():
        score = row["score"]
        lb.append((score, rid, score))
        bg.setdefault(row["game"], []).append((score, rid, score))
        if score >= THRESHOLD:
            hs.append(((row["game"], row["player"]), rid, score))
    out: dict[str, dict[Any, list[tuple[Any, Any, Any]]]] = {
        "leaderboard": {None: sorted(lb)} if lb else {},
        "by_game": {g: sorted(v) for g, v in sorted(bg.items())},
        "high_scores": {None: sorted(hs)} if hs else {},
    }
    return out


def oracle_answers(rows: dict[Any, dict[str, Any]], tracked_id: Any) -> Answers:
    """The same answers, computed from the rows the stream produced."""
    items = oracle_items(rows)
    lb = items["leaderboard"].get(None, [])
    keys = [(k, i) for k, i, _ in lb]
    a = Answers()
    n = a.total = len(lb)
    a.total_sum = sum(s for _, _, s in lb)
    if n:
        a.p50 = lb[pct_offset(n, 0.50)][0]
        a.p95 = lb[pct_offset(n, 0.95)][0]
        a.minimum, a.maximum = keys[0], keys[-1]
    a.above_threshold = sum(1 for k, _, _ in lb if k > THRESHOLD)
    desc = keys[::-1]
    a.top10 = desc[:10]
    a.page = desc[PAGE_OFFSET : PAGE_OFFSET + PAGE_SIZE]
    a.per_game = {g: len(v) for g, v in items["by_game"].items()}
    row = rows.get(tracked_id) if tracked_id is not None else None
    if row is not None:
        x = (row["score"], tracked_id)
        in_game = [(k, i) for k, i, _ in items["by_game"].get(row["game"], [])]
        a.tracked = (row["score"], _rank_desc(keys, x), _rank_desc(in_game, x))
    a.game_high = sum(1 for k, _, _ in items["high_scores"].get(None, []) if k[0] == TRACKED_GAME)
    return a


def compare(engine: Answers, oracle: Answers) -> list[str]:
    """Names and values of the answers that differ (empty: all equal)."""
    out = []
    for f in fields(Answers):
        e, o = getattr(engine, f.name), getattr(oracle, f.name)
        if e != o:
            out.append(f"{f.name}: engine {_short(e)}, oracle {_short(o)}")
    return out


def compare_items(store: Store, rows: dict[Any, dict[str, Any]]) -> list[str]:
    """Every item of every namespace of the three aggregates, engine vs oracle."""
    out = []
    for name, expected in oracle_items(rows).items():
        agg = store.aggregate(name)
        got_ns = agg.namespaces()
        if sorted(got_ns, key=repr) != sorted(expected, key=repr):
            out.append(
                f"{name}: namespaces engine {_short(got_ns)}, oracle {_short(list(expected))}"
            )
            continue
        for ns, want in expected.items():
            got = [(i.key, i.id, i.sum_value) for i in agg.iter(namespace=ns)]
            if got != want:
                diff = next(
                    (j for j, (x, y) in enumerate(zip(got, want, strict=False)) if x != y),
                    min(len(got), len(want)),
                )
                out.append(
                    f"{name} namespace {ns!r}: {len(got)} items vs {len(want)} expected, first difference "
                    f"at offset {diff}: engine {_short(got[diff : diff + 1])}, oracle {_short(want[diff : diff + 1])}"
                )
    return out


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 160 else text[:157] + "..."


# ------------------------------------------------------------------ broker and topic


def _addresses(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for part in bootstrap.split(","):
        host, _, port = part.strip().rpartition(":")
        try:
            out.append((host.strip("[]") or "127.0.0.1", int(port)))
        except ValueError:
            raise ConfigError(
                f"--bootstrap-servers takes HOST:PORT[,HOST:PORT...], got {bootstrap!r}"
            ) from None
    return out


def broker_answers(bootstrap: str, timeout: float = 1.0) -> bool:
    """True when a TCP connection to one of the bootstrap addresses succeeds."""
    for host, port in _addresses(bootstrap):
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def ensure_broker(bootstrap: str, say: Callable[[str], None]) -> None:
    if broker_answers(bootstrap):
        return
    host_ports = _addresses(bootstrap)
    default = (
        len(host_ports) == 1
        and host_ports[0][1] == 9092
        and host_ports[0][0] in ("127.0.0.1", "localhost")
    )
    if not default:
        raise Unreachable(
            f"no Kafka broker answers at {bootstrap}: start it, or drop --bootstrap-servers to use "
            f"(and auto-start) the local one at {DEFAULT_BOOTSTRAP}"
        )
    launcher = [sys.executable, "-m", f"{__package__}.broker"]
    shown = " ".join(launcher[1:])
    say(
        f"no Kafka broker at {bootstrap}: starting one with `python {shown} start` (the first time downloads it)"
    )
    sys.stdout.flush()
    # Its progress lines go straight to the terminal: the first start can take a while.
    env = {**os.environ, "TALLY_BROKER_PROG": f"python {shown}"}
    res = subprocess.run(
        [*launcher, "start", "--port", "9092"], stdin=subprocess.DEVNULL, check=False, env=env
    )
    if res.returncode != 0 or not broker_answers(bootstrap, timeout=5.0):
        raise DemoFailed(
            f"`python {shown} start` failed (exit {res.returncode}); see its output above"
        )


async def ensure_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> int:
    """Create the compacted demo topic unless it exists; returns its partition count."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        configs = {"cleanup.policy": "compact", "segment.ms": "60000"}
        resp = await admin.create_topics(
            [NewTopic(topic, PARTITIONS, 1, topic_configs=configs)], timeout_ms=int(timeout * 1000)
        )
        for err in resp.topic_errors:
            code = err[1]
            if code not in (0, TOPIC_ALREADY_EXISTS):
                msg = err[2] if len(err) > 2 else ""
                raise DemoFailed(
                    f"creating topic {topic!r} failed: Kafka error {code} {msg or ''}".strip()
                )
        deadline = time.monotonic() + timeout
        while True:
            (meta,) = await admin.describe_topics([topic])
            parts = meta.get("partitions") or []
            if (
                meta.get("error_code") == 0
                and parts
                and all(p.get("leader", -1) >= 0 for p in parts)
            ):
                return len(parts)
            if time.monotonic() > deadline:
                raise DemoFailed(
                    f"topic {topic!r} has no leader after {timeout:g}s: is the broker healthy?"
                )
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def read_topic_rows(
    consumer: Any, topic: str, tps: list[Any]
) -> tuple[dict[Any, dict[str, Any]], int]:
    """The rows the topic holds now (latest image per id, deletes applied) and its record count."""
    from tally.consumers.topics import read_to_end
    from tally.schemas import BadRecord, EventDecoder

    decoder = EventDecoder(topic_tables={topic: TABLE}, known_tables={TABLE})
    rows: dict[Any, dict[str, Any]] = {}
    records = 0
    try:
        async for _tp, msgs in read_to_end(consumer, tps, 120.0, max_records=20000):
            for m in msgs:
                records += 1
                try:
                    ev = decoder.decode(m.key, m.value, topic)
                except BadRecord:
                    continue  # the consumer dead-letters it: no state either way
                if ev.kind == "upsert" and ev.row is not None:
                    rows[ev.id] = ev.row
                elif ev.kind == "delete":
                    rows.pop(ev.id, None)
                elif ev.kind == "truncate":
                    rows.clear()
    except TimeoutError:
        raise DemoFailed(f"reading the existing records of {topic!r} timed out") from None
    return rows, records


# ------------------------------------------------------------------ display


def _n(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return str(v)


@dataclass
class Progress:
    target: int
    started: float = field(default_factory=time.monotonic)
    produced: int = 0
    done: bool = False
    caught_up: bool = False
    acked_end: dict[int, int] = field(default_factory=dict)

    def on_ack(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        md = fut.result()
        if md.offset + 1 > self.acked_end.get(md.partition, 0):
            self.acked_end[md.partition] = md.offset + 1


class View:
    """Turns answers into text: a rich Live panel on a terminal, plain lines otherwise."""

    def __init__(self, stream: ScoreStream, topic: str) -> None:
        self.stream = stream
        self.topic = topic

    def who(self, rid: Any) -> str:
        row = self.stream.rows.get(rid)
        if row is None:
            return f"id {rid}"
        return f"{row.get('player')} · {row.get('game')}"

    def tracked_text(self, a: Answers) -> str:
        if a.tracked is None:
            return f"{TRACKED_PLAYER} has no {TRACKED_GAME} score on the board right now"
        score, overall, in_game = a.tracked
        return f"{TRACKED_PLAYER} ({TRACKED_GAME}) {_n(score)}: #{_n(overall)} overall, #{_n(in_game)} in {TRACKED_GAME}"

    def line(self, a: Answers | str, prog: Progress, lag: int | None, applied: int) -> str:
        elapsed = time.monotonic() - prog.started
        head = (
            f"[{elapsed:5.1f}s] produced {_n(prog.produced)}/{_n(prog.target)} · applied {_n(applied)} · "
            f"lag {_n(lag)} | "
        )
        if isinstance(a, str):
            return head + a
        return head + (
            f"scores {_n(a.total)} · sum {_n(a.total_sum)} · p50 {_n(a.p50)} · "
            f"p95 {_n(a.p95)} · >{THRESHOLD} {_n(a.above_threshold)} · {self.tracked_text(a)}"
        )

    def summary(self, a: Answers) -> list[str]:
        """The final answers, as plain lines: what, the answer, and the engine read behind it."""
        if a.tracked is None:
            tracked = ("—", "(no score right now)")
        else:
            tracked = (
                f"#{_n(a.tracked[1])} overall, #{_n(a.tracked[2])} in {TRACKED_GAME}",
                "index_of(score, id, order='desc') + 1",
            )
        if a.page:
            page = (
                f"#{PAGE_OFFSET + 1}-#{PAGE_OFFSET + len(a.page)}: {_n(a.page[0][0])} … {_n(a.page[-1][0])}",
                f"at(n-{PAGE_OFFSET + 1}), then paginate({PAGE_SIZE}, 'desc', upper bound)",
            )
        else:
            page = (f"— (fewer than {PAGE_OFFSET + 1} scores)", "")
        rows = [
            ("scores on the board", _n(a.total), "leaderboard.count()"),
            ("sum of all scores", _n(a.total_sum), "leaderboard.sum()"),
            ("median / p95 score", f"{_n(a.p50)} / {_n(a.p95)}", "leaderboard.at(ceil(p*n)-1)"),
            (
                f"scores above {THRESHOLD}",
                _n(a.above_threshold),
                f"count(bounds={{lower: {THRESHOLD}, exclusive}})",
            ),
            (
                "lowest / highest",
                f"{_n(a.minimum and a.minimum[0])} / {_n(a.maximum and a.maximum[0])}",
                "min() / max()",
            ),
            (
                f"{TRACKED_PLAYER}'s {TRACKED_GAME} score"
                + ("" if a.tracked is None else f" ({_n(a.tracked[0])})"),
                *tracked,
            ),
            (
                f"{TRACKED_GAME} scores >= {THRESHOLD}",
                _n(a.game_high),
                f"high_scores.count(prefix=['{TRACKED_GAME}'])",
            ),
            (f"page {PAGE_NUMBER} of {PAGE_SIZE}", *page),
        ]
        width = max(len(r[0]) for r in rows)
        vwidth = max(len(r[1]) for r in rows)
        out = [
            f"{label:<{width}}  {value:>{vwidth}}   {how}".rstrip() for label, value, how in rows
        ]
        games = sorted(a.per_game.items(), key=lambda kv: -kv[1])
        out.append(f"{'per game':<{width}}  " + " · ".join(f"{g} {_n(c)}" for g, c in games))
        out.append(
            f"{'top 10':<{width}}  " + ", ".join(f"{_n(k)} {self.who(i)}" for k, i in a.top10)
        )
        return out

    def panel(self, a: Answers | str, prog: Progress, lag: int | None, applied: int) -> Any:
        from rich import box
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        elapsed = time.monotonic() - prog.started
        rate = prog.produced / elapsed if elapsed > 0 else 0.0
        state = (
            "caught up"
            if prog.caught_up
            else "stream done, catching up"
            if prog.done
            else "streaming"
        )
        head = Text(
            f"{state}: {_n(prog.produced)}/{_n(prog.target)} events ({rate:,.0f}/s) · consumer applied "
            f"{_n(applied)} · lag {_n(lag)} · {elapsed:.1f}s",
            style="bold",
        )
        title = f"tally demo · {self.topic}"
        if isinstance(a, str):
            return Panel(Group(head, Text(""), Text(a)), title=title, border_style="blue")
        facts = Table(box=None, show_header=False, padding=(0, 2))
        facts.add_column(style="cyan")
        facts.add_column(justify="right", style="bold")
        facts.add_column(style="dim")
        facts.add_row("scores on the board", _n(a.total), "leaderboard.count()")
        facts.add_row("sum of all scores", _n(a.total_sum), "leaderboard.sum()")
        facts.add_row("median (p50) / p95", f"{_n(a.p50)} / {_n(a.p95)}", "leaderboard.at(offset)")
        facts.add_row(
            f"scores above {THRESHOLD}",
            _n(a.above_threshold),
            f"count(bounds={{lower: {THRESHOLD}, exclusive}})",
        )
        facts.add_row(
            "lowest / highest",
            f"{_n(a.minimum and a.minimum[0])} / {_n(a.maximum and a.maximum[0])}",
            "min() / max()",
        )
        if a.tracked is None:
            facts.add_row(f"{TRACKED_PLAYER} in {TRACKED_GAME}", "—", "(no score right now)")
        else:
            facts.add_row(
                f"{TRACKED_PLAYER} in {TRACKED_GAME} ({_n(a.tracked[0])})",
                f"#{_n(a.tracked[1])} / #{_n(a.tracked[2])}",
                "index_of(score, id, 'desc') + 1",
            )
        facts.add_row(
            f"{TRACKED_GAME} scores ≥ {THRESHOLD}",
            _n(a.game_high),
            f"high_scores.count(prefix=['{TRACKED_GAME}'])",
        )
        top = Table(
            title="top 10 (paginate desc)", box=box.SIMPLE, title_justify="left", padding=(0, 1)
        )
        top.add_column("#", justify="right", style="dim")
        top.add_column("score", justify="right")
        top.add_column("player · game")
        for i, (k, rid) in enumerate(a.top10, 1):
            top.add_row(str(i), _n(k), self.who(rid))
        page = Table(
            title=f"page {PAGE_NUMBER} of {PAGE_SIZE} (at + paginate)",
            box=box.SIMPLE,
            title_justify="left",
            padding=(0, 1),
        )
        page.add_column("#", justify="right", style="dim")
        page.add_column("score", justify="right")
        page.add_column("player · game")
        shown = (
            a.page[:5]
            + ([] if len(a.page) <= 6 else [("…", None)])
            + (a.page[-1:] if len(a.page) > 5 else [])
        )
        for j, (k, rid) in enumerate(shown):
            if k == "…":
                page.add_row("", "…", "")
                continue
            idx = PAGE_OFFSET + 1 + (j if j < 5 else len(a.page) - 1)
            page.add_row(str(idx), _n(k), self.who(rid))
        if not a.page:
            page.add_row("", "—", f"fewer than {PAGE_OFFSET + 1} scores")
        games = Table(
            title="per game (by_game)", box=box.SIMPLE, title_justify="left", padding=(0, 1)
        )
        games.add_column("game")
        games.add_column("scores", justify="right")
        for g, c in sorted(a.per_game.items(), key=lambda kv: -kv[1]):
            games.add_row(str(g), _n(c))
        grid = Table.grid(padding=(0, 3))
        grid.add_row(top, page, games)
        return Panel(
            Group(head, Text(""), facts, Text(""), grid),
            title=title,
            border_style="blue",
        )


# ------------------------------------------------------------------ the run


@dataclass
class Options:
    events: int
    rate: float
    serve: bool
    bootstrap: str
    data_dir: str | None
    topic: str
    http: str | None
    seed: int | None
    interval: float
    live: bool


def _options(args: argparse.Namespace) -> Options:
    short = bool(args.short)
    events = args.events if args.events is not None else (SHORT_EVENTS if short else DEFAULT_EVENTS)
    if events < 1:
        raise UsageError(f"--events must be at least 1, got {events}")
    if args.rate is not None:
        if args.rate < 0:
            raise UsageError(
                f"--rate must be 0 (as fast as possible) or positive, got {args.rate:g}"
            )
        rate = float(args.rate)
    else:
        rate = events / (SHORT_SECONDS if short else DEFAULT_SECONDS)
    settings = load(DemoSettings, given_settings(args, DemoSettings), args.config).settings
    bootstrap = settings.bootstrap_servers
    _addresses(bootstrap)
    http: str | None = None
    if not args.no_http:
        http = args.http or DEFAULT_HTTP
        if importlib.util.find_spec("tally.consumers.http.app") is None:
            if args.http or args.serve:
                raise UsageError(
                    "this build has no HTTP API (consumers/http/app.py); run without --http/--serve"
                )
            http = None
    elif args.http:
        raise UsageError("give --http or --no-http, not both")
    live = sys.stdout.isatty() and not args.plain
    interval = (
        args.interval if args.interval is not None else (0.5 if short else (1.0 if live else 2.0))
    )
    if interval <= 0:
        raise UsageError(f"--interval must be positive, got {interval:g}")
    return Options(
        events=events,
        rate=rate,
        serve=bool(args.serve),
        bootstrap=bootstrap,
        data_dir=args.data_dir,
        topic=args.topic,
        http=http,
        seed=args.seed,
        interval=interval,
        live=live,
    )


def _say(text: str) -> None:
    print(text, flush=True)


def _definitions_path() -> str:
    """The demo's definitions: `leaderboard.py` in this package (a plain definitions file)."""
    return str(Path(__file__).resolve().with_name("leaderboard.py"))


async def _demo(opts: Options) -> int:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from tally.consumers.logs import configure_logging
    from tally.consumers.producer import ChangeProducer, ProduceError
    from tally.consumers.runtime.definitions import load_definitions
    from tally.consumers.runtime.process import ConsumerProcess
    from tally.consumers.runtime.streams import stored_offsets

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    remove_signals = on_stop_signals(loop, lambda _sig: stop.set())

    configure_logging("warning", "auto")
    defs_path = _definitions_path()
    defs = load_definitions(defs_path)
    await asyncio.to_thread(ensure_broker, opts.bootstrap, _say)
    nparts = await ensure_topic(opts.bootstrap, opts.topic)

    reader = AIOKafkaConsumer(
        bootstrap_servers=opts.bootstrap, group_id=None, enable_auto_commit=False
    )
    await reader.start()
    process: ConsumerProcess | None = None
    task: asyncio.Task[int] | None = None
    store: Store | None = None
    try:
        tps = [TopicPartition(opts.topic, p) for p in range(nparts)]
        rows, earlier = await read_topic_rows(reader, opts.topic, tps)
        rng = random.Random(opts.seed)
        players = max(50, min(5000, opts.events // 2))
        stream = ScoreStream(rng, players, rows)
        if earlier:
            _say(
                f"{opts.topic} already holds {earlier:,} records from earlier runs ({len(rows):,} live rows): "
                "the consumer replays them and the oracle starts from them"
            )

        data_dir = opts.data_dir or tempfile.mkdtemp(prefix="tally-demo-")
        store = Store.open(data_dir)
        settings = ConsumerSettings(
            definitions=defs_path,
            bootstrap_servers=opts.bootstrap,
            data_dir=data_dir,
            topics={TABLE: opts.topic},
            group_id="tally-demo",
            http=opts.http,
            progress_interval=2.0,
            log_level="warning",
        )
        process = ConsumerProcess(settings, defs, store)
        task = asyncio.create_task(process.run(install_signals=False))
        _say(
            f"tally demo: {opts.events:,} change events → {opts.topic} ({nparts} partitions, compacted) → "
            f"consumer → {data_dir}" + (f" · HTTP API on http://{opts.http}" if opts.http else "")
        )
        # The consumer fails fast on a bad HTTP address (e.g. the port is taken).
        await asyncio.wait([task], timeout=0.3)
        if task.done():
            _raise_task_error(task)

        view = View(stream, opts.topic)
        prog = Progress(target=opts.events)

        def lag_now() -> int | None:
            assert process is not None
            offs = process.stats.offsets
            if not prog.acked_end:
                return None
            return sum(
                max(0, end - offs.get(TopicPartition(opts.topic, p), 0))
                for p, end in prog.acked_end.items()
            )

        def snapshot() -> Answers | str:
            """The answers, or what the consumer is doing while they are not ready yet."""
            assert store is not None
            try:
                return engine_answers(store, stream.tracked_id())
            except AggregateNotReady as e:
                return _building_note(e.progress)

        def applied() -> int:
            assert process is not None
            return process.stats.events + process.stats.replayed

        def ready() -> bool:
            assert store is not None
            for name in AGGREGATES:
                g = store.generation(name)
                if g is not None and g.state != "ready":
                    return False
            return True

        async def produce() -> None:
            async with ChangeProducer(opts.bootstrap) as producer:
                t0 = loop.time()
                while prog.produced < opts.events and not stop.is_set():
                    if opts.rate > 0:
                        due = min(opts.events, int((loop.time() - t0) * opts.rate) + 1)
                    else:
                        due = min(opts.events, prog.produced + 1000)
                    while prog.produced < due:
                        op, rid, row = stream.next()
                        if op == "delete":
                            fut = await producer.delete(opts.topic, TABLE, rid, tombstone=True)
                        elif op == "insert":
                            assert row is not None
                            fut = await producer.insert(opts.topic, TABLE, row)
                        else:
                            assert row is not None
                            fut = await producer.update(opts.topic, TABLE, row)
                        fut.add_done_callback(prog.on_ack)
                        prog.produced += 1
                    if task is not None and task.done():
                        return
                    await asyncio.sleep(0.02 if opts.rate > 0 else 0)
                await producer.flush()
            prog.done = True

        producer_task = asyncio.create_task(produce())
        live_cm: Any = contextlib.nullcontext()
        live_obj: Any = None
        if opts.live:
            from rich.console import Console
            from rich.live import Live

            live_obj = Live(
                view.panel(snapshot(), prog, None, applied()),
                console=Console(),
                auto_refresh=False,
            )
            live_cm = live_obj
        with live_cm:
            while not producer_task.done():
                await asyncio.wait(
                    [producer_task, task],
                    timeout=opts.interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if task.done():
                    break
                a = snapshot()
                if live_obj is not None:
                    live_obj.update(view.panel(a, prog, lag_now(), applied()), refresh=True)
                else:
                    _say(view.line(a, prog, lag_now(), applied()))
            if task.done():
                producer_task.cancel()
                with contextlib.suppress(BaseException):
                    await producer_task
                _raise_task_error(task)
            try:
                producer_task.result()
            except ProduceError as e:
                raise DemoFailed(f"producing to {opts.topic} failed: {e}") from None
            if stop.is_set():
                _say("interrupted: stopping the consumer")
                raise Interrupted("interrupted")

            # Caught up = every aggregate is ready (no replay still building it) and
            # every partition's committed offset reached its end offset.
            ends = await reader.end_offsets(tps)
            deadline = time.monotonic() + 120
            while True:
                stored = stored_offsets(store)
                behind = {
                    tp: end for tp, end in ends.items() if end > 0 and stored.get(tp, 0) < end
                }
                if not behind and ready():
                    break
                if task.done():
                    _raise_task_error(task)
                if stop.is_set():
                    raise Interrupted("interrupted")
                if time.monotonic() > deadline:
                    detail = ", ".join(
                        f"{tp.partition}: {stored.get(tp, 0)}/{end}" for tp, end in behind.items()
                    )
                    raise DemoFailed(
                        "the consumer did not catch up within 120s "
                        f"(partition: committed/end {detail or 'all done'}; aggregates ready: {ready()})"
                    )
                if live_obj is not None:
                    live_obj.update(
                        view.panel(snapshot(), prog, lag_now(), applied()), refresh=True
                    )
                await asyncio.sleep(0.1)
            got = snapshot()
            if isinstance(got, str):
                raise DemoFailed(f"the aggregates are not ready after catching up: {got}")
            final = got
            prog.caught_up = True
            if live_obj is not None:
                live_obj.update(view.panel(final, prog, 0, applied()), refresh=True)

        elapsed = time.monotonic() - prog.started
        c = stream.counts
        _say(
            f"\nstream done: {prog.produced:,} events ({c['insert']:,} inserts, {c['update']:,} updates, "
            f"{c['delete']:,} deletes) in {elapsed:.1f}s; the consumer applied {applied():,} "
            f"records and is caught up"
        )
        if not opts.live:  # (the live panel above shows the same answers)
            for line in view.summary(final):
                _say("  " + line)
        mismatches = compare(final, oracle_answers(stream.rows, stream.tracked_id()))
        mismatches += compare_items(store, stream.rows)
        if mismatches:
            for m in mismatches:
                print(f"{PROG}: mismatch: {m}", file=sys.stderr)
            raise DemoFailed(f"verification against the in-memory oracle failed: {mismatches[0]}")
        _say(
            "verified against an in-memory oracle: ✓ (every answer above, and every item of "
            "leaderboard, by_game and high_scores)"
        )
        _print_next(data_dir, opts, stream)
        if opts.serve:
            _say(
                f"\nserving: the consumer keeps reading {opts.topic}"
                + (f" and the HTTP API answers on http://{opts.http}" if opts.http else "")
                + "; Ctrl-C to stop"
            )
            waiter = asyncio.create_task(stop.wait())
            await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if task.done():
                _raise_task_error(task)
            _say("stopping: the consumer commits its last batch and exits")
        return EXIT_OK
    finally:
        if process is not None:
            process.request_stop()
        if task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 30)
        with contextlib.suppress(Exception):
            await reader.stop()
        if store is not None:
            store.close()
        remove_signals()


def _building_note(progress: Any) -> str:
    """What a consumer building the aggregates by replay has done so far."""
    text = "the consumer is building the aggregates by replaying the topic"
    if isinstance(progress, dict):
        done, total, pct = progress.get("events"), progress.get("total"), progress.get("percent")
        if isinstance(done, int) and isinstance(total, int) and total:
            text += f": {done:,}/{total:,} events"
        if isinstance(pct, (int, float)):
            text += f" ({pct:.0f}%)"
    return text + "; answers appear once it joins the live stream"


def _raise_task_error(task: asyncio.Task[int]) -> None:
    if task.cancelled():
        raise DemoFailed("the consumer was cancelled")
    exc = task.exception()
    if exc is None:
        raise DemoFailed(f"the consumer stopped early (exit {task.result()})")
    if isinstance(exc, TallyError):
        failed = DemoFailed(f"the consumer failed: {exc.cli_text()}")
        failed.exit_code = exc.exit_code  # a bad setting stays a usage error
        raise failed
    raise DemoFailed(f"the consumer failed: {type(exc).__name__}: {exc}")


def _print_next(data_dir: str, opts: Options, stream: ScoreStream) -> None:
    q = shlex.quote
    src = f"--data-dir {q(data_dir)}"
    tracked = stream.rows.get(stream.tracked_id())
    lines = ["", f"try next (the data dir stays at {data_dir}; delete it when done):"]
    if opts.serve and opts.http:
        src = f"--url http://{opts.http}"
    lines += [
        f"  tally query {src} leaderboard count --lower {THRESHOLD} --lower-exclusive",
        f"  tally query {src} leaderboard at -1",
        f"  tally query {src} by_game page --namespace {TRACKED_GAME} --page-size 10 --order desc",
        f"  tally query {src} high_scores count --prefix {q(msgspec.json.encode([TRACKED_GAME]).decode())}",
    ]
    if tracked is not None:
        lines.append(
            f"  tally query {src} leaderboard index-of {tracked['score']} --id {stream.tracked_id()} --order desc"
            f"   # {TRACKED_PLAYER}'s rank - 1"
        )
    lines.append(f"  tally status {src}")
    if opts.http:
        base = f"http://{opts.http}"
        body = msgspec.json.encode(
            {"bounds": {"lower": {"key": THRESHOLD, "inclusive": False}}}
        ).decode()
        page = msgspec.json.encode(
            {"namespace": TRACKED_GAME, "page_size": 10, "order": "desc"}
        ).decode()
        lines.append(
            "" if opts.serve else "\nwith the HTTP API (`tally demo --serve` keeps it running):"
        )
        lines += [
            f"  curl -s {base}/v1/aggregates/leaderboard/count -d {q(body)}",
            f"  curl -s {base}/v1/aggregates/by_game/paginate -d {q(page)}",
            f"  curl -s {base}/status",
        ]
    for line in lines:
        _say(line)


# ------------------------------------------------------------------ registration


EPILOG: Final = f"""\
examples:
  tally demo                      # {DEFAULT_EVENTS:,} events in about {DEFAULT_SECONDS:g}s, then verify and exit
  tally demo --short              # {SHORT_EVENTS:,} events in a few seconds
  tally demo --serve              # keep the consumer and the HTTP API up afterwards (Ctrl-C stops)
  tally demo --events 200000 --rate 0 --no-http --data-dir ./demo-data

The broker: --bootstrap-servers, $TALLY_BOOTSTRAP_SERVERS, else {DEFAULT_BOOTSTRAP}, which is
started by the bundled launcher (python -m ...demo.broker) when nothing answers there. The topic ({DEFAULT_TOPIC}) is kept
between runs; a new run's oracle starts from what it already holds.
exit status: 0 verified, 1 mismatch or runtime failure, 2 bad usage, 130 interrupted.
The broker address is a setting: --bootstrap-servers, TALLY_BOOTSTRAP_SERVERS, or
bootstrap_servers in the [demo] section (or at top level) of the TOML file (--config).
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the `tally` CLI."""
    p = subparsers.add_parser(
        "demo",
        help="see it work: a live leaderboard from a Kafka change stream, verified against an oracle",
        description=(
            "Produce a realistic change stream of game scores to Kafka, consume it into the "
            "leaderboard aggregates (consumers/demo/leaderboard.py) in this process, show live answers (rank, percentiles, "
            "top 10, pages, per-game counts) as they change, then verify them against an in-memory oracle."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    p.add_argument(
        "--events",
        type=int,
        metavar="N",
        help=f"change events to produce (default {DEFAULT_EVENTS:,}; --short {SHORT_EVENTS:,})",
    )
    p.add_argument(
        "--short",
        action="store_true",
        help=f"a quick run: {SHORT_EVENTS:,} events in about {SHORT_SECONDS:g}s",
    )
    p.add_argument(
        "--rate",
        type=float,
        metavar="PER_S",
        help=f"events per second (default: spread over ~{DEFAULT_SECONDS:g}s; 0 = as fast as possible)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="after the stream, keep the consumer and HTTP API running until Ctrl-C",
    )
    add_setting(
        p,
        DemoSettings,
        "bootstrap_servers",
        metavar="HOST:PORT",
        help="Kafka brokers (the default one is started when nothing answers there)",
    )
    add_config(p)
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the consumer keeps its state (default: a new temp dir)",
    )
    p.add_argument(
        "--topic",
        default=DEFAULT_TOPIC,
        help=f"the compacted topic to use (default {DEFAULT_TOPIC})",
    )
    p.add_argument(
        "--http", metavar="HOST:PORT", help=f"serve the HTTP API here (default {DEFAULT_HTTP})"
    )
    p.add_argument("--no-http", action="store_true", help="do not serve the HTTP API")
    p.add_argument(
        "--seed", type=int, help="random seed of the stream (default: a new one each run)"
    )
    p.add_argument(
        "--interval",
        type=float,
        metavar="SECONDS",
        help="seconds between live updates (default 1 on a terminal, 2 otherwise)",
    )
    p.add_argument(
        "--plain", action="store_true", help="plain lines even on a terminal (no live panel)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``tally demo``; returns the exit code (errors are raised, see `tally.consumers.cli.errors`)."""
    opts = _options(args)
    return asyncio.run(_demo(opts))
