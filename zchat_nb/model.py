"""The chat model: rooms stored in ZODB, and the per-reader session that reads and writes them.

The seed (Kuchling's ``chatter.py``) kept one BTree keyed by ``time.time()`` and a ``_v_last_time``
cursor. That cursor is lost whenever the object is ghostified, and it never delivers a message
stamped earlier but committed later than one already seen; and every writer appending to the end of
one shared BTree makes bucket splits, which cannot be merged, conflict all the time under load.

Here each writer (one per :class:`~zchat_nb.client.ChatClient`) appends to a stream of its own,
``Room.streams[writer]``, keyed by ``(time, id)``, where times only grow: a writer's key order is
its commit order. A send changes only the writer's own objects (its stream's last bucket; on a
split a node of its stream; on its first message the ``streams`` index), so concurrent senders
neither conflict nor make the server resolve anything. A reader's cursor is the last key it was
given from each stream, held by the :class:`ChatSession` in ordinary memory, never on a persistent
object. History merges the recent ends of the streams by time.
Records are plain tuples of ``str`` and ``float`` so that the unpickling allow-list stays tiny.

Fan-out: a reader learns from the oids its client is told were committed (:class:`Changes`) which
streams changed, and reads only those, from its cursor on: one load (the stream's last bucket) per
delivered message, and no load at all while nothing of its room changed.

This module knows nothing of ZEO, widgets or IPython: a :class:`ChatSession` gets its connection,
its wake-ups, its change notices and its clock from a :class:`SessionHost`
(``zchat_nb.client.ChatClient`` in practice).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.POSException import ConflictError

from .exceptions import (
    InvalidMessageError,
    ZChatConnectionError,
    ZChatDisconnected,
    ZChatSendError,
    disconnected,
    server_boundary,
)

if TYPE_CHECKING:
    from ZODB.Connection import Connection

__all__ = [
    "DEFAULT_MAX_TEXT_BYTES",
    "Changes",
    "ChatSession",
    "Message",
    "Room",
    "SendPolicy",
    "SessionHost",
    "commit",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_TEXT_BYTES = 64 * 1024
MAX_AUTHOR_CHARS = 64
MAX_ROOM_CHARS = 64
_ID_CHARS = 32
ROOMS_KEY = "zchat_nb.rooms"

Record = tuple[str, str, str, float]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message; immutable.

    ``id`` is made by the sender and unique, ``time`` is the sender's clock (seconds since the epoch).
    """

    id: str
    author: str
    text: str
    time: float

    @property
    def key(self) -> tuple[float, str]:
        """The message's key in its writer's stream: ordered by time, ties broken by id."""
        return (self.time, self.id)

    def to_record(self) -> Record:
        return (self.id, self.author, self.text, self.time)

    @classmethod
    def from_record(cls, record: object, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> Message:
        """Check a stored record written by some client and turn it into a Message.

        Raises ``ValueError`` naming what is wrong: another client may have written anything.
        """
        if not (isinstance(record, tuple) and len(record) == 4):
            raise ValueError(f"record is not a 4-tuple: {type(record).__name__}")
        id_, author, text, when = record
        if not (isinstance(id_, str) and 0 < len(id_) <= _ID_CHARS):
            raise ValueError(f"bad message id {id_!r:.40}")
        if not (isinstance(author, str) and 0 < len(author) <= MAX_AUTHOR_CHARS):
            raise ValueError(f"bad author {author!r:.80}")
        if not isinstance(text, str) or len(text) > max_text_bytes:
            raise ValueError("text is not a str or longer than the limit")
        if len(text.encode("utf-8", "surrogatepass")) > max_text_bytes:
            raise ValueError(f"text is over {max_text_bytes} bytes")
        if not (isinstance(when, float) and math.isfinite(when)):
            raise ValueError(f"bad time {when!r:.40}")
        return cls(id_, author, text, when)


def check_text(text: object, max_text_bytes: int) -> str:
    """Return ``text`` if it can be sent, else raise :class:`InvalidMessageError` saying why."""
    if not isinstance(text, str):
        raise InvalidMessageError(
            f"message text must be a str, not {type(text).__name__} ({text!r:.60}); "
            "convert it first, for example with str(value)"
        )
    if not text.strip():
        raise InvalidMessageError("message text is empty; type something to send")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_text_bytes:
        raise InvalidMessageError(
            f"message text is {size} bytes, over the {max_text_bytes}-byte limit; "
            "split it, or raise the limit with connect(..., max_text_bytes=N)"
        )
    return text


def check_author(author: object) -> str:
    if not isinstance(author, str) or not author.strip():
        raise InvalidMessageError(f"user name must be a non-empty str, not {author!r:.60}")
    if len(author) > MAX_AUTHOR_CHARS:
        raise InvalidMessageError(
            f"user name {author[:20]!r}... is {len(author)} characters; use at most {MAX_AUTHOR_CHARS}"
        )
    return author.strip()


def check_room_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_ROOM_CHARS:
        raise InvalidMessageError(
            f"room name must be a non-empty str of at most {MAX_ROOM_CHARS} characters, not {name!r:.80}"
        )
    return name.strip()


class Room(Persistent):
    """A chat room as stored in ZODB.

    Every attribute has a class-level default so that records written by older versions load.
    """

    name = ""
    created = 0.0
    #: Bumped by :meth:`clear`; readers that see a new epoch start their cursors afresh.
    epoch = 0
    #: ``writer -> stream``; a stream is an ``OOBTree`` of ``(time, id) -> record`` that only its
    #: writer appends to, so writers never conflict. A writer's times increase in commit order.
    streams: OOBTree | None = None
    #: Written by zchat_nb before the fan-out rework (``writer -> (count, first, last, last id)``
    #: and a ``Length``); every send changed them, so every reader reloaded them. No longer read
    #: or written: the streams' own first and last keys say the same.
    heads: OOBTree | None = None
    count: Length | None = None
    #: ``user -> last heartbeat time``, written by zchat_nb before members; still read.
    presence: OOBTree | None = None
    #: ``(user, writer) -> time joined or lease renewed``; one key per client, changed on join,
    #: leave and (rarely) a lease renewal, so readers reload it only when someone comes or goes.
    members: OOBTree | None = None

    def __init__(self, name: str, created: float = 0.0) -> None:
        self.name = name
        self.created = created
        self._new_trees()

    def _new_trees(self) -> None:
        self.streams = OOBTree()

    def append(self, writer: str, message: Message) -> Message:
        """Add ``message`` to the end of ``writer``'s stream and return it as stored.

        Its time is moved just past the writer's previous message if the writer's clock went back,
        so that each stream's key order is its commit order. A message that is already the
        stream's last (a retried send whose first commit did happen) is left alone.
        Changes only the writer's own stream (and the ``streams`` index on its first message).
        """
        assert self.streams is not None
        stream = self.streams.get(writer)
        if stream is None:
            stream = self.streams[writer] = OOBTree()
        last: tuple[float, str] | None = stream.maxKey() if stream else None
        if last is not None and last[1] == message.id:
            return Message.from_record(stream[last])
        if last is not None and message.time <= last[0]:
            message = dataclasses.replace(message, time=math.nextafter(last[0], math.inf))
        stream[message.key] = message.to_record()
        return message

    def records(self) -> Iterator[tuple[Any, Any]]:
        """Every ``(key, record)`` of the room in time order (reads everything: for exports)."""
        assert self.streams is not None
        return heapq.merge(*(stream.items() for stream in self.streams.values()), key=lambda item: item[0])

    def message_count(self) -> int:
        """How many messages the room holds; walks every bucket of every stream (for a teacher's reset)."""
        assert self.streams is not None
        return sum(len(stream) for stream in self.streams.values())

    def join(self, user: str, writer: str, when: float) -> None:
        """Say that ``writer``'s client shows this room to ``user`` from ``when`` (or still does)."""
        if self.members is None:
            self.members = OOBTree()
        self.members[(user, writer)] = when

    def leave(self, user: str, writer: str) -> None:
        if self.members is not None and (user, writer) in self.members:
            del self.members[(user, writer)]

    def presence_entries(self) -> list[tuple[str, float]]:
        """``(user, time joined or renewed)`` of every member, old heartbeats included; checked."""
        entries = [
            (key[0], when)
            for key, when in (self.members.items() if self.members is not None else ())
            if isinstance(key, tuple) and len(key) == 2
        ]
        entries += self.presence.items() if self.presence is not None else ()
        return [(user, when) for user, when in entries if isinstance(user, str) and isinstance(when, float)]

    def present(self, since: float) -> list[str]:
        return sorted({user for user, when in self.presence_entries() if when >= since})

    def clear(self) -> None:
        """Forget every message (a teacher's reset); readers notice through :attr:`epoch`."""
        self._new_trees()
        self.epoch += 1

    def __repr__(self) -> str:
        return f"<Room {self.name!r}>"


class Changes:
    """The oids committed since a :class:`ChatSession` last looked: what it must read again.

    Its client fills it (on ZEO's networking thread, or the committing thread for its own
    commits) with the oids of each transaction, or marks everything changed (first use, a
    (re)connect, which makes ZEO drop the whole cache). The session takes the marks *before* it
    begins a transaction, so that a commit arriving during its read is still there for the next
    one. ``exact=False`` is for storages whose notices name no objects (in-process ``ZODB.DB``,
    PostgreSQL): then every read is a full one, as if everything changed.
    """

    #: More pending oids than this and the set is dropped for "everything changed": bounded memory
    #: for a session that is never read (a widget's sender, a room nobody looks at).
    MAX_PENDING = 10_000

    def __init__(self, exact: bool = True) -> None:
        self.exact = exact
        self._lock = threading.Lock()
        self._all = True
        self._oids: set[bytes] = set()

    def mark(self, oids: Iterable[bytes]) -> None:
        if not self.exact:  # every take() says "everything" anyway
            return
        with self._lock:
            if not self._all:
                self._oids.update(oids)
                if len(self._oids) > self.MAX_PENDING:
                    self._mark_all_locked()

    def mark_all(self) -> None:
        with self._lock:
            self._mark_all_locked()

    def _mark_all_locked(self) -> None:
        self._all, self._oids = True, set()

    def take(self) -> tuple[bool, set[bytes]]:
        """``(everything changed, changed oids)`` since the last take; clears them."""
        with self._lock:
            everything, oids = self._all or not self.exact, self._oids
            self._all, self._oids = False, set()
            return everything, oids


def _children(node: Any) -> list[Any]:
    """The persistent children of a BTree node, from its state, in key order (none for a bucket)."""
    if not type(node).__name__.endswith("BTree"):
        return []
    state = node.__getstate__()
    if not state or len(state) != 2:  # empty, or a small tree holding its one bucket inline
        return []
    return [child for child in state[0][::2] if isinstance(child, Persistent)]


def _edge_oids(tree: Any) -> list[bytes]:
    """Oids of a BTree's root and its right edge: the objects an append at the end changes."""
    oids, node = [], tree
    for _ in range(32):  # deeper than any real tree: bounded even for a crafted cycle
        if node is None or node._p_oid is None:
            break
        oids.append(node._p_oid)
        children = _children(node)
        node = children[-1] if children else None
    return oids


def index_oids(tree: Any, limit: int = 10_000) -> list[bytes]:
    """Oids of every node of a small BTree (the streams index, the members): any insert changes one."""
    oids: list[bytes] = []
    todo = [tree] if tree is not None else []
    while todo and len(oids) < limit:
        node = todo.pop()
        if node._p_oid is not None:
            oids.append(node._p_oid)
        todo.extend(_children(node))
    return oids


def _prefetch_edges(room: Room, trees: list[Any], levels: int = 4) -> None:
    """Ask ZEO for both ends of each stream in one pipelined round trip per tree level.

    History reads the newest buckets and the first keys of many streams; loading them one by one
    costs a round trip each (about 60 for 20 writers). ``Connection.prefetch`` sends the loads
    together instead.
    """
    jar = room._p_jar
    if jar is None or not hasattr(jar.db().storage, "prefetch"):  # in-process storages: no round trips
        return
    nodes = [tree for tree in trees if tree is not None]
    for _ in range(levels):
        if not nodes:
            return
        jar.prefetch(nodes)
        children: list[Persistent] = []
        for node in nodes:
            below = _children(node)
            children.extend({id(c): c for c in (below[:1] + below[-1:])}.values())
        nodes = children


def rooms_of(conn: Connection) -> OOBTree:
    """The ``name -> Room`` tree of a database, or a new one (the caller commits)."""
    root = conn.root()
    rooms = root.get(ROOMS_KEY)
    if rooms is None:
        rooms = root[ROOMS_KEY] = OOBTree()
    return rooms


@dataclass(frozen=True)
class SendPolicy:
    """How hard a send tries before it gives up and raises :class:`ZChatSendError`."""

    #: Seconds a send may take in all, server outages included.
    timeout: float = 10.0
    #: Conflict retries before giving up (each is a fresh transaction).
    max_conflicts: int = 50
    #: Upper bound of the random pause after a conflict, doubled each time from ``backoff / 32``.
    backoff: float = 0.05


class SessionHost(Protocol):
    """What a :class:`ChatSession` needs from its client; ``ChatClient`` implements it."""

    user: str
    writer: str
    max_text_bytes: int
    policy: SendPolicy
    clock: Callable[[], float]
    #: Held while a message is committed: one send at a time per writer.
    send_lock: threading.Lock

    def connection(self) -> tuple[transaction.TransactionManager, Connection]:
        """This thread's transaction manager and connection."""

    def generation(self) -> int:
        """A counter bumped on every invalidation, (dis)connect and commit of this client."""

    def wait_for_change(self, generation: int, timeout: float) -> bool:
        """Block until :meth:`generation` differs from ``generation``, or ``timeout`` passes."""

    def wait_connected(self, timeout: float) -> bool:
        """Block until the client is connected or ``timeout`` passes; returns whether it is."""

    def is_connected(self) -> bool: ...

    def track_changes(self) -> Changes:
        """A new :class:`Changes` that this host fills with every oid committed from now on."""

    def report(self, kind: str, **details: Any) -> None:
        """Tell observers (the inspector) about a commit or a poll."""

    @property
    def closed(self) -> bool: ...

    @property
    def address_text(self) -> str: ...


class ChatSession:
    """A reader and writer of one room, with its own cursor.

    Each ChatSession delivers every message of its room exactly once through
    :meth:`new_messages`, its own messages included, whatever the order of the senders' clocks.
    A session may be used from several threads: each thread reads through its own connection.
    """

    def __init__(self, host: SessionHost, room: str, *, backlog: int | None = None) -> None:
        self._host = host
        self.room = check_room_name(room)
        #: ``writer -> key of the last message delivered``; plain memory, never persisted.
        self._cursor: dict[str, tuple[float, str]] = {}
        self._epoch: int | None = None
        self._backlog = backlog
        self._lock = threading.RLock()
        #: Records that failed validation or could not be loaded, as ``(where, reason)``.
        self.skipped: list[tuple[str, str]] = []
        # What to read next time, from the oids the host said changed (see _absorb).
        self._changes: Changes | None = None  # made on the first read: a sender never drains it
        self._rescan = True  # the room or its streams index changed: look at every stream
        self._stale: set[str] = set()  # writers whose stream changed
        self._presence_stale = True
        self._index_oids: set[bytes] = set()  # the room and its streams index
        self._stream_oids: dict[bytes, str] = {}  # a stream's root and right edge -> writer
        self._writer_oids: dict[str, list[bytes]] = {}
        self._presence_oids: set[bytes] = set()
        self._present: list[tuple[str, float]] | None = None

    # -- reading -------------------------------------------------------------------------

    def _room(self) -> Room:
        """Begin a transaction on this thread's connection and return the room, creating it."""
        tm, conn = self._host.connection()
        tm.begin()
        rooms = conn.root().get(ROOMS_KEY)
        room = rooms.get(self.room) if rooms is not None else None
        if room is None:
            self._create_room()
            tm.begin()
            room = conn.root()[ROOMS_KEY][self.room]
        return room

    def _create_room(self) -> None:
        self._commit(self._room_in, what=f"creating room {self.room!r}")

    def _room_in(self, conn: Connection) -> Room:
        """The room in ``conn``'s current transaction, added to it if missing (the caller commits)."""
        rooms = rooms_of(conn)
        room = rooms.get(self.room)
        if room is None:
            room = rooms[self.room] = Room(self.room, created=float(self._host.clock()))
        return room

    def new_messages(self, timeout: float | None = None) -> list[Message]:
        """Messages this session has not returned yet, oldest first.

        With ``timeout``, wait up to that many seconds for at least one, woken by the server's
        invalidations rather than by polling. Raises :class:`ZChatDisconnected` if the server is
        away (and, with ``timeout``, stays away that long).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._host.closed:
                raise ZChatConnectionError("the client of this session is closed")
            if not self._host.is_connected():
                remaining = 0.0 if deadline is None else deadline - time.monotonic()
                if not self._host.wait_connected(remaining):
                    raise disconnected(self._host.address_text)
            generation = self._host.generation()
            try:
                with server_boundary(self._host.address_text):
                    messages = self._poll()
            except ZChatDisconnected:  # the server went away mid-read: wait for it, if there is time
                if deadline is None or time.monotonic() >= deadline:
                    raise
                continue
            if messages or deadline is None:
                return messages
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._host.wait_for_change(generation, remaining)

    def _poll(self) -> list[Message]:
        started = time.perf_counter()
        _, conn = self._host.connection()
        loads = conn._load_count  # objects loaded by this thread's connection: what a poll costs
        found = self._collect()
        loads = conn._load_count - loads
        cost = time.perf_counter() - started
        self._host.report("poll", room=self.room, cost=cost, count=len(found), loads=loads)
        return found

    def _absorb(self) -> None:
        """Turn the oids committed since the last call into what to read; before any ``begin()``.

        What is noted here stays noted until a read succeeds: a read that fails (server away)
        loses nothing.
        """
        if self._changes is None:
            self._changes = self._host.track_changes()
        everything, oids = self._changes.take()
        if everything:
            self._rescan = self._presence_stale = True
            return
        for oid in oids:
            writer = self._stream_oids.get(oid)
            if writer is not None:
                self._stale.add(writer)
            if oid in self._index_oids:
                self._rescan = True
            if oid in self._presence_oids:
                self._presence_stale = True

    def _collect(self) -> list[Message]:
        with self._lock:
            self._absorb()
            if not (self._rescan or self._stale):
                return []  # nothing of this room changed: no transaction, no load
            room = self._room()
            assert room.streams is not None
            if self._epoch != room.epoch:
                self._cursor.clear()
                self._stream_oids.clear()
                self._writer_oids.clear()
                self._rescan = True
                self._epoch = room.epoch
                if self._backlog is not None:
                    for writer, stream in room.streams.items():
                        last = self._last_key(writer, stream)
                        if last is not None:
                            self._cursor[writer] = last
                    backlog, self._backlog = self._backlog, None
                    first = self._history(room, backlog, None)
                    self._map_room(room, list(room.streams.items()))
                    return first
            rescan = self._rescan
            if rescan:
                streams = list(room.streams.items())
            else:
                streams = [(w, s) for w in sorted(self._stale) if (s := room.streams.get(w)) is not None]
            found: list[Message] = []
            cursor = dict(self._cursor)
            for writer, stream in streams:
                found.extend(self._read_stream(stream, writer, cursor))
            # Only now: an outage mid-read must neither skip nor repeat anything.
            self._cursor = cursor
            self._map_streams(streams)
            if rescan:
                self._map_room(room, streams)
            self._rescan = False
            self._stale.clear()
            found.sort(key=lambda m: m.key)
            return found

    def _map_room(self, room: Room, streams: list[tuple[str, Any]]) -> None:
        """Note the oids of the room and its streams index: a change there means a rescan."""
        self._index_oids = {oid for oid in [room._p_oid, *index_oids(room.streams)] if oid is not None}
        self._map_streams(streams)
        self._rescan = False
        self._stale.clear()

    def _map_streams(self, streams: list[tuple[str, Any]]) -> None:
        """Note each stream's root and right edge: the next append to it changes one of them."""
        for writer, stream in streams:
            for oid in self._writer_oids.pop(writer, ()):
                self._stream_oids.pop(oid, None)
            try:
                oids = _edge_oids(stream)
            except transaction.interfaces.TransientError:
                raise
            except Exception as exc:  # a crafted node: read it again on every rescan
                self._skip(f"stream {writer!r:.40}", exc)
                continue
            self._writer_oids[writer] = oids
            for oid in oids:
                self._stream_oids[oid] = writer

    def _last_key(self, writer: str, stream: Any) -> tuple[float, str] | None:
        try:
            return stream.maxKey() if stream else None
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:
            self._skip(f"end of stream {writer!r:.40}", exc)
            return None

    def _read_stream(self, stream: Any, writer: str, cursor: dict[str, tuple[float, str]]) -> list[Message]:
        """The messages of ``stream`` after ``cursor[writer]``; moves ``cursor[writer]`` past them."""
        after = cursor.get(writer)
        try:
            entries = list(stream.items(after, excludemin=after is not None))
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:  # a crafted or broken record: report it, keep the others going
            self._skip(f"stream {writer!r:.40} after {after}", exc)
            return []
        if entries:
            cursor[writer] = entries[-1][0]  # past bad records too: each is reported once
        found = (self._check(record, where=f"{writer}@{key!r:.60}") for key, record in entries)
        return [m for m in found if m is not None]

    def _check(self, record: object, where: str) -> Message | None:
        try:
            return Message.from_record(record, self._host.max_text_bytes)
        except ValueError as exc:
            self._skip(where, exc)
            return None

    def _skip(self, where: str, exc: BaseException) -> None:
        while exc.__cause__ is not None and not str(exc):  # StateLoadError says nothing itself
            exc = exc.__cause__
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("room %r: skipped unreadable record %s (%s)", self.room, where, reason)
        self.skipped.append((where, reason))

    def history(self, n: int = 200, before: Message | None = None) -> list[Message]:
        """The last ``n`` messages by time (before ``before``, if given), oldest first.

        Reads O(log N + n) of the tree, not all of it. Does not move the cursor.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"history(n) needs an int n >= 0, not {n!r}")
        with self._lock, server_boundary(self._host.address_text):
            return self._history(self._room(), n, before)

    def _ends(self, room: Room) -> list[tuple[str, Any, float, float]]:
        """``(writer, stream, first time, last time)`` of each non-empty stream, checked."""
        assert room.streams is not None
        streams = list(room.streams.items())
        if self._host.is_connected():  # else the loads fail in ZEO's thread, where nobody hears them
            _prefetch_edges(room, [stream for _, stream in streams])
        ends = []
        for writer, stream in streams:
            try:
                if not stream:
                    continue
                first, last = stream.minKey(), stream.maxKey()
                if not (
                    isinstance(first[0], float) and isinstance(last[0], float) and math.isfinite(last[0])
                ):
                    raise ValueError(f"bad keys {first!r:.40} .. {last!r:.40}")
            except transaction.interfaces.TransientError:
                raise
            except Exception as exc:
                self._skip(f"ends of stream {writer!r:.40}", exc)
                continue
            ends.append((writer, stream, first[0], last[0]))
        return ends

    def _history(self, room: Room, n: int, before: Message | None) -> list[Message]:
        if n == 0:
            return []
        ends = self._ends(room)
        if not ends:
            return []
        top: tuple[float, str] | None = before.key if before is not None else None
        start = max(last for _, _, _, last in ends)
        if top is not None:
            start = min(start, top[0])
        oldest = min(first for _, _, first, _ in ends)
        window = 1.0
        while True:
            # Only the streams that have messages between low and top; each read is O(log N).
            low = start - window
            items: list[tuple[Any, Any]] = []
            for writer, stream, first, last in ends:
                if last < low or (top is not None and first > top[0]):
                    continue
                try:
                    items.extend(stream.items((low,), top, excludemax=top is not None))
                except transaction.interfaces.TransientError:
                    raise
                except Exception as exc:
                    self._skip(f"history of {writer!r:.40}", exc)
            if len(items) >= n or low < oldest:
                break
            # Widen the window to where n messages should be at the density just seen.
            window *= max(2.0, 1.2 * n / len(items)) if items else 4.0
        items.sort(key=lambda item: item[0])
        found = [self._check(record, where=f"{key!r:.60}") for key, record in items[-n:]]
        return [m for m in found if m is not None]

    # -- writing -------------------------------------------------------------------------

    def add_message(self, text: str) -> Message:
        """Commit ``text`` as a new message from this client's user and return it.

        Conflicts and server outages are retried within ``SendPolicy.timeout``; a retry after an
        outage never duplicates the message, even when the first commit's answer was lost.
        Raises :class:`InvalidMessageError` for bad text and :class:`ZChatSendError` when the
        message could not be committed in time (it was then not sent).
        """
        text = check_text(text, self._host.max_text_bytes)
        message = Message(uuid.uuid4().hex, self._host.user, text, float(self._host.clock()))
        return self.post(message)

    def post(self, message: Message) -> Message:
        """Commit an already built message and return it as stored (idempotent, like a retry)."""
        writer = self._host.writer
        stored: list[Message] = []

        def append(conn: Connection) -> None:
            stored[:] = [self._room_in(conn).append(writer, message)]

        # One send at a time per writer: each stream's key order must be its commit order.
        with self._host.send_lock:
            self._commit(append, what=f"sending to room {self.room!r}")
        return stored[0]

    def _commit(self, change: Callable[[Connection], object], what: str) -> None:
        commit(self._host, change, what=what, room=self.room)

    # -- presence ------------------------------------------------------------------------

    def join(self) -> None:
        """Say that this client shows the room to its user now; also renews the lease (rarely)."""
        user, writer, now = self._host.user, self._host.writer, float(self._host.clock())

        def enter(conn: Connection) -> None:
            self._room_in(conn).join(user, writer, now)

        self._commit(enter, what=f"joining {self.room!r}")

    #: The name of :meth:`join` before presence was a lease: it still works.
    heartbeat = join

    def leave(self) -> None:
        """Say that this client no longer shows the room (a widget closes or switches room)."""
        user, writer = self._host.user, self._host.writer

        def exit_(conn: Connection) -> None:
            self._room_in(conn).leave(user, writer)

        self._commit(exit_, what=f"leaving {self.room!r}")

    def present(self, within: float = 90.0) -> list[str]:
        """Users who joined this room, or renewed their lease, at most ``within`` seconds ago.

        Reads the room's presence trees only when they changed since the last call.
        """
        with self._lock, server_boundary(self._host.address_text):
            self._absorb()
            if self._presence_stale or self._present is None:
                room = self._room()
                self._present = room.presence_entries()
                # The room too: a first members tree is set on it.
                oids = [room._p_oid, *index_oids(room.members), *index_oids(room.presence)]
                self._presence_oids = {oid for oid in oids if oid is not None}
                self._presence_stale = False
            since = float(self._host.clock()) - within
            return sorted({user for user, when in self._present if when >= since})

    def __repr__(self) -> str:
        return f"<ChatSession room={self.room!r} user={self._host.user!r}>"


def commit(
    host: SessionHost,
    change: Callable[[Connection], _T],
    *,
    what: str,
    room: str = "",
    undone: str = "the message was not sent",
) -> _T:
    """Run ``change(conn)`` in a fresh transaction of this thread and commit it; return its result.

    The one retry loop of every write: conflicts are retried with a random pause, and a server
    that is away is waited for, within ``host.policy``; then :class:`ZChatSendError` says ``what``
    failed and ``undone``. ``change`` must be safe to run again: after an outage the first commit
    may or may not have happened.
    """
    policy = host.policy
    deadline = time.monotonic() + policy.timeout
    tm, conn = host.connection()
    conflicts = 0
    last_error: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not host.wait_connected(remaining):
            raise ZChatSendError(
                f"{what} failed: no answer from the ZEO server at {host.address_text} "
                f"within {policy.timeout:g} s; {undone}. Check the server (`zchat-nb status`) "
                "and try again"
            ) from last_error
        try:
            started = time.perf_counter()
            tm.begin()
            result = change(conn)
            tm.commit()
            latency = time.perf_counter() - started
            host.report("commit", room=room, what=what, latency=latency, conflicts=conflicts)
            return result
        except ConflictError as exc:
            tm.abort()
            conflicts += 1
            last_error = exc
            if conflicts > policy.max_conflicts:
                raise ZChatSendError(
                    f"{what} failed: {conflicts} write conflicts in a row; {undone}. Try again"
                ) from exc
            pause = random.uniform(0, min(policy.backoff, policy.backoff * 2**conflicts / 32))
            time.sleep(pause)  # a random pause so that conflicting writers stop colliding
        except transaction.interfaces.TransientError as exc:
            # ClientDisconnected: the commit may or may not have happened; retrying is safe
            # because `change` is.
            tm.abort()
            last_error = exc
        except BaseException:
            tm.abort()
            raise
