"""The chat model: rooms stored in ZODB, and the per-reader session that reads and writes them.

The seed (Kuchling's ``chatter.py``) kept one BTree keyed by ``time.time()`` and a ``_v_last_time``
cursor. That cursor is lost whenever the object is ghostified, and it never delivers a message
stamped earlier but committed later than one already seen; and every writer appending to the end of
one shared BTree makes bucket splits, which cannot be merged, conflict all the time under load.

Here each writer (one per :class:`~zchat_nb.client.ChatClient`) appends to a stream of its own,
``Room.streams[writer]``, keyed by ``(time, id)``, where times only grow: a writer's key order is
its commit order. A reader's cursor is the last key it was given from each stream, held by the
:class:`ChatSession` in ordinary memory, never on a persistent object. Writers touch only their own
stream, their own key of ``Room.heads`` and the ``Room.count`` counter, all of which merge, so
concurrent senders do not conflict. History merges the recent ends of the streams by time.
Records are plain tuples of ``str`` and ``float`` so that the unpickling allow-list stays tiny.

This module knows nothing of ZEO, widgets or IPython: a :class:`ChatSession` gets its connection,
its wake-ups and its clock from a :class:`SessionHost` (``zchat_nb.client.ChatClient`` in practice).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import logging
import math
import os
import random
import reprlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.POSException import ConflictError, POSKeyError, StorageError, Unsupported

from .amend import (
    DELETE,
    EDIT,
    EVENT_TAG,
    MAX_EMOJI_PER_MESSAGE,
    MESSAGE_TAG,
    NO_REACTIONS,
    REACT,
    REACTIONS,
    UNREACT,
    Event,
    Identity,
    Seen,
    canonical,
    check_emoji,
    check_seal,
    fold,
    index_entry,
    mentions_in,
    permission_error_text,
    refusal,
)
from .exceptions import (
    AttachmentError,
    InvalidMessageError,
    ZChatConnectionError,
    ZChatDisconnected,
    ZChatPermissionError,
    ZChatSendError,
    disconnected,
    server_boundary,
)

if TYPE_CHECKING:
    from ZODB.Connection import Connection

__all__ = [
    "DEFAULT_MAX_TEXT_BYTES",
    "Attachment",
    "ChatSession",
    "Message",
    "Room",
    "SendPolicy",
    "SessionHost",
    "commit",
    "read_attachment",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_TEXT_BYTES = 64 * 1024
MAX_AUTHOR_CHARS = 64
MAX_ROOM_CHARS = 64
#: Unreadable records a session keeps in ``skipped`` (the newest), and how many it logs.
MAX_SKIPPED = 100
_LOGGED_SKIPS = 10
_MAX_REASON = 300
#: Rounds of history's window search (the window at least doubles each round).
_MAX_WINDOW_ROUNDS = 200
_ID_CHARS = 32
_ID_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
ROOMS_KEY = "zchat_nb.rooms"

_T = TypeVar("_T")
_Item = TypeVar("_Item", "Message", Event)
BLOBS_KEY = "zchat_nb.blobs"
#: Attachments one message may carry.
MAX_ATTACHMENTS = 4
_MAX_ATTACHMENT_NAME = 200
_MAX_ATTACHMENT_KEY = 100


class Attachment(NamedTuple):
    """What a message says about one of its attachments; the bytes are in a ZODB blob.

    ``key`` finds the blob: ``root[BLOBS_KEY][writer][key]``, where ``writer`` is the key's first
    part (``writer/message id/index``). ``size`` and ``mime`` are what the writer claims: readers
    check both against the blob before they trust it.
    """

    name: str
    mime: str
    size: int
    key: str

    @property
    def writer(self) -> str:
        return self.key.partition("/")[0]

    @classmethod
    def check(cls, value: object) -> Attachment:
        """A stored attachment entry, checked (plain str and int: the allow-list stays tiny)."""
        if not (isinstance(value, tuple) and len(value) == 4):
            raise ValueError(f"attachment is not a 4-tuple: {type(value).__name__}")
        name, mime, size, key = value
        if not (isinstance(name, str) and 0 < len(name) <= _MAX_ATTACHMENT_NAME):
            raise ValueError(f"bad attachment name {name!r:.60}")
        if not (isinstance(mime, str) and 0 < len(mime) <= 40):
            raise ValueError(f"bad attachment type {mime!r:.60}")
        if not (type(size) is int and 0 <= size < 2**40):
            raise ValueError(f"bad attachment size {size!r:.40}")
        if not (isinstance(key, str) and 0 < len(key) <= _MAX_ATTACHMENT_KEY and key.count("/") == 2):
            raise ValueError(f"bad attachment key {key!r:.60}")
        return cls(name, mime, size, key)


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message in its current state; immutable.

    ``id`` is made by the sender and unique, ``time`` is the sender's clock (seconds since the epoch).
    Edits, deletes and reactions (:mod:`zchat_nb.amend`) are applied by the reader: ``text`` is the
    latest accepted edit, ``edited`` its time; a deleted message keeps its place with ``text ""``.
    ``verified`` is True only when the message is signed by a classroom certificate whose name is
    the author (see :mod:`zchat_nb.signing`).
    """

    id: str
    author: str
    text: str
    time: float
    #: The id of the message this one answers.
    reply_to: str | None = None
    edited: float | None = None
    deleted: bool = False
    #: ``emoji -> users who reacted with it`` (read-only).
    reactions: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: NO_REACTIONS, hash=False)
    verified: bool = False
    #: The stream (client) that wrote it: edits and deletes name it to find the message.
    writer: str = field(default="", repr=False, compare=False)
    #: Fingerprint of the signing certificate and the signature, or "" (see :mod:`zchat_nb.signing`).
    signer: str = field(default="", repr=False, compare=False)
    signature: str = field(default="", repr=False, compare=False)
    #: Pictures and tables shared with the message: ``(name, mime type, size, key)`` each.
    attachments: tuple[Attachment, ...] = ()

    @property
    def key(self) -> tuple[float, str]:
        """The message's key in its writer's stream: ordered by time, ties broken by id."""
        return (self.time, self.id)

    @property
    def mentions(self) -> tuple[str, ...]:
        """The ``@name``s in the text, each once."""
        return mentions_in(self.text) if "@" in self.text else ()

    def to_record(self) -> tuple[Any, ...]:
        """A 4-tuple as before replies and signatures existed (old readers still read it), or tagged."""
        if self.reply_to is None and not self.signer and not self.attachments:
            return (self.id, self.author, self.text, self.time)
        return (*self.signed_fields(), self.signature)

    def signed_fields(self) -> tuple[Any, ...]:
        fields = (MESSAGE_TAG, self.id, self.author, self.text, self.time, self.reply_to or "", self.signer)
        if self.attachments:  # signed with the rest; records without any keep their old form
            return (*fields, tuple(tuple(a) for a in self.attachments))
        return fields

    @classmethod
    def from_record(cls, record: object, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> Message:
        """Check a stored record written by some client and turn it into a Message.

        Raises ``ValueError`` naming what is wrong: another client may have written anything.
        """
        reply_to, signer, signature = "", "", ""
        attachments: tuple[Attachment, ...] = ()
        if isinstance(record, tuple) and len(record) == 9 and record[0] == MESSAGE_TAG:
            entries = record[7]  # with attachments: signed, so before the signature
            record = record[:7] + record[8:]
            if not (isinstance(entries, tuple) and 0 < len(entries) <= MAX_ATTACHMENTS):
                raise ValueError(f"attachments are not a tuple of 1 to {MAX_ATTACHMENTS}")
            attachments = tuple(Attachment.check(entry) for entry in entries)
        if isinstance(record, tuple) and len(record) == 8 and record[0] == MESSAGE_TAG:
            _, id_, author, text, when, reply_to, signer, signature = record
            if reply_to != "" and not (isinstance(reply_to, str) and 0 < len(reply_to) <= _ID_CHARS):
                raise ValueError(f"bad reply_to {reply_to!r:.40}")
            signer, signature = check_seal(signer, signature)
        elif isinstance(record, tuple) and len(record) == 4:
            id_, author, text, when = record
        else:
            raise ValueError(f"record is not a 4-tuple: {type(record).__name__}")
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
        return cls(
            id_,
            author,
            text,
            when,
            reply_to=reply_to or None,
            signer=signer,
            signature=signature,
            attachments=attachments,
        )


def parse_record(record: object, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> Message | Event:
    """A stream record as a Message or an :class:`~zchat_nb.amend.Event`; ``ValueError`` if neither."""
    if isinstance(record, tuple) and record and record[0] == EVENT_TAG:
        return Event.from_record(record, max_text_bytes, MAX_AUTHOR_CHARS)
    return Message.from_record(record, max_text_bytes)


def _parse_event(record: object) -> Event:
    return Event.from_record(record, DEFAULT_MAX_TEXT_BYTES, MAX_AUTHOR_CHARS)


def is_event_record(record: object) -> bool:
    """Cheap test used to count messages without parsing them."""
    return isinstance(record, tuple) and bool(record) and record[0] == EVENT_TAG


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


def check_message_id(id_: object) -> str:
    """Return ``id_`` if it can be a message id, a new random id if it is None, else raise."""
    if id_ is None:
        return uuid.uuid4().hex
    if not (isinstance(id_, str) and 0 < len(id_) <= _ID_CHARS and all(c in _ID_ALPHABET for c in id_)):
        raise InvalidMessageError(
            f"message id must be 1 to {_ID_CHARS} letters, digits, '-' or '_', not {id_!r:.60}; "
            "leave it out to get a new one"
        )
    return id_


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
    #: ``writer -> (count, first time, last time, last id)``. Writers change only their own key,
    #: so concurrent commits merge.
    heads: OOBTree | None = None
    #: Number of messages in this epoch; a reader with as many delivered is idle.
    count: Length | None = None
    #: ``user -> last heartbeat time``; one key per user, so concurrent heartbeats merge.
    presence: OOBTree | None = None
    #: ``writer -> OOBTree(target key -> records)``: each writer's latest edit, delete and reactions
    #: per message it amended (see :mod:`zchat_nb.amend`); only that writer changes its tree.
    amends: OOBTree | None = None
    #: ``certificate fingerprint -> PEM`` of the certificates that signed records here.
    certs: OOBTree | None = None

    def __init__(self, name: str, created: float = 0.0) -> None:
        self.name = name
        self.created = created
        self._new_trees()

    def _new_trees(self) -> None:
        self.streams = OOBTree()
        self.heads = OOBTree()
        self.count = Length()
        if self.amends is not None:
            self.amends = OOBTree()

    def append(self, writer: str, message: _Item, seal: Callable[[_Item], _Item] | None = None) -> _Item:
        """Add ``message`` to the end of ``writer``'s stream and return it as stored.

        Its time is moved just past the writer's previous message if the writer's clock went back,
        so that each stream's key order is its commit order. A message whose id is already in the
        stream (a retried send whose first commit did happen, even with later sends since) is left
        alone.
        """
        assert self.streams is not None and self.heads is not None and self.count is not None
        stream = self.streams.get(writer)
        if stream is None:
            stream = self.streams[writer] = OOBTree()
        count, first, last, last_id = self.heads.get(writer, (0, message.time, -math.inf, ""))
        if last_id == message.id:
            return parse_record(stream[(last, last_id)], 2**30)  # type: ignore[return-value]
        stored = _find_retried(stream, message)
        if stored is not None:
            return stored
        if message.time <= last:
            message = dataclasses.replace(message, time=math.nextafter(last, math.inf))
        if seal is not None:  # signs the record with its final time
            message = seal(message)
        stream[message.key] = message.to_record()
        self.heads[writer] = (count + 1, first, message.time, message.id)
        self.count.change(1)
        return message

    # -- amendments (edits, deletes, reactions; see zchat_nb.amend) --------------------------

    def amend(self, writer: str, event: Event, seal: Callable[[Event], Event] | None = None) -> Event:
        """Append ``event`` to ``writer``'s stream and note it in ``writer``'s index; returns it as stored.

        Idempotent like :meth:`append`: a retried commit that did happen changes nothing.
        """
        stored = self.append(writer, event, seal)
        if self.amends is None:
            self.amends = OOBTree()
        index = self.amends.get(writer)
        if index is None:
            index = self.amends[writer] = OOBTree()
        previous = index.get(stored.target_key, ())
        # Rewriting the entry is idempotent too: the same event lands in the same slot.
        index[stored.target_key] = index_entry(
            previous if isinstance(previous, tuple) else (), stored, _parse_event
        )
        return stored

    def amendments(self, keys: list[tuple[float, str]]) -> Iterator[tuple[str, tuple[float, str], object]]:
        """``(writer, key, index value)`` for every writer's entry on any of ``keys`` (sorted).

        A few keys are looked up one by one; a window of keys is one range read per writer, so
        history finds the amendments of 200 messages in O(writers * log N).
        """
        if self.amends is None or not keys:
            return
        wanted = set(keys)
        for writer, index in self.amends.items():
            if len(keys) <= 4:
                for key in keys:
                    value = index.get(key)
                    if value is not None:
                        yield writer, key, value
            else:
                for key, value in index.items(keys[0], keys[-1]):
                    if key in wanted:
                        yield writer, key, value

    def add_cert(self, fingerprint: str, pem: str) -> None:
        """Store the certificate that signs a writer's records, keyed by the SHA-256 of its PEM text."""
        if self.certs is None:
            self.certs = OOBTree()
        stored = self.certs.get(fingerprint)
        # Replace anything else a client put under this key first: it would hide a real certificate.
        if not (isinstance(stored, str) and hashlib.sha256(stored.encode()).hexdigest() == fingerprint):
            self.certs[fingerprint] = pem

    def cert(self, fingerprint: str) -> object:
        return self.certs.get(fingerprint) if self.certs is not None else None

    def records(self) -> Iterator[tuple[Any, Any]]:
        """Every ``(key, record)`` of the room in time order (reads everything: for exports)."""
        assert self.streams is not None
        return heapq.merge(*(stream.items() for stream in self.streams.values()), key=lambda item: item[0])

    def beat(self, user: str, when: float) -> None:
        if self.presence is None:
            self.presence = OOBTree()
        self.presence[user] = when

    def present(self, since: float) -> list[str]:
        """Users whose heartbeat is at least ``since``; entries that are not (str, float) are ignored."""
        if self.presence is None:
            return []
        return sorted(
            user
            for user, when in self.presence.items()
            if type(user) is str and type(when) is float and math.isfinite(when) and when >= since
        )

    def clear(self) -> None:
        """Forget every message (a teacher's reset); readers notice through :attr:`epoch`."""
        self._new_trees()
        self.epoch += 1

    def __repr__(self) -> str:
        return f"<Room {self.name!r}>"


#: Entries of a stream looked at for a retried message's id (see :func:`_find_retried`).
RETRY_WINDOW = 256


def _find_retried(stream: OOBTree, message: _Item) -> _Item | None:
    """The stored copy of ``message`` if an earlier attempt committed it, else None.

    A retry carries the first attempt's time and id; the stored key is that key, or a later time
    when the writer's clock had gone back. So only keys from ``message.key`` on can match, and a
    new message (later than everything stored) costs one tree descent. At most
    :data:`RETRY_WINDOW` keys are looked at, so a bogus early time cannot make a send scan the
    whole stream.
    """
    for count, key in enumerate(stream.keys(min=message.key)):
        if count >= RETRY_WINDOW:
            break
        if key[1] == message.id:
            return parse_record(stream[key], 2**30)  # type: ignore[return-value]  # a message or an event
    return None


@dataclass(frozen=True)
class _Head:
    """A writer's entry in ``Room.heads``, checked."""

    count: int
    first: float
    last: float
    last_id: str

    @property
    def last_key(self) -> tuple[float, str]:
        return (self.last, self.last_id)

    @classmethod
    def check(cls, value: object) -> _Head:
        if not (isinstance(value, tuple) and len(value) == 4):
            raise ValueError(f"head is not a 4-tuple: {type(value).__name__}")
        count, first, last, last_id = value
        if not (isinstance(count, int) and count > 0 and isinstance(last_id, str)):
            raise ValueError(f"bad head {_capped(value)}")
        if not (
            isinstance(first, float)
            and isinstance(last, float)
            and math.isfinite(first)
            and math.isfinite(last)
            and first <= last
        ):  # an infinite or NaN time would make history's window search run for ever
            raise ValueError(f"bad head times {_capped(value)}")
        return cls(count, first, last, last_id)


def _prefetch_right_edges(room: Room, trees: list[Any], levels: int = 4) -> None:
    """Ask ZEO for the recent end of each stream in one pipelined round trip per tree level.

    History reads the newest buckets of many streams; loading them one by one costs a round trip
    each (about 60 for 20 writers). ``Connection.prefetch`` sends the loads together instead.
    Uses the BTree node state: ``(child0, key1, child1, ...)`` then the first bucket; a small tree
    keeps its one bucket inline instead.
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
            state = node.__getstate__() if type(node).__name__.endswith("BTree") else None
            if state and len(state) == 2 and isinstance(state[0][-1], Persistent):  # an inner node
                children.append(state[0][-1])
        nodes = children


def _capped(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; a repr that fails (too deep, crafted) says so."""
    try:
        text = reprlib.repr(value)
    except Exception as exc:
        text = f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
    return text[:limit]


def _epoch_of(room: Room) -> int | str:
    """The room's epoch if it is an int; anything else (NaN never equals itself) as a stable str."""
    epoch = room.epoch
    return epoch if type(epoch) is int else f"bad epoch {_capped(epoch)}"


def find_room(rooms: object, name: str) -> Room | None:
    """``rooms[name]`` or None; a tree another client filled with keys of other types is searched."""
    if rooms is None:
        return None
    if not isinstance(rooms, OOBTree):
        raise TypeError(f"the rooms tree is a {type(rooms).__name__}, not an OOBTree")
    try:
        return rooms.get(name)
    except TypeError:  # a key that does not compare with str: look at the str keys one by one
        for key, room in rooms.items():
            if type(key) is str and key == name:
                return room
        return None


def room_names(rooms: object) -> list[str]:
    """The names in a rooms tree, skipping keys that are not room names (another client's doing)."""
    if not isinstance(rooms, OOBTree):
        return []
    return [key for key in rooms if type(key) is str and 0 < len(key) <= MAX_ROOM_CHARS]


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


class Signer(Protocol):
    """Signs what a client writes with its classroom certificate (``zchat_nb.signing.Signer``)."""

    name: str
    teacher: bool
    fingerprint: str
    cert_pem: str

    def sign(self, data: bytes) -> str: ...


class Verifier(Protocol):
    """Checks signatures against the class CA (``zchat_nb.signing.Verifier``)."""

    def identify(self, fingerprint: str, pem: object, data: bytes, signature: str) -> Identity | None:
        """Who signed ``data``, or None if the signature or the certificate does not check out."""


class SessionHost(Protocol):
    """What a :class:`ChatSession` needs from its client; ``ChatClient`` implements it."""

    user: str
    writer: str
    max_text_bytes: int
    #: Largest attachment shared or read, in bytes.
    max_attachment_bytes: int
    policy: SendPolicy
    clock: Callable[[], float]
    #: Held while a message is committed: one send at a time per writer.
    send_lock: threading.Lock
    #: Signs records (a TLS client with its certificate's key), or None.
    signer: Signer | None
    #: Verifies records against the class CA, or None (nothing is then verified).
    verifier: Verifier | None

    def connection(self) -> tuple[transaction.TransactionManager, Connection]:
        """This thread's transaction manager and connection."""

    def generation(self) -> int:
        """A counter bumped on every invalidation, (dis)connect and commit of this client."""

    def wait_for_change(self, generation: int, timeout: float) -> bool:
        """Block until :meth:`generation` differs from ``generation``, or ``timeout`` passes."""

    def wait_connected(self, timeout: float) -> bool:
        """Block until the client is connected or ``timeout`` passes; returns whether it is."""

    def is_connected(self) -> bool: ...

    def report(self, kind: str, **details: Any) -> None:
        """Tell observers (the inspector) about a commit or a poll."""

    @property
    def closed(self) -> bool: ...

    @property
    def address_text(self) -> str: ...

    @property
    def restart_hint(self) -> str:
        """How to bring the server back with its data ("" when there is nothing to say)."""


class ChatSession:
    """A reader and writer of one room, with its own cursor.

    Each ChatSession delivers every message of its room exactly once through
    :meth:`new_messages`, its own messages included, whatever the order of the senders' clocks.
    A session may be used from several threads: each thread reads through its own connection.
    """

    def __init__(self, host: SessionHost, room: str, *, backlog: int | None = None) -> None:
        self._host = host
        self.room = check_room_name(room)
        #: ``writer -> (messages delivered, key of the last one)``; plain memory, never persisted.
        self._cursor: dict[str, tuple[int, tuple[float, str] | None]] = {}
        self._bad_heads: set[str] = set()
        #: The room's epoch as last seen; a bad one (NaN...) as a stable str, so it is seen once.
        self._epoch: int | str | None = None
        self._reported: set[str] = set()
        self._backlog = backlog
        self._lock = threading.RLock()
        #: Records that failed validation or could not be loaded, as ``(where, reason)``; also
        #: edits and deletes refused because their author may not make them.
        self.skipped: collections.deque[tuple[str, str]] = collections.deque(maxlen=MAX_SKIPPED)
        self._skips = 0
        #: Messages collected by :meth:`updated_messages`'s poll, for the next :meth:`new_messages`.
        self._fresh: list[Message] = []
        #: ``id -> current state`` of returned messages changed since; insertion-ordered.
        self._changed: dict[str, Message] = {}
        #: ``writer -> key`` of its last record before the backlog start: older ones were not returned.
        self._start: dict[str, tuple[float, str]] = {}
        self._returned_ids: set[str] = set()
        #: Ids of refused amendments already counted in :attr:`skipped`.
        self._refused: set[str] = set()

    # -- reading -------------------------------------------------------------------------

    def _room(self) -> Room | None:
        """Begin a transaction on this thread's connection and return the room, creating it.

        A room whose record cannot be loaded or is not a Room is reported in ``skipped`` (once)
        and gives None: a broken room must not break its readers, nor the other rooms.
        """
        tm, conn = self._host.connection()
        tm.begin()
        try:
            room = find_room(conn.root().get(ROOMS_KEY), self.room)
            if room is None:
                self._create_room()
                tm.begin()
                room = find_room(conn.root().get(ROOMS_KEY), self.room)
            if not isinstance(room, Room):
                raise TypeError(f"the room's record is a {type(room).__name__}, not a Room")
            if not (isinstance(room.streams, OOBTree) and isinstance(room.heads, OOBTree)):
                raise TypeError("the room's streams or heads are not BTrees")
            if not isinstance(room.count, Length):
                raise TypeError("the room's count is not a Length")
            return room
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:
            self._skip(f"room {self.room!r}", exc, once=True)
            return None

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
                    raise disconnected(self._host.address_text, self._host.restart_hint)
            generation = self._host.generation()
            try:
                with server_boundary(self._host.address_text, lambda: self._host.restart_hint):
                    messages = self._poll()
            except ZChatDisconnected:  # the server went away mid-read: wait for it, if there is time
                if deadline is None or time.monotonic() >= deadline:
                    raise
                continue
            if messages or deadline is None or self._changed:  # an update ends the wait too
                return messages
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._host.wait_for_change(generation, remaining)

    def _poll(self) -> list[Message]:
        started = time.perf_counter()
        with self._lock:
            collected = self._collect()
            # Messages an updated_messages() poll gathered go first; updates may have refreshed them.
            found, self._fresh = self._fresh + collected, []
        self._host.report("poll", room=self.room, cost=time.perf_counter() - started, count=len(found))
        return found

    def _collect(self) -> list[Message]:
        with self._lock:
            room = self._room()
            if room is None:
                return []
            assert room.count is not None and room.heads is not None
            epoch = _epoch_of(room)
            if self._epoch != epoch:
                if isinstance(epoch, str):
                    self._skip(f"epoch of room {self.room!r}", ValueError(epoch), once=True)
                self._cursor.clear()
                self._reset_amendments()
                self._epoch = epoch
                if self._backlog is not None:
                    for writer, head in self._heads(room):
                        self._cursor[writer] = (head.count, head.last_key)
                        self._start[writer] = head.last_key
                    backlog, self._backlog = self._backlog, None
                    first = self._history(room, backlog, None)
                    self._returned_ids.update(m.id for m in first)
                    return first
            if room.count() == sum(seen for seen, _ in self._cursor.values()):
                return []
            found: list[tuple[str, Message | Event]] = []
            cursor = dict(self._cursor)
            for writer, head in self._heads(room):
                seen, seen_key = cursor.get(writer, (0, None))
                if head.count > seen:
                    found.extend(
                        (writer, item) for item in self._read_stream(room, writer, seen_key, head.last_key)
                    )
                    cursor[writer] = (head.count, head.last_key)
            absorbed = self._absorb(room, found, cursor)
            self._cursor = cursor  # only now: an outage mid-read must not skip anything
            return absorbed

    def _heads(self, room: Room) -> list[tuple[str, _Head]]:
        """The room's writers and their heads, checked (another client may have written anything)."""
        assert room.heads is not None
        heads = []
        for writer, value in room.heads.items():
            try:
                heads.append((writer, _Head.check(value)))
            except ValueError as exc:
                if writer not in self._bad_heads:
                    self._bad_heads.add(writer)
                    self._skip(f"head of writer {writer!r:.40}", exc)
        return heads

    def _read_stream(
        self, room: Room, writer: str, after: tuple[float, str] | None, upto: tuple[float, str]
    ) -> list[Message | Event]:
        assert room.streams is not None
        try:
            stream = room.streams[writer]
            entries = list(stream.items(after, upto, excludemin=after is not None))
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:  # a crafted or broken record: report it, keep the others going
            self._skip(f"stream {writer!r:.40} after {after}", exc)
            return []
        found = (self._check(record, f"{writer}@{key!r:.60}", writer) for key, record in entries)
        return [m for m in found if m is not None]

    def _check(self, record: object, where: str, writer: str) -> Message | Event | None:
        try:
            item = parse_record(record, self._host.max_text_bytes)
        except Exception as exc:  # any type: a crafted record may raise anything when inspected
            self._skip(where, exc)
            return None
        return dataclasses.replace(item, writer=writer) if isinstance(item, Message) else item

    def _skip(self, where: str, exc: BaseException, *, once: bool = False) -> None:
        """Report an unreadable record in ``skipped`` (capped) and, for the first few, in the log.

        ``once``: report ``where`` only the first time (a broken room or epoch is met on every poll).
        """
        if once:
            if where in self._reported:
                return
            if len(self._reported) > 10 * MAX_SKIPPED:
                self._reported.clear()
            self._reported.add(where)
        while exc.__cause__ is not None and not str(exc):  # StateLoadError says nothing itself
            exc = exc.__cause__
        try:
            reason = f"{type(exc).__name__}: {exc}"[:_MAX_REASON]
        except Exception:  # a crafted value whose str() fails (too deep, ...)
            reason = type(exc).__name__
        where = where[:200]
        self._skips += 1
        if self._skips <= _LOGGED_SKIPS:
            log.warning("room %r: skipped unreadable record %s (%s)", self.room, where, reason)
            if self._skips == _LOGGED_SKIPS:
                log.warning("room %r: further unreadable records are only listed in .skipped", self.room)
        self.skipped.append((where, reason))

    def history(self, n: int = 200, before: Message | None = None) -> list[Message]:
        """The last ``n`` messages by time (before ``before``, if given), oldest first.

        Reads O(log N + n) of the tree, not all of it. Does not move the cursor.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"history(n) needs an int n >= 0, not {n!r}")
        with self._lock, server_boundary(self._host.address_text, lambda: self._host.restart_hint):
            room = self._room()
            return [] if room is None else self._history(room, n, before)

    def _history(self, room: Room, n: int, before: Message | None) -> list[Message]:
        heads = self._heads(room)
        if n == 0 or not heads:
            return []
        assert room.streams is not None
        top: tuple[float, str] | None = before.key if before is not None else None
        start = max(head.last for _, head in heads)
        if top is not None:
            start = min(start, top[0])
        oldest = min(head.first for _, head in heads)
        try:
            if self._host.is_connected():  # else the loads fail in ZEO's thread, where nobody hears them
                indexes = list(room.amends.values()) if room.amends is not None else []
                _prefetch_right_edges(room, [room.streams.get(writer) for writer, _ in heads] + indexes)
        except transaction.interfaces.TransientError:
            raise
        except Exception:  # only a speed-up: the reads below report what does not load
            log.debug("prefetching the recent ends of the streams failed", exc_info=True)
        window = 1.0
        for _round in range(_MAX_WINDOW_ROUNDS):  # finite heads end it far sooner; a cap all the same
            # Only the streams that have messages between low and top; each read is O(log N).
            low = start - window
            items: list[tuple[Any, str, Any]] = []
            for writer, head in heads:
                if head.last < low or (top is not None and head.first > top[0]):
                    continue
                try:
                    stream = room.streams[writer]
                    # Amendments share the streams: only message records count towards n.
                    items.extend(
                        (key, writer, record)
                        for key, record in stream.items((low,), top, excludemax=top is not None)
                        if not is_event_record(record)
                    )
                except transaction.interfaces.TransientError:
                    raise
                except Exception as exc:
                    self._skip(f"history of {writer!r:.40}", exc)
            if len(items) >= n or low < oldest:
                break
            # Widen the window to where n messages should be at the density just seen.
            window *= max(2.0, 1.2 * n / len(items)) if items else 4.0
        items.sort(key=lambda item: item[0])
        found = [self._check(record, f"{key!r:.60}", writer) for key, writer, record in items[-n:]]
        return self._resolve(room, [m for m in found if isinstance(m, Message)])

    # -- writing -------------------------------------------------------------------------

    def add_message(self, text: str, reply_to: Message | str | None = None) -> Message:
        """Commit ``text`` as a new message from this client's user and return it.

        ``reply_to``: the message (or its id) this one answers.

        Conflicts and server outages are retried within ``SendPolicy.timeout``; a retry after an
        outage never duplicates the message, even when the first commit's answer was lost.
        Raises :class:`InvalidMessageError` for bad text and :class:`ZChatSendError` when the
        message could not be committed in time (it was then not sent).
        """
        text = check_text(text, self._host.max_text_bytes)
        parent = _reply_id(reply_to)
        message = Message(uuid.uuid4().hex, self._host.user, text, float(self._host.clock()), reply_to=parent)
        return self.post(message)

    def draft(self, text: object, *, author: object = None, id: object = None) -> Message:
        """Build, without committing, a checked message of ``text`` stamped with the host's clock.

        :meth:`post` commits it; posting the same draft again never stores it twice, which is how
        a send whose answer was lost is retried. ``author`` is a display name checked like any
        user name (default: this client's user); ``id`` is a caller-made id of 1 to 32 letters,
        digits, ``-`` or ``_`` (default: a new one). Raises :class:`InvalidMessageError`.
        """
        text = check_text(text, self._host.max_text_bytes)
        author = self._host.user if author is None else check_author(author)
        return Message(check_message_id(id), author, text, float(self._host.clock()))

    def post(self, message: Message, *, also: Callable[[Connection], object] | None = None) -> Message:
        """Commit an already built message and return it as stored (idempotent, like a retry).

        ``also(conn)``, if given, makes more changes in the same transaction (a share's blobs).
        """
        writer = self._host.writer
        stored: list[Message] = []
        seal = self._sealer(writer)

        def append(conn: Connection) -> None:
            if also is not None:
                also(conn)
            room = self._room_in(conn)
            self._publish_cert(room)
            stored[:] = [room.append(writer, message, seal)]

        # One send at a time per writer: each stream's key order must be its commit order.
        with self._host.send_lock:
            self._commit(append, what=f"sending to room {self.room!r}")
        signer = self._host.signer
        verified = signer is not None and signer.name == message.author
        return dataclasses.replace(stored[0], writer=writer, verified=verified)

    def share(
        self, obj: Any, caption: str = "", *, name: str | None = None, author: str | None = None
    ) -> Message:
        """Share a picture or table with the room: image bytes (PNG, JPEG, GIF, WebP), a path to
        an image file, a matplotlib Figure, a PIL Image, or a pandas DataFrame (its first rows
        shown as a table, its CSV attached). ``caption`` is shown with it.

        The type is found from the bytes, not a name; more than ``max_attachment_bytes`` (5 MB by
        default) raises :class:`AttachmentError`. ``author``: a display name, as in :meth:`draft`.
        Returns the committed Message.
        """
        from .media import prepare

        prepared = prepare(obj, self._host.max_attachment_bytes, name=name)
        text = "\n\n".join(part for part in (caption.strip(), prepared.text) if part)
        return self.share_files([(prepared.name, prepared.mime, prepared.data)], text, author=author)

    def share_files(
        self, files: list[tuple[str, str, bytes]], text: str = "", *, author: str | None = None
    ) -> Message:
        """Commit a message carrying ``files`` (``(name, mime, bytes)`` each) as ZODB blobs.

        The bytes go into blobs under this writer's own tree of ``root[BLOBS_KEY]`` (so sharers
        never conflict), the message record only names them. ``text`` may be empty. Checked types
        and sizes are the caller's job (:func:`zchat_nb.media.prepare`); the count is checked here.
        Retries are idempotent like :meth:`post`: a blob already stored under its key is kept.
        """
        if not 0 < len(files) <= MAX_ATTACHMENTS:
            raise InvalidMessageError(
                f"a message carries 1 to {MAX_ATTACHMENTS} attachments, not {len(files)}"
            )
        text = check_text(text, self._host.max_text_bytes) if text.strip() else ""
        writer, id_ = self._host.writer, uuid.uuid4().hex
        attachments = tuple(
            Attachment(name[:_MAX_ATTACHMENT_NAME] or "file", mime, len(data), f"{writer}/{id_}/{i}")
            for i, (name, mime, data) in enumerate(files)
        )
        author = self._host.user if author is None else check_author(author)
        message = Message(id_, author, text, float(self._host.clock()), attachments=attachments)

        def store_blobs(conn: Connection) -> None:
            tree = _writer_blobs(conn, writer)
            for attachment, (_, _, data) in zip(attachments, files, strict=True):
                if attachment.key not in tree:  # a retry whose first commit happened: keep it
                    tree[attachment.key] = _new_blob(data)

        try:
            return self.post(message, also=store_blobs)
        except Unsupported as exc:  # ZODB's word for a storage without blobs
            raise AttachmentError(
                f"the database at {self._host.address_text} keeps no blobs, so nothing can be "
                "shared there; use a server started by zchat_nb (`zchat-nb serve`), which has a "
                "blob directory"
            ) from exc

    def _commit(self, change: Callable[[Connection], object], what: str) -> None:
        commit(self._host, change, what=what, room=self.room)

    # -- presence ------------------------------------------------------------------------

    def heartbeat(self, user: str | None = None) -> None:
        """Record that ``user`` (default: this client's user) is in the room now (the widget calls it)."""
        user, now = self._host.user if user is None else check_author(user), float(self._host.clock())

        def beat(conn: Connection) -> None:
            self._room_in(conn).beat(user, now)

        self._commit(beat, what=f"announcing presence in {self.room!r}")

    def present(self, within: float = 90.0) -> list[str]:
        """Users whose last heartbeat in this room is at most ``within`` seconds old."""
        with self._lock, server_boundary(self._host.address_text, lambda: self._host.restart_hint):
            room = self._room()
            return [] if room is None else room.present(float(self._host.clock()) - within)

    def __repr__(self) -> str:
        return f"<ChatSession room={self.room!r} user={self._host.user!r}>"

    # -- amendments: edits, deletes, reactions (zchat_nb.amend) -----------------------------

    def edit(self, message: Message, text: str) -> Message:
        """Replace ``message``'s text (your own messages only); returns its new state.

        Raises :class:`ZChatPermissionError` naming who may, and :class:`InvalidMessageError` for
        bad text or a deleted message.
        """
        return self._amend(message, EDIT, check_text(text, self._host.max_text_bytes))

    def delete(self, message: Message) -> Message:
        """Delete ``message`` for everyone (your own; a verified teacher may delete anyone's)."""
        return self._amend(message, DELETE, "")

    def react(self, message: Message, emoji: str) -> Message:
        """Add your reaction ``emoji`` (one short emoji, e.g. 👍) to ``message``."""
        return self._amend(message, REACT, _check_reaction(emoji))

    def unreact(self, message: Message, emoji: str) -> Message:
        """Take back your reaction ``emoji`` on ``message``."""
        return self._amend(message, UNREACT, _check_reaction(emoji))

    def updated_messages(self) -> list[Message]:
        """Messages this session already returned that changed since (edited, deleted, reacted to).

        Each in its current state, once per change seen, in the order the changes were read. The
        same poll gathers new messages, which the next :meth:`new_messages` returns.
        """
        if self._host.closed:
            raise ZChatConnectionError("the client of this session is closed")
        if not self._host.is_connected():
            raise disconnected(self._host.address_text, self._host.restart_hint)
        with self._lock, server_boundary(self._host.address_text, lambda: self._host.restart_hint):
            self._fresh = self._poll()  # kept for the next new_messages()
            changed, self._changed = list(self._changed.values()), {}
        return changed

    def everything(self) -> list[Message]:
        """Every message of the room in time order, in its current state (reads it all: for exports)."""
        with self._lock, server_boundary(self._host.address_text, lambda: self._host.restart_hint):
            room = self._room()
            if room is None:
                return []
            assert room.streams is not None
            found: list[Message] = []
            for writer, stream in room.streams.items():
                for key, record in stream.items():
                    item = self._check(record, f"{writer}@{key!r:.60}", writer)
                    if isinstance(item, Message):
                        found.append(item)
            found.sort(key=lambda m: m.key)
            return self._resolve(room, found)

    def _reset_amendments(self) -> None:
        """A new epoch (the room was cleared): what was returned before is gone."""
        self._fresh, self._changed = [], {}
        self._start, self._returned_ids = {}, set()

    def _absorb(
        self, room: Room, found: list[tuple[str, Message | Event]], cursor: dict[str, Any]
    ) -> list[Message]:
        """Split a poll's records into new messages (in their current state) and updates."""
        messages = sorted((m for _, m in found if isinstance(m, Message)), key=lambda m: m.key)
        events = [e for _, e in found if isinstance(e, Event)]
        if not events and self._host.verifier is None:
            return messages  # the common case: nothing to verify, nothing amended
        targets = {e.target_id for e in events}
        new = self._resolve(room, messages, only=targets)
        new_ids = {m.id for m in new}
        fresh = {m.id: i for i, m in enumerate(self._fresh)}
        by_target: dict[str, list[Event]] = {}
        for event in sorted(events, key=lambda e: e.key):
            by_target.setdefault(event.target_id, []).append(event)
        for target_id, amendments in by_target.items():
            event = amendments[-1]
            if target_id in new_ids:
                continue
            if target_id in fresh or self._was_returned(event, cursor):
                base = self._load_message(room, event.target_writer, event.target_key)
                if base is None:
                    continue
                [state] = self._resolve(room, [base])
                if all(e.id in self._refused for e in amendments):
                    continue  # only refused (forged) amendments: nothing changed
                if target_id in fresh:
                    self._fresh[fresh[target_id]] = state
                else:
                    self._changed.pop(state.id, None)  # keep the order of the latest change
                    self._changed[state.id] = state
        return new

    def _was_returned(self, event: Event, cursor: dict[str, Any]) -> bool:
        if event.target_id in self._returned_ids:
            return True
        seen = cursor.get(event.target_writer)
        if seen is None or seen[1] is None or event.target_key > seen[1]:
            return False
        start = self._start.get(event.target_writer)
        return start is None or event.target_key > start

    def _load_message(self, room: Room, writer: str, key: tuple[float, str]) -> Message | None:
        assert room.streams is not None
        stream = room.streams.get(writer)
        record = stream.get(key) if stream is not None else None
        if record is None:
            return None
        item = self._check(record, f"{writer}@{key!r:.60}", writer)
        return item if isinstance(item, Message) else None

    def _resolve(self, room: Room, messages: list[Message], only: set[str] | None = None) -> list[Message]:
        """``messages`` in their current state: verified, with their amendments applied.

        ``only``: ids of the messages that may have amendments (the others are only verified).
        """
        return [state for state, _ in self._states(room, messages, only)]

    def _states(
        self, room: Room, messages: list[Message], only: set[str] | None = None
    ) -> list[tuple[Message, int]]:
        verifier = self._host.verifier
        keys = sorted(m.key for m in messages if only is None or m.id in only)
        seen: dict[tuple[float, str], list[Seen]] = {}
        for writer, key, value in room.amendments(keys):
            if not (isinstance(value, tuple) and len(value) <= MAX_EMOJI_PER_MESSAGE + 2):
                self._skip(f"amendments of {writer!r:.40} on {key!r:.60}", ValueError("bad index entry"))
                continue
            for record in value:
                item = self._check(record, f"amendment of {writer!r:.40} on {key!r:.60}", writer)
                if not isinstance(item, Event) or item.target_key != key:
                    continue
                seen.setdefault(key, []).append(Seen(writer, item, self._identify(room, writer, item)))
        states = []
        for message in messages:
            identity = self._identify(room, message.writer, message)
            verified = identity is not None and identity.name == message.author
            events = seen.get(message.key, [])
            if not events:
                states.append((dataclasses.replace(message, verified=verified), 0))
                continue
            folded = fold(
                message.text, message.author, message.writer, verified, events, strict=verifier is not None
            )
            for event, why in folded.refused:
                if event.id not in self._refused:
                    self._refused.add(event.id)
                    self._skip(f"{event.kind} {event.id}", ZChatPermissionError(f"refused: {why}"))
            state = dataclasses.replace(
                message,
                text=folded.text,
                edited=folded.edited,
                deleted=folded.deleted,
                reactions=folded.reactions,
                verified=verified,
            )
            states.append((state, folded.version))
        return states

    def _identify(self, room: Room, writer: str, item: Message | Event) -> Identity | None:
        verifier = self._host.verifier
        if verifier is None or not item.signer:
            return None
        data = canonical(self.room, writer, item.signed_fields())
        return verifier.identify(item.signer, room.cert(item.signer), data, item.signature)

    def _sealer(self, writer: str) -> Callable[[Any], Any] | None:
        """What signs a record with its final time, if this client has a certificate."""
        signer = self._host.signer
        if signer is None:
            return None

        def seal(item: Any) -> Any:
            item = dataclasses.replace(item, signer=signer.fingerprint)
            signature = signer.sign(canonical(self.room, writer, item.signed_fields()))
            return dataclasses.replace(item, signature=signature)

        return seal

    def _publish_cert(self, room: Room) -> None:
        signer = self._host.signer
        if signer is not None:
            room.add_cert(signer.fingerprint, signer.cert_pem)

    def _amend(self, target: Message, kind: str, arg: str) -> Message:
        if not (isinstance(target, Message) and target.writer):
            raise InvalidMessageError(
                f"{kind} needs a Message returned by new_messages() or history() of room "
                f"{self.room!r}, not {target!r:.80}"
            )
        host = self._host
        writer, user = host.writer, host.user
        signer = host.signer
        me = Identity(signer.name, signer.teacher) if signer is not None else None
        event_id, when = uuid.uuid4().hex, float(host.clock())
        seal = self._sealer(writer)
        result: list[Message] = []

        def change(conn: Connection) -> None:
            room = self._room_in(conn)
            base = self._load_message(room, target.writer, target.key)
            if base is None:
                raise InvalidMessageError(
                    f"message {target.id} is not in room {self.room!r} "
                    "(another room's, or the room was cleared)"
                )
            [(state, version)] = self._states(room, [base])
            event = Event(event_id, user, when, kind, base.writer, base.time, base.id, version + 1, arg)
            if kind in (EDIT, DELETE):
                why = refusal(
                    Seen(writer, event, me), state.author, base.writer, state.verified, strict=False
                )
                if why is not None:
                    who = permission_error_text(kind, state.author, signed=state.verified)
                    raise ZChatPermissionError(who)
            if state.deleted:
                if kind == DELETE:
                    result[:] = [state]
                    return  # already deleted: nothing to write
                raise InvalidMessageError(f"message {base.id} was deleted; it cannot be changed any more")
            mine = state.reactions.get(arg, ()) if kind in (REACT, UNREACT) else ()
            if (kind == REACT and user in mine) or (kind == UNREACT and user not in mine):
                result[:] = [state]
                return  # nothing to change
            if kind == REACT:
                held = sum(1 for users in state.reactions.values() if user in users)
                if held >= MAX_EMOJI_PER_MESSAGE:
                    raise ZChatPermissionError(
                        f"{user} already has {held} reactions on this message, the most one may have; "
                        "take one back with unreact() first"
                    )
            self._publish_cert(room)
            room.amend(writer, event, seal)
            result[:] = [self._resolve(room, [base])[0]]

        with host.send_lock:  # like a send: this writer's stream takes one record at a time
            self._commit(change, what=f"{kind} in room {self.room!r}")
        return result[0]


def _reply_id(reply_to: object) -> str | None:
    if reply_to is None:
        return None
    parent = reply_to.id if isinstance(reply_to, Message) else reply_to
    if not (isinstance(parent, str) and 0 < len(parent) <= _ID_CHARS):
        raise InvalidMessageError(f"reply_to must be a Message or a message id, not {reply_to!r:.60}")
    return parent


def _check_reaction(emoji: object) -> str:
    if check_emoji(emoji) is None:
        raise ZChatPermissionError(
            f"a reaction must be one short emoji such as {' '.join(REACTIONS)}, not {emoji!r:.40}"
        )
    return emoji  # type: ignore[return-value]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


# -- attachments: bytes in ZODB blobs, outside the message records ----------------------------


def _new_blob(data: bytes) -> Any:
    from ZODB.blob import Blob

    blob = Blob()
    with blob.open("w") as file:
        file.write(data)
    return blob


def _writer_blobs(conn: Connection, writer: str) -> OOBTree:
    """This writer's ``key -> Blob`` tree (created in the caller's transaction)."""
    root = conn.root()
    writers = root.get(BLOBS_KEY)
    if writers is None:
        writers = root[BLOBS_KEY] = OOBTree()
    tree = writers.get(writer)
    if tree is None:
        tree = writers[writer] = OOBTree()
    return tree


def read_attachment(conn: Connection, attachment: Attachment, max_bytes: int) -> bytes:
    """The bytes of ``attachment``, read in ``conn``'s current transaction, checked.

    Another client wrote the blob and the record: the claimed size is checked against the limit
    before the blob is opened, the blob's real size before anything is read, and the bytes'
    magic numbers against the claimed type. Raises :class:`AttachmentError` saying which failed.
    """
    from ZODB.blob import Blob

    from .media import KNOWN_TYPES, sniff

    what = f"attachment {attachment.name!r:.60}"
    if attachment.mime not in KNOWN_TYPES:
        raise AttachmentError(f"{what} has the unknown type {attachment.mime!r:.40}; it is skipped")
    if attachment.size > max_bytes:
        raise AttachmentError(
            f"{what} is {attachment.size} bytes, over the {max_bytes}-byte limit; it is not loaded "
            "(raise the limit with connect(..., max_attachment_bytes=N) to read it)"
        )
    writers = conn.root().get(BLOBS_KEY)
    tree = writers.get(attachment.writer) if writers is not None else None
    blob = tree.get(attachment.key) if tree is not None else None
    if not isinstance(blob, Blob):
        raise AttachmentError(f"{what} is missing from the database (key {attachment.key!r:.80})")
    try:
        file = blob.open("r")  # over ZEO: the server streams the blob into the client's blob cache
    except POSKeyError as exc:
        raise AttachmentError(f"{what}: the server has no file for its blob ({exc})") from exc
    with file:
        actual = os.fstat(file.fileno()).st_size
        if actual != attachment.size or actual > max_bytes:
            raise AttachmentError(f"{what} is {actual} bytes, not the {attachment.size} its message says")
        data = file.read(max_bytes + 1)
    found = sniff(data)
    if found != attachment.mime:
        raise AttachmentError(f"{what} claims to be {attachment.mime} but its bytes are {found or 'unknown'}")
    return data


def commit(
    host: SessionHost,
    change: Callable[[Connection], _T],
    *,
    what: str,
    room: str = "",
    undone: str = "the message was not sent",
    maybe: str = "it may have been sent; send the same Message again (ChatSession.post): it is never doubled",
) -> _T:
    """Run ``change(conn)`` in a fresh transaction of this thread and commit it; return its result.

    The one retry loop of every write: conflicts are retried with a random pause, and a server
    that is away is waited for, within ``host.policy``; then :class:`ZChatSendError` says ``what``
    failed and ``undone`` or, when an attempt's answer was lost (it may have been committed),
    ``maybe``. A storage error on the server (disk full...) is a ZChatSendError saying so.
    ``change`` must be safe to run again: after an outage the first commit may or may not have
    happened.
    """
    policy = host.policy
    deadline = time.monotonic() + policy.timeout
    tm, conn = host.connection()
    conflicts = 0
    last_error: BaseException | None = None
    answer_lost = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not host.wait_connected(remaining):
            way_out = _capital(host.restart_hint) or "Check the server (`zchat-nb status`)"
            outcome = f"{maybe}. {way_out}" if answer_lost else f"{undone}. {way_out}, then try again"
            raise ZChatSendError(
                f"{what} failed: no answer from the server at {host.address_text} "
                f"within {policy.timeout:g} s; {outcome}"
            ) from last_error
        try:
            started = time.perf_counter()
            committing = False
            tm.begin()
            result = change(conn)
            committing = True  # from here on, a lost answer may hide a commit that happened
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
            answer_lost = answer_lost or committing
        except StorageError as exc:  # the server's storage failed (disk full, read-only...)
            tm.abort()
            raise ZChatSendError(
                f"{what} failed: the server could not store it ({str(exc)[:200]}); {undone}. "
                "Check the server's disk space and its log"
            ) from exc
        except BaseException:
            tm.abort()
            raise
