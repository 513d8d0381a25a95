"""CPU one delivered message costs: the reader's (client) and the server's, as tables.

Usage (from the repository root)::

    python -m benchmarks.delivery_cpu                     # client and server parts
    python -m benchmarks.delivery_cpu --profile           # also cProfile the ChatSession reader
    python -m benchmarks.delivery_cpu --parts client --messages 400
    python -m benchmarks.delivery_cpu --parts send        # what one send costs, vs a raw commit

``client``
    One reader in this process, blocked in ``ChatSession.new_messages(timeout=1.0)`` on its own
    ``ChatClient``; one writer process sends ``--messages`` messages ``--gap`` s apart. The same
    with a plain ZODB reader woken by the invalidation that loads the one object a plain writer
    changed (``benchmarks.fanout``'s raw control), against the same ``zchat-nb serve``. CPU = this
    process's user+system time over the reading (the reader's thread and ZEO's IO thread; the main
    thread only waits), per delivered message; the server's CPU from ``/proc``.
``server``
    Server CPU (from ``/proc``) per small ``loadBefore`` round trip (``--loads`` of them, one raw
    ClientStorage, cache bypassed), and per commit whose invalidation goes to ``--fanout``
    connected clients; ``zchat-nb serve`` vs ZEO's stock ``runzeo``.
``send``
    CPU per ``add_message`` against a raw commit of one small object (the 8-writer benchmark's raw
    control), one sender alone: this process (the sending thread and ZEO's IO thread), the sending
    thread alone, and the server (from ``/proc``).

Nothing here runs at import time; nothing is written to ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fanout import _raw_db, cpu_seconds, process_cpu  # noqa: E402 (fan-out's clients and clocks)
from tests.helpers import ServerProcess  # noqa: E402

ROOM = "hall"


# -- the writer (a child process) ---------------------------------------------------------------


def writer_main(kind: str, address: tuple[str, int], n: int, gap: float) -> None:
    """Wait for "go" on stdin, send ``n`` messages ``gap`` s apart, say "done"."""
    import transaction

    if kind == "session":
        import zchat_nb

        client = zchat_nb.connect(address, user="teacher")
        session = client.session(ROOM, backlog=0)
        session.add_message("warm-up")

        def send(i: int) -> None:
            session.add_message(f"message {i}")

        close = client.close
    else:
        db = _raw_db(address)
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        box = conn.root()[ROOM]

        def send(i: int) -> None:
            tm.begin()
            box["text"] = f"message {i}"
            tm.commit()

        close = db.close
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, start + i * gap - time.monotonic()))
        send(i)
    print("done", flush=True)
    sys.stdin.readline()
    close()


class Writer:
    def __init__(self, kind: str, address: tuple[str, int], n: int, gap: float) -> None:
        args = json.dumps([kind, list(address), n, gap])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.delivery_cpu", "writer", args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self._expect("ready")

    def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"writer said {line!r}, expected {word!r}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        self._expect("done")
        assert self.proc.stdin is not None
        self.proc.stdin.write("bye\n")
        self.proc.stdin.flush()
        self.proc.wait(30)


# -- the client part -----------------------------------------------------------------------------


def read_session(
    address: Any, n: int, gap: float, server_pid: int, profile: cProfile.Profile | None
) -> dict[str, Any]:
    import zchat_nb

    client = zchat_nb.connect(address, user="reader")
    session = client.session(ROOM, backlog=0)
    session.new_messages()
    writer = Writer("session", address, n, gap)
    session.new_messages()  # the warm-up
    got: list[str] = []
    thread_cpu = [0.0]

    def read() -> None:
        t0 = time.thread_time()
        deadline = time.monotonic() + n * gap + 30
        if profile is not None:
            profile.enable()
        while len(got) < n and time.monotonic() < deadline:
            got.extend(m.text for m in session.new_messages(timeout=1.0))
        if profile is not None:
            profile.disable()
        thread_cpu[0] = time.thread_time() - t0

    return _measure(read, writer, got, thread_cpu, server_pid, client.close)


def read_raw(address: Any, n: int, gap: float, server_pid: int) -> dict[str, Any]:
    import transaction

    woken = threading.Event()
    db = _raw_db(address, woken)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    box = conn.root()[ROOM]
    writer = Writer("raw", address, n, gap)
    got: list[str] = []
    thread_cpu = [0.0]

    def read() -> None:
        t0 = time.thread_time()
        seen = box["text"]
        deadline = time.monotonic() + n * gap + 30
        while len(got) < n and time.monotonic() < deadline:
            if not woken.wait(1.0):
                continue
            woken.clear()
            tm.begin()
            text = box["text"]
            if text != seen:
                seen = text
                got.append(text)
        thread_cpu[0] = time.thread_time() - t0

    return _measure(read, writer, got, thread_cpu, server_pid, db.close)


def _measure(
    read: Any, writer: Writer, got: list[str], thread_cpu: list[float], server_pid: int, close: Any
) -> dict[str, Any]:
    thread = threading.Thread(target=read)
    cpu, server = cpu_seconds(), process_cpu(server_pid)
    thread.start()
    writer.go()
    thread.join()
    cpu, server = cpu_seconds() - cpu, process_cpu(server_pid) - server
    writer.finish()
    close()
    count = max(1, len(got))
    return {
        "delivered": len(got),
        "distinct": len(set(got)),
        "client_ms": 1000 * cpu / count,
        "thread_ms": 1000 * thread_cpu[0] / count,
        "server_us": 1e6 * server / count,
    }


def setup_raw(address: Any) -> None:
    import transaction
    from persistent.mapping import PersistentMapping

    db = _raw_db(address)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()[ROOM] = PersistentMapping({"text": "start"})
    tm.commit()
    db.close()


def client_part(args: argparse.Namespace, workdir: Path) -> str:
    rows = []
    profile = cProfile.Profile() if args.profile else None
    with ServerProcess(workdir / "client.fs") as server:
        assert server.proc is not None
        pid = server.proc.pid
        setup_raw(server.address)
        for rep in range(args.repeat):
            rows.append(
                (
                    "ChatSession.new_messages",
                    rep,
                    read_session(server.address, args.messages, args.gap, pid, profile),
                )
            )
            rows.append(("raw ZODB reader", rep, read_raw(server.address, args.messages, args.gap, pid)))
    out = [
        f"Client part: {args.messages} messages {args.gap * 1000:.0f} ms apart, one reader, `zchat-nb serve`",
        "",
        "| reader | run | delivered / distinct | client CPU ms / delivery | reader thread ms | server CPU µs / delivery |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, rep, r in rows:
        out.append(
            f"| {name} | {rep + 1} | {r['delivered']} / {r['distinct']} | {r['client_ms']:.3f} | "
            f"{r['thread_ms']:.3f} | {r['server_us']:.0f} |"
        )
    if profile is not None:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
        out += [
            "",
            "cProfile of the ChatSession reader thread (by own time):",
            "```",
            text.getvalue().strip(),
            "```",
        ]
    return "\n".join(out)


# -- the server part -----------------------------------------------------------------------------


def server_loads(address: Any, pid: int, loads: int) -> float:
    """Server CPU µs per loadBefore round trip of the root, sent as ZEO's loads are (cache emptied first)."""
    from ZODB.utils import maxtid, z64

    db = _raw_db(address)
    storage = db.storage

    def load() -> None:
        storage._cache.invalidate(z64, None)  # else the client answers from its cache
        storage._server.load_before(z64, maxtid)

    for _ in range(50):
        load()
    cpu = process_cpu(pid)
    for _ in range(loads):
        load()
    cpu = process_cpu(pid) - cpu
    db.close()
    return 1e6 * cpu / loads


def server_fanout(address: Any, pid: int, clients: int, commits: int) -> float:
    """Server CPU µs per commit whose invalidation goes to ``clients`` other connections."""
    import transaction
    from persistent.mapping import PersistentMapping

    readers = [_raw_db(address) for _ in range(clients)]
    db = _raw_db(address)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["fan"] = box = PersistentMapping({"n": 0})
    tm.commit()
    time.sleep(0.5)  # the first invalidations land before measuring
    cpu = process_cpu(pid)
    for i in range(commits):
        box["n"] = i
        tm.commit()
    time.sleep(0.5)  # the last fan-out is sent; idle servers cost ~0
    cpu = process_cpu(pid) - cpu
    db.close()
    for r in readers:
        r.close()
    return 1e6 * cpu / commits


def server_part(args: argparse.Namespace, workdir: Path) -> str:
    out = [
        f"Server part: server CPU per small load ({args.loads} loadBefore of the root) and per commit "
        f"invalidating {args.fanout} clients ({args.commits} commits)",
        "",
        "| server | run | µs / load | µs / commit to fan-out |",
        "|---|---:|---:|---:|",
    ]
    for rep in range(args.repeat):
        for kind, label in (("zchat", "zchat-nb serve"), ("runzeo", "stock runzeo")):
            with ServerProcess(workdir / f"{kind}{rep}.fs", kind=kind) as server:
                assert server.proc is not None
                pid = server.proc.pid
                load = server_loads(server.address, pid, args.loads)
                fan = server_fanout(server.address, pid, args.fanout, args.commits)
            out.append(f"| {label} | {rep + 1} | {load:.1f} | {fan:.0f} |")
    return "\n".join(out)


# -- the send part ---------------------------------------------------------------------------------


def send_costs(address: Any, pid: int, sends: int) -> list[tuple[str, dict[str, float]]]:
    """Per send: this process's CPU, the sending thread's, the server's; ``add_message`` vs a raw commit
    of one small object, one after the other on one server, nobody else connected."""
    import transaction
    from persistent.mapping import PersistentMapping

    import zchat_nb

    client = zchat_nb.connect(address, user="sender")
    session = client.session(ROOM, backlog=0)
    db = _raw_db(address)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    conn.root()["send-box"] = box = PersistentMapping()
    tm.commit()

    def zchat(i: int) -> None:
        session.add_message(f"message number {i} with some text")

    def raw(i: int) -> None:
        tm.begin()
        box["text"] = f"message number {i} with some text"
        tm.commit()

    rows = []
    for label, send in (("ChatSession.add_message", zchat), ("raw commit of one small object", raw)):
        for i in range(40):  # warm-up: the stream splits its first buckets, caches fill
            send(i)
        process, thread, server = cpu_seconds(), time.thread_time(), process_cpu(pid)
        for i in range(sends):
            send(i)
        rows.append(
            (
                label,
                {
                    "process_us": 1e6 * (cpu_seconds() - process) / sends,
                    "thread_us": 1e6 * (time.thread_time() - thread) / sends,
                    "server_us": 1e6 * (process_cpu(pid) - server) / sends,
                },
            )
        )
    client.close()
    db.close()
    return rows


def send_part(args: argparse.Namespace, workdir: Path) -> str:
    out = [
        f"Send part: CPU per send ({args.sends} sends, one sender, nobody else connected), `zchat-nb serve`",
        "",
        "| sender | run | client process µs / send | sending thread µs | server µs / send |",
        "|---|---:|---:|---:|---:|",
    ]
    with ServerProcess(workdir / "send.fs") as server:
        assert server.proc is not None
        for rep in range(args.repeat):
            for label, r in send_costs(server.address, server.proc.pid, args.sends):
                out.append(
                    f"| {label} | {rep + 1} | {r['process_us']:.0f} | {r['thread_us']:.0f} | {r['server_us']:.0f} |"
                )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "writer":
        kind, address, n, gap = json.loads(argv[1])
        writer_main(kind, tuple(address), n, gap)
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.delivery_cpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--parts", default="client,server,send")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.02)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--loads", type=int, default=5000)
    parser.add_argument("--fanout", type=int, default=50)
    parser.add_argument("--commits", type=int, default=100)
    parser.add_argument("--sends", type=int, default=400, help="sends timed by the send part")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    import zchat_nb

    print(
        f"zchat_nb from {Path(zchat_nb.__file__).parent}; load average {Path('/proc/loadavg').read_text().split()[0]}"
    )
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "client" in parts:
            print(client_part(args, Path(tmp)), flush=True)
            print()
        if "server" in parts:
            print(server_part(args, Path(tmp)), flush=True)
            print()
        if "send" in parts:
            print(send_part(args, Path(tmp)), flush=True)
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
