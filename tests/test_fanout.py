"""Fan-out: a reader reads only what the server said changed, and still gets every message once.

Loads are counted at the client's storage (each ``loadBefore`` is one object fetched, from the
server unless ZEO's cache has it), as ``tests/test_scale.py`` does; tests count, they never time.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import transaction
import ZODB
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

import zchat_nb
from zchat_nb import ChatClient, Message
from zchat_nb.model import ROOMS_KEY, Room, Tail
from zchat_nb.widget import ChatWidget

from .helpers import Loads, ServerProcess
from .test_client import collect
from .test_widget import comms, hello, recorder  # noqa: F401 (comms: a fixture used by name)

pytestmark = pytest.mark.integration

MakeClient = Callable[..., ChatClient]


def test_many_racing_writers_reach_every_reading_reader_exactly_once(
    file_server: zchat_nb.Server, make_client: MakeClient
) -> None:
    writers, each, readers = 8, 25, 4
    sessions = [make_client(file_server.address, f"reader{k}").session("race") for k in range(readers)]
    for s in sessions:
        assert s.new_messages() == []
    got: list[list[Message]] = [[] for _ in sessions]
    sent: list[str] = []
    stop = threading.Event()

    def read(k: int) -> None:  # reading all through the race, woken by each invalidation
        while not stop.is_set():
            got[k].extend(sessions[k].new_messages(timeout=0.5))

    def write(w: int) -> None:
        chat = make_client(file_server.address, f"writer{w}").session("race")
        for i in range(each):
            sent.append(chat.add_message(f"{w}.{i}").id)

    reading = [threading.Thread(target=read, args=(k,)) for k in range(readers)]
    writing = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in [*reading, *writing]:
        t.start()
    for t in writing:
        t.join(120)
    deadline = time.monotonic() + 60
    while any(len(g) < writers * each for g in got) and time.monotonic() < deadline:
        time.sleep(0.05)  # the readers' own threads are still reading; nothing else to wait on
    stop.set()
    for t in reading:
        t.join(10)
    assert len(sent) == writers * each
    for g in got:
        counts = Counter(m.id for m in g)
        assert set(counts) == set(sent), f"missing {len(set(sent) - set(counts))}"
        assert max(counts.values()) == 1, "a message was delivered twice"


def test_a_reader_loads_about_one_object_per_delivered_message(
    server: zchat_nb.Server, make_client: MakeClient
) -> None:
    reader_client = make_client(server.address, "reader")
    reader = reader_client.session("general", backlog=0)
    assert reader.new_messages() == []  # its cursor starts here
    writer = make_client(server.address, "writer").session("general")
    writer.add_message("first: makes the writer's stream")
    assert len(collect(reader, 1)) == 1
    loads = Loads(reader_client)
    total = 0
    for i in range(90):  # three bucket splits of the writer's stream
        writer.add_message(f"m{i}")
        n, found = loads.during(lambda: collect(reader, 1))
        assert [m.text for m in found] == [f"m{i}"]
        total += n
    # one load (the stream's last bucket, or its root while it is small) per message, a few
    # more on a split; the shared heads/count of the old design made it three
    assert total <= 90 * 1.15, total
    idle, found = loads.during(reader.new_messages)
    assert (idle, found) == (0, [])


def test_a_reader_takes_each_new_message_from_the_writers_tail_fetched_before_it_wakes(
    server: zchat_nb.Server, make_client: MakeClient
) -> None:
    reader_client = make_client(server.address, "reader")
    reader = reader_client.session("general", backlog=0)
    assert reader.new_messages() == []
    writer_client = make_client(server.address, "writer")
    writer = writer_client.session("general")
    writer.add_message("first: makes the writer's stream and tail")
    assert len(collect(reader, 1)) == 1
    storage = reader_client.db.storage
    tm, conn = reader_client.connection()
    tm.begin()
    tail_oid = conn.root()[ROOMS_KEY]["general"].tails[writer_client.writer]._p_oid
    tm.abort()

    # A subscriber with fetched=True hears the invalidation once the tail is in the cache.
    fetched, cached = threading.Event(), []

    def on_event(event: zchat_nb.ClientEvent) -> None:
        if event.kind == "invalidation" and tail_oid in event.oids:
            start = (int.from_bytes(event.tid, "big") + 1).to_bytes(8, "big")
            cached.append(storage._cache.loadBefore(tail_oid, start) is not None)
            fetched.set()

    reader_client.subscribe(on_event, fetched=True)
    own_fetches = []
    fetch = storage._server.load_before_co
    storage._server.load_before_co = lambda *args: (own_fetches.append(args[0]), fetch(*args))[1]
    loaded: list[bytes] = []
    real = storage.loadBefore
    storage.loadBefore = lambda oid, tid: (loaded.append(oid), real(oid, tid))[1]
    # The fetched state is kept in memory for the reader: it does not read ZEO's cache file for it.
    storage._ZCHAT_FETCHED_KEPT = 4  # the newest 4 states only
    file_reads: list[bytes] = []
    me, from_file = threading.current_thread(), storage._cache.loadBefore
    storage._cache.loadBefore = lambda oid, tid: (
        file_reads.append(oid) if threading.current_thread() is me else None,
        from_file(oid, tid),
    )[1]
    for i in range(40):  # a bucket split on the way: the tail is all a reader loads still
        fetched.clear()
        writer.add_message(f"m{i}")
        assert fetched.wait(10), "no invalidation of the tail"
        assert [m.text for m in reader.new_messages()] == [f"m{i}"]
    assert cached == [True] * 40
    assert set(loaded) == {tail_oid} and len(loaded) == 40
    assert own_fetches == [], "the reader fetched what its client had fetched for it"
    assert tail_oid not in file_reads and 0 < len(storage._zchat_fetched) <= 4

    # A reader that missed messages reads them from the stream, each once, in order.
    for i in range(3):
        writer.add_message(f"missed {i}")
    assert [m.text for m in collect(reader, 3)] == ["missed 0", "missed 1", "missed 2"]
    assert isinstance(conn.get(tail_oid), Tail)


def test_a_commit_elsewhere_costs_a_reader_no_load(server: zchat_nb.Server, make_client: MakeClient) -> None:
    reader_client = make_client(server.address, "reader")
    reader = reader_client.session("general")
    other = make_client(server.address, "other")
    other.session("general").add_message("hello")
    assert len(collect(reader, 1)) == 1
    assert reader.present(within=60) == []
    loads = Loads(reader_client)
    generation = reader_client.generation()
    other.session("random").add_message("in another room")
    assert reader_client.wait_for_change(generation, 10), "no invalidation arrived"
    assert loads.during(reader.new_messages) == (0, [])
    assert loads.during(lambda: reader.present(within=60)) == (0, [])
    # and the message there is still found by that room's reader
    assert [m.text for m in reader_client.session("random").new_messages()] == ["in another room"]


def test_presence_is_read_again_only_when_someone_comes_or_goes(
    server: zchat_nb.Server, make_client: MakeClient
) -> None:
    ada_client = make_client(server.address, "ada")
    ada = ada_client.session("lab")
    bob = make_client(server.address, "bob").session("lab")
    ada.join()
    assert ada.present() == ["ada"]
    loads = Loads(ada_client)
    assert loads.during(ada.present) == (0, ["ada"])
    generation = ada_client.generation()
    bob.join()
    assert ada_client.wait_for_change(generation, 10)
    n, present = loads.during(ada.present)
    assert present == ["ada", "bob"] and 0 < n <= 2
    generation = ada_client.generation()
    bob.leave()
    assert ada_client.wait_for_change(generation, 10)
    assert ada.present() == ["ada"]


def test_a_reconnect_reads_everything_again_and_delivers_nothing_twice(
    server_process: ServerProcess, make_client: MakeClient
) -> None:
    reader = make_client(server_process.address, "reader", timeout=30).session("general")
    writer_client = make_client(server_process.address, "writer", timeout=30)
    writer = writer_client.session("general")
    for i in range(40):
        writer.add_message(f"before {i}")
    assert len(collect(reader, 40)) == 40
    server_process.kill()
    server_process.start()
    assert writer_client.wait_connected(30)
    sent = writer.add_message("after")
    got = collect(reader, 1)
    assert got == [sent]
    assert reader.new_messages() == []


def write_old_room(path: Path, now: float) -> list[Message]:
    """A FileStorage with a room in the shape zchat_nb wrote before the fan-out rework.

    The same ``Room`` instance dict the old ``Room.append``/``Room.beat`` produced: ``streams``
    plus the shared ``heads`` (writer -> (count, first, last, last id)), ``count`` (a Length) and
    ``presence`` (user -> heartbeat time), written directly.
    """
    db = ZODB.DB(FileStorage(str(path)))
    sent = []
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        rooms = conn.root()[ROOMS_KEY] = OOBTree()
        room = rooms["old"] = Room("old", created=now - 100)
        room.heads, room.count, room.presence = OOBTree(), Length(), OOBTree()
        for i in range(45):
            writer = f"w{i % 3}"
            message = Message(f"{i:032x}", f"user{i % 3}", f"old {i}", now - 90 + i)
            room.streams.setdefault(writer, OOBTree())[message.key] = message.to_record()
            count, first, _, _ = room.heads.get(writer, (0, message.time, 0.0, ""))
            room.heads[writer] = (count + 1, first, message.time, message.id)
            room.count.change(1)
            sent.append(message)
        room.presence["user0"] = now - 10
        tm.commit()
        assert set(conn.root()[ROOMS_KEY]["old"].__dict__) >= {"streams", "heads", "count", "presence"}
    finally:
        db.close()
    return sent


def test_a_room_written_before_the_rework_is_read_and_written(
    tmp_path: Path, make_client: MakeClient
) -> None:
    now = time.time()
    old = write_old_room(tmp_path / "old.fs", now)
    with zchat_nb.serve(tmp_path / "old.fs") as server:
        client = make_client(server.address, "newcomer")
        chat = client.session("old")
        assert chat.new_messages() == old
        assert chat.history(10) == old[-10:]
        assert chat.present(within=60) == ["user0"]
        assert client.session("old", backlog=3).new_messages() == old[-3:]
        sent = chat.add_message("new")
        assert chat.new_messages() == [sent]
        other = make_client(server.address, "other").session("old")
        assert other.new_messages() == [*old, sent]


DATA = Path(__file__).parent / "data"


def test_a_room_written_by_the_heads_and_count_model_is_read_amended_and_written(
    tmp_path: Path, make_client: MakeClient
) -> None:
    # tests/data/room_v2.fs was written by the model of today's main before this rework
    # (tests/data/make_room_v2.py): heads, count, presence heartbeats, amendments.
    shutil.copy(DATA / "room_v2.fs", tmp_path / "Data.fs")
    with zchat_nb.serve(tmp_path / "Data.fs") as server:
        client = make_client(server.address, "carol")
        chat = client.session("general")
        old = chat.new_messages()
        assert [(m.author, m.text, m.deleted) for m in old] == [
            ("alice", "hello from the heads/count model", False),
            ("bob", "hi @alice", False),
            ("alice", "third", False),
            ("bob", "", True),
        ]
        assert old[1].reply_to == old[0].id and old[2].edited is not None
        assert dict(old[0].reactions) == {"👍": ("bob",)}
        assert chat.history(2) == old[-2:]
        assert client.session("general", backlog=1).new_messages() == old[-1:]
        assert client.rooms() == ["general", "other"]
        chat.react(old[2], "🎉")
        sent = chat.add_message("new", reply_to=old[2])
        assert chat.new_messages() == [sent]
        [changed] = chat.updated_messages()
        assert changed.id == old[2].id and dict(changed.reactions) == {"🎉": ("carol",)}
        other = make_client(server.address, "dave").session("general")
        fresh = other.new_messages()
        assert [m.id for m in fresh] == [*(m.id for m in old), sent.id]
        assert dict(fresh[2].reactions) == {"🎉": ("carol",)}


def test_a_room_written_with_one_record_tails_is_read_amended_and_written(
    tmp_path: Path, make_client: MakeClient
) -> None:
    # tests/data/room_v3.fs was written by the model of ee1f507 (tests/data/make_room_v3.py), whose
    # tails held one record that was in the stream too: 40 messages of alice, bob's reply, edit,
    # reaction and delete.
    shutil.copy(DATA / "room_v3.fs", tmp_path / "Data.fs")
    with zchat_nb.serve(tmp_path / "Data.fs") as server:
        client = make_client(server.address, "carol")
        chat = client.session("general")
        old = collect(chat, 43)
        assert [m.text for m in old] == [
            "hello from the one-record tails",
            *(f"alice {i}" for i in range(39)),
            "hi @alice",
            "third",
            "",
        ]
        assert old[40].reply_to == old[0].id and old[41].edited is not None and old[42].deleted
        assert dict(old[0].reactions) == {"👍": ("bob",)}
        assert chat.new_messages() == []
        assert chat.history(3) == old[-3:]
        assert client.session("general", backlog=2).new_messages() == old[-2:]
        chat.react(old[41], "🎉")
        sent = [chat.add_message(f"carol {i}") for i in range(10)]  # a batch into the stream, two held
        assert collect(chat, 10) == sent
        [changed] = chat.updated_messages()
        assert changed.id == old[41].id and dict(changed.reactions) == {"🎉": ("carol",)}
        other = make_client(server.address, "dave").session("general")
        fresh = collect(other, 53)
        assert [m.id for m in fresh] == [m.id for m in old + sent]
        assert dict(fresh[41].reactions) == {"🎉": ("carol",)}
        assert other.history(11) == fresh[-11:]


@pytest.mark.usefixtures("comms")
def test_a_widget_woken_by_a_commit_elsewhere_loads_nothing(
    server: zchat_nb.Server, make_client: MakeClient
) -> None:
    alice, bob = make_client(server.address, "alice"), make_client(server.address, "bob")
    tm, conn = bob.connection()
    tm.begin()
    conn.root()["elsewhere"] = box = PersistentMapping()
    tm.commit()
    widget = ChatWidget(client=alice, room="general")
    try:
        rec = recorder(widget)
        hello(widget)
        rec.wait_state("present", lambda present: present == ["alice"])  # joined, presence read
        loads = Loads(alice)
        polled = threading.Event()
        alice.subscribe(lambda e: polled.set() if e.kind == "poll" else None, activity=True)
        box["n"] = 1
        tm.commit()
        assert polled.wait(10), "the widget's poller did not wake"
        hello(widget, "view-2")  # answered at the end of a round of the poller: this one is over
        assert loads.count == 0
        start = rec.mark()
        sent = bob.session("general").add_message("hi")
        update = rec.wait_for(lambda m: m["type"] == "append", start)
        assert [m["id"] for m in update["messages"]] == [sent.id]
        assert loads.count <= 4  # bob's new writer: the streams and tails indexes, his stream and tail
    finally:
        widget.close()
