"""The picture of a room's trees: BTree summaries without loading the tree, SVG, and naming objects."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import transaction
import ZODB
from BTrees.OOBTree import OOBTree

from zchat_nb import ChatClient, Message
from zchat_nb.model import ROOMS_KEY, Room
from zchat_nb.treeview import (
    MIN_FONT,
    classify,
    drawn_stream,
    room_oids,
    stream_caption,
    tree_summary,
    tree_svg,
)

from .browser import ARTIFACTS, chromium_available, launch_chromium, new_page

SVG = "{http://www.w3.org/2000/svg}"


def _all_buckets(tree: OOBTree) -> list[int]:
    """Every bucket's length, oldest first, by walking the whole tree (what the inspector avoids)."""
    state = tree.__getstate__()
    if state is None:
        return []
    children = state[0]
    if len(children) == 1 and isinstance(children[0], tuple):
        return [len(children[0][0]) // 2]
    found: list[int] = []
    for kid in children[::2]:
        found.extend(_all_buckets(kid) if isinstance(kid, OOBTree) else [len(kid)])
    return found


@pytest.fixture
def stored_tree() -> Iterator[tuple[OOBTree, transaction.TransactionManager]]:
    """An empty OOBTree committed to an in-memory database, so that its buckets are persistent."""
    db = ZODB.DB(None)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tree = conn.root()["tree"] = OOBTree()
    tm.commit()
    yield tree, tm
    tm.abort()
    db.close()


def _append(tree: OOBTree, tm: transaction.TransactionManager, upto: int) -> None:
    """Append messages keyed as in a room's stream up to ``upto`` items, committing every 100."""
    for i in range(len(tree), upto):
        tree[(float(i), uuid.uuid4().hex)] = ("id", "author", "text", float(i))
        if i % 100 == 99:
            tm.commit()
    tm.commit()


# -- unit: the tree's right edge -----------------------------------------------------------


def test_empty_tree_has_no_buckets(stored_tree: tuple[OOBTree, transaction.TransactionManager]) -> None:
    summary = tree_summary(stored_tree[0])
    assert summary["depth"] == 0
    assert summary["buckets"] == 0 and summary["fills"] == []
    root = ET.fromstring(tree_svg(summary, title="empty"))
    assert root.tag == f"{SVG}svg"


@pytest.mark.parametrize("items", [1, 30, 31, 100, 1000])
def test_small_tree_is_counted_exactly(
    stored_tree: tuple[OOBTree, transaction.TransactionManager], items: int
) -> None:
    tree, tm = stored_tree
    _append(tree, tm, items)
    summary = tree_summary(tree, last=40)
    buckets = _all_buckets(tree)
    assert summary["depth"] == 1
    assert summary["buckets"] == len(buckets) and summary["buckets_exact"]
    assert summary["fills"] == buckets[-40:]
    assert all(0 < fill <= summary["max_fill"] == 30 for fill in summary["fills"])


def test_large_tree_loads_only_its_right_edge_and_estimates_the_rest(
    stored_tree: tuple[OOBTree, transaction.TransactionManager],
) -> None:
    tree, tm = stored_tree
    _append(tree, tm, 20_000)
    buckets = _all_buckets(tree)
    tm.abort()
    tree._p_jar.cacheMinimize()
    summary = tree_summary(tree, last=40)
    assert summary["depth"] == 2
    assert summary["fills"] == buckets[-40:]
    assert not summary["buckets_exact"]
    assert abs(summary["buckets"] - len(buckets)) <= 0.25 * len(buckets)
    # the root is exact; the bottom level is shown only where the last 40 buckets hang
    assert summary["levels"][0] == {"nodes": 1, "exact": True, "shown": summary["levels"][0]["shown"]}
    assert sum(len(node["children"]) for node in summary["levels"][1]["shown"]) == 40
    loaded = sum(1 for obj in tree._p_jar._cache.lru_items())
    assert loaded < len(buckets) / 4, "the summary loaded most of the tree"


def test_picture_is_xml_and_escapes_the_title(
    stored_tree: tuple[OOBTree, transaction.TransactionManager], tmp_path: Path
) -> None:
    tree, tm = stored_tree
    _append(tree, tm, 500)
    svg = tree_svg(tree_summary(tree), title="room '<img src=x onerror=alert(1)>'")
    path = tmp_path / "tree.svg"
    path.write_text(svg, encoding="utf-8")
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    assert "<img" not in svg
    assert len(root.findall(f".//{SVG}g[@class='zchat-tree-bucket']")) == len(_all_buckets(tree)[-40:])
    assert "currentColor" in svg and "var(--jp-" in svg


def test_objects_are_named_by_their_role_in_the_room() -> None:
    db = ZODB.DB(None)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    rooms = conn.root()[ROOMS_KEY] = OOBTree()
    room = rooms["general"] = Room("general")
    other = rooms["other"] = Room("other")
    room.join("ada", "w1", 1.0)
    other.join("bob", "w2", 1.0)
    other.append("w2", Message(uuid.uuid4().hex, "bob", "elsewhere", 0.5))
    for i in range(40):  # a split: the writer's stream gets buckets of its own
        room.append("w1", Message(uuid.uuid4().hex, "ada", f"m{i}", float(i)))
    tm.commit()
    known = room_oids(room, rooms._p_oid)
    names = {oid: classify(conn, oid, known) for oid in known}
    assert {e["kind"] for e in names.values()} == {
        "root",
        "rooms index",
        "room",
        "streams index",
        "stream of w1",
        "tails index",
        "tail of w1",
        "members",
    }
    bucket = room.streams["w1"].__getstate__()[0][0]
    assert classify(conn, bucket._p_oid, known) | {"oid": ""} == {
        "oid": "",
        "kind": "bucket",
        "class": "OOBucket",
        "label": "stream bucket",
    }
    assert classify(conn, other._p_oid, known)["label"] == "room 'other'"
    assert classify(conn, other.streams["w2"]._p_oid, known)["label"] == "stream tree node"
    assert classify(conn, other.members._p_oid, known)["label"] == "members tree node"
    assert classify(conn, other.tails._p_oid, known)["label"] == "tails index tree node"
    assert classify(conn, other.tails["w2"]._p_oid, known) | {"oid": ""} == {
        "oid": "",
        "kind": "object",
        "class": "Tail",
        "label": "Tail",
    }
    assert classify(conn, b"\0\0\0\0\0\0\xff\xff", known)["kind"] == "unreadable"
    tm.abort()
    db.close()


@pytest.fixture
def three_writers() -> Iterator[Room]:
    """Room 'general' with 40 messages from alice, 25 from bob and 8 from carol (three clients)."""
    db = ZODB.DB(None)
    for user, count in (("alice", 40), ("bob", 25), ("carol", 8)):
        chat = ChatClient(db, user=user).session("general")
        for i in range(count):
            chat.add_message(f"{user} {i}")
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    yield conn.root()[ROOMS_KEY]["general"]
    tm.abort()
    db.close()


def test_the_picture_names_whose_stream_it_draws_and_its_share_of_the_room(three_writers: Room) -> None:
    drawn = drawn_stream(three_writers)
    assert drawn is not None
    # alice's first record and four batches of 8 went into her tree; 7 wait in her tail
    assert (drawn["author"], drawn["count"], drawn["held"]) == ("alice", 33, 7)
    assert (drawn["total"], drawn["writers"]) == (73, 3)
    summary = tree_summary(drawn["stream"])
    assert sum(summary["fills"]) == 33  # the picture holds exactly the messages its title counts
    title, subtitle = stream_caption(drawn)
    assert title == "alice's stream: 33 of 73 messages, 7 more in its tail"
    assert "busiest of 3 writers" in subtitle
    root = ET.fromstring(tree_svg(summary, title=title, subtitle=subtitle))
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert any(title in t for t in texts) and any(subtitle in t for t in texts)
    hover = root.find(f".//{SVG}text[@class='zchat-tree-title']/{SVG}title")
    assert hover is not None and "stream" in (hover.text or "") and "conflict" in (hover.text or "")


def _svg_sizes(svg: str) -> tuple[float, list[float]]:
    root = ET.fromstring(svg)
    width = float(root.get("viewBox", "").split()[2])
    sizes = [float(root.get("font-size", "0"))]
    sizes += [float(e.get("font-size")) for e in root.iter() if e.get("font-size")]
    return width, sizes


def test_the_picture_fits_500_px_with_no_text_under_the_minimum(three_writers: Room) -> None:
    drawn = drawn_stream(three_writers)
    assert drawn is not None
    width, sizes = _svg_sizes(tree_svg(tree_summary(drawn["stream"]), title="t", subtitle="s"))
    assert width <= 500  # drawn at most at its own width: 1 px of the picture is >= 1 px on screen
    assert min(sizes) >= MIN_FONT >= 10


@pytest.mark.integration
@pytest.mark.skipif(chromium_available() is not None, reason=str(chromium_available()))
def test_the_picture_is_legible_in_a_500_px_wide_browser(
    stored_tree: tuple[OOBTree, transaction.TransactionManager],
) -> None:
    """Chromium at 500 px: every text is inside the picture, none overlaps another, none under 10 px."""
    from playwright.sync_api import sync_playwright

    tree, tm = stored_tree
    _append(tree, tm, 20_000)  # three levels, 40 buckets shown
    svg = tree_svg(
        tree_summary(tree),
        title="alice's stream: 20,000 of 29,417 messages",
        subtitle="room 'general': the busiest of 12 writers; the other 11 keep streams of their own",
    )
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser, errors)
            page.set_viewport_size({"width": 500, "height": 400})
            page.set_content(
                f"<body style='margin:0;font:13px sans-serif'><div style='width:500px'>{svg}</div>"
            )
            boxes = page.evaluate(
                """() => {
                  const svg = document.querySelector("svg").getBoundingClientRect();
                  return {svg: [svg.left, svg.right],
                          texts: [...document.querySelectorAll("svg text")].map((t) => {
                            const r = t.getBoundingClientRect();
                            return {text: t.textContent, left: r.left, right: r.right, top: r.top,
                                    bottom: r.bottom,
                                    px: parseFloat(getComputedStyle(t).fontSize)
                                        * svg.width / t.ownerSVGElement.viewBox.baseVal.width};
                          })};
                }"""
            )
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "inspector-tree-500px.png"))
        finally:
            browser.close()
    left, right = boxes["svg"]
    texts = [t for t in boxes["texts"] if t["text"].strip() not in ("", "…")]
    for t in texts:
        assert left - 0.5 <= t["left"] and t["right"] <= right + 0.5, t
        assert t["px"] >= 10, t
    overlapping = [
        (a["text"], b["text"])
        for i, a in enumerate(texts)
        for b in texts[i + 1 :]
        if a["left"] < b["right"]
        and b["left"] < a["right"]
        and a["top"] < b["bottom"]
        and b["top"] < a["bottom"]
    ]
    assert overlapping == []
