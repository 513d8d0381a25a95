"""The error boundary: a server that went away reaches callers as ZChatDisconnected (or ZChatSendError).

Unit tests check :func:`zchat_nb.exceptions.server_boundary` itself; the integration tests call every
public read and write of a client whose server is gone, with nothing of the chat in its caches, so
that each call has to ask the server.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ZEO.Exceptions import ClientDisconnected
from ZODB.POSException import ConflictError

import zchat_nb
from zchat_nb import ChatClient, ZChatDisconnected, ZChatSendError, teacher
from zchat_nb.exceptions import server_boundary

WHERE = "192.0.2.7:8100"


def test_a_disconnect_becomes_zchat_disconnected_naming_the_server() -> None:
    cause = ClientDisconnected("connection lost")
    expected = rf"not connected to the server at {WHERE}"
    with pytest.raises(ZChatDisconnected, match=expected) as info, server_boundary(WHERE):
        raise cause
    assert info.value.__cause__ is cause
    assert "zchat-nb status" in str(info.value)


@pytest.mark.parametrize(
    "error",
    [ConflictError("two writers"), ZChatSendError("ours already"), KeyError("a bug"), ValueError("bad")],
    ids=["conflict", "ours", "key-error", "value-error"],
)
def test_other_errors_pass_unchanged(error: Exception) -> None:
    with pytest.raises(type(error)) as info, server_boundary(WHERE):
        raise error
    assert info.value is error


# -- every public call, with the server away ----------------------------------------------------

#: Seconds a read waits for the server, and a write tries, before giving up.
AWAY_TIMEOUT = 0.5

#: A message as a session returns it (with its writer), for the amendments.
_SHOWN = zchat_nb.Message("0123456789abcdef", "ada", "one", 1.0, writer="0123456789abcdef")

#: A picture, and a message that names one (for reading attachments).
_PNG = b"\x89PNG\r\n\x1a\n" + bytes(16)
_SHARED = zchat_nb.Message(
    "0123456789abcdef", "ada", "", 1.0, attachments=(zchat_nb.Attachment("a.png", "image/png", 24, "w/x/0"),)
)

READS: dict[str, Callable[[ChatClient], Any]] = {
    "ChatClient.rooms": lambda c: c.rooms(),
    "ChatSession.new_messages": lambda c: c.session("lab").new_messages(),
    "ChatSession.new_messages(timeout)": lambda c: c.session("lab").new_messages(timeout=AWAY_TIMEOUT),
    "ChatSession.history": lambda c: c.session("lab").history(10),
    "ChatSession.present": lambda c: c.session("lab").present(),
    "ChatSession.updated_messages": lambda c: c.session("lab").updated_messages(),
    "ChatSession.everything": lambda c: c.session("lab").everything(),
    "teacher.messages": lambda c: teacher.messages(c, "lab"),
    "teacher.to_csv": lambda c: teacher.to_csv(c, "lab"),
    "teacher.to_markdown": lambda c: teacher.to_markdown(c, "lab"),
    "teacher.to_dataframe": lambda c: teacher.to_dataframe(c, "lab"),
    "teacher.export": lambda c: teacher.export(c, "lab", io.StringIO()),
    "teacher.pack": lambda c: teacher.pack(c),
    "ChatClient.attachment_bytes": lambda c: c.attachment_bytes(_SHARED),
}
WRITES: dict[str, Callable[[ChatClient], Any]] = {
    "ChatSession.add_message": lambda c: c.session("lab").add_message("into the void"),
    "ChatSession.post": lambda c: c.session("lab").post(
        zchat_nb.Message("0123456789abcdef", c.user, "into the void", 1.0)
    ),
    "ChatSession.heartbeat": lambda c: c.session("lab").heartbeat(),
    "ChatSession.join": lambda c: c.session("lab").join(),
    "ChatSession.leave": lambda c: c.session("lab").leave(),
    "ChatSession.edit": lambda c: c.session("lab").edit(_SHOWN, "into the void"),
    "ChatSession.delete": lambda c: c.session("lab").delete(_SHOWN),
    "ChatSession.react": lambda c: c.session("lab").react(_SHOWN, "👍"),
    "ChatSession.unreact": lambda c: c.session("lab").unreact(_SHOWN, "👍"),
    "teacher.clear_room": lambda c: teacher.clear_room(c, "lab"),
    "ChatSession.share": lambda c: c.session("lab").share(_PNG, "into the void"),
    "ChatSession.share_files": lambda c: c.session("lab").share_files([("a.png", "image/png", _PNG)]),
}

#: Calls that do not ask the server: they work while it is away.
LOCAL: dict[str, Callable[[ChatClient], Any]] = {
    "ChatSession.draft": lambda c: c.session("lab").draft("built offline"),
    "ChatSession.behind": lambda c: c.session("lab").behind,
}


@pytest.fixture
def away() -> Iterator[ChatClient]:
    """A client whose server has stopped; the room 'lab' has messages, none of them in its caches."""
    server = zchat_nb.serve()
    try:
        with zchat_nb.connect(server.address, user="ada") as writer:
            lab = writer.session("lab")
            for text in ("one", "two"):
                lab.add_message(text)
            lab.heartbeat()
        client = zchat_nb.connect(server.address, user="bob", timeout=AWAY_TIMEOUT)
    except BaseException:
        server.stop()
        raise
    lost = threading.Event()
    unsubscribe = client.subscribe(lambda event: lost.set() if event.kind == "disconnected" else None)
    server.stop()
    try:
        assert lost.wait(10), "the client did not notice that the server stopped"
        yield client
    finally:
        unsubscribe()
        client.close()


@pytest.mark.integration
@pytest.mark.parametrize("call", list(READS), ids=list(READS))
def test_a_read_with_the_server_away_raises_zchat_disconnected(away: ChatClient, call: str) -> None:
    with pytest.raises(ZChatDisconnected) as info:
        READS[call](away)
    assert away.address_text in str(info.value)
    # The way out names this very server and its data, not a generic `zchat-nb status`.
    assert f"zchat-nb serve --port {away.address[1]} --path FILE" in str(info.value)


@pytest.mark.integration
@pytest.mark.parametrize("call", list(WRITES), ids=list(WRITES))
def test_a_write_with_the_server_away_raises_zchat_send_error(away: ChatClient, call: str) -> None:
    with pytest.raises(ZChatSendError) as info:
        WRITES[call](away)
    message = str(info.value)
    assert away.address_text in message and f"within {AWAY_TIMEOUT:g} s" in message
    assert f"zchat-nb serve --port {away.address[1]} --path FILE" in message


@pytest.mark.integration
@pytest.mark.parametrize("call", list(LOCAL), ids=list(LOCAL))
def test_a_local_call_works_with_the_server_away(away: ChatClient, call: str) -> None:
    assert LOCAL[call](away) is not None


def test_every_public_call_of_sessions_and_teacher_tools_is_in_a_table() -> None:
    """A new public method of ChatSession, or function of teacher, must be added to a table above."""
    covered = {name.split("(")[0] for name in [*READS, *WRITES, *LOCAL]}
    public = {f"ChatSession.{name}" for name in vars(zchat_nb.ChatSession) if not name.startswith("_")}
    public |= {f"teacher.{name}" for name in teacher.__all__ if name != "COLUMNS"}
    assert public <= covered, sorted(public - covered)
