"""Which ranks build the token stores and how every rank waits for them, without a collective timeout.

Rank 0 builds when every host sees its cache folder (a probe file rank 0 writes tells); otherwise the lowest rank
of each host builds into that host's cache. Each builder's outcome is one verdict on the process group's key-value
store, written once with compare-and-set: "done", its error, or "stale" when rank 0 saw its heartbeat stop for
`stale_after_s`. A counter says how many verdicts stand; every rank polls it (one request a poll, however many
builders) until all are in, however long a build takes. Polling is not a collective, so no timeout applies, and a
builder that died ends the wait with one error on every rank instead of a hang."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store  # the group's own store: no port of ours to open

from ftscale.data.sources import DataError

log = logging.getLogger("ftscale")

POLL_S = 0.5
HEARTBEAT_S = 5.0
WAIT_LOG_EVERY_S = 60.0
LAST_READS_S = 60.0  # how long a rank that may take the store with it stays for the others to read the verdicts


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def host_identity() -> str:
    """This machine: its hostname and boot id (two machines cloned with one hostname still differ)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}/{boot.read_text().strip() if boot.exists() else ''}"


def _probe(cache: Path, nonce: str) -> bool:
    """Rank 0 leaves a file others look for: whether it could (a read-only cache cannot take one)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f".probe-{nonce}").touch()
        return True
    except OSError:
        return False


def build_once(
    cache: Path, names: list[str], rank: int, build: Callable[[], None], stale_after_s: float = 600.0, host: str | None = None
) -> None:
    """Run `build` (which makes every store named in `names` ready under `cache`) on the builder ranks of this
    launch; return on every rank once every builder is done, or raise one DataError on every rank. A single
    process just builds. `host` names this rank's machine (default: `host_identity()`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        build()
        return
    nonce = uuid.uuid4().hex if rank == 0 else None
    probed = _probe(cache, nonce) if rank == 0 else None
    nonce, probed = _broadcast((nonce, probed))  # after the probe exists: whoever receives the nonce can look for it
    views = _gather((bool(probed) and (cache / f".probe-{nonce}").exists(), names, host or host_identity()))
    if rank == 0 and probed:
        (cache / f".probe-{nonce}").unlink()  # every rank has looked: the gather returned
    for r, (_, theirs, where) in enumerate(views):
        if theirs != views[0][1]:
            raise DataError(
                f"rank {r} on {where} sees different data than rank 0 (token stores {theirs} against {views[0][1]}): the "
                "store keys cover each file's path, size, modification time and bytes, and the tokenizer: every node "
                "needs the same files at the same path (copies keeping their modification times), tokenizer and config"
            )
    shared = all(seen for seen, _, _ in views)
    hosts = {where: None for _, _, where in views}
    builders = [0] if shared else [min(r for r, view in enumerate(views) if view[2] == where) for where in hosts]
    if rank == 0:
        who = "rank 0 builds them for all hosts" if shared else f"not shared between hosts: ranks {builders} build, one per host"
        log.info("token stores in %s: %s", cache, who)
    store = dist.PrefixStore(f"ftscale/token-stores/{nonce}/", _get_default_store())
    failed = True
    try:
        if rank in builders:
            _build_and_post(store, rank, build, stale_after_s)
        _wait_for(store, builders, rank, stale_after_s)
        failed = False
    except dist.DistError as e:  # with a plain env:// launch the store lives in rank 0's process
        raise DataError(f"rank {rank} lost the process group's store during the token store build (did rank 0 die?): {e}") from None
    finally:
        # Rank 0 may host the store, and a failing rank's exit may end the launch: both stay until all have read.
        _leave(store, rank, len(views), builders, wait=rank == 0 or failed)


def _verdict(store, builder: int, outcome: str) -> bool:
    """Record `outcome` as the builder's verdict unless one is there already; whether it was recorded (then the
    verdict count goes up, once per builder)."""
    text = outcome.encode("utf-8", "replace").decode()  # the store takes UTF-8; a message may hold anything
    if store.compare_set(f"verdict/{builder}", "", text).decode() != text:
        return False
    store.add("verdicts", 1)
    return True


def _build_and_post(store, rank: int, build: Callable[[], None], stale_after_s: float) -> None:
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            with suppress(Exception):  # a missed beat is not fatal; the next one counts
                store.set(f"alive/{rank}", str(time.monotonic()))
            stop.wait(min(HEARTBEAT_S, stale_after_s / 4))

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        build()
        outcome = "done"
    except BaseException as e:
        outcome = f"failed: {type(e).__name__}: {e}"
        with suppress(Exception):  # the error raised here is the one that matters
            _verdict(store, rank, outcome)
        raise
    finally:
        stop.set()
        beating.join()
    if not _verdict(store, rank, outcome):  # declared dead by rank 0, which waited too long: act as everyone does
        raise DataError(f"rank {rank} finished building the token stores after the other ranks gave up on it")


def _judged(store, builders: list[int], stale_after_s: float) -> DataError | None:
    """Once every verdict is in: the first bad one as the error every rank raises (None: all done)."""
    for b, verdict in zip(builders, store.multi_get([f"verdict/{b}" for b in builders]), strict=True):
        verdict = verdict.decode()
        if verdict.startswith("failed: "):
            return DataError(f"the token store build failed on rank {b}: {verdict.removeprefix('failed: ')}")
        if verdict == "stale":
            return DataError(f"rank {b} stopped building the token stores (no sign of life for {stale_after_s:.0f} s): see its log")
    return None


def _wait_for(store, builders: list[int], rank: int, stale_after_s: float) -> None:
    start = last_log = time.monotonic()
    beats: dict[int, tuple[bytes, float]] = {}  # each builder's last heartbeat and when rank 0 saw it change
    while store.add("verdicts", 0) < len(builders):
        if rank == 0:  # one watcher keeps the store's load flat in the number of ranks
            for b in builders:
                if store.check([f"verdict/{b}"]):
                    continue
                beat = store.get(f"alive/{b}") if store.check([f"alive/{b}"]) else b""
                if beats.get(b, (None,))[0] != beat:
                    beats[b] = (beat, time.monotonic())  # measured here, so clocks of other hosts do not matter
                elif time.monotonic() - beats[b][1] > stale_after_s:
                    _verdict(store, b, "stale")
        if time.monotonic() - last_log >= WAIT_LOG_EVERY_S:
            last_log = time.monotonic()
            log.warning("rank %d: waiting for ranks %s to build the token stores (%.0f s)", rank, builders, last_log - start)
        time.sleep(POLL_S)
    error = _judged(store, builders, stale_after_s)
    if error is not None:
        raise error


def _leave(store, rank: int, world: int, builders: list[int], wait: bool) -> None:
    """Say this rank has read the verdicts; with `wait`, stay (briefly: the others are a poll behind) until every
    rank still alive has (not a builder declared stale)."""
    with suppress(RuntimeError):  # torch's store errors (DistError and a plain timeout) derive from it
        store.set(f"seen/{rank}", "1")
        if wait:
            stale = {b for b in builders if store.check([f"verdict/{b}"]) and store.get(f"verdict/{b}") == b"stale"}
            store.wait([f"seen/{r}" for r in range(world) if r not in stale], timedelta(seconds=LAST_READS_S))
