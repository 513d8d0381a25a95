"""zchat_nb against the seed (Kuchling's ChatSession, ``zchat_nb/seed.py``): same run, same machine, one table.

Usage::

    python -m benchmarks.run            # from the repository root: full sizes (1M messages), a few minutes
    python -m benchmarks.run --quick    # smaller sizes (100k), under two minutes

Every server is a separate process on 127.0.0.1 with a FileStorage in a temporary directory:
``python -m ZEO.runzeo -a 127.0.0.1:PORT -f FILE`` for the seed, ``python -m zchat_nb serve --path
FILE --port 0`` (``zchat-nb serve``, the hardened server users run) for zchat_nb. Every client is a
separate process too (multiprocessing, spawn). Latencies across processes use ``time.time()``,
the one wall clock all processes of the machine share; durations inside a process use
``time.perf_counter()``.

The table is printed and written to ``benchmarks/RESULTS.md`` between ``<!-- run:start -->`` and
``<!-- run:end -->``, leaving the rest of the file alone (``--output`` to change the file).
Importing this module does nothing; nothing here is run by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.helpers import ServerProcess, percentile

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Text of a timed message: "... sent=<time.time() just before add_message>".
SENT = "sent="
#: This script's section of RESULTS.md (other scripts write other sections of it).
MARK_START, MARK_END = "<!-- run:start -->", "<!-- run:end -->"
WORKER_TIMEOUT = 600.0
#: The seed's readers poll this often (the guide's demo slept 1-4 s; a widget would poll faster).
SEED_POLL = 0.1


@dataclass(frozen=True)
class Sizes:
    """How much each measurement does; ``--quick`` shrinks it."""

    delivery: int  # messages timed writer -> reader
    spacing: tuple[float, float]  # seconds between them (uniform)
    ours_sizes: tuple[int, ...]  # room sizes built for idle / history, zchat_nb
    seed_sizes: tuple[int, ...]  # channel sizes built for idle / full read, seed
    idle_calls: int  # idle new_messages() calls timed per size (zchat_nb)
    seed_idle_budget: float  # seconds of idle seed calls per size (each scans the tree)
    cold_repeats: int  # fresh connects timed for history(200)
    seed_cold_repeats: int  # fresh connects timed for the seed's full read
    writers: int  # concurrent writer processes
    per_writer: int  # messages each
    raw_commits: int  # commits of the raw single-client rate
    mean_gap: float = 2.0  # mean seconds between messages in the built rooms


FULL = Sizes(
    delivery=200,
    spacing=(0.02, 0.08),
    ours_sizes=(1_000, 100_000, 1_000_000),
    seed_sizes=(1_000, 100_000),
    idle_calls=2000,
    seed_idle_budget=3.0,
    cold_repeats=5,
    seed_cold_repeats=3,
    writers=8,
    per_writer=150,
    raw_commits=1000,
)
QUICK = Sizes(
    delivery=100,
    spacing=(0.02, 0.08),
    ours_sizes=(1_000, 100_000),
    seed_sizes=(1_000, 100_000),
    idle_calls=1000,
    seed_idle_budget=1.0,
    cold_repeats=3,
    seed_cold_repeats=1,
    writers=8,
    per_writer=60,
    raw_commits=300,
)


# -- small helpers -----------------------------------------------------------------------------


def _seed() -> ModuleType:
    """The baseline module: the guide's ChatSession, kept in the package as ``zchat_nb.seed``."""
    from zchat_nb import seed

    return seed


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def human(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def ms(seconds: float, digits: int = 1) -> str:
    return f"{seconds * 1000:.{digits}f}"


def sent_at(text: str) -> float | None:
    """The send time a timed message carries, or None for other messages."""
    _, sep, tail = text.rpartition(SENT)
    return float(tail) if sep else None


def message_times(n: int, mean_gap: float, rng: random.Random, start: float = 1.7e9) -> Iterator[float]:
    """``n`` increasing send times with exponential gaps: a chat with bursts and pauses."""
    when = start
    for _ in range(n):
        when += rng.expovariate(1 / mean_gap) + 1e-3  # distinct keys, also for the seed's float keys
        yield when


# -- servers -----------------------------------------------------------------------------------


def server_stats(address: tuple[str, int]) -> dict[str, Any]:
    """The server's counters: ``commits``, ``conflicts`` (ConflictErrors it raised at vote), ``loads``..."""
    import ZEO

    storage = ZEO.client(address, wait_timeout=10)
    try:
        return dict(storage.server_status())
    finally:
        storage.close()


# -- worker processes --------------------------------------------------------------------------


def _entry(func: Callable[..., Any], out: Any, args: tuple[Any, ...]) -> None:
    try:
        result: tuple[str, Any] = ("ok", func(*args))
    except BaseException:
        result = ("error", traceback.format_exc())
    out.send(result)
    out.close()


@dataclass
class Worker:
    """A child process running one of the ``w_*`` functions; :meth:`result` waits for its answer."""

    name: str
    process: Any
    inbox: Any

    def result(self, timeout: float = WORKER_TIMEOUT) -> Any:
        if not self.inbox.poll(timeout):
            self.process.kill()
            raise RuntimeError(f"worker {self.name} gave no result within {timeout:g} s")
        try:
            status, value = self.inbox.recv()
        except EOFError:
            self.process.join(30)
            raise RuntimeError(f"worker {self.name} died (exit code {self.process.exitcode})") from None
        self.process.join(30)
        if status != "ok":
            raise RuntimeError(f"worker {self.name} failed:\n{value}")
        return value


def spawn(ctx: Any, func: Callable[..., Any], *args: Any) -> Worker:
    inbox, out = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_entry, args=(func, out, args), name=func.__name__, daemon=True)
    process.start()
    out.close()
    return Worker(func.__name__, process, inbox)


def _seed_db(address: tuple[str, int]) -> Any:
    """A DB on a plain ClientStorage, as the guide opens it (default caches)."""
    import ZODB
    from ZEO.ClientStorage import ClientStorage

    return ZODB.DB(ClientStorage(address))


def w_ours_reader(address: tuple[str, int], room: str, n: int, ready: Any, limit: float) -> list[float]:
    """Block in new_messages(timeout=...) and time each timed message from its send to here."""
    import zchat_nb

    with zchat_nb.connect(address, user="reader") as client:
        session = client.session(room, backlog=0)
        session.new_messages()  # creates the room; the cursor starts at its end
        ready.set()
        latencies: list[float] = []
        deadline = time.monotonic() + limit
        while len(latencies) < n and time.monotonic() < deadline:
            batch = session.new_messages(timeout=max(0.0, deadline - time.monotonic()))
            now = time.time()
            latencies += [now - t for t in (sent_at(m.text) for m in batch) if t is not None]
        return latencies


def w_ours_timed_writer(
    address: tuple[str, int], room: str, n: int, spacing: tuple[float, float], seed: int
) -> int:
    import zchat_nb

    rng = random.Random(seed)
    with zchat_nb.connect(address, user="writer") as client:
        session = client.session(room, backlog=0)
        session.add_message("warm-up")  # loads the room's objects; not timed
        for i in range(n):
            time.sleep(rng.uniform(*spacing))  # pacing, not waiting for anything
            session.add_message(f"message {i} {SENT}{time.time()!r}")
    return n


def w_seed_reader(address: tuple[str, int], channel: str, n: int, ready: Any, limit: float) -> list[float]:
    """The seed's way: begin a transaction, call new_messages(), sleep 100 ms; repeat."""
    import transaction

    seed = _seed()
    db = _seed_db(address)
    try:
        session = seed.get_chat_session(db.open(), channel)
        session.new_messages()
        ready.set()
        latencies: list[float] = []
        deadline = time.monotonic() + limit
        while len(latencies) < n and time.monotonic() < deadline:
            transaction.begin()  # applies the invalidations received since the last poll
            batch = session.new_messages()
            now = time.time()
            latencies += [now - t for t in (sent_at(m) for m in batch) if t is not None]
            time.sleep(SEED_POLL)
        return latencies
    finally:
        transaction.abort()
        db.close()


def w_seed_timed_writer(
    address: tuple[str, int], channel: str, n: int, spacing: tuple[float, float], seed_: int
) -> int:
    seed = _seed()
    rng = random.Random(seed_)
    db = _seed_db(address)
    try:
        session = seed.get_chat_session(db.open(), channel)
        session.add_message("warm-up")
        for i in range(n):
            time.sleep(rng.uniform(*spacing))
            session.add_message(f"message {i} {SENT}{time.time()!r}")
        return n
    finally:
        db.close()


def w_raw_setup(address: tuple[str, int], tags: Sequence[str]) -> None:
    """One small object per raw committer, made before they start (root changes do not merge)."""
    import transaction
    from BTrees.OOBTree import OOBTree
    from persistent.mapping import PersistentMapping

    db = _seed_db(address)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        conn.root()["bench-raw"] = OOBTree({tag: PersistentMapping() for tag in tags})
        tm.commit()
    finally:
        db.close()


def w_raw_commits(address: tuple[str, int], n: int, barrier: Any | None, tag: str) -> dict[str, Any]:
    """A client committing a small change to its own simple object, as fast as it can."""
    db = _seed_db(address)
    try:
        return _timed_commits(db, n, barrier, tag)
    finally:
        db.close()


def w_client_commits(address: tuple[str, int], n: int, barrier: Any, tag: str) -> dict[str, Any]:
    """:func:`w_raw_commits` through zchat_nb's client (``connect()``'s ZEO client) instead of ZEO's."""
    import zchat_nb

    with zchat_nb.connect(address, user=f"writer-{tag}") as client:
        return _timed_commits(client.db, n, barrier, tag)


def _timed_commits(db: Any, n: int, barrier: Any | None, tag: str) -> dict[str, Any]:
    import transaction

    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    counter = conn.root()["bench-raw"][tag]
    for i in range(20):  # warm-up (the result's "warm-ups")
        counter["n"] = i
        tm.commit()
    if barrier is not None:
        barrier.wait(120)
    latencies = []
    start, cpu = time.time(), time.process_time()
    for i in range(n):
        t = time.perf_counter()
        counter["n"] = i
        tm.commit()
        latencies.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    return {"start": start, "end": time.time(), "latencies": latencies, "cpu": cpu, "warm-ups": 20}


def run_concurrently(ctx: Any, func: Callable[..., Any], count: int, *args: Any) -> list[dict[str, Any]]:
    """Start ``count`` processes of ``func(*args, barrier, tag)``, release them at once, collect."""
    barrier = ctx.Barrier(count + 1)
    workers = [spawn(ctx, func, *args, barrier, f"w{k}") for k in range(count)]
    try:
        barrier.wait(120)
    except threading.BrokenBarrierError:
        for w in workers:
            w.result(5)  # raises the first worker's own error, if it has one
        raise
    return [w.result() for w in workers]


def aggregate_rate(done: Sequence[dict[str, Any]]) -> float:
    """Timed commits of all processes / (last end - first start)."""
    count = sum(len(d["latencies"]) for d in done)
    return count / (max(d["end"] for d in done) - min(d["start"] for d in done))


def w_ours_writer(address: tuple[str, int], room: str, n: int, barrier: Any, tag: str) -> dict[str, Any]:
    """One of the concurrent writers: send ``n`` messages as fast as add_message returns."""
    import zchat_nb

    with zchat_nb.connect(address, user=f"writer-{tag}") as client:
        session = client.session(room, backlog=0)
        ids = [session.add_message(f"{tag} warm-up").id]
        retries: list[int] = []  # conflicts retried per message, from the client's "commit" events
        client.subscribe(lambda e: retries.append(e.details.get("conflicts", 0)), kinds={"commit"})
        barrier.wait(120)
        latencies = []
        start, cpu = time.time(), time.process_time()
        for i in range(n):
            t = time.perf_counter()
            ids.append(session.add_message(f"{tag} {i}").id)
            latencies.append(time.perf_counter() - t)
        end, cpu = time.time(), time.process_time() - cpu
        return {
            "start": start,
            "end": end,
            "latencies": latencies,
            "sent": ids,
            "retries": retries,
            "cpu": cpu,
            "warm-ups": 1,
        }


def w_seed_writer(address: tuple[str, int], channel: str, n: int, barrier: Any, tag: str) -> dict[str, Any]:
    seed = _seed()
    db = _seed_db(address)
    try:
        session = seed.get_chat_session(db.open(), channel)
        sent = [f"{tag} warm-up"]
        session.add_message(sent[0])
        barrier.wait(120)
        latencies = []
        start = time.time()
        for i in range(n):
            text = f"{tag} {i}"
            t = time.perf_counter()
            session.add_message(text)
            latencies.append(time.perf_counter() - t)
            sent.append(text)
        return {"start": start, "end": time.time(), "latencies": latencies, "sent": sent}
    finally:
        db.close()


def w_ours_read_all(address: tuple[str, int], room: str) -> list[str]:
    import zchat_nb

    with zchat_nb.connect(address, user="auditor") as client:
        session = client.session(room)
        ids: list[str] = []
        # One call returns a bounded batch (model.MAX_PER_CALL): read until it is not behind.
        while True:
            batch = session.new_messages()
            ids += [m.id for m in batch]
            if not batch and not session.behind:
                return ids


def w_seed_read_all(address: tuple[str, int], channel: str) -> list[str]:
    seed = _seed()
    db = _seed_db(address)
    try:
        return list(seed.get_chat_session(db.open(), channel).new_messages())
    finally:
        db.close()


def w_ours_idle(address: tuple[str, int], room: str, calls: int) -> dict[str, Any]:
    """Time new_messages() when nothing is new (its cursor is at the end of a big room)."""
    import zchat_nb

    with zchat_nb.connect(address, user="idle") as client:
        session = client.session(room, backlog=0)
        returned = len(session.new_messages())
        for _ in range(20):
            session.new_messages()
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            returned += len(session.new_messages())
            times.append(time.perf_counter() - t)
        return {"times": times, "returned": returned}


def w_seed_idle(address: tuple[str, int], channel: str, budget: float) -> dict[str, Any]:
    """The seed's idle poll (begin + new_messages) after a first call delivered everything."""
    import transaction

    seed = _seed()
    db = _seed_db(address)
    try:
        session = seed.get_chat_session(db.open(), channel)
        first = len(session.new_messages())
        times: list[float] = []
        returned = 0
        while len(times) < 3 or (sum(times) < budget and len(times) < 1000):
            t = time.perf_counter()
            transaction.begin()
            returned += len(session.new_messages())
            times.append(time.perf_counter() - t)
        return {"times": times, "returned": returned, "first": first}
    finally:
        transaction.abort()
        db.close()


def w_ours_cold_history(address: tuple[str, int], room: str, repeats: int) -> dict[str, Any]:
    """history(200) right after a fresh connect: empty ZEO cache and object cache."""
    import zchat_nb

    cold, warm = [], []
    for _ in range(repeats):
        with zchat_nb.connect(address, user="history", cache_size=1 << 20) as client:
            session = client.session(room, backlog=0)
            t = time.perf_counter()
            found = session.history(200)
            cold.append(time.perf_counter() - t)
            assert len(found) == 200, len(found)
            t = time.perf_counter()
            session.history(200)
            warm.append(time.perf_counter() - t)
    return {"cold": cold, "warm": warm}


def w_seed_cold_read(address: tuple[str, int], channel: str, repeats: int) -> dict[str, Any]:
    """The seed's only way to the last 200: a fresh client's first new_messages() reads them all."""
    seed = _seed()
    cold = []
    for _ in range(repeats):
        db = _seed_db(address)
        try:
            t = time.perf_counter()
            last = seed.get_chat_session(db.open(), channel).new_messages()[-200:]
            cold.append(time.perf_counter() - t)
            assert len(last) == 200, len(last)
        finally:
            db.close()
    return {"cold": cold}


# -- building big databases directly (no server) -----------------------------------------------


def build_ours(path: Path, sizes: Sequence[int], mean_gap: float, batch: int = 20_000) -> None:
    """A FileStorage with one zchat_nb room per size ("r1k", "r1M", ...), 20 writers each."""
    import transaction
    import ZODB
    from BTrees.OOBTree import OOBTree
    from ZODB.FileStorage import FileStorage

    from zchat_nb.model import ROOMS_KEY, Message, Room

    db = ZODB.DB(FileStorage(str(path)))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        rooms = conn.root()[ROOMS_KEY] = OOBTree()
        tm.commit()
        rng = random.Random(1)
        for size in sizes:
            name = f"r{human(size)}"
            room = rooms[name] = Room(name, created=1.7e9)
            writers = [f"{k:016x}" for k in range(20)]
            for i, when in enumerate(message_times(size, mean_gap, rng)):
                k = i % 20
                room.append(writers[k], Message(f"{i:032x}", f"user{k}", f"message number {i}", when))
                if (i + 1) % batch == 0:
                    tm.commit()
                    conn.cacheMinimize()
            tm.commit()
            conn.cacheMinimize()
    finally:
        db.close()


def build_seed(path: Path, sizes: Sequence[int], mean_gap: float, batch: int = 20_000) -> None:
    """A FileStorage in the seed's layout, one channel per size ("s1k", "s100k", ...)."""
    import transaction
    import ZODB
    from BTrees.OOBTree import OOBTree
    from ZODB.FileStorage import FileStorage

    seed = _seed()
    db = ZODB.DB(FileStorage(str(path)))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        sessions = conn.root()[seed.SESSIONS_KEY] = OOBTree()
        tm.commit()
        rng = random.Random(1)
        for size in sizes:
            name = f"s{human(size)}"
            session = sessions[name] = seed.ChatSession(name)
            for i, when in enumerate(message_times(size, mean_gap, rng)):
                session._messages[when] = f"user{i % 20}: message number {i}"
                if (i + 1) % batch == 0:
                    tm.commit()
                    conn.cacheMinimize()
            tm.commit()
            conn.cacheMinimize()
    finally:
        db.close()


# -- the measurements --------------------------------------------------------------------------


@dataclass
class Row:
    measure: str
    seed: str
    ours: str
    target: str = ""
    met: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, measure: str, seed: str, ours: str, target: str = "", ok: bool | None = None) -> None:
        met = "" if ok is None else ("yes" if ok else "**no**")
        self.rows.append(Row(measure, seed, ours, target, met))
        print(
            f"  {measure}: seed {seed} | zchat_nb {ours}" + (f" | target {target}: {met}" if target else "")
        )

    def table(self) -> str:
        lines = [
            "| Measure | Seed (runzeo) | zchat_nb (zchat-nb serve) | Target | Met |",
            "|---|---:|---:|---|---|",
        ]
        lines += [f"| {r.measure} | {r.seed} | {r.ours} | {r.target} | {r.met} |" for r in self.rows]
        return "\n".join(lines)


def measure_delivery(
    ctx: Any, sizes: Sizes, seed_srv: ServerProcess, ours_srv: ServerProcess, rep: Report
) -> None:
    n = sizes.delivery
    limit = n * sizes.spacing[1] + 60
    results: dict[str, list[float]] = {}
    for label, srv, reader, writer in (
        ("seed", seed_srv, w_seed_reader, w_seed_timed_writer),
        ("ours", ours_srv, w_ours_reader, w_ours_timed_writer),
    ):
        ready = ctx.Event()
        r = spawn(ctx, reader, srv.address, "delivery", n, ready, limit)
        if not ready.wait(60):
            raise RuntimeError(f"{label} delivery reader not ready within 60 s: {r.result(1)}")
        w = spawn(ctx, writer, srv.address, "delivery", n, sizes.spacing, 7)
        w.result()
        results[label] = r.result()
    s, o = results["seed"], results["ours"]
    for label, got in results.items():
        if len(got) != n:
            rep.notes.append(f"delivery ({label}): the reader got {len(got)} of {n} timed messages")
    title = f"Delivery writer→reader process, {n} msgs"
    rep.add(f"{title}: p50 (ms)", ms(median(s)), ms(median(o)), "≤ 8 ms", median(o) <= 0.008)
    rep.add(
        f"{title}: p95 (ms)",
        ms(percentile(s, 95)),
        ms(percentile(o, 95)),
        "≤ 20 ms",
        percentile(o, 95) <= 0.020,
    )
    rep.add(f"{title}: max (ms)", ms(max(s)), ms(max(o)))


def measure_writers(
    ctx: Any, sizes: Sizes, seed_srv: ServerProcess, ours_srv: ServerProcess, rep: Report
) -> None:
    k = sizes.writers
    tags = ["single", *(f"w{i}" for i in range(k))]
    raw1: dict[str, dict[str, Any]] = {}
    rawk: dict[str, float] = {}
    runs: dict[str, dict[str, Any]] = {}
    for label, srv, writer, read_all in (
        ("seed", seed_srv, w_seed_writer, w_seed_read_all),
        ("ours", ours_srv, w_ours_writer, w_ours_read_all),
    ):
        spawn(ctx, w_raw_setup, srv.address, tags).result()
        raw1[label] = spawn(ctx, w_raw_commits, srv.address, sizes.raw_commits, None, "single").result()
        raw1[label]["rate"] = aggregate_rate([raw1[label]])
        rawk[label] = aggregate_rate(run_concurrently(ctx, w_raw_commits, k, srv.address, sizes.per_writer))
        # Create the room / channel first: the seed's get_chat_session does not retry conflicts.
        spawn(ctx, read_all, srv.address, "writers").result()
        before = server_stats(srv.address)
        done = run_concurrently(ctx, writer, k, srv.address, "writers", sizes.per_writer)
        after = server_stats(srv.address)
        stored = spawn(ctx, read_all, srv.address, "writers").result()
        sent = [x for d in done for x in d["sent"]]
        runs[label] = {
            "rate": aggregate_rate(done),
            "latencies": [x for d in done for x in d["latencies"]],
            "lost": len(set(sent) - set(stored)),
            "duplicates": len(stored) - len(set(stored)),
            "conflicts": after["conflicts"] - before["conflicts"],
            "resolved": after.get("conflicts_resolved", 0) - before.get("conflicts_resolved", 0),
            "retries": [x for d in done for x in d.get("retries", [])],
            "commits": after["commits"] - before["commits"],
        }
    s, o = runs["seed"], runs["ours"]
    rs, ro = raw1["seed"]["rate"], raw1["ours"]["rate"]
    rep.add(
        "Raw ZEO commits/s, 1 client, small change to one object (p50 ms)",
        f"{rs:.0f} ({ms(median(raw1['seed']['latencies']), 2)})",
        f"{ro:.0f} ({ms(median(raw1['ours']['latencies']), 2)})",
    )
    rep.add(
        f"Raw ZEO commits/s, {k} client processes, each its own object (the machine's ceiling)",
        f"{rawk['seed']:.0f}",
        f"{rawk['ours']:.0f}",
    )
    title = f"{k} writer processes × {sizes.per_writer} msgs"
    rep.add(f"{title}: aggregate msgs/s", f"{s['rate']:.0f}", f"{o['rate']:.0f}")
    rep.add(
        f"{title}: aggregate / raw 1-client rate",
        f"{s['rate'] / rs:.2f}",
        f"{o['rate'] / ro:.2f}",
        "≥ 0.8",
        o["rate"] / ro >= 0.8,
    )
    rep.add(
        f"{title}: aggregate / raw {k}-client rate",
        f"{s['rate'] / rawk['seed']:.2f}",
        f"{o['rate'] / rawk['ours']:.2f}",
        "≥ 0.9",
        o["rate"] / rawk["ours"] >= 0.9,
    )
    rep.add(f"{title}: per-commit p50 (ms)", ms(median(s["latencies"])), ms(median(o["latencies"])))
    rep.add(
        f"{title}: per-commit p99 (ms)",
        ms(percentile(s["latencies"], 99)),
        ms(percentile(o["latencies"], 99)),
        "≤ 50 ms",
        percentile(o["latencies"], 99) <= 0.050,
    )
    rep.add(
        f"{title}: lost / duplicated",
        f"{s['lost']} / {s['duplicates']}",
        f"{o['lost']} / {o['duplicates']}",
        "0 lost",
        o["lost"] == 0 and o["duplicates"] == 0,
    )
    rep.add(
        f"{title}: conflicts the server could not resolve / commits",
        f"{s['conflicts']} / {s['commits']}",
        f"{o['conflicts']} / {o['commits']}",
    )
    rep.add(
        f"{title}: conflicts the server resolved (merged) / commits",
        f"{s['resolved']} / {s['commits']}",
        f"{o['resolved']} / {o['commits']}",
        "none per message",
        o["resolved"] <= o["commits"] // 100,
    )
    if o["retries"]:
        hit = sum(1 for r in o["retries"] if r)
        rep.add(
            f"{title}: messages that needed a conflict retry (most retries for one)",
            "—",
            f"{hit} of {len(o['retries'])} ({max(o['retries'])})",
        )


def _idle_cell(found: dict[str, Any] | None, what: str, rep: Report) -> str:
    if found is None:
        return "—"
    cell = ms(median(found["times"]), 3)
    if found["returned"]:
        calls = len(found["times"])
        cell += f" (returned {found['returned']} msgs in {calls} idle calls)"
        rep.notes.append(
            f"{what}: idle calls returned {found['returned']} messages in {calls} calls. The seed's"
            " cursor `_v_last_time` lives on the ChatSession object; its scan loads more buckets than"
            " the connection's object cache keeps (400 objects by default), so the cache GC at the next"
            " `begin()` turns the ChatSession back into a ghost, the volatile cursor is gone, and the"
            " call after that re-delivers the whole history (seen on every other call)."
        )
    return cell


def measure_big(ctx: Any, sizes: Sizes, tmp: Path, rep: Report) -> None:
    ours_fs, seed_fs = tmp / "ours-big.fs", tmp / "seed-big.fs"
    t = time.perf_counter()
    build_ours(ours_fs, sizes.ours_sizes, sizes.mean_gap)
    build_seed(seed_fs, sizes.seed_sizes, sizes.mean_gap)
    built = time.perf_counter() - t
    print(
        f"  built {ours_fs.stat().st_size / 1e6:.0f} + {seed_fs.stat().st_size / 1e6:.0f} MB in {built:.0f} s"
    )
    big, seed_big = max(sizes.ours_sizes), max(sizes.seed_sizes)
    with (
        ServerProcess(seed_fs, kind="runzeo", log_path=tmp / "seed-big.log") as seed_srv,
        ServerProcess(ours_fs, log_path=tmp / "ours-big.log") as ours_srv,
    ):
        idle_ours = {
            n: spawn(ctx, w_ours_idle, ours_srv.address, f"r{human(n)}", sizes.idle_calls).result()
            for n in sizes.ours_sizes
        }
        idle_seed = {
            n: spawn(ctx, w_seed_idle, seed_srv.address, f"s{human(n)}", sizes.seed_idle_budget).result()
            for n in sizes.seed_sizes
        }
        seed_read = spawn(
            ctx, w_seed_cold_read, seed_srv.address, f"s{human(seed_big)}", sizes.seed_cold_repeats
        ).result()
        history = {
            n: spawn(ctx, w_ours_cold_history, ours_srv.address, f"r{human(n)}", sizes.cold_repeats).result()
            for n in sizes.ours_sizes
        }
    for n in sorted(set(sizes.ours_sizes) | set(sizes.seed_sizes)):
        ok = median(idle_ours[n]["times"]) <= 0.0001 if n == big else None
        rep.add(
            f"Idle `new_messages()` at {human(n)} msgs, p50 (ms)",
            _idle_cell(idle_seed.get(n), f"seed at {human(n)}", rep),
            _idle_cell(idle_ours.get(n), f"zchat_nb at {human(n)}", rep),
            "≤ 0.1 ms" if n == big else "",
            ok,
        )
    seed_cell = f"{ms(median(seed_read['cold']), 0)} (full read)"
    for n in sizes.ours_sizes:
        cold, warm = history[n]["cold"], history[n]["warm"]
        rep.add(
            f"`history(200)` at {human(n)} msgs, cold client, median (ms)",
            seed_cell if n == seed_big else "—",
            f"{ms(median(cold))} (max {ms(max(cold))}; warm {ms(median(warm), 2)})",
            "≤ 50 ms" if n == big else "",
            median(cold) <= 0.050 if n == big else None,
        )
    if seed_big not in sizes.ours_sizes:
        rep.add(f"Seed's last 200 at {human(seed_big)}, cold client (ms)", seed_cell, "—")


# -- the report --------------------------------------------------------------------------------


def machine_facts() -> list[str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    versions = ", ".join(
        f"{d} {version(d)}" for d in ("ZODB", "ZEO", "BTrees", "persistent", "transaction", "zchat_nb")
    )
    return [
        f"- Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; {versions}; zchat_nb commit {commit or '?'}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes (100k instead of 1M); < 2 minutes"
    )
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="where to write the table")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    ctx = multiprocessing.get_context("spawn")
    load_before = os.getloadavg()
    started = time.perf_counter()
    rep = Report()
    with tempfile.TemporaryDirectory(prefix="zchat-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["ZCHAT_HOME"] = str(tmp / "home")  # never touch the user's embedded server
        os.environ.pop("ZCHAT_ADDRESS", None)
        print("Live servers: delivery, raw commits, concurrent writers")
        with (
            ServerProcess(tmp / "seed.fs", kind="runzeo", log_path=tmp / "seed.log") as seed_srv,
            ServerProcess(tmp / "ours.fs", log_path=tmp / "ours.log") as ours_srv,
        ):
            measure_delivery(ctx, sizes, seed_srv, ours_srv, rep)
            measure_writers(ctx, sizes, seed_srv, ours_srv, rep)
        print("Big databases: idle new_messages(), history(200)")
        measure_big(ctx, sizes, tmp, rep)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    today = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"# zchat_nb benchmarks{' (quick)' if args.quick else ''}",
        "",
        f"- Date: {today}; command: `{command}`; took {elapsed:.0f} s",
        *machine_facts(),
        f"- Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}"
        " (other work on the machine shows here)",
        "- Servers: seed on `python -m ZEO.runzeo -a 127.0.0.1:PORT -f FILE`; zchat_nb on"
        " `python -m zchat_nb serve --path FILE --port 0`; FileStorage in a temp dir, loopback;"
        " every client a separate process.",
        "",
        rep.table(),
        "",
        "How each row is measured:",
        "",
        f"- Delivery: a writer process sends {sizes.delivery} messages {sizes.spacing[0] * 1000:.0f}-"
        f"{sizes.spacing[1] * 1000:.0f} ms apart, each carrying `time.time()` read just before"
        " `add_message`; a reader process notes `time.time()` when it holds the message. zchat_nb's"
        " reader blocks in `session.new_messages(timeout=...)`, woken by ZEO invalidations; the seed's"
        f" reader does `transaction.begin(); new_messages()` every {SEED_POLL * 1000:.0f} ms.",
        "- Idle `new_messages()`: a reader whose cursor is at the end of a room built directly in a"
        " FileStorage (20 writers, exponential gaps) calls it repeatedly; the seed's call includes"
        " `transaction.begin()` as zchat_nb's does internally.",
        "- `history(200)`: the first call after a fresh `connect()` (empty ZEO and object caches);"
        " the seed has no history call: a fresh client's first `new_messages()` reads the whole tree.",
        "- Writers: each process sends one untimed warm-up message, waits at a barrier, then sends"
        " without pauses; aggregate = timed messages / (last end - first start). Lost = sent ids not"
        " read back by a fresh client; server conflict counters from `server_status()`. The raw rate is"
        " one process committing one small PersistentMapping change per transaction to the same server.",
    ]
    if rep.notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in rep.notes]]
    text = "\n".join(lines) + "\n"
    write_section(args.output, text)
    print()
    print(text)
    print(f"(written to {args.output}, between {MARK_START} and {MARK_END})")
    return 0


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between this script's markers in ``path``, keeping whatever else is there.

    Other benchmark scripts (``browser.py``) keep their own sections in the same file.
    """
    section = f"{MARK_START}\n{text}{MARK_END}\n"
    old = path.read_text() if path.exists() else ""
    start, end = old.find(MARK_START), old.find(MARK_END)
    if start >= 0 and end > start:
        rest = old[end + len(MARK_END) :].lstrip("\n")
        new = old[:start] + section + ("\n" + rest if rest else "")
    else:
        new = section + ("\n" + old if old else "")
    path.write_text(new)


if __name__ == "__main__":
    sys.exit(main())
