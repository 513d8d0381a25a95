"""ChatWidget with a recording comm instead of a kernel: what it sends to the browser, and when.

Unit tests use ``ChatClient(ZODB.DB(None))``; those marked ``integration`` use a real ZEO server.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import comm
import pytest
import ZODB

import zchat_nb
from zchat_nb import ChatClient, Message, ZChatConnectionError, ZChatSendError
from zchat_nb.widget import BACKLOG, ChatWidget

TIMEOUT = 10.0


class RecordingComm:
    """Stands in for a kernel comm: records what the widget sends, lets a test play the browser."""

    kernel = "recording"  # ipywidgets only sends when the comm has a kernel

    def __init__(self, **kwargs: Any) -> None:
        self.comm_id = uuid.uuid4().hex
        self.opened_with = kwargs
        self.sent: list[dict[str, Any]] = []
        #: The binary buffers sent with each entry of :attr:`sent`.
        self.sent_buffers: list[list[bytes]] = []
        self.closed = False
        self._handler: Callable[[dict[str, Any]], None] | None = None
        self._changed = threading.Condition()

    # -- the comm API ipywidgets uses --
    def on_msg(self, callback: Callable[[dict[str, Any]], None]) -> None:
        self._handler = callback

    def send(self, data: dict[str, Any] | None = None, metadata: Any = None, buffers: Any = None) -> None:
        with self._changed:
            self.sent.append(data or {})
            self.sent_buffers.append([bytes(b) for b in buffers or []])
            self._changed.notify_all()

    def close(self, *args: Any, **kwargs: Any) -> None:
        self.closed = True

    # -- for tests --
    def custom(self, start: int = 0) -> list[dict[str, Any]]:
        """Custom messages (anywidget ``model.send``) sent since index ``start`` of :attr:`sent`."""
        with self._changed:
            return [d["content"] for d in self.sent[start:] if d.get("method") == "custom"]

    def mark(self) -> int:
        with self._changed:
            return len(self.sent)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], start: int = 0, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """The first custom message since ``start`` that satisfies ``predicate``; fails after ``timeout``."""
        found: list[dict[str, Any]] = []

        def match() -> bool:
            found[:] = [m for m in self.custom(start) if predicate(m)]
            return bool(found)

        with self._changed:
            if not self._changed.wait_for(match, timeout):
                raise AssertionError(f"no matching message within {timeout} s; got {self.custom(start)!r}")
        return found[0]

    def wait_state(
        self, name: str, predicate: Callable[[Any], bool], start: int = 0, timeout: float = TIMEOUT
    ) -> None:
        """Wait for a state update (since ``start``) of trait ``name`` whose value satisfies ``predicate``."""

        def match() -> bool:
            return any(
                d.get("method") == "update" and name in d["state"] and predicate(d["state"][name])
                for d in self.sent[start:]
            )

        with self._changed:
            if not self._changed.wait_for(match, timeout):
                updates = [d["state"] for d in self.sent if d.get("method") == "update"]
                raise AssertionError(f"no {name} update matching within {timeout} s; got {updates!r}")

    def from_view(self, content: dict[str, Any], buffers: list[bytes] | None = None) -> None:
        """Deliver a custom message as the browser's ``model.send(content, {}, buffers)`` would."""
        assert self._handler is not None
        data = {"method": "custom", "content": content}
        self._handler({"content": {"data": data}, "buffers": buffers or []})

    def buffers_of(self, content: dict[str, Any]) -> list[bytes]:
        """The buffers sent with the custom message ``content``."""
        with self._changed:
            for data, buffers in zip(self.sent, self.sent_buffers, strict=True):
                if data.get("method") == "custom" and data["content"] is content:
                    return buffers
        raise AssertionError(f"{content!r:.80} was not sent")

    def set_from_view(self, **state: Any) -> None:
        """Deliver a state change as the browser's ``model.set(...); model.save_changes()`` would."""
        assert self._handler is not None
        data = {"method": "update", "state": state, "buffer_paths": []}
        self._handler({"content": {"data": data}, "buffers": []})


@pytest.fixture
def comms(monkeypatch: pytest.MonkeyPatch) -> list[RecordingComm]:
    """Every comm a widget opens during the test, in order."""
    made: list[RecordingComm] = []

    def create_comm(**kwargs: Any) -> RecordingComm:
        made.append(RecordingComm(**kwargs))
        return made[-1]

    monkeypatch.setattr(comm, "create_comm", create_comm)
    return made


@pytest.fixture
def make_widget(comms: list[RecordingComm], client: ChatClient) -> Iterator[Callable[..., ChatWidget]]:
    widgets: list[ChatWidget] = []

    def make(room: str = "general", **kwargs: Any) -> ChatWidget:
        kwargs.setdefault("client", client)
        kwargs.setdefault("poll_interval", 0.05)
        widgets.append(ChatWidget(room=room, **kwargs))
        return widgets[-1]

    yield make
    for widget in widgets:
        widget.close()


def recorder(widget: ChatWidget) -> RecordingComm:
    assert isinstance(widget.comm, RecordingComm)
    return widget.comm


def hello(widget: ChatWidget, view: str = "view-1") -> dict[str, Any]:
    """Play a view being drawn; return the kernel's answer to it."""
    rec = recorder(widget)
    start = rec.mark()
    rec.from_view({"type": "hello", "view": view})
    return rec.wait_for(lambda m: m["type"] == "reset" and m["view"] == view, start)


def texts(batch: dict[str, Any]) -> list[str]:
    return [m["html"] for m in batch["messages"]]


def post(client: ChatClient, author: str, text: str, room: str = "general") -> Message:
    """Commit a message as ``author`` (another user of the same database)."""
    other = ChatClient(client.db, user=author)
    return other.session(room).add_message(text)


# -- first view, updates --------------------------------------------------------------------


def test_a_new_view_gets_the_last_messages_of_the_room(client: ChatClient, make_widget: Callable) -> None:
    for n in range(3):
        post(client, "bob", f"m{n}")
    widget = make_widget()
    answer = hello(widget)
    assert answer["room"] == "general"
    assert texts(answer) == ["<p>m0</p>", "<p>m1</p>", "<p>m2</p>"]
    assert answer["more"] is False


def test_an_update_carries_only_the_new_messages(client: ChatClient, make_widget: Callable) -> None:
    for n in range(5):
        post(client, "bob", f"old {n}")
    widget = make_widget()
    hello(widget)
    rec = recorder(widget)
    start = rec.mark()
    new = post(client, "bob", "brand new")
    update = rec.wait_for(lambda m: m["type"] == "append", start)
    assert [m["id"] for m in update["messages"]] == [new.id]
    assert update["view"] is None and update["room"] == "general"
    assert all("old" not in str(m) for m in rec.custom(start))


def test_two_views_each_get_their_own_first_batch(client: ChatClient, make_widget: Callable) -> None:
    post(client, "bob", "hi")
    widget = make_widget()
    first, second = hello(widget, "view-a"), hello(widget, "view-b")
    assert texts(first) == texts(second) == ["<p>hi</p>"]


def test_backlog_is_capped_and_older_messages_load_on_request(
    client: ChatClient, make_widget: Callable
) -> None:
    session = ChatClient(client.db, user="bob").session("general")
    sent = [session.add_message(f"n{n}") for n in range(BACKLOG + 50)]
    widget = make_widget()
    answer = hello(widget)
    assert [m["id"] for m in answer["messages"]] == [m.id for m in sent[-BACKLOG:]]
    assert answer["more"] is True

    rec = recorder(widget)
    start = rec.mark()
    oldest = answer["messages"][0]
    before = {"id": oldest["id"], "ts": oldest["ts"]}
    rec.from_view({"type": "older", "view": "view-1", "room": "general", "before": before})
    older = rec.wait_for(lambda m: m["type"] == "older", start)
    assert older["view"] == "view-1"
    assert [m["id"] for m in older["messages"]] == [m.id for m in sent[:50]]
    assert older["more"] is False


def test_load_older_method_sends_to_every_view(client: ChatClient, make_widget: Callable) -> None:
    session = ChatClient(client.db, user="bob").session("general")
    sent = [session.add_message(f"n{n}") for n in range(BACKLOG + 3)]
    widget = make_widget()
    hello(widget)
    start = recorder(widget).mark()
    widget.load_older()
    older = recorder(widget).wait_for(lambda m: m["type"] == "older", start)
    assert older["view"] is None
    assert [m["id"] for m in older["messages"]] == [m.id for m in sent[:3]]


@pytest.mark.parametrize(
    "payload",
    [
        "<img src=x onerror=alert(1)>",
        "<script>alert(1)</script>",
        "<svg onload=alert(1)>",
        "[x](javascript:alert(1))",
        '<iframe srcdoc="<script>alert(1)</script>">',
    ],
)
def test_messages_reach_the_browser_escaped(client: ChatClient, make_widget: Callable, payload: str) -> None:
    widget = make_widget()
    hello(widget)
    start = recorder(widget).mark()
    message = post(client, "mallory", payload)
    update = recorder(widget).wait_for(lambda m: m["type"] == "append", start)
    (shown,) = [m for m in update["messages"] if m["id"] == message.id]
    for tag in ("<img", "<script", "<svg", "<iframe", 'javascript:alert(1)"'):
        assert tag not in shown["html"]
    assert shown["author"] == "mallory"


def test_own_messages_are_marked(client: ChatClient, make_widget: Callable) -> None:
    post(client, "bob", "from bob")
    widget = make_widget()
    widget.send_message("from alice").result(TIMEOUT)
    rec = recorder(widget)
    rec.wait_for(lambda m: m["type"] == "append" and any(x["own"] for x in m["messages"]))
    answer = hello(widget)
    assert [(m["author"], m["own"]) for m in answer["messages"]] == [("bob", False), ("alice", True)]


# -- sending --------------------------------------------------------------------------------


def test_send_message_returns_the_committed_message(client: ChatClient, make_widget: Callable) -> None:
    widget = make_widget()
    message = widget.send_message("hello *world*").result(TIMEOUT)
    assert isinstance(message, Message)
    assert (message.author, message.text) == ("alice", "hello *world*")
    assert widget.last_sent == message
    assert client.session("general").history(5) == [message]


def test_a_send_from_the_view_is_acknowledged_after_the_commit(
    client: ChatClient, make_widget: Callable
) -> None:
    widget = make_widget()
    hello(widget)
    rec = recorder(widget)
    start = rec.mark()
    rec.from_view({"type": "send", "text": "typed", "client_id": "c-1", "room": "general"})
    ack = rec.wait_for(lambda m: m["type"] == "sent", start)
    assert ack["client_id"] == "c-1"
    (stored,) = client.session("general").history(5)
    assert stored.id == ack["id"] and stored.text == "typed"
    rec.wait_for(lambda m: m["type"] == "append" and m["messages"][0]["id"] == ack["id"], start)
    assert widget.error == ""


def test_a_retried_send_is_stored_once_under_its_client_id(client: ChatClient, make_widget: Callable) -> None:
    """The view's client id is the message id; a Retry (same id) after later sends stores nothing new."""
    widget = make_widget()
    rec = recorder(widget)
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    start = rec.mark()
    rec.from_view({"type": "send", "text": "one", "client_id": first, "room": "general"})
    rec.from_view({"type": "send", "text": "two", "client_id": second, "room": "general"})
    rec.wait_for(lambda m: m["type"] == "sent" and m["client_id"] == second, start)
    start = rec.mark()
    rec.from_view({"type": "send", "text": "one", "client_id": first, "room": "general"})  # Retry
    ack = rec.wait_for(lambda m: m["type"] == "sent" and m["client_id"] == first, start)
    assert ack["id"] == first
    stored = client.session("general").history(10)
    assert [(m.id, m.text) for m in stored] == [(first, "one"), (second, "two")]


def test_a_client_id_that_cannot_be_a_message_id_gets_a_new_one(
    client: ChatClient, make_widget: Callable
) -> None:
    widget = make_widget()
    rec = recorder(widget)
    start = rec.mark()
    rec.from_view({"type": "send", "text": "hi", "client_id": "not an id!", "room": "general"})
    ack = rec.wait_for(lambda m: m["type"] == "sent", start)
    assert ack["client_id"] == "not an id!" and re.fullmatch(r"[0-9a-f]{32}", ack["id"])


def test_with_ask_name_nothing_is_sent_until_the_view_gives_a_name(
    client: ChatClient, make_widget: Callable
) -> None:
    widget = make_widget(ask_name=True)
    rec = recorder(widget)
    start = rec.mark()
    rec.from_view({"type": "send", "text": "who am I", "client_id": "c-1", "room": "general"})
    failed = rec.wait_for(lambda m: m["type"] == "send_failed", start)
    assert "type your name" in failed["error"]

    rec.from_view({"type": "name", "name": "   "})
    rec.wait_state("error", lambda value: "name not accepted" in value)
    rec.from_view({"type": "name", "name": "  Ada Lovelace "})
    rec.wait_state("user", lambda value: value == "Ada Lovelace")
    assert widget.error == ""
    start = rec.mark()
    rec.from_view({"type": "send", "text": "hello", "client_id": "c-2", "room": "general"})
    rec.wait_for(lambda m: m["type"] == "sent", start)
    (stored,) = client.session("general").history(5)
    assert (stored.author, stored.text) == ("Ada Lovelace", "hello")
    appended = rec.wait_for(lambda m: m["type"] == "append", start)
    assert appended["messages"][0]["own"] is True


def test_a_view_cannot_rename_a_widget_without_ask_name(client: ChatClient, make_widget: Callable) -> None:
    widget = make_widget()
    rec = recorder(widget)
    rec.from_view({"type": "name", "name": "mallory"})
    assert widget.send_message("still me").result(TIMEOUT).author == "alice"
    assert widget.user == "alice"


@pytest.mark.parametrize("text", ["   ", None, "x" * 70_000])
def test_a_failed_send_keeps_the_text_and_shows_the_error(
    client: ChatClient, make_widget: Callable, text: Any
) -> None:
    widget = make_widget()
    rec = recorder(widget)
    start = rec.mark()
    rec.from_view({"type": "send", "text": text, "client_id": "c-2", "room": "general"})
    failed = rec.wait_for(lambda m: m["type"] == "send_failed", start)
    assert failed["client_id"] == "c-2"
    assert failed["error"].startswith("not sent: ")
    assert not any(m["type"] == "sent" for m in rec.custom(start))
    rec.wait_state("error", lambda value: value == failed["error"])
    assert widget.error == failed["error"]
    assert client.session("general").history(5) == []


def test_a_send_after_close_fails_at_once(make_widget: Callable) -> None:
    widget = make_widget()
    widget.close()
    with pytest.raises(ZChatConnectionError, match="closed"):
        widget.send_message("too late").result(TIMEOUT)


# -- rooms ----------------------------------------------------------------------------------


def test_switch_room_resets_every_view_and_counts_unread_elsewhere(
    client: ChatClient, make_widget: Callable
) -> None:
    post(client, "bob", "in general")
    widget = make_widget()
    hello(widget)
    rec = recorder(widget)
    start = rec.mark()
    widget.switch_room("random")
    reset = rec.wait_for(lambda m: m["type"] == "reset" and m["room"] == "random", start)
    assert reset["view"] is None and reset["messages"] == []
    rec.wait_state("rooms", lambda rooms: rooms == ["general", "random"])

    post(client, "bob", "while away 1")
    post(client, "bob", "while away 2")
    post(client, "alice", "my own elsewhere")  # own messages are not unread
    rec.wait_state("unread", lambda unread: unread == {"general": 2})

    start = rec.mark()
    widget.switch_room("general")
    back = rec.wait_for(lambda m: m["type"] == "reset" and m["room"] == "general", start)
    assert len(back["messages"]) == 4
    rec.wait_state("unread", lambda unread: unread == {}, start)


def test_a_room_made_by_someone_else_counts_all_its_messages_unread(
    client: ChatClient, make_widget: Callable
) -> None:
    widget = make_widget()
    hello(widget)
    post(client, "bob", "first", room="lab")
    post(client, "bob", "second", room="lab")
    recorder(widget).wait_state("unread", lambda unread: unread == {"lab": 2})
    assert "lab" in widget.rooms


def test_the_view_switches_room_through_the_room_trait(make_widget: Callable) -> None:
    widget = make_widget()
    hello(widget)
    rec = recorder(widget)
    start = rec.mark()
    rec.set_from_view(room="help")
    rec.wait_for(lambda m: m["type"] == "reset" and m["room"] == "help", start)
    assert widget.room == "help"


def test_a_bad_room_name_is_refused(make_widget: Callable) -> None:
    widget = make_widget()
    with pytest.raises(zchat_nb.InvalidMessageError):
        widget.switch_room("  ")
    with pytest.raises(Exception, match="room name"):
        widget.room = "x" * 100
    assert widget.room == "general"


def test_messages_from_the_view_that_make_no_sense_are_ignored(make_widget: Callable) -> None:
    widget = make_widget()
    rec = recorder(widget)
    for junk in ([1, 2], "hello", {"type": "nonsense"}, {"type": "hello"}, {"type": "older", "view": 5}):
        rec.from_view(junk)  # type: ignore[arg-type]
    rec.from_view({"type": "older", "view": "v", "before": {"id": 3, "ts": "x"}})
    assert hello(widget)["room"] == "general"


# -- presence -------------------------------------------------------------------------------


def test_present_lists_users_with_a_recent_heartbeat(client: ChatClient, make_widget: Callable) -> None:
    widget = make_widget()
    rec = recorder(widget)
    rec.wait_state("present", lambda present: present == ["alice"])
    ChatClient(client.db, user="bob").session("general").heartbeat()
    rec.wait_state("present", lambda present: present == ["alice", "bob"])


def test_a_join_that_failed_is_tried_again_soon_not_at_the_next_renewal(
    client: ChatClient, make_widget: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole class opening the notebook at once can make a join miss its send timeout."""
    from zchat_nb.model import ChatSession

    join, failures = ChatSession.join, []

    def swamped(self: ChatSession, user: str | None = None) -> None:
        if len(failures) < 2:
            failures.append(user)
            raise ZChatSendError("joining 'general' failed: no answer from the server within 10 s")
        join(self, user)

    monkeypatch.setattr(ChatSession, "join", swamped)
    widget = make_widget()  # renews its lease every 600 s
    recorder(widget).wait_state("present", lambda present: present == ["alice"])
    assert failures == ["alice", "alice"]


def test_a_class_joining_at_once_makes_each_widget_read_presence_at_most_every_few_seconds(
    client: ChatClient, make_widget: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each join changes the room's presence; rereading it after every one is N² loads for a class."""
    from zchat_nb.model import ChatSession
    from zchat_nb.widget import PRESENCE_GAP

    reads: list[float] = []
    present = ChatSession.present

    def counted(self: ChatSession, within: float = 90.0) -> list[str]:
        if threading.current_thread().name.startswith("zchat-poller"):
            reads.append(time.monotonic())
        return present(self, within)

    monkeypatch.setattr(ChatSession, "present", counted)
    widget = make_widget()  # polls every 50 ms (an in-process storage)
    rec = recorder(widget)
    rec.wait_state("present", lambda present: present == ["alice"])
    students = [ChatClient(client.db, user=f"student{i:02}").session("general") for i in range(30)]
    for student in students:
        student.join()
        time.sleep(0.02)
    rec.wait_state("present", lambda present: len(present) == 31)
    gaps = [later - earlier for earlier, later in itertools.pairwise(reads)]
    assert len(reads) >= 2 and min(gaps) >= PRESENCE_GAP * 0.95, gaps


def test_the_widget_beats_in_the_room_it_switches_to(client: ChatClient, make_widget: Callable) -> None:
    ChatClient(client.db, user="bob").session("general").heartbeat()
    widget = make_widget()
    rec = recorder(widget)
    rec.wait_state("present", lambda present: present == ["alice", "bob"])
    start = rec.mark()
    widget.switch_room("lab")
    rec.wait_state("present", lambda present: present == ["alice"], start)
    assert client.session("lab").present() == ["alice"]


def test_heartbeats_repeat_on_the_sender_thread(comms: list) -> None:
    beats = threading.Condition()
    count = [0]

    def clock() -> float:
        if threading.current_thread().name.startswith("zchat-sender"):
            with beats:  # only the sender reads the clock, for heartbeats (and sends; none here)
                count[0] += 1
                beats.notify_all()
        return time.time()

    own_client = ChatClient(ZODB.DB(None), user="alice", clock=clock)
    widget = ChatWidget(client=own_client, poll_interval=0.05, heartbeat_interval=0.05)
    try:
        with beats:
            assert beats.wait_for(lambda: count[0] >= 5, TIMEOUT), count
    finally:
        widget.close()
        own_client.close()


# -- status and lifecycle -------------------------------------------------------------------


def test_status_says_connected_with_the_address(make_widget: Callable) -> None:
    widget = make_widget()
    recorder(widget).wait_state("status", lambda status: status == "connected")
    recorder(widget).wait_state("status_text", lambda text: "(in-process storage)" in text)
    assert "alice" in widget.status_text


def test_close_stops_threads_and_releases_connections(client: ChatClient, comms: list) -> None:
    client.rooms()  # this thread's own connection, opened before counting
    threads_before = threading.active_count()
    open_before = sum(1 for c in client.db.connectionDebugInfo() if c["opened"])
    widget = ChatWidget(client=client, poll_interval=0.05)
    rec = recorder(widget)
    hello(widget)
    widget.send_message("hi").result(TIMEOUT)
    assert threading.active_count() == threads_before + 2
    widget.close()
    assert threading.active_count() == threads_before
    assert sum(1 for c in client.db.connectionDebugInfo() if c["opened"]) == open_before
    assert rec.closed and widget.closed
    widget.close()  # twice is fine


def test_closing_the_client_stops_the_poller(comms: list) -> None:
    own_client = ChatClient(ZODB.DB(None), user="alice")
    threads_before = threading.active_count()
    widget = ChatWidget(client=own_client, poll_interval=0.05)
    rec = recorder(widget)
    hello(widget)
    own_client.close()
    # "disconnected" is set by the poller as it ends
    rec.wait_state("status", lambda status: status == "disconnected")
    assert "client was closed" in widget.status_text
    widget.close()
    assert threading.active_count() == threads_before


def test_a_widget_shows_the_given_room_as_the_clients_user(client: ChatClient, comms: list) -> None:
    widget = ChatWidget(client, "lab", poll_interval=0.05)
    try:
        assert isinstance(widget, ChatWidget)
        assert (widget.room, widget.user) == ("lab", "alice")
        assert hello(widget)["room"] == "lab"
    finally:
        widget.close()


def test_view_code_and_css_use_the_stable_class_names() -> None:
    esm, css = str(ChatWidget._esm), str(ChatWidget._css)
    assert "model.on(name, callback)" in esm and '"msg:custom"' in esm
    for name in ("widget", "message", "author", "time", "text", "input", "send", "status", "own", "error"):
        assert f'"zchat-{name}' in esm or f" zchat-{name}" in esm, name
        assert f".zchat-{name}" in css, name
    classes = set(re.findall(r"\.([a-z][\w-]*)", css))
    assert classes and all(cls.startswith("zchat-") for cls in classes), classes
    for action in ("reply", "react", "edit", "delete"):  # what browser tests click
        assert f'"zchat-action-{action}"' in esm, action
    for name in (
        "quote",
        "reaction",
        "verified",
        "mention-me",
        "mention-count",
        "edited-mark",
        "deleted-mark",
    ):
        assert f'"zchat-{name}' in esm or f" zchat-{name}" in esm, name
        assert f".zchat-{name}" in css, name


def test_importing_zchat_nb_does_not_import_the_widget() -> None:
    code = (
        "import sys, zchat_nb\n"
        "loaded = {'zchat_nb.widget', 'ipywidgets', 'anywidget', 'IPython'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
        "assert zchat_nb.ChatWidget.__name__ == 'ChatWidget'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- with a real ZEO server -----------------------------------------------------------------


@pytest.mark.integration
def test_an_invalidation_wakes_the_poller(server: zchat_nb.Server, comms: list) -> None:
    with (
        zchat_nb.connect(server.address, user="alice") as alice,
        zchat_nb.connect(server.address, user="bob") as bob,
    ):
        # A fallback interval far longer than the wait below: only the invalidation can deliver it.
        widget = ChatWidget(client=alice, poll_interval=600)
        try:
            hello(widget)
            start = recorder(widget).mark()
            sent = bob.session("general").add_message("over the wire")
            update = recorder(widget).wait_for(lambda m: m["type"] == "append", start)
            assert [m["id"] for m in update["messages"]] == [sent.id]
        finally:
            widget.close()


@pytest.mark.integration
def test_an_idle_poller_does_not_wake_itself(server: zchat_nb.Server, comms: list) -> None:
    """Its own polls must not wake it again (they once did: tens of thousands of polls a second)."""
    with (
        zchat_nb.connect(server.address, user="alice") as alice,
        zchat_nb.connect(server.address, user="bob") as bob,
    ):
        polls: list[float] = []
        alice.subscribe(lambda e: polls.append(e.time) if e.kind == "poll" else None, activity=True)
        widget = ChatWidget(client=alice, poll_interval=600)
        try:
            hello(widget)
            start = recorder(widget).mark()
            before = len(polls)
            bob.session("general").add_message("one invalidation")
            recorder(widget).wait_for(lambda m: m["type"] == "append", start)
            assert len(polls) - before <= 5, f"{len(polls) - before} polls for one invalidation"
        finally:
            widget.close()


@pytest.mark.integration
def test_status_follows_the_server_and_sends_fail_without_blocking(
    server: zchat_nb.Server, comms: list, tmp_path: Any
) -> None:
    alice = zchat_nb.connect(server.address, user="alice", timeout=1.0)
    widget = ChatWidget(client=alice, poll_interval=0.2)
    try:
        rec = recorder(widget)
        rec.wait_state("status", lambda status: status == "connected")
        assert f"{server.address[0]}:{server.address[1]}" in widget.status_text

        start = rec.mark()
        server.stop()
        rec.wait_state("status", lambda status: status == "reconnecting")
        assert "reconnecting to 127.0.0.1:" in widget.status_text

        future = widget.send_message("into the void")
        with pytest.raises(ZChatSendError):
            future.result(TIMEOUT)
        failed = rec.wait_for(lambda m: m["type"] == "send_failed", start)
        assert "not sent" in failed["error"]

        again = zchat_nb.serve(tmp_path / "chat.fs", port=server.address[1])
        try:
            rec.wait_state("status", lambda status: status == "connected", start, timeout=30)
            rec.wait_state("error", lambda error: error == "", start)  # the outage's "not sent" is stale
            assert widget.error == ""
            start = rec.mark()
            assert widget.send_message("back again").result(TIMEOUT).text == "back again"
            rec.wait_for(lambda m: m["type"] == "append" and "back again" in str(m["messages"]), start)
        finally:
            widget.close()
            again.stop()
    finally:
        widget.close()
        alice.close()


@pytest.mark.integration
def test_a_widget_without_a_client_connects_and_owns_its_client(
    server: zchat_nb.Server, comms: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, port = server.address
    monkeypatch.setenv("ZCHAT_ADDRESS", f"{host}:{port}")
    monkeypatch.setenv("ZCHAT_USER", "dora")
    widget = ChatWidget(room="general", poll_interval=0.2)
    try:
        assert widget.user == "dora"
        assert hello(widget)["room"] == "general"
    finally:
        widget.close()
    assert widget.client.closed


def test_widget_actions_reply_edit_react_delete_reach_another_session_and_update_views() -> None:
    import ZODB

    db = ZODB.DB(None)
    client = zchat_nb.ChatClient(db, user="ada")
    other = zchat_nb.ChatClient(db, user="bob").session("general")
    widget = ChatWidget(client, "general", poll_interval=0.05)
    sent: list[dict[str, Any]] = []
    deleted_shown = threading.Event()

    def capture(content: dict[str, Any], buffers: object = None) -> None:
        sent.append(content)
        # The delete reaches the views as an update, or with the message itself if the poller had
        # not read it yet (a new message comes in its current state).
        if any(p["deleted"] for p in content.get("messages", ())):
            deleted_shown.set()

    widget.send = capture  # type: ignore[method-assign]
    try:
        first = widget.send_message("hello @bob").result(10)
        reply = widget.reply(first, "and a reply").result(10)
        widget.edit(first, "hello @bob, edited").result(10)
        widget.react(reply, "🎉").result(10)
        assert widget.delete(reply).result(10).deleted
        with pytest.raises(zchat_nb.ZChatPermissionError):
            widget.edit(other.add_message("bob's"), "mine").result(10)
        state = {m.id: m for m in other.new_messages()}
        assert state[first.id].text == "hello @bob, edited" and state[reply.id].deleted
        assert state[reply.id].reply_to == first.id
        assert deleted_shown.wait(10), "the views were not told of the delete"
        updates = [p for f in list(sent) for p in f.get("messages", ())]
        assert any(p["id"] == first.id and p["edited"] and p["mentions"] == ["bob"] for p in updates)
        assert any(p["id"] == reply.id and p["deleted"] and p["html"] == "" for p in updates)
    finally:
        widget.close()
        client.close()


def test_a_reply_from_the_view_quotes_its_parent_and_a_retry_stores_it_once(
    client: ChatClient, make_widget: Callable
) -> None:
    parent = post(client, "bob", "what is a **BTree**?\nsecond line")
    widget = make_widget()
    rec = recorder(widget)
    hello(widget)
    reply_id = uuid.uuid4().hex
    frame = {"type": "amend", "action": "reply", "id": parent.id, "arg": "a tree", "client_id": reply_id}
    start = rec.mark()
    rec.from_view({**frame, "room": "general"})
    ack = rec.wait_for(lambda m: m["type"] == "sent" and m["client_id"] == reply_id, start)
    assert ack["id"] == reply_id  # the view's client id is the reply's id, as for a send
    shown = rec.wait_for(lambda m: m["type"] == "append" and m["messages"][0]["id"] == reply_id, start)
    assert shown["messages"][0]["reply"] == {
        "id": parent.id,
        "author": "bob",
        "first_line": "what is a **BTree**?",  # text: the view puts it in with textContent
        "deleted": False,
        "known": True,
    }
    start = rec.mark()
    rec.from_view({**frame, "room": "general"})  # Retry: same client id
    rec.wait_for(lambda m: m["type"] == "sent" and m["client_id"] == reply_id, start)
    stored = client.session("general").history(10)
    assert [(m.id, m.reply_to) for m in stored] == [(parent.id, None), (reply_id, parent.id)]


def test_a_reply_to_a_message_the_view_does_not_show_fails_with_a_reason(make_widget: Callable) -> None:
    widget = make_widget()
    rec = recorder(widget)
    hello(widget)
    start = rec.mark()
    frame = {
        "type": "amend",
        "action": "reply",
        "id": "nope",
        "arg": "x",
        "client_id": "c-9",
        "room": "general",
    }
    rec.from_view(frame)
    failed = rec.wait_for(lambda m: m["type"] == "send_failed" and m["client_id"] == "c-9", start)
    assert "no longer shown" in failed["error"]


def test_mentions_of_the_user_in_other_rooms_are_counted_apart(
    client: ChatClient, make_widget: Callable
) -> None:
    post(client, "bob", "in general")
    widget = make_widget()
    hello(widget)
    rec = recorder(widget)
    widget.switch_room("random")
    rec.wait_state("rooms", lambda rooms: rooms == ["general", "random"])
    post(client, "bob", "hello @alice")
    post(client, "bob", "@alicex is someone else, @bob too")
    post(client, "cy", "@alice again")
    rec.wait_state("unread", lambda unread: unread == {"general": 3})
    rec.wait_state("unread_mentions", lambda mentions: mentions == {"general": 2})
    start = rec.mark()
    widget.switch_room("general")
    rec.wait_state("unread_mentions", lambda mentions: mentions == {}, start)


# -- attachments: shared pictures reach the views as checked bytes ------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40


@pytest.fixture
def blob_client(make_client: Callable, tmp_path: Path) -> ChatClient:
    """alice, on an in-memory database with blobs (MappingStorage has none of its own)."""
    from ZODB.blob import BlobStorage
    from ZODB.MappingStorage import MappingStorage

    return make_client(ZODB.DB(BlobStorage(str(tmp_path / "blobs"), MappingStorage())), "alice")


def test_a_picture_pasted_in_a_view_is_shared_and_its_bytes_come_back_as_a_buffer(
    blob_client: ChatClient, make_widget: Callable
) -> None:
    widget = make_widget(client=blob_client)
    hello(widget)
    rec = recorder(widget)
    start = rec.mark()
    share = {"type": "share", "client_id": "c-9", "room": "general", "name": "paste.png", "caption": "look"}
    rec.from_view(share, [PNG])
    ack = rec.wait_for(lambda m: m["type"] == "sent", start)
    append = rec.wait_for(lambda m: m["type"] == "append", start)
    (payload,) = append["messages"]
    assert payload["id"] == ack["id"] and "look" in payload["html"]
    assert payload["attachments"] == [
        {"index": 0, "name": "paste.png", "mime": "image/png", "size": len(PNG), "image": True}
    ]
    assert "src" not in repr(payload) and "data:" not in repr(payload)  # no URL reaches the view
    start = rec.mark()
    rec.from_view({"type": "attachment", "view": "view-1", "message": ack["id"], "index": 0})
    data = rec.wait_for(lambda m: m["type"] == "attachment", start)
    assert data == {
        "type": "attachment",
        "view": "view-1",
        "message": ack["id"],
        "index": 0,
        "mime": "image/png",
        "error": "",
    }
    assert rec.buffers_of(data) == [PNG]


def test_a_pasted_file_that_is_no_image_is_refused_with_the_reason(
    blob_client: ChatClient, make_widget: Callable
) -> None:
    widget = make_widget(client=blob_client)
    rec = recorder(widget)
    start = rec.mark()
    share = {"type": "share", "client_id": "c-8", "room": "general", "name": "x.png", "caption": ""}
    rec.from_view(share, [b"<svg onload=alert(1)>"])
    failed = rec.wait_for(lambda m: m["type"] == "send_failed", start)
    assert "is not a PNG, JPEG, GIF or WebP image" in failed["error"]
    assert blob_client.session("general").history(5) == []


def test_a_broken_attachment_is_answered_with_an_error_and_no_bytes(
    blob_client: ChatClient, make_widget: Callable
) -> None:
    from zchat_nb.model import Attachment

    widget = make_widget(client=blob_client)
    hello(widget)
    rec = recorder(widget)
    start = rec.mark()
    lie = Attachment("a.png", "image/png", 10, f"{blob_client.writer}/nothing/0")
    message = Message("e" * 32, "mallory", "", 1.0e9, attachments=(lie,))
    blob_client.session("general").post(message)
    rec.wait_for(lambda m: m["type"] == "append", start)
    rec.from_view({"type": "attachment", "view": "view-1", "message": message.id, "index": 0})
    data = rec.wait_for(lambda m: m["type"] == "attachment", start)
    assert "is missing from the database" in data["error"]
    assert rec.buffers_of(data) == []
    # A message the widget never showed, or a bad index: no answer at all.
    start = rec.mark()
    rec.from_view({"type": "attachment", "view": "view-1", "message": "nope", "index": 0})
    rec.from_view({"type": "attachment", "view": "view-1", "message": message.id, "index": 3})
    assert hello(widget)["room"] == "general"
    assert not [m for m in rec.custom(start) if m["type"] == "attachment"]


def test_share_method_shares_from_python(blob_client: ChatClient, make_widget: Callable) -> None:
    widget = make_widget(client=blob_client)
    message = widget.share(PNG, "from code").result(TIMEOUT)
    assert message.text == "from code" and message.attachments[0].mime == "image/png"
    assert blob_client.attachment_bytes(message) == PNG
