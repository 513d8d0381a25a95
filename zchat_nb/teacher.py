"""Teacher tools: export a room, clear it, pack the storage.

Functions that take a connected :class:`~zchat_nb.client.ChatClient`::

    from zchat_nb import teacher

    client = zchat_nb.connect("192.0.2.10:8100", tls="classroom/students/teacher")
    frame = teacher.to_dataframe(client, "general")      # pandas: id, author, text, time, datetime
    teacher.export(client, "general", "general.csv")     # CSV (no pandas needed)
    teacher.export(client, "general", "general.md", format="md")   # a readable transcript
    teacher.clear_room(client, "general")                # every reader starts afresh
    teacher.pack(client)                                 # the server frees the cleared messages' space

On the command line: ``zchat-nb export ROOM --format csv|md [-o FILE]``, ``zchat-nb clear ROOM --yes``
and ``zchat-nb pack``. Clearing keeps the data on disk until the storage is packed; packing drops
every old revision, so ZODB's undo history goes with it.
"""

from __future__ import annotations

import csv
import datetime
import html
import io
import json
import logging
import os
import re
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar

from .exceptions import ZChatError, server_boundary
from .model import ROOMS_KEY, Message, Room, commit

if TYPE_CHECKING:
    from ZODB.Connection import Connection

    from .client import ChatClient

__all__ = [
    "COLUMNS",
    "clear_room",
    "export",
    "messages",
    "pack",
    "to_csv",
    "to_dataframe",
    "to_markdown",
]

log = logging.getLogger(__name__)

#: The columns of every export, in order.
COLUMNS = (
    "id",
    "author",
    "text",
    "time",
    "datetime",
    "reply_to",
    "edited",
    "deleted",
    "reactions",
    "verified",
)
_T = TypeVar("_T")
#: Cells a spreadsheet would run as a formula (CSV injection); :func:`to_csv` defuses them.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _read_room(client: ChatClient, name: str, action: Callable[[Room], _T]) -> _T:
    """Run ``action(room)`` on a fresh snapshot of this thread's connection: all that was committed."""
    tm, conn = client.connection()
    with server_boundary(client.address_text, lambda: client.restart_hint):
        tm.begin()
        try:
            return action(_find_room(client, conn, name))
        finally:
            tm.abort()


def _find_room(client: ChatClient, conn: Any, name: str) -> Room:
    rooms = conn.root().get(ROOMS_KEY)
    room = rooms.get(name) if rooms is not None else None
    if not isinstance(room, Room):
        known = ", ".join(repr(n) for n in rooms) if rooms is not None else ""
        raise ZChatError(f"no room {name!r} at {client.address_text}; rooms there: {known or 'none'}")
    return room


def messages(client: ChatClient, room: str) -> list[Message]:
    """Every message of ``room`` in time order, in its current state (edits applied, deleted ones
    with text ""); records that fail the checks are skipped and logged."""
    _read_room(client, room, lambda found: None)  # says which rooms there are if it is missing
    return client.session(room).everything()


def _utc(when: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc)


def to_dataframe(client: ChatClient, room: str) -> Any:
    """``room`` as a pandas DataFrame: id, author, text, time (epoch seconds), datetime (UTC).

    pandas is optional: this raises ImportError naming the fix when it is missing.
    """
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError(
            "to_dataframe() needs pandas: `pip install pandas`, or export CSV without it "
            "(zchat_nb.teacher.export(client, room, 'room.csv'))"
        ) from exc
    found = messages(client, room)
    frame = pd.DataFrame(
        {
            "id": pd.Series([m.id for m in found], dtype="object"),
            "author": pd.Series([m.author for m in found], dtype="object"),
            "text": pd.Series([m.text for m in found], dtype="object"),
            "time": pd.Series([m.time for m in found], dtype="float64"),
        }
    )
    frame["datetime"] = pd.to_datetime(frame["time"], unit="s", utc=True)
    frame["reply_to"] = pd.Series([m.reply_to for m in found], dtype="object")
    frame["edited"] = pd.Series([m.edited for m in found], dtype="float64")
    frame["deleted"] = pd.Series([m.deleted for m in found], dtype="bool")
    frame["reactions"] = pd.Series([dict(m.reactions) for m in found], dtype="object")
    frame["verified"] = pd.Series([m.verified for m in found], dtype="bool")
    return frame


def _defuse(cell: str) -> str:
    """Keep a spreadsheet from running a cell as a formula: prefix it with an apostrophe."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def _write_csv(found: list[Message], out: IO[str], *, spreadsheet_safe: bool) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    clean = _defuse if spreadsheet_safe else str
    for m in found:
        writer.writerow(
            [
                m.id,
                clean(m.author),
                clean(m.text),  # "" for a deleted message: its text is never exported
                repr(m.time),
                _utc(m.time).isoformat(),
                m.reply_to or "",
                repr(m.edited) if m.edited is not None else "",
                m.deleted,
                _reactions_json(m),
                m.verified,
            ]
        )


def _reactions_json(m: Message) -> str:
    return json.dumps({emoji: list(users) for emoji, users in m.reactions.items()}, ensure_ascii=False)


def to_csv(client: ChatClient, room: str, *, spreadsheet_safe: bool = True) -> str:
    """``room`` as CSV text with a header row: id, author, text, time, datetime (ISO 8601, UTC).

    With ``spreadsheet_safe`` (the default) an author or text starting with ``= + - @`` gets a leading
    apostrophe, so that a spreadsheet opening the file shows it instead of running it as a formula.
    """
    out = io.StringIO()
    _write_csv(messages(client, room), out, spreadsheet_safe=spreadsheet_safe)
    return out.getvalue()


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+\-.!|~])")


def _md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def _markdown(room: str, found: list[Message], tz: datetime.tzinfo | None, source: str) -> str:
    def local(when: float) -> datetime.datetime:
        return _utc(when).astimezone(tz)  # tz=None: this machine's zone

    lines = [f"# Chat transcript: {_md_escape(room)}", ""]
    if found:
        first, last = local(found[0].time), local(found[-1].time)
        authors = sorted({m.author for m in found})
        lines += [
            f"{len(found)} messages from {len(authors)} people, {first:%Y-%m-%d %H:%M} to "
            f"{last:%Y-%m-%d %H:%M} (UTC{first:%z}), exported from {source}.",
            "",
            "Participants: " + ", ".join(_md_escape(a) for a in authors) + ".",
        ]
    else:
        lines.append(f"No messages (exported from {source}).")
    day = None
    signed = any(m.verified for m in found)  # marks only where some names are proved
    for m in found:
        when = local(m.time)
        if when.date() != day:
            day = when.date()
            lines += ["", f"## {day:%A %d %B %Y}"]
        # The mark comes after the escaped, bold name: a name cannot carry it (no "**" in a name).
        mark = (" · verified" if m.verified else " · not verified") if signed else ""
        edited = " · edited" if m.edited is not None and not m.deleted else ""
        reply = f" · in reply to {m.reply_to}" if m.reply_to else ""
        lines += ["", f"**{_md_escape(m.author)}**{mark} · {when:%H:%M:%S}{edited}{reply}", ""]
        if m.deleted:
            lines.append("> *message deleted*")
            continue
        # A quote keeps the message's own Markdown (lists, code) inside its block; its HTML is
        # escaped: a viewer of the transcript must not run <script> or <img onerror> someone typed.
        text = html.escape(m.text, quote=False)
        lines += [f"> {line}" if line.strip() else ">" for line in text.splitlines() or [""]]
        if m.reactions:
            lines += [
                ">",
                "> " + "  ".join(f"{e} {_md_escape(', '.join(u))}" for e, u in m.reactions.items()),
            ]
    return "\n".join(lines) + "\n"


def to_markdown(client: ChatClient, room: str, *, tz: datetime.tzinfo | None = None) -> str:
    """``room`` as a Markdown transcript: a heading per day, each message as author, time and a quote.

    Times are shown in ``tz`` (default: this machine's time zone).
    """
    return _markdown(room, messages(client, room), tz, client.address_text)


def export(
    client: ChatClient,
    room: str,
    file: str | os.PathLike[str] | IO[str],
    *,
    format: str = "csv",
    tz: datetime.tzinfo | None = None,
    spreadsheet_safe: bool = True,
) -> int:
    """Write ``room`` to ``file`` (a path or a text stream) as ``"csv"`` or ``"md"``; returns the count.

    ``tz`` is for the transcript's times, ``spreadsheet_safe`` for CSV cells (see :func:`to_csv`).
    """
    if format not in ("csv", "md"):
        raise ZChatError(f"unknown export format {format!r}: use 'csv' or 'md'")
    found = messages(client, room)

    def write(out: IO[str]) -> None:
        if format == "csv":
            _write_csv(found, out, spreadsheet_safe=spreadsheet_safe)
        else:
            out.write(_markdown(room, found, tz, client.address_text))

    if isinstance(file, (str, os.PathLike)):
        with open(file, "w", encoding="utf-8", newline="") as out:
            write(out)
    else:
        write(file)
    return len(found)


def clear_room(client: ChatClient, room: str) -> int:
    """Delete every message of ``room`` for everyone; returns how many there were.

    Each reader notices the room's new epoch and starts its cursor afresh. The data stays in the
    storage until :func:`pack`. Conflicts and a server away are retried within the client's
    ``timeout``, as sends are (the same commit loop); then :class:`ZChatSendError` says so.
    """

    def clear(conn: Connection) -> int:
        found = _find_room(client, conn, room)
        count = found.message_count()  # walks the streams: no shared counter to keep writers apart
        found.clear()
        return count

    return commit(
        client,
        clear,
        what=f"clearing room {room!r}",
        room=room,
        undone="the room was not cleared",
        maybe="it may have been cleared; look before clearing again",
    )


def pack(client: ChatClient, days: float = 0.0) -> None:
    """Pack the server's storage: drop revisions older than ``days`` and whatever no longer is reachable.

    Runs on the server (through ZEO's ``pack`` call) and returns when it is done.
    """
    if days < 0:
        raise ZChatError(f"pack(days={days}) needs days >= 0")
    with server_boundary(client.address_text, lambda: client.restart_hint):
        client.db.pack(days=days)
