"""The bounded pickle checker (``zchat_nb/pickles.py``): first version vs this checkout, per kind of pickle.

Usage::

    python -m benchmarks.checker             # from the repository root; about 20 s
    python -m benchmarks.checker --repeat 9  # more repeats per cell (best is kept)

The records are real: a room written by the model into an in-memory ZODB (one writer, 20,000
messages: its stream's buckets and BTree inner nodes), plus the small records around them; the ZEO
frames are what ZEO's own encoder makes of a commit's ``storea`` (a server checks it) and of a
``loadBefore`` reply (a client checks it). The baseline is the checker as first written, read from
git (``BASELINE``): a generator of opcode names and one object per stack value. Each cell is the
best of ``--repeat`` passes over every pickle of that kind. Importing this module does nothing.
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages in the room (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="passes per cell, best kept (default 5)")
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
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
