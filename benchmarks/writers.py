"""8 zchat_nb writers against the raw 8-process ZEO rate, in pairs run back to back.

Usage::

    python -m benchmarks.writers              # 6 pairs of 8 processes x 150 sends
    python -m benchmarks.writers --pairs 10 --sends 300

The writer row of ``benchmarks/run.py`` is one pair, and the machine's speed swings between runs
minutes apart (the raw control's own rate moved from 261 to 600 commits/s in one day), so one pair
says little. Here each pair is the raw control (8 processes, each committing a small change to its own
object, as fast as it can) and 8 zchat_nb writers (``add_message`` as fast as it returns), one after
the other, every other pair in the other order (the speed drifts within a pair too), on
one ``zchat-nb serve`` with a FileStorage; the table gives each pair's rates, their ratio (the issue's
target is >= 0.9), both per-commit p99s, the server process's CPU per commit of both (over each
half's whole run, its connections and warm-up commits included) and the writer processes' own CPU
per commit (over the timed window: the commits, and the other writers' invalidations they handle).
Prints the table; writes nothing. Nothing here is run by the test suite.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.fanout import process_cpu
from benchmarks.run import (
    aggregate_rate,
    run_concurrently,
    spawn,
    w_ours_read_all,
    w_ours_writer,
    w_raw_commits,
    w_raw_setup,
)
from tests.helpers import ServerProcess, percentile

ROOM = "writers"


def measure(
    ctx: Any, func: Any, k: int, server: ServerProcess, *args: Any
) -> tuple[float, float, float, float]:
    """Aggregate rate, per-commit p99 (s), server CPU per commit (s) and the writer processes' own
    CPU per timed commit (s) of ``k`` processes of ``func``."""
    assert server.proc is not None
    cpu = process_cpu(server.proc.pid)
    done = run_concurrently(ctx, func, k, server.address, *args)
    cpu = process_cpu(server.proc.pid) - cpu
    rate = aggregate_rate(done)
    latencies = [x for d in done for x in d["latencies"]]
    warmups = k * (20 if func is w_raw_commits else 1)  # commits outside the timed window
    own = sum(d["cpu"] for d in done) / len(latencies)
    return rate, percentile(latencies, 99), cpu / (len(latencies) + warmups), own


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--sends", type=int, default=150, help="timed sends (commits) per process")
    parser.add_argument("--processes", type=int, default=8)
    args = parser.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    k = args.processes
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="zchat-writers-") as tmp:
        os.environ["ZCHAT_HOME"] = str(Path(tmp) / "home")
        os.environ.pop("ZCHAT_ADDRESS", None)
        with ServerProcess(Path(tmp) / "writers.fs", log_path=Path(tmp) / "server.log") as server:
            spawn(ctx, w_raw_setup, server.address, [f"w{i}" for i in range(k)]).result()
            spawn(ctx, w_ours_read_all, server.address, ROOM).result()  # makes the room
            for pair in range(args.pairs):
                # Every other pair in the other order: the machine's speed drifts within a pair too,
                # and the half that always ran second would always take the drift.
                if pair % 2 == 0:
                    raw = measure(ctx, w_raw_commits, k, server, args.sends)
                    ours = measure(ctx, w_ours_writer, k, server, ROOM, args.sends)
                else:
                    ours = measure(ctx, w_ours_writer, k, server, ROOM, args.sends)
                    raw = measure(ctx, w_raw_commits, k, server, args.sends)
                order = "raw first" if pair % 2 == 0 else "zchat_nb first"
                rows.append((time.strftime("%H:%M"), order, raw, ours))
                print(
                    f"pair {pair + 1} ({order}): raw {raw[0]:.0f}/s, zchat_nb {ours[0]:.0f}/s "
                    f"({ours[0] / raw[0]:.2f})"
                )
    print()
    print(f"{k} processes x {args.sends} timed commits each, pairs back to back on one `zchat-nb serve`:")
    print()
    print(
        "| time | order | raw commits/s | zchat_nb msgs/s | ratio | per-commit p99 ms, raw / zchat_nb "
        "| server CPU µs / commit, raw / zchat_nb | writer CPU µs / commit, raw / zchat_nb |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for when, order, raw, ours in rows:
        print(
            f"| {when} | {order} | {raw[0]:.0f} | {ours[0]:.0f} | {ours[0] / raw[0]:.2f} "
            f"| {1e3 * raw[1]:.0f} / {1e3 * ours[1]:.0f} "
            f"| {1e6 * raw[2]:.0f} / {1e6 * ours[2]:.0f} | {1e6 * raw[3]:.0f} / {1e6 * ours[3]:.0f} |"
        )
    ratios = [ours[0] / raw[0] for _, _, raw, ours in rows]
    print()
    print(
        f"ratio median {statistics.median(ratios):.2f}, {sum(r >= 0.9 for r in ratios)} of {len(ratios)}"
        f" pairs at 0.9 or more; load average after: {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
