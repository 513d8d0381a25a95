"""What a client tells its readers and subscribers: :class:`ClientEvent` and :class:`ClientEvents`.

ZEO pushes invalidations on its networking thread (PostgreSQL clients get notifications on a
listener thread instead); each becomes a :class:`ClientEvent` that wakes readers blocked in
``new_messages`` and is handed to subscribers (a widget's poller, the inspector). Nothing here
knows ZEO or PostgreSQL, so both storages' wake-ups share it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["ACTIVITY_KINDS", "WAKE_KINDS", "ChangeTracker", "ClientEvent", "ClientEvents"]

log = logging.getLogger("zchat_nb.client")


@dataclass(frozen=True)
class ClientEvent:
    """What a subscriber of :meth:`ChatClient.subscribe` is told, on ZEO's networking thread."""

    #: "invalidation", "connected", "disconnected" (from ZEO's thread), "committed" (from the thread
    #: whose commit finished): these wake readers; or "commit", "poll", "resolved" (from the thread
    #: that did it: for inspectors, they wake nobody).
    kind: str
    time: float
    tid: bytes | None = None
    oids: tuple[bytes, ...] = field(default=())
    #: For "commit": latency (s), conflicts, what; "poll": cost (s), count, loads (objects loaded);
    #: "resolved": count.
    details: dict[str, Any] = field(default_factory=dict)


#: Events that wake readers waiting in ``new_messages``: the server's invalidations and
#: (dis)connections, and this client's own finished commits, of which ZEO sends it no invalidation.
WAKE_KINDS = frozenset({"invalidation", "connected", "disconnected", "committed"})
#: What this client itself did; only subscribers that ask (``activity=True``, or ``kinds``) hear them.
ACTIVITY_KINDS = frozenset({"commit", "poll", "resolved"})


class ChangeTracker(Protocol):
    """What :meth:`ClientEvents.track` fills (``zchat_nb.model.Changes``)."""

    def mark(self, oids: Iterable[bytes], tid: bytes | None = None) -> None: ...

    def mark_all(self) -> None: ...

    #: Oids its reader will load as soon as one of them changes (see :meth:`ClientEvents.committed`).
    watched: frozenset[bytes]
    #: Called (no arguments) when ``watched`` changes: set by :meth:`ClientEvents.track`.
    on_watch: Callable[[], None] | None


class ClientEvents:
    """The wake-ups and the subscribers of one client.

    Made before the client's storage, which gets it when it is built (so nothing it says while it
    connects is lost); the :class:`ChatClient` shares it. Readers wait in :meth:`wait_for_change`,
    subscribers hear the events. :meth:`tell` runs on ZEO's networking thread or a committing one:
    it makes no storage calls, and neither may the subscribers.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._generation = 0
        self._closed = False
        #: ``(callback, kinds, fetched)``: see :meth:`subscribe`.
        self._subscribers: list[tuple[Callable[[ClientEvent], None], frozenset[str], bool]] = []
        #: Weak references to the trackers (a plain list: cheaper to walk than a WeakSet, on
        #: every commit any client makes); dead ones are dropped as they are met.
        self._trackers: list[weakref.ref[Any]] = []
        #: The oids the trackers watch, all together (see :meth:`watch_changed`).
        self._watching: frozenset[bytes] = frozenset()
        #: Called (no arguments, under this object's lock: it must only hand over) when
        #: :meth:`watching` changes; the ZEO client sets it to have the server push their states.
        self.on_watch: Callable[[], None] | None = None

    def generation(self) -> int:
        """A counter bumped by every event of :data:`WAKE_KINDS` and by :meth:`close`."""
        return self._generation

    def wait_for_change(self, generation: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._generation != generation or self._closed, timeout)

    def track(self, changes: ChangeTracker) -> None:
        """Tell ``changes`` the oids of every commit from now on, or that everything changed.

        Held weakly: a session that is gone stops being told.
        """
        with self._changed:
            if all(ref() is not changes for ref in self._trackers):
                self._trackers.append(weakref.ref(changes))
        # Told when its watched oids change (a new tracker watches nothing: nothing to tell yet).
        changes.on_watch = self.watch_changed

    def watching(self) -> frozenset[bytes]:
        """The oids that some tracker's reader loads as soon as they change."""
        return self._watching

    def watch_changed(self) -> None:
        """A tracker's ``watched`` changed: tell :attr:`on_watch` if :meth:`watching` did."""
        with self._changed:
            watching = frozenset().union(*(changes.watched for changes in self._live_trackers()))
            if watching != self._watching:
                self._watching = watching
                if self.on_watch is not None:
                    self.on_watch()

    def _live_trackers(self) -> list[Any]:
        """The trackers still alive (under ``_changed``); forgets the dead ones."""
        live = [changes for changes in (ref() for ref in self._trackers) if changes is not None]
        if len(live) != len(self._trackers):
            self._trackers = [weakref.ref(changes) for changes in live]
        return live

    def committed(
        self, kind: str, tid: bytes | None, oids: tuple[bytes, ...], *, can_fetch: bool = False
    ) -> tuple[ClientEvent | None, list[bytes]]:
        """:meth:`tell` for a commit (``"invalidation"`` from the server,
        ``"committed"`` by this client) in one pass under the lock: every client hears of every
        commit, so this is the one call each commit costs each client.

        ``can_fetch``: the caller can fetch what the trackers' readers will load (their ``watched``
        oids) before they are woken. Returns the event (None if nobody is told of it) and the oids
        to fetch (at most 32); if there are any, the readers and the subscribers that asked for it
        wait for :meth:`fetched`.
        """
        wanted: list[bytes] = []
        with self._changed:
            for changes in self._live_trackers():
                changes.mark(oids, tid)
                watched = changes.watched
                if can_fetch and watched:
                    wanted += [oid for oid in oids if oid in watched and oid not in wanted]
            fetching = bool(wanted)
            subscribers = self._wake(kind, fetching)
        event = ClientEvent(kind, time.time(), tid, oids) if subscribers or fetching else None
        if event is not None and subscribers:
            self._call(subscribers, event)
        return event, wanted[:32]

    def tell(self, event: ClientEvent) -> None:
        """Note what ``event`` changed, wake readers (for a wake kind) and call the subscribers that
        want ``event.kind``."""
        with self._changed:
            # Noted before the wake-up, so that a woken reader finds what changed.
            if event.kind in ("invalidation", "committed"):
                for changes in self._live_trackers():
                    changes.mark(event.oids, event.tid)
            elif event.kind == "connected":  # ZEO dropped the whole object cache
                for changes in self._live_trackers():
                    changes.mark_all()
            subscribers = self._wake(event.kind)
        self._call(subscribers, event)

    def _wake(self, kind: str, fetching: bool = False) -> list[Callable[[ClientEvent], None]]:
        """Under ``_changed``: wake the readers for a wake kind, and pick the subscribers of ``kind``.

        ``fetching``: the storage is fetching what the readers will load; the readers, and the
        subscribers that asked to hear of changes only then, are left for :meth:`fetched`.
        """
        if kind in WAKE_KINDS and not fetching:
            self._generation += 1
            self._changed.notify_all()
        return [
            callback
            for callback, kinds, late in self._subscribers
            if kind in kinds and not (fetching and late)
        ]

    def fetched(self, event: ClientEvent) -> None:
        """What :meth:`committed` left for later while fetching: the fetch is over (or given up on)."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()
            subscribers = [
                callback for callback, kinds, late in self._subscribers if late and event.kind in kinds
            ]
        self._call(subscribers, event)

    @staticmethod
    def _call(subscribers: list[Callable[[ClientEvent], None]], event: ClientEvent) -> None:
        for callback in subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("zchat_nb subscriber %r failed", callback)

    def report(self, kind: str, **details: Any) -> None:
        """Tell subscribers what this client did (a commit, a poll); wakes no reader."""
        # Most clients have no one listening to their activity (an inspector does): then a poll
        # costs no event. A subscriber that comes meanwhile hears the next one.
        if any(kind in kinds for _, kinds, _ in self._subscribers):
            self.tell(ClientEvent(kind, time.time(), details=details))

    def subscribe(
        self,
        callback: Callable[[ClientEvent], None],
        *,
        activity: bool = False,
        fetched: bool = False,
        kinds: Iterable[str] | None = None,
    ) -> Callable[[], None]:
        """See :meth:`ChatClient.subscribe`."""
        if kinds is None:
            wanted = WAKE_KINDS | ACTIVITY_KINDS if activity else WAKE_KINDS
        else:
            wanted = frozenset(kinds)
            unknown = sorted(wanted - WAKE_KINDS - ACTIVITY_KINDS)
            if unknown or isinstance(kinds, str):
                raise ValueError(
                    f"subscribe(kinds=...) takes a collection of event kinds, not {kinds!r:.80}; the "
                    f"kinds are {', '.join(sorted(WAKE_KINDS | ACTIVITY_KINDS))}"
                )
        entry = (callback, wanted, fetched)
        with self._changed:
            self._subscribers.append(entry)

        def unsubscribe() -> None:
            with self._changed:
                if entry in self._subscribers:
                    self._subscribers.remove(entry)

        return unsubscribe

    def close(self) -> None:
        """Wake every waiting reader, for good."""
        with self._changed:
            self._closed = True
            self._generation += 1
            self._changed.notify_all()
