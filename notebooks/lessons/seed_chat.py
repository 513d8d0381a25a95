"""The seed: the chat of A. M. Kuchling's ZODB/ZEO Programming Guide (``chatter.py``), kept minimal.

The lessons import it so that its class can be pickled by name (a class defined in a notebook cell
lives in ``__main__``, which another process cannot import). The code follows the guide's listing
(``docs/articles/old-guide/zeo.rst`` in the ZODB repository) with two changes, both marked below:
``get_transaction()`` is today's ``transaction`` API, and the transaction is the one of the connection
that loaded the object, so that two connections in one kernel each commit their own work. With a
connection opened by plain ``db.open()`` that is ``transaction.manager``, exactly as in the guide.
``get_chat_session`` is a minimal helper in the manner of chatter.py's: a B-tree of rooms in the root.
"""

from __future__ import annotations

import time

import BTrees.OOBTree
from persistent import Persistent
from ZODB.POSException import ConflictError


class ChatSession(Persistent):
    """A chat channel: messages in a B-tree keyed by ``time.time()``, and a volatile read cursor."""

    def __init__(self, name: str) -> None:
        self.name = name
        # Internal attribute: _messages holds all the chat messages.
        self._messages = BTrees.OOBTree.OOBTree()

    def add_message(self, message: str) -> None:
        """Add a message to the channel; retry after a ConflictError."""
        tm = self._p_jar.transaction_manager  # changed: the guide calls get_transaction().commit()
        while 1:
            try:
                now = time.time()
                self._messages[now] = message
                tm.commit()
            except ConflictError:
                # Conflict occurred; this process should abort,
                # wait for a little bit, then try again.
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


def get_chat_session(conn, channelname: str) -> ChatSession:
    """Return the chat session for ``channelname`` from ``conn``'s root, creating it if required."""
    root = conn.root()
    tm = conn.transaction_manager
    if "chat_sessions" not in root:
        root["chat_sessions"] = BTrees.OOBTree.OOBTree()
        tm.commit()
    sessions = root["chat_sessions"]
    if channelname not in sessions:
        sessions[channelname] = ChatSession(channelname)
        tm.commit()
    return sessions[channelname]
