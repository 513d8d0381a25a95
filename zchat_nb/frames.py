"""The chat widget's wire protocol: one small dataclass per frame, each with a ``Literal`` type.

Frames travel as anywidget custom messages, ``{"type": ..., ...}``. A view may send anything, so
what comes from a view goes through :func:`parse_view_frame`, which returns a frame or raises
:class:`FrameError`; what the kernel sends is built as a frame and turned into a dict by
:meth:`to_wire`. ``view`` names the view a frame is for (``None``: every view)::

    view -> kernel
      Hello   {"type": "hello", "view": V}                    a view was drawn: send it the room
      Send    {"type": "send", "text": T, "client_id": C, "room": R}   C is kept as the message id
                                                  when it can be one: a retry (same C) is stored once
      Name    {"type": "name", "name": N}             the visitor's display name (``ask_name`` only)
      Older   {"type": "older", "view": V, "room": R|null, "before": {"id": I, "ts": F}|null}
      Amend   {"type": "amend", "action": "edit"|"delete"|"react"|"unreact"|"reply", "id": I,
               "arg": T, "client_id": C, "room": R}          T: new text, emoji, reply text, ""
      Share   {"type": "share", "client_id": C, "room": R, "name": N, "caption": T}  + 1 buffer: the bytes
      AttachmentWanted {"type": "attachment", "view": V, "message": I, "index": i}
    kernel -> views
      Reset       {"type": "reset", "view": V|null, "room": R, "messages": [...], "more": bool}
      Append      {"type": "append", "view": null, "room": R, "messages": [...]}   only the new ones
      OlderBatch  {"type": "older", "view": V|null, "room": R, "messages": [...], "more": bool}
      Sent        {"type": "sent", "view": null, "client_id": C, "id": message id}
      SendFailed  {"type": "send_failed", "view": null, "client_id": C, "error": text}
      Update      {"type": "update", "view": null, "room": R, "messages": [...]}  changed ones, in place
      AttachmentData {"type": "attachment", "view": V, "message": I, "index": i, "mime": M,
                      "error": text}  + 1 buffer: the checked bytes (none when error is set)

Each of ``messages`` is :func:`zchat_nb.render.message_payload`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Amend",
    "Append",
    "AttachmentData",
    "AttachmentWanted",
    "Before",
    "FrameError",
    "Hello",
    "Name",
    "Older",
    "OlderBatch",
    "Reset",
    "Send",
    "SendFailed",
    "Sent",
    "Share",
    "Update",
    "ViewFrame",
    "parse_view_frame",
]

#: Longest view id, client id or message id a view may send.
MAX_ID_CHARS = 64

Payload = dict[str, Any]


class FrameError(ValueError):
    """What a view sent is not a frame of the protocol."""


class _Frame:
    def to_wire(self) -> dict[str, Any]:
        """The frame as the dict a view gets (shallow: the message payloads are not copied)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}  # type: ignore[arg-type]


# -- view -> kernel --------------------------------------------------------------------------


@dataclass(frozen=True)
class Before:
    """The oldest message a view shows: load older messages than this one."""

    id: str
    ts: float


@dataclass(frozen=True)
class Hello(_Frame):
    view: str
    type: Literal["hello"] = "hello"


@dataclass(frozen=True)
class Send(_Frame):
    #: Anything the view sent: it is checked where it is sent, so that the view hears why it failed.
    text: object
    client_id: str
    room: str
    type: Literal["send"] = "send"


@dataclass(frozen=True)
class Older(_Frame):
    view: str
    room: str | None
    before: Before | None
    type: Literal["older"] = "older"


@dataclass(frozen=True)
class Share(_Frame):
    """A picture pasted or dropped into a view's box; the kernel checks the bytes before sharing."""

    client_id: str
    room: str
    name: str
    caption: str
    data: bytes
    type: Literal["share"] = "share"


@dataclass(frozen=True)
class AttachmentWanted(_Frame):
    """A view shows a message with attachments: send it the bytes of one (checked by the kernel)."""

    view: str
    message: str
    index: int
    type: Literal["attachment"] = "attachment"


#: Longest file name a view may give a shared picture.
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class Name(_Frame):
    #: Anything the view sent: checked like any user name where it is used, so the view hears why.
    name: object
    type: Literal["name"] = "name"


@dataclass(frozen=True)
class Amend(_Frame):
    """Edit, delete, react to, unreact to or reply to the message ``id`` of ``room``."""

    action: Literal["edit", "delete", "react", "unreact", "reply"]
    id: str
    #: The new text, the emoji or the reply; checked where it is applied, like a Send's text.
    arg: object
    client_id: str
    room: str
    type: Literal["amend"] = "amend"


AMEND_ACTIONS = ("edit", "delete", "react", "unreact", "reply")

ViewFrame = Hello | Send | Older | Name | Amend | Share | AttachmentWanted


def _id(content: dict[str, Any], key: str) -> str:
    value = content.get(key)
    if not (isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS):
        raise FrameError(f"{key!r} must be a str of 1-{MAX_ID_CHARS} characters, not {value!r:.80}")
    return value


def _before(value: object) -> Before | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FrameError(f"'before' must be an object or null, not {value!r:.80}")
    ts = value.get("ts")
    if not (isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts)):
        raise FrameError(f"'before.ts' must be a finite number, not {ts!r:.40}")
    return Before(_id(value, "id"), float(ts))


def _share(content: dict[str, Any], buffers: Sequence[Any]) -> Share:
    room, name, caption = content.get("room"), content.get("name"), content.get("caption", "")
    if not isinstance(room, str):
        raise FrameError(f"'room' must be a str, not {room!r:.80}")
    if not (isinstance(name, str) and len(name) <= MAX_NAME_CHARS):
        raise FrameError(f"'name' must be a str of at most {MAX_NAME_CHARS} characters")
    if not isinstance(caption, str):
        raise FrameError(f"'caption' must be a str, not {caption!r:.80}")
    if len(buffers) != 1:
        raise FrameError(f"a share frame carries exactly one buffer (the bytes), not {len(buffers)}")
    return Share(_id(content, "client_id"), room, name, caption, bytes(buffers[0]))


def _attachment_wanted(content: dict[str, Any]) -> AttachmentWanted:
    index = content.get("index")
    if not (type(index) is int and 0 <= index < 16):
        raise FrameError(f"'index' must be a small int >= 0, not {index!r:.40}")
    return AttachmentWanted(_id(content, "view"), _id(content, "message"), index)


def parse_view_frame(content: object, buffers: Sequence[Any] = ()) -> ViewFrame:
    """The frame a view sent (with its binary ``buffers``), or :class:`FrameError` saying what is wrong."""
    if not isinstance(content, dict):
        raise FrameError(f"a frame is an object, not {type(content).__name__}")
    kind = content.get("type")
    if kind == "hello":
        return Hello(_id(content, "view"))
    if kind == "send":
        room = content.get("room")
        if not isinstance(room, str):
            raise FrameError(f"'room' must be a str, not {room!r:.80}")
        return Send(content.get("text"), _id(content, "client_id"), room)
    if kind == "older":
        room = content.get("room")
        if room is not None and not isinstance(room, str):
            raise FrameError(f"'room' must be a str or null, not {room!r:.80}")
        return Older(_id(content, "view"), room, _before(content.get("before")))
    if kind == "name":
        return Name(content.get("name"))
    if kind == "amend":
        action, room = content.get("action"), content.get("room")
        if action not in AMEND_ACTIONS:
            raise FrameError(f"'action' must be one of {', '.join(AMEND_ACTIONS)}, not {action!r:.40}")
        if not isinstance(room, str):
            raise FrameError(f"'room' must be a str, not {room!r:.80}")
        return Amend(action, _id(content, "id"), content.get("arg"), _id(content, "client_id"), room)
    if kind == "share":
        return _share(content, buffers)
    if kind == "attachment":
        return _attachment_wanted(content)
    raise FrameError(
        f"unknown frame type {kind!r:.40}: expected 'hello', 'send', 'older', 'name', 'amend', "
        "'share' or 'attachment'"
    )


# -- kernel -> views -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reset(_Frame):
    view: str | None
    room: str | None
    messages: list[Payload]
    more: bool
    type: Literal["reset"] = "reset"


@dataclass(frozen=True)
class Append(_Frame):
    room: str | None
    messages: list[Payload]
    view: None = None
    type: Literal["append"] = "append"


@dataclass(frozen=True)
class OlderBatch(_Frame):
    view: str | None
    room: str | None
    messages: list[Payload]
    more: bool
    type: Literal["older"] = "older"


@dataclass(frozen=True)
class Sent(_Frame):
    client_id: str
    id: str
    view: None = None
    type: Literal["sent"] = "sent"


@dataclass(frozen=True)
class AttachmentData(_Frame):
    """The bytes of one attachment for ``view`` (sent as the frame's one buffer), or why not."""

    view: str
    message: str
    index: int
    mime: str
    error: str = ""
    type: Literal["attachment"] = "attachment"


@dataclass(frozen=True)
class Update(_Frame):
    """Messages shown earlier, in their new state (edited, deleted, reacted to)."""

    room: str | None
    messages: list[Payload]
    view: None = None
    type: Literal["update"] = "update"


@dataclass(frozen=True)
class SendFailed(_Frame):
    client_id: str
    error: str
    view: None = None
    type: Literal["send_failed"] = "send_failed"
