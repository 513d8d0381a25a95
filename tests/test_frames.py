"""The widget's wire protocol: what a view may send is parsed into frames or rejected."""

from __future__ import annotations

from typing import Any

import pytest

from zchat_nb.frames import (
    Append,
    Before,
    FrameError,
    Hello,
    Older,
    OlderBatch,
    Reset,
    Send,
    SendFailed,
    Sent,
    parse_view_frame,
)


@pytest.mark.parametrize(
    ("content", "frame"),
    [
        ({"type": "hello", "view": "v-1"}, Hello("v-1")),
        (
            {"type": "send", "text": "hi", "client_id": "c-1", "room": "lab"},
            Send("hi", "c-1", "lab"),
        ),
        # The text is checked where it is sent, so that the view hears why it was not.
        ({"type": "send", "text": None, "client_id": "c-2", "room": "lab"}, Send(None, "c-2", "lab")),
        ({"type": "older", "view": "v", "room": None, "before": None}, Older("v", None, None)),
        (
            {"type": "older", "view": "v", "room": "lab", "before": {"id": "m1", "ts": 5}},
            Older("v", "lab", Before("m1", 5.0)),
        ),
    ],
)
def test_frames_from_a_view_are_parsed(content: dict[str, Any], frame: object) -> None:
    assert parse_view_frame(content) == frame


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([1, 2], "an object, not list"),
        ("hello", "an object, not str"),
        ({"type": "nonsense"}, "unknown frame type 'nonsense'"),
        ({"view": "v"}, "unknown frame type None"),
        ({"type": "hello"}, "'view' must be a str"),
        ({"type": "hello", "view": ""}, "'view' must be a str"),
        ({"type": "hello", "view": "v" * 65}, "'view' must be a str of 1-64"),
        ({"type": "send", "text": "hi", "room": "lab"}, "'client_id' must be a str"),
        ({"type": "send", "text": "hi", "client_id": "c", "room": 7}, "'room' must be a str"),
        ({"type": "older", "view": 5}, "'view' must be a str"),
        ({"type": "older", "view": "v", "room": ["lab"]}, "'room' must be a str or null"),
        ({"type": "older", "view": "v", "before": "m1"}, "'before' must be an object or null"),
        ({"type": "older", "view": "v", "before": {"id": 3, "ts": 1.0}}, "'id' must be a str"),
        ({"type": "older", "view": "v", "before": {"id": "m", "ts": "x"}}, "'before.ts' must be a finite"),
        ({"type": "older", "view": "v", "before": {"id": "m", "ts": float("nan")}}, "finite number"),
        ({"type": "older", "view": "v", "before": {"id": "m", "ts": True}}, "finite number"),
    ],
)
def test_malformed_frames_are_rejected_saying_why(content: object, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        parse_view_frame(content)


def test_frames_to_the_views_carry_their_type_and_view() -> None:
    payload = {"id": "m1", "html": "<p>hi</p>"}
    assert Reset("v", "lab", [payload], True).to_wire() == {
        "type": "reset",
        "view": "v",
        "room": "lab",
        "messages": [payload],
        "more": True,
    }
    assert Append("lab", [payload]).to_wire() == {
        "type": "append",
        "view": None,
        "room": "lab",
        "messages": [payload],
    }
    assert OlderBatch(None, "lab", [], False).to_wire() == {
        "type": "older",
        "view": None,
        "room": "lab",
        "messages": [],
        "more": False,
    }
    assert Sent("c-1", "m1").to_wire() == {"type": "sent", "view": None, "client_id": "c-1", "id": "m1"}
    assert SendFailed("c-1", "not sent: x").to_wire() == {
        "type": "send_failed",
        "view": None,
        "client_id": "c-1",
        "error": "not sent: x",
    }
    assert Append("lab", [payload]).to_wire()["messages"][0] is payload  # not copied
