"""Inspector: a live view of what ZEO does for one chat client, shown beside the chat.

It shows the server (address, connected clients, last transaction and its time), the invalidations
the server pushes to this client (which objects: the room, its trees, buckets), this client's own
commits with their latency and the conflicts they retried or the server resolved, the polls and
what they cost, and a picture of the room's messages BTree: its depth and the buckets at its right
edge, where chat traffic appends, with their fill.

Threads and data path::

    ZEO network thread / committing threads --client.subscribe()--> _on_event: enqueue, wake
    inspector thread (daemon): drain events; tm.begin() on its own connection; classify oids,
        server_status() (at most every status_interval), tree summary; render HTML/SVG strings;
        set the HTML widgets' values (the only writer), at most max_rate times a second

Every storage call happens on the inspector thread, never on ZEO's networking thread.
The data is also available without HTML: :meth:`Inspector.snapshot` and :meth:`Inspector.wait_for`;
the tree picture and the naming of objects are the pure functions of :mod:`zchat_nb.treeview`.
"""

from __future__ import annotations

import copy
import html
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets
from ZODB.TimeStamp import TimeStamp

from .exceptions import ZChatConnectionError, ZChatDisconnected, server_boundary
from .model import ROOMS_KEY, check_room_name
from .treeview import STREAMS_HELP, classify, drawn_stream, room_oids, stream_caption, tree_summary, tree_svg

if TYPE_CHECKING:
    from ZODB.Connection import Connection

    from .client import ChatClient, ClientEvent

__all__ = ["Inspector"]

log = logging.getLogger(__name__)

#: Invalidations, commits and polls kept (and returned by snapshot()).
HISTORY = 50
#: Rows shown per table.
ROWS = 8
#: Objects of one invalidation that are loaded and named; the rest are only counted.
MAX_CLASSIFIED = 12
#: Events (other than polls, which are only counted) queued for the inspector thread at most.
MAX_QUEUED = 10_000
#: Seconds close() waits for the thread.
JOIN_TIMEOUT = 5.0
_Z64 = b"\0" * 8
#: Plain words for a tid and an invalidation, shown on hover (attribute-safe: no quotes or markup).
TID_HELP = (
    "tid: transaction id. The server numbers every commit; the number is the time of the commit, "
    "so a later commit has a larger tid. Every object a commit changes is stamped with its tid."
)
INVALIDATION_HELP = (
    "An invalidation is the server telling this client which objects another client just changed "
    "(one message per commit, with its tid). The client drops its old copies and reads them again "
    "when asked; the chat wakes its readers on it instead of asking the server again and again."
)
_MAX_LABELS = 10_000


# -- the widget --------------------------------------------------------------------------------

_STYLE = """<style>
.zchat-inspector { font-size: var(--jp-ui-font-size1, 13px); color: var(--jp-ui-font-color1, inherit);
  border: 1px solid var(--jp-border-color2, #8884); border-radius: 4px; padding: 4px 8px; }
.zchat-inspector h4 { margin: 6px 0 2px; font-size: 1em; line-height: 1.4; }
.zchat-inspector .widget-html-content { line-height: 1.35; }
.zchat-inspector table { border-collapse: collapse; font-size: 0.9em; width: 100%; }
.zchat-inspector td, .zchat-inspector th { padding: 1px 6px 1px 0; text-align: left; vertical-align: top; }
.zchat-inspector th { font-weight: normal; color: var(--jp-ui-font-color2, inherit); opacity: 0.8; }
.zchat-inspector code { font-size: 0.95em; }
.zchat-inspector .zchat-muted { color: var(--jp-ui-font-color2, inherit); opacity: 0.8; }
</style>"""


class Inspector(ipywidgets.VBox):
    """The live ZEO inspector of one client and room; display it beside the chat.

    Parameters
    ----------
    client
        The :class:`~zchat_nb.ChatClient` to watch; ``None`` connects to the embedded default
        server (the inspector then owns that client and closes it on :meth:`close`).
    room
        The room whose objects are named and whose busiest stream (a writer's BTree) is drawn.
    max_rate
        Most redraws per second; events arriving faster are coalesced.
    status_interval
        Seconds between ``server_status()`` calls (connected clients, last transaction) when
        nothing else happens; also how soon the inspector notices that its client was closed.
    buckets_shown
        How many of the tree's last buckets the picture shows.

    The data behind the picture: :meth:`snapshot`; wait for a state with :meth:`wait_for`.
    """

    def __init__(
        self,
        client: ChatClient | None = None,
        room: str = "general",
        *,
        max_rate: float = 4.0,
        status_interval: float = 1.0,
        buckets_shown: int = 40,
        **kwargs: Any,
    ) -> None:
        for name, value in (("max_rate", max_rate), ("status_interval", status_interval)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"Inspector({name}=...) must be a number > 0, not {value!r}")
        if not (isinstance(buckets_shown, int) and buckets_shown > 0):
            raise ValueError(f"Inspector(buckets_shown=...) must be an int > 0, not {buckets_shown!r}")
        self.room = check_room_name(room)
        owns_client = client is None
        if client is None:
            from .client import connect

            client = connect()
        self.client: ChatClient = client
        self._owns_client = owns_client
        self.max_rate = float(max_rate)
        self.status_interval = float(status_interval)
        self.buckets_shown = buckets_shown
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._events: deque[ClientEvent] = deque(maxlen=MAX_QUEUED)
        self._dropped = 0
        # Polls can come by the thousand: counted as they come, not queued.
        self._poll_lock = threading.Lock()
        self._polls: dict[str, Any] = {
            "count": 0,
            "total_cost": 0.0,
            "last_cost": None,
            "max_cost": 0.0,
            "recent": deque(maxlen=HISTORY),
            "loads": 0,
            "delivered": 0,
        }
        #: ``stream oid -> (last key, records)``: the picture's counts, updated by what was appended.
        self._counts: dict[bytes, tuple[Any, int]] = {}
        self._changed = threading.Condition()
        # Inspector-thread state; snapshot() copies _state under _changed.
        self._labels: dict[bytes, dict[str, str]] = {}
        self._status_due = 0.0
        self._state: dict[str, Any] = {
            "address": client.address_text,
            "room": self.room,
            "user": client.user,
            "connected": False,
            "connections": None,
            "last_tid": None,
            "last_time": None,
            "server": {},
            "invalidations": [],
            "invalidations_total": 0,
            "commits": [],
            "commits_total": 0,
            "conflicts": 0,
            "resolved": 0,
            "polls": {
                "count": 0,
                "total_cost": 0.0,
                "last_cost": None,
                "max_cost": 0.0,
                "recent": [],
                "loads": 0,
                "delivered": 0,
            },
            "dropped": 0,
            "tree": None,
            "messages": None,
            "stream": None,
            "updates": 0,
            "error": "",
            "running": True,
        }
        self._server_html = ipywidgets.HTML(_STYLE + self._render_server(self._state))
        self._invalidations_html = ipywidgets.HTML(self._render_invalidations(self._state))
        self._commits_html = ipywidgets.HTML(self._render_commits(self._state))
        self._tree_html = ipywidgets.HTML(self._render_tree(self._state))
        sections = [
            (self._server_html, "zchat-inspector-server"),
            (self._invalidations_html, "zchat-inspector-invalidations"),
            (self._commits_html, "zchat-inspector-commits"),
            (self._tree_html, "zchat-inspector-tree"),
        ]
        try:
            kwargs.setdefault("layout", ipywidgets.Layout(max_width="44em", flex="1 1 24em"))
            super().__init__(children=[w for w, _ in sections], **kwargs)
            self.add_class("zchat-inspector")
            for widget, css in sections:
                widget.add_class(css)
            self._unsubscribe = client.subscribe(self._on_event, activity=True)
            self._thread = threading.Thread(
                target=self._run, name=f"zchat-inspector-{self.model_id[:8]}", daemon=True
            )
            self._thread.start()
        except BaseException:
            for widget, _ in sections:
                widget.close()
            if owns_client:
                client.close()
            raise

    # -- public --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A copy of what the inspector shows, as plain data.

        Keys: address, room, user, connected, connections, last_tid (hex), last_time, server (the
        last ``server_status()``), invalidations (newest last: time, tid, count, objects (oid, kind,
        class, label), more), invalidations_total, commits (time, room, what, latency, conflicts),
        commits_total, conflicts (retried by this client), resolved (by the server, in this
        client's commits), polls (count, total_cost, last_cost, max_cost, recent, loads and
        delivered: objects loaded and messages returned by all polls), tree (see
        :func:`tree_summary`), messages, updates, error, running, dropped (events lost because
        the inspector fell more than ``MAX_QUEUED`` behind).
        """
        with self._changed:
            return copy.deepcopy(self._state)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """Block until ``predicate(snapshot)`` holds after an update; return that snapshot.

        Raises ``TimeoutError`` with the last snapshot after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if predicate(self._state):
                    return copy.deepcopy(self._state)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._state["running"]:
                    brief = {k: v for k, v in self._state.items() if k not in ("invalidations", "polls")}
                    raise TimeoutError(
                        f"the inspector did not reach the expected state within {timeout:g} s; "
                        f"last snapshot (without invalidations and polls): {brief!r}"
                    )
                self._changed.wait(remaining)

    def refresh(self) -> None:
        """Ask for a redraw with fresh server status now (still at most ``max_rate`` a second)."""
        self._status_due = 0.0
        self._wake.set()

    def tree_svg(self) -> str:
        """The current picture of the busiest stream of the room, as a standalone SVG document."""
        snap = self.snapshot()
        title, subtitle = self._tree_caption(snap)
        return tree_svg(snap["tree"], title=title, subtitle=subtitle)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` (or :meth:`stop`) was called."""
        return self._stopping.is_set()

    @property
    def running(self) -> bool:
        """True while the inspector thread runs."""
        return hasattr(self, "_thread") and self._thread.is_alive()

    def stop(self, timeout: float = JOIN_TIMEOUT) -> bool:
        """Stop and join the thread, keeping the views; True if it ended. Safe to call twice."""
        if not hasattr(self, "_thread"):
            return True
        self._stopping.set()
        self._wake.set()
        self._unsubscribe()
        if self._thread is not threading.current_thread() and self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("zchat_nb: %s did not stop within %g s", self._thread.name, timeout)
            return False
        return True

    def close(self) -> None:
        """Stop the thread, remove the views and, if the inspector made it, close the client."""
        self.stop()
        for child in getattr(self, "children", ()):
            child.close()
        super().close()
        if getattr(self, "_owns_client", False):
            self.client.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Inspector room={self.room!r} of {self.client!r} {state}>"

    # -- from other threads --------------------------------------------------------------

    def _on_event(self, event: ClientEvent) -> None:
        # On ZEO's networking thread or a committing thread: no storage calls here.
        if event.kind == "poll":
            cost = float(event.details.get("cost", 0.0))
            room = str(event.details.get("room", ""))
            count = int(event.details.get("count", 0))
            with self._poll_lock:
                polls = self._polls
                polls["count"] += 1
                polls["total_cost"] += cost
                polls["last_cost"] = cost
                polls["max_cost"] = max(polls["max_cost"], cost)
                loads = int(event.details.get("loads", 0))
                polls["loads"] += loads
                polls["delivered"] += count
                polls["recent"].append(
                    {"time": event.time, "room": room, "cost": cost, "count": count, "loads": loads}
                )
        else:
            if len(self._events) == MAX_QUEUED:  # the inspector fell far behind: say so
                self._dropped += 1
            self._events.append(event)
        self._wake.set()

    # -- inspector thread ----------------------------------------------------------------

    def _run(self) -> None:
        next_update = 0.0
        try:
            while not self._stopping.is_set() and not self.client.closed:
                wait = next_update - time.monotonic()
                if wait > 0 and self._stopping.wait(wait):  # coalesce: at most max_rate updates/s
                    break
                self._wake.clear()  # before reading: an event during the update is not lost
                if not self._update():
                    break
                next_update = time.monotonic() + 1.0 / self.max_rate
                self._wake.wait(max(0.0, self._status_due - time.monotonic()))
        except Exception:
            log.exception("zchat_nb: the inspector of %r failed", self.client)
        finally:
            self._unsubscribe()
            why = "the client was closed" if self.client.closed else "the inspector was stopped"
            with self._changed:
                self._state["running"] = False
                self._state["connected"] = False
                self._state["error"] = why
                self._changed.notify_all()
            try:
                self._server_html.value = _STYLE + self._render_server(self._state)
            except Exception:  # the comm may be gone at interpreter exit
                log.debug("zchat_nb: final inspector redraw failed", exc_info=True)
            self.client.close_connection()

    def _update(self) -> bool:
        """One round: read what happened, ask the server if due, redraw. False when the client closed."""
        events: list[ClientEvent] = []
        while self._events:
            events.append(self._events.popleft())
        invalidations = [e for e in events if e.kind == "invalidation"]
        commits = [e for e in events if e.kind == "commit"]
        state = self._state
        new: dict[str, Any] = {"error": ""}
        described: list[dict[str, Any]] = []
        tree_changed = bool(invalidations or commits) or state["updates"] == 0
        try:
            connected = self.client.is_connected()
            new["connected"] = connected
            if connected:
                with server_boundary(self.client.address_text, lambda: self.client.restart_hint):
                    tm, conn = self.client.connection()
                    tm.begin()
                    rooms = conn.root().get(ROOMS_KEY)
                    room = rooms.get(self.room) if rooms is not None else None
                    known = room_oids(room, getattr(rooms, "_p_oid", None))
                    described = [self._describe(conn, e, known) for e in invalidations]
                    if tree_changed or state["tree"] is None:
                        drawn = drawn_stream(room, self._counts)
                        if room is not None and drawn is not None:
                            new["tree"] = tree_summary(drawn.pop("stream"), self.buckets_shown)
                            new["messages"], new["stream"] = drawn["total"], drawn
                        else:
                            new["tree"], new["messages"], new["stream"] = None, None, None
                    if time.monotonic() >= self._status_due:
                        self._status_due = time.monotonic() + self.status_interval
                        new["server"] = self.client.server_status()  # ZEO's, or the PostgreSQL link's
                    new["local_tid"] = self.client.db.storage.lastTransaction()
            else:
                self._status_due = time.monotonic() + self.status_interval
                new["error"] = "the server does not answer; the client reconnects by itself"
        except ZChatDisconnected as exc:  # the server went away during the round
            if self.client.closed:
                return False
            new["connected"] = False
            new["error"] = f"the server went away ({type(exc.__cause__).__name__})"
        except ZChatConnectionError:
            if self.client.closed:
                return False
            raise
        except Exception as exc:
            if self.client.closed:
                return False
            log.exception("zchat_nb: inspecting room %r failed", self.room)
            new["error"] = f"{type(exc).__name__}: {exc}"
        if invalidations and not described:  # could not load them: still show that they came
            described = [self._describe(None, e, {}) for e in invalidations]
        self._apply(events, described, new)
        self._redraw()
        return True

    def _describe(
        self, conn: Connection | None, event: ClientEvent, known: dict[bytes, str]
    ) -> dict[str, Any]:
        """An invalidation as data, its first objects named (loaded through ``conn``, if given)."""
        objects = []
        for oid in event.oids[:MAX_CLASSIFIED] if conn is not None else ():
            if oid in known:
                entry = classify(conn, oid, known)
            else:
                cached = self._labels.get(oid)
                if cached is None:
                    cached = classify(conn, oid, known)
                    if len(self._labels) >= _MAX_LABELS:
                        self._labels.clear()
                    self._labels[oid] = cached
                entry = dict(cached)
            objects.append(entry)
        return {
            "time": event.time,
            "tid": event.tid.hex() if event.tid else None,
            "count": len(event.oids),
            "objects": objects,
            "more": len(event.oids) - len(objects),
        }

    def _apply(self, events: list[ClientEvent], described: list[dict[str, Any]], new: dict[str, Any]) -> None:
        with self._changed:
            state = self._state
            tids = [t for t in (state["last_tid"],) if t]
            for entry in described:
                state["invalidations"].append(entry)
                state["invalidations_total"] += 1
                if entry["tid"]:
                    tids.append(entry["tid"])
            for event in events:
                details = event.details
                if event.kind == "commit":
                    state["commits"].append(
                        {
                            "time": event.time,
                            "room": str(details.get("room", "")),
                            "what": str(details.get("what", "")),
                            "latency": float(details.get("latency", 0.0)),
                            "conflicts": int(details.get("conflicts", 0)),
                        }
                    )
                    state["commits_total"] += 1
                    state["conflicts"] += int(details.get("conflicts", 0))
                elif event.kind == "resolved":
                    state["resolved"] += int(details.get("count", 0))
            for key in ("invalidations", "commits"):
                del state[key][:-HISTORY]
            with self._poll_lock:
                state["polls"] = {**self._polls, "recent": list(self._polls["recent"])}
            state["dropped"] = self._dropped
            if "server" in new:
                state["server"] = new["server"]
                state["connections"] = new["server"].get("connections")
                if new["server"].get("last-transaction"):
                    tids.append(str(new["server"]["last-transaction"]))
            local = new.get("local_tid")
            if local and local != _Z64:
                tids.append(local.hex())
            if tids:
                last = max(tids)  # hex of the same width: text order is tid order
                state["last_tid"] = last
                state["last_time"] = TimeStamp(bytes.fromhex(last)).timeTime()
            if "tree" in new:
                state["tree"] = new["tree"]
                state["messages"] = new["messages"]
                state["stream"] = new["stream"]
            state["connected"] = new.get("connected", False)
            state["error"] = new["error"]
            state["updates"] += 1
            self._changed.notify_all()

    def _redraw(self) -> None:
        with self._changed:
            state = copy.deepcopy(self._state)
        for widget, text in (
            (self._server_html, _STYLE + self._render_server(state)),
            (self._invalidations_html, self._render_invalidations(state)),
            (self._commits_html, self._render_commits(state)),
            (self._tree_html, self._render_tree(state)),
        ):
            if widget.value != text:
                widget.value = text

    # -- HTML (everything from the database or the user is escaped) ---------------------

    @staticmethod
    def _render_server(state: dict[str, Any]) -> str:
        esc = html.escape
        if state["connected"]:
            status = "connected"
        elif state["running"] and not state["error"]:
            status = "connecting"
        else:
            status = "not connected"
        clients = state["connections"]
        server = state["server"]
        if "notifications" in server:  # a PostgreSQL link's status: no ZEO server, no pushed invalidations
            return Inspector._render_postgres(state, status)
        rows = [
            ("server", f"<code>{esc(state['address'])}</code> · {status}"),
            ("clients connected", "?" if clients is None else esc(str(clients))),
        ]
        if state["last_tid"]:
            rows.append(
                (
                    f'<span title="{TID_HELP}">last transaction</span>',
                    f'<code title="{TID_HELP}">{esc(state["last_tid"])}</code> '
                    f"at {_clock(state['last_time'])}",
                )
            )
        if server:
            rows.append(
                (
                    "conflicts",
                    f"{esc(str(server.get('conflicts', '?')))} commits refused by the server "
                    "(all clients, since it started)",
                )
            )
            rows.append(
                (
                    '<span title="objects the server read for a client that asked; a reader of '
                    "zchat-nb serve gets the new state of what it watches with the invalidation, "
                    'so a delivered message adds none">loads</span>',
                    f"{esc(str(server.get('loads', '?')))} answered by the server "
                    "(all clients, since it started)",
                )
            )
        rows.append(("watching", f"room {esc(repr(state['room']))} as {esc(state['user'])}"))
        body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        error = f'<div class="zchat-inspector-error">{esc(state["error"])}</div>' if state["error"] else ""
        return f"<h4>ZEO</h4><table>{body}</table>{error}"

    @staticmethod
    def _render_postgres(state: dict[str, Any], status: str) -> str:
        """What a RelStorage client can show in place of ZEO's server statistics."""
        esc = html.escape
        server = state["server"]
        trigger = server.get("commit_trigger", "?")
        rows = [
            ("database", f"<code>{esc(state['address'])}</code> · {status}"),
            ("storage", esc(str(server.get("storage", "")))),
            (
                '<span title="PostgreSQL NOTIFY after each commit: what wakes this client\'s readers">'
                "notifications</span>",
                f"{esc(str(server['notifications']))} received",
            ),
            (
                "fallback polls",
                f"{esc(str(server.get('fallback_wakes', '?')))} wake-ups without a notification "
                f"(every {esc(str(server.get('fallback_interval', '?')))} s)",
            ),
            ("commit trigger", "installed" if trigger == "installed" else f"missing: {esc(str(trigger))}"),
            ("watching", f"room {esc(repr(state['room']))} as {esc(state['user'])}"),
        ]
        body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        error = server.get("last_error") or state["error"]
        shown = f'<div class="zchat-inspector-error">{esc(error)}</div>' if error else ""
        return f"<h4>PostgreSQL</h4><table>{body}</table>{shown}"

    @staticmethod
    def _render_invalidations(state: dict[str, Any]) -> str:
        esc = html.escape
        rows = []
        for entry in reversed(state["invalidations"][-ROWS:]):
            labels = ", ".join(
                f'<span title="oid {esc(o["oid"])}, {esc(o["class"])}">{esc(o["label"] or o["kind"])}</span>'
                for o in entry["objects"]
            )
            if entry["more"]:
                labels += f"{', ' if labels else ''}+{entry['more']} more"
            rows.append(
                f"<tr><td>{_clock(entry['time'])}</td><td><code>{esc(entry['tid'] or '')}</code></td>"
                f"<td>{entry['count']}</td><td>{labels}</td></tr>"
            )
        total = state["invalidations_total"]
        head = (
            f'<tr><th>time</th><th title="{TID_HELP}">tid</th>'
            '<th title="how many objects that commit changed">objects</th>'
            '<th title="what those objects are in the chat (hover one for its oid)">which</th></tr>'
        )
        table = (
            f"<table>{head}{''.join(rows)}</table>"
            if rows
            else '<div class="zchat-muted">none yet: they arrive when another client commits</div>'
        )
        return f'<h4 title="{INVALIDATION_HELP}">Invalidations from the server ({total})</h4>{table}'

    @staticmethod
    def _render_commits(state: dict[str, Any]) -> str:
        esc = html.escape
        rows = [
            f"<tr><td>{_clock(c['time'])}</td><td>{c['latency'] * 1000:.1f} ms</td>"
            f"<td>{c['conflicts']}</td><td>{esc(c['what'])}</td></tr>"
            for c in reversed(state["commits"][-ROWS:])
        ]
        polls = state["polls"]
        if polls["count"]:
            mean = polls["total_cost"] / polls["count"]
            poll_text = (
                f"{polls['count']} polls, mean {mean * 1e3:.2f} ms, last {polls['last_cost'] * 1e3:.2f} ms, "
                f"max {polls['max_cost'] * 1e3:.2f} ms; {polls['loads']} objects loaded for "
                f"{polls['delivered']} messages delivered ({_per_message(polls)}): a poll loads only "
                "the streams the server said changed"
            )
        else:
            poll_text = "no polls yet"
        summary = (
            f"{state['commits_total']} commits, {state['conflicts']} conflicts retried, "
            f"{state['resolved']} resolved by the server"
        )
        head = "<tr><th>time</th><th>latency</th><th>conflicts</th><th>what</th></tr>"
        table = f"<table>{head}{''.join(rows)}</table>" if rows else ""
        return (
            f"<h4>This client's commits</h4><div>{summary}</div>{table}"
            f'<div class="zchat-inspector-polls">{poll_text}</div>'
        )

    @staticmethod
    def _tree_caption(state: dict[str, Any]) -> tuple[str, str]:
        """The picture's title (whose stream, how many of the room's messages) and subtitle."""
        title, subtitle = stream_caption(state["stream"])
        return title, f"room {state['room']!r}: {subtitle}" if subtitle else f"room {state['room']!r}"

    @classmethod
    def _render_tree(cls, state: dict[str, Any]) -> str:
        title, subtitle = cls._tree_caption(state)
        return (
            f'<h4 title="{html.escape(STREAMS_HELP)}">One writer\'s messages BTree</h4>'
            f"{tree_svg(state['tree'], title=title, subtitle=subtitle)}"
        )


def _per_message(polls: dict[str, Any]) -> str:
    """Objects loaded per delivered message, the cost of fan-out, in words."""
    if not polls["delivered"]:
        return "none delivered yet"
    return f"{polls['loads'] / polls['delivered']:.2f} per message"


def _clock(when: float | None) -> str:
    if when is None:
        return "?"
    return time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
