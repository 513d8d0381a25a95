"""The chat widget's wire protocol: one small dataclass per frame, each with a ``Literal`` type.

Frames travel as anywidget custom messages, ``{"type": ..., ...}``. A view may send anything, so
what comes from a view goes through :func:`parse_view_frame`, which returns a frame or raises
:class:`FrameError`; what the kernel sends is built as a frame and turned into a dict by
:meth:`to_wire`. ``view`` names the view a frame is for (``None``: every view)::

    view -> kernel
      Hello   {"type": "hello", "view": V}                    a view was drawn: send it the room
      Send    {"type": "send", "text": T, "client_id": C, "room": R}
      Older   {"type": "older", "view": V, "room": R|null, "before": {"id": I, "ts": F}|null}
    kernel -> views
      Reset       {"type": "reset", "view": V|null, "room": R, "messages": [...], "more": bool}
      Append      {"type": "append", "view": null, "room": R, "messages": [...]}   only the new ones
      OlderBatch  {"type": "older", "view": V|null, "room": R, "messages": [...], "more": bool}
      Sent        {"type": "sent", "view": null, "client_id": C, "id": message id}
      SendFailed  {"type": "send_failed", "view": null, "client_id": C, "error": text}

Each of ``messages`` is :func:`zchat_nb.render.message_payload`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Append",
    "Before",
    "FrameError",
    "Hello",
    "Older",
    "OlderBatch",
    "Reset",
    "Send",
    "SendFailed",
    "Sent",
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


ViewFrame = Hello | Send | Older


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


def parse_view_frame(content: object) -> ViewFrame:
    """The frame a view sent, or :class:`FrameError` saying what is wrong with it."""
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
    raise FrameError(f"unknown frame type {kind!r:.40}: expected 'hello', 'send' or 'older'")


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
class SendFailed(_Frame):
    client_id: str
    error: str
    view: None = None
    type: Literal["send_failed"] = "send_failed"
