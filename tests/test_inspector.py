"""The ZEO inspector: what it sees of a real server (the tree picture itself: test_treeview.py).

Integration tests run a hardened ZEO server on a FileStorage (``file_server``), so that the server
resolves concurrent inserts into one bucket as in production, and connect two clients to it.
"""

from __future__ import annotations

import re
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import ZODB

import zchat_nb
from zchat_nb import ChatClient
from zchat_nb.inspector import Inspector
from zchat_nb.model import ROOMS_KEY

from .helpers import MakeClient

TIMEOUT = 10.0
SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("bad", [{"max_rate": 0}, {"max_rate": float("nan")}, {"status_interval": -1}])
def test_bad_rates_are_refused(bad: dict[str, float]) -> None:
    with ChatClient(ZODB.DB(None), user="ada") as client, pytest.raises(ValueError, match="must be"):
        Inspector(client, **bad)


def test_tids_and_invalidations_are_explained_on_hover() -> None:
    entry = {"time": time.time(), "tid": "03f0" * 4, "count": 1, "objects": [], "more": 1}
    state = {"invalidations": [entry], "invalidations_total": 1}
    html = Inspector._render_invalidations(state)
    assert 'title="An invalidation is the server telling this client which objects' in html
    assert '<th title="tid: transaction id. The server numbers every commit' in html


# -- integration: a real server and two clients ----------------------------------------------


def _inspector_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("zchat-inspector")]


@pytest.fixture
def clients(file_server: zchat_nb.Server, make_client: MakeClient) -> tuple[ChatClient, ChatClient]:
    """alice and bob on a FileStorage server; alice made the room 'general'."""
    a, b = make_client(file_server.address, "alice"), make_client(file_server.address, "bob")
    a.session("general").add_message("the room exists")
    return a, b


@pytest.mark.integration
def test_inspector_sees_the_server_commits_conflicts_polls_and_the_tree(
    clients: tuple[ChatClient, ChatClient], tmp_path: Path
) -> None:
    a, b = clients
    threads_before = threading.active_count()
    inspector = Inspector(a, room="general", max_rate=20.0, status_interval=0.2)
    try:
        first = inspector.wait_for(lambda s: s["connections"] == 2 and s["tree"] is not None, TIMEOUT)
        assert first["connected"] and first["address"] == a.address_text
        assert first["last_tid"] and first["last_time"] == pytest.approx(time.time(), abs=600)
        buckets_before = first["tree"]["buckets"]

        # B's commit arrives as an invalidation that names the room's objects
        chat_b = b.session("general")
        sent = chat_b.add_message("hello from bob")
        seen = inspector.wait_for(lambda s: s["invalidations_total"] >= 1, TIMEOUT)
        invalidation = seen["invalidations"][-1]
        # B's first message: its new stream and tail and the indexes that get them; nothing shared besides
        assert invalidation["count"] == len(invalidation["objects"]) == 4
        kinds = {o["kind"] for o in invalidation["objects"]}
        assert kinds == {f"stream of {b.writer}", "streams index", f"tail of {b.writer}", "tails index"}
        assert seen["last_tid"] >= invalidation["tid"]

        # A's own commit, with its latency; A's poll, with its cost
        chat_a = a.session("general")
        chat_a.add_message("hello from alice")
        assert sent in chat_a.new_messages(timeout=TIMEOUT)
        mine = inspector.wait_for(lambda s: s["commits_total"] >= 1 and s["polls"]["count"] >= 1, TIMEOUT)
        commit = mine["commits"][-1]
        assert commit["room"] == "general" and commit["latency"] > 0 and commit["conflicts"] == 0
        assert mine["polls"]["last_cost"] is not None and mine["polls"]["recent"][-1]["room"] == "general"

        # Messages never need merging (each writer has its own stream), presence can: A joins
        # while B renews its lease, two keys of one bucket at once, and the server merges them
        chat_b.join()
        a.db.storage.ping()  # a round trip: A has heard of B's join (the members tree) now
        tm, conn = a.connection()
        tm.begin()
        room = conn.root()[ROOMS_KEY]["general"]
        room.join("alice", a.writer, time.time())
        chat_b.join()
        tm.commit()
        inspector.wait_for(lambda s: s["resolved"] >= 1, TIMEOUT)

        # 100 messages from B: B's stream, the busiest, splits into more buckets; the picture follows
        for i in range(100):
            chat_b.add_message(f"message {i}")
        grown = inspector.wait_for(
            lambda s: s["tree"]["buckets"] > buckets_before and s["messages"] == 103, TIMEOUT
        )
        # B's stream, small: every bucket is shown; its first record and 12 batches of 8 are in
        # the tree, the last 4 wait in B's tail
        assert sum(grown["tree"]["fills"]) == 97
        path = tmp_path / "tree.svg"
        path.write_text(inspector.tree_svg(), encoding="utf-8")
        assert ET.parse(path).getroot().tag == f"{SVG}svg"

        # the same, drawn in the widget's sections
        html_by_class = {tuple(child._dom_classes): child.value for child in inspector.children}
        assert "zchat-inspector" in inspector._dom_classes
        assert "<svg" in html_by_class[("zchat-inspector-tree",)]
        assert (
            "bob&#x27;s stream: 97 of 103 messages, 4 more in its tail"
            in html_by_class[("zchat-inspector-tree",)]
        )
        assert "stream bucket" in html_by_class[("zchat-inspector-invalidations",)]
        assert "sending to room" in html_by_class[("zchat-inspector-commits",)]
        assert a.address_text in html_by_class[("zchat-inspector-server",)]
        # the loads the server answered, from its status: a count that only grows
        shown = re.search(r"(\d+) answered by the server", html_by_class[("zchat-inspector-server",)])
        assert shown is not None and 0 < int(shown.group(1)) <= a.server_status()["loads"]
    finally:
        inspector.close()
    assert not inspector.running and inspector.closed
    assert _inspector_threads() == []
    assert threading.active_count() == threads_before


@pytest.mark.integration
def test_updates_are_coalesced_at_the_bounded_rate(clients: tuple[ChatClient, ChatClient]) -> None:
    a, b = clients
    inspector = Inspector(a, room="general", max_rate=2.0, status_interval=60.0)
    try:
        start = inspector.wait_for(lambda s: s["updates"] >= 1, TIMEOUT)
        started = time.monotonic()
        chat_b = b.session("general")
        for i in range(50):
            chat_b.add_message(f"burst {i}")
        end = inspector.wait_for(lambda s: s["invalidations_total"] >= 50, TIMEOUT)
        elapsed = time.monotonic() - started
        updates = end["updates"] - start["updates"]
        assert updates <= 1 + elapsed * inspector.max_rate + 1  # never more than max_rate a second
        assert len(end["invalidations"]) == 50  # coalesced, none lost
    finally:
        inspector.close()


@pytest.mark.integration
def test_user_and_room_names_are_escaped(file_server: zchat_nb.Server) -> None:
    evil = "<img src=x onerror=alert(1)>"
    with zchat_nb.connect(file_server.address, user=evil) as client:
        client.session(evil).add_message("hi")
        inspector = Inspector(client, room=evil)
        try:
            inspector.wait_for(lambda s: s["commits_total"] >= 0 and s["tree"] is not None, TIMEOUT)
            for child in inspector.children:
                assert "<img" not in child.value
            assert any("&lt;img" in child.value for child in inspector.children)
        finally:
            inspector.close()


@pytest.mark.integration
def test_thread_ends_when_the_client_is_closed(file_server: zchat_nb.Server) -> None:
    client = zchat_nb.connect(file_server.address, user="alice")
    inspector = Inspector(client, status_interval=0.1)
    inspector.wait_for(lambda s: s["updates"] >= 1, TIMEOUT)
    client.close()
    inspector._thread.join(TIMEOUT)
    assert not inspector.running
    assert inspector.snapshot()["error"] == "the client was closed"
    inspector.close()  # still safe
    assert _inspector_threads() == []


@pytest.mark.integration
def test_server_going_away_shows_and_close_does_not_hang(tmp_path: Path) -> None:
    server = zchat_nb.serve(path=tmp_path / "chat.fs")
    client = zchat_nb.connect(server.address, user="alice", timeout=30.0)
    inspector = Inspector(client, status_interval=0.1)
    try:
        inspector.wait_for(lambda s: s["connected"] and s["connections"] == 1, TIMEOUT)
        server.stop()
        gone = inspector.wait_for(lambda s: not s["connected"] and s["updates"] > 1, TIMEOUT)
        assert gone["running"]
    finally:
        inspector.close()
        client.close()
        server.stop()
    assert _inspector_threads() == []
