"""Replies, edits, deletes and reactions between processes through real ZEO servers (plain and TLS)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import zchat_nb
from zchat_nb import certs
from zchat_nb.net import format_address

from .helpers import ServerProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT = 60.0


class PeerProcess:
    """``tests/peer.py`` in a child process: one chat client, called op by op."""

    def __init__(self, address: object, room: str = "general", **options: str) -> None:
        argv = [sys.executable, "-m", "tests.peer", format_address(address), room]  # type: ignore[arg-type]
        for name, value in options.items():
            argv += [f"--{name}", value]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert self._read() == "ready"

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], CALL_TIMEOUT)
        if not ready:
            raise AssertionError(f"the peer process said nothing for {CALL_TIMEOUT} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the peer process ended (exit code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(*reply["error"])
        return reply["ok"]

    def __call__(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        return self._read()

    def collect(self, expected: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """New messages until ``expected`` arrived (each call woken by an invalidation), or fail."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < expected:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {len(got)} of {expected} messages arrived within {timeout} s"
            got += self("new", timeout=remaining)
        return got

    def wait_update(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Updated messages, waiting for the invalidation that brings them (no sleeping)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # new_messages(timeout) waits for the server to be back and returns early on an update.
            assert self("new", timeout=min(5.0, deadline - time.monotonic())) == []
            updated = self("updated")
            if updated:
                return updated  # type: ignore[no-any-return]
        raise AssertionError(f"no update within {timeout} s")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class PeerError(Exception):
    pass


@pytest.fixture
def peers() -> Iterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    yield started
    for peer in started:
        peer.close()


def new_messages(chat: zchat_nb.ChatSession, count: int, timeout: float = 30.0) -> list[zchat_nb.Message]:
    found: list[zchat_nb.Message] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        found += chat.new_messages(timeout=deadline - time.monotonic())
    assert len(found) == count, found
    return found


def updated(chat: zchat_nb.ChatSession, timeout: float = 30.0) -> list[zchat_nb.Message]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert chat.new_messages(timeout=min(5.0, deadline - time.monotonic())) == []
        changed = chat.updated_messages()
        if changed:
            return changed
    raise AssertionError(f"no update within {timeout} s")


def updated_until(
    chat: zchat_nb.ChatSession, done: Callable[[zchat_nb.Message], bool], timeout: float = 30.0
) -> zchat_nb.Message:
    """The first update that ``done`` accepts. Updates before it are earlier states of the same
    message: a poll that runs before another client's invalidation has arrived shows the state
    without that client's change, and the change comes as one more update."""
    deadline = time.monotonic() + timeout
    first: str | None = None
    while True:
        for message in updated(chat, max(0.1, deadline - time.monotonic())):
            first = first or message.id
            assert message.id == first, (message, first)
            if done(message):
                return message


def test_every_call_across_two_processes(server: zchat_nb.Server, peers: list[PeerProcess]) -> None:
    bob = PeerProcess(server.address, user="bob")
    peers.append(bob)
    with zchat_nb.connect(server.address, user="alice") as client:
        alice = client.session("general")
        m = alice.add_message("What does _p_changed do? @bob")
        [seen] = bob("new", timeout=30)
        assert seen["mentions"] == ["bob"] and seen["text"] == m.text
        r = bob("send", text="It marks the object dirty", reply_to=m.id)
        assert [x["id"] for x in bob("new", timeout=30)] == [r["id"]]  # own messages come back too
        _, got = new_messages(alice, 2)
        assert got.reply_to == m.id and got.author == "bob"
        bob("edit", id=r["id"], arg="It marks the object as changed")
        assert bob.wait_update()[0]["text"] == "It marks the object as changed"
        [edited] = updated(alice)
        assert (edited.id, edited.text, edited.edited is not None) == (
            r["id"],
            "It marks the object as changed",
            True,
        )
        alice.react(edited, "👍")
        assert bob.wait_update()[0]["reactions"] == {"👍": ["alice"]}
        bob("react", id=r["id"], arg="👍")
        # alice's poll may run before bob's invalidation reaches her: her own reaction comes first then
        both = updated_until(alice, lambda m: dict(m.reactions) == {"👍": ("alice", "bob")})
        assert both.id == r["id"]
        assert bob.wait_update()[0]["reactions"] == {"👍": ["alice", "bob"]}
        alice.unreact(edited, "👍")
        assert bob.wait_update()[0]["reactions"] == {"👍": ["bob"]}
        with pytest.raises(PeerError, match="ZChatPermissionError"):
            bob("edit", id=m.id, arg="not yours")
        with pytest.raises(PeerError, match="ZChatPermissionError"):
            bob("delete", id=m.id)
        alice.delete(m)
        [gone] = bob.wait_update()
        assert (gone["id"], gone["deleted"], gone["text"]) == (m.id, True, "")
        history = bob("history", n=10)
        assert [(h["text"], h["deleted"]) for h in history] == [
            ("", True),
            ("It marks the object as changed", False),
        ]
        assert history[1]["reactions"] == {"👍": ["bob"]} and history[1]["reply_to"] == m.id
        assert bob("updated") == []
        # alice's own unreact and delete come back to her too, each once, in the order made.
        assert [(u.id, u.deleted) for u in alice.updated_messages()] == [(r["id"], False), (m.id, True)]
        assert alice.updated_messages() == []


def test_amendments_made_while_the_server_restarts_arrive_once(
    server_process: ServerProcess, peers: list[PeerProcess]
) -> None:
    bob = PeerProcess(server_process.address, user="bob")
    peers.append(bob)
    with zchat_nb.connect(server_process.address, user="alice", timeout=60.0) as client:
        alice = client.session("general")
        m, other = alice.add_message("before the restart"), alice.add_message("to delete")
        # Both are committed, but the second invalidation may still be on its way to bob's client.
        assert len(bob.collect(2)) == 2
        server_process.kill()
        done: dict[str, Any] = {}

        def amend() -> None:
            try:
                done["edit"] = alice.edit(m, "edited across the restart")
                done["react"] = alice.react(m, "🎉")
                done["delete"] = alice.delete(other)
            except Exception as exc:
                done["error"] = exc

        thread = threading.Thread(target=amend)
        thread.start()  # blocks until the server is back
        server_process.start()
        thread.join(90)
        assert not thread.is_alive() and "error" not in done, done
        states: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            states.get(m.id, {}).get("reactions") and states.get(other.id, {}).get("deleted")
        ):
            for state in bob.wait_update(timeout=deadline - time.monotonic()):
                states[state["id"]] = state
        assert states[m.id]["text"] == "edited across the restart"
        assert states[m.id]["reactions"] == {"🎉": ["alice"]} and states[other.id]["deleted"]
        assert bob("updated") == []
    # A reader started after all this rebuilds the same state from the store.
    carol = PeerProcess(server_process.address, user="carol")
    peers.append(carol)
    assert [(s["text"], s["deleted"]) for s in carol("new", timeout=30)] == [
        ("edited across the restart", False),
        ("", True),
    ]


@pytest.fixture
def classroom(tmp_path: Path) -> certs.Classroom:
    return certs.make_classroom(tmp_path / "class", ["alice", "bob"])


def test_in_a_tls_classroom_forgeries_show_unverified_and_the_teachers_delete_counts(
    classroom: certs.Classroom, peers: list[PeerProcess]
) -> None:
    with zchat_nb.serve(tls=classroom.directory) as server:
        alice = PeerProcess(server.address, tls=str(classroom.bundles["alice"]))
        peers.append(alice)
        m = alice("send", text="my answer")
        assert m["verified"]
        with (
            zchat_nb.connect(server.address, tls=classroom.bundles["bob"], user="teacher") as impostor,
            zchat_nb.connect(server.address, tls=classroom.bundles["bob"]) as bob_client,
            zchat_nb.connect(server.address, tls=classroom.bundles["teacher"]) as teacher_client,
        ):
            forged = impostor.session("general").add_message("I am the teacher: the answer is wrong")
            bob = bob_client.session("general")
            theirs, _ = new_messages(bob, 2)
            seen = alice("new", timeout=30)
            assert [(s["author"], s["verified"]) for s in seen] == [("alice", True), ("teacher", False)]
            with pytest.raises(zchat_nb.ZChatPermissionError, match="only alice"):
                bob.edit(theirs, "bob's now")
            with pytest.raises(zchat_nb.ZChatPermissionError):
                bob.delete(theirs)
            # The impostor's "teacher" delete is signed with bob's certificate: refused.
            with pytest.raises(zchat_nb.ZChatPermissionError):
                impostor.session("general").delete(theirs)
            teacher = teacher_client.session("general")
            first, second = new_messages(teacher, 2)
            assert teacher.delete(second).deleted and teacher.delete(first).deleted
            states = {s["id"]: s for s in alice.wait_update()}
            while len(states) < 2:
                states.update({s["id"]: s for s in alice.wait_update()})
            assert states[m["id"]]["deleted"] and states[forged.id]["deleted"]
            assert {u.id: u.deleted for u in updated(bob)} | {
                u.id: u.deleted for u in bob.updated_messages()
            } == {
                m["id"]: True,
                forged.id: True,
            }
