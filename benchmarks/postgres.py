"""ZEO vs PostgreSQL (RelStorage + LISTEN/NOTIFY): same run, same machine, one table.

Usage, from the repository root (needs PostgreSQL binaries, see tests/pg.py)::

    python -m benchmarks.postgres            # a few minutes
    python -m benchmarks.postgres --quick    # smaller sizes

ZEO: ``zchat-nb serve --path FILE`` in a child process (FileStorage). PostgreSQL: a throwaway
cluster (``tests.pg.PostgresCluster``, fsync off, synchronous_commit on), clients connect with a
``postgresql://`` URI. Every client group is a separate process (multiprocessing, spawn).
Latencies across processes use ``time.time()``; durations inside a process ``time.perf_counter()``.
Importing this module does nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SENT = "sent="


def _pct(values: list[float], q: float) -> float:
    from tests.helpers import percentile

    return percentile(values, q) if values else float("nan")


# -- worker processes ---------------------------------------------------------------------------


def _readers(address: str, clients: int, expect: int, ready: Any, out: Any) -> None:
    """``clients`` readers in one process, one thread each; report every delivery latency."""
    import zchat_nb

    latencies: list[float] = []
    lock = threading.Lock()
    made = [zchat_nb.connect(address, user=f"r{i}", timeout=30) for i in range(clients)]
    sessions = [c.session("bench", backlog=0) for c in made]
    for s in sessions:
        s.new_messages()

    def run(session: zchat_nb.ChatSession) -> None:
        got = 0
        deadline = time.monotonic() + 120
        while got < expect and time.monotonic() < deadline:
            for m in session.new_messages(timeout=5):
                now = time.time()
                got += 1
                if SENT in m.text:
                    with lock:
                        latencies.append(now - float(m.text.split(SENT)[1]))

    threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    ready.set()
    for t in threads:
        t.join()
    out.put(latencies)
    for c in made:
        c.close()


def _writer(address: str, count: int, pause: float, start: Any, out: Any, ready: Any = None) -> None:
    import zchat_nb

    client = zchat_nb.connect(address, user="w", timeout=60)
    chat = client.session("bench")
    chat.add_message("warm-up, untimed")
    durations = []
    if ready is not None:
        ready.set()  # connected and warmed up: the timed part starts when every writer is
    start.wait()
    began = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        chat.add_message(f"x {SENT}{time.time()}")
        durations.append(time.perf_counter() - t)
        if pause:
            time.sleep(pause)
    out.put((durations, time.perf_counter() - began))
    client.close()


# -- measurements ---------------------------------------------------------------------------------


def delivery(address: str, readers_procs: int, per_proc: int, messages: int, pause: float) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    out, ready_events = ctx.Queue(), [ctx.Event() for _ in range(readers_procs)]
    procs = [
        ctx.Process(target=_readers, args=(address, per_proc, messages + 1, ready_events[i], out))
        for i in range(readers_procs)
    ]
    for p in procs:
        p.start()
    for e in ready_events:
        e.wait(300)
    start = ctx.Event()
    wout = ctx.Queue()
    w = ctx.Process(target=_writer, args=(address, messages, pause, start, wout))
    w.start()
    start.set()
    wout.get(timeout=600)
    latencies: list[float] = []
    for _ in procs:
        latencies += out.get(timeout=600)
    for p in [*procs, w]:
        p.join(60)
    return latencies


def writers(address: str, procs: int, count: int) -> tuple[float, float]:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    ready = [ctx.Event() for _ in range(procs)]
    ps = [ctx.Process(target=_writer, args=(address, count, 0.0, start, out, r)) for r in ready]
    for p in ps:
        p.start()
    for r in ready:
        if not r.wait(300):
            raise SystemExit("a writer process did not connect within 300 s")
    start.set()  # the timed part starts together
    durations: list[float] = []
    longest = 0.0
    for _ in ps:
        d, elapsed = out.get(timeout=600)
        durations += d
        longest = max(longest, elapsed)
    for p in ps:
        p.join(60)
    return len(durations) / longest, _pct(durations, 99)


def fill(address: str, total: int, writers_n: int = 20, batch: int = 2000) -> None:
    """``total`` messages from ``writers_n`` writers, committed ``batch`` at a time (fast setup)."""
    import zchat_nb
    from zchat_nb.model import Message, Room, rooms_of

    client = zchat_nb.connect(address, user="filler", timeout=120)
    tm, conn = client.connection()
    t0 = time.time() - total * 0.01
    done = 0
    while done < total:
        tm.begin()
        rooms = rooms_of(conn)
        room = rooms.get("big") or rooms.setdefault("big", Room("big", created=t0))
        for i in range(done, min(total, done + batch)):
            room.append(
                f"writer{i % writers_n}", Message(f"{i:032x}", f"u{i % writers_n}", f"m {i}", t0 + i * 0.01)
            )
        tm.commit()
        done += batch
    client.close()


def idle_and_history(address: str, calls: int = 200) -> tuple[float, float]:
    import zchat_nb

    client = zchat_nb.connect(address, user="cold", timeout=60)
    chat = client.session("big")
    t = time.perf_counter()
    history = chat.history(200)
    cold = time.perf_counter() - t
    assert len(history) == 200
    while chat.new_messages() or chat.behind:  # catch up (a call returns a bounded batch)
        pass
    t = time.perf_counter()
    for _ in range(calls):
        chat.new_messages()
    idle = (time.perf_counter() - t) / calls
    client.close()
    return idle, cold


# -- backends -------------------------------------------------------------------------------------


def with_zeo(run: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    from tests.helpers import ServerProcess, free_port

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "chat.fs", free_port())
        server.start()
        try:
            return run(f"127.0.0.1:{server.port}")
        finally:
            server.kill()


def with_postgres(run: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    from tests.pg import PostgresCluster, find_pg_bin

    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL binaries not found (apt-get install postgresql, or set ZCHAT_PG_BIN)")
    cluster = PostgresCluster(bin_dir)
    try:
        return run(cluster.create_database("bench"))
    finally:
        cluster.close()


def measure(address: str, quick: bool) -> dict[str, Any]:
    n = 100 if quick else 300
    one = delivery(address, 1, 1, n, 0.02)
    fan = delivery(address, 5, 10, 20 if quick else 40, 0.2)
    rate, p99 = writers(address, 8, 25 if quick else 60)
    fill(address, 20_000 if quick else 100_000)
    idle, cold = idle_and_history(address)
    return {
        "one_p50": _pct(one, 50), "one_p95": _pct(one, 95),
        "fan_p50": _pct(fan, 50), "fan_p95": _pct(fan, 95), "fan_n": len(fan),
        "rate": rate, "w_p99": p99, "idle": idle, "cold": cold,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    results = {
        "ZEO (FileStorage)": with_zeo(lambda a: measure(a, args.quick)),
        "PostgreSQL (RelStorage)": with_postgres(lambda a: measure(a, args.quick)),
    }
    big = "20k" if args.quick else "100k"
    rows = [
        ("delivery p50, 1 reader (ms)", "one_p50", 1000),
        ("delivery p95, 1 reader (ms)", "one_p95", 1000),
        ("fan-out p50, 50 clients (ms)", "fan_p50", 1000),
        ("fan-out p95, 50 clients (ms)", "fan_p95", 1000),
        ("8 writer processes: messages/s", "rate", 1),
        ("8 writer processes: send p99 (ms)", "w_p99", 1000),
        (f"idle new_messages() at {big} (ms)", "idle", 1000),
        (f"cold history(200) at {big} (ms)", "cold", 1000),
    ]
    names = list(results)
    print(f"| measure | {' | '.join(names)} |")
    print(f"|---|{'---:|' * len(names)}")
    for label, key, scale in rows:
        print(f"| {label} | {' | '.join(f'{results[n][key] * scale:.1f}' for n in names)} |")
    print(f"\n(fan-out deliveries measured: {', '.join(str(results[n]['fan_n']) for n in names)})")


if __name__ == "__main__":
    main()
