"""Wake-ups for PostgreSQL clients: LISTEN/NOTIFY instead of ZEO's pushed invalidations.

RelStorage learns of other clients' commits only by polling at ``tm.begin()``. A trigger installed
by :func:`zchat_nb.storage.install_notify_trigger` sends a notification on channel
:data:`~zchat_nb.storage.CHANNEL` when a transaction that wrote objects commits; PostgreSQL
delivers it only after the commit is visible to new snapshots. One :class:`PostgresLink` per
ChatClient holds a LISTEN connection on a daemon thread and turns each notification into an
"invalidation" :class:`~zchat_nb.client.ClientEvent`, which wakes readers as ZEO's do::

    writer commits --trigger--> NOTIFY --> listener thread --> ChatClient._notify --> readers:
    tm.begin() (RelStorage polls: the source of truth) -> new_messages()

A notification is only a hint: a lost one (listener reconnecting) delays a message until the
periodic fallback wake-up (``fallback`` seconds), an early or extra one costs one empty poll.
The link also tells the client whether the database answers (``is_connected``), so sends wait
for it, as they wait for a ZEO server, and fail with a clear error after their timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from typing import Any

from .events import ClientEvent, ClientEvents
from .storage import CHANNEL, PostgresTarget, redact

__all__ = ["DEFAULT_FALLBACK", "PostgresLink"]

log = logging.getLogger(__name__)

#: Seconds between wake-ups without a notification (readers then poll RelStorage anyway).
DEFAULT_FALLBACK = 5.0
_RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)


class PostgresLink:
    """A LISTEN connection on a daemon thread: wake-ups, and whether PostgreSQL answers.

    ``start(events)`` begins; ``close()`` stops and joins (safe twice).
    """

    def __init__(
        self, target: PostgresTarget, *, fallback: float = DEFAULT_FALLBACK, notifying: str | None = None
    ) -> None:
        self.target = target
        self.fallback = fallback
        #: None when the commit trigger is installed, else why commits send no notification.
        self.trigger_problem = notifying
        self.notifications = 0
        self.fallback_wakes = 0
        self.last_error = ""
        self._connected = False
        self._state = threading.Condition()
        self._stop = threading.Event()
        self._recheck_r, self._recheck_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._events: ClientEvents | None = None

    # -- what the ChatClient asks ----------------------------------------------------------

    def start(self, events: ClientEvents) -> None:
        self._events = events
        self._thread = threading.Thread(target=self._run, name="zchat-pg-listener", daemon=True)
        self._thread.start()

    def is_connected(self) -> bool:
        return self._connected

    def wait_connected(self, timeout: float) -> bool:
        with self._state:
            self._state.wait_for(lambda: self._connected or self._stop.is_set(), max(0.0, timeout))
            return self._connected

    def lost(self, exc: BaseException) -> None:
        """A storage call failed to reach PostgreSQL: mark down until the listener has checked."""
        with self._state:
            self._connected = False
            self.last_error = redact(str(exc).strip(), (self.target.password,))
        with contextlib.suppress(OSError):
            os.write(self._recheck_w, b"x")

    def committed(self) -> None:
        """This client committed: wake its own readers now rather than when the NOTIFY arrives."""
        self._tell("committed")

    def _tell(self, kind: str, **details: Any) -> None:
        if self._events is not None:
            self._events.tell(ClientEvent(kind, time.time(), details=details))

    def status(self) -> dict[str, Any]:
        return {
            "storage": self.target.description,
            "connected": self._connected,
            "notifications": self.notifications,
            "fallback_wakes": self.fallback_wakes,
            "fallback_interval": self.fallback,
            "commit_trigger": self.trigger_problem or "installed",
            **({"last_error": self.last_error} if self.last_error else {}),
        }

    def close(self, timeout: float = 5.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._recheck_w, b"x")
        with self._state:
            self._state.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for fd in (self._recheck_r, self._recheck_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the listener thread ---------------------------------------------------------------

    def _set_connected(self, up: bool, why: str = "") -> None:
        with self._state:
            changed = up != self._connected
            self._connected = up
            if why:
                self.last_error = why
            self._state.notify_all()
        if changed:
            self._tell("connected" if up else "disconnected", why=why)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                conn = self._listen()
            except Exception as exc:
                self._set_connected(False, redact(str(exc).strip(), (self.target.password,)))
                delay = _RECONNECT_DELAYS[min(attempt, len(_RECONNECT_DELAYS) - 1)]
                attempt += 1
                self._stop.wait(delay)
                continue
            attempt = 0
            try:
                # "connected" wakes readers: commits made while nobody listened sent notifications
                # nobody heard, and a reader's poll at tm.begin() finds them.
                self._set_connected(True)
                self._serve(conn)
            except Exception as exc:
                if not self._stop.is_set():
                    self._set_connected(False, redact(str(exc).strip(), (self.target.password,)))
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
        self._set_connected(False, "closed")

    def _listen(self) -> Any:
        import psycopg2

        # TCP keepalives: a peer that vanished without closing is noticed in seconds, not hours.
        conn = psycopg2.connect(
            self.target.dsn,
            connect_timeout=5,
            application_name="zchat_nb listener",
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {CHANNEL}")
        return conn

    def _serve(self, conn: Any) -> None:
        while not self._stop.is_set():
            ready = select.select([conn, self._recheck_r], [], [], self.fallback)[0]
            if self._recheck_r in ready:
                os.read(self._recheck_r, 4096)
                if self._stop.is_set():
                    return
                with conn.cursor() as cur:  # a storage call failed: does the database answer us?
                    cur.execute("SELECT 1")
                self._set_connected(True)
            if conn in ready:
                conn.poll()
                if conn.notifies:
                    count = len(conn.notifies)
                    conn.notifies.clear()
                    self.notifications += count
                    self._tell("invalidation", source="notify", count=count)
            if not ready:  # no notification for a while: readers poll anyway (the fallback)
                self.fallback_wakes += 1
                self._tell("invalidation", source="fallback")
