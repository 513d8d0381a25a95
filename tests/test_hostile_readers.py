"""Records another client wrote through the raw storage API: every reader returns, skips, goes on.

The attacker here is a certificate holder (or any local user of a TLS-less server): it can store
any bytes as any object. Readers (sessions, ``rooms()``, ``present()``, ``history()``) must return
in time bounded by what they return, report what they skip, and keep the other rooms and writers.
"""

from __future__ import annotations

import errno
import math
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import transaction
import ZEO
import ZODB
from BTrees.OOBTree import OOBTree, OOBucket

import zchat_nb
from zchat_nb import model
from zchat_nb.guard import ServerLimits
from zchat_nb.model import ROOMS_KEY, Message, Room, Tail

from .attacks import dag_pickle, honest_pair_works, overwrite
from .conftest import ServerProcess
from .helpers import Loads
from .test_client import collect

pytestmark = pytest.mark.integration


@pytest.fixture
def lenient_server() -> Iterator[zchat_nb.Server]:
    """A server that lets big records through: the readers must hold on their own."""
    limits = ServerLimits(max_frame_bytes=64 * 1024 * 1024, max_transaction_bytes=64 * 1024 * 1024)
    with zchat_nb.serve(limits=limits) as server:
        yield server


def as_attacker(address: object, change: Callable[[ZODB.Connection.Connection], None]) -> None:
    """Open the database with plain ZODB (no zchat_nb checks) and commit ``change``."""
    db = ZODB.DB(ZEO.client(address, wait_timeout=10))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        with tm:
            change(conn)
        conn.close()
    finally:
        db.close()


def stream_oid(client: zchat_nb.ChatClient, room: str = "general") -> tuple[bytes, tuple[float, str]]:
    tm, conn = client.connection()
    tm.begin()
    stream = conn.root()[ROOMS_KEY][room].streams[client.writer]
    oid, key = stream._p_oid, stream.maxKey()
    tm.abort()
    return oid, key


def bucket_record(items: bytes) -> bytes:
    """An OOBTree record whose state is one inline bucket: ``(((items),),)``, items pickled by the caller."""
    return pickle.dumps(OOBTree, 3) + b"\x80\x03(" + items + b"t\x85\x85\x85."


def plant_crafted_record(target: Any, how: str) -> None:
    """Alice sends "honest"; mallory sends one message, then overwrites his stream's record (through the
    raw storage at ``target``, a ZEO address or a PostgreSQL URI) with one whose only value is ``how``:
    "dag value" (2**64 tuples through the memo), "forbidden global", "deep id" (200k nested tuples) or
    "huge record" (20 MiB)."""
    with (
        zchat_nb.connect(target, user="mallory") as mallory,
        zchat_nb.connect(target, user="alice") as alice,
    ):
        mallory.session().add_message("to be overwritten")
        alice.session().add_message("honest")
        oid, key = stream_oid(mallory)
    values = {
        "dag value": lambda: dag_pickle(64, "plain")[2:],
        "forbidden global": lambda: pickle.dumps(threading.Event, 3)[2:-1],
        "deep id": lambda: b")" + b"\x85" * 200_000,  # ((((...(),),),)...) 200k deep
        "huge record": lambda: pickle.dumps("x" * (20 * 1024 * 1024), 3)[2:-1],
    }
    overwrite(target, oid, bucket_record(pickle.dumps(key, 3)[2:-1] + values[how]()))


def mixed_tree(tree: OOBTree, extra: list[tuple[object, object]], *, first: bool = False) -> OOBTree:
    """A copy of ``tree`` with keys BTrees would refuse (they do not compare with str), set by state.

    ``first``: put them before the others, where every search of the bucket meets them.
    """
    flat: list[object] = []
    for key, value in [*extra, *tree.items()] if first else [*tree.items(), *extra]:
        flat += [key, value]
    crafted = OOBTree()
    crafted.__setstate__((((tuple(flat),),),))
    return crafted


def reader_gets(address: object, expected: list[str], room: str = "general") -> model.ChatSession:
    """A fresh reader: gets exactly the texts ``expected`` (in some calls), and returns every time."""
    with zchat_nb.connect(address, user="reader") as client:
        chat = client.session(room)
        got: list[str] = []
        for _ in range(50):
            batch = chat.new_messages()
            if not batch:
                break
            got += [m.text for m in batch]
        assert sorted(got) == sorted(expected)
        assert chat.new_messages() == []  # and nothing is delivered again
        chat.history(10)
        chat.present()
        client.rooms()
        return chat


def test_bucket_record_builds_what_btrees_store() -> None:
    data = bucket_record(pickle.dumps("k", 3)[2:-1] + pickle.dumps("v", 3)[2:-1])
    stream = pickle.loads(data[len(pickle.dumps(OOBTree, 3)) :])
    assert stream == OOBTree({"k": "v"}).__getstate__()


@pytest.mark.parametrize(
    "how, why", [("dag value", "traverses"), ("deep id", "nests deeper"), ("huge record", "byte limit")]
)
def test_a_crafted_stream_record_is_skipped(lenient_server: zchat_nb.Server, how: str, why: str) -> None:
    address = lenient_server.address
    plant_crafted_record(address, how)
    chat = reader_gets(address, ["honest"])
    assert chat.skipped and why in chat.skipped[0][1], chat.skipped
    assert all(len(reason) <= 300 for _, reason in chat.skipped)
    honest_pair_works(address)


def test_bad_streams_epoch_presence_and_room_keys_are_skipped(lenient_server: zchat_nb.Server) -> None:
    address = lenient_server.address
    with zchat_nb.connect(address, user="alice") as alice:
        alice.session("general").add_message("hello")
        alice.session("other").add_message("in another room")
        alice.session("general").join()

    def vandalise(conn: ZODB.Connection.Connection) -> None:
        rooms = conn.root()[ROOMS_KEY]
        room = rooms["general"]
        room.streams["w-not-a-tree"] = ("not", "a stream")
        room.streams["w-bad-keys"] = OOBTree({"not a key": "not a record"})
        room.streams = mixed_tree(room.streams, [(("not", "a str"), OOBTree())], first=True)
        room.heads = mixed_tree(OOBTree({"w-inf": (1, -math.inf, 5.0, "x")}), [((1,), "x")])  # old shape
        room.epoch = math.nan
        room.presence = mixed_tree(OOBTree({"eve": "not a time", "inf": math.inf}), [(("tuple",), 3.0)])
        room.members = mixed_tree(room.members, [("not a pair", 3.0), (("mallory", "w"), math.nan)])
        conn.root()[ROOMS_KEY] = mixed_tree(rooms, [(("a", "tuple"), Room("bad"))], first=True)

    as_attacker(address, vandalise)
    with zchat_nb.connect(address, user="reader") as client:
        assert sorted(client.rooms()) == ["general", "other"]
        chat = client.session("general")
        assert [m.text for m in chat.new_messages()] == ["hello"]
        for _ in range(3):  # NaN != NaN: no re-delivery on every poll
            assert chat.new_messages() == []
        assert [m.text for m in chat.history(10)] == ["hello"]
        assert chat.present() == ["alice"]
        assert [m.text for m in client.session("other").new_messages()] == ["in another room"]
        places = " ".join(where for where, _ in chat.skipped)
        assert "w-not-a-tree" in places and "w-bad-keys" in places and "epoch" in places
        assert "'not', 'a str'" in places  # the key that is not a writer
    # a fresh client's first send to the room repairs the index it cannot search
    honest_pair_works(address)
    honest_pair_works(address, room="other")


def test_crafted_tails_make_readers_read_the_stream_and_the_writer_repairs_them(
    lenient_server: zchat_nb.Server,
) -> None:
    address = lenient_server.address
    with (
        zchat_nb.connect(address, user="alice") as alice,
        zchat_nb.connect(address, user="bob") as bob,
    ):
        chat, reader = alice.session("general"), bob.session("general")
        chat.add_message("one")
        assert [m.text for m in reader.new_messages(timeout=10)] == ["one"]

        def vandalise(conn: ZODB.Connection.Connection) -> None:
            room = conn.root()[ROOMS_KEY]["general"]
            # Alice's tail says its previous key is no key; a second "tail" is no Tail; a key is no str.
            room.tails[alice.writer].__setstate__(("not a key", (1e300, "x" * 32), ("forged",)))
            room.tails[alice.writer]._p_changed = True
            room.tails["w-not-a-tail"] = OOBTree()
            room.tails = mixed_tree(room.tails, [(("not", "a str"), Tail())], first=True)

        generation = bob.generation()
        as_attacker(address, vandalise)
        assert bob.wait_for_change(generation, 10)
        assert reader.new_messages() == []  # the tail is not believed: the stream has nothing new
        for text in ("two", "three"):
            chat.add_message(text)  # the first repairs the index it cannot search
            assert [m.text for m in reader.new_messages(timeout=10)] == [text]
        assert reader.new_messages() == []
        assert [m.text for m in reader.history(10)] == ["one", "two", "three"]
    honest_pair_works(address)


KEY = (1.0, "k" * 32)


def _two_read_one_held(alice: zchat_nb.ChatClient, bob: zchat_nb.ChatClient) -> tuple[Any, Any]:
    """alice sends "one" and "two" (the second held in her tail), bob's session reads both."""
    chat, reader = alice.session("general"), bob.session("general")
    chat.add_message("one")
    chat.add_message("two")
    assert [m.text for m in collect(reader, 2)] == ["one", "two"]
    return chat, reader


@pytest.mark.parametrize(
    "held",
    [
        pytest.param(((KEY, ("forged",)), (KEY, ("forged",))), id="keys not increasing"),
        pytest.param((((math.inf, "k"), ("forged",)),), id="an infinite time"),
        pytest.param(((KEY, ("forged",), "extra"),), id="an entry not a pair"),
        pytest.param(tuple(((1.0 + i, "k"), ("forged",)) for i in range(1000)), id="1000 entries"),
        pytest.param((), id="empty"),
        pytest.param(("not a tuple of pairs",), id="not pairs"),
    ],
)
def test_a_tail_holding_what_no_writer_stores_is_not_believed(
    lenient_server: zchat_nb.Server, held: tuple[Any, ...]
) -> None:
    address = lenient_server.address
    with (
        zchat_nb.connect(address, user="alice") as alice,
        zchat_nb.connect(address, user="bob") as bob,
    ):
        chat, reader = _two_read_one_held(alice, bob)

        def vandalise(conn: ZODB.Connection.Connection) -> None:
            tail = conn.root()[ROOMS_KEY]["general"].tails[alice.writer]
            tail.__setstate__((None, held, None))
            tail._p_changed = True

        generation = bob.generation()
        as_attacker(address, vandalise)
        assert bob.wait_for_change(generation, 10)
        assert reader.new_messages() == []  # the tail is not believed: the stream has nothing new
        assert [m.text for m in reader.history(10)] == ["one"]  # "two" was only in the tail
        chat.add_message("three")  # alice starts her tail afresh
        assert [m.text for m in reader.new_messages(timeout=10)] == ["three"]
        assert [m.text for m in reader.history(10)] == ["one", "three"]
    honest_pair_works(address)


def test_a_tail_that_does_not_load_is_replaced_by_its_writer(lenient_server: zchat_nb.Server) -> None:
    address = lenient_server.address
    with (
        zchat_nb.connect(address, user="alice") as alice,
        zchat_nb.connect(address, user="bob") as bob,
    ):
        chat, reader = _two_read_one_held(alice, bob)
        tm, conn = alice.connection()
        tm.begin()
        oid = conn.root()[ROOMS_KEY]["general"].tails[alice.writer]._p_oid
        tm.abort()
        generation = alice.generation()
        overwrite(address, oid, pickle.dumps(threading.Event, 3))  # a record clients refuse to load
        assert alice.wait_for_change(generation, 10)
        chat.add_message("three")  # alice's send makes her a new tail; "two" is gone with the old one
        assert [m.text for m in reader.new_messages(timeout=10)] == ["three"]
        assert [m.text for m in reader.history(10)] == ["one", "three"]
    honest_pair_works(address)


@pytest.mark.parametrize("edge", ["a str", "a tree", "an empty bucket", "bob's last bucket"])
def test_a_tail_naming_no_last_bucket_of_its_stream_leaves_history_whole(
    lenient_server: zchat_nb.Server, edge: str
) -> None:
    address = lenient_server.address
    with (
        zchat_nb.connect(address, user="alice") as alice,
        zchat_nb.connect(address, user="bob") as bob,
    ):
        chat, other = alice.session("general"), bob.session("general")
        sent = [chat.add_message(f"alice {i}") for i in range(70)]  # her stream: several buckets
        sent += [other.add_message(f"bob {i}") for i in range(70)]

        def vandalise(conn: ZODB.Connection.Connection) -> None:
            tails = conn.root()[ROOMS_KEY]["general"].tails
            tail = tails[alice.writer]
            crafted = {
                "a str": "not a bucket",
                "a tree": OOBTree(),
                "an empty bucket": OOBucket(),
                "bob's last bucket": tails[bob.writer].bucket,
            }[edge]
            assert tail.bucket is not None and crafted is not tail.bucket
            tail.__setstate__((tail.base, tail.held, crafted))
            tail._p_changed = True

        as_attacker(address, vandalise)
    with zchat_nb.connect(address, user="reader") as reader:
        assert reader.session("general").history(200) == sent
    honest_pair_works(address)


def test_a_room_that_is_not_a_room_breaks_only_itself(lenient_server: zchat_nb.Server) -> None:
    address = lenient_server.address
    with zchat_nb.connect(address, user="alice") as alice:
        alice.session("general").add_message("fine")
        alice.session("broken").add_message("gone")

    def vandalise(conn: ZODB.Connection.Connection) -> None:
        conn.root()[ROOMS_KEY]["broken"] = OOBTree()

    as_attacker(address, vandalise)
    with zchat_nb.connect(address, user="reader") as client:
        broken = client.session("broken")
        assert broken.new_messages() == []
        assert broken.history() == []
        assert broken.skipped and "broken" in broken.skipped[0][0]
        assert [m.text for m in client.session("general").new_messages()] == ["fine"]


def test_a_huge_stream_is_delivered_in_bounded_calls_without_skip_or_repeat(
    lenient_server: zchat_nb.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = lenient_server.address
    monkeypatch.setattr(model, "MAX_PER_CALL", 100)
    total = 1050

    def flood(conn: ZODB.Connection.Connection) -> None:
        rooms = model.rooms_of(conn)
        room = rooms["general"] = Room("general", 1.0)
        assert room.streams is not None
        stream = room.streams["flooder"] = OOBTree()
        for i in range(total):
            message = Message(f"id{i:06d}", "flooder", f"m{i}", 1000.0 + i * 1e-3)
            stream[message.key] = message.to_record()

    as_attacker(address, flood)
    with zchat_nb.connect(address, user="reader") as client:
        chat = client.session("general")
        seen: list[str] = []
        while batch := chat.new_messages():
            assert len(batch) <= 100
            seen += [m.id for m in batch]
        assert len(seen) == total and len(set(seen)) == total
        assert len(chat.history(5000)) == total
        assert not chat.skipped
        waiting = client.session("general")  # with a timeout: each call still returns at most 100
        assert len(waiting.new_messages(timeout=10)) == 100
    honest_pair_works(address)


def test_many_writers_are_read_a_slice_per_call_and_none_is_starved(
    lenient_server: zchat_nb.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = lenient_server.address
    monkeypatch.setattr(model, "MAX_WRITERS_PER_CALL", 500)
    writers = 2000
    with zchat_nb.connect(address, user="alice") as alice:
        alice.session().add_message("honest")

    def flood(conn: ZODB.Connection.Connection) -> None:
        room = conn.root()[ROOMS_KEY]["general"]
        for i in range(writers):  # streams with nothing in them, and some that are not streams
            room.streams[f"ghost{i:05d}"] = OOBTree() if i % 2 else ("x",)

    as_attacker(address, flood)
    with (
        zchat_nb.connect(address, user="reader") as client,
        zchat_nb.connect(address, user="bob") as bob,
    ):
        chat = client.session("general")
        loads = Loads(client)
        got: list[str] = []
        for call in range(2 * writers // 500 + 2):
            before = loads.count
            got += [m.text for m in chat.new_messages()]
            assert loads.count - before <= 500 + 50, "a call looked at more than its slice"
            if call == 1:  # a new writer during the first pass: found by this pass or the next
                bob.session().add_message("late")
        assert sorted(got) == ["honest", "late"]
        assert not chat.behind
        assert len(chat.skipped) <= model.MAX_SKIPPED
    honest_pair_works(address)


def test_a_lost_answer_says_the_message_may_have_been_sent_and_a_retry_stores_it_once(
    server_process: ServerProcess,
) -> None:
    address = server_process.address
    assert server_process.proc is not None
    with zchat_nb.connect(address, user="alice", timeout=3) as alice:
        chat = alice.session()
        chat.add_message("before")
        message = Message(uuid.uuid4().hex, "alice", "the answer to this one is lost", time.time())
        with server_process.stalled(), pytest.raises(zchat_nb.ZChatSendError, match="may have been sent"):
            chat.post(message)
        chat.add_message("after")
        stored = chat.post(message)  # the retry
        assert stored.id == message.id
        chat.post(message)  # and once more, with "after" in between
        texts = [m.text for m in chat.history(10)]
        assert texts.count("the answer to this one is lost") == 1
    honest_pair_works(address)


def test_a_storage_error_on_the_server_is_a_send_error_saying_so(file_server: zchat_nb.Server) -> None:
    storage = file_server._server.storages["1"]
    with zchat_nb.connect(file_server.address, user="alice") as alice:
        chat = alice.session()
        chat.add_message("fits")
        vote = storage.tpc_vote

        def disk_full(txn: object) -> object:
            raise OSError(errno.ENOSPC, "No space left on device")

        storage.tpc_vote = disk_full
        try:
            with pytest.raises(zchat_nb.ZChatSendError, match=r"could not store.*No space left.*disk space"):
                chat.add_message("does not fit")
        finally:
            storage.tpc_vote = vote
        chat.add_message("fits again")
        assert [m.text for m in chat.history(10)] == ["fits", "fits again"]
