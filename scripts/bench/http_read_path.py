"""The HTTP read path's own cost: the read routes' handlers, without sockets or the server.

    .venv/bin/python scripts/bench/http_read_path.py [--items 100000] [--rounds 5]

`http_api.py` measures requests/s through real connections, where aiohttp's per-request
work dominates and the figure moves with the machine's load. This one times only what
tally's read route does per request — read the body, decode and validate the arguments,
read the store, encode the answer — by awaiting the route handler of ``create_app`` on
prepared `aiohttp.test_utils.make_mocked_request` requests (1,000 different ones per op,
in one process, CPU time, best of ``--rounds``). It only uses ``create_app`` and the router,
so the same file measures an older checkout too (``PYTHONPATH=OLD python THIS_FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import types
import urllib.parse
from typing import Any

from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request

from tally.consumers.http.app import create_app
from tally.consumers.runtime.stats import ConsumerStats
from tally.engine import Store, TableAggregate
from tally.schemas.config import ConsumerSettings

KEY_SPACE = 10**9
_PROTOCOL: Any = types.SimpleNamespace(
    _reading_paused=False, pause_reading=lambda *a, **k: None, resume_reading=lambda *a, **k: None
)
"""What a request body's StreamReader asks of the connection (nothing to pause here)."""


def build(path: str, n: int) -> None:
    rnd = random.Random(1)
    with Store.open(path) as store:
        agg = store.aggregate("bench")
        for start in range(0, n, 5000):
            with store.batch():
                for i in range(start, min(n, start + 5000)):
                    agg.insert(rnd.randrange(KEY_SPACE), i, 1)


def cases(n: int) -> dict[str, tuple[str, str, list[str]]]:
    """name → (method, op, 1,000 request bodies or query strings)."""
    rnd = random.Random(2)

    def rng() -> tuple[int, int]:
        a, b = sorted((rnd.randrange(KEY_SPACE), rnd.randrange(KEY_SPACE)))
        return a, b

    def count() -> str:
        a, b = rng()
        return f'{{"bounds": {{"lower": {{"key": {a}}}, "upper": {{"key": {b}}}}}}}'

    def count_get() -> str:
        a, b = rng()
        return f'bounds={{"lower":{{"key":{a}}},"upper":{{"key":{b}}}}}'

    def page() -> str:
        return f'{{"page_size": 10, "bounds": {{"lower": {{"key": {rng()[0]}}}}}}}'

    def batch() -> str:
        offsets = ",".join(f'{{"offset": {rnd.randrange(n)}}}' for _ in range(10))
        return f'{{"queries": [{offsets}]}}'

    return {
        "POST count": ("POST", "count", [count() for _ in range(1000)]),
        "GET count": ("GET", "count", [count_get() for _ in range(1000)]),
        "POST paginate (10)": ("POST", "paginate", [page() for _ in range(1000)]),
        "POST at_batch (10)": ("POST", "at_batch", [batch() for _ in range(1000)]),
    }


def request(app: Any, method: str, op: str, body: str, loop: asyncio.AbstractEventLoop) -> Any:
    path = f"/v1/aggregates/bench/{op}"
    if method == "GET":
        return make_mocked_request(
            "GET",
            f"{path}?{urllib.parse.quote(body, safe='=&')}",
            match_info={"name": "bench"},
            app=app,
        )
    raw = body.encode()
    payload = StreamReader(_PROTOCOL, 2**16, loop=loop)
    payload.feed_data(raw)
    payload.feed_eof()
    headers = {"Content-Length": str(len(raw)), "Content-Type": "application/json"}
    return make_mocked_request(
        "POST", path, headers=headers, match_info={"name": "bench"}, app=app, payload=payload
    )


async def measure(path: str, n: int, rounds: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    store = Store.open(path)
    process = types.SimpleNamespace(
        store=store,
        definitions=[TableAggregate("bench", table="bench", sort_key="k")],
        stats=ConsumerStats(),
        settings=ConsumerSettings(http=None),
        topics=["bench"],
        table_topics={"bench": "bench"},
        assigned=[],
    )
    app = create_app(process, None)
    handlers = {
        (r.method, r.resource.get_info().get("formatter")): r.handler
        for r in app.router.routes()
        if r.resource is not None
    }
    out = {}
    try:
        for name, (method, op, bodies) in cases(n).items():
            handler = handlers[(method, f"/v1/aggregates/{{name}}/{op}")]
            best = float("inf")
            for _ in range(rounds + 1):  # the first round warms the node cache
                reqs = [request(app, method, op, b, loop) for b in bodies]
                t = time.process_time()
                for req in reqs:
                    resp = await handler(req)
                elapsed = time.process_time() - t
                assert resp.status == 200, resp.text
                best = min(best, elapsed / len(reqs))
            out[name] = best * 1e6
    finally:
        store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per op (best is kept)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tally-bench-read-path-") as d:
        build(d, args.items)
        res = asyncio.run(measure(d, args.items, args.rounds))
    print(f"read route handlers, {args.items:,} items, CPU µs per request (best of {args.rounds}):")
    for name, us in res.items():
        print(f"  {name:<20} {us:8.1f} µs")


if __name__ == "__main__":
    main()
