"""The bounded pickle checker (``zchat_nb/pickles.py``): first version vs this checkout, per kind of pickle.

Usage::

    python -m benchmarks.checker             # from the repository root; about 20 s
    python -m benchmarks.checker --repeat 9  # more repeats per cell (best is kept)
    python -m benchmarks.checker --history 100000   # also cold history(200) over ZEO, both checkers

The records are real: a room written by the model into an in-memory ZODB (one writer, 20,000
messages: its stream's buckets and BTree inner nodes), plus the small records around them; the ZEO
frames are what ZEO's own encoder makes of a commit's ``storea`` (a server checks it) and of a
``loadBefore`` reply (a client checks it). The baseline is the checker as first written, read from
git (``BASELINE``): a generator of opcode names and one object per stack value. Each cell is the
best of ``--repeat`` passes over every pickle of that kind.

``--history N`` also builds a FileStorage with a room of N messages from 20 writers (as
``benchmarks.run`` does), serves it with ``zchat-nb serve`` in a child process, and times
``history(200)`` right after a fresh connect in this process, alternating the two checkers (the
baseline is swapped in where the client calls it: records and server frames); then prints the top
of a cProfile of one cold call with each. Importing this module does nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The commit whose zchat_nb/pickles.py is the baseline (the checker before the fast scan).
BASELINE = "b22eec2"


def baseline_module() -> types.ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BASELINE}:zchat_nb/pickles.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("zchat_nb._pickles_baseline")
    module.__package__ = "zchat_nb"
    sys.modules[module.__name__] = module
    exec(compile(source, f"{BASELINE}:zchat_nb/pickles.py", "exec"), module.__dict__)
    return module


def model_records(messages: int) -> list[bytes]:
    """Every record of a database holding one room of ``messages`` messages from one writer."""
    import transaction
    import ZODB
    from BTrees.OOBTree import OOBTree
    from ZODB.MappingStorage import MappingStorage

    from zchat_nb.model import ROOMS_KEY, Message, Room

    storage = MappingStorage()
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        rooms = conn.root()[ROOMS_KEY] = OOBTree()
        room = rooms["general"] = Room("general", created=1.7e9)
        rng = random.Random(1)
        when = 1.7e9
        for i in range(messages):
            when += rng.expovariate(0.5)
            room.append("0" * 16, Message(f"{i:032x}", "user0", f"message number {i}", when))
        tm.commit()
        conn.close()
        return [record.data for txn in storage.iterator() for record in txn if record.data]
    finally:
        db.close()


def class_of(record: bytes) -> str:
    start = record.index(b"c") + 1
    first = record.index(b"\n", start)
    return record[first + 1 : record.index(b"\n", first + 1)].decode()


def kinds(records: list[bytes]) -> list[tuple[str, str, list[bytes], Callable[[Any, bytes], None]]]:
    """``(kind, policy name, pickles, check(module, data))`` rows of the table."""
    from ZEO.asyncio.marshal import encode

    buckets = [r for r in records if class_of(r) == "OOBucket"]
    nodes = [r for r in records if class_of(r) == "OOBTree" and len(r) > 4000]
    small = [r for r in records if len(r) < 1000]
    bucket = max(buckets, key=len)
    store = [
        encode(7, True, "storea", (b"\0" * 7 + b"\1", b"\0" * 8, bucket, "1")) for bucket in buckets[:200]
    ]
    reply = [encode(9, False, ".reply", (bucket, b"\3" * 8, None)) for bucket in buckets[:200]]
    del bucket

    def record(module: Any, data: bytes) -> None:
        module.check_record(data)

    def server_frame(module: Any, data: bytes) -> None:
        module.check_pickle(data, module.SERVER_WIRE)

    def client_frame(module: Any, data: bytes) -> None:
        module.check_pickle(data, module.CLIENT_WIRE)

    return [
        ("bucket of messages (stream)", "RECORD", buckets, record),
        ("BTree inner node (stream)", "RECORD", nodes, record),
        ("small records (room, counters, root)", "RECORD", small, record),
        ("ZEO frame: storea of a bucket", "SERVER_WIRE", store, server_frame),
        ("ZEO frame: loadBefore reply", "CLIENT_WIRE", reply, client_frame),
    ]


def best_time(
    check: Callable[[Any, bytes], None], module: Any, pickles: Sequence[bytes], repeat: int
) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for data in pickles:
            check(module, data)
        best = min(best, time.perf_counter() - start)
    return best


def commit() -> str:
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "zchat_nb"], capture_output=True, text=True
    )
    return found.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")


def cold_history(size: int, repeat: int, old: types.ModuleType) -> list[str]:
    """Cold ``history(200)`` over ZEO with each checker: a table, then the top of each profile."""
    import contextlib
    import cProfile
    import io
    import pstats
    import tempfile

    import zchat_nb
    import zchat_nb.client
    import zchat_nb.security
    from benchmarks.run import build_ours, human
    from tests.helpers import ServerProcess

    new_record, new_frame = zchat_nb.client.check_record, zchat_nb.security.check_pickle

    def use(module: types.ModuleType | None) -> None:
        zchat_nb.client.check_record = module.check_record if module else new_record  # type: ignore[attr-defined]
        zchat_nb.security.check_pickle = module.check_pickle if module else new_frame  # type: ignore[attr-defined]

    room = f"r{human(size)}"
    times: dict[str, list[float]] = {"baseline": [], "new": []}
    profiles: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.fs"
        start = time.perf_counter()
        build_ours(path, [size], 2.0)
        built = time.perf_counter() - start
        with ServerProcess(path) as server:
            for i in range(repeat + 1):
                for name, module in (("baseline", old), ("new", None)):
                    use(module)
                    try:
                        with zchat_nb.connect(server.address, user="history", cache_size=1 << 20) as client:
                            session = client.session(room, backlog=0)
                            profile = cProfile.Profile() if i == repeat else None
                            with profile or contextlib.nullcontext():
                                start = time.perf_counter()
                                found = session.history(200)
                                took = time.perf_counter() - start
                            assert len(found) == 200, len(found)
                    finally:
                        use(None)
                    if profile is None:
                        times[name].append(took)
                    else:
                        out = io.StringIO()
                        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(8)
                        profiles[name] = out.getvalue()
    lines = [
        "",
        f"Cold `history(200)` over ZEO, room of {size} messages from 20 writers (built in {built:.0f} s), "
        f"`zchat-nb serve` in a child process; median of {repeat} fresh connects each, alternating:",
        "",
        "| checker | cold history(200) median (ms) | min (ms) |",
        "|---|---:|---:|",
    ]
    for name, found in times.items():
        found.sort()
        lines.append(f"| {name} | {found[len(found) // 2] * 1e3:.1f} | {found[0] * 1e3:.1f} |")
    for name, text in profiles.items():
        top = [line for line in text.splitlines() if line.strip()]
        lines += [
            "",
            f"cProfile of one cold history(200), {name} checker (top by own time):",
            "```",
            *top[-10:],
            "```",
        ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages in the room (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="passes per cell, best kept (default 5)")
    parser.add_argument(
        "--history", type=int, default=0, metavar="N", help="also time cold history(200) at N"
    )
    args = parser.parse_args(argv)

    import zchat_nb.pickles as new

    old = baseline_module()
    load = os.getloadavg()[0]
    records = model_records(args.messages)
    lines = [
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; command: "
        f"`python -m benchmarks.checker` ({args.messages} messages, best of {args.repeat}); "
        f"zchat_nb commit {commit()} vs baseline {BASELINE}",
        f"- Load average (1 min) before: {load:.2f}; Python {sys.version.split()[0]}",
        "",
        "| pickle | policy | count | mean bytes | baseline µs each | new µs each | new MB/s | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, policy, pickles, check in kinds(records):
        size = sum(map(len, pickles))
        before = best_time(check, old, pickles, args.repeat)
        after = best_time(check, new, pickles, args.repeat)
        lines.append(
            f"| {kind} | {policy} | {len(pickles)} | {size // len(pickles)} | "
            f"{before / len(pickles) * 1e6:.1f} | {after / len(pickles) * 1e6:.1f} | "
            f"{size / after / 1e6:.1f} | {before / after:.1f}x |"
        )
    print("\n".join(lines), flush=True)
    if args.history:
        print("\n".join(cold_history(args.history, args.repeat, old)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
