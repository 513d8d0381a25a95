"""A client that lives through a server restart keeps working (issue 9, item 1)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import zchat_nb
from zchat_nb.client import ClientEvent

from .helpers import ServerProcess, free_port

pytestmark = pytest.mark.integration


class _Restartable:
    """The same FileStorage served on the same port, in a child process or in a thread of this one."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind = kind
        self.path = path
        self.port = free_port()
        self._process = ServerProcess(path, self.port) if kind == "process" else None
        self._thread: zchat_nb.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> None:
        if self._process is not None:
            self._process.start()
        else:
            self._thread = zchat_nb.serve(self.path, port=self.port)

    def stop(self) -> None:
        """SIGKILL the process (a crash); stop the in-kernel server (as `%zchat stop` does)."""
        if self._process is not None:
            self._process.kill()
        elif self._thread is not None:
            self._thread.stop()
            self._thread = None


@contextmanager
def restartable(kind: str, path: Path) -> Iterator[_Restartable]:
    server = _Restartable(kind, path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _events(client: zchat_nb.ChatClient, kind: str) -> threading.Event:
    seen = threading.Event()

    def on_event(event: ClientEvent) -> None:
        if event.kind == kind:
            seen.set()

    client.subscribe(on_event)
    return seen


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_client_that_lived_through_a_restart_can_still_create_objects(kind: str, tmp_path: Path) -> None:
    with (
        restartable(kind, tmp_path / "chat.fs") as server,
        zchat_nb.connect(server.address, user="old", timeout=30) as survivor,
    ):
        survivor.session("general").add_message("before the restart")  # pre-fetches a batch of oids
        gone, back = _events(survivor, "disconnected"), _events(survivor, "connected")

        server.stop()
        assert gone.wait(30), "the client never noticed the server had gone"
        server.start()
        assert back.wait(30), "the client did not reconnect within 30 s"

        # Another client takes the restarted server's next object ids.
        with zchat_nb.connect(server.address, user="new") as newcomer:
            for i in range(5):
                newcomer.session(f"room {i}").add_message("hello")

        # Every send that creates objects (a room, its trees, a stream) must still work.
        for i in range(5):
            chat = survivor.session(f"survivor {i}")
            assert chat.add_message(f"made after the restart {i}").text == f"made after the restart {i}"
        assert sorted(survivor.rooms()) == sorted(
            ["general"] + [f"room {i}" for i in range(5)] + [f"survivor {i}" for i in range(5)]
        )


def test_the_states_fetched_for_readers_are_forgotten_across_a_restart(tmp_path: Path) -> None:
    """What a client fetched for its readers is named by (oid, snapshot); a server that comes back may
    hold other data under the same names, so a reconnect forgets it, and the reader reads on once."""
    with (
        restartable("thread", tmp_path / "chat.fs") as server,
        zchat_nb.connect(server.address, user="writer", timeout=30) as writer_client,
        zchat_nb.connect(server.address, user="reader", timeout=30) as reader_client,
    ):
        writer = writer_client.session("general")
        reader = reader_client.session("general", backlog=0)
        reader.new_messages()
        writer.add_message("first")  # makes the writer's stream and tail
        assert [m.text for m in reader.new_messages(timeout=10)] == ["first"]
        writer.add_message("second")  # held in the tail: fetched for the reader as it is invalidated
        assert [m.text for m in reader.new_messages(timeout=10)] == ["second"]
        fetched = reader_client.db.storage._zchat_fetched
        assert fetched, "nothing was fetched for the reader: nothing to forget"

        gone, back = _events(reader_client, "disconnected"), _events(reader_client, "connected")
        server.stop()
        assert gone.wait(30), "the client never noticed the server had gone"
        assert fetched == {}
        server.start()
        assert back.wait(30), "the client did not reconnect within 30 s"
        writer.add_message("third")
        assert [m.text for m in reader.new_messages(timeout=10)] == ["third"]
        assert reader.new_messages() == []
