"""The picture of a room's trees, as pure functions of stored objects (no widgets, no threads).

:func:`room_oids` and :func:`classify` name the objects an invalidation lists (the room, its
indexes, a writer's stream, a bucket); :func:`tree_summary` walks a BTree's right edge, where chat
traffic appends, without loading the rest; :func:`tree_svg` draws that summary. The
:class:`~zchat_nb.inspector.Inspector` widget shows them live.
"""

from __future__ import annotations

import html
import itertools
from typing import TYPE_CHECKING, Any

from BTrees.OOBTree import OOBTree
from transaction.interfaces import TransientError

from .amend import EVENT_TAG, MESSAGE_TAG
from .model import Room, Tail

if TYPE_CHECKING:
    from ZODB.Connection import Connection

__all__ = [
    "busiest_stream",
    "classify",
    "drawn_stream",
    "room_oids",
    "stream_caption",
    "tree_summary",
    "tree_svg",
]

#: Longest title drawn above the tree picture, in characters.
MAX_TITLE = 64
_Z64 = b"\0" * 8
#: Streams :func:`drawn_stream` looks at (a room has one per client that ever sent).
MAX_WRITERS_DRAWN = 1000


# -- naming objects ----------------------------------------------------------------------------


def room_oids(room: Room | None, rooms_oid: bytes | None = None) -> dict[bytes, str]:
    """``oid -> kind`` for a room and its trees (and the root and the rooms index)."""
    known = {_Z64: "root"}
    if rooms_oid is not None:
        known[rooms_oid] = "rooms index"
    if room is None:
        return known
    if room._p_oid is not None:
        known[room._p_oid] = "room"
    for attr, kind in (
        ("streams", "streams index"),
        ("tails", "tails index"),
        ("heads", "heads"),
        ("count", "count"),
        ("presence", "presence"),
        ("members", "members"),
        ("amends", "amendments index"),
    ):
        oid = getattr(getattr(room, attr, None), "_p_oid", None)
        if oid is not None:
            known[oid] = kind
    if room.streams is not None:
        for writer, stream in room.streams.items():  # one entry per writer: small
            if stream._p_oid is not None:
                known[stream._p_oid] = f"stream of {writer}"
    if room.tails is not None:
        for writer, tail in room.tails.items():
            if getattr(tail, "_p_oid", None) is not None:
                known[tail._p_oid] = f"tail of {writer}"
    return known


def classify(conn: Connection, oid: bytes, known: dict[bytes, str]) -> dict[str, str]:
    """Name the object ``oid`` as seen by ``conn``'s current transaction.

    Returns ``{"oid", "kind", "class", "label"}``: kind is one of ``known``'s values (room, messages
    (room, streams index, stream of WRITER, heads, count, presence, ...) or "bucket", "tree node", "room"
    "object", "unreadable"; class is the class name (OOBucket, Length, ...); label is short words
    ("stream bucket": a bucket's tree is guessed from its keys). Loads the object: call it only
    on the connection's own thread.
    """
    entry = {"oid": oid.hex(), "kind": known.get(oid, ""), "class": "", "label": ""}
    try:
        obj = conn.get(oid)
        cls = type(obj).__name__
        entry["class"] = cls
        if entry["kind"]:
            entry["label"] = entry["kind"]
        elif isinstance(obj, Room):
            entry["kind"], entry["label"] = "room", f"room {obj.name!r}"
        elif cls.endswith("Bucket"):
            tree = _guess_tree(obj)
            entry["kind"], entry["label"] = "bucket", f"{tree} bucket" if tree else "bucket"
        elif cls.endswith("BTree"):  # an inner node, or the root of another room's tree
            tree = _guess_tree(obj)
            entry["kind"], entry["label"] = "tree node", f"{tree} tree node" if tree else "tree node"
        else:
            entry["kind"], entry["label"] = "object", cls
    except TransientError:
        raise
    except Exception as exc:  # deleted, packed away, or refused by the class allow-list
        entry["kind"] = entry["kind"] or "unreadable"
        entry["label"] = f"{entry['kind']} ({type(exc).__name__})"
    return entry


def _guess_tree(node: Any) -> str:
    """Which of a room's trees a bucket or tree node belongs to, guessed from its first key and value."""
    try:
        key = node.minKey()  # not len(): on a tree node that would load every bucket
    except ValueError:  # empty
        return ""
    value = node[key]
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], float):
        return "stream"
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str):
        return "members"
    if isinstance(key, str):
        if isinstance(value, tuple):
            return "heads"
        if isinstance(value, Tail):
            return "tails index"
        return "presence" if isinstance(value, float) else "streams index"
    return ""


def busiest_stream(room: Room | None) -> Any:
    """The stream (a writer's BTree) with the most messages: the picture shows it."""
    drawn = drawn_stream(room)
    return drawn["stream"] if drawn else None


def drawn_stream(
    room: Room | None, counts: dict[bytes, tuple[Any, int]] | None = None
) -> dict[str, Any] | None:
    """What the picture shows: the busiest writer's stream, with whose it is and how much of the room.

    Returns ``{"stream", "writer", "author", "count", "held", "writers", "total"}``: the stream (a
    BTree), its writer id, the author of its last message (a writer is one client, so one name),
    the records in the tree and those still held in the writer's tail (they go into the tree
    a few at a time: see :class:`~zchat_nb.model.Tail`), how many writers the room has and the
    room's record count, tails included; None when no
    writer has sent yet. Counts by walking the streams (no shared counter exists: writers would
    conflict on it). ``counts`` (``stream oid -> (last key, count)``, kept by the caller between
    calls) makes a recount read only what was appended since.
    """
    if room is None or not isinstance(room.streams, OOBTree):
        return None
    sizes = []
    for writer, stream in itertools.islice(room.streams.items(), MAX_WRITERS_DRAWN):
        try:
            if isinstance(stream, OOBTree) and stream:
                held = len(room.unflushed(writer, stream)) if isinstance(writer, str) else 0
                sizes.append((_count(stream, counts) + held, str(writer), stream, held))
        except TransientError:
            raise
        except Exception:  # a crafted stream: not drawn
            continue
    if not sizes:
        return None
    count, writer, stream, held = max(sizes, key=lambda entry: entry[0])
    author = _author(stream[stream.maxKey()])
    return {
        "stream": stream,
        "writer": writer,
        "author": author[:64],
        "count": count - held,
        "held": held,
        "writers": len(sizes),
        "total": sum(size for size, _, _, _ in sizes),
    }


def _author(record: object) -> str:
    """The author of a stream record (a message, tagged or not, or an amendment), or ""."""
    if not (isinstance(record, tuple) and len(record) >= 4):
        return ""
    author = record[2] if record[0] in (MESSAGE_TAG, EVENT_TAG) else record[1]
    return author if isinstance(author, str) else ""


def _count(stream: OOBTree, counts: dict[bytes, tuple[Any, int]] | None) -> int:
    """Records in ``stream``; with ``counts``, only the ones appended since the last count are read."""
    last = stream.maxKey()
    known = counts.get(stream._p_oid) if counts is not None and stream._p_oid is not None else None
    if known is None:
        count = len(stream)
    elif known[0] == last:
        count = known[1]
    else:
        count = known[1] + sum(1 for _ in stream.keys(known[0], excludemin=True))
    if counts is not None and stream._p_oid is not None:
        counts[stream._p_oid] = (last, count)
    return count


def stream_caption(drawn: dict[str, Any] | None) -> tuple[str, str]:
    """Title and subtitle for the picture of :func:`drawn_stream`'s stream, numbers that agree."""
    if drawn is None:
        return "no messages yet", ""
    who = drawn["author"] or f"writer {drawn['writer'][:8]}"
    title = f"{who}'s stream: {drawn['count']:,} of {drawn['total']:,} messages"
    if drawn.get("held"):
        title += f", {drawn['held']} more in its tail"
    others = drawn["writers"] - 1
    subtitle = (
        f"the busiest of {drawn['writers']} writers; the other {others} keep streams of their own"
        if others
        else "the only writer so far"
    )
    return title, subtitle


# -- the tree's right edge ---------------------------------------------------------------------


def tree_summary(tree: Any, last: int = 40) -> dict[str, Any]:
    """The shape of a BTree without loading all of it: depth, node counts and the last buckets.

    Loads the nodes on the right edge (where appends go) down to the last ``last`` buckets, and
    one more node per level to estimate how many nodes the level has. Returns::

        {"depth": BTree levels above the buckets (0 when empty),
         "levels": [{"nodes": n, "exact": bool, "shown": [{"fanout": k, "children": [i, ...]}]}],
                   one per BTree level, root first; children index the next level's "shown"
                   (the buckets, for the last level), all oldest first,
         "buckets": n, "buckets_exact": bool, "fills": [len of each shown bucket, oldest first],
         "max_fill": the bucket size limit (30 for OOBTree), "max_fanout": the node size limit}
    """
    tree_class = type(tree)
    max_fill = int(getattr(tree_class, "max_leaf_size", 30) or 30)
    max_fanout = int(getattr(tree_class, "max_internal_size", 250) or 250)
    levels: list[list[dict[str, Any]]] = []
    samples: list[list[int]] = []  # fanouts of nodes seen, per level, for the estimates
    fills: list[int] = []  # newest first while walking

    def fanout_of(node: Any) -> int:
        state = node.__getstate__()
        if state is None:
            return 0
        children = state[0]
        return 1 if len(children) == 1 and isinstance(children[0], tuple) else len(children[::2])

    def visit(node: Any, level: int) -> int:
        while len(levels) <= level:
            levels.append([])
            samples.append([])
        entry: dict[str, Any] = {"fanout": 0, "children": []}
        levels[level].append(entry)
        index = len(levels[level]) - 1
        node._p_activate()
        state = node.__getstate__()
        if state is None:
            return index
        children = state[0]
        if len(children) == 1 and isinstance(children[0], tuple):  # one bucket, stored inline
            entry["fanout"] = 1
            fills.append(len(children[0][0]) // 2)  # the bucket's state: ((k0, v0, k1, v1, ...),)
            entry["children"].append(len(fills) - 1)
            return index
        kids = children[::2]
        entry["fanout"] = len(kids)
        samples[level].append(len(kids))
        first_visited = len(kids)
        for position in range(len(kids) - 1, -1, -1):
            if len(fills) >= last:
                break
            first_visited = position
            kid = kids[position]
            if isinstance(kid, tree_class):
                entry["children"].append(visit(kid, level + 1))
            else:
                fills.append(len(kid))
                entry["children"].append(len(fills) - 1)
        if 0 < first_visited < len(kids) and isinstance(kids[first_visited - 1], tree_class):
            # an unvisited neighbour: a settled node, for the estimate of its level's size
            while len(samples) <= level + 1:
                samples.append([])
            samples[level + 1].append(fanout_of(kids[position - 1]))
        return index

    tree._p_activate()
    if tree.__getstate__() is not None:
        visit(tree, 0)

    # Oldest first: reverse every level and renumber the children.
    out_levels: list[dict[str, Any]] = []
    nodes, exact = 1, True
    for depth_index, shown in enumerate(levels):
        below = len(levels[depth_index + 1]) if depth_index + 1 < len(levels) else len(fills)
        ordered = [
            {"fanout": e["fanout"], "children": sorted(below - 1 - c for c in e["children"])}
            for e in reversed(shown)
        ]
        out_levels.append({"nodes": nodes, "exact": exact, "shown": ordered})
        fanouts = [e["fanout"] for e in shown]
        unseen = nodes - len(shown)
        if unseen > 0:
            settled = [f for f in samples[depth_index] if f] if depth_index < len(samples) else []
            settled = settled[1:] if len(settled) > 1 else settled  # skip the growing right edge
            typical = sum(settled) / len(settled) if settled else max_fanout / 2
            nodes, exact = round(sum(fanouts) + unseen * typical), False
        else:
            nodes = sum(fanouts)
    return {
        "depth": len(levels),
        "levels": out_levels,
        "buckets": nodes if levels else 0,
        "buckets_exact": exact,
        "fills": list(reversed(fills)),
        "max_fill": max_fill,
        "max_fanout": max_fanout,
    }


def _about(n: int, exact: bool) -> str:
    return f"{n:,}" if exact else f"about {n:,}"


#: What the picture is, said on hover over its title.
STREAMS_HELP = (
    "Each writer (one client) appends its messages to a BTree of its own, its stream, so that two "
    "writers never change the same bucket and never conflict. The picture shows the stream with the "
    "most messages; the room's messages are all the streams together."
)
#: Smallest font size drawn, in px at the picture's own width (it is never drawn wider than that).
MIN_FONT = 10


def tree_svg(summary: dict[str, Any] | None, *, title: str = "", subtitle: str = "", width: int = 480) -> str:
    """Draw a :func:`tree_summary` as a standalone SVG document (valid XML).

    Colours come from ``currentColor`` and JupyterLab's ``--jp-*`` variables (with fallbacks), so
    the picture is readable in light and dark themes. At ``width`` px (the most it is drawn at)
    no text is smaller than :data:`MIN_FONT` px; every part explains itself on hover.
    """
    bar_h, row_h, top = 54, 38, 50
    esc = html.escape
    parts: list[str] = []
    if len(title) > MAX_TITLE:
        title = title[: MAX_TITLE - 1] + "…"
    if len(subtitle) > 2 * MAX_TITLE:
        subtitle = subtitle[: 2 * MAX_TITLE - 1] + "…"
    parts.append(
        f'<text x="8" y="15" class="zchat-tree-title" font-size="12" font-weight="bold">'
        f"<title>{esc(STREAMS_HELP)}</title>{esc(title)}</text>"
    )
    if subtitle:
        parts.append(f'<text x="8" y="30" class="zchat-tree-subtitle" opacity="0.8">{esc(subtitle)}</text>')
    if not summary or not summary.get("depth"):
        parts.append('<text x="8" y="45" opacity="0.8">empty: no buckets yet</text>')
        return _svg(parts, width, 54)
    levels, fills = summary["levels"], summary["fills"]
    max_fill, depth = summary["max_fill"], summary["depth"]
    shown, total = len(fills), summary["buckets"]
    left, right = 22, 8
    step = (width - left - right) / max(shown, 1)
    bar_top = top + depth * row_h
    height = bar_top + bar_h + 34
    mean = sum(fills) / len(fills) if fills else 0.0
    parts.append(
        f'<text x="8" y="45" opacity="0.8"><title>depth: node levels above the buckets; a bucket '
        f"holds up to {max_fill} messages, in key (time) order</title>depth {depth} · "
        f"{_about(total, summary['buckets_exact'])} buckets · last {shown} shown · mean fill "
        f"{mean:.1f} of {max_fill}</text>"
    )
    # x of every shown node, bottom-up: buckets first, a node above the middle of its children
    xs: list[list[float]] = [[0.0] * len(level["shown"]) for level in levels]
    below_x = [left + step * (i + 0.5) for i in range(shown)]
    for li in range(depth - 1, -1, -1):
        for ni, node in enumerate(levels[li]["shown"]):
            kids = [below_x[c] for c in node["children"] if c < len(below_x)]
            xs[li][ni] = sum(kids) / len(kids) if kids else width - right - 15
        below_x = xs[li]
    node_w, node_h = 30, 15
    for li, level in enumerate(levels):
        y = top + li * row_h
        name = "root" if li == 0 else f"level {li}"
        parts.append(
            f'<text x="8" y="{y + 10}" font-size="{MIN_FONT}" opacity="0.75">{name}: '
            f"{_about(level['nodes'], level['exact'])} node{'s' if level['nodes'] != 1 else ''}</text>"
        )
        child_y = y + row_h
        for ni, node in enumerate(level["shown"]):
            x = xs[li][ni]
            targets = (
                [left + step * (c + 0.5) for c in node["children"]]
                if li == depth - 1
                else [xs[li + 1][c] for c in node["children"]]
            )
            for tx in targets:
                parts.append(
                    f'<line x1="{x:.1f}" y1="{y + node_h + 12:.1f}" x2="{tx:.1f}" y2="{child_y + 12:.1f}" '
                    'stroke="currentColor" stroke-opacity="0.35" stroke-width="0.8"/>'
                )
            parts.append(
                f'<rect class="zchat-tree-node" x="{x - node_w / 2:.1f}" y="{y + 12}" width="{node_w}" '
                f'height="{node_h}" rx="3" style="fill:var(--jp-layout-color2,#eeeeee)" '
                f'stroke="currentColor" stroke-opacity="0.6"><title>node with {node["fanout"]} '
                f"children (splits above {summary['max_fanout']})</title></rect>"
            )
            parts.append(
                f'<text x="{x:.1f}" y="{y + 23.5}" font-size="{MIN_FONT}" text-anchor="middle">'
                f"{node['fanout']}</text>"
            )
        if level["shown"] and (level["nodes"] > len(level["shown"])):
            first = min(xs[li])
            more_x = first - node_w / 2 - 4
            parts.append(f'<text x="{more_x:.1f}" y="{y + 23}" text-anchor="end" opacity="0.6">…</text>')
    bar_w = max(step - 2, 1.0)
    for i, fill in enumerate(fills):
        x = left + step * i + (step - bar_w) / 2
        inner = bar_h - 12
        filled = inner * min(fill, max_fill) / max_fill
        colour = "--jp-warn-color1,#f57c00" if i == shown - 1 else "--jp-brand-color1,#1976d2"
        parts.append(
            f'<g class="zchat-tree-bucket"><title>bucket with {fill} of {max_fill} items</title>'
            f'<rect x="{x:.1f}" y="{bar_top + 12}" width="{bar_w:.1f}" height="{inner}" '
            'fill="none" stroke="currentColor" stroke-opacity="0.4"/>'
            f'<rect x="{x:.1f}" y="{bar_top + 12 + inner - filled:.1f}" width="{bar_w:.1f}" '
            f'height="{filled:.1f}" style="fill:var({colour})"/></g>'
        )
    if total > shown:
        parts.append(f'<text x="8" y="{bar_top + bar_h - 4}" opacity="0.6">…</text>')
    parts.append(
        f'<text x="8" y="{bar_top + bar_h + 16}" font-size="10" opacity="0.8">buckets: '
        f"{shown} shown of {_about(total, summary['buckets_exact'])}; bar: items / {max_fill}; "
        "node: its children</text>"
    )
    parts.append(
        f'<text x="{width - right}" y="{bar_top + bar_h + 28}" font-size="10" text-anchor="end" '
        'opacity="0.8">newest bucket (appends) →</text>'
    )
    return _svg(parts, width, height)


def _svg(parts: list[str], width: int, height: int) -> str:
    body = "".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="zchat-inspector-svg" viewBox="0 0 {width} {height}" '
        f'width="100%" font-size="11" fill="currentColor" role="img" '
        f'style="max-width:{width}px;font-family:var(--jp-ui-font-family,sans-serif)">{body}</svg>'
    )
