"""History and idle polls read O(log N) of the tree: counted in object loads at 1k and 1M messages.

Tests never time things; the benchmarks (benchmarks/run.py) report milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import transaction
import ZODB
from BTrees.OOBTree import OOBTree

import zchat_nb
from zchat_nb.model import ROOMS_KEY, Changes, Message, Room


class CountingDB:
    """An in-memory database with ``n`` messages whose storage counts the records it loads."""

    def __init__(self, n: int) -> None:
        self.db = ZODB.DB(None)
        storage = self.db.storage
        self.loads = 0
        real = storage.loadBefore

        def load_before(*args: Any) -> Any:
            self.loads += 1
            return real(*args)

        storage.loadBefore = load_before
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        rooms = conn.root()[ROOMS_KEY] = OOBTree()
        room = rooms["general"] = Room("general")
        for i in range(n):
            room.append(f"w{i % 8}", Message(f"{i:032x}", f"user{i % 8}", f"message {i}", 1e9 + i * 0.01))
            if i % 100_000 == 99_999:
                tm.commit()
        tm.commit()
        conn.close()
        self.db.cacheMinimize()

    def count(self, action: Any) -> int:
        before = self.loads
        action()
        return self.loads - before


@pytest.fixture(scope="module")
def small() -> Iterator[CountingDB]:
    db = CountingDB(1_000)
    yield db
    db.db.close()


@pytest.fixture(scope="module")
def large() -> Iterator[CountingDB]:
    db = CountingDB(1_000_000)
    yield db
    db.db.close()


def cold_history_loads(counting: CountingDB) -> int:
    client = zchat_nb.ChatClient(counting.db, user="reader")
    chat = client.session("general")
    _, conn = client.connection()
    conn.cacheMinimize()
    counting.db.cacheMinimize()
    found: list[Message] = []
    loads = counting.count(lambda: found.extend(chat.history(200)))
    assert len(found) == 200 and found[-1].text.startswith("message ")
    conn.close()
    return loads


def idle_poll_loads(counting: CountingDB, exact: bool) -> dict[str, int]:
    """Loads of a reader's first, warm idle and cold idle ``new_messages()``.

    ``exact``: the reader's client hears of every commit (a ZEO client; none comes here), so an idle
    call reads nothing; else (in-process storage) each call checks every stream's end.
    """
    client = zchat_nb.ChatClient(counting.db, user="reader")
    if exact:
        client.track_changes = lambda: Changes(exact=True)  # type: ignore[method-assign]
    chat = client.session("general", backlog=0)
    first = counting.count(chat.new_messages)
    assert chat.new_messages() == []
    warm = counting.count(chat.new_messages)
    _, conn = client.connection()
    conn.cacheMinimize()
    cold = counting.count(chat.new_messages)
    conn.close()
    return {"first": first, "warm": warm, "cold": cold}


@pytest.mark.slow
def test_history_reads_the_same_amount_at_1k_and_1m(small: CountingDB, large: CountingDB) -> None:
    at_1k, at_1m = cold_history_loads(small), cold_history_loads(large)
    # At 1M each of the rooms' 8 writers has its newest 25 records in its tail and its stream's
    # last bucket, which the tail names: those two and the indexes are all history loads, no node
    # of any tree (a full read would be ~33,000 buckets). At 1k some last buckets hold fewer, and
    # those writers' trees are read from the root.
    assert at_1m <= 6 + 8 * 2, at_1m
    assert at_1k <= 6 + 8 * 5, at_1k


@pytest.mark.slow
def test_idle_new_messages_reads_nothing_at_1k_and_1m(small: CountingDB, large: CountingDB) -> None:
    at_1k, at_1m = idle_poll_loads(small, exact=True), idle_poll_loads(large, exact=True)
    assert at_1k["warm"] == at_1k["cold"] == at_1m["warm"] == at_1m["cold"] == 0
    # the first call reads the root, the rooms, the room, its streams index and each of the 8
    # streams' right edge (root, inner node, last bucket at 1M), not the messages
    assert at_1m["first"] <= 4 + 8 * 3, at_1m


@pytest.mark.slow
def test_without_change_notices_an_idle_call_checks_each_streams_end(
    small: CountingDB, large: CountingDB
) -> None:
    at_1k, at_1m = idle_poll_loads(small, exact=False), idle_poll_loads(large, exact=False)
    assert at_1k["warm"] == at_1m["warm"] == 0  # all in the object cache
    # the room, the right edges and the tails (with their index) again, not the messages
    assert at_1m["cold"] <= 7 + 8 * 4, at_1m
    assert at_1m["cold"] <= at_1k["cold"] + 8, (at_1k, at_1m)  # one more tree level per stream
