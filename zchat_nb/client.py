"""Connecting to a ZEO server: ``connect()`` and the :class:`ChatClient` it returns.

A ChatClient owns one ``ZODB.DB`` on a ``ClientStorage`` and gives every thread that uses it its own
connection and transaction manager (ZODB connections are not thread-safe). It turns ZEO's
invalidation messages, pushed by the server on ZEO's networking thread, into a wake-up that
:meth:`ChatSession.new_messages <zchat_nb.model.ChatSession.new_messages>` waits on, so readers learn
of a commit in milliseconds without polling the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import getpass
import itertools
import logging
import os
import shutil
import ssl as ssl_module
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

import transaction
import ZODB
from ZEO.cache import ClientCache
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected
from ZEO.TransactionBuffer import TransactionBuffer
from ZODB.POSException import ReadOnlyError, StorageTransactionError
from ZODB.utils import p64, u64, z64
from zodbpickle.pickle import Pickler, Unpickler

from .events import ClientEvent, ClientEvents
from .exceptions import AttachmentError, NoAnswer, ZChatConnectionError, disconnected, server_boundary
from .local import ENV_ADDRESS, resolve_address, restart_hint
from .media import DEFAULT_MAX_ATTACHMENT_BYTES
from .model import (
    DEFAULT_MAX_TEXT_BYTES,
    ROOMS_KEY,
    Changes,
    ChatSession,
    Message,
    SendPolicy,
    Signer,
    Verifier,
    check_author,
    index_oids,
    read_attachment,
    room_names,
)
from .net import Address, check_tls, format_address, probe, speaks_tls
from .netthread import SharedLoopRunner, refuse_closing_here
from .pgwake import DEFAULT_FALLBACK
from .pickles import RECORD, PicklePolicy
from .ratelog import add_filter_once, rate_limit
from .security import (
    MAX_WATCHED,
    PUSH_VERSION,
    RecordCheck,
    checked_conflict_states,
    class_factory,
    harden_client_process,
)
from .storage import PostgresTarget, is_storage_uri, parse_storage_uri

if TYPE_CHECKING:
    from ZODB.Connection import Connection

    from .pgwake import PostgresLink

__all__ = ["ChatClient", "ClientEvent", "ClientEvents", "connect", "default_user"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0


def default_user() -> str:
    """The user name to show: JupyterHub's user, else the login name."""
    for var in ("ZCHAT_USER", "JUPYTERHUB_USER"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "anonymous"


class _NoAnswer(ClientDisconnected, NoAnswer):
    """A call the connected server did not answer in time: ZEO's error for a lost server, and ours."""


def _ignore_outcome(future: Any) -> None:
    future.exception()


def _no_callback(tid: bytes) -> None:
    """What ZEO's ``tpc_finish`` calls with the new tid when its caller gave nothing."""


class _UnansweredLoadsAreDebug(logging.Filter):
    """ZODB logs each load that fails as an ERROR with its traceback ("Couldn't load state for
    ..."), then raises. A load the server did not answer in time, or that a lost connection cut
    short, is routine for a class's server (a crowd joining at once, a restart), and the caller
    reports it in words (:class:`ZChatDisconnected`, :class:`ZChatSendError`) or retries it; in a
    notebook, Python's last-resort handler would also print each traceback under the cell. Those
    records become DEBUG; every other load error stays an ERROR.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.WARNING and isinstance(error, ClientDisconnected):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class _MemoryTransactionBuffer(TransactionBuffer):
    """ZEO's buffer of a transaction's records, kept as a list in memory up to :attr:`IN_MEMORY` bytes.

    ZEO's own pickles each record into a new temporary file on disk and, once the commit is done,
    unpickles them all back on its networking thread to update its cache: about 100 µs a send
    here, and more work for that thread. This one keeps the records (bytes the client holds anyway)
    in a list; only records past the limit (a big import) go to a file, as in ZEO's. Same
    attributes as ZEO's, and ``records`` (``tests/test_client.py`` checks).
    """

    IN_MEMORY = 1024 * 1024

    def __init__(self, connection_generation: int) -> None:  # not super(): it opens the file
        self.connection_generation = connection_generation
        self.records: list[tuple[bytes, bytes | None]] = []
        #: For the records past IN_MEMORY: a temporary file, and ZEO's pickler on it.
        self.file: IO[bytes] | None = None
        self.pickler: Any = None
        self.count = 0
        self.size = 0
        self.blobs: list[tuple[bytes, str]] = []
        self.server_resolved: set[bytes] = set()
        self.client_resolved: dict[bytes, int] = {}
        self.exception: BaseException | None = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def store(self, oid: bytes, data: bytes | None) -> None:
        if self.file is None and self.size < self.IN_MEMORY:
            self.records.append((oid, data))
        else:
            if self.file is None:
                self.file = tempfile.TemporaryFile(suffix=".tbuf")  # noqa: SIM115 (closed by close())
                self.pickler = Pickler(self.file, 1)
                self.pickler.fast = 1  # only bytes and None go in, as in ZEO's
            self.pickler.dump((oid, data))
        self.count += 1
        self.size += (len(data) if data else 0) + 31  # ZEO's estimate of the cache's cost

    def __iter__(self) -> Iterator[tuple[bytes, bytes | None, bool]]:
        # ZEO's: each stored record once (a record resolved by the client replaces the stored one),
        # then the oids the server resolved that the buffer does not hold.
        records: Iterable[tuple[bytes, bytes | None]] = self.records
        if self.file is not None:
            self.file.seek(0)
            unpickler = Unpickler(self.file)
            spilled = (unpickler.load() for _ in range(self.count - len(self.records)))
            records = itertools.chain(self.records, spilled)
        seen = set()
        for i, (oid, data) in enumerate(records):
            if self.client_resolved.get(oid, i) == i:
                seen.add(oid)
                yield oid, data, oid in self.server_resolved
        for oid in self.server_resolved:
            if oid not in seen:
                yield oid, None, True


class _EphemeralCache(ClientCache):
    """ZEO's cache of a client without a name (a temporary file, as ZEO makes it), that keeps the
    last transaction id in memory only.

    ZEO also writes it into the file, a seek, a write and a flush on ZEO's thread for every
    invalidation, so that a cache file opened again can be checked against the server. A
    temporary file is never opened again; in a lecture hall those were two system calls in every
    client for every message anyone sent. ``clear()`` keeps the tid, as ZEO's does (it reads it
    back from the file).
    """

    tid: bytes  # set by ZEO's __init__

    def setLastTid(self, tid: bytes) -> None:
        # ZEO's ClientCache.setLastTid, without writing the tid into the file.
        with self._lock:
            if not tid or tid == z64:
                return
            if tid <= self.tid and self._len:
                if tid == self.tid:
                    return  # ZEO's "be a little forgiving"
                raise ValueError(
                    f"new last tid ({u64(tid)}) must be greater than previous one ({u64(self.tid)})"
                )
            self.tid = tid

    def clear(self) -> None:
        with self._lock:  # an RLock: ZEO's clear takes it too
            tid = self.tid
            super().clear()  # reads the file's tid, the one from when the file was made
            self.tid = tid


class _WakingClientStorage(ClientStorage):
    """ClientStorage that tells a :class:`ClientEvents` of invalidations, (dis)connections and commits.

    The events are given at construction: ZEO starts connecting, and calls ``notify_connected`` on
    its networking thread, before ``__init__`` returns. They run on that thread (or, for commits,
    on the committing one): they must never make storage calls.
    """

    #: This client's private blob cache directory, removed when the client closes.
    _zchat_blob_cache: str | None = None

    def __init__(
        self, addr: Any, *, events: ClientEvents, answer_timeout: float | None = None, **kwargs: Any
    ) -> None:
        self.zchat_events = events
        #: Seconds to wait for the server's answer to a call or a load (None: for ever, as ZEO does).
        self._zchat_answer_timeout = answer_timeout
        #: Per thread: a ``time.monotonic()`` past which no answer is waited for (see answers_by).
        self._zchat_until = threading.local()
        #: States fetched as invalidations arrived, by ``(oid, before)`` (see _zchat_keep_fetched).
        self._zchat_fetched: dict[tuple[bytes, bytes], tuple[bytes, bytes, bytes | None]] = {}
        #: States the server pushed ahead of their invalidation, by ``(oid, tid)`` (see zchat_pushed).
        self._zchat_pushed: dict[tuple[bytes, bytes], bytes] = {}
        #: The server takes ``zchat_watch`` (zchat_nb's does; ZEO's own does not).
        self._zchat_can_watch = False
        events.on_watch = self._zchat_watch_changed
        super().__init__(addr, **kwargs)
        self._zchat_raw_call: Callable[..., Any] = getattr(self, "_call")  # noqa: B009 (set by ZEO)
        self._call = self._zchat_call
        # A transaction's one-way messages (tpc_begin, its stores) are held until its first call
        # that waits (the vote) and handed to ZEO's thread together: one wake-up of that thread
        # instead of one per message.
        self._zchat_raw_async: Callable[..., Any] = getattr(self, "_async")  # noqa: B009
        # The runner's async_iter (SharedLoopRunner's, without ZEO's sleep).
        self._zchat_hand_over: Callable[..., Any] = getattr(self, "_async_iter")  # noqa: B009
        self._zchat_held: list[tuple[str, tuple[Any, ...]]] | None = None
        # Another thread's call (a ping, new oids) may send them: whoever sends, sends them first.
        self._zchat_held_lock = threading.Lock()
        self._async = self._zchat_async
        self._async_iter = self._zchat_async_iter

    def _zchat_async(self, method: str, *args: Any) -> None:
        with self._zchat_held_lock:
            held = self._zchat_held
            if held is None:
                self._zchat_raw_async(method, *args)
            else:
                held.append((method, args))

    def _zchat_async_iter(self, messages: Any) -> None:
        with self._zchat_held_lock:
            self._zchat_send_held_locked()
            self._zchat_hand_over(messages)

    def _zchat_send_held(self) -> None:
        if self._zchat_held is not None:
            with self._zchat_held_lock:
                self._zchat_send_held_locked()

    def _zchat_send_held_locked(self) -> None:
        held, self._zchat_held = self._zchat_held, None
        if held:
            self._zchat_hand_over(iter(held))

    def _zchat_call(self, method: str, *args: Any, **kw: Any) -> Any:
        """ZEO's ``_call`` with a deadline: ZEO waits for an answer for ever (a stalled server, a
        dead network), so a commit's vote could block a send far past its timeout."""
        self._zchat_send_held()  # in order: what the transaction sent before comes first
        if method == "pack" or kw.get("wait") is False or self._zchat_wait() is None:
            return self._zchat_raw_call(method, *args, **kw)
        return self._zchat_answer(self._zchat_raw_call(method, *args, wait=False, **kw), method)

    def _zchat_answer(self, future: Any, what: str) -> Any:
        """The result of a call running on ZEO's thread (a future of ZEO's), waited for at most the
        answer timeout.

        On timeout the call is left running, not cancelled: a late answer still lands (a load's in
        the cache, where the repeated read finds it), and ZEO fails it if the connection drops.
        """
        timeout = self._zchat_wait()
        try:
            return future.result(timeout)
        except asyncio.TimeoutError:
            # Nobody waits for it now: take its error, if it gets one, so that ZEO logs none.
            self._server.loop.call_soon_threadsafe(future.add_done_callback, _ignore_outcome)
            if not self.is_connected():
                raise ClientDisconnected(f"lost the server while waiting for {what}") from None
            raise _NoAnswer(what, timeout or 0.0) from None

    def _zchat_wait(self) -> float | None:
        """Seconds this thread waits for an answer now: the answer timeout, cut short by the
        deadline of an enclosing :meth:`answers_by` (None: for ever)."""
        timeout = self._zchat_answer_timeout
        until: float | None = getattr(self._zchat_until, "deadline", None)
        if until is None:
            return timeout
        left = max(0.0, until - time.monotonic())
        return left if timeout is None else min(timeout, left)

    @contextlib.contextmanager
    def answers_by(self, deadline: float) -> Iterator[None]:
        """On this thread, wait for no answer past ``deadline`` (``time.monotonic()``) in the block."""
        outer = getattr(self._zchat_until, "deadline", None)
        self._zchat_until.deadline = deadline if outer is None else min(outer, deadline)
        try:
            yield
        finally:
            self._zchat_until.deadline = outer

    #: Checks each record before ZODB unpickles it (connect() scales its policy to max_text_bytes).
    _zchat_records: RecordCheck = RecordCheck()

    def loadBefore(self, oid: bytes, tid: bytes) -> Any:
        # ZEO's loadBefore, but with the answer timeout: ZEO sends loads outside _call and waits
        # for their answers for ever, so a server that never answers one would hang every reader.
        result = self._zchat_fetched.get((oid, tid)) or self._cache.loadBefore(oid, tid)
        if not result:
            server = self._server
            load = server.load_before_co(oid, tid, server.timeout)  # waits for a connection, then loads
            result = self._zchat_answer(server.io_call(load, wait=False), "a read")
        if result is not None:
            self._zchat_records(oid, result[1], result[0])
        return result

    def loadSerial(self, oid: bytes, serial: bytes) -> bytes:
        data: bytes = super().loadSerial(oid, serial)
        self._zchat_records(oid, serial, data)
        return data

    def registerDB(self, db: Any) -> None:
        super().registerDB(db)
        # Conflict states, if a server ever asks us to resolve one.
        untransform: Callable[[bytes], bytes] = getattr(self, "_crs_untransform_record_data")  # noqa: B009
        self._crs_untransform_record_data = checked_conflict_states(untransform)

    def invalidateTransaction(self, tid: bytes, oids: Iterable[bytes]) -> None:
        oids = tuple(oids)
        # Before the snapshot moves on: a reader that begins meanwhile finds them at once.
        pushed = self._zchat_take_pushed(tid, oids) if self._zchat_pushed else ()
        super().invalidateTransaction(tid, oids)  # first: a begin() after the wake-up sees it
        io = self._zchat_io()
        event, wanted = self.zchat_events.committed("invalidation", tid, oids, can_fetch=io is not None)
        if wanted and pushed:
            wanted = [oid for oid in wanted if oid not in pushed]
            if not wanted and event is not None:
                # Once this turn of the loop is over: the frames that came with this one (the
                # process's other clients') are handled first, then all their readers wake
                # together, instead of each one taking the GIL from this thread in turn.
                io.loop.call_soon(self.zchat_events.fetched, event)
        if wanted and event is not None:
            try:
                self._zchat_fetch_then_wake(io, event, wanted)
            except Exception:  # ZEO's loop is closing: wake the readers now, they find out
                log.debug("fetching before the wake-up failed", exc_info=True)
                self.zchat_events.fetched(event)

    #: How many pushed states are held for the invalidation that follows them (the server sends at
    #: most zchat_nb.guard.PUSH_MAX_OIDS a commit).
    _ZCHAT_PUSHED_KEPT = 32

    def zchat_pushed(self, tid: bytes, oid: bytes, data: bytes) -> None:
        """On ZEO's thread: the server sent the state ``oid`` has from ``tid`` on, ahead of the
        invalidation of ``tid`` (it does for the oids of :meth:`_zchat_watch_changed`).

        Held until that invalidation, which takes it as the answer to the load it would have made.
        """
        pushed = self._zchat_pushed
        if len(pushed) < self._ZCHAT_PUSHED_KEPT:
            pushed[oid, tid] = data

    def _zchat_take_pushed(self, tid: bytes, oids: tuple[bytes, ...]) -> set[bytes]:
        """On ZEO's thread, as the invalidation of ``tid`` arrives (ZEO has invalidated ``oids`` in
        its cache): cache the states pushed for it as ZEO caches a load's answer, and keep them for
        the readers. Returns their oids; forgets every pushed state."""
        pushed, self._zchat_pushed = self._zchat_pushed, {}
        start = p64(u64(tid) + 1)  # the readers' snapshot
        taken = set()
        named = frozenset(oids)
        for (oid, pushed_tid), data in pushed.items():
            if pushed_tid == tid and oid in named:
                with contextlib.suppress(ValueError):  # "already have current data": a load was first
                    self._cache.store(oid, tid, None, data)
                self._zchat_keep_fetched((oid, start), (data, tid, None))
                taken.add(oid)
        return taken

    def _zchat_watch_changed(self) -> None:
        """The oids the readers watch changed (any thread): tell the server, from ZEO's thread."""
        if self._zchat_can_watch:
            with contextlib.suppress(RuntimeError, AttributeError):  # closed, or not started yet
                self._server.loop.call_soon_threadsafe(self._zchat_send_watch)

    def _zchat_send_watch(self, io: Any = None) -> None:
        """On ZEO's thread: ask the server to push the states of the oids the readers watch
        (``io``: ZEO's connection, while it connects)."""
        io = io or self._zchat_io()
        if io is not None and self._zchat_can_watch:
            watching = tuple(sorted(self.zchat_events.watching())[:MAX_WATCHED])
            try:
                io.call_async("zchat_watch", (watching,))
            except Exception:  # lost meanwhile: sent again when connected
                log.debug("could not send the watched oids", exc_info=True)

    #: How many of :meth:`_zchat_fetch_then_wake`'s answers are kept for the readers (the newest).
    _ZCHAT_FETCHED_KEPT = 32

    def _zchat_keep_fetched(self, key: tuple[bytes, bytes], result: Any) -> None:
        """On ZEO's thread: keep a fetched state for the readers' ``loadBefore`` of it.

        ZEO stores it in its cache too, but that cache is a file: each read of it is a lock, a seek
        and a read, on the reader's thread, as the state was just written there by this one. The
        state of an object before a transaction never changes, so ``(oid, before)`` names it for
        good; only a server that lost its history (a restart on other data) could answer otherwise,
        and a reconnect forgets what was kept.
        """
        if not result or len(result[0]) > 65536:
            return
        fetched = self._zchat_fetched
        fetched[key] = result
        while len(fetched) > self._ZCHAT_FETCHED_KEPT:
            fetched.pop(next(iter(fetched)), None)

    #: Seconds to wait for the answers to :meth:`_zchat_fetch_then_wake`'s loads before the
    #: readers are woken anyway (they then load, and time out, themselves).
    _zchat_fetch_wait = 1.0

    def _zchat_io(self) -> Any:
        """ZEO's connection object, on its own thread; None if not connected."""
        io = getattr(self._server, "client", None)
        if getattr(io, "protocol", None) is None or not getattr(io, "operational", False):
            return None
        return io

    def _zchat_fetch_then_wake(self, io: Any, event: ClientEvent, oids: list[bytes]) -> None:
        """On ZEO's thread, as an invalidation arrives: ask at once for the new states of ``oids``
        (the objects this client's sessions will load) and wake the readers when they are cached.

        A woken reader then finds them in the cache: no load of its own, no hand-over to this
        thread and back (ZEO merges a load of the same object and snapshot with the one under
        way). Readers are woken anyway after :attr:`_zchat_fetch_wait` s, or at once if a load
        cannot be asked for.
        """
        start = p64(u64(event.tid or z64) + 1)  # the readers' snapshot
        events, pending = self.zchat_events, [len(oids)]

        def answered(key: tuple[bytes, bytes] | None = None, future: Any = None) -> None:
            if key is not None and not future.cancelled() and future.exception() is None:
                self._zchat_keep_fetched(key, future.result())
            pending[0] -= 1
            if pending[0] == 0:
                timer.cancel()
                events.fetched(event)

        def late() -> None:
            if pending[0] > 0:
                pending[0] = -1  # the answers that still come wake nobody
                events.fetched(event)

        timer = io.loop.call_later(self._zchat_fetch_wait, late)
        for oid in oids:
            try:
                io.protocol.load_before(oid, start).add_done_callback(
                    functools.partial(answered, (oid, start))
                )
            except Exception:  # closing: wake now, the readers find out
                answered()

    def tpc_begin(self, txn: Any, tid: bytes | None = None, status: str = " ") -> None:
        # ZEO's tpc_begin, with the transaction's buffer in memory (see _MemoryTransactionBuffer).
        if self._is_read_only:
            raise ReadOnlyError()
        try:
            buffer = txn.data(self)
        except AttributeError:  # a recovery transaction (copying storages): ZEO's own way
            super().tpc_begin(txn, tid, status)
            return
        except KeyError:
            buffer = None
        if buffer is not None:
            raise StorageTransactionError("Duplicate tpc_begin calls for same transaction")
        if not self.is_connected():  # as ZEO's would, at once
            raise ClientDisconnected()
        txn.set_data(self, _MemoryTransactionBuffer(self._connection_generation))
        self._commit_lock.acquire()
        self._tbuf = txn.data(self)
        # Held with the stores until the vote (see _zchat_async): sent there, or dropped by tpc_end.
        with self._zchat_held_lock:
            begin = (id(txn), txn.user, txn.description, txn.extension, tid, status)
            self._zchat_held = [("tpc_begin", begin)]

    def tpc_end(self, txn: Any) -> None:
        with self._zchat_held_lock:
            self._zchat_held = None
        super().tpc_end(txn)

    def store(self, oid: bytes, serial: bytes, data: bytes, version: str, txn: Any) -> Any:
        result = super().store(oid, serial, data, version, txn)
        self._zchat_stored(txn).append(oid)
        return result

    def storeBlob(
        self, oid: bytes, serial: bytes, data: bytes, blobfilename: str, version: str, txn: Any
    ) -> Any:
        result = super().storeBlob(oid, serial, data, blobfilename, version, txn)
        self._zchat_stored(txn).append(oid)
        return result

    def _zchat_stored(self, txn: Any) -> list[bytes]:
        """The oids ``txn`` stores here, noted on ZEO's buffer of it (reading them back from the
        buffer's file at the end would unpickle every record once more)."""
        buffer = txn.data(self)
        stored: list[bytes] | None = getattr(buffer, "zchat_oids", None)
        if stored is None:
            stored = buffer.zchat_oids = []
        return stored

    def tpc_finish(self, txn: Any, f: Any = None) -> Any:
        # The oids this transaction stores (deleteObject and undo are not used by zchat_nb).
        oids = tuple(dict.fromkeys(self._zchat_stored(txn)))
        tid = self._zchat_finish(txn, f if f is not None else _no_callback)
        # The server sends no invalidation to the client that committed: tell this client's own
        # readers and subscribers (other threads, a widget's poller) as an invalidation would.
        self.zchat_events.committed("committed", tid, oids)
        return tid

    def _zchat_finish(self, txn: Any, f: Callable[[bytes], object]) -> bytes:
        """ZEO's ``tpc_finish``, its answer waited for at most the client's answer timeout.

        ZEO waits for ever: a server that stalls between a vote and its finish would hang the send
        for good. Past the timeout, the connection is closed, as a lost server's would be: the send
        then fails saying the message may have been sent (a retry of it stores it once), and ZEO
        reconnects and checks its cache against the server, so nothing stale stays cached. Not cut
        short by the send's own deadline (:meth:`answers_by`): closing the connection costs every
        session of the client a reconnect, so a slow finish on a busy server is waited for.
        """
        tbuf = self._check_trans(txn, "tpc_finish")
        try:
            timeout = self._zchat_answer_timeout
            if timeout is None:
                tid: bytes = self._server.tpc_finish(id(txn), tbuf, f)
            else:
                future = self._server.tpc_finish(id(txn), tbuf, f, wait=False)
                try:
                    tid = future.result(timeout)
                except asyncio.TimeoutError:
                    self._server.loop.call_soon_threadsafe(self._zchat_drop_connection)
                    with contextlib.suppress(Exception):  # ClientDisconnected, once it is dropped
                        future.result(timeout + 5.0)
                    raise _NoAnswer("the commit's finish", timeout) from None
        finally:
            self.tpc_end(txn)
            self._iterator_gc()
        self._update_blob_cache(tbuf, tid)
        return tid

    def _zchat_drop_connection(self) -> None:
        """On ZEO's thread: close the connection as ZEO does when it loses track (then it reconnects)."""
        io = self._server.client
        protocol = io.protocol
        if protocol is not None:
            protocol.close()
            io.disconnected(protocol)

    def tpc_vote(self, txn: Any) -> Any:
        result = super().tpc_vote(txn)
        buffer = txn.data(self)
        resolved = len(buffer.server_resolved) + len(buffer.client_resolved)
        if resolved:
            self.zchat_events.report("resolved", count=resolved)
        return result

    def notify_connected(self, conn: Any, info: Any) -> None:
        # Object ids pre-fetched from the server before a restart may be handed out again by the
        # restarted storage (it starts after the largest oid it stored): creating an object with
        # one would collide ("A different object already has the same oid"). Ask afresh.
        del self._oids[:]
        self._zchat_fetched.clear()
        self._zchat_pushed = {}
        super().notify_connected(conn, info)
        self._zchat_can_watch = isinstance(info, dict) and info.get("zchat_push") == PUSH_VERSION
        if self._zchat_can_watch and self.zchat_events.watching():
            self._zchat_send_watch(conn)
        self.zchat_events.tell(ClientEvent("connected", time.time()))

    def notify_disconnected(self) -> None:
        self._zchat_fetched.clear()
        self._zchat_pushed = {}
        super().notify_disconnected()
        self.zchat_events.tell(ClientEvent("disconnected", time.time()))


class ChatClient:
    """A connection to one chat database; make one with :func:`connect`.

    Thread-safe: each thread gets its own ZODB connection. ``close()`` is safe to call twice.
    """

    def __init__(
        self,
        db: ZODB.DB,
        *,
        user: str | None = None,
        address: Address | None = None,
        max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
        max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES,
        policy: SendPolicy | None = None,
        clock: Callable[[], float] = time.time,
        events: ClientEvents | None = None,
        link: PostgresLink | None = None,
    ) -> None:
        self.db = db
        self.user = check_author(user if user is not None else default_user())
        self.address = address
        self.writer = uuid.uuid4().hex[:16]
        self.max_text_bytes = max_text_bytes
        self.max_attachment_bytes = max_attachment_bytes
        self.policy = policy or SendPolicy()
        self.clock = clock
        self.send_lock = threading.Lock()
        #: With a classroom certificate (``connect(tls=...)``): signs what this client writes, and
        #: verifies what others wrote against the class CA (see :mod:`zchat_nb.signing`).
        self.signer: Signer | None = None
        self.verifier: Verifier | None = None
        #: What wakes readers and what subscribers hear; :func:`connect` gives its storage the same.
        self.events = events if events is not None else ClientEvents()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[tuple[transaction.TransactionManager, Connection]] = []
        self._rooms: tuple[Changes, list[str], set[bytes]] | None = None
        self._rooms_lock = threading.Lock()  # one reader of the rooms index at a time: none misses a change
        self._closed = False
        # PostgreSQL (RelStorage) instead of ZEO: the link's LISTEN thread tells ``events`` of
        # commits and says whether the database answers.
        self._link = link
        if link is not None:
            link.start(self.events)

    # -- SessionHost -----------------------------------------------------------------------

    def connection(self) -> tuple[transaction.TransactionManager, Connection]:
        """This thread's transaction manager and ZODB connection, opened on first use."""
        pair = getattr(self._local, "pair", None)
        if pair is None:
            if self._closed:
                raise ZChatConnectionError("this ChatClient is closed; call zchat_nb.connect() again")
            tm = transaction.TransactionManager()
            pair = (tm, self.db.open(transaction_manager=tm))
            self._local.pair = pair
            with self._lock:
                self._connections.append(pair)
        return pair

    def close_connection(self) -> None:
        """Close this thread's connection, if it has one; a worker thread calls this before it ends."""
        pair = getattr(self._local, "pair", None)
        if pair is None:
            return
        del self._local.pair
        with self._lock:
            if pair not in self._connections:  # close() got there first
                return
            self._connections.remove(pair)
        tm, conn = pair
        tm.abort()
        conn.close()

    def generation(self) -> int:
        return self.events.generation()

    def wait_for_change(self, generation: int, timeout: float) -> bool:
        return self.events.wait_for_change(generation, timeout)

    def answers_by(self, deadline: float) -> contextlib.AbstractContextManager[None]:
        """Within the block, this thread waits for no answer of the ZEO server past ``deadline``.

        PostgreSQL and in-process storages have no such wait (the database driver has its own
        timeouts): nothing changes for them.
        """
        storage = self.db.storage
        if isinstance(storage, _WakingClientStorage):
            return storage.answers_by(deadline)
        return contextlib.nullcontext()

    def is_connected(self) -> bool:
        if self._link is not None:
            return self._link.is_connected()
        storage = self.db.storage
        return bool(storage.is_connected()) if hasattr(storage, "is_connected") else True

    def wait_connected(self, timeout: float) -> bool:
        storage = self.db.storage
        if self._closed:
            return False
        if self._link is not None:
            return self._link.wait_connected(timeout)
        if self.is_connected():
            return True
        try:
            storage._wait(timeout)  # ZEO's own wait for the connection: an event, not a poll
        except ClientDisconnected:
            return False
        return self.is_connected()

    @property
    def address_text(self) -> str:
        if self._link is not None:
            return self._link.target.display  # never shows the password
        return format_address(self.address) if self.address else "(in-process storage)"

    @property
    def restart_hint(self) -> str:
        """How to bring this client's ZEO server back with its data, for messages saying it is away."""
        return restart_hint(self.address) if self.address and self._link is None else ""

    @property
    def target(self) -> Address | PostgresTarget | None:
        """Where this client's data lives: a ZEO address, a PostgreSQL target, or None (in-process)."""
        return self._link.target if self._link is not None else self.address

    @property
    def storage_text(self) -> str:
        """Which storage this client uses, in words (no password)."""
        if self._link is not None:
            return self._link.target.description
        return f"ZEO server at {format_address(self.address)}" if self.address else "in-process storage"

    def server_status(self) -> dict[str, Any]:
        """The server's statistics (ZEO), or the PostgreSQL link's (storage, notifications, polls)."""
        if self._link is not None:
            return self._link.status()
        return dict(self.db.storage.server_status())

    @property
    def tracks_changes(self) -> bool:
        """True if this client hears the oids of every commit (ZEO), so readers skip what did not change.

        False for in-process storages and PostgreSQL (its notifications name no objects): their
        readers check every stream of their room on each call.
        """
        return isinstance(self.db.storage, _WakingClientStorage)

    def track_changes(self) -> Changes:
        """A new :class:`~zchat_nb.model.Changes` filled with every oid committed from now on."""
        changes = Changes(exact=self.tracks_changes)
        self.events.track(changes)
        return changes

    # -- events --------------------------------------------------------------------------

    def report(self, kind: str, **details: Any) -> None:
        """Tell subscribers what this client did (a commit, a poll); wakes no reader."""
        self.events.report(kind, **details)

    def subscribe(
        self,
        callback: Callable[[ClientEvent], None],
        *,
        activity: bool = False,
        fetched: bool = False,
        kinds: Iterable[str] | None = None,
    ) -> Callable[[], None]:
        """Call ``callback(event)`` on each event of :data:`WAKE_KINDS`; returns an unsubscribe.

        With ``activity=True`` the callback also hears this client's own "commit", "poll" and
        "resolved" events (an inspector wants them; a poller must not wake on its own polls).
        ``kinds``, e.g. ``{"commit"}``, names the kinds it hears instead (of those two sets; any
        other raises ``ValueError``): a callback that wants only its own commits then costs
        nothing on the invalidations of everyone else's.
        With ``fetched=True`` it hears an invalidation only once the client has fetched the objects
        its sessions will load because of it (a reader's wake-up: its read then needs no round
        trip of its own); else as soon as the invalidation arrives.
        The callback runs on ZEO's networking thread or the acting thread: it must be quick and
        make no storage calls.
        """
        return self.events.subscribe(callback, activity=activity, fetched=fetched, kinds=kinds)

    # -- rooms ---------------------------------------------------------------------------

    def session(self, room: str = "general", *, backlog: int | None = None) -> ChatSession:
        """A new reader/writer of ``room`` (created on first use) with a cursor of its own.

        ``backlog=None`` delivers the whole history through ``new_messages()``, as the seed did;
        ``backlog=n`` starts at the end and delivers only the last ``n`` messages first.
        """
        return ChatSession(self, room, backlog=backlog)

    def rooms(self) -> list[str]:
        """Names of the rooms in the database; read again only when the rooms index changed."""
        with self._rooms_lock:
            if self._rooms is None:
                self._rooms = (self.track_changes(), [], set())
            changes, names, oids = self._rooms
            everything, changed = changes.take()
            if not everything and not (changed & oids):
                return list(names)
            tm, conn = self.connection()
            try:
                with server_boundary(self.address_text, lambda: self.restart_hint):
                    tm.begin()
                    root = conn.root()
                    rooms = root.get(ROOMS_KEY)
                    names = room_names(rooms)
                    oids = {oid for oid in [root._p_oid, *index_oids(rooms)] if oid is not None}
            except BaseException:
                changes.mark_all()  # read it again next time
                raise
            self._rooms = (changes, names, oids)
            return list(names)

    # -- attachments -----------------------------------------------------------------------

    def attachment_bytes(self, message: Message, index: int = 0) -> bytes:
        """The bytes of ``message.attachments[index]``, checked (size limit, real size, magic numbers).

        Over ZEO the server streams the blob into this client's private blob cache first.
        Raises :class:`AttachmentError` if it is missing, too big or not what its message says.
        """
        if not 0 <= index < len(message.attachments):
            raise AttachmentError(
                f"message {message.id} has {len(message.attachments)} attachment(s); "
                f"there is no index {index}"
            )
        if not self.is_connected():  # the blob may be on the server only: say so now, not later
            raise disconnected(self.address_text, self.restart_hint)
        tm, conn = self.connection()
        with server_boundary(self.address_text, lambda: self.restart_hint):
            tm.begin()
            try:
                return read_attachment(conn, message.attachments[index], self.max_attachment_bytes)
            finally:
                tm.abort()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close every connection and the database; wakes and ends any waiting reader."""
        refuse_closing_here()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pairs, self._connections = self._connections, []
        self.events.close()
        for tm, conn in pairs:
            try:
                tm.abort()
                conn.close()
            except Exception:  # a connection still in use by another thread
                log.debug("closing a zchat_nb connection failed", exc_info=True)
        if self._link is not None:
            self._link.close()
        self.db.close()
        blob_cache = getattr(self.db.storage, "_zchat_blob_cache", None)
        if blob_cache:  # this client's private blob cache: nobody else reads it
            shutil.rmtree(blob_cache, ignore_errors=True)

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ChatClient {self.user!r} at {self.address_text} {state}>"


def connect(
    address: object = None,
    user: str | None = None,
    *,
    timeout: float = 10.0,
    connect_timeout: float = CONNECT_TIMEOUT,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES,
    cache_size: int = 20 * 1024 * 1024,
    blob_cache_size: int = 100 * 1024 * 1024,
    ssl: ssl_module.SSLContext | None = None,
    tls: str | os.PathLike[str] | None = None,
    allow: Iterable[tuple[str, str]] = (),
    clock: Callable[[], float] = time.time,
    fallback: float = DEFAULT_FALLBACK,
) -> ChatClient:
    """Connect to a chat server.

    Parameters
    ----------
    address
        ``(host, port)``, ``"host:port"``, a PostgreSQL URI
        (``"postgresql://user:password@host:port/dbname"``, see :mod:`zchat_nb.storage`) or None:
        ``$ZCHAT_ADDRESS``, else the embedded default (the local server recorded in the user data
        directory, started if none answers).
    user
        The name shown with this client's messages; default: JupyterHub user or login name.
    timeout
        Seconds a send (and a read while the server is away) may block before it raises.
    connect_timeout
        Seconds to wait for the server to answer now.
    max_text_bytes
        Longest message text accepted when sending and when reading, in UTF-8 bytes.
    max_attachment_bytes
        Largest picture or table shared or read (5 MB by default), in bytes.
    cache_size
        Size of ZEO's client cache in bytes.
    blob_cache_size
        Size ZEO keeps its private blob cache (a temporary directory, removed on close) near, in bytes.
    ssl
        An ``ssl.SSLContext`` for a server started with TLS.
    tls
        Instead of ``ssl``: a student's certificate folder made by ``zchat-nb certs`` (``ca.pem``,
        ``NAME.pem``, ``NAME.key``); ``user`` defaults to NAME. See :mod:`zchat_nb.certs`.
    allow
        Extra ``(module, name)`` globals that records may name (the allow-list is otherwise fixed).
    clock
        Where message times come from (tests pass a slow clock).
    fallback
        PostgreSQL only: seconds between wake-ups of waiting readers when no notification came.
    """
    signer = verifier = None
    target = address if address is not None else os.environ.get(ENV_ADDRESS)
    if is_storage_uri(target):
        if ssl is not None or tls is not None:
            raise ZChatConnectionError(
                "ssl=/tls= are for ZEO servers; for PostgreSQL put sslmode=verify-full (and "
                "sslrootcert=...) in the URI's query"
            )
        return _connect_postgres(
            parse_storage_uri(str(target)),
            user,
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_text_bytes=max_text_bytes,
            allow=allow,
            clock=clock,
            fallback=fallback,
        )
    if tls is not None:
        from .certs import load_bundle

        if ssl is not None:
            raise ZChatConnectionError("give connect() tls= (a certificate folder) or ssl=, not both")
        bundle = load_bundle(tls, user)
        ssl, user = bundle.client_context(), user if user is not None else bundle.name
        signer, verifier = _signing(bundle)
    harden_client_process()
    add_filter_once("ZODB.Connection", _UnansweredLoadsAreDebug)
    rate_limit("ZODB.Connection", "ZEO.asyncio.client", "zchat_nb.security")
    addr = resolve_address(address)
    where = format_address(addr)
    if ssl is not None:
        check_tls(addr, ssl, timeout=connect_timeout)  # says why a TLS connection fails, in words
    elif not probe(addr, timeout=connect_timeout):
        raise ZChatConnectionError(f"no ZEO server answers at {where}; {restart_hint(addr)}")
    # Blobs: a private cache (shared=False: the server streams each blob to us), never a
    # directory another user could read or plant files in; mkdtemp makes it 0700.
    blob_cache = tempfile.mkdtemp(prefix="zchat-blobs-")
    events = ClientEvents()
    try:
        storage = _WakingClientStorage(
            addr,
            events=events,
            answer_timeout=timeout,
            wait=False,
            wait_timeout=timeout,
            cache=_EphemeralCache(None, cache_size),
            ssl=ssl,
            blob_dir=blob_cache,
            shared_blob_dir=False,
            blob_cache_size=blob_cache_size,
            _client_factory=SharedLoopRunner,
        )
        storage._zchat_blob_cache = blob_cache
        storage._zchat_records = RecordCheck(record_policy(max_text_bytes))
    except Exception as exc:
        shutil.rmtree(blob_cache, ignore_errors=True)
        raise ZChatConnectionError(f"cannot connect to the ZEO server at {where}: {exc}") from exc
    try:
        try:
            storage._wait(connect_timeout)
        except ClientDisconnected as exc:
            if ssl is None and speaks_tls(addr):
                raise ZChatConnectionError(
                    f"the ZEO server at {where} requires TLS with a client certificate; connect with "
                    "tls=<your certificate folder> (`zchat-nb chat ADDRESS --tls FOLDER`)"
                ) from exc
            raise ZChatConnectionError(
                f"{where} accepts connections but no ZEO server answered within "
                f"{connect_timeout:g} s (wrong port, or a TLS server without ssl=?)"
            ) from exc
        db = ZODB.DB(storage, class_factory=class_factory(allow))
    except BaseException:
        storage.close()
        shutil.rmtree(blob_cache, ignore_errors=True)
        raise
    try:
        client = ChatClient(
            db,
            user=user,
            address=addr,
            max_text_bytes=max_text_bytes,
            max_attachment_bytes=max_attachment_bytes,
            policy=SendPolicy(timeout=timeout),
            clock=clock,
            events=events,
        )
    except BaseException:
        db.close()
        shutil.rmtree(blob_cache, ignore_errors=True)
        raise
    client.signer, client.verifier = signer, verifier
    return client


def record_policy(max_text_bytes: int) -> PicklePolicy:
    """How records are checked for a client that reads messages of up to ``max_text_bytes``."""
    # A bucket holds up to 30 messages of max_text_bytes (UTF-8, pickled as is) and their keys.
    return dataclasses.replace(RECORD, max_bytes=max(RECORD.max_bytes, 40 * max_text_bytes))


def _signing(bundle: Any) -> tuple[Signer, Verifier]:
    """The signer and verifier of a certificate folder (see :mod:`zchat_nb.signing`)."""
    from .signing import Signer as CertSigner
    from .signing import Verifier as CaVerifier

    try:
        return CertSigner(bundle), CaVerifier(bundle.ca.read_bytes())
    except (OSError, ValueError) as exc:
        raise ZChatConnectionError(f"cannot use the certificate folder {bundle.cert.parent}: {exc}") from exc


def _connect_postgres(
    target: PostgresTarget,
    user: str | None,
    *,
    timeout: float,
    connect_timeout: float,
    max_text_bytes: int,
    allow: Iterable[tuple[str, str]],
    clock: Callable[[], float],
    fallback: float,
) -> ChatClient:
    """A ChatClient on RelStorage: same model and allow-lists, wake-ups by LISTEN/NOTIFY."""
    from .pgwake import PostgresLink
    from .security import harden_conflict_resolution
    from .server import _ensure_root
    from .storage import install_notify_trigger, open_relstorage

    # RelStorage resolves conflicts here, in the client, by unpickling other clients' states.
    harden_conflict_resolution()
    storage = open_relstorage(target, connect_timeout=connect_timeout)
    # Every record is checked before ZODB unpickles it, as over ZEO; set before ZODB.DB makes
    # the per-connection instances, which share it.
    storage._zchat_records = RecordCheck(record_policy(max_text_bytes))
    try:
        _ensure_root(storage)  # two first clients at once must not both create the root
        link = PostgresLink(target, fallback=fallback, notifying=install_notify_trigger(target))
        # Set before ZODB.DB makes the per-connection instances, which copy them.
        storage._zchat_on_lost = link.lost
        storage._zchat_after_commit = link.committed
        db = ZODB.DB(storage, class_factory=class_factory(allow))
    except BaseException:
        storage.close()
        raise
    try:
        client = ChatClient(
            db,
            user=user,
            max_text_bytes=max_text_bytes,
            policy=SendPolicy(timeout=timeout),
            clock=clock,
            link=link,
        )
    except BaseException:
        link.close()
        db.close()
        raise
    if link.trigger_problem is not None:
        log.warning(
            "zchat_nb: commits to %s send no notification (%s); readers learn of them every %g s",
            target.display,
            link.trigger_problem,
            fallback,
        )
    if not link.wait_connected(connect_timeout):
        client.close()
        raise ZChatConnectionError(f"{target.description} does not answer: {link.last_error}")
    return client
