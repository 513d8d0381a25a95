"""The seed: the chat session of A. M. Kuchling's ZODB/ZEO Programming Guide, as the baseline.

The guide's script survives as ``docs/articles/old-guide/chatter.py`` in the ZODB repository.
This is that design, ported to Python 3 and nothing more, so that ``run.py`` can measure zchat_nb
against it:

- ``ChatSession(Persistent)`` keeps every message in one ``OOBTree`` keyed by ``time.time()``;
- ``add_message`` sets ``tree[time.time()] = text`` and commits with the process's global
  transaction manager, sleeping 0.2 s and trying again on ``ConflictError``;
- ``new_messages`` walks the *whole* tree and returns the entries whose key is above
  ``_v_last_time``, a volatile attribute that remembers the newest key already returned.

Changes needed for Python 3 and today's ``transaction`` package are marked ``PORT:`` below. The
known defects (whole-tree scans, a cursor lost whenever the object is ghostified, messages stamped
earlier but committed later never delivered, equal float keys overwriting each other) are kept on
purpose: they are what the benchmark measures.
"""

from __future__ import annotations

import os
import random
import sys
import time

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZEO.ClientStorage import ClientStorage
from ZODB.POSException import ConflictError

__all__ = ["SESSIONS_KEY", "ChatSession", "get_chat_session"]

#: Root key of the ``channel name -> ChatSession`` tree, as in the guide.
SESSIONS_KEY = "chat_sessions"


class ChatSession(Persistent):
    """One chat channel: all its messages in a BTree keyed by the time they were sent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._messages = OOBTree()  # time.time() -> message text

    def new_messages(self) -> list[str]:
        """The messages added since this object last returned some, oldest first.

        Scans every entry of the tree on each call, as the guide does.
        """
        if not hasattr(self, "_v_last_time"):
            self._v_last_time = 0
        new = []
        last = self._v_last_time
        for when, message in self._messages.items():
            if when > last:
                new.append(message)
                self._v_last_time = when
        return new

    def add_message(self, message: str) -> None:
        """Store ``message`` under the current time and commit, retrying after a conflict."""
        while True:
            try:
                now = time.time()
                self._messages[now] = message
                transaction.commit()
            except ConflictError:
                # PORT: the guide's ZODB aborted a failed commit by itself; today's `transaction`
                # keeps the failed transaction (every later commit raises TransactionFailedError)
                # until it is aborted, so abort before the guide's pause and retry.
                transaction.abort()
                time.sleep(0.2)
            else:
                break


def get_chat_session(conn: ZODB.Connection.Connection, channelname: str) -> ChatSession:
    """The channel's ChatSession, creating the sessions tree and the session when missing."""
    root = conn.root()
    if SESSIONS_KEY not in root:  # PORT: dict.has_key() is gone in Python 3
        root[SESSIONS_KEY] = OOBTree()
        transaction.commit()
    sessions = root[SESSIONS_KEY]
    if channelname not in sessions:
        sessions[channelname] = ChatSession(channelname)
        transaction.commit()
    return sessions[channelname]


def main(argv: list[str] | None = None) -> int:
    """The guide's demo loop: send a random line, print what is new, pause 1-4 s; forever.

    ``python benchmarks/seed.py CHANNEL [HOST:PORT]``. PORT: the guide hard-coded localhost:9672.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print(f"Usage: {sys.argv[0]} <channelname> [host:port]")
        return 0
    host, _, port = (argv[1] if len(argv) == 2 else "localhost:9672").rpartition(":")
    db = ZODB.DB(ClientStorage((host or "localhost", int(port))))
    session = get_chat_session(db.open(), argv[0])
    lines = ["Hi.", "Hello", "Me too", "I'M 3L33T!!!!"]
    while True:
        session.add_message(f"{random.choice(lines)}: pid {os.getpid()}")
        for message in session.new_messages():
            print(message)
        time.sleep(random.randint(1, 4))


if __name__ == "__main__":
    sys.exit(main())
