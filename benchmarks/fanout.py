"""Fan-out: many readers of one room on one ZEO server (a lecture hall), as tables.

Usage (from the repository root)::

    python -m benchmarks.fanout                       # every part, this checkout only
    python -m benchmarks.fanout --baseline DIR        # the same parts also for the code in DIR
    python -m benchmarks.fanout --parts session --clients 50
    python -m benchmarks.fanout --parts raw,session --per-process 1   # each reader its own process

``--baseline DIR`` names another checkout (for example ``git archive <commit> | tar -x -C DIR``):
its client processes import ``zchat_nb`` from DIR, in the same run against a server of this
checkout, so "before" and "after" share the machine's state. The parts:

``session``
    N readers, each its own :class:`~zchat_nb.ChatClient` (its own ZEO connection), 10 per process,
    each blocked in ``new_messages(timeout=1.0)`` on its own thread; one writer process sends
    ``--messages`` messages ``--gap`` s apart, each carrying its send time. Delivery latency per
    (reader, message), missing and duplicated deliveries, and the server's CPU time per delivered
    message (the server process's own utime+stime over the run, from ``/proc``).
``widget``
    The same with headless :class:`~zchat_nb.ChatWidget` s (a recording comm, no browser): the time
    is taken when the poller hands the "append" frame to the comm.
``raw`` and ``stock``
    The floor within ZEO: plain ZODB readers, each woken by the invalidation, load the one small
    object a plain writer changed; against ``zchat-nb serve`` (``raw``) and against ZEO's stock
    ``runzeo`` (``stock``: no zchat_nb in the server either).
``idle``
    N widgets started at once (the start-up: until each is connected and sees itself present; the
    server's CPU and loads meanwhile), then connected, nobody typing, for ``--idle-seconds``: the
    server's CPU in % of one core,
    and the widget processes' CPU (user+system of each process of 10 widgets).

Results go to ``benchmarks/RESULTS.md`` between ``<!-- fanout:start -->`` and ``<!-- fanout:end -->``.
Every client is a separate process started with ``python benchmarks/fanout.py worker ...`` (this file,
with ``zchat_nb`` imported from the checkout measured); workers
talk to this script through lines on stdin/stdout. Importing this module does nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK_START, MARK_END = "<!-- fanout:start -->", "<!-- fanout:end -->"
PER_PROCESS = 10
SENT = "sent="
_SENT_RE = re.compile(r"sent=([0-9.]+)")
READY_TIMEOUT = 180.0


# -- workers (child processes) -------------------------------------------------------------------


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _say(**data: Any) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def _read_on_go(read: Any, count: int, limit: float) -> float:
    """Start a thread per reader, say ready, wait for "go", then let each run ``read(k, deadline)``;
    returns the CPU seconds this process spent from "go" on. (Threads started only at "go" made
    the first two messages the slowest, for every kind of reader.)"""
    go = threading.Event()
    deadline = [0.0]

    def run(k: int) -> None:
        go.wait()
        read(k, deadline[0])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    _say(ready=True)
    _wait_line("go")
    cpu = cpu_seconds()
    deadline[0] = time.monotonic() + limit
    go.set()
    for t in threads:
        t.join()
    return cpu_seconds() - cpu


def _wait_line(expected: str) -> None:
    line = sys.stdin.readline().strip()
    if line != expected:
        raise SystemExit(f"worker expected {expected!r} on stdin, got {line!r}")


def worker_session_readers(address: tuple[str, int], room: str, count: int, n: int, limit: float) -> None:
    """``count`` ChatClients, each reading on its own thread until it has ``n`` timed messages."""
    import zchat_nb

    clients = [zchat_nb.connect(address, user=f"reader{k}") for k in range(count)]
    sessions = [c.session(room, backlog=0) for c in clients]
    for s in sessions:
        s.new_messages()
    results: list[dict[str, Any]] = [{"latencies": [], "ids": []} for _ in sessions]

    def read(k: int, deadline: float) -> None:
        got = results[k]
        while len(got["latencies"]) < n and time.monotonic() < deadline:
            for m in sessions[k].new_messages(timeout=1.0):
                now = time.time()
                found = _SENT_RE.search(m.text)
                if found:
                    got["latencies"].append(now - float(found.group(1)))
                    got["ids"].append(m.id)

    cpu = _read_on_go(read, count, limit)
    for c in clients:
        c.close()
    _say(results=results, cpu=cpu)


def _recording_comm() -> Any:
    """Make ipywidgets open a comm that records instead of talking to a kernel."""
    import comm

    class RecordingComm:
        kernel = "recording"  # ipywidgets only sends when the comm has a kernel

        def __init__(self, **kwargs: Any) -> None:
            self.comm_id = os.urandom(16).hex()
            self.listeners: list[Any] = []
            self.sent: list[Any] = []
            self.lock = threading.Lock()

        def listen(self, listener: Any) -> None:
            """Call ``listener`` with every frame, those sent before it came included (the widget's
            poller starts in its constructor and may send its first "reset" before we listen)."""
            with self.lock:
                for data in self.sent:
                    listener(data)
                self.listeners.append(listener)

        def on_msg(self, callback: Any) -> None:
            pass

        def send(self, data: Any = None, metadata: Any = None, buffers: Any = None) -> None:
            with self.lock:
                self.sent.append(data or {})
                for listener in self.listeners:
                    listener(data or {})

        def close(self, *args: Any, **kwargs: Any) -> None:
            pass

    comm.create_comm = RecordingComm
    return RecordingComm


def worker_widgets(
    address: tuple[str, int], room: str, count: int, n: int, limit: float, idle: bool, lease: float = 0.0
) -> None:
    """``count`` ChatWidgets, each with its own ChatClient; time "append" frames (or sit idle)."""
    _recording_comm()
    import zchat_nb
    from zchat_nb.widget import ChatWidget

    clients = [zchat_nb.connect(address, user=f"student{os.getpid()}-{k}") for k in range(count)]
    results: list[dict[str, Any]] = [{"latencies": [], "ids": []} for _ in clients]
    done = threading.Condition()
    reset = [False] * count

    def listener(k: int) -> Any:
        def on_frame(data: dict[str, Any]) -> None:
            if data.get("method") != "custom":
                return
            content = data.get("content", {})
            now = time.time()
            if content.get("type") == "reset":
                with done:
                    reset[k] = True
                    done.notify_all()
            if content.get("type") != "append":
                return
            with done:
                for m in content.get("messages", []):
                    found = _SENT_RE.search(m.get("html", ""))
                    if found:
                        results[k]["latencies"].append(now - float(found.group(1)))
                        results[k]["ids"].append(m.get("id"))
                done.notify_all()

        return on_frame

    widgets = []
    for k, client in enumerate(clients):
        widget = ChatWidget(client=client, room=room, **({"heartbeat_interval": lease} if lease else {}))
        widget.comm.listen(listener(k))
        widgets.append(widget)
    started = time.monotonic()
    with done:
        if not done.wait_for(lambda: all(reset), 30):  # slow: say which, then wait on
            for w, loaded in zip(widgets, reset, strict=True):
                if not loaded:
                    sys.stderr.write(f"{w.user} has not loaded its room after 30 s: {w.status_text}\n")
        if not done.wait_for(lambda: all(reset), READY_TIMEOUT):
            raise SystemExit("widgets did not load their room in time")
    if time.monotonic() - started > 30:
        sys.stderr.write(f"widgets loaded their room after {time.monotonic() - started:.0f} s\n")
    # Connected, and (within a minute: 200 first joins at once may need retries) its join committed
    # and read back, so that the start-up stays out of the measurement.
    settle = time.monotonic() + 60
    for w in widgets:
        while w.status != "connected" or (w.user not in w.present and time.monotonic() < settle):
            time.sleep(0.05)
    _say(ready=True)
    _wait_line("go")
    cpu = cpu_seconds()
    if idle:
        _wait_line("stop")
    else:
        with done:
            done.wait_for(lambda: all(len(r["latencies"]) >= n for r in results), limit)
    cpu = cpu_seconds() - cpu
    _say(results=results, cpu=cpu)  # before closing: the widgets' leave commits are not measured
    for w in widgets:
        w.close()
    for c in clients:
        c.close()


def worker_writer(address: tuple[str, int], room: str, n: int, gap: float) -> None:
    import zchat_nb

    rng = random.Random(7)
    with zchat_nb.connect(address, user="teacher") as client:
        session = client.session(room, backlog=0)
        session.add_message("warm-up")
        _say(ready=True)
        _wait_line("go")
        start = time.monotonic()
        for i in range(n):
            # Paced by the clock (not by the previous send), with a little jitter.
            target = start + i * gap + rng.uniform(0, gap / 10)
            time.sleep(max(0.0, target - time.monotonic()))
            session.add_message(f"message {i} {SENT}{time.time()!r}")
        _say(sent=n)


def _raw_db(address: tuple[str, int], woken: threading.Event | None = None) -> Any:
    """A plain ZODB.DB on a ClientStorage whose invalidations set ``woken``."""
    import ZODB
    from ZEO.ClientStorage import ClientStorage

    class Waking(ClientStorage):  # type: ignore[misc]
        def invalidateTransaction(self, tid: bytes, oids: Any) -> None:
            super().invalidateTransaction(tid, oids)
            if woken is not None:
                woken.set()

    return ZODB.DB(Waking(address, wait_timeout=30))


def worker_raw_readers(address: tuple[str, int], room: str, count: int, n: int, limit: float) -> None:
    """The floor within ZEO: on each invalidation, begin and load the one object that changed."""
    import transaction

    events = [threading.Event() for _ in range(count)]
    dbs = [_raw_db(address, events[k]) for k in range(count)]
    pairs = []
    for db in dbs:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        pairs.append((tm, conn, conn.root()[room]))
    results: list[dict[str, Any]] = [{"latencies": [], "ids": []} for _ in dbs]

    def read(k: int, deadline: float) -> None:
        tm, _conn, box = pairs[k]
        seen = box["text"]
        while len(results[k]["latencies"]) < n and time.monotonic() < deadline:
            if not events[k].wait(1.0):
                continue
            events[k].clear()
            tm.begin()
            text = box["text"]  # the one load
            if text != seen:
                seen = text
                found = _SENT_RE.search(text)
                if found:
                    results[k]["latencies"].append(time.time() - float(found.group(1)))
                    results[k]["ids"].append(text)

    cpu = _read_on_go(read, count, limit)
    for db in dbs:
        db.close()
    _say(results=results, cpu=cpu)


def worker_raw_writer(address: tuple[str, int], room: str, n: int, gap: float) -> None:
    """Commits a new text to one small object every ``gap`` seconds (the raw control's sends)."""
    import transaction

    rng = random.Random(7)
    db = _raw_db(address)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        _say(ready=True)
        _wait_line("go")
        box = conn.root()[room]
        start = time.monotonic()
        for i in range(n):
            target = start + i * gap + rng.uniform(0, gap / 10)
            time.sleep(max(0.0, target - time.monotonic()))
            tm.begin()
            box["text"] = f"message {i} {SENT}{time.time()!r}"
            tm.commit()
        _say(sent=n)
    finally:
        db.close()


def worker_raw_setup(address: tuple[str, int], room: str) -> None:
    import transaction
    from persistent.mapping import PersistentMapping

    db = _raw_db(address)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        conn.root()[room] = PersistentMapping({"text": "start"})
        tm.commit()
        _say(ready=True)
    finally:
        db.close()


def worker_make_room(address: tuple[str, int], room: str) -> None:
    """Create the room before its readers start: 50 first readers at once only fight over it."""
    import zchat_nb

    with zchat_nb.connect(address, user="organiser") as client:
        client.session(room).new_messages()
    _say(ready=True)


WORKERS = {
    "session_readers": worker_session_readers,
    "widgets": worker_widgets,
    "writer": worker_writer,
    "raw_readers": worker_raw_readers,
    "raw_writer": worker_raw_writer,
    "raw_setup": worker_raw_setup,
    "make_room": worker_make_room,
}


def worker_main(argv: Sequence[str]) -> int:
    kind, args = argv[0], json.loads(argv[1])
    args[0] = tuple(args[0])
    WORKERS[kind](*args)
    return 0


# -- the conductor -------------------------------------------------------------------------------


class Proc:
    """A worker process of one code version, spoken to in JSON lines."""

    #: Every worker started, so that a failed run kills them all (see main).
    started: ClassVar[list[Proc]] = []

    def __init__(self, code: Path, kind: str, *args: Any) -> None:
        env = dict(os.environ, PYTHONPATH=str(code))
        self.popen = subprocess.Popen(
            # This file, run by path: a baseline checkout need not have it; zchat_nb comes from ``code``.
            [sys.executable, str(Path(__file__).resolve()), "worker", kind, json.dumps(args)],
            cwd=code,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        Proc.started.append(self)

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.popen.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.popen.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.popen.kill()
            raise RuntimeError(f"worker {self.popen.args[3]} said nothing within {timeout:g} s")
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.popen.args[3]} died (exit code {self.popen.wait()})")
        return dict(json.loads(line))

    def tell(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def finish(self) -> None:
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def process_cpu(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds, from /proc (the server's own CPU time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def server_stats(address: Any) -> dict[str, Any]:
    """The server's counters (``loads``, ``commits``, ...), through a short-lived plain client."""
    import ZEO

    storage = ZEO.client(tuple(address), wait_timeout=30)
    try:
        return dict(storage.server_status())
    finally:
        storage.close()


def percentile(values: Sequence[float], p: float) -> float:
    from tests.helpers import percentile as pct

    return pct(values, p)


@dataclass
class Row:
    part: str
    code: str
    clients: int
    cells: dict[str, str] = field(default_factory=dict)


def start_readers(
    code: Path, kind: str, address: Any, room: str, clients: int, n: int, limit: float, per_process: int
) -> list[Proc]:
    procs = []
    for start in range(0, clients, per_process):
        count = min(per_process, clients - start)
        if kind == "session":
            procs.append(Proc(code, "session_readers", address, room, count, n, limit))
        elif kind == "raw":
            procs.append(Proc(code, "raw_readers", address, room, count, n, limit))
        else:
            procs.append(Proc(code, "widgets", address, room, count, n, limit, False))
    for p in procs:
        p.read(READY_TIMEOUT)
    return procs


def delivery(
    code: Path,
    label: str,
    kind: str,
    server: Any,
    clients: int,
    n: int,
    gap: float,
    per_process: int = PER_PROCESS,
) -> Row:
    room = f"{kind}-{label}-{clients}-{random.getrandbits(32):08x}"
    limit = n * gap + 30
    setup = Proc(code, "raw_setup" if kind == "raw" else "make_room", server.address, room)
    setup.read(READY_TIMEOUT)
    setup.finish()
    # The writer first: its warm-up message (its first, which makes its stream: every reader then
    # looks over the room once) is in the room before the readers start, so that they begin at its
    # end and only steady-state deliveries are timed.
    writer = Proc(code, "raw_writer" if kind == "raw" else "writer", server.address, room, n, gap)
    writer.read(READY_TIMEOUT)
    readers = start_readers(code, kind, server.address, room, clients, n, limit, per_process)
    time.sleep(1.0)  # let the readers settle
    stats0 = server_stats(server.address)
    cpu0 = process_cpu(server.proc.pid)
    wall0 = time.monotonic()
    for p in readers:
        p.tell("go")
    writer.tell("go")
    writer.read(limit)
    outs = [p.read(limit + 30) for p in readers]
    wall = time.monotonic() - wall0
    server_cpu = process_cpu(server.proc.pid) - cpu0
    stats1 = server_stats(server.address)
    for p in [*readers, writer]:
        p.finish()
    latencies = [x for o in outs for r in o["results"] for x in r["latencies"]]
    missing = sum(max(0, n - len(set(r["ids"]))) for o in outs for r in o["results"])
    duplicated = sum(len(r["ids"]) - len(set(r["ids"])) for o in outs for r in o["results"])
    delivered = len(latencies) - duplicated
    client_cpu = sum(o["cpu"] for o in outs)
    row = Row(kind, label, clients)
    row.cells = {
        "p50 ms": f"{percentile(latencies, 50) * 1e3:.0f}" if latencies else "—",
        "p95 ms": f"{percentile(latencies, 95) * 1e3:.0f}" if latencies else "—",
        "max ms": f"{max(latencies) * 1e3:.0f}" if latencies else "—",
        "missing / dup": f"{missing} / {duplicated}",
        "server CPU µs / delivery": f"{server_cpu / max(1, delivered) * 1e6:.0f}",
        "server CPU %": f"{server_cpu / wall * 100:.0f}",
        "server loads / delivery": f"{(stats1['loads'] - stats0['loads']) / max(1, delivered):.2f}",
        "client CPU ms / delivery": f"{client_cpu / max(1, delivered) * 1e3:.2f}",
    }
    return row


def idle(code: Path, label: str, server: Any, widgets: int, seconds: float, lease: float = 0.0) -> Row:
    room = f"idle-{label}-{random.getrandbits(32):08x}"
    setup = Proc(code, "make_room", server.address, room)
    setup.read(READY_TIMEOUT)
    setup.finish()
    # The start-up: every widget process started at once (a class opening the notebook), until
    # each widget is connected and sees its own user present (its join committed and read back).
    stats0, cpu_start, wall_start = (
        server_stats(server.address),
        process_cpu(server.proc.pid),
        time.monotonic(),
    )
    procs = []
    for start in range(0, widgets, PER_PROCESS):
        count = min(PER_PROCESS, widgets - start)
        procs.append(Proc(code, "widgets", server.address, room, count, 0, 0.0, True, lease))
    for p in procs:
        p.read(READY_TIMEOUT)
    start_wall, start_cpu = time.monotonic() - wall_start, process_cpu(server.proc.pid) - cpu_start
    start_loads = server_stats(server.address)["loads"] - stats0["loads"]
    time.sleep(2.0)  # the joins' invalidations settle
    cpu0 = process_cpu(server.proc.pid)
    wall0 = time.monotonic()
    for p in procs:
        p.tell("go")
    time.sleep(seconds)
    for p in procs:
        p.tell("stop")
    server_cpu = process_cpu(server.proc.pid) - cpu0
    wall = time.monotonic() - wall0
    outs = [p.read(60) for p in procs]
    for p in procs:
        p.finish()
    per_process = [o["cpu"] / wall * 100 for o in outs]
    row = Row("idle" + (f", lease {lease:g} s" if lease else ""), label, widgets)
    row.cells = {
        "seconds": f"{wall:.0f}",
        "server CPU % of a core": f"{server_cpu / wall * 100:.2f}",
        "widget process CPU %, mean (max)": f"{sum(per_process) / len(per_process):.2f}"
        f" ({max(per_process):.2f})",
        "start-up: all present after s (server CPU s, loads)": f"{start_wall:.1f} ({start_cpu:.1f}, {start_loads})",
    }
    return row


def table(rows: list[Row]) -> str:
    if not rows:
        return ""
    heads = list(rows[0].cells)
    lines = [
        "| part | code | clients | " + " | ".join(heads) + " |",
        "|---|---|---:|" + "---:|" * len(heads),
    ]
    lines += [
        f"| {r.part} | {r.code} | {r.clients} | " + " | ".join(r.cells[h] for h in heads) + " |" for r in rows
    ]
    return "\n".join(lines)


def commit_of(path: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or path.name


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        default="stock,raw,session,widget,idle",
        help="comma-separated: stock,raw,session,widget,idle",
    )
    parser.add_argument("--clients", default="50,200", help="reader counts of the session part")
    parser.add_argument("--widgets", type=int, default=50, help="widgets of the widget part")
    parser.add_argument("--idle-widgets", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument(
        "--lease",
        type=float,
        default=0.0,
        help="also measure idle widgets with this heartbeat_interval (renewals inside the window)",
    )
    parser.add_argument(
        "--per-process",
        type=int,
        default=PER_PROCESS,
        help="readers per process in the delivery parts (1: each its own process, as students' kernels)",
    )
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between messages (10/s)")
    parser.add_argument("--baseline", type=Path, help="another checkout to measure in the same run")
    parser.add_argument("--baseline-label", default="before")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    from tests.helpers import ServerProcess

    parts = args.parts.split(",")
    per = args.per_process
    codes = [(ROOT, "ours")]
    if args.baseline:
        codes.insert(0, (args.baseline.resolve(), args.baseline_label))
    load_before = os.getloadavg()
    rows: dict[str, list[Row]] = {"raw": [], "session": [], "widget": [], "idle": []}
    with tempfile.TemporaryDirectory(prefix="zchat-fanout-") as tmp:
        os.environ["ZCHAT_HOME"] = str(Path(tmp) / "home")
        os.environ.pop("ZCHAT_ADDRESS", None)
        with (
            ServerProcess(Path(tmp) / "chat.fs", log_path=Path(tmp) / "server.log") as server,
            _killing_workers(),
            _server_log_on_failure(Path(tmp) / "server.log"),
        ):
            if "stock" in parts:  # ZEO itself: stock runzeo, no zchat_nb guard, plain ZODB clients
                with ServerProcess(Path(tmp) / "stock.fs", kind="runzeo") as stock:
                    for clients in (int(c) for c in args.clients.split(",")):
                        print(f"raw ZEO control on stock runzeo, {clients} clients ...", flush=True)
                        rows["raw"].append(
                            delivery(
                                ROOT, "stock runzeo", "raw", stock, clients, args.messages, args.gap, per
                            )
                        )
                        print(table(rows["raw"][-1:]), flush=True)
            if "raw" in parts:
                for clients in (int(c) for c in args.clients.split(",")):
                    print(f"raw ZEO control, {clients} clients ...", flush=True)
                    rows["raw"].append(
                        delivery(ROOT, "raw ZEO", "raw", server, clients, args.messages, args.gap, per)
                    )
                    print(table(rows["raw"][-1:]), flush=True)
            for code, label in codes:
                if "session" in parts:
                    for clients in (int(c) for c in args.clients.split(",")):
                        print(f"session path, {label}, {clients} clients ...", flush=True)
                        rows["session"].append(
                            delivery(code, label, "session", server, clients, args.messages, args.gap, per)
                        )
                        print(table(rows["session"][-1:]), flush=True)
                if "widget" in parts:
                    print(f"widget path, {label}, {args.widgets} widgets ...", flush=True)
                    rows["widget"].append(
                        delivery(code, label, "widget", server, args.widgets, args.messages, args.gap, per)
                    )
                    print(table(rows["widget"][-1:]), flush=True)
                if "idle" in parts:
                    print(
                        f"idle, {label}, {args.idle_widgets} widgets, {args.idle_seconds:g} s ...", flush=True
                    )
                    rows["idle"].append(idle(code, label, server, args.idle_widgets, args.idle_seconds))
                    print(table(rows["idle"][-1:]), flush=True)
                    if args.lease and code == ROOT:
                        print(f"idle, {label}, lease {args.lease:g} s ...", flush=True)
                        rows["idle"].append(
                            idle(code, label, server, args.idle_widgets, args.idle_seconds, args.lease)
                        )
                        print(table(rows["idle"][-1:]), flush=True)
    load_after = os.getloadavg()
    versions = ", ".join(f"{label} = {commit_of(code)}" for code, label in codes)
    text = "\n".join(
        [
            "## Fan-out: one room, many readers (`python -m benchmarks.fanout`)",
            "",
            f"- Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; code: {versions};"
            f" command: `python -m benchmarks.fanout {' '.join(argv)}`",
            f"- Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f};"
            f" {os.cpu_count()} cores; server `zchat-nb serve` on FileStorage; {per} clients"
            " per process in the delivery parts"
            f" ({PER_PROCESS} in the idle part); every process on this machine.",
            f"- Delivery: one writer sends {args.messages} messages {args.gap * 1000:.0f} ms apart;"
            " latency = reader's `time.time()` when it holds the message − writer's `time.time()`"
            " before `add_message`. Server CPU from `/proc/PID/stat` of the server process.",
            "",
            *(
                [
                    "Raw ZEO control (the floor within ZEO: each reader, woken by the invalidation, loads"
                    " the one small object the writer changed; plain ZODB clients, no zchat_nb; code"
                    " `stock runzeo` is ZEO's own server, `raw ZEO` is `zchat-nb serve`; each ZEO client"
                    " has its own networking thread, as ZEO makes it. The object holds only the newest"
                    " text: a reader more than one message behind skips to it, and what it skipped counts"
                    " as missing, and costs it nothing, which flatters the control when readers fall"
                    " behind):",
                    "",
                    table(rows["raw"]),
                    "",
                ]
                if rows["raw"]
                else []
            ),
            *(
                ["Session path (`ChatSession.new_messages(timeout=1.0)`):", "", table(rows["session"]), ""]
                if rows["session"]
                else []
            ),
            *(
                ["Widget poller path (headless `ChatWidget`):", "", table(rows["widget"]), ""]
                if rows["widget"]
                else []
            ),
            *(["Idle widgets (nobody typing):", "", table(rows["idle"]), ""] if rows["idle"] else []),
        ]
    )
    print(text)
    write_section(args.output, text)
    return 0


@contextlib.contextmanager
def _server_log_on_failure(path: Path) -> Iterator[None]:
    """If a part fails, show what the server said (its log goes with the temporary directory)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            lines = path.read_text(errors="replace").splitlines()
            print("-- the server's log, last 40 lines:", *lines[-40:], sep="\n", file=sys.stderr)
        raise


@contextlib.contextmanager
def _killing_workers() -> Iterator[None]:
    try:
        yield
    finally:
        for proc in Proc.started:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait()


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between this script's markers in ``path``, keeping the rest of the file."""
    section = f"{MARK_START}\n{text}{MARK_END}\n"
    old = path.read_text() if path.exists() else ""
    start, end = old.find(MARK_START), old.find(MARK_END)
    if start >= 0 and end > start:
        new = old[:start] + section + old[end + len(MARK_END) :].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.write_text(new)


if __name__ == "__main__":
    sys.exit(main())
