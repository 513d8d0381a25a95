"""Pictures as blobs vs bytes inside a record, through a real ZEO server: one table.

Usage, from the repository root::

    python -m benchmarks.blobs            # sizes 100 kB, 1 MB, 4 MB; 5 runs each
    python -m benchmarks.blobs --runs 3

The server is ``zchat-nb serve --path FILE`` in a child process (FileStorage with its blob
directory); a writer and a reader client in this process talk to it over TCP. For each size:

- *share*: ``ChatSession.share`` of a PNG of that size (blob upload + message commit);
- *read (download)*: the reader's first ``attachment_bytes`` (ZEO streams the blob into its cache);
- *read (cached)*: the same call again (the file is in the reader's blob cache);
- *inline commit*: the same bytes stored as a value in a record (an OOBTree entry), for comparison;
- *inline load*: a reader loading that record;
- *note commit after*: changing a short string in the same tree afterwards: with the bytes inline
  the whole record is written again; beside a blob it is a few hundred bytes.

Medians of ``--runs`` runs, in milliseconds; the file growth of that last commit in bytes.
Importing this module does nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

SIZES = [100_000, 1_000_000, 4_000_000]


def _png(size: int) -> bytes:
    """A PNG signature followed by filler: ``size`` bytes that sniff as image/png."""
    head = b"\x89PNG\r\n\x1a\n"
    return head + os.urandom(size - len(head))


def _ms(start: float) -> float:
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    import transaction
    from BTrees.OOBTree import OOBTree

    import zchat_nb
    from tests.helpers import ServerProcess, free_port

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "chat.fs"
        with ServerProcess(path, free_port()) as server:
            writer = zchat_nb.connect(server.address, user="writer", max_attachment_bytes=8_000_000)
            reader = zchat_nb.connect(server.address, user="reader", max_attachment_bytes=8_000_000)
            try:
                rows = [
                    _measure(writer, reader, path, size, args.runs, OOBTree, transaction) for size in SIZES
                ]
            finally:
                writer.close()
                reader.close()
    header = (
        "size", "share ms", "read (download) ms", "read (cached) ms",
        "inline commit ms", "inline load ms", "note after, inline: bytes", "note after, blob: bytes",
    )  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _measure(writer, reader, path: Path, size: int, runs: int, OOBTree, transaction) -> list[str]:  # type: ignore[no-untyped-def]
    from zchat_nb.model import _new_blob

    chat, seen = writer.session("bench"), reader.session("bench")
    seen.new_messages()
    share, download, cached, inline_commit, inline_load = [], [], [], [], []
    note_inline, note_blob = [], []
    for run in range(runs):
        data = _png(size)
        start = time.perf_counter()
        message = chat.share(data, caption=f"run {run}")
        share.append(_ms(start))
        got: list = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            got = seen.new_messages(timeout=deadline - time.monotonic())
        assert got and got[-1].id == message.id
        start = time.perf_counter()
        assert reader.attachment_bytes(got[-1]) == data
        download.append(_ms(start))
        start = time.perf_counter()
        reader.attachment_bytes(got[-1])
        cached.append(_ms(start))

        tm, conn = writer.connection()
        tm.begin()
        tree = conn.root().setdefault(f"bench-inline-{size}-{run}", OOBTree())
        tree["note"] = "first"
        start = time.perf_counter()
        tree["photo"] = data
        tm.commit()
        inline_commit.append(_ms(start))
        before = path.stat().st_size
        tm.begin()
        tree["note"] = "second"
        tm.commit()
        note_inline.append(path.stat().st_size - before)

        tm.begin()
        blob_tree = conn.root().setdefault(f"bench-blob-{size}-{run}", OOBTree())
        blob_tree["note"] = "first"
        blob_tree["photo"] = _new_blob(data)
        tm.commit()
        before = path.stat().st_size
        tm.begin()
        blob_tree["note"] = "second"
        tm.commit()
        note_blob.append(path.stat().st_size - before)

        rtm, rconn = reader.connection()
        reader.db.storage.ping()  # the invalidation of the new tree has arrived
        rtm.begin()
        start = time.perf_counter()
        assert rconn.root()[f"bench-inline-{size}-{run}"]["photo"] == data
        inline_load.append(_ms(start))
        rtm.abort()
    med = statistics.median
    return [
        f"{size / 1e6:g} MB",
        f"{med(share):.1f}",
        f"{med(download):.1f}",
        f"{med(cached):.1f}",
        f"{med(inline_commit):.1f}",
        f"{med(inline_load):.1f}",
        f"{med(note_inline):,.0f}",
        f"{med(note_blob):,.0f}",
    ]


if __name__ == "__main__":
    main()
