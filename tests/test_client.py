"""Delivery through a real ZEO server: many processes, late commits, caches, outages."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from ZEO.Exceptions import ClientDisconnected

import zchat_nb
from zchat_nb import Message

from .helpers import ServerProcess

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def ada_and_bob(server: zchat_nb.Server) -> Iterator[tuple[zchat_nb.ChatClient, zchat_nb.ChatClient]]:
    """Two clients of ``server``, users "a" and "b", closed at the end."""
    with (
        zchat_nb.connect(server.address, user="a") as a,
        zchat_nb.connect(server.address, user="b") as b,
    ):
        yield a, b


WRITER = """
import sys, zchat_nb
address, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with zchat_nb.connect(address, user=name) as client:
    chat = client.session("general")
    for i in range(count):
        print(chat.add_message(f"{name} {i}").id, flush=True)
"""


def collect(session: zchat_nb.ChatSession, expected: int, timeout: float = 60.0) -> list[Message]:
    """Read until ``expected`` messages arrived (woken by invalidations) or fail loudly."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(got)} of {expected} messages arrived within {timeout} s"
        got.extend(session.new_messages(timeout=remaining))
    return got


def read_while(reader: zchat_nb.ChatSession, send: Any) -> str:
    """Block ``reader`` in ``new_messages(timeout=60)`` on a thread, ``send()``, and say how it ended.

    "woken" means the reader returned with exactly the message sent, long before its 60 s timeout.
    """
    ready = threading.Event()
    result: dict[str, Any] = {}

    def read() -> None:
        ready.set()
        result["messages"] = reader.new_messages(timeout=60)

    thread = threading.Thread(target=read)
    thread.start()
    ready.wait(10)
    sent = send()
    thread.join(30)  # would take the full 60 s if the reader were not woken
    if thread.is_alive():
        thread.join()
        return "timed out"
    return "woken" if result["messages"] == [sent] else f"got {result['messages']!r}"


def test_every_client_receives_every_message_from_concurrent_writer_processes(
    file_server: zchat_nb.Server,
) -> None:
    writers, each = 4, 30
    address = "{}:{}".format(*file_server.address)
    with zchat_nb.connect(file_server.address, user="r1") as c1, zchat_nb.connect(address, user="r2") as c2:
        readers = [c1.session("general"), c2.session("general")]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, address, f"w{i}", str(each)], stdout=subprocess.PIPE, text=True
            )
            for i in range(writers)
        ]
        sent = Counter()
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0
            sent.update(out.split())
        assert len(sent) == writers * each and set(sent.values()) == {1}
        for reader in readers:
            got = collect(reader, writers * each)
            assert Counter(m.id for m in got) == sent
            assert reader.new_messages() == []
            # Each writer's messages arrive in the order it sent them.
            for i in range(writers):
                mine = [m.text for m in got if m.author == f"w{i}"]
                assert mine == [f"w{i} {n}" for n in range(each)]


def test_message_stamped_earlier_but_committed_later_is_delivered_once(server: zchat_nb.Server) -> None:
    with (
        zchat_nb.connect(server.address, user="reader") as reader_client,
        zchat_nb.connect(server.address, user="fast") as fast,
        zchat_nb.connect(server.address, user="slow", clock=lambda: time.time() - 5.0) as slow,
    ):
        reader = reader_client.session("general")
        fast.session("general").add_message("on time")
        assert [m.text for m in collect(reader, 1)] == ["on time"]
        late = slow.session("general").add_message("five seconds slow")
        got = collect(reader, 1)
        assert got == [late]
        assert reader.new_messages(timeout=0.2) == []
        # The seed's cursor (the newest time seen so far) would never have delivered it:
        assert late.time < max(m.time for m in reader.history(10))


def test_new_messages_waits_for_an_invalidation_not_for_the_timeout(server: zchat_nb.Server) -> None:
    with zchat_nb.connect(server.address, user="a") as a, zchat_nb.connect(server.address, user="b") as b:
        reader = a.session("general")
        writer = b.session("general")
        assert read_while(reader, lambda: writer.add_message("wake up")) == "woken"


def test_no_redelivery_after_the_cache_is_emptied(server: zchat_nb.Server) -> None:
    with zchat_nb.connect(server.address, user="a", cache_size=1000) as client:
        chat = client.session("general")
        for i in range(60):
            chat.add_message(f"m{i}")
        assert len(collect(chat, 60)) == 60
        _, conn = client.connection()
        conn.cacheMinimize()
        client.db.cacheMinimize()
        assert chat.new_messages() == []
        chat.add_message("after")
        assert [m.text for m in collect(chat, 1)] == ["after"]


def test_outage_keeps_messages_reconnects_and_commits_a_send_exactly_once(
    server_process: ServerProcess,
) -> None:
    with (
        zchat_nb.connect(server_process.address, user="writer", timeout=30) as writer_client,
        zchat_nb.connect(server_process.address, user="reader", timeout=30) as reader_client,
    ):
        writer = writer_client.session("general")
        reader = reader_client.session("general")
        before = writer.add_message("before the crash")
        assert collect(reader, 1) == [before]

        server_process.kill()
        outcome: dict[str, Any] = {}
        sending = threading.Thread(
            target=lambda: outcome.update(sent=writer.add_message("during the outage"))
        )
        sending.start()
        server_process.start()
        sending.join(60)
        assert not sending.is_alive() and "sent" in outcome

        assert reader_client.wait_connected(30)
        got = collect(reader, 1)
        assert got == [outcome["sent"]]
        assert reader.new_messages(timeout=0.5) == []
        fresh = reader_client.session("general")
        assert Counter(m.text for m in collect(fresh, 2)) == {"before the crash": 1, "during the outage": 1}


def test_a_commit_whose_answer_was_lost_is_not_duplicated(server: zchat_nb.Server) -> None:
    with zchat_nb.connect(server.address, user="a") as client:
        storage = client.db.storage
        real_finish = storage.tpc_finish
        lost = []

        def finish_then_lose_the_answer(*args: Any, **kwargs: Any) -> Any:
            result = real_finish(*args, **kwargs)
            if not lost:
                lost.append(True)
                raise ClientDisconnected("the answer to tpc_finish was lost")
            return result

        storage.tpc_finish = finish_then_lose_the_answer
        chat = client.session("general")
        sent = chat.add_message("exactly once")
        assert lost == [True]
        assert collect(chat, 1) == [sent]
        with zchat_nb.connect(server.address, user="b") as other:
            assert [m.id for m in other.session("general").history(10)] == [sent.id]


def test_send_while_the_server_stays_away_fails_clearly_within_the_timeout(
    server_process: ServerProcess,
) -> None:
    with zchat_nb.connect(server_process.address, user="a", timeout=2.0) as client:
        chat = client.session("general")
        chat.add_message("while it is up")
        server_process.kill()
        started = time.monotonic()
        with pytest.raises(zchat_nb.ZChatSendError, match=r"within 2 s; the message was not sent") as info:
            chat.add_message("lost?")
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"the send blocked {elapsed:.1f} s, not the 2 s it was given"
        assert "{}:{}".format(*server_process.address) in str(info.value)
        with pytest.raises(zchat_nb.ZChatDisconnected, match="not connected"):
            chat.new_messages()
        assert isinstance(zchat_nb.ZChatDisconnected("x"), zchat_nb.ZChatError)
        server_process.start()
        assert client.wait_connected(30)
        assert [m.text for m in chat.history(10)] == ["while it is up"]


def test_subscribers_hear_invalidations_commits_polls_and_resolved_conflicts(
    file_server: zchat_nb.Server,
) -> None:
    with ada_and_bob(file_server) as (a, b):
        events: list[zchat_nb.ClientEvent] = []
        heard = threading.Event()

        def listen(event: zchat_nb.ClientEvent) -> None:
            events.append(event)
            if event.kind == "invalidation":
                heard.set()

        unsubscribe = a.subscribe(listen, activity=True)
        quiet: list[zchat_nb.ClientEvent] = []
        a.subscribe(quiet.append)
        chat = a.session("general")
        chat.add_message("mine")
        chat.new_messages()
        b.session("general").add_message("theirs")
        assert heard.wait(10)
        kinds = {e.kind for e in events}
        assert {"commit", "poll", "invalidation"} <= kinds
        commit = next(e for e in events if e.kind == "commit" and "sending" in e.details["what"])
        assert commit.details["latency"] > 0 and commit.details["conflicts"] == 0
        poll = next(e for e in events if e.kind == "poll")
        assert poll.details["count"] == 1 and poll.details["room"] == "general"
        # A plain subscriber hears what wakes readers, its own commits included, and no activity.
        assert "committed" in {e.kind for e in quiet}
        assert {e.kind for e in quiet} <= {"invalidation", "connected", "disconnected", "committed"}
        invalidation = next(e for e in events if e.kind == "invalidation")
        assert invalidation.tid and invalidation.oids

        # Two clients inserting into the same bucket at once: the server merges, the client hears "resolved".
        tm1, c1 = a.connection()
        tm2, c2 = b.connection()
        tm1.begin()
        tm2.begin()
        from zchat_nb.model import ROOMS_KEY, Message

        c1.root()[ROOMS_KEY]["general"].append("w1", Message("1" * 32, "a", "x", 1.0))
        c2.root()[ROOMS_KEY]["general"].append("w2", Message("2" * 32, "b", "y", 2.0))
        tm2.commit()
        events.clear()
        tm1.commit()
        assert any(e.kind == "resolved" and e.details["count"] >= 1 for e in events)
        unsubscribe()
        events.clear()
        chat.add_message("unheard")
        assert events == []


def test_a_subscriber_of_named_kinds_hears_only_those(file_server: zchat_nb.Server) -> None:
    with ada_and_bob(file_server) as (a, b):
        commits: list[zchat_nb.ClientEvent] = []
        everything: list[zchat_nb.ClientEvent] = []
        heard = threading.Event()
        a.subscribe(commits.append, kinds={"commit"})
        a.subscribe(lambda e: (everything.append(e), e.kind == "invalidation" and heard.set()))
        chat = a.session("general")
        chat.add_message("mine")
        chat.new_messages()
        b.session("general").add_message("theirs")
        assert heard.wait(10)
        assert [e.kind for e in commits] == ["commit"]  # not its poll, not the invalidation
        assert commits[0].details["conflicts"] == 0 and "sending" in commits[0].details["what"]
        assert {"committed", "invalidation"} <= {e.kind for e in everything}
        for bad in ({"commits"}, "commit", {"invalidation", "typed"}):
            with pytest.raises(ValueError, match=r"the kinds are commit, committed, .*, resolved") as info:
                a.subscribe(commits.append, kinds=bad)
            assert repr(bad)[:20] in str(info.value)


def test_the_cache_keeps_the_last_tid_in_memory_not_in_its_temporary_file(
    file_server: zchat_nb.Server,
) -> None:
    from ZODB.utils import p64, u64

    with ada_and_bob(file_server) as (a, b):
        cache = a.db.storage._cache
        assert cache.path is None  # ZEO's temporary file: nobody opens it again

        def file_header() -> bytes:  # magic and tid; under the cache's lock (ZEO's thread writes too)
            with cache._lock:
                position = cache.f.tell()
                cache.f.seek(0)
                header = cache.f.read(12)
                cache.f.seek(position)
                return header

        before = file_header()
        chat = a.session("general")
        for i in range(5):
            b.session("general").add_message(f"from b {i}")
        assert len(collect(chat, 5)) == 5  # five invalidations reached a
        assert cache.getLastTid() == a.db.storage.lastTransaction() == b.db.storage.lastTransaction()
        assert file_header() == before  # no write for any of them
        with pytest.raises(ValueError, match="must be greater than previous one"):
            cache.setLastTid(p64(u64(cache.getLastTid()) - 1))
        last = cache.getLastTid()
        cache.clear()  # as ZEO's does, clear() keeps the tid: a reader's snapshot stays where it was
        assert cache.getLastTid() == last
        b.session("general").add_message("after the clear")
        assert [m.text for m in collect(chat, 1)] == ["after the clear"]


def test_a_reader_is_woken_by_a_send_from_its_own_client(server: zchat_nb.Server) -> None:
    """ZEO sends no invalidation to the committing client: the client wakes its own readers."""
    with zchat_nb.connect(server.address, user="a") as client:
        reader = client.session("general")
        assert reader.new_messages() == []
        writer = client.session("general")
        assert read_while(reader, lambda: writer.add_message("from this very client")) == "woken"


def test_the_storage_tells_the_client_from_its_first_connection(server: zchat_nb.Server) -> None:
    """The events are given to the storage when it is built: its first "connected" is not lost."""
    with zchat_nb.connect(server.address, user="early") as client:
        assert client.db.storage.zchat_events is client.events
        assert client.generation() >= 1  # the "connected" that ZEO sent while connect() waited


def _fill(buffer: Any, records: list[tuple[bytes, bytes | None]]) -> None:
    for oid, data in records:
        buffer.store(oid, data)


@pytest.mark.parametrize("spill", [False, True], ids=["in memory", "past the limit"])
def test_the_in_memory_transaction_buffer_gives_what_zeos_gives(
    spill: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same attributes (and its list of records), same records back, in order, with ZEO's rules
    for records the client resolved (the last one counts) and oids only the server resolved."""
    from ZEO.TransactionBuffer import TransactionBuffer

    from zchat_nb.client import _MemoryTransactionBuffer

    if spill:
        monkeypatch.setattr(_MemoryTransactionBuffer, "IN_MEMORY", 100)
    records = [(b"%08d" % i, b"d" * 40 if i % 3 else None) for i in range(12)]
    ours, zeos = _MemoryTransactionBuffer(3), TransactionBuffer(3)
    try:
        assert sorted(vars(ours)) == sorted([*vars(zeos), "records"])
        for buffer in (ours, zeos):
            _fill(buffer, records)
            buffer.resolve(b"%08d" % 4, b"merged")  # the client merged a conflict on record 4
            buffer.server_resolve(b"%08d" % 5)
            buffer.server_resolve(b"9" * 8)  # resolved by the server, not in the buffer
        assert (ours.file is not None) is spill
        assert len(ours.records) == (2 if spill else 13)  # 31 + 71 bytes by ZEO's count, then the file
        assert (ours.count, ours.size) == (zeos.count, zeos.size)
        assert list(ours) == list(zeos)
        assert list(ours)[4] == (b"%08d" % 5, b"d" * 40, True)
        assert (b"%08d" % 4, b"merged", False) in list(ours)
    finally:
        ours.close()
        zeos.close()


@pytest.mark.integration
def test_a_send_hands_its_two_stores_to_zeos_thread_at_once(file_server: zchat_nb.Server) -> None:
    with zchat_nb.connect(file_server.address, user="a") as client:
        chat = client.session("general")
        for i in range(40):  # the stream's root has buckets below it now: an insert passes through it
            chat.add_message(f"makes the stream {i}")
        storage = client.db.storage
        one_by_one: list[str] = []
        batches: list[list[str]] = []
        single, batch = storage._zchat_raw_async, storage._zchat_hand_over

        def async_(method: str, *args: object) -> None:
            one_by_one.append(method)
            single(method, *args)

        def async_iter(messages: object) -> None:
            messages = list(messages)  # type: ignore[call-overload]
            batches.append([method for method, _ in messages])
            batch(iter(messages))

        storage._zchat_raw_async, storage._zchat_hand_over = async_, async_iter
        sent = chat.add_message("two objects: the stream's bucket and the tail")
        assert one_by_one == []
        # and no checkCurrentSerialInTransaction for the stream's root: only this writer changes it
        assert batches == [["tpc_begin", "storea", "storea"]]
        assert [m.id for m in client.session("general").new_messages()][-1] == sent.id


def test_a_sends_answers_wake_the_sender_without_zeos_sleep(
    file_server: zchat_nb.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZEO's futures sleep on the networking thread once an answer is in (switch_thread); the
    finish then waited for that sleep while the server held its commit lock for the sender. ZEO's
    async_iter (a transaction's stores) sleeps on the sending thread the same way."""
    import transaction
    import ZEO
    from ZEO.asyncio import client as zeo_client
    from ZEO.asyncio import futures

    from zchat_nb.netthread import HAND_OFF

    if not HAND_OFF:
        pytest.skip("ZEO's compiled futures are in use: zchat_nb's client keeps their sleep")
    slept: list[str] = []
    sleep = futures.switch_thread
    for module in (futures, zeo_client):
        monkeypatch.setattr(
            module, "switch_thread", lambda: (slept.append(threading.current_thread().name), sleep())
        )
    with zchat_nb.connect(file_server.address, user="a") as client:
        chat = client.session("general")
        sent = [chat.add_message(f"message {i}").id for i in range(3)]
        assert slept == []
        assert [m.id for m in client.session("general").new_messages()] == sent
    # ZEO's own client, the same way: its stores, vote and finish each end in the sleep
    db = ZEO.DB(file_server.address)
    try:
        tm = transaction.TransactionManager()
        tm.begin()
        db.open(transaction_manager=tm).root()["zeo's own"] = 1
        tm.commit()
    finally:
        db.close()
    assert len(slept) >= 3


class _Tracker:
    """A reader's change tracker, as ClientEvents sees one (zchat_nb.model.Changes)."""

    def __init__(self, watched: frozenset[bytes] = frozenset()) -> None:
        self.watched = watched
        self.marked: list[tuple[tuple[bytes, ...], bytes | None]] = []

    def mark(self, oids: Any, tid: bytes | None = None) -> None:
        self.marked.append((tuple(oids), tid))

    def mark_all(self) -> None:
        self.marked.append(((), None))


def test_a_commit_marks_the_trackers_and_wakes_the_readers_unless_a_fetch_comes_first() -> None:
    from zchat_nb.events import ClientEvents

    events = ClientEvents()
    plain, watching = _Tracker(), _Tracker(frozenset({b"tail"}))
    for tracker in (plain, watching, watching):  # tracked twice: told once
        events.track(tracker)
    early: list[str] = []
    late: list[str] = []
    events.subscribe(lambda e: early.append(e.kind))
    events.subscribe(lambda e: late.append(e.kind), fetched=True)

    generation = events.generation()
    event, wanted = events.committed("invalidation", b"t1", (b"other",), can_fetch=True)
    assert wanted == [] and events.generation() == generation + 1  # nothing watched: woken now
    assert early == late == ["invalidation"] and event is not None and event.oids == (b"other",)

    generation = events.generation()
    event, wanted = events.committed("invalidation", b"t2", (b"tail", b"other"), can_fetch=True)
    assert wanted == [b"tail"] and events.generation() == generation  # waits for the fetch
    assert early == ["invalidation"] * 2 and late == ["invalidation"]
    assert event is not None
    events.fetched(event)
    assert events.generation() == generation + 1 and late == ["invalidation"] * 2

    # A client that cannot fetch (not connected) wakes at once.
    _, wanted = events.committed("invalidation", b"t3", (b"tail",), can_fetch=False)
    assert wanted == [] and events.generation() == generation + 2
    assert (
        plain.marked
        == watching.marked
        == [
            ((b"other",), b"t1"),
            ((b"tail", b"other"), b"t2"),
            ((b"tail",), b"t3"),
        ]
    )


def test_trackers_are_held_weakly() -> None:
    import gc

    from zchat_nb.events import ClientEvents

    events = ClientEvents()
    kept, gone = _Tracker(), _Tracker(frozenset({b"tail"}))
    events.track(kept)
    events.track(gone)
    del gone
    gc.collect()
    # The tracker that is gone neither holds memory nor asks for a fetch.
    assert events.committed("invalidation", b"t1", (b"tail",), can_fetch=True) == (None, [])
    assert kept.marked == [((b"tail",), b"t1")]
    assert len(events._trackers) == 1
