"""The RocksDB layer: one database with the store's column families, primary or secondary.

Knows bytes only: open (creating it, or following a writer as a read-only secondary),
point reads, prefix scans, atomic writes of a `WriteBatch`, close. Everything above it
(`tally.engine.state.store`) decides what the bytes mean.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Final

from rocksdict import AccessType, BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteOptions

from ..errors import StoreLocked, StoreNotFound, TallyError
from .metadata import CF_IDS, CF_LOG, CF_META, CF_NODES, COLUMN_FAMILIES

__all__ = ["BLOCK_CACHE_BYTES", "Database"]

BLOCK_CACHE_BYTES: Final = 64 << 20
"""RocksDB block cache shared by the column families (compressed on-disk blocks)."""


def _cf_options(cache: Cache) -> Options:
    # Bloom filters make the id index's "is this id new?" probe cheap: most
    # inserts look up an id that is not there.
    t = BlockBasedOptions()
    t.set_bloom_filter(10, False)
    t.set_block_cache(cache)
    t.set_cache_index_and_filter_blocks(True)
    t.set_pin_l0_filter_and_index_blocks_in_cache(True)
    o = Options(raw_mode=True)
    o.set_block_based_table_factory(t)
    o.set_memtable_whole_key_filtering(True)
    o.set_memtable_prefix_bloom_ratio(0.1)
    return o


def _db_options(cache: Cache, max_open_files: int) -> Options:
    o = _cf_options(cache)
    o.create_if_missing(True)
    o.create_missing_column_families(True)
    o.increase_parallelism(2)
    o.set_max_background_jobs(2)
    o.set_max_open_files(max_open_files)
    return o


def read_current(path: str) -> bytes:
    """The CURRENT file (names the live MANIFEST): changes when a writer reopens the store."""
    try:
        with open(os.path.join(path, "CURRENT"), "rb") as f:
            return f.read()
    except OSError:
        return b""


class Database:
    """A RocksDB database at ``path`` with the store's four column families.

    ``read_only`` opens a *secondary* instance (safe next to the writer; `catch_up`
    follows its commits). Not thread-safe.
    """

    def __init__(
        self, path: str, *, read_only: bool, sync: bool = False, max_open_files: int = -1
    ) -> None:
        self.path = path
        self.read_only = read_only
        # Table files kept open (-1: all of them, RocksDB's default and what a secondary needs).
        self.max_open_files = -1 if read_only else max_open_files
        self._secondary_dir: str | None = None
        self._wopt = WriteOptions()
        self._wopt.sync = sync
        self._open()

    def _open(self) -> None:
        block_cache = Cache(BLOCK_CACHE_BYTES)
        cfs = {name: _cf_options(block_cache) for name in COLUMN_FAMILIES}
        try:
            if self.read_only:
                if not os.path.exists(os.path.join(self.path, "CURRENT")):
                    raise StoreNotFound(
                        f"no tally store at {self.path!r}",
                        advice="open the path a consumer writes, or start one there first "
                        "(read-only opens never create a store)",
                        hint="check --data-dir (or $TALLY_DATA_DIR), or start a consumer there "
                        "first (read-only opens never create a store)",
                    )
                self.manifest = read_current(self.path)
                if self._secondary_dir is None:
                    self._secondary_dir = tempfile.mkdtemp(prefix="tally-reader-")
                for attempt in range(50):
                    try:
                        self._db = Rdict(
                            self.path,
                            _cf_options(block_cache),
                            column_families=cfs,
                            access_type=AccessType.secondary(self._secondary_dir),
                        )
                        break
                    except Exception as e:
                        # The writer is still creating a brand-new store: give it a moment.
                        if "Column family not found" not in str(e) or attempt == 49:
                            raise
                        time.sleep(0.1)
            else:
                os.makedirs(self.path, exist_ok=True)
                self._db = Rdict(
                    self.path, _db_options(block_cache, self.max_open_files), column_families=cfs
                )
        except TallyError:
            raise
        except Exception as e:
            msg = str(e)
            if "lock" in msg.lower():
                raise StoreLocked(
                    f"cannot open store at {self.path!r}: {msg} — another process is writing this "
                    "store",
                    advice="open it with read_only=True, or stop the other writer",
                    hint="read it with `tally query --data-dir` (read-only), or stop the other "
                    "writer",
                ) from e
            raise TallyError(f"cannot open store at {self.path!r}: {msg}") from e
        db = self._db
        self.nodes = db.get_column_family(CF_NODES)
        self.ids = db.get_column_family(CF_IDS)
        self.log = db.get_column_family(CF_LOG)
        self.meta = db.get_column_family(CF_META)
        self.h_nodes = db.get_column_family_handle(CF_NODES)
        self.h_ids = db.get_column_family_handle(CF_IDS)
        self.h_log = db.get_column_family_handle(CF_LOG)
        self.h_meta = db.get_column_family_handle(CF_META)

    def _close_db(self) -> None:
        # Column-family views keep the DB (and its LOCK) alive: drop them first.
        del self.nodes, self.ids, self.log, self.meta
        del self.h_nodes, self.h_ids, self.h_log, self.h_meta
        self._db.close()
        del self._db
        gc.collect()

    def close(self) -> None:
        self._close_db()
        if self._secondary_dir:
            shutil.rmtree(self._secondary_dir, ignore_errors=True)

    def reopen(self) -> None:
        """Close and open again (a secondary cannot follow a writer that restarted)."""
        self._close_db()
        self._open()

    def catch_up(self) -> bool:
        """Secondary: see the writer's latest commits. False if it restarted (`reopen` then)."""
        if read_current(self.path) != self.manifest:
            return False
        self._db.try_catch_up_with_primary()
        return True

    def write(self, wb: WriteBatch) -> None:
        """Apply ``wb`` atomically (fsynced when opened with ``sync=True``)."""
        self._db.write(wb, self._wopt)

    @staticmethod
    def scan(cf: Rdict, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Keys of ``cf`` starting with ``prefix`` (from ``start``), in order, lazily."""
        it = cf.iter()
        it.seek(prefix if start is None else start)
        while it.valid():
            k = it.key()
            if not k.startswith(prefix):
                break
            yield k, it.value()
            it.next()

    def live_data_size(self) -> int | None:
        return self._db.property_int_value("rocksdb.estimate-live-data-size")
