"""Amendments: edits, deletes and reactions, and how a reader folds them into a message's state.

A message is never changed in place. Whoever edits, deletes or reacts appends an *event record* to
their own stream (the same ``(time, id)`` keys as messages), so an amendment costs what a message
costs and concurrent writers still do not conflict. The writer also keeps an index of its own,
``Room.amends[writer]``: ``target key -> the latest of its events on that target``, so that a
reader can find the amendments of any window of messages without reading every stream.

Order: each event carries a ``version``, one more than the highest the writer could see on the
target when it wrote. Readers apply events by ``(version, writer, event id)``: an amendment made
after another one was seen always comes after it, and concurrent ones are ordered the same way by
every reader, whatever the clocks. A delete is final.

Who may: without certificates, nothing proves who wrote what, so an edit or delete counts only if it
comes from the stream (the client) that wrote the message. With a classroom certificate a signed
edit or delete counts if its signer is the message's verified author, and a verified teacher's
delete counts on any message. :func:`fold` applies these rules; what it refuses is reported.

Records are plain tuples of ``str``, ``int`` and ``float`` (see :data:`EVENT_TAG`), checked on
reading like messages: another client may have written anything.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "DELETE",
    "EDIT",
    "EVENT_TAG",
    "KINDS",
    "MESSAGE_TAG",
    "REACT",
    "REACTIONS",
    "UNREACT",
    "Event",
    "Identity",
    "Seen",
    "canonical",
    "check_emoji",
    "fold",
    "mentions_in",
    "permission_error_text",
]

EDIT, DELETE, REACT, UNREACT = "edit", "delete", "react", "unreact"
KINDS = frozenset({EDIT, DELETE, REACT, UNREACT})
#: First field of an event record (a message record is a 4-tuple, or tagged :data:`MESSAGE_TAG`).
EVENT_TAG = "zchat.e1"
#: First field of a message record that carries a reply or a signature.
MESSAGE_TAG = "zchat.m1"
#: The widget's fixed set; the API takes any one short emoji (see :func:`check_emoji`).
REACTIONS = ("👍", "❤️", "😂", "🎉", "❓", "✅")
#: Distinct emoji one writer keeps on one message (bounds the index entry a reader checks).
MAX_EMOJI_PER_MESSAGE = 8
MAX_EMOJI_CODEPOINTS = 8
_ID_CHARS = 32
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
MAX_SIGNATURE_CHARS = 256
MAX_WRITER_CHARS = 64
NO_REACTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType({})

# ZWJ and the tag characters are the only format characters an emoji sequence needs; the rest
# (bidi overrides, invisible separators) would let a "reaction" carry hidden text.
_EMOJI_FORMAT = {0x200D} | set(range(0xE0020, 0xE0080))
_MENTION = re.compile(r"(?<![\w@])@([A-Za-z0-9][A-Za-z0-9._-]{0,63})")


def check_emoji(emoji: object) -> str | None:
    """``emoji`` if it is one short emoji (symbols and their modifiers only), else None."""
    if not isinstance(emoji, str) or not 0 < len(emoji) <= MAX_EMOJI_CODEPOINTS:
        return None
    if unicodedata.category(emoji[0]) != "So":
        return None
    for char in emoji[1:]:
        category = unicodedata.category(char)
        if category in ("So", "Sk", "Mn", "Me"):
            continue
        if category == "Cf" and ord(char) in _EMOJI_FORMAT:
            continue
        return None
    return emoji


def mentions_in(text: str) -> tuple[str, ...]:
    """The ``@name`` mentions of ``text``, in order, each once (a trailing dot is punctuation)."""
    found = (m.group(1).rstrip(".") for m in _MENTION.finditer(text))
    return tuple(dict.fromkeys(name for name in found if name))


def canonical(room: str, writer: str, fields: Iterable[object]) -> bytes:
    """The bytes a signature covers: the room, the writer's stream and the record's fields.

    Binding the room and the stream keeps a signed record from being replayed anywhere else.
    JSON writes floats with ``repr``, so a time survives the round trip exactly.
    """
    payload = [room, writer, *fields]
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8", "surrogatepass")


def _check_id(value: object, what: str) -> str:
    if not (isinstance(value, str) and 0 < len(value) <= _ID_CHARS):
        raise ValueError(f"bad {what} {value!r:.40}")
    return value


def _check_time(value: object, what: str) -> float:
    if not (isinstance(value, float) and math.isfinite(value)):
        raise ValueError(f"bad {what} {value!r:.40}")
    return value


def check_seal(signer: object, signature: object) -> tuple[str, str]:
    """A record's certificate fingerprint and signature: both empty, or both well-formed."""
    if signer == "" and signature == "":
        return "", ""
    if not (isinstance(signer, str) and _FINGERPRINT.match(signer)):
        raise ValueError(f"bad signer fingerprint {signer!r:.80}")
    if not (isinstance(signature, str) and 0 < len(signature) <= MAX_SIGNATURE_CHARS):
        raise ValueError("bad signature")
    return signer, signature


@dataclass(frozen=True, slots=True)
class Event:
    """One edit, delete, react or unreact, as stored in its actor's stream."""

    id: str
    author: str
    time: float
    kind: str
    target_writer: str
    target_time: float
    target_id: str
    #: One more than the highest version the writer saw on the target.
    version: int
    #: The new text of an edit, the emoji of a reaction, "" for a delete.
    arg: str
    signer: str = ""
    signature: str = ""

    @property
    def key(self) -> tuple[float, str]:
        return (self.time, self.id)

    @property
    def target_key(self) -> tuple[float, str]:
        return (self.target_time, self.target_id)

    def signed_fields(self) -> tuple[Any, ...]:
        return self.to_record()[:-1]

    def to_record(self) -> tuple[Any, ...]:
        return (
            EVENT_TAG,
            self.id,
            self.author,
            self.time,
            self.kind,
            self.target_writer,
            self.target_time,
            self.target_id,
            self.version,
            self.arg,
            self.signer,
            self.signature,
        )

    @classmethod
    def from_record(cls, record: object, max_text_bytes: int, max_author: int = 64) -> Event:
        """Check an event record written by some client; ``ValueError`` says what is wrong."""
        if not (isinstance(record, tuple) and len(record) == 12 and record[0] == EVENT_TAG):
            raise ValueError("not an event record")
        _, id_, author, when, kind, t_writer, t_time, t_id, version, arg, signer, signature = record
        _check_id(id_, "event id")
        if not (isinstance(author, str) and 0 < len(author) <= max_author):
            raise ValueError(f"bad event author {author!r:.80}")
        _check_time(when, "event time")
        if kind not in KINDS:
            raise ValueError(f"bad event kind {kind!r:.20}")
        if not (isinstance(t_writer, str) and 0 < len(t_writer) <= MAX_WRITER_CHARS):
            raise ValueError(f"bad target writer {t_writer!r:.80}")
        _check_time(t_time, "target time")
        _check_id(t_id, "target id")
        if not (type(version) is int and 0 < version < 2**62):
            raise ValueError(f"bad event version {version!r:.30}")
        if not isinstance(arg, str):
            raise ValueError("event argument is not a str")
        if kind == EDIT:
            if len(arg) > max_text_bytes or len(arg.encode("utf-8", "surrogatepass")) > max_text_bytes:
                raise ValueError(f"edited text is over {max_text_bytes} bytes")
            if not arg.strip():
                raise ValueError("edited text is empty")
        elif kind in (REACT, UNREACT):
            if check_emoji(arg) is None:
                raise ValueError(f"bad reaction {arg!r:.40}")
        elif arg:
            raise ValueError("a delete carries no argument")
        signer, signature = check_seal(signer, signature)
        return cls(id_, author, when, kind, t_writer, t_time, t_id, version, arg, signer, signature)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid signature says wrote a record: the certificate's name, and whether a teacher."""

    name: str
    teacher: bool = False


@dataclass(frozen=True, slots=True)
class Seen:
    """An event as a reader found it: in which writer's stream, and who signed it (if anyone)."""

    writer: str
    event: Event
    signer: Identity | None = None

    @property
    def verified(self) -> bool:
        return self.signer is not None and self.signer.name == self.event.author


def permission_error_text(action: str, author: str, *, signed: bool) -> str:
    """Who may ``action`` a message by ``author``: the words of a ZChatPermissionError."""
    if signed:
        return f"only {author} (the message's verified author) may {action} this message" + (
            "; a verified teacher may delete any message" if action == DELETE else ""
        )
    return (
        f"only the client that sent this message ({author}'s) may {action} it: without a classroom "
        "certificate nothing proves who wrote what (connect with tls=FOLDER to edit from anywhere)"
        + ("; a verified teacher may delete any message" if action == DELETE else "")
    )


def refusal(
    seen: Seen, target_author: str, target_writer: str, target_verified: bool, *, strict: bool
) -> str | None:
    """Why ``seen`` does not count on its target, or None if it does."""
    event = seen.event
    if event.kind in (REACT, UNREACT):
        if strict and not seen.verified:
            return f"unsigned reaction by {event.author!r:.40} in a verified room"
        return None
    if event.kind == DELETE and seen.verified and seen.signer is not None and seen.signer.teacher:
        return None
    if target_verified:
        if seen.verified and event.author == target_author:
            return None
        return f"{event.kind} by {event.author!r:.40} of a verified message by {target_author!r:.40}"
    if seen.writer == target_writer and event.author == target_author:
        return None
    return (
        f"{event.kind} by {event.author!r:.40} (writer {seen.writer:.16}) "
        f"of a message of writer {target_writer:.16}"
    )


@dataclass(frozen=True)
class Folded:
    """A message's current state as :func:`fold` found it."""

    text: str
    edited: float | None
    deleted: bool
    reactions: Mapping[str, tuple[str, ...]]
    #: Highest version of any event on the message, accepted or not (the next event goes above it).
    version: int
    #: ``(event, why)`` for events that do not count.
    refused: tuple[tuple[Event, str], ...]


def fold(
    text: str,
    author: str,
    writer: str,
    verified: bool,
    events: Iterable[Seen],
    *,
    strict: bool,
) -> Folded:
    """Apply ``events`` to a message, in ``(version, writer, id)`` order; a delete is final.

    ``strict``: the reader verifies signatures (it holds the class CA), so unsigned reactions
    do not count either.
    """
    accepted: list[Seen] = []
    refused: list[tuple[Event, str]] = []
    version = 0
    for seen in events:
        version = max(version, seen.event.version)
        why = refusal(seen, author, writer, verified, strict=strict)
        if why is None:
            accepted.append(seen)
        else:
            refused.append((seen.event, why))
    accepted.sort(key=lambda s: (s.event.version, s.writer, s.event.id))
    edited: float | None = None
    deleted = False
    reacting: dict[tuple[str, str], bool] = {}
    for seen in accepted:
        event = seen.event
        if event.kind == DELETE:
            deleted = True
        elif event.kind == EDIT:
            text, edited = event.arg, event.time
        else:
            reacting[(event.arg, event.author)] = event.kind == REACT
    if deleted:
        return Folded("", edited, True, NO_REACTIONS, version, tuple(refused))
    return Folded(text, edited, False, _reactions(reacting), version, tuple(refused))


def _reactions(reacting: dict[tuple[str, str], bool]) -> Mapping[str, tuple[str, ...]]:
    users: dict[str, list[str]] = {}
    for (emoji, user), on in reacting.items():
        if on:
            users.setdefault(emoji, []).append(user)
    if not users:
        return NO_REACTIONS
    fixed = {emoji: i for i, emoji in enumerate(REACTIONS)}
    order = sorted(users, key=lambda e: (fixed.get(e, len(fixed)), e))
    return MappingProxyType({emoji: tuple(sorted(users[emoji])) for emoji in order})


def index_entry(previous: tuple[Any, ...], event: Event, parse: Any) -> tuple[Any, ...]:
    """A writer's new index value for a target: its latest edit, its delete, its latest per emoji.

    ``previous`` is the writer's own entry (records); ``parse`` turns a record into an Event or
    raises ValueError (an unreadable old entry is dropped).
    """
    kept: dict[tuple[str, str], tuple[Any, ...]] = {}
    for record in previous:
        try:
            old = parse(record)
        except ValueError:
            continue
        kept[_slot(old)] = record
    kept[_slot(event)] = event.to_record()
    return tuple(kept.values())


def _slot(event: Event) -> tuple[str, str]:
    if event.kind in (REACT, UNREACT):
        return ("reaction", event.arg)
    return (event.kind, "")
