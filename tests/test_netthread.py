"""The clients of a process share one networking thread (zchat_nb.netthread), and still each its own
connection: closing one, or one whose server stalls, leaves the others delivering."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator

import pytest

import zchat_nb
from zchat_nb.netthread import SHARED, THREAD_NAME

from .attacks import SilentProxy, honest_pair_works

pytestmark = pytest.mark.integration


def networking_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.fixture
def no_clients_before() -> Iterator[None]:
    """The test starts with no client of zchat_nb open in this process (so no networking thread)."""
    assert SHARED.users() == 0, "a client of an earlier test is still open"
    assert networking_threads() == []
    yield


def test_clients_share_one_thread_each_with_its_own_connection(
    server: zchat_nb.Server, no_clients_before: None
) -> None:
    alice = zchat_nb.connect(server.address, user="alice")
    bob = zchat_nb.connect(server.address, user="bob")
    carol = zchat_nb.connect(server.address, user="carol")
    try:
        assert len(networking_threads()) == 1
        assert server.status()["connections"] == 3, "three clients, three ZEO connections"

        reader = bob.session("general", backlog=0)
        reader.new_messages()
        sent = alice.session("general").add_message("hello")
        assert [m.id for m in reader.new_messages(timeout=10)] == [sent.id]

        alice.close()  # the thread stays for the others
        assert len(networking_threads()) == 1
        sent = carol.session("general").add_message("still here")
        assert [m.id for m in reader.new_messages(timeout=10)] == [sent.id]
    finally:
        for client in (alice, bob, carol):
            client.close()
    assert networking_threads() == [] and SHARED.users() == 0


def test_a_client_whose_server_stalls_holds_up_no_other(server: zchat_nb.Server) -> None:
    with zchat_nb.connect(server.address, user="ada") as writer:
        writer.session("lab").add_message("one")
    with (
        SilentProxy(server.address) as proxy,
        zchat_nb.connect(proxy.address, user="eve", timeout=20) as stuck,
    ):
        proxy.holding.set()
        failed: list[BaseException] = []

        def hung_read() -> None:
            try:
                stuck.session("lab").history(10)
            except BaseException as exc:  # ZChatDisconnected, had it waited its 20 s
                failed.append(exc)

        reading = threading.Thread(target=hung_read)
        reading.start()
        assert proxy.wait_held(10), "the stalled client's read was answered: nothing was tested"
        honest_pair_works(server.address, timeout=10)  # the same thread serves these two
        assert reading.is_alive(), "the stalled read ended first: nothing was tested"
        proxy.release()
        reading.join(30)
        assert not reading.is_alive() and failed == [], failed


def _send_from_child(address: tuple[str, int], text: str) -> None:
    with zchat_nb.connect(address, user="child") as client:
        client.session("general").add_message(text)


def test_a_forked_child_starts_its_own_thread(server: zchat_nb.Server) -> None:
    """A child forked while the parent's thread runs (multiprocessing's default on Linux) has no
    copy of it running: its clients start a thread of their own."""
    with zchat_nb.connect(server.address, user="parent") as parent:
        reader = parent.session("general", backlog=0)
        reader.new_messages()
        child = multiprocessing.get_context("fork").Process(
            target=_send_from_child, args=(server.address, "hi")
        )
        child.start()
        child.join(60)
        if child.is_alive():  # hung: its client waits for a thread that was not forked with it
            child.kill()
        assert child.exitcode == 0
        assert [m.text for m in reader.new_messages(timeout=10)] == ["hi"]


def test_closing_a_client_on_the_networking_thread_is_refused_not_a_hang(server: zchat_nb.Server) -> None:
    """A subscriber's callback runs on the shared thread: a close there would wait for that thread."""
    with (
        zchat_nb.connect(server.address, user="alice") as alice,
        zchat_nb.connect(server.address, user="bob") as bob,
    ):
        outcome: list[BaseException | None] = []
        heard = threading.Event()

        def close_bob(event: zchat_nb.ClientEvent) -> None:
            if event.kind == "invalidation" and not heard.is_set():
                try:
                    bob.close()
                    outcome.append(None)
                except RuntimeError as exc:
                    outcome.append(exc)
                heard.set()

        alice.subscribe(close_bob)
        bob.session("general").add_message("wakes alice's client")
        assert heard.wait(10), "no invalidation reached alice"
        assert isinstance(outcome[0], RuntimeError) and "another thread" in str(outcome[0])
        assert not bob.closed  # still usable, closed by the with block
        bob.session("general").add_message("still works")
