"""Build a token store once: under a file lock, streaming the source, tokenizing in worker processes.

`ensure_store` is what every builder calls. Under the store's lock it uses a complete, intact store, or removes a
damaged one and the leftovers of killed builds, and builds it again: aside, renamed into place whole. Two runs
racing on one cache folder therefore build it once, and the second uses the first's. The lock is a POSIX record
lock (`fcntl.lockf`): NFS with its lock service honours it between hosts (not a `nolock` or `local_lock` mount,
where only one host's processes exclude each other; Lustre needs `-o flock`), and it is released when its
process dies. Leftovers are removed only when they are surely dead (their process on this host is gone, or
nothing was written to them for 10 minutes), so a lock that does not span hosts costs a double build at worst."""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ftscale.config.data import DataConfig, DataFormat, DataSource
from ftscale.data.examples import DataStats, TokenizedChunk, describe, tokenize_chunk
from ftscale.data.sources import DataError, SourceRow, read_rows
from ftscale.data.token_store import StoreWriter, record_verified, store_problem

log = logging.getLogger("ftscale")

CHUNK_ROWS = 1024  # rows per task: large enough for the batched tokenizer, small enough to keep workers busy
PROGRESS_EVERY_S = 10.0
ABANDONED_AFTER_S = 600.0  # a partial build of another host that nobody wrote to for this long is a leftover


@dataclass(frozen=True)
class StoreRequest:
    source: DataSource
    key: str
    covers: dict  # what the key covers, recorded in the manifest
    folder: Path


def request_for(source: DataSource, cfg: DataConfig, tokenizer) -> StoreRequest:
    from ftscale.data.fingerprint import store_key

    try:
        key, covers = store_key(source, cfg, tokenizer)
    except OSError as e:
        raise DataError(f"{source.path}: cannot be read ({e.strerror or e}{': ' + str(e.filename) if e.filename else ''})") from None
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(source.path).stem)[:40] or "source"
    return StoreRequest(source, key, covers, Path(cfg.cache_dir) / f"{stem}-{key}")


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


# ---- tokenizing in worker processes ------------------------------------------------------------------------------
_worker: dict = {}


def _start_worker(fmt: DataFormat, cfg: DataConfig, tokenizer) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; threads would oversubscribe
    _worker.update(fmt=fmt, cfg=cfg, tokenizer=tokenizer)


def _tokenize_in_worker(items: list[SourceRow]) -> TokenizedChunk:
    return tokenize_chunk(items, _worker["fmt"], _worker["cfg"], _worker["tokenizer"])


def tokenized_chunks(rows: Iterator[SourceRow], fmt: DataFormat, cfg: DataConfig, tokenizer, workers: int) -> Iterator[TokenizedChunk]:
    """The source's rows tokenized, chunk by chunk, in order. The first chunk is tokenized here, so a small source
    starts no process; after it, `workers` processes share the chunks, with a bounded number in flight so a large
    file is streamed, never held."""
    it = iter(rows)
    chunks = iter(lambda: list(itertools.islice(it, CHUNK_ROWS)), [])
    first = next(chunks, None)
    if first is None:
        return
    yield tokenize_chunk(first, fmt, cfg, tokenizer)
    second = next(chunks, None)
    if second is None:
        return
    if workers <= 1:
        for chunk in itertools.chain([second], chunks):
            yield tokenize_chunk(chunk, fmt, cfg, tokenizer)
        return
    # forkserver, not fork: the parent may hold threads (accelerate, W&B, CUDA) whose locks a forked child inherits.
    # An executor, not a Pool: a worker that dies (killed for memory) breaks it with an error instead of a hang.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # imported once by the server: workers start at once, sharing it
    pool = ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(fmt, cfg, tokenizer))
    try:
        pending: deque = deque()
        for chunk in itertools.chain([second], chunks):
            pending.append(pool.submit(_tokenize_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()  # a worker's DataError is raised here
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:  # from result() or, once the pool knows, from submit()
        raise DataError("a tokenizer worker process died (killed for lack of memory?): lower data.num_workers") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """Examples and examples/s while a store builds: a live line on a terminal, a log line every 10 s otherwise."""

    def __init__(self, name: str):
        self.name, self.start, self.last, self.examples = name, time.monotonic(), time.monotonic(), 0
        self.tty = sys.stderr.isatty()

    def update(self, stats: DataStats) -> None:
        self.examples += stats.examples + stats.skipped + stats.dropped + stats.no_loss
        now = time.monotonic()
        if self.tty or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            line = f"tokenizing {self.name}: {self.examples} examples, {self.examples / max(now - self.start, 1e-9):.0f} examples/s"
            if self.tty:
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
            else:
                log.info(line)

    def done(self) -> float:
        if self.tty:
            print(file=sys.stderr)
        return time.monotonic() - self.start


# ---- building under the lock -------------------------------------------------------------------------------------
def _lock(f, flags: int, folder: Path) -> None:
    try:
        fcntl.lockf(f, flags)
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise DataError(
                f"{folder.parent}: this file system has no file locks (Lustre: mount with -o flock; NFS: run its lock "
                "service), so builds cannot exclude each other: point data.cache_dir at another file system"
            ) from None
        raise


@contextmanager
def store_lock(folder: Path):
    with open(folder.with_name(folder.name + ".lock"), "a+b") as f:
        try:
            _lock(f, fcntl.LOCK_EX | fcntl.LOCK_NB, folder)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            log.info("token store %s: another process is building it; waiting for its lock", folder)
            _lock(f, fcntl.LOCK_EX, folder)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def _partial_name(folder: Path) -> str:
    return f"{folder.name}.partial-{socket.gethostname()}-{uuid.uuid4().hex[:12]}"


def _abandoned(partial: Path) -> bool:
    """A leftover of a killed build. Called under the store's lock: a build of this host would hold it, so this
    host's partial builds are all dead; another host's is dead once nothing was written to it for 10 minutes (where
    the lock does not span hosts, that host may still be building)."""
    host = partial.name.rsplit(".partial-", 1)[1].rpartition("-")[0]
    if host == socket.gethostname():
        return True
    try:
        newest = max((p.stat().st_mtime for p in [partial, *(partial.iterdir() if partial.is_dir() else [])]), default=0.0)
    except OSError:  # gone meanwhile, or unreadable: leave it to whoever owns it
        return False
    return time.time() - newest > ABANDONED_AFTER_S


def _sweep(folder: Path) -> None:
    for partial in folder.parent.glob(f"{folder.name}.partial-*"):
        if not _abandoned(partial):
            continue
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def _build(request: StoreRequest, cfg: DataConfig, tokenizer, workers: int) -> None:
    tmp = request.folder.with_name(_partial_name(request.folder))
    writer, stats, progress = StoreWriter(tmp), DataStats(), _Progress(request.source.path)
    try:
        for chunk in tokenized_chunks(read_rows(request.source), request.source.format, cfg, tokenizer, workers):
            writer.append(chunk)
            stats.add(chunk.stats)
            progress.update(chunk.stats)
        writer.finish({"key": request.key, "covers": request.covers, "stats": stats.to_json()})
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)  # an error leaves nothing that looks like a store
        raise
    try:
        os.rename(tmp, request.folder)
    except OSError:  # another host built it meanwhile (a lock that does not span hosts): keep one
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record_verified(request.folder)  # its checksums were computed as it was written: the first start needs no re-hash
    seconds = progress.done()
    rows = stats.examples + stats.skipped + stats.dropped + stats.no_loss
    how = f"{workers} worker processes" if workers > 1 and rows > CHUNK_ROWS else "in process"  # one chunk starts none
    log.info(
        "built token store %s in %.1f s (%.0f examples/s, %s): %s", request.folder, seconds, rows / max(seconds, 1e-9), how, describe(stats)
    )
    if stats.skipped:
        log.warning("skipped %d malformed rows of %s; first: %s", stats.skipped, request.source.path, stats.skipped_where[0])


def ensure_store(request: StoreRequest, cfg: DataConfig, tokenizer) -> bool:
    """Make `request.folder` a complete, verified store; True when it had to be built. A cache folder that cannot
    be written (read-only, full) serves a complete store all the same, and otherwise is a DataError naming it."""
    folder = request.folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with store_lock(folder):
            return _verify_or_build(request, cfg, tokenizer)
    except OSError as e:
        cache = Path(cfg.cache_dir).resolve()
        if e.filename and not Path(e.filename).resolve().is_relative_to(cache):
            raise DataError(f"{request.source.path}: cannot be read ({e.strerror or e}: {e.filename})") from None
        try:
            problem = store_problem(folder, request.key)
        except OSError as unreadable:
            problem = f"unreadable ({unreadable.strerror or unreadable})"
        if problem is None:  # e.g. built ahead with `ftscale preprocess`, mounted read-only
            log.info("token store %s: ready (%s; cache not writable: %s)", folder, request.source.path, e.strerror or e)
            return False
        raise DataError(
            f"data.cache_dir={cfg.cache_dir}: cannot build the token store of {request.source.path} there "
            f"({e.strerror or e}{': ' + str(e.filename) if e.filename else ''}; the store there: {problem}); free space or "
            "point data.cache_dir at a writable folder"
        ) from None


def _verify_or_build(request: StoreRequest, cfg: DataConfig, tokenizer) -> bool:
    folder = request.folder
    _sweep(folder)
    if folder.exists():
        problem = store_problem(folder, request.key)  # a store that cannot be read raises: it is not deleted for that
        if problem is None:
            log.info("token store %s: ready (%s)", folder, request.source.path)
            return False
        log.warning("token store %s is damaged (%s): building it again", folder, problem)
        shutil.rmtree(folder)
    workers = default_workers() if cfg.num_workers is None else cfg.num_workers
    _build(request, cfg, tokenizer, workers)
    return True
