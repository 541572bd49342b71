"""L3 (embedded default): blocks as files in a local directory.

One file per block, named by the key in hex under two levels of fan-out
directories. Writes are atomic: the frame goes to a temporary file in the same
directory tree, optionally fsynced, then `os.replace`d into place, so a reader
(this process or another engine sharing the directory) sees either the whole
frame or no file. Reads check the frame; a bad file is a counted miss and is
deleted. A file larger than the budget is never read, and an error that
concerns one file (a directory in its place, a permission) costs that block
only; errors of the directory as a whole (full, read-only, I/O) mark the tier
unavailable.

The byte budget is kept per process with an LRU index built from the files
present at start-up (oldest modification first); engines sharing one
directory each enforce their own view of it. File work runs in a small thread
pool, never on the event loop.

What it promises: an acknowledged `put` survives the process; with
``fsync=True`` it also survives a machine crash (the file and its directory
entry are synced before `put` returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from kvcache.errors import ConfigError, CorruptBlock, TierUnavailable
from kvcache.framing import Buffer, corruption_reason, open_frame
from kvcache.keys import BlockKey
from kvcache.metrics import StoreMetrics
from kvcache.tiers.base import HitSource, Usage

_T = TypeVar("_T")
_SUFFIX = ".kvb"
#: Errors that mean the directory as a whole cannot serve (the tier is then
#: skipped for a while); any other error concerns one block's file only and
#: costs just that block.
_TIER_WIDE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EMFILE, errno.ENFILE})


class DiskTier:
    """A directory of framed blocks with a byte budget.

    Args:
        path: the directory (created if missing).
        capacity_bytes: budget for the files this process accounts for.
        fsync: sync each file and its directory before acknowledging a put.
        threads: size of the file-work thread pool.
        name: metric label.
        metrics: where to count evictions and corrupt files.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        fsync: bool = False,
        threads: int = 2,
        name: str = "l3",
        metrics: StoreMetrics | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ConfigError(f"disk capacity must be positive, got {capacity_bytes}")
        self._root = Path(path)
        self._tmp = self._root / "tmp"
        self._capacity = capacity_bytes
        self._fsync = fsync
        self._name = name
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"kvcache-{name}")
        self._index: OrderedDict[BlockKey, int] = OrderedDict()
        self._used = 0
        self._started = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def source(self) -> HitSource:
        return "disk"

    def path_of(self, key: BlockKey) -> Path:
        """Where the block of `key` lives (whether or not it exists)."""
        name = key.hex()
        return self._root / name[-2:] / name[-4:-2] / (name + _SUFFIX)

    async def _run(self, fn, *args) -> _T:  # type: ignore[no-untyped-def]
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except OSError as exc:
            raise TierUnavailable(self._name, f"{type(exc).__name__}: {exc}") from exc

    async def start(self) -> None:
        if self._started:
            return
        for _, key, size in sorted(await self._run(self._scan), key=lambda item: item[0]):
            self._index[key] = size
            self._used += size
        await self._evict()
        self._started = True

    def _scan(self) -> list[tuple[float, BlockKey, int]]:
        self._tmp.mkdir(parents=True, exist_ok=True)
        for stale in self._tmp.iterdir():
            stale.unlink(missing_ok=True)
        found: list[tuple[float, BlockKey, int]] = []
        for file in self._root.glob(f"*/*/*{_SUFFIX}"):
            try:
                stat = file.stat()
                key = BlockKey(bytes.fromhex(file.name[: -len(_SUFFIX)]))
            except (OSError, ValueError):
                continue
            found.append((stat.st_mtime, key, stat.st_size))
        return found

    async def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        return await self._run(self._exists_sync, list(keys))

    def _exists_sync(self, keys: list[BlockKey]) -> list[bool]:
        return [self.path_of(key).is_file() for key in keys]

    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        frames, corrupt = await self._run(self._get_sync, list(keys))
        if self._metrics is not None:
            for reason in corrupt:
                self._metrics.checksum_failures.labels(self._name, reason).inc()
        for key, frame in zip(keys, frames):
            if frame is not None and key in self._index:
                self._index.move_to_end(key)
        return frames

    def _read_bounded(self, path: Path) -> bytes | str | None:
        """The file's bytes; None when absent; a reason label when it cannot be a block.

        A file larger than the whole budget (written by another process
        sharing the directory, or planted) is never read into memory.
        """
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size > self._capacity:
                    return "length"
                return file.read(size + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in _TIER_WIDE_ERRNOS:
                raise
            return "unreadable"  # this one file: a directory in its place, no permission, ...

    def _get_sync(self, keys: list[BlockKey]) -> tuple[list[Buffer | None], list[str]]:
        frames: list[Buffer | None] = []
        corrupt: list[str] = []
        for key in keys:
            path = self.path_of(key)
            frame = self._read_bounded(path)
            if frame is None:
                frames.append(None)
                continue
            if isinstance(frame, str):
                corrupt.append(frame)
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
                frames.append(None)
                continue
            try:
                open_frame(key, frame)
            except CorruptBlock as exc:
                corrupt.append(corruption_reason(exc))
                path.unlink(missing_ok=True)
                frames.append(None)
                continue
            frames.append(frame)
        return frames, corrupt

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> None:
        written = await self._run(self._put_sync, list(items))
        for key, size in written:
            self._used -= self._index.pop(key, 0)
            self._index[key] = size
            self._used += size
        await self._evict()

    async def _evict(self) -> None:
        # The index is only touched on the loop thread; the pool only unlinks.
        victims: list[BlockKey] = []
        while self._used > self._capacity and self._index:
            key, size = self._index.popitem(last=False)
            self._used -= size
            victims.append(key)
        if victims:
            await self._run(self._unlink_sync, victims)
            if self._metrics is not None:
                self._metrics.evictions.labels(self._name).inc(len(victims))

    def _put_sync(self, items: list[tuple[BlockKey, Buffer]]) -> list[tuple[BlockKey, int]]:
        written: list[tuple[BlockKey, int]] = []
        dirs: set[Path] = set()
        for key, frame in items:
            size = memoryview(frame).nbytes
            if size > self._capacity:
                continue
            path = self.path_of(key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self._tmp, suffix=".part")
            except OSError as exc:
                if exc.errno in _TIER_WIDE_ERRNOS:
                    raise
                continue  # this block's directory is unusable; the others go on
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(frame)
                    if self._fsync:
                        out.flush()
                        os.fsync(out.fileno())
                os.replace(tmp, path)
            except BaseException as exc:
                Path(tmp).unlink(missing_ok=True)
                if isinstance(exc, OSError) and exc.errno not in _TIER_WIDE_ERRNOS:
                    continue  # e.g. a directory where this block's file goes
                raise
            dirs.add(path.parent)
            written.append((key, size))
        if self._fsync:
            for directory in dirs:
                dir_fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        return written

    def _unlink_sync(self, keys: list[BlockKey]) -> None:
        for key in keys:
            self.path_of(key).unlink(missing_ok=True)

    async def usage(self) -> Usage:
        return Usage(bytes_used=self._used, capacity_bytes=self._capacity, blocks=len(self._index))

    async def aclose(self) -> None:
        self._pool.shutdown(wait=True)
