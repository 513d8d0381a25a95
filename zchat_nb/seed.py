"""The seed: the chat of A. M. Kuchling's ZODB/ZEO Programming Guide (``chatter.py``), as a baseline.

The lessons and the benchmarks compare zchat_nb with this design, so it is kept as the guide has it
(``docs/articles/old-guide/chatter.py`` and ``zeo.rst`` in the ZODB repository), ported to Python 3
and nothing more; changes are marked ``PORT:``. Its known defects are kept on purpose, they are what
the lessons show and the benchmarks measure: ``new_messages`` scans the whole tree on every call;
its cursor ``_v_last_time`` is lost whenever the object is ghostified, and then the whole history
comes again; a message stamped earlier but committed later than one already returned is never
returned; two messages with the same ``time.time()`` overwrite each other; every writer appends to
the end of one BTree, so bucket splits make concurrent commits conflict.

It lives in the package (not in a notebook) because ZODB pickles name classes by module: a class
defined in a notebook cell lives in ``__main__``, which no other process can import.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.POSException import ConflictError

if TYPE_CHECKING:
    from ZODB.Connection import Connection

__all__ = ["SESSIONS_KEY", "ChatSession", "get_chat_session"]

#: Root key of the ``channel name -> ChatSession`` tree, as in the guide.
SESSIONS_KEY = "chat_sessions"


class ChatSession(Persistent):
    """A chat channel: messages in a BTree keyed by ``time.time()``, and a volatile read cursor."""

    def __init__(self, name: str) -> None:
        self.name = name
        # Internal attribute: _messages holds all the chat messages.
        self._messages = OOBTree()

    def add_message(self, message: str) -> None:
        """Add a message to the channel; retry after a ConflictError."""
        # PORT: the guide calls get_transaction().commit(); this is the transaction manager of the
        # connection that loaded the object (transaction.manager for a plain db.open()), so that
        # two connections in one process each commit their own work.
        tm = self._p_jar.transaction_manager
        while 1:
            try:
                now = time.time()
                self._messages[now] = message
                tm.commit()
            except ConflictError:
                # Conflict occurred; this process should abort,
                # wait for a little bit, then try again.
                # PORT: today's transaction package keeps a failed transaction until it is
                # aborted (every later commit raises TransactionFailedError), so abort first.
                tm.abort()
                time.sleep(0.2)
            else:
                # No ConflictError exception raised, so break
                # out of the enclosing while loop.
                break

    def new_messages(self) -> list[str]:
        """Return new messages."""
        # self._v_last_time is the time of the most recent message
        # returned to the user of this class.
        if not hasattr(self, "_v_last_time"):
            self._v_last_time = 0

        new = []
        T = self._v_last_time

        for T2, message in self._messages.items():
            if T2 > T:
                new.append(message)
                self._v_last_time = T2

        return new


def get_chat_session(conn: Connection, channelname: str) -> ChatSession:
    """Return the chat session for ``channelname`` from ``conn``'s root, creating it if required."""
    root = conn.root()
    tm = conn.transaction_manager
    if SESSIONS_KEY not in root:  # PORT: dict.has_key() is gone in Python 3
        root[SESSIONS_KEY] = OOBTree()
        tm.commit()
    sessions = root[SESSIONS_KEY]
    if channelname not in sessions:
        sessions[channelname] = ChatSession(channelname)
        tm.commit()
    return sessions[channelname]
