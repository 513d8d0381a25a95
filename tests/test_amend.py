"""Replies, edits, deletes, reactions and mentions on an in-memory ZODB (no ZEO, no certificates)."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import transaction
import ZODB
import ZODB.FileStorage

import zchat_nb
from zchat_nb.amend import EVENT_TAG, Event, check_emoji, mentions_in
from zchat_nb.model import ROOMS_KEY, Message

DATA = Path(__file__).parent / "data"


@pytest.fixture
def db() -> Iterator[ZODB.DB]:
    database = ZODB.DB(None)
    yield database
    database.close()


_shared_clock = itertools.count(1000.0)


def client(db: ZODB.DB, user: str, start: float | None = None, step: float = 1.0) -> zchat_nb.ChatClient:
    """A client on ``db``; by default all share one clock that ticks a second per call."""
    ticks = _shared_clock if start is None else itertools.count(start, step)
    return zchat_nb.ChatClient(db, user=user, clock=lambda: float(next(ticks)))


def test_the_contract_of_the_issue_across_two_clients(db: ZODB.DB) -> None:
    alice, bob = client(db, "alice").session("general"), client(db, "bob").session("general")
    m = alice.add_message("What does _p_changed do? @bob")
    r = bob.add_message("It marks the object dirty", reply_to=m)
    assert r.reply_to == m.id and m.mentions == ("bob",)
    assert [x.id for x in alice.new_messages()] == [m.id, r.id]
    edited = bob.edit(r, "It marks the object as changed")
    assert edited.text == "It marks the object as changed" and edited.edited is not None
    alice.react(r, "👍")
    bob.react(r, "👍")
    [changed] = alice.updated_messages()
    assert changed.id == r.id and changed.text == "It marks the object as changed"
    assert dict(changed.reactions) == {"👍": ("alice", "bob")}
    assert alice.updated_messages() == []  # exactly once
    alice.unreact(r, "👍")
    alice.delete(m)
    # bob reads for the first time: each message in its current state, the deleted one included.
    assert [x.text for x in bob.new_messages()] == ["", "It marks the object as changed"]
    history = bob.history(200)
    assert [(x.deleted, x.text) for x in history] == [(True, ""), (False, "It marks the object as changed")]
    assert dict(history[1].reactions) == {"👍": ("bob",)}
    assert history[0].mentions == () and history[0].reactions == {}
    with pytest.raises(TypeError):  # read-only
        history[1].reactions["👍"] = ()  # type: ignore[index]


def test_new_messages_returns_a_message_and_its_amendments_of_the_same_poll_once(db: ZODB.DB) -> None:
    alice, bob = client(db, "alice").session("general"), client(db, "bob").session("general")
    m = alice.add_message("tpyo")
    alice.edit(m, "typo")
    bob.react(m, "🎉")
    [seen] = bob.new_messages()
    assert (seen.text, dict(seen.reactions)) == ("typo", {"🎉": ("bob",)})
    assert bob.updated_messages() == [] and bob.new_messages() == []


def test_updated_messages_keeps_new_messages_for_the_next_new_messages_call(db: ZODB.DB) -> None:
    alice, bob = client(db, "alice").session("general"), client(db, "bob").session("general")
    first = alice.add_message("one")
    bob.new_messages()
    alice.add_message("two")
    alice.edit(first, "one!")
    assert [m.text for m in bob.updated_messages()] == ["one!"]
    assert [m.text for m in bob.new_messages()] == ["two"]


def test_editing_or_deleting_another_clients_message_names_who_may(db: ZODB.DB) -> None:
    alice, bob = client(db, "alice").session("general"), client(db, "bob").session("general")
    m = alice.add_message("mine")
    with pytest.raises(zchat_nb.ZChatPermissionError, match=r"alice's.*may edit"):
        bob.edit(m, "yours now")
    with pytest.raises(zchat_nb.ZChatPermissionError, match="teacher may delete"):
        bob.delete(m)
    # Same user name, another client (kernel): without certificates nothing proves it is alice.
    other_alice = client(db, "alice").session("general")
    with pytest.raises(zchat_nb.ZChatPermissionError):
        other_alice.edit(m, "me too")
    assert [x.text for x in bob.new_messages()] == ["mine"]


@pytest.mark.parametrize("emoji", ["👍", "❤️", "😂", "🎉", "❓", "✅", "👍🏽", "👩‍💻", "🇫🇷"])
def test_one_short_emoji_is_a_reaction(emoji: str) -> None:
    assert check_emoji(emoji) == emoji


@pytest.mark.parametrize(
    "bad", ["", "a", "+1", "👍 ", " 👍", "👍\u202e", "👍👍👍👍👍👍👍👍👍", 1, None, "<b>"]
)
def test_anything_else_is_refused_as_a_reaction(db: ZODB.DB, bad: object) -> None:
    chat = client(db, "alice").session("general")
    m = chat.add_message("hi")
    with pytest.raises(zchat_nb.ZChatPermissionError, match="one short emoji"):
        chat.react(m, bad)  # type: ignore[arg-type]


def test_edits_apply_in_the_order_they_were_made_whatever_the_clock(db: ZODB.DB) -> None:
    # The writer's clock runs backwards: times are pushed forward, versions order the edits anyway.
    alice = client(db, "alice", start=5000.0, step=-100.0).session("general")
    bob = client(db, "bob").session("general")
    m = alice.add_message("v0")
    for text in ("v1", "v2", "v3"):
        alice.edit(m, text)
    assert [x.text for x in bob.new_messages()] == ["v3"]


def test_reactions_of_one_user_from_two_clients_follow_what_each_saw(db: ZODB.DB) -> None:
    # alice reacts in a kernel whose clock is far ahead, and takes it back in one far behind.
    ahead = client(db, "alice", start=9_000.0).session("general")
    behind = client(db, "alice", start=10.0).session("general")
    m = ahead.add_message("question")
    ahead.react(m, "❓")
    behind.unreact(m, "❓")
    reader = client(db, "carol").session("general")
    [seen] = reader.new_messages()
    assert seen.reactions == {}


def test_delete_is_final(db: ZODB.DB) -> None:
    alice, bob = client(db, "alice").session("general"), client(db, "bob").session("general")
    m = alice.add_message("oops")
    alice.delete(m)
    assert alice.delete(m).deleted  # again: nothing to do, no error
    with pytest.raises(zchat_nb.InvalidMessageError, match="was deleted"):
        alice.edit(m, "back")
    with pytest.raises(zchat_nb.InvalidMessageError, match="was deleted"):
        bob.react(m, "👍")
    [seen] = bob.new_messages()
    assert (seen.deleted, seen.text) == (True, "")


def test_history_counts_messages_not_amendments(db: ZODB.DB) -> None:
    chat = client(db, "alice").session("general")
    sent = [chat.add_message(f"m{i}") for i in range(5)]
    for emoji in ("👍", "❤️", "😂", "🎉"):
        for m in sent:
            chat.react(m, emoji)
    history = chat.history(3)
    assert [m.text for m in history] == ["m2", "m3", "m4"]
    assert all(len(m.reactions) == 4 for m in history)


def test_updates_only_for_messages_the_session_returned(db: ZODB.DB) -> None:
    alice = client(db, "alice").session("general")
    old, recent = alice.add_message("old"), alice.add_message("recent")
    reader = client(db, "bob").session("general", backlog=1)
    assert [m.text for m in reader.new_messages()] == ["recent"]
    alice.edit(old, "old, edited")
    alice.edit(recent, "recent, edited")
    assert [m.text for m in reader.updated_messages()] == ["recent, edited"]
    assert [m.text for m in reader.history(2)] == ["old, edited", "recent, edited"]


def test_state_is_rebuilt_from_storage_after_the_cache_is_emptied(db: ZODB.DB) -> None:
    alice = client(db, "alice").session("general")
    m = alice.add_message("hello")
    alice.edit(m, "hello!")
    alice.react(m, "✅")
    db.cacheMinimize()
    fresh = client(db, "bob").session("general")
    [seen] = fresh.new_messages()
    assert (seen.text, dict(seen.reactions)) == ("hello!", {"✅": ("alice",)})


def test_a_forged_edit_written_into_a_stream_is_ignored_and_counted(db: ZODB.DB) -> None:
    alice, mallory = client(db, "alice"), client(db, "mallory")
    m = alice.session("general").add_message("honest")
    reader = client(db, "bob").session("general")
    reader.new_messages()
    # mallory claims to be alice, in mallory's own stream, with a valid-looking event.
    forged = Event("f" * 32, "alice", 2000.0, "edit", alice.writer, m.time, m.id, 99, "forged")
    tm, conn = mallory.connection()
    tm.begin()
    conn.root()[ROOMS_KEY]["general"].amend(mallory.writer, forged)
    tm.commit()
    assert reader.updated_messages() == []
    assert [x.text for x in reader.history(5)] == ["honest"]
    refused = [where for where, _ in reader.skipped if where.startswith("edit ")]
    assert refused == ["edit " + "f" * 32]  # counted once though seen twice (poll and history)


@pytest.mark.parametrize(
    "record",
    [
        (EVENT_TAG, "i" * 32, "x", 1.0, "explode", "w", 1.0, "t", 1, "", "", ""),
        (EVENT_TAG, "i" * 32, "x", 1.0, "edit", "w", 1.0, "t", 2**70, "new", "", ""),
        (EVENT_TAG, "i" * 32, "x", 1.0, "react", "w", 1.0, "t", 1, "<img src=x>", "", ""),
        (EVENT_TAG, "i" * 32, "x", 1.0, "delete", "w", 1.0, "t", 1, "", "nothex", "sig"),
        (EVENT_TAG, "i" * 32, "x", float("nan"), "delete", "w", 1.0, "t", 1, "", "", ""),
        ("zchat.m1", "i" * 32, "x", "text", 1.0, 5, "", ""),
    ],
)
def test_crafted_records_are_skipped_with_a_reason(db: ZODB.DB, record: tuple[object, ...]) -> None:
    alice = client(db, "alice")
    chat = alice.session("general")
    chat.add_message("before")
    tm, conn = alice.connection()
    tm.begin()
    room = conn.root()[ROOMS_KEY]["general"]
    room.streams[alice.writer][(1500.0, "z" * 32)] = record
    tm.commit()
    reader = client(db, "bob").session("general")
    assert [m.text for m in reader.new_messages()] == ["before"]
    assert len(reader.skipped) == 1


def test_mentions_are_the_at_names_of_the_text() -> None:
    assert mentions_in("@ada and @bob.smith, not a@b.c; @ada again. Thanks @carol.") == (
        "ada",
        "bob.smith",
        "carol",
    )
    assert Message("i", "a", "no mention", 1.0).mentions == ()


def test_a_room_written_by_the_previous_model_loads_and_takes_amendments(tmp_path: Path) -> None:
    # tests/data/room_v1.fs was written by the model before amendments (tests/data/make_room_v1.py).
    path = tmp_path / "Data.fs"
    shutil.copy(DATA / "room_v1.fs", path)
    database = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    try:
        reader = zchat_nb.ChatClient(database, user="carol").session("general")
        old = reader.new_messages()
        assert [(m.author, m.text) for m in old] == [
            ("alice", "hello from the old model"),
            ("bob", "hi @alice"),
            ("alice", "third"),
        ]
        assert old[1].mentions == ("alice",) and not any(m.deleted or m.edited or m.reply_to for m in old)
        reader.react(old[0], "👍")
        reply = reader.add_message("answer", reply_to=old[0])
        with pytest.raises(zchat_nb.ZChatPermissionError):
            reader.delete(old[0])  # written by a client that no longer exists
        transaction.abort()
        again = zchat_nb.ChatClient(database, user="dave").session("general")
        state = again.new_messages()
        assert dict(state[0].reactions) == {"👍": ("carol",)} and state[-1].reply_to == old[0].id
        assert state[-1].id == reply.id
    finally:
        database.close()
