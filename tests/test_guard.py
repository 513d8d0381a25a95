"""The guard's frame decoding and metering, unit by unit (the servers' behaviour: test_hostile_server.py)."""

from __future__ import annotations

import random

import pytest
from ZEO.asyncio.marshal import encoder

from zchat_nb.guard import ServerLimits, _FrameMeter, decode_checked_frame, decode_frame
from zchat_nb.pickles import RefusedPickle

OID = b"\x00\x00\x00\x00\x00\x00\x00\x07"
TID = b"\x03\xe5\x7f\x7f\x7f\x7f\x7f\x7f"
LIMITS = ServerLimits()


def load_frame(oid: bytes = OID, tid: bytes = TID) -> bytes:
    """The frame ZEO's client sends for ``loadBefore(oid, tid)``."""
    return encoder(b"Z5")((oid, tid), False, "loadBefore", (oid, tid))


def outcome(decode, frame: bytes, limits: ServerLimits = LIMITS):  # type: ignore[no-untyped-def]
    try:
        return decode(frame, limits)
    except RefusedPickle:
        return "refused"


def test_a_load_frame_decodes_as_the_checked_path_does() -> None:
    frame = load_frame()
    assert decode_frame(frame, LIMITS) == decode_checked_frame(frame, LIMITS)
    assert decode_frame(frame, LIMITS) == ((OID, TID), 0, "loadBefore", (OID, TID))


def test_every_one_byte_change_of_a_load_frame_decodes_as_the_checked_path_does() -> None:
    """The exact match of a load is no looser than the scan: whatever it lets through, the scan does too."""
    frame = load_frame()
    differ = []
    for pos in range(len(frame)):
        for value in range(256):
            changed = frame[:pos] + bytes([value]) + frame[pos + 1 :]
            if outcome(decode_frame, changed) != outcome(decode_checked_frame, changed):
                differ.append((pos, value))
    assert differ == []


@pytest.mark.parametrize(
    "frame",
    [
        load_frame()[:-1],  # truncated
        load_frame() + b".",  # a byte after STOP
        load_frame() + load_frame(),  # two frames in one
        load_frame()[:-2] + b"\x85t.",  # TUPLE1 of the args
        load_frame(OID + b"\x00", TID),  # a 9-byte oid
        load_frame(OID, TID[:7]),  # a 7-byte tid
        load_frame().replace(b"loadBefore", b"loadBefor\x00"),
        bytearray(load_frame()),
    ],
    ids=["truncated", "trailing", "two", "tuple1", "long-oid", "short-tid", "method", "bytearray"],
)
def test_near_misses_of_a_load_frame_take_the_checked_path(frame: bytes) -> None:
    assert outcome(decode_frame, frame) == outcome(decode_checked_frame, frame)


def test_a_load_frame_over_a_tiny_frame_limit_is_refused() -> None:
    tiny = ServerLimits(max_frame_bytes=32)
    assert outcome(decode_frame, load_frame(), tiny) == "refused"


def test_a_load_frame_naming_a_global_is_refused() -> None:
    evil = load_frame().replace(b"C\x08" + OID, b"cbuiltins\neval\n", 1)
    assert outcome(decode_frame, evil) == "refused"


def _reference_meter(stream: bytes, limit: int) -> tuple[int | None, int]:
    """Frame by frame over the whole stream: (first oversized announcement, its offset)."""
    pos = 0
    while pos + 4 <= len(stream):
        size = int.from_bytes(stream[pos : pos + 4], "big")
        if size > limit:
            return size, pos
        pos += 4 + size
    return None, len(stream)


@pytest.mark.parametrize("seed", range(20))
def test_the_meter_finds_an_oversized_frame_however_the_stream_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    limit = 100
    frames = [rng.randrange(0, limit + 1) for _ in range(rng.randrange(1, 30))]
    stream = b"".join(size.to_bytes(4, "big") + bytes(size) for size in frames)
    if seed % 2:  # a frame over the limit somewhere, then more bytes
        stream += (limit + 1 + seed).to_bytes(4, "big") + bytes(50)
    expected, at = _reference_meter(stream, limit)
    meter = _FrameMeter(limit)
    pos, found = 0, None
    while pos < len(stream) and found is None:
        step = rng.choice([1, 2, 3, 4, 5, 7, 64, 1000])
        found = meter.feed(stream[pos : pos + step])
        pos += step
    assert found == expected
    if expected is not None:
        assert pos > at + 3  # only once its whole length prefix arrived
    else:
        assert (meter.body, meter.head) == (0, b"")


def _log_ops(log: object) -> None:
    """A transaction's worth of what a ZEO server logs: stores big and small, a check, a delete."""
    for i in range(6):
        log.store(b"%08d" % i, b"s" * 8, b"d" * (40 if i % 2 else 3000))  # type: ignore[attr-defined]
    log.checkread(b"c" * 8, b"s" * 8)  # type: ignore[attr-defined]
    log.delete(b"x" * 8, b"s" * 8)  # type: ignore[attr-defined]
    log.restore(b"r" * 8, b"s" * 8, None, None)  # type: ignore[attr-defined]
    log.undo(b"u" * 8)  # type: ignore[attr-defined]


@pytest.mark.parametrize("spill", [False, True], ids=["in memory", "past the limit"])
def test_the_servers_commit_log_gives_back_what_zeos_gives(
    spill: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ZEO.StorageServer import CommitLog

    from zchat_nb.guard import MemoryCommitLog

    if spill:  # the first stores in memory, the rest in a file, as a big upload would
        monkeypatch.setattr(MemoryCommitLog, "IN_MEMORY", 3200)
    ours, zeos = MemoryCommitLog(), CommitLog()
    try:
        for log in (ours, zeos):
            _log_ops(log)
        assert (ours.file is not None) is spill
        assert len(ours.entries) == (2 if spill else 10)
        assert ours.stores == zeos.stores == 10
        assert list(ours) == list(zeos)
        assert list(ours) == list(ours)  # read again (ZEO reads the log at the vote, once)
        assert ours.size() > 0
    finally:
        ours.close()
        zeos.close()
    assert ours.file is None and ours.entries == []


def test_the_guarded_server_logs_its_transactions_in_memory() -> None:
    import ZEO.StorageServer

    import zchat_nb
    from zchat_nb.guard import MemoryCommitLog

    server = zchat_nb.serve()
    try:
        assert ZEO.StorageServer.CommitLog is MemoryCommitLog
        with zchat_nb.connect(server.address, user="ada") as client:
            sent = client.session("general").add_message("through the commit log")
            assert [m.id for m in client.session("general").history(5)] == [sent.id]
    finally:
        server.stop()


class _Manager:
    storage_id = "1"

    def __init__(self, waiting: int) -> None:
        self.waiting = [object()] * waiting


class _Storage:
    def __init__(self) -> None:
        self.logged: list[tuple[str, int]] = []

    def log(self, message: str, level: int) -> None:
        self.logged.append((message, level))


def test_the_lock_queue_is_logged_only_when_long_and_at_most_every_30_s(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import zchat_nb.guard as guard

    now = [1000.0]
    monkeypatch.setattr(guard.time, "monotonic", lambda: now[0])
    zs, manager = _Storage(), _Manager(9)
    queue_log = guard.QueueLog(manager)
    for _ in range(3):  # ZEO warns from 4 waiting on, for each commit; nine waiting is a busy class
        queue_log(zs, "(%r) lock: transactions waiting: %s")
    assert zs.logged == []
    manager.waiting *= 2
    for _ in range(3):
        now[0] += 10
        queue_log(zs, "(%r) unlock: transactions waiting: %s")
    assert zs.logged == [
        ("('1') unlock: transactions waiting: 18 (logged at most every 30 s)", logging.WARNING)
    ]
    now[0] += guard.QUEUE_LOG_SECONDS
    queue_log(zs, "(%r) queue lock: transactions waiting: %s")
    assert len(zs.logged) == 2
    caplog.set_level(logging.DEBUG, logger="ZEO.StorageServer")  # asked for: short queues are told
    manager.waiting = [object()]
    queue_log(zs, "(%r) lock: transactions waiting: %s")
    assert zs.logged[-1] == ("('1') lock: transactions waiting: 1", logging.DEBUG)


@pytest.mark.integration
def test_twelve_commits_queued_behind_a_held_lock_give_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging
    import threading

    from ZEO.ClientStorage import ClientStorage
    from ZODB.Connection import TransactionMetaData

    import zchat_nb

    server = zchat_nb.serve()
    manager = server._server.lock_managers["1"]
    queue_log, all_queued = manager._log_waiting, threading.Event()

    def log_waiting(zs: object, message: str) -> None:  # told of every change to the queue
        queue_log(zs, message)
        if len(manager.waiting) == 12:
            all_queued.set()

    manager._log_waiting = log_waiting
    holder = ClientStorage(server.address, wait_timeout=10)
    clients = [zchat_nb.connect(server.address, user=f"s{i}") for i in range(12)]
    try:
        sessions = [client.session("general") for client in clients]
        sessions[0].add_message("the room exists")
        caplog.set_level(logging.WARNING, logger="ZEO.StorageServer")
        txn = TransactionMetaData()
        holder.tpc_begin(txn)
        holder.store(holder.new_oid(), b"\0" * 8, b"read by nobody", "", txn)
        holder.tpc_vote(txn)  # holds the commit lock until its tpc_finish
        sent: list[str] = []
        senders = [
            threading.Thread(target=lambda s=s, i=i: sent.append(s.add_message(f"queued {i}").id))
            for i, s in enumerate(sessions)
        ]
        for thread in senders:
            thread.start()
        assert all_queued.wait(30), f"{len(manager.waiting)} commits queued, not 12"
        holder.tpc_finish(txn)
        for thread in senders:
            thread.join(30)
        assert len(set(sent)) == 12
        waiting = [r for r in caplog.records if "transactions waiting" in r.getMessage()]
        # ZEO's own: a warning for each queue change from 4 commits waiting on (about 30 here).
        assert [r.levelno for r in waiting] == [logging.WARNING]
        told = waiting[0].getMessage()
        assert told.endswith("('1') queue lock: transactions waiting: 10 (logged at most every 30 s)")
    finally:
        for client in clients:
            client.close()
        holder.close()
        server.stop()
