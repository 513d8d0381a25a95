"""The chat model: rooms stored in ZODB, and the per-reader session that reads and writes them.

The seed (Kuchling's ``chatter.py``) kept one BTree keyed by ``time.time()`` and a ``_v_last_time``
cursor. That cursor is lost whenever the object is ghostified, and it never delivers a message
stamped earlier but committed later than one already seen; and every writer appending to the end of
one shared BTree makes bucket splits, which cannot be merged, conflict all the time under load.

Here each writer (one per :class:`~zchat_nb.client.ChatClient`) appends to a stream of its own,
``Room.streams[writer]``, keyed by ``(time, id)``, where times only grow: a writer's key order is
its commit order. A send changes only the writer's own objects, so concurrent senders neither
conflict nor make the server resolve anything: most sends change one small object, the writer's
:class:`Tail`, where its newest records wait; every :data:`HELD_MAX`-th send also moves them into
the stream's last bucket (on a split a node of its stream; on its first message the ``streams`` and
``tails`` indexes too). A reader's cursor is
the last key it was given from each stream, held by the :class:`ChatSession` in ordinary memory,
never on a persistent object. History merges the recent ends of the streams by time.
Records are plain tuples of ``str`` and ``float`` so that the unpickling allow-list stays tiny.

Fan-out: a reader learns from the oids its client is told were committed (:class:`Changes`) which
streams changed, and reads only those, from its cursor on: one small load per delivered message
(the writer's :class:`Tail`; the stream's last bucket too if the reader missed more than the tail
holds), and no load at all while nothing of its room changed. Each call reads at most
:data:`MAX_PER_CALL` records and looks at most at :data:`MAX_WRITERS_PER_CALL` streams; the rest
comes with the next calls, so a crafted room cannot make one call unbounded.

This module knows nothing of ZEO, widgets or IPython: a :class:`ChatSession` gets its connection,
its wake-ups, its change notices and its clock from a :class:`SessionHost`
(``zchat_nb.client.ChatClient`` in practice).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import heapq
import itertools
import logging
import math
import os
import random
import reprlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree, OOBucket
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
    "Changes",
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
#: Records (messages and amendments) one ``new_messages()`` call reads at most; the rest comes next.
MAX_PER_CALL = 1000
#: Streams one call looks at, at most (a room of 100k writers is read a slice per call, in turn);
#: history and a backlog start look at ten times as many.
MAX_WRITERS_PER_CALL = 1000
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
    def from_record(
        cls, record: object, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES, writer: str = ""
    ) -> Message:
        """Check a stored record written by some client (of stream ``writer``) and turn it into a Message.

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
            writer=writer,
            signer=signer,
            signature=signature,
            attachments=attachments,
        )


def parse_record(
    record: object, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES, writer: str = ""
) -> Message | Event:
    """A stream record as a Message (of ``writer``) or an :class:`~zchat_nb.amend.Event`; else ValueError."""
    if isinstance(record, tuple) and record and record[0] == EVENT_TAG:
        return Event.from_record(record, max_text_bytes, MAX_AUTHOR_CHARS)
    return Message.from_record(record, max_text_bytes, writer)


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


#: A writer's records its :class:`Tail` holds before they go into its stream (see :meth:`Room.append`).
HELD_MAX = 8
#: ... and the characters they may hold together before they do.
HELD_CHARS = 4096
#: Records a reader believes a Tail holds, at most (a crafted one with more is not read).
_HELD_READ = 64


class Tail(Persistent):
    """A writer's newest stream records, kept in a small object of its own: the one a send stores.

    ``held`` is ``((key, record), ...)``, oldest first, and ``base`` the writer's key right before
    the first of them. Every record of the writer up to ``base`` is in its stream; the ones after
    it are in ``held``, and go into the stream :data:`HELD_MAX` at a time (:meth:`Room.append`),
    so most sends store this one object and no stream bucket (a bucket holds up to 30 records: a
    few KB to pickle, store and send to every reader). A reader whose cursor is at ``base`` or at
    a held key (nearly always: it read the previous message) takes what follows from here; any
    other reader reads the stream, then the held records past it. Only its writer changes it.

    ``bucket`` is the stream's last bucket as of the last time records went into it (None while
    the stream is one bucket kept inside the tree's own record): history reads a writer's newest
    records from the tail and this bucket, without loading the tree's root and inner nodes.

    A tail written before batching holds ``(prev, key, record)``, its record also in the stream:
    read as ``base=prev, held=((key, record),)``, which says the same.
    """

    base: tuple[float, str] | None = None
    held: tuple[tuple[Any, Any], ...] = ()
    bucket: OOBucket | None = None

    def __getstate__(self) -> tuple[object, object, object]:
        return (self.base, self.held, self.bucket)

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 3):
            raise ValueError("a stream's tail is not (key before, held records, last bucket)")
        if _is_key(state[1]):  # before batching: (prev, key, record)
            self.base, self.held, self.bucket = state[0], ((state[1], state[2]),), None
        else:  # checked() says whether a writer could have stored it
            self.base, self.held, self.bucket = state

    def set(
        self, base: tuple[float, str] | None, held: tuple[tuple[Any, Any], ...], bucket: OOBucket | None
    ) -> None:
        self.base, self.held, self.bucket = base, held, bucket

    def checked_bucket(self) -> OOBucket | None:
        """:attr:`bucket` (loaded) if it is what the writer stores: a bucket whose last key is the
        tail's :attr:`base` (records wait here) or its last held key (they just went into the
        stream); else None, and the stream is read from its root."""
        held, bucket = self.checked(), self.bucket
        if held is None or type(bucket) is not OOBucket or not bucket:
            return None
        last = bucket.maxKey()
        return bucket if last == self.base or last == held[-1][0] else None

    def checked(self, limit: int = _HELD_READ) -> tuple[tuple[Any, Any], ...] | None:
        """``held`` if it is what a writer stores (``base`` a key or None, then at most ``limit``
        ``(key, record)`` pairs with keys increasing past it); None if not (crafted or broken)."""
        base, held = self.base, self.held
        if not (type(held) is tuple and 0 < len(held) <= limit and (base is None or _is_key(base))):
            return None
        before = base
        for entry in held:
            if not (type(entry) is tuple and len(entry) == 2 and _is_key(entry[0])):
                return None
            if before is not None and not entry[0] > before:
                return None
            before = entry[0]
        return held

    def past(self, key: tuple[float, str] | None) -> tuple[tuple[Any, Any], ...] | None:
        """The held records with keys past ``key`` (all of them for None); None if :meth:`checked`
        refuses the tail. Past the stream's last key: the ones not in the stream yet."""
        held = self.checked()
        if held is None:
            return None
        return held if key is None else tuple(entry for entry in held if entry[0] > key)

    def after(self, key: tuple[float, str]) -> tuple[tuple[Any, Any], ...] | None:
        """The held records after ``key`` if they are all the writer has after it (``key`` is
        ``base`` or a held key), else None: the stream must be read from ``key`` first."""
        held = self.checked()
        if held is None:
            return None
        if key == self.base:
            return held
        for position, (held_key, _) in enumerate(held):
            if held_key == key:
                return held[position + 1 :]
        return None


def _chars(record: object) -> int:
    """The characters of a record's str fields: what it weighs in a Tail."""
    return sum([len(part) for part in record if type(part) is str]) if type(record) is tuple else 0


class _Records(NamedTuple):
    """A writer's stream and the records its tail holds past it (``extra``), read as one.

    With ``bucket`` (the stream's last bucket, from the tail), reads that stay within it and the
    tail never load the tree's root and inner nodes.
    """

    stream: OOBTree
    extra: tuple[tuple[Any, Any], ...]
    bucket: OOBucket | None = None

    def last(self) -> Any:
        """The writer's last key (the stream must not be empty if ``extra`` is)."""
        if self.extra:
            return self.extra[-1][0]
        return (self.bucket if self.bucket is not None else self.stream).maxKey()

    def _covers(self, low: Any) -> bool:
        return self.bucket is not None and low is not None and self.bucket.minKey() <= low

    def items(
        self, low: Any = None, high: Any = None, *, excludemax: bool = False
    ) -> Iterator[tuple[Any, Any]]:
        """``(key, record)`` with ``low <= key <= high`` (``< high`` with ``excludemax``), in order."""
        tree = self.bucket if self._covers(low) else self.stream
        yield from tree.items(low, high, excludemax=excludemax)  # type: ignore[union-attr]
        for key, record in self.extra:
            if (low is None or key >= low) and (
                high is None or key < high or (key == high and not excludemax)
            ):
                yield key, record

    def has_before(self, low: Any) -> bool:
        """Whether the writer has a key below ``low`` (one descent of the stream, O(log N))."""
        if self.bucket is not None and self.bucket.minKey() < low:
            return True
        try:
            key = self.stream.maxKey(low)  # the largest key <= low
        except ValueError:  # none
            return bool(self.extra) and self.extra[0][0] < low
        return _is_key(key)


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
    #: ``writer -> Tail``: each stream's newest record, what a reader loads per delivery (see
    #: :class:`Tail`); rooms made before it get theirs with the first append after an upgrade.
    tails: OOBTree | None = None
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
        if self.heads is not None or self.count is not None:  # a room of the old shape: not kept up
            self.heads = self.count = None
        if self.amends is not None:
            self.amends = OOBTree()
        self.tails = OOBTree()

    def _own_stream(self, writer: str) -> OOBTree:
        """``writer``'s stream, made on its first message (the only change to the shared index)."""
        assert self.streams is not None
        stream: OOBTree = self._own_entry("streams", writer, OOBTree, lambda entry: entry is not None)
        return stream

    def _own_entry(
        self, index: str, writer: str, make: Callable[[], Any], usable: Callable[[Any], bool]
    ) -> Any:
        """``writer``'s entry in the writer-keyed tree ``index`` (``streams``, ``tails``), made if
        not ``usable``. A tree whose keys another client made incomparable with str is rebuilt with
        its str keys only."""
        tree = getattr(self, index)
        try:
            entry = tree.get(writer)
        except TypeError:  # another client put keys there that do not compare with str
            tree = _str_keyed(tree)
            setattr(self, index, tree)
            entry = tree.get(writer)
        if not usable(entry):
            entry = tree[writer] = make()
        return entry

    def append(self, writer: str, message: _Item, seal: Callable[[_Item], _Item] | None = None) -> _Item:
        """Add ``message`` to the end of ``writer``'s records and return it as stored.

        Its time is moved just past the writer's previous message if the writer's clock went back,
        so that each writer's key order is its commit order. A message whose id is already stored
        (a retried send whose first commit did happen, even with later sends since) is left alone.

        The record goes into the writer's :class:`Tail`, the one object most sends change; once
        the tail holds :data:`HELD_MAX` records or :data:`HELD_CHARS` characters, they all go into
        the stream in the same commit (and the writer's first record at once: that send makes
        the stream anyway). Changes only the writer's own objects (and the ``streams`` and
        ``tails`` indexes on its first message).
        """
        stream = self._own_stream(writer)
        tail = self._own_tail(writer)
        in_stream: tuple[float, str] | None = stream.maxKey() if stream else None
        try:
            tail._p_activate()
        except transaction.interfaces.TransientError:
            raise
        except Exception:  # a tail another client broke (its records are lost; the stream is not)
            tail = self._own_entry("tails", writer, Tail, lambda entry: False)
        pending = tail.past(in_stream) or ()
        last = pending[-1][0] if pending else in_stream
        if last is not None and last[1] == message.id:
            return parse_record(pending[-1][1] if pending else stream[last], 2**30)  # type: ignore[return-value]
        # Only keys from the message's own on can hold an earlier attempt: none past the last one.
        if last is not None and message.key <= last:
            stored = _find_retried(stream, pending, message)
            if stored is not None:
                return stored
        if last is not None and message.time <= last[0]:
            message = dataclasses.replace(message, time=math.nextafter(last[0], math.inf))
        if seal is not None:  # signs the record with its final time
            message = seal(message)
        record = message.to_record()
        pending += ((message.key, record),)
        if in_stream is None or len(pending) >= HELD_MAX or sum(_chars(r) for _, r in pending) > HELD_CHARS:
            _insert_unchecked(stream, pending)
            tail.set(last, pending[-1:], _last_bucket(stream))
        else:
            tail.set(in_stream, pending, tail.bucket if type(tail.bucket) is OOBucket else None)
        return message

    def _own_tail(self, writer: str) -> Tail:
        """``writer``'s :class:`Tail`, made (with the ``tails`` index) on its first append."""
        if self.tails is None:
            self.tails = OOBTree()
        tail: Tail = self._own_entry("tails", writer, Tail, lambda entry: isinstance(entry, Tail))
        return tail

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

    def unflushed(self, writer: str, stream: OOBTree) -> tuple[tuple[Any, Any], ...]:
        """``writer``'s records that its :class:`Tail` holds and its ``stream`` does not yet
        (none if the tail is missing or is not one a writer stores)."""
        try:
            tail = self.tails.get(writer) if isinstance(self.tails, OOBTree) else None
            if not isinstance(tail, Tail):
                return ()
            return tail.past(stream.maxKey() if stream else None) or ()
        except transaction.interfaces.TransientError:
            raise
        except Exception:  # keys another client made incomparable, a tail that does not load
            return ()

    def records(self) -> Iterator[tuple[Any, Any]]:
        """Every ``(key, record)`` of the room in time order (reads everything: for exports)."""
        assert self.streams is not None
        every = (
            itertools.chain(stream.items(), self.unflushed(writer, stream))
            for writer, stream in self.streams.items()
        )
        return heapq.merge(*every, key=lambda item: item[0])

    def message_count(self) -> int:
        """How many records the room holds; walks every bucket of every stream (a teacher's reset)."""
        assert self.streams is not None
        return sum(
            len(stream) + len(self.unflushed(writer, stream)) for writer, stream in self.streams.items()
        )

    def join(self, user: str, writer: str, when: float) -> None:
        """Say that ``writer``'s client shows this room to ``user`` from ``when`` (or still does)."""
        if self.members is None:
            self.members = OOBTree()
        try:
            self.members[(user, writer)] = when
        except TypeError:  # another client put keys there that do not compare with ours
            self.members = _repaired(self.members, _is_member)
            self.members[(user, writer)] = when

    def leave(self, user: str, writer: str) -> None:
        if self.members is None:
            return
        try:
            found = (user, writer) in self.members
        except TypeError:
            self.members = _repaired(self.members, _is_member)
            found = (user, writer) in self.members
        if found:
            del self.members[(user, writer)]

    def presence_entries(self, limit: int = 10_000) -> list[tuple[str, float]]:
        """``(user, time joined, renewed or beaten)`` of up to ``limit`` members and old heartbeats.

        Entries that are not ``((str, str), float)`` or ``(str, float)`` are ignored.
        """
        entries: list[tuple[object, object]] = []
        if isinstance(self.members, OOBTree):
            members = itertools.islice(self.members.items(), limit)
            entries += ((key[0], when) for key, when in members if _is_member(key))
        if isinstance(self.presence, OOBTree):
            entries += itertools.islice(self.presence.items(), limit)
        return [
            (user, when)
            for user, when in entries
            if type(user) is str and type(when) is float and math.isfinite(when)
        ]

    def present(self, since: float) -> list[str]:
        """Users who joined (or renewed, or beat the old heartbeat) at ``since`` or later."""
        return sorted({user for user, when in self.presence_entries() if when >= since})

    def clear(self) -> None:
        """Forget every message (a teacher's reset); readers notice through :attr:`epoch`."""
        self._new_trees()
        self.epoch += 1

    def __repr__(self) -> str:
        return f"<Room {self.name!r}>"


def _insert_unchecked(stream: OOBTree, entries: Iterable[tuple[tuple[float, str], Any]]) -> None:
    """``stream[key] = record`` for each entry without asking the server to check the tree nodes
    it passed.

    A BTree insert marks each inner node it goes through "read current", so that a commit fails if
    another transaction restructured the tree meanwhile: one more message per send and one more
    check under the server's commit lock. Only this writer changes its stream, one send at a time
    (``send_lock``), and appends land in the last bucket, which the send writes anyway: a change
    to the same place conflicts on that bucket. (ZODB has no public way to take the mark back.)
    """
    marked: dict[bytes, bytes] | None = getattr(stream._p_jar, "_readCurrent", None)
    before = set(marked) if marked else ()
    for key, record in entries:
        stream[key] = record
    if marked:
        for oid in [oid for oid in marked if oid not in before]:
            del marked[oid]


#: Entries of a stream looked at for a retried message's id (see :func:`_find_retried`).
RETRY_WINDOW = 256


def _find_retried(stream: OOBTree, held: tuple[tuple[Any, Any], ...], message: _Item) -> _Item | None:
    """The stored copy of ``message`` if an earlier attempt committed it, else None.

    A retry carries the first attempt's time and id; the stored key is that key, or a later time
    when the writer's clock had gone back. So only keys from ``message.key`` on can match (a new
    message, later than everything stored, is not looked for: see :meth:`Room.append`): in the
    records ``held`` in the writer's tail, then in the stream. At most :data:`RETRY_WINDOW` keys
    of the stream are looked at, so a bogus early time cannot make a send scan all of it.
    """
    for key, record in held:
        if key[1] == message.id and key >= message.key:
            return parse_record(record, 2**30)  # type: ignore[return-value]  # a message or an event
    for count, key in enumerate(stream.keys(min=message.key)):
        if count >= RETRY_WINDOW:
            break
        if key[1] == message.id:
            return parse_record(stream[key], 2**30)  # type: ignore[return-value]  # a message or an event
    return None


def _is_member(key: object) -> bool:
    return type(key) is tuple and len(key) == 2 and type(key[0]) is str and type(key[1]) is str


def _is_key(key: object) -> bool:
    """Whether ``key`` is a stream key ``(time, id)`` as writers store them."""
    return (
        type(key) is tuple
        and len(key) == 2
        and type(key[0]) is float
        and math.isfinite(key[0])
        and type(key[1]) is str
    )


def _str_keyed(tree: OOBTree) -> OOBTree:
    return _repaired(tree, lambda key: type(key) is str)


def _repaired(tree: OOBTree, good: Callable[[object], bool], limit: int = 1_000_000) -> OOBTree:
    """A copy of ``tree`` with only the keys ``good`` accepts: what a writer does when another client
    made a shared index unusable (keys that do not compare). Values are kept as they are."""
    return OOBTree({key: value for key, value in itertools.islice(tree.items(), limit) if good(key)})


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
        #: Oids whose change its reader will load at once (its writers' tails; a stream's right
        #: edge where the writer has none): the client may fetch them before it wakes the reader
        #: (see ``ClientEvents.committed``).
        self._watched: frozenset[bytes] = frozenset()
        #: Told when ``watched`` changes (see ``ClientEvents.track``).
        self.on_watch: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._all = True
        #: ``oid -> tid`` of the latest commit that changed it (None: not known).
        self._oids: dict[bytes, bytes | None] = {}

    @property
    def watched(self) -> frozenset[bytes]:
        return self._watched

    @watched.setter
    def watched(self, oids: frozenset[bytes]) -> None:
        if oids != self._watched:
            self._watched = oids
            if self.on_watch is not None:
                self.on_watch()

    def mark(self, oids: Iterable[bytes], tid: bytes | None = None) -> None:
        if not self.exact:  # every take() says "everything" anyway
            return
        with self._lock:
            if not self._all:
                self._oids.update(dict.fromkeys(oids, tid))
                if len(self._oids) > self.MAX_PENDING:
                    self._all, self._oids = True, {}

    def mark_all(self) -> None:
        with self._lock:
            self._all, self._oids = True, {}

    def take(self, before: bytes | None = None) -> tuple[bool, set[bytes]]:
        """``(everything changed, changed oids)`` since the last take; clears what it returns.

        ``before``: only the oids of commits before that tid (a snapshot that sees them is being
        read now); later ones stay for the next take.
        """
        with self._lock:
            everything = self._all or not self.exact
            if before is None or everything:
                oids = set(self._oids)
                self._all, self._oids = False, {}
                return everything, oids
            seen = {oid for oid, tid in self._oids.items() if tid is not None and tid < before}
            for oid in seen:
                del self._oids[oid]
            return False, seen


def _node_entries(node: Any) -> tuple[Any, ...]:
    """A BTree node's ``(child, key, child, ..., child)`` from its state; () for a bucket, an empty
    tree, or a small tree holding its one bucket inline."""
    if not type(node).__name__.endswith("BTree"):
        return ()
    state = node.__getstate__()
    if not state or len(state) != 2:
        return ()
    return state[0]


def _children(node: Any) -> list[Any]:
    """The persistent children of a BTree node, from its state, in key order (none for a bucket).

    Only inner nodes are loaded: a child's oid is known without loading it.
    """
    return [child for child in _node_entries(node)[::2] if isinstance(child, Persistent)]


def _last_child(node: Any) -> Any:
    """The last child of a BTree node (None if it has none, or if its last entry is not a node:
    a crafted tree).

    Every send that moves records into a stream walks its right edge: taking the last entry, not
    all of up to 500 children (:func:`_children`), keeps that walk's cost flat as the stream grows.
    """
    entries = _node_entries(node)
    last = entries[-1] if entries else None
    return last if isinstance(last, Persistent) else None


def _edge_oids(tree: Any) -> list[bytes]:
    """Oids of a BTree's root and its right edge: the objects an append at the end changes."""
    oids, node = [], tree
    for _ in range(32):  # deeper than any real tree: bounded even for a crafted cycle
        if node is None or node._p_oid is None:
            break
        oids.append(node._p_oid)
        node = _last_child(node)
    return oids


def _last_bucket(tree: OOBTree) -> OOBucket | None:
    """A BTree's last bucket; None while the tree keeps its one bucket inside its own record."""
    node: Any = tree
    for _ in range(32):  # deeper than any real tree
        child = _last_child(node)
        if child is None:
            return node if type(node) is OOBucket else None
        node = child
    return None


def index_oids(tree: Any, limit: int = 100_000) -> list[bytes]:
    """Oids of every node of a BTree index (the streams, the members): any insert changes one.

    Loads only the inner nodes (a few for 100k entries), not the buckets.
    """
    oids: list[bytes] = []
    todo = [tree] if isinstance(tree, Persistent) else []
    while todo and len(oids) < limit:
        node = todo.pop()
        if node._p_oid is not None:
            oids.append(node._p_oid)
        todo.extend(_children(node))
    return oids


def _prefetch_edges(room: Room, trees: list[Any], levels: int = 4, *, left: bool = False) -> None:
    """Ask ZEO for the right edge (with ``left``, both edges) of each tree in one pipelined round
    trip per tree level.

    History reads the newest buckets of many streams; loading them one by one costs a round trip
    each (about 40 for 20 writers). ``Connection.prefetch`` sends the loads together instead.
    """
    jar = room._p_jar
    if jar is None or not hasattr(jar.db().storage, "prefetch"):  # in-process storages: no round trips
        return
    nodes = [tree for tree in trees if isinstance(tree, Persistent)]
    for _ in range(levels):
        if not nodes:
            return
        jar.prefetch(nodes)
        children: list[Persistent] = []
        for node in nodes:
            below = _children(node)
            children.extend({id(c): c for c in ((below[:1] if left else []) + below[-1:])}.values())
        nodes = children


def _capped(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; a repr that fails (too deep, crafted) says so."""
    try:
        text = reprlib.repr(value)
    except Exception as exc:
        text = f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
    return text[:limit]


def _place(writer: str, key: object) -> str:
    """Where a stream record is, for a report: ``writer@key``."""
    return f"{writer}@{_capped(key, 60)}"


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
        for key, room in itertools.islice(rooms.items(), 10 * MAX_WRITERS_PER_CALL):
            if type(key) is str and key == name:
                return room
        return None


def room_names(rooms: object) -> list[str]:
    """The names in a rooms tree, skipping keys that are not room names (another client's doing)."""
    if not isinstance(rooms, OOBTree):
        return []
    return [
        key
        for key in itertools.islice(rooms.keys(), 10 * MAX_WRITERS_PER_CALL)
        if type(key) is str and 0 < len(key) <= MAX_ROOM_CHARS
    ]


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

    def answers_by(self, deadline: float) -> contextlib.AbstractContextManager[None]:
        """Within this block, this thread waits for no server answer past ``deadline``
        (``time.monotonic()``): a call still unanswered then fails as a lost answer would."""

    def track_changes(self) -> Changes:
        """A new :class:`Changes` that this host fills with every oid committed from now on."""

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
        #: ``writer -> key of the last record read``; plain memory, never persisted.
        self._cursor: dict[str, tuple[float, str]] = {}
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
        # What to read next, from the oids the host said changed (see _absorb).
        self._changes: Changes | None = None  # made on the first read: a sender never drains it
        #: Where the pass over the streams index is: ``(last writer looked at, how many)``; None
        #: when no pass is due. A pass looks at every stream (first read, new writers, reconnect).
        self._scan: tuple[str | None, int] | None = (None, 0)
        self._scan_again = False  # the index changed during a pass: another one after it
        self._stale: set[str] = set()  # writers whose stream changed (or was not read to its end)
        self._index_oids: set[bytes] = set()  # the room and its streams index
        self._stream_oids: dict[bytes, str] = {}  # a stream's root and right edge -> writer
        self._writer_oids: dict[str, list[bytes]] = {}  # writer -> its stream's root, right edge
        self._tail_oids: dict[bytes, str] = {}  # a stream's Tail -> writer
        self._writer_tails: dict[str, bytes] = {}  # writer -> its Tail
        self._tail_stale: set[str] = set()  # writers whose Tail changed: maybe one new record there
        self._presence_stale = True
        self._presence_oids: set[bytes] = set()
        self._present: list[tuple[str, float]] | None = None

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
            if not isinstance(room.streams, OOBTree):
                raise TypeError("the room's streams are not a BTree")
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
        room = find_room(rooms, self.room)
        if room is None:
            room = Room(self.room, created=float(self._host.clock()))
            try:
                rooms[self.room] = room
            except TypeError:  # another client put keys there that do not compare with str
                rooms = conn.root()[ROOMS_KEY] = _str_keyed(rooms)
                rooms[self.room] = room
        return room

    @property
    def behind(self) -> bool:
        """True if the last read stopped at a per-call bound: the next call has more to read now."""
        return self._scan is not None or bool(self._stale)

    def new_messages(self, timeout: float | None = None) -> list[Message]:
        """Messages this session has not returned yet, oldest first.

        With ``timeout``, wait up to that many seconds for at least one, woken by the server's
        invalidations rather than by polling. Raises :class:`ZChatDisconnected` if the server is
        away (and, with ``timeout``, stays away that long). One call returns at most
        :data:`MAX_PER_CALL` messages; the next ones return the rest.
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
            if not self.behind:  # else: more to read at once (a slice of a very large room)
                self._host.wait_for_change(generation, remaining)

    def _poll(self) -> list[Message]:
        started = time.perf_counter()
        _, conn = self._host.connection()
        loads = getattr(conn, "_load_count", 0)  # objects this thread's connection loaded
        with self._lock:
            collected = self._collect()
            # Messages an updated_messages() poll gathered go first; updates may have refreshed them.
            found, self._fresh = self._fresh + collected, []
        loads = getattr(conn, "_load_count", 0) - loads
        cost = time.perf_counter() - started
        self._host.report("poll", room=self.room, cost=cost, count=len(found), loads=loads)
        return found

    def _absorb_changes(self, conn: Connection | None = None) -> None:
        """Turn the oids committed since the last call into what to read; before any ``begin()``.

        With ``conn`` (right after its ``begin()``): the commits its snapshot sees, so that they
        are read now and not once more by the next call. What is noted here stays noted until a
        read succeeds: a read that fails (server away) loses nothing.
        """
        if self._changes is None:
            self._changes = self._host.track_changes()
        before = getattr(getattr(conn, "_storage", None), "_start", None) if conn is not None else None
        if conn is not None and not isinstance(before, bytes):
            return
        everything, oids = self._changes.take(before)
        if everything:
            self._rescan()
            self._presence_stale = True
            return
        for oid in oids:
            writer = self._stream_oids.get(oid)
            if writer is not None:
                self._stale.add(writer)
            writer = self._tail_oids.get(oid)
            if writer is not None:  # its stream changed too (on a split, maybe only nodes not mapped)
                self._stale.add(writer)
                self._tail_stale.add(writer)
            if oid in self._index_oids:
                self._rescan()
            if oid in self._presence_oids:
                self._presence_stale = True

    def _rescan(self) -> None:
        if self._scan is None or self._scan == (None, 0):  # a pass from the start sees the change
            self._scan = (None, 0)
        else:  # the change came in the middle of a pass: one more after it
            self._scan_again = True

    def _collect(self) -> list[Message]:
        with self._lock:
            self._absorb_changes()
            if not self.behind:
                return []  # nothing of this room changed: no transaction, no load
            room = self._room()
            if room is None:
                return []
            assert room.streams is not None
            self._absorb_changes(self._host.connection()[1])
            epoch = _epoch_of(room)
            if self._epoch != epoch:
                if isinstance(epoch, str):
                    self._skip(f"epoch of room {self.room!r}", ValueError(epoch), once=True)
                self._cursor.clear()
                self._reset_amendments()
                self._stream_oids, self._writer_oids = {}, {}
                self._tail_oids, self._writer_tails, self._tail_stale = {}, {}, set()
                self._stale, self._scan, self._scan_again = set(), (None, 0), False
                self._epoch = epoch
                if self._backlog is not None:
                    ends = self._ends(room, prefetch=self._backlog > 0)
                    for writer, _, last in ends:
                        self._cursor[writer] = last
                        self._start[writer] = last
                    backlog, self._backlog = self._backlog, None
                    first = self._history(room, backlog, None, ends)
                    self._returned_ids.update(m.id for m in first)
                    return first
            return self._read(room)

    def _read(self, room: Room) -> list[Message]:
        """Read the changed streams and a slice of the pass over the index, within the bounds."""
        assert room.streams is not None
        _, conn = self._host.connection()
        cursor, stale, tails = dict(self._cursor), set(self._stale), self._tail_stale
        scan, again = self._scan, self._scan_again
        mapped: dict[str, list[bytes]] = {}
        tail_mapped: dict[str, bytes | None] = {}
        index_oids_now: set[bytes] | None = None
        found: list[tuple[str, Message | Event]] = []
        budget = MAX_PER_CALL

        def read(writer: str, stream: Any) -> bool:
            """Read ``writer``'s stream from the cursor, then what its tail holds past the stream;
            True if it has more than the budget allowed."""
            nonlocal budget
            items, consumed, more = self._read_stream(stream, writer, cursor, budget)
            budget -= consumed
            found.extend((writer, item) for item in items)
            mapped[writer] = self._edges(writer, stream)
            tail = tail_mapped[writer] = self._tail_oid(room, writer)
            if more is False and tail is not None:  # None: the stream is broken, so is the writer
                taken = self._read_held(conn, tail, writer, cursor, found, budget, from_stream=True)
                if taken is not None:
                    budget, more = budget - taken[0], taken[1]
            return bool(more)

        # The streams the server said changed, found by oid (no index lookup).
        for writer in sorted(stale)[:MAX_WRITERS_PER_CALL]:
            if budget <= 0:
                break
            if writer in tails:
                taken = self._read_held(conn, self._writer_tails.get(writer), writer, cursor, found, budget)
                if taken is not None:
                    budget -= taken[0]
                    if not taken[1]:
                        stale.discard(writer)
                    continue
            oids = self._writer_oids.get(writer)
            if not oids:  # not mapped (cannot happen but by a crafted record): the pass finds it
                stale.discard(writer)
                scan = scan if scan is not None else (None, 0)
                continue
            try:
                stream = conn.get(oids[0])
            except transaction.interfaces.TransientError:
                raise
            except Exception as exc:  # gone (packed away, crafted): the next pass looks again
                self._skip(f"stream {writer!r:.40}", exc, once=True)
                stale.discard(writer)
                scan = scan if scan is not None else (None, 0)
                continue
            if not read(writer, stream):
                stale.discard(writer)
        # A slice of the pass over every stream (new writers, first read, reconnect).
        if scan is not None and budget > 0:
            after, position = scan
            if after is None:  # a pass starts: note the indexes' nodes, whose change means a new pass
                tails_index = index_oids(room.tails) if isinstance(room.tails, OOBTree) else []
                index_oids_now = {
                    oid for oid in [room._p_oid, *index_oids(room.streams), *tails_index] if oid
                }
            # Not prefetched: pipelined loads behind a huge record make the server drop the
            # connection (its unread-output limit), so one crafted record could knock readers off.
            entries = self._index_slice(room, after, position)
            looked = 0
            for writer, stream in entries:
                looked += 1
                if not (type(writer) is str and 0 < len(writer) <= _ID_CHARS):
                    where = f"writer {_capped(writer, 40)} of room {self.room!r}"
                    self._skip(where, ValueError("a writer's key is not a short str"), once=True)
                    continue
                if not isinstance(stream, OOBTree):
                    bad = TypeError(f"a {type(stream).__name__}, not an OOBTree")
                    self._skip(f"stream {writer!r:.40}", bad, once=True)
                    continue
                if read(writer, stream):
                    stale.add(writer)
                if budget <= 0:
                    break
            if looked == len(entries) and len(entries) < MAX_WRITERS_PER_CALL:  # the pass is over
                scan, again = ((None, 0), False) if again else (None, False)
            else:
                scan = (entries[looked - 1][0] if looked else after, position + looked)
        absorbed = self._absorb(room, found, cursor)
        # Only now: an outage mid-read must neither skip nor repeat anything.
        self._cursor, self._stale, self._scan, self._scan_again = cursor, stale, scan, again
        if index_oids_now is not None:
            self._index_oids = index_oids_now
        for writer, oids in mapped.items():
            for oid in self._writer_oids.pop(writer, ()):
                self._stream_oids.pop(oid, None)
            self._writer_oids[writer] = oids
            for oid in oids:
                self._stream_oids[oid] = writer
        for writer, tail in tail_mapped.items():
            old_tail = self._writer_tails.pop(writer, None)
            if old_tail is not None:
                self._tail_oids.pop(old_tail, None)
            if tail is not None:
                self._writer_tails[writer] = tail
                self._tail_oids[tail] = writer
        self._tail_stale = tails & stale
        if mapped and self._changes is not None:
            # What its client fetches before it wakes this reader: a writer's Tail, else its stream's edge.
            self._changes.watched = frozenset(self._tail_oids) | frozenset(
                oid for oid, writer in self._stream_oids.items() if writer not in self._writer_tails
            )
        return absorbed

    def _tail_oid(self, room: Room, writer: str) -> bytes | None:
        """The oid of ``writer``'s :class:`Tail` (None: it has none, or the index is unusable)."""
        try:
            tail = room.tails.get(writer) if isinstance(room.tails, OOBTree) else None
        except transaction.interfaces.TransientError:
            raise
        except Exception:  # keys another client made incomparable: read its stream instead
            return None
        oid = getattr(tail, "_p_oid", None) if isinstance(tail, Tail) else None
        return oid if isinstance(oid, bytes) else None

    def _read_held(
        self,
        conn: Connection,
        oid: bytes | None,
        writer: str,
        cursor: dict[str, tuple[float, str]],
        found: list[tuple[str, Any]],
        budget: int,
        *,
        from_stream: bool = False,
    ) -> tuple[int, bool] | None:
        """Take ``writer``'s records after the cursor from its :class:`Tail` (at most ``budget``):
        how many were taken, and whether more are left there.

        Without ``from_stream`` only if the cursor is at the tail's base or at a record it holds
        (nearly always: the reader read the one before), else None: the caller reads the stream
        first. With it (the caller just read the stream to its end), the records past the cursor;
        None if the tail is gone or crafted.
        """
        after = cursor.get(writer)
        if oid is None or (after is None and not from_stream):
            return None
        try:
            tail = conn.get(oid)
            if not isinstance(tail, Tail):
                new = None
            elif from_stream:
                new = tail.past(after)
            else:
                new = tail.after(after)  # type: ignore[arg-type]
        except transaction.interfaces.TransientError:
            raise
        except Exception:  # unloadable or crafted: the stream says what is there
            new = None
        if new is None:
            return None
        taken = new[: max(budget, 0)]
        for key, record in taken:
            item = self._check(record, functools.partial(_place, writer, key), writer)
            if item is not None:
                found.append((writer, item))
        if taken:
            cursor[writer] = taken[-1][0]
        return len(taken), len(taken) < len(new)

    def _index_slice(self, room: Room, after: str | None, position: int) -> list[tuple[Any, Any]]:
        """Up to :data:`MAX_WRITERS_PER_CALL` entries of the streams index after ``after``."""
        assert room.streams is not None
        streams, n = room.streams, MAX_WRITERS_PER_CALL
        try:
            part = streams.items() if after is None else streams.items(after, excludemin=True)
            return list(itertools.islice(part, n))
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:  # keys another client made incomparable: go by position instead
            self._skip(f"streams index of room {self.room!r}", exc, once=True)
            try:
                return list(itertools.islice(streams.items(), position, position + n))
            except transaction.interfaces.TransientError:
                raise
            except Exception as again:
                self._skip(f"streams index of room {self.room!r}", again, once=True)
                return []

    def _edges(self, writer: str, stream: Any) -> list[bytes]:
        try:
            return _edge_oids(stream)
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:  # a crafted node: the stream is read again on the next pass
            self._skip(f"stream {writer!r:.40}", exc, once=True)
            return []

    def _read_stream(
        self, stream: Any, writer: str, cursor: dict[str, tuple[float, str]], limit: int
    ) -> tuple[list[Message | Event], int, bool | None]:
        """Up to ``limit`` records of ``stream`` after ``cursor[writer]``, moving the cursor past them.

        Returns them (bad ones skipped), how many entries were read and whether the stream has more
        (None: it could not be read).
        """
        after = cursor.get(writer)
        try:
            if not isinstance(stream, OOBTree):
                raise TypeError(f"the stream is a {type(stream).__name__}, not an OOBTree")
            part = stream.items() if after is None else stream.items(after, excludemin=True)
            entries = list(itertools.islice(part, limit + 1))
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:  # a crafted or broken record: report it, keep the others going
            self._skip(f"stream {writer!r:.40} after {_capped(after)}", exc)
            return [], 0, None
        more = len(entries) > limit
        entries = entries[:limit]
        if entries:
            last = entries[-1][0]
            if _is_key(last):  # past bad records too: each is reported once
                cursor[writer] = last
            else:
                self._skip(f"stream {writer!r:.40}", ValueError(f"bad key {_capped(last)}"), once=True)
                return [], 0, None
        # The place is named only if the record is bad: a repr per message costs more than its parse.
        found = (
            self._check(record, functools.partial(_place, writer, key), writer) for key, record in entries
        )
        return [m for m in found if m is not None], len(entries), more

    def _prefetch(self, room: Room, trees: list[Any], levels: int = 4) -> None:
        try:
            if self._host.is_connected():  # else the loads fail in ZEO's thread, where nobody hears them
                _prefetch_edges(room, trees, levels)
        except transaction.interfaces.TransientError:
            raise
        except Exception:  # only a speed-up: the reads report what does not load
            log.debug("prefetching streams failed", exc_info=True)

    def _check(self, record: object, where: str | Callable[[], str], writer: str) -> Message | Event | None:
        """The record as a Message (of ``writer``) or an Event; None, reported at ``where``, if bad."""
        try:
            return parse_record(record, self._host.max_text_bytes, writer)
        except Exception as exc:  # any type: a crafted record may raise anything when inspected
            self._skip(where if isinstance(where, str) else where(), exc)
            return None

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

    def _ends(self, room: Room, *, prefetch: bool = True) -> list[tuple[str, _Records, tuple[float, str]]]:
        """``(writer, its records, last key)`` of each writer with records, checked.

        Loads each writer's :class:`Tail` and the stream's last bucket it names, not the tree above
        it: a writer's newest records are there. A writer whose tail names no bucket (a small
        stream, a tail written before buckets were named) has the right edge of its tree loaded
        instead; no old bucket is read just to learn where a stream begins.

        ``prefetch``: ask for the tails, then the buckets (and the edges of the other trees) in a
        few pipelined round trips (history wants that; a reader starting at the end does without,
        see :meth:`_read`).

        Looks at the first ``10 * MAX_WRITERS_PER_CALL`` streams of the index (every stream of
        any real room); a larger index is reported once in ``skipped``.
        """
        assert room.streams is not None
        cap = 10 * MAX_WRITERS_PER_CALL
        if prefetch:  # the two indexes in one round trip
            self._prefetch(room, [room.streams, room.tails], levels=1)
        try:
            streams = list(itertools.islice(room.streams.items(), cap + 1))
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:
            self._skip(f"streams index of room {self.room!r}", exc, once=True)
            return []
        if len(streams) > cap:
            self._skip(f"streams of room {self.room!r}", ValueError(f"more than {cap} writers"), once=True)
            streams = streams[:cap]
        tails = self._tails(room, streams)
        buckets = self._last_buckets(room, tails, prefetch=prefetch)
        if prefetch:  # the trees of the writers whose tail names no last bucket
            self._prefetch(room, [stream for writer, stream in streams if writer not in buckets])
        ends = []
        for writer, stream in streams:
            try:
                if not (type(writer) is str and isinstance(stream, OOBTree)):
                    raise TypeError(f"a {type(stream).__name__} under {_capped(writer, 40)}")
                bucket = buckets.get(writer)
                if bucket is not None:  # the tail's records past the bucket; the tree is not loaded
                    records = _Records(stream, tails[writer].past(bucket.maxKey()) or (), bucket)
                else:
                    records = _Records(stream, room.unflushed(writer, stream))
                    if not (records.extra or stream):
                        continue
                last = records.last()
                # an infinite or NaN time would make history's window search run for ever
                if not _is_key(last):
                    raise ValueError(f"bad last key {_capped(last, 40)}")
            except transaction.interfaces.TransientError:
                raise
            except Exception as exc:
                self._skip(f"ends of stream {_capped(writer, 40)}", exc, once=True)
                continue
            ends.append((writer, records, last))
        return ends

    @staticmethod
    def _tails(room: Room, streams: list[tuple[Any, Any]]) -> dict[str, Tail]:
        """``writer -> Tail`` for each of ``streams``' writers that has one (ghosts: not loaded)."""
        try:
            tails = room.tails if isinstance(room.tails, OOBTree) else None
            found = [(writer, tails.get(writer)) for writer, _ in streams] if tails is not None else []
        except transaction.interfaces.TransientError:
            raise
        except Exception:  # keys another client made incomparable: each is looked up on its own
            return {}
        return {writer: tail for writer, tail in found if isinstance(tail, Tail) and type(writer) is str}

    def _last_buckets(self, room: Room, tails: dict[str, Tail], *, prefetch: bool) -> dict[str, OOBucket]:
        """``writer -> its stream's last bucket`` as its tail names it, for the tails that do and
        whose bucket loads (the tails, then the buckets, each in one round trip with ``prefetch``)."""
        if prefetch:
            self._prefetch(room, list(tails.values()), levels=1)
        named: dict[str, Any] = {}
        for writer, tail in tails.items():
            try:
                if isinstance(tail.bucket, OOBucket):  # loads the tail; checked_bucket() checks it
                    named[writer] = tail.bucket
            except transaction.interfaces.TransientError:
                raise
            except Exception:  # a tail that does not load: its writer is read from the tree
                continue
        if prefetch and named:
            self._prefetch(room, list(named.values()), levels=1)
        buckets = {}
        for writer in named:
            try:
                bucket = tails[writer].checked_bucket()
            except transaction.interfaces.TransientError:
                raise
            except Exception:
                continue
            if bucket is not None:
                buckets[writer] = bucket
        return buckets

    def _older(self, writer: str, records: _Records, low: float) -> bool:
        """Whether ``writer`` has a key older than time ``low`` (one descent, O(log N))."""
        try:
            return records.has_before((low,))  # every (time, id) with time < low is below (low,)
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:
            self._skip(f"history of {writer!r:.40}", exc)
            return False

    def _history(
        self, room: Room, n: int, before: Message | None, ends: list[tuple[str, Any, Any]] | None = None
    ) -> list[Message]:
        if n == 0:
            return []
        if ends is None:
            ends = self._ends(room)
        if not ends:
            return []
        top: tuple[float, str] | None = before.key if before is not None else None
        start = max(last[0] for _, _, last in ends)
        if top is not None:
            start = min(start, top[0])
        if room.amends is not None:
            try:
                self._prefetch(room, list(itertools.islice(room.amends.values(), 10 * MAX_WRITERS_PER_CALL)))
            except transaction.interfaces.TransientError:
                raise
            except Exception:
                log.debug("prefetching the amendments failed", exc_info=True)
        window = 1.0
        for _round in range(_MAX_WINDOW_ROUNDS):  # finite heads end it far sooner; a cap all the same
            # Only the streams that have messages between low and top; each read is O(log N).
            low = start - window
            items: list[tuple[Any, str, Any]] = []
            for writer, records, last in ends:
                if last[0] < low:
                    continue
                try:
                    # Amendments share the streams: only message records count towards n.
                    items.extend(
                        (key, writer, record)
                        for key, record in records.items((low,), top, excludemax=top is not None)
                        if not is_event_record(record)
                    )
                except transaction.interfaces.TransientError:
                    raise
                except Exception as exc:
                    self._skip(f"history of {writer!r:.40}", exc)
            # Short of n, widen only while some stream reaches back past the window.
            if len(items) >= n or not any(self._older(writer, records, low) for writer, records, _ in ends):
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
        host = self._host
        message = Message(
            uuid.uuid4().hex, host.user, text, float(host.clock()), reply_to=parent, writer=host.writer
        )
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
        result = stored[0]
        if result.writer != writer or result.verified != verified:
            result = dataclasses.replace(result, writer=writer, verified=verified)
        return result

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

    def join(self, user: str | None = None) -> None:
        """Say that this client shows the room to ``user`` (default: this client's user) from now on.

        Also renews the lease: the widget calls it when it shows a room and every
        ``heartbeat_interval`` (10 minutes); nobody else rereads presence in between.
        """
        user = self._host.user if user is None else check_author(user)
        writer, now = self._host.writer, float(self._host.clock())

        def enter(conn: Connection) -> None:
            self._room_in(conn).join(user, writer, now)

        self._commit(enter, what=f"joining {self.room!r}")

    #: The name of :meth:`join` before presence was a lease: it still works.
    heartbeat = join

    def leave(self, user: str | None = None) -> None:
        """Say that this client no longer shows the room to ``user`` (a widget closes or switches room)."""
        user = self._host.user if user is None else check_author(user)
        writer = self._host.writer

        def exit_(conn: Connection) -> None:
            self._room_in(conn).leave(user, writer)

        self._commit(exit_, what=f"leaving {self.room!r}")

    def present(self, within: float = 90.0) -> list[str]:
        """Users who joined this room, or renewed their lease, at most ``within`` seconds ago.

        Reads the room's presence trees only when they changed since the last call.
        """
        with self._lock, server_boundary(self._host.address_text, lambda: self._host.restart_hint):
            self._absorb_changes()
            if self._presence_stale or self._present is None:
                room = self._room()
                if room is None:
                    return []
                self._absorb_changes(self._host.connection()[1])
                self._present = room.presence_entries(10 * MAX_WRITERS_PER_CALL)
                # The room too: a first members tree is set on it.
                oids = [room._p_oid, *index_oids(room.members), *index_oids(room.presence)]
                self._presence_oids = {oid for oid in oids if oid is not None}
                self._presence_stale = False
            since = float(self._host.clock()) - within
            return sorted({user for user, when in self._present if when >= since})

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
                for key, record in itertools.chain(stream.items(), room.unflushed(writer, stream)):
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
        if seen is None or event.target_key > seen:
            return False
        start = self._start.get(event.target_writer)
        return start is None or event.target_key > start

    def _load_message(self, room: Room, writer: str, key: tuple[float, str]) -> Message | None:
        assert room.streams is not None
        try:
            stream = room.streams.get(writer)
            record = stream.get(key) if isinstance(stream, OOBTree) else None
            if record is None and isinstance(stream, OOBTree):  # maybe still in the writer's tail
                record = dict(room.unflushed(writer, stream)).get(key)
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:  # keys another client made incomparable
            self._skip(f"{writer!r:.40}@{key!r:.60}", exc, once=True)
            return None
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
            # Every answer this attempt waits for (loads, vote, finish) comes by the send's
            # deadline, or the attempt fails as if the server were lost: a send ends in its timeout.
            with host.answers_by(deadline):
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
            pause = min(pause, max(0.0, deadline - time.monotonic()))
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
