"""Unit tests of the chat model on an in-memory ZODB (no ZEO)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import transaction
import ZODB
from BTrees.OOBTree import OOBTree

import zchat_nb
from zchat_nb import model
from zchat_nb.exceptions import InvalidMessageError
from zchat_nb.model import HELD_CHARS, HELD_MAX, ROOMS_KEY, Message, Room, Tail, _last_bucket

from .helpers import MakeClient


@pytest.fixture
def db() -> Iterator[ZODB.DB]:
    database = ZODB.DB(None)
    yield database
    database.close()


def texts(messages: list[Message]) -> list[str]:
    return [m.text for m in messages]


def begin_room(
    client: zchat_nb.ChatClient, room: str = "general"
) -> tuple[transaction.TransactionManager, Room]:
    """A new transaction on ``client``'s connection (this thread's), and ``room`` as it sees it."""
    tm, conn = client.connection()
    tm.begin()
    return tm, conn.root()[ROOMS_KEY][room]


def test_own_message_is_delivered_once_through_new_messages(db: ZODB.DB, make_client: MakeClient) -> None:
    chat = make_client(db, "alice").session("general")
    sent = chat.add_message("hello")
    assert chat.new_messages() == [sent]
    assert chat.new_messages() == []


def test_message_fields_and_immutability(db: ZODB.DB, make_client: MakeClient) -> None:
    chat = make_client(db, "alice").session("general")
    msg = chat.add_message("hi *there*")
    assert (msg.author, msg.text) == ("alice", "hi *there*")
    assert isinstance(msg.time, float) and len(msg.id) == 32
    with pytest.raises(AttributeError):
        msg.text = "changed"  # type: ignore[misc]


def test_two_clients_see_each_others_messages_oldest_first(db: ZODB.DB, make_client: MakeClient) -> None:
    ticks = itertools.count(1000.0)
    alice = make_client(db, "alice", clock=lambda: next(ticks)).session("general")
    bob = make_client(db, "bob", clock=lambda: next(ticks)).session("general")
    alice.add_message("one")
    bob.add_message("two")
    alice.add_message("three")
    assert texts(bob.new_messages()) == ["one", "two", "three"]
    assert texts(alice.new_messages()) == ["one", "two", "three"]


def test_late_stamped_message_is_delivered_exactly_once(db: ZODB.DB, make_client: MakeClient) -> None:
    reader = make_client(db, "reader").session("general")
    make_client(db, "fast").session("general").add_message("on time")
    assert texts(reader.new_messages()) == ["on time"]
    slow = make_client(db, "slow", clock=lambda: 1.0)  # a clock far behind everyone else's
    slow.session("general").add_message("late")
    assert texts(reader.new_messages()) == ["late"]
    assert reader.new_messages() == []


def test_ghostified_room_does_not_redeliver(db: ZODB.DB, make_client: MakeClient) -> None:
    client = make_client(db, "alice")
    chat = client.session("general")
    for i in range(40):
        chat.add_message(f"m{i}")
    assert len(chat.new_messages()) == 40
    _, conn = client.connection()
    conn.cacheMinimize()
    assert chat.new_messages() == []
    chat.add_message("after")
    assert texts(chat.new_messages()) == ["after"]


def test_history_returns_last_n_oldest_first(db: ZODB.DB, make_client: MakeClient) -> None:
    ticks = itertools.count(0.0, 0.5)
    chat = make_client(db, "alice", clock=lambda: next(ticks)).session("general")
    for i in range(100):
        chat.add_message(f"m{i}")
    assert texts(chat.history(3)) == ["m97", "m98", "m99"]
    assert len(chat.history(1000)) == 100
    older = chat.history(2, before=chat.history(3)[0])
    assert texts(older) == ["m95", "m96"]
    assert chat.history(0) == []


def test_history_spans_sparse_and_dense_times(db: ZODB.DB, make_client: MakeClient) -> None:
    times = iter([0.0, 1.0, 2.0, 1e6, 1e6 + 0.001, 1e6 + 0.002])
    chat = make_client(db, "alice", clock=lambda: next(times)).session("general")
    for i in range(5):
        chat.add_message(f"m{i}")
    assert texts(chat.history(4)) == ["m1", "m2", "m3", "m4"]


@pytest.mark.parametrize("n", [-1, 1.5, "3"])
def test_history_rejects_bad_counts(db: ZODB.DB, n: object, make_client: MakeClient) -> None:
    chat = make_client(db, "alice").session("general")
    with pytest.raises(ValueError, match="history"):
        chat.history(n)  # type: ignore[arg-type]


def test_backlog_starts_at_the_end(db: ZODB.DB, make_client: MakeClient) -> None:
    client = make_client(db, "alice")
    writer = client.session("general")
    for i in range(10):
        writer.add_message(f"m{i}")
    reader = client.session("general", backlog=3)
    assert texts(reader.new_messages()) == ["m7", "m8", "m9"]
    writer.add_message("m10")
    assert texts(reader.new_messages()) == ["m10"]


def test_post_is_idempotent(db: ZODB.DB, make_client: MakeClient) -> None:
    client = make_client(db, "alice")
    chat = client.session("general")
    msg = Message("a" * 32, "alice", "once", 5.0)
    chat.post(msg)
    chat.post(msg)
    assert chat.new_messages() == [msg]
    _, room = begin_room(client)
    assert room.message_count() == 1


def test_a_retried_post_is_stored_once_even_after_later_sends(db: ZODB.DB, make_client: MakeClient) -> None:
    """A send whose answer was lost, retried after the writer sent more, is not stored twice."""
    chat = make_client(db, "alice").session("general")
    first = chat.draft("typed first", id="a" * 32)
    chat.post(first)  # committed, but say the answer never reached the sender
    chat.add_message("typed second")
    assert chat.post(first) == first  # the Retry
    assert texts(chat.new_messages()) == ["typed first", "typed second"]
    assert texts(chat.history(10)) == ["typed first", "typed second"]


def test_a_retry_finds_a_message_whose_time_was_moved(db: ZODB.DB, make_client: MakeClient) -> None:
    """The clock went back, so the stored time is later than the draft's: the retry still finds it."""
    now = [50.0]
    chat = make_client(db, "alice", clock=lambda: now[0]).session("general")
    chat.add_message("at 50")
    now[0] = 10.0
    moved = chat.draft("clock went back")  # stamped 10.0, stored just after 50.0
    stored = chat.post(moved)
    assert stored.time > 50.0 and stored.id == moved.id
    now[0] = 60.0
    chat.add_message("at 60")
    assert chat.post(moved) == stored
    assert texts(chat.new_messages()) == ["at 50", "clock went back", "at 60"]


@pytest.mark.parametrize("bad", ["", "x" * 33, "has space", "semi;colon", 7])
def test_a_bad_message_id_is_refused(db: ZODB.DB, make_client: MakeClient, bad: object) -> None:
    chat = make_client(db, "alice").session("general")
    with pytest.raises(InvalidMessageError, match="message id must be"):
        chat.draft("hi", id=bad)


def test_a_draft_carries_a_display_name_checked_like_a_user_name(
    db: ZODB.DB, make_client: MakeClient
) -> None:
    chat = make_client(db, "kernel-user").session("general")
    assert chat.post(chat.draft("hi", author="  Ada ")).author == "Ada"
    with pytest.raises(InvalidMessageError, match="user name"):
        chat.draft("hi", author="   ")


def test_rooms_are_separate_and_listed(db: ZODB.DB, make_client: MakeClient) -> None:
    client = make_client(db, "alice")
    client.session("general").add_message("a")
    client.session("random").add_message("b")
    assert sorted(client.rooms()) == ["general", "random"]
    assert texts(client.session("random").new_messages()) == ["b"]


def test_clear_starts_every_reader_afresh(db: ZODB.DB, make_client: MakeClient) -> None:
    client = make_client(db, "alice")
    chat = client.session("general")
    chat.add_message("before")
    chat.new_messages()
    tm, room = begin_room(client)
    room.clear()
    tm.commit()
    chat.add_message("after")
    assert texts(chat.new_messages()) == ["after"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        (None, "must be a str"),
        (42, "must be a str"),
        (b"bytes", "must be a str"),
        ("x" * (64 * 1024 + 1), "over the 65536-byte limit"),
        ("é" * (32 * 1024 + 1), "over the 65536-byte limit"),
    ],
)
def test_bad_text_is_refused_and_nothing_is_stored(
    db: ZODB.DB, text: object, match: str, make_client: MakeClient
) -> None:
    chat = make_client(db, "alice").session("general")
    with pytest.raises(zchat_nb.InvalidMessageError, match=match):
        chat.add_message(text)  # type: ignore[arg-type]
    assert chat.new_messages() == []


def test_text_limit_is_configurable(db: ZODB.DB) -> None:
    client = zchat_nb.ChatClient(db, user="alice", max_text_bytes=10)
    with pytest.raises(zchat_nb.InvalidMessageError, match="10-byte limit"):
        client.session("general").add_message("12345678901")
    client.session("general").add_message("1234567890")


@pytest.mark.parametrize("user", ["", "  ", "x" * 65, 42])
def test_bad_user_names_are_refused(db: ZODB.DB, user: object) -> None:
    with pytest.raises(zchat_nb.InvalidMessageError, match="user name"):
        zchat_nb.ChatClient(db, user=user)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "record",
    [
        "not a tuple",
        ("id", "author", "text"),
        ("", "author", "text", 1.0),
        ("id", "", "text", 1.0),
        ("id", "author", b"bytes", 1.0),
        ("id", "author", "x" * (64 * 1024 + 1), 1.0),
        ("id", "author", "text", math.nan),
        ("id", "author", "text", "yesterday"),
        ("id", 7, "text", 1.0),
    ],
)
def test_malformed_records_are_rejected(record: object) -> None:
    with pytest.raises(ValueError):
        Message.from_record(record)


def test_malformed_record_from_another_client_is_skipped_and_reported(
    db: ZODB.DB, make_client: MakeClient
) -> None:
    client = make_client(db, "alice")
    chat = client.session("general")
    chat.add_message("good one")
    tm, room = begin_room(client)
    room.streams["evil"] = OOBTree({(1.0, "x"): ("id", "mallory", b"\x00" * 10, "not a time")})
    room.streams["junk"] = OOBTree({"not a key": "not a record"})
    tm.commit()
    chat.add_message("good two")
    assert texts(chat.new_messages()) == ["good one", "good two"]
    assert [where.split()[0] for where, _ in chat.skipped] == ["evil@(1.0,", "stream"]
    assert chat.new_messages() == []
    assert texts(chat.history(10)) == ["good one", "good two"]
    # the junk stream's keys once more by history, the bad record once per read
    assert [where.split()[0] for where, _ in list(chat.skipped)[2:]] == ["ends", "(1.0,"]


def test_a_writer_whose_clock_goes_back_keeps_its_order(db: ZODB.DB, make_client: MakeClient) -> None:
    reader = make_client(db, "bob").session("general")
    assert reader.new_messages() == []  # makes the room
    times = iter([50.0, 50.0, 10.0])
    chat = make_client(db, "alice", clock=lambda: next(times)).session("general")
    sent = [chat.add_message(t) for t in ("first", "second", "third")]
    assert [m.time for m in sent] == sorted(m.time for m in sent) and len({m.time for m in sent}) == 3
    assert sent[0].time == 50.0 and sent[1].time > 50.0  # moved just past the previous one
    assert texts(reader.new_messages()) == ["first", "second", "third"]
    assert texts(reader.history(2)) == ["second", "third"]


def test_presence_lists_users_with_a_recent_heartbeat(db: ZODB.DB, make_client: MakeClient) -> None:
    now = [1000.0]
    alice = make_client(db, "alice", clock=lambda: now[0]).session("general")
    bob = make_client(db, "bob", clock=lambda: now[0]).session("general")
    assert alice.present() == []
    alice.heartbeat()
    now[0] += 60
    bob.heartbeat()
    assert bob.present(within=90) == ["alice", "bob"]
    now[0] += 60
    assert bob.present(within=90) == ["bob"]
    assert make_client(db, "carol").session("random").present() == []


# -- a writer's tail: records wait there and go into the stream a batch at a time ------------


def stored_texts(client: zchat_nb.ChatClient, room: str = "general") -> tuple[list[str], list[str]]:
    """The texts in ``client``'s stream, and those its tail holds past the stream."""
    tm, found = begin_room(client, room)
    try:
        stream = found.streams[client.writer]
        return [r[2] for r in stream.values()], [r[2] for _, r in found.unflushed(client.writer, stream)]
    finally:
        tm.abort()


def test_records_wait_in_the_writers_tail_and_go_into_its_stream_a_batch_at_a_time(
    db: ZODB.DB, make_client: MakeClient
) -> None:
    client = make_client(db, "alice")
    chat, reader = client.session("general"), make_client(db, "bob").session("general")
    chat.add_message("m0")
    assert stored_texts(client) == (["m0"], [])  # the first goes into the new stream at once
    for i in range(1, HELD_MAX):
        chat.add_message(f"m{i}")
    assert stored_texts(client) == (["m0"], [f"m{i}" for i in range(1, HELD_MAX)])
    assert texts(reader.new_messages()) == [f"m{i}" for i in range(HELD_MAX)]
    chat.add_message(f"m{HELD_MAX}")  # the tail's 8th: all of them go into the stream
    assert stored_texts(client) == ([f"m{i}" for i in range(HELD_MAX + 1)], [])
    chat.add_message("after")
    assert stored_texts(client) == ([f"m{i}" for i in range(HELD_MAX + 1)], ["after"])
    everything = [f"m{i}" for i in range(HELD_MAX + 1)] + ["after"]
    assert texts(reader.new_messages()) == everything[HELD_MAX:]
    fresh = make_client(db, "carol").session("general")
    assert texts(fresh.new_messages()) == everything  # the stream, then the tail
    assert texts(fresh.history(100)) == everything
    assert texts(fresh.history(2)) == everything[-2:]
    assert texts(fresh.everything()) == everything
    _, room = begin_room(client)
    assert room.message_count() == len(everything)
    assert [record[2] for _, record in room.records()] == everything


def test_a_long_text_goes_into_the_stream_at_once(db: ZODB.DB, make_client: MakeClient) -> None:
    client = make_client(db, "alice")
    chat = client.session("general")
    chat.add_message("first")
    chat.add_message("short")
    long = "x" * (HELD_CHARS + 1)
    chat.add_message(long)
    assert stored_texts(client) == (["first", "short", long], [])


def test_edits_and_retries_find_messages_still_in_the_tail(db: ZODB.DB, make_client: MakeClient) -> None:
    client = make_client(db, "alice")
    chat, reader = client.session("general"), make_client(db, "bob").session("general")
    chat.add_message("first")
    typo = chat.add_message("thrid")
    retried = chat.draft("retried", id="r" * 32)
    chat.post(retried)
    chat.add_message("between")
    assert chat.post(retried).id == retried.id  # found in the tail, not stored again
    chat.edit(typo, "third")
    assert stored_texts(client)[0] == ["first"]  # everything since is still in the tail
    assert texts(reader.new_messages()) == ["first", "third", "retried", "between"]
    for i in range(2 * HELD_MAX):  # the edit and the retried message go into the stream
        chat.add_message(f"more {i}")
    assert chat.post(retried).id == retried.id
    assert texts(reader.history(3)) == [f"more {2 * HELD_MAX - 3 + i}" for i in range(3)]
    assert texts(reader.everything())[:4] == ["first", "third", "retried", "between"]
    assert texts(reader.new_messages()) == [f"more {i}" for i in range(2 * HELD_MAX)]


def test_a_reader_that_missed_some_takes_them_from_the_tail_and_bounded(
    db: ZODB.DB, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(db, "alice")
    chat, reader = client.session("general"), make_client(db, "bob").session("general")
    chat.add_message("m0")
    assert texts(reader.new_messages()) == ["m0"]
    for i in range(1, 6):
        chat.add_message(f"m{i}")
    monkeypatch.setattr(model, "MAX_PER_CALL", 2)
    got = []
    for _ in range(4):
        batch = texts(reader.new_messages())
        assert len(batch) <= 2
        got += batch
    assert got == [f"m{i}" for i in range(1, 6)]
    assert reader.new_messages() == []


def test_a_tail_written_before_batching_reads_as_one_record_also_in_the_stream(
    db: ZODB.DB, make_client: MakeClient
) -> None:
    """Its state was ``(key before, key, record)``; the writer then goes on from it."""
    client = make_client(db, "alice")
    chat, reader = client.session("general"), make_client(db, "bob").session("general")
    chat.add_message("one")
    tm, room = begin_room(client)
    stream = room.streams[client.writer]
    stream[(stream.maxKey()[0] + 1, "t" * 32)] = ("t" * 32, "alice", "two", stream.maxKey()[0] + 1)
    old = Tail()
    old.__setstate__((stream.minKey(), stream.maxKey(), stream[stream.maxKey()]))  # as ee1f507 stored it
    room.tails[client.writer] = old
    tm.commit()
    assert (old.base, old.held) == (stream.minKey(), ((stream.maxKey(), stream[stream.maxKey()]),))
    assert texts(reader.new_messages()) == ["one", "two"]
    chat.add_message("three")
    assert stored_texts(client) == (["one", "two"], ["three"])
    assert texts(reader.new_messages()) == ["three"]
    assert texts(make_client(db, "carol").session("general").new_messages()) == ["one", "two", "three"]


def test_the_tail_names_its_streams_last_bucket_as_the_stream_grows(
    db: ZODB.DB, make_client: MakeClient
) -> None:
    client = make_client(db, "alice")
    chat, reader = client.session("general"), make_client(db, "bob").session("general")
    named = []
    for i in range(200):
        chat.add_message(f"m{i}")
        tm, room = begin_room(client)
        stream, tail = room.streams[client.writer], room.tails[client.writer]
        assert tail.bucket is _last_bucket(stream)  # None while the tree keeps its bucket inline
        named.append(tail.bucket)
        tm.abort()
    assert named[0] is None and len({id(edge) for edge in named if edge is not None}) > 3  # splits
    assert texts(reader.history(50)) == [f"m{i}" for i in range(150, 200)]
    assert texts(reader.history(3, before=reader.history(100)[0])) == ["m97", "m98", "m99"]
