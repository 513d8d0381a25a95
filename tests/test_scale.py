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
from zchat_nb.model import ROOMS_KEY, Message, Room


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


def idle_poll_loads(counting: CountingDB) -> tuple[int, int]:
    client = zchat_nb.ChatClient(counting.db, user="reader")
    chat = client.session("general", backlog=0)
    assert chat.new_messages() == [] and chat.new_messages() == []
    warm = counting.count(chat.new_messages)
    _, conn = client.connection()
    conn.cacheMinimize()
    cold = counting.count(chat.new_messages)
    conn.close()
    return warm, cold


@pytest.mark.slow
def test_history_reads_the_same_amount_at_1k_and_1m(small: CountingDB, large: CountingDB) -> None:
    at_1k, at_1m = cold_history_loads(small), cold_history_loads(large)
    # The rooms' 8 writers each load their stream's root, inner node and a bucket or two (200
    # records are about 8 buckets of 30); a full read at 1M would be ~33,000 buckets.
    assert at_1m <= 8 * 4 + 8, at_1m
    assert at_1m <= at_1k + 8, (at_1k, at_1m)  # one more tree level per stream


@pytest.mark.slow
def test_idle_new_messages_reads_nothing_at_1k_and_1m(small: CountingDB, large: CountingDB) -> None:
    warm_1k, cold_1k = idle_poll_loads(small)
    warm_1m, cold_1m = idle_poll_loads(large)
    assert warm_1k == warm_1m == 0
    assert cold_1m == cold_1k <= 6, (cold_1k, cold_1m)  # root, rooms, room, count: not the messages
