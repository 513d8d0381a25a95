"""A ZEO storage server that holds against a hostile peer.

Stock ZEO trusts its clients: it unpickles any frame (memo DAGs included), accepts a client-chosen
transaction id, offers storage copying and undo, keeps the commit lock for a client that voted and
went silent, buffers frames of any announced size and replies for peers that never read them, and
logs without limit. :class:`GuardedStorageServer` is ``ZEO.StorageServer.StorageServer`` with:

- every frame checked by :func:`zchat_nb.pickles.check_pickle` before unpickling, no globals at all,
  and only the ``Z5`` pickle protocol;
- only the methods a chat client calls (:data:`CHAT_METHODS`), their arguments type-checked; no
  client-chosen tid or status in ``tpc_begin``;
- the commit lock taken back after :attr:`ServerLimits.commit_lock_timeout` seconds: the
  transaction is aborted, the lock handed on, the offender disconnected;
- per-connection limits (:class:`ServerLimits`): frame and transaction size, unread output,
  connections per peer (address, or user on a Unix socket) and in all, time to register; the
  offender is closed, others go on;
- conflict states checked before the server unpickles them;
- its loggers rate-limited (:mod:`zchat_nb.ratelog`), and the length of the commit lock's queue
  logged only when it is long, at most every :data:`QUEUE_LOG_SECONDS` (see :class:`QueueLog`).

And one thing stock ZEO does not do: a client may name the objects its readers watch
(``zchat_watch``); the server then sends it their new state just before each invalidation that
names them (``zchat_pushed``), so that a delivery costs no load (see
:meth:`GuardedStorageServer.invalidate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import re
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import ZEO.StorageServer
from ZEO._compat import Unpickler
from ZEO.asyncio.marshal import encoder
from ZEO.asyncio.server import Acceptor, ServerProtocol
from ZEO.StorageServer import CommitLog, StorageServer
from ZODB.POSException import StorageTransactionError
from ZODB.utils import p64, u64
from zodbpickle.pickle import Pickler

from .blobguard import MAX_BLOB_BYTES, BlobLimitedZEOStorage
from .pickles import SERVER_WIRE, PicklePolicy, RefusedPickle, check_pickle
from .ratelog import rate_limit
from .security import (
    MAX_WATCHED,
    PUSH_MAX_BYTES,
    PUSH_MAX_COMMIT_OIDS,
    PUSH_MAX_OIDS,
    PUSH_VERSION,
    checked_conflict_states,
)

__all__ = ["CHAT_METHODS", "GuardedStorageServer", "ServerLimits", "decode_checked_frame", "decode_frame"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024

#: What a chat client (ZODB over ClientStorage) calls after ``register``; teachers also ``pack``.
#: Shared pictures move as blobs (storeBlobStart/Chunk/End up, sendBlob down), bounded by
#: :mod:`zchat_nb.blobguard`. Gone: restorea/undo*/iterator_* (storage copying, undo),
#: storeBlobShared, history/loadSerial/getTid/record_iternext (history), deleteObject. Added:
#: zchat_watch (pushed states).
CHAT_METHODS = frozenset(
    {
        "get_info", "lastTransaction", "getInvalidations", "new_oids", "pack", "loadBefore",
        "storea", "checkCurrentSerialInTransaction", "tpc_begin", "vote", "tpc_finish",
        "tpc_abort", "server_status", "set_client_label", "ping",
        "storeBlobStart", "storeBlobChunk", "storeBlobEnd", "sendBlob", "zchat_watch",
    }
)  # fmt: skip

#: Loggers of ZEO and ZODB that a peer can make speak.
_PEER_LOGGERS = (
    "ZEO.asyncio.server",
    "ZEO.asyncio.base",
    "ZEO.asyncio.smp",
    "ZEO.asyncio.marshal",
    "ZEO.StorageServer",
    "ZODB.ConflictResolution",
    __name__,
)


@dataclass(frozen=True)
class ServerLimits:
    """What one connection may cost the server; the offender is disconnected."""

    #: Largest frame (one message: a record plus a few bytes) a client may send.
    max_frame_bytes: int = 8 * MiB
    #: Largest total of the records stored in one transaction.
    max_transaction_bytes: int = 64 * MiB
    #: Replies queued for a peer that does not read them (past the buffer, it is not read either).
    max_unread_bytes: int = 16 * MiB
    #: Seconds a peer may leave its replies unread before it is disconnected.
    unread_timeout: float = 30.0
    #: Open connections from one peer: an IP address, or a user id on a Unix socket. Every kernel of a
    #: JupyterHub host shares one address, so this is sized for a lecture hall behind one hub.
    max_connections_per_peer: int = 512
    #: Open connections in all; None: the process's file limit (raised to its hard limit, at most
    #: 65536, when the server starts) less :data:`RESERVED_FILES`, so that the storage's own files
    #: always open.
    max_connections: int | None = None
    #: Seconds a connection may take to say hello and register.
    register_timeout: float = 10.0
    #: Seconds a client may hold the commit lock (between its vote and its finish).
    commit_lock_timeout: float = 5.0


def _refuse_globals(module: str, name: str) -> Any:
    raise RefusedPickle(f"refused global {module}.{name} in a ZEO frame")


@functools.lru_cache(maxsize=8)
def _wire_policy(max_bytes: int) -> PicklePolicy:
    return dataclasses.replace(SERVER_WIRE, max_bytes=max_bytes)


#: A ZEO client's ``loadBefore(oid, tid)`` frame, byte for byte: ZEO pickles it with protocol 3 and
#: no memo, ``((oid, tid), False, "loadBefore", (oid, tid))``. Every delivered message costs the
#: server one; matched exactly, it needs neither the scan nor the unpickler (whatever differs in
#: any byte takes the checked path).
_LOAD_BEFORE = re.compile(
    rb"\x80\x03\(C\x08(.{8})C\x08(.{8})\x86\x89X\n\x00\x00\x00loadBeforeC\x08(.{8})C\x08(.{8})\x86t\.",
    re.DOTALL,
)
_LOAD_BEFORE_BYTES = 63


def decode_frame(frame: bytes, limits: ServerLimits) -> tuple[Any, int, str, tuple[Any, ...]]:
    """Check and unpickle one client frame into ``(msgid, async, method, args)``, or raise RefusedPickle."""
    if (
        len(frame) == _LOAD_BEFORE_BYTES
        and frame.__class__ is bytes
        and limits.max_frame_bytes >= _LOAD_BEFORE_BYTES
    ):
        load = _LOAD_BEFORE.fullmatch(frame)
        if load is not None:
            oid, tid, arg_oid, arg_tid = load.groups()
            return (oid, tid), 0, "loadBefore", (arg_oid, arg_tid)
    return decode_checked_frame(frame, limits)


def decode_checked_frame(frame: bytes, limits: ServerLimits) -> tuple[Any, int, str, tuple[Any, ...]]:
    """:func:`decode_frame` without the exact match of a load: scan, then unpickle with no globals."""
    check_pickle(frame, _wire_policy(limits.max_frame_bytes))
    unpickler = Unpickler(BytesIO(frame))
    unpickler.find_global = unpickler.find_class = _refuse_globals
    try:
        message = unpickler.load()
    except RefusedPickle:
        raise
    except Exception as exc:
        raise RefusedPickle(f"refused a ZEO frame that does not unpickle: {exc!r:.200}") from None
    if not (isinstance(message, tuple) and len(message) == 4):
        raise RefusedPickle("refused a ZEO frame that is not (msgid, async, method, args)")
    msgid, async_, name, args = message
    # Loads are sent with (oid, tid) as their message id, so that ZEO can merge them.
    if not (isinstance(msgid, int) or (isinstance(msgid, tuple) and all(map(_is_oid, msgid)))):
        raise RefusedPickle("refused a ZEO frame with a bad message id")
    if not (isinstance(async_, (bool, int)) and isinstance(name, str)):
        raise RefusedPickle("refused a ZEO frame with a bad header")
    if msgid == -1 and name == ".reply" and args is None:
        return msgid, int(async_), name, ()  # a client's keep-alive, sent every minute
    if not isinstance(args, tuple):
        raise RefusedPickle(f"refused a ZEO frame for {name!r:.40}: its arguments are not a tuple")
    return msgid, int(async_), name, args


class _FrameMeter:
    """Follows the 4-byte length prefixes of the incoming stream, to refuse a frame before it is buffered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.body = 0
        self.head = b""

    def feed(self, data: bytes) -> int | None:
        """Account for ``data``; return the announced size of a frame over the limit, if any."""
        end = len(data)
        pos = 0
        if self.head:  # a length prefix split between two reads
            take = min(4 - len(self.head), end)
            self.head += bytes(data[:take])
            if len(self.head) < 4:
                return None
            pos = take
            size = int.from_bytes(self.head, "big")
            self.head = b""
            if size > self.limit:
                return size
            self.body = size
        pos += self.body  # the rest of the frame under way
        limit = self.limit
        while pos + 4 <= end:
            size = int.from_bytes(data[pos : pos + 4], "big")
            if size > limit:
                return size
            pos += 4 + size
        if pos >= end:
            self.body = pos - end
        else:
            self.body = 0
            self.head = bytes(data[pos:end])
        return None


def _is_oid(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 8


class GuardedZEOStorage(BlobLimitedZEOStorage):
    """One client's view of the storage: chat methods only, arguments checked, blob uploads bounded."""

    server: GuardedStorageServer
    _txn_bytes = 0

    def setup_delegation(self) -> None:
        super().setup_delegation()
        self.connection.methods = CHAT_METHODS

    def register(self, storage_id: object, read_only: object) -> Any:
        if not isinstance(storage_id, str) or not isinstance(read_only, (bool, int)):
            raise ValueError("register(storage_id: str, read_only: bool)")
        return super().register(storage_id, read_only)

    def tpc_begin(
        self, id: Any, user: Any, description: Any, ext: Any, tid: Any = None, status: Any = " "
    ) -> None:
        # A client-chosen tid is meant for copying storages: FF..FF or a past tid breaks every later
        # commit or read, also after a restart. Status is for the same copying.
        if tid is not None or status != " ":
            raise StorageTransactionError(
                "tpc_begin with a transaction id or status is refused by this server"
            )
        if not isinstance(id, int) or not all(isinstance(v, (str, bytes)) for v in (user, description)):
            raise StorageTransactionError("tpc_begin(id: int, user: str, description: str, ext: dict)")
        if not isinstance(ext, dict) or len(user) + len(description) > 64 * 1024:
            raise StorageTransactionError("tpc_begin: extension must be a dict, user and description short")
        self._txn_bytes = 0
        super().tpc_begin(id, user, description, ext)

    def storea(self, oid: Any, serial: Any, data: Any, id: Any) -> None:
        if not (_is_oid(oid) and _is_oid(serial) and isinstance(data, bytes)):
            raise StorageTransactionError("storea(oid: 8 bytes, serial: 8 bytes, data: bytes, id)")
        self._txn_bytes += len(data)
        limit = self.server.limits.max_transaction_bytes
        if self._txn_bytes > limit:
            raise StorageTransactionError(f"this transaction stores more than {limit} bytes")
        super().storea(oid, serial, data, id)

    def storeBlobEnd(self, oid: Any, serial: Any, data: Any, id: Any) -> None:
        # The record that goes with a blob: the same checks and size budget as storea.
        if not (_is_oid(oid) and _is_oid(serial) and isinstance(data, bytes)):
            raise StorageTransactionError("storeBlobEnd(oid: 8 bytes, serial: 8 bytes, data: bytes, id)")
        self._txn_bytes += len(data)
        limit = self.server.limits.max_transaction_bytes
        if self._txn_bytes > limit:
            raise StorageTransactionError(f"this transaction stores more than {limit} bytes")
        super().storeBlobEnd(oid, serial, data, id)

    def sendBlob(self, oid: Any, serial: Any) -> Any:
        if not (_is_oid(oid) and _is_oid(serial)):
            raise ValueError("sendBlob(oid: 8 bytes, serial: 8 bytes)")
        return super().sendBlob(oid, serial)

    def checkCurrentSerialInTransaction(self, oid: Any, serial: Any, id: Any) -> None:
        if not (_is_oid(oid) and _is_oid(serial)):
            raise StorageTransactionError("checkCurrentSerialInTransaction(oid, serial: 8 bytes each, id)")
        super().checkCurrentSerialInTransaction(oid, serial, id)

    def loadBefore(self, oid: Any, tid: Any) -> Any:
        if not (_is_oid(oid) and _is_oid(tid)):
            raise ValueError("loadBefore(oid: 8 bytes, tid: 8 bytes)")
        return super().loadBefore(oid, tid)

    def getInvalidations(self, tid: Any) -> Any:
        if not _is_oid(tid):
            raise ValueError("getInvalidations(tid: 8 bytes)")
        return super().getInvalidations(tid)

    def new_oids(self, n: Any = 100) -> Any:
        if not isinstance(n, int):
            raise ValueError("new_oids(n: int)")
        return super().new_oids(n)

    def pack(self, time: Any, wait: Any = 1) -> Any:
        if not (isinstance(time, (int, float)) and math.isfinite(time) and time > 0):
            raise ValueError(f"pack(time) needs a finite positive time, not {time!r:.40}")
        return super().pack(time, wait)

    def set_client_label(self, label: Any) -> None:
        if isinstance(label, str) and len(label) <= 200:
            super().set_client_label(label)

    #: The oids whose new state this client asked to get with their invalidation (``zchat_watch``).
    zchat_watched: frozenset[bytes] = frozenset()

    def get_info(self) -> Any:
        info = super().get_info()
        info["zchat_push"] = PUSH_VERSION
        return info

    def zchat_watch(self, oids: Any) -> None:
        """From now on, send this client the new state of any of ``oids`` a commit changes, just
        before its invalidation (replaces what it watched before)."""
        if not (isinstance(oids, (list, tuple)) and len(oids) <= MAX_WATCHED and all(map(_is_oid, oids))):
            raise ValueError(f"zchat_watch(oids: a tuple of at most {MAX_WATCHED} oids of 8 bytes)")
        self.zchat_watched = frozenset(oids)


#: Commits waiting for the lock from which the queue is worth a warning (ZEO warns from 4 on).
QUEUE_WARNING = 10
#: Seconds between two of those warnings.
QUEUE_LOG_SECONDS = 30.0


class QueueLog:
    """Replaces a ZEO lock manager's ``_log_waiting``, which logs the queue's length four times a
    commit (queued, locked, unlocked, dequeued) and as a WARNING once 4 commits wait.

    In a lecture hall a few students sending at once is the normal case: with 8 writers those
    records, dropped again by the rate limit, were a tenth of the server's CPU (py-spy of
    ``benchmarks.writers``), on the one thread every commit waits for. This logs the queue at
    DEBUG only when that level is on, and as a warning only from :data:`QUEUE_WARNING` commits
    waiting, at most once every :data:`QUEUE_LOG_SECONDS`.
    """

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self._next_warning = -math.inf
        self._debug = logging.getLogger(ZEO.StorageServer.__name__).isEnabledFor

    def __call__(self, zs: Any, message: str) -> None:
        length = len(self.manager.waiting)
        if length >= QUEUE_WARNING:
            now = time.monotonic()
            if now >= self._next_warning:
                self._next_warning = now + QUEUE_LOG_SECONDS
                zs.log(
                    f"{message % (self.manager.storage_id, length)} (logged at most every "
                    f"{QUEUE_LOG_SECONDS:g} s)",
                    logging.WARNING,
                )
        elif self._debug(logging.DEBUG):
            zs.log(message % (self.manager.storage_id, length), logging.DEBUG)


class LockWatchdog:
    """Takes the commit lock back from a client that holds it longer than ``seconds``.

    Replaces ZEO's TimeoutThread, which only closes the connection: ZEO's own close leaves the
    storage registered and the lock held (an honest vote then waited 40 s and more). Runs on the
    server's event loop (``begin``/``end`` are called there), so it needs no thread.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, zs: GuardedZEOStorage) -> None:
        self.end(zs)
        loop = zs.connection.loop
        self._timer = loop.call_later(self.seconds, self._expire, zs)

    def end(self, zs: GuardedZEOStorage) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def is_alive(self) -> bool:
        return True

    def _expire(self, zs: GuardedZEOStorage) -> None:
        self._timer = None
        manager = zs.lock_manager
        if manager.locked is not zs:
            return
        log.warning(
            "%s held the commit lock for %g s without finishing its commit: aborted it, disconnected it",
            zs.log_label,
            self.seconds,
        )
        connection = zs.connection
        if connection is not None:
            connection.close()  # GuardedServerProtocol.close aborts the transaction, releasing the lock
        if manager.locked is zs:  # the connection was gone already
            if zs.transaction is not None:
                zs.storage.tpc_abort(zs.transaction)
            manager.release(zs)


class GuardedServerProtocol(ServerProtocol):
    """One client connection: checked frames, and the limits of :class:`ServerLimits`."""

    zeo_storage: GuardedZEOStorage | None
    _peer: str | None = None
    #: Bytes of replies ZEO holds back while the transport is paused.
    _queued = 0

    def __init__(
        self, loop: Any, addr: Any, zeo_storage: GuardedZEOStorage, acceptor: GuardedAcceptor
    ) -> None:
        super().__init__(loop, addr, zeo_storage, False)
        self.acceptor = acceptor
        self.limits = acceptor.storage_server.limits

    def offend(self, what: str) -> None:
        """Log (rate-limited) and close this connection; everyone else goes on."""
        log.warning("closing the connection of %s: %s", self._peer or "a peer", what)
        transport = self.sm_protocol.transport if self.sm_protocol is not None else None
        if transport is not None:
            # Drop its unread replies, also those in the kernel: reset, instead of flushing first.
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(Exception):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()
        if transport is not None:
            transport.abort()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._peer = peer_of(transport)
        refused = self.acceptor.admit(self._peer)
        if refused is not None:
            self._peer_counted = False
            self.offend(refused)
            return
        self._peer_counted = True
        meter = _FrameMeter(self.limits.max_frame_bytes)
        # ZEO's base protocol puts its sized-message protocol's methods on the instance.
        receive: Any = getattr(self, "data_received")  # noqa: B009 (instance attributes, untyped)
        pause: Any = getattr(self, "pause_writing")  # noqa: B009
        resume: Any = getattr(self, "resume_writing")  # noqa: B009

        def data_received(data: bytes) -> None:
            size = meter.feed(data)
            if size is not None:
                self.offend(f"a frame of {size} bytes announced (limit {self.limits.max_frame_bytes})")
                return
            receive(data)

        # A peer that does not read its replies stops being read: its requests wait in the kernel.
        # If it still reads nothing after unread_timeout, it goes.
        paused: list[asyncio.TimerHandle] = []
        write: Any = getattr(self, "write_message")  # noqa: B009

        def write_message(message: bytes) -> None:
            if paused:  # ZEO queues it in a list of its own, outside the transport's buffer
                self._queued += len(message)
            write(message)

        def pause_writing() -> None:
            pause()
            with contextlib.suppress(Exception):
                transport.pause_reading()
            if not paused:
                limit = self.limits.unread_timeout
                paused.append(self.loop.call_later(limit, self.offend, f"replies unread for {limit:g} s"))

        def resume_writing() -> None:
            self._queued = 0  # handed to the transport now (counted in its buffer)
            resume()
            with contextlib.suppress(Exception):
                transport.resume_reading()
            while paused:
                paused.pop().cancel()

        self.write_message = write_message
        self.data_received = data_received
        self.pause_writing = pause_writing
        self.resume_writing = resume_writing
        self.loop.call_later(self.limits.register_timeout, self._check_registered)

    def _check_registered(self) -> None:
        zs = self.zeo_storage
        if self.connected and not self.closed and zs is not None and zs.storage is None:
            self.offend(f"not registered within {self.limits.register_timeout:g} s")

    def finish_connection(self, protocol_version: bytes) -> None:
        if protocol_version not in (b"Z5", b"ruok"):
            self.offend(f"unsupported handshake {protocol_version[:20]!r}")
            return
        super().finish_connection(protocol_version)
        if protocol_version == b"Z5":
            limits = self.limits
            self.decode = lambda frame: decode_frame(frame, limits)

    def message_received(self, message: bytes) -> None:
        transport = self.sm_protocol.transport if self.sm_protocol is not None else None
        if transport is None or self.closed:
            return
        unread = transport.get_write_buffer_size() + self._queued
        if unread > self.limits.max_unread_bytes:
            self.offend(f"{unread} bytes of replies unread (limit {self.limits.max_unread_bytes})")
            return
        try:
            message_id, async_, name, args = self.decode(message)
        except RefusedPickle as exc:
            self.offend(str(exc))
            return
        if message_id == -1:
            return  # keep-alive
        if name not in self.methods:
            self.offend(f"method {name!r:.60} is not offered by this server")
            return
        zs = self.zeo_storage
        assert zs is not None
        try:
            result = getattr(zs, name)(*args)
        except Exception as exc:
            if not isinstance(
                exc, (*self.unlogged_exception_types, StorageTransactionError, ValueError, TypeError)
            ):
                log.exception("%s%r raised an exception", "async " if async_ else "", name)
            if async_:
                self.offend(f"async {name} failed: {exc!r:.200}")
                return
            self.send_error(message_id, exc)
            return
        if not async_:
            self.send_reply(message_id, result)

    def close(self) -> Any:
        zs = self.zeo_storage
        closing = super().close()
        # ZEO forgets a connection it closes itself: its transaction stays open, the commit lock
        # held, and the server keeps sending it invalidations. Do what a client's hang-up does.
        if zs is not None and zs.connected:
            try:
                zs.notify_disconnected()
            except Exception:
                log.exception("cleaning up a closed connection failed")
        return closing

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_peer_counted", False):
            self._peer_counted = False
            self.acceptor.leave(self._peer or "")
        super().connection_lost(exc)


#: File descriptors kept out of :attr:`ServerLimits.max_connections`: the storage, its blobs, logs.
RESERVED_FILES = 128


def raise_file_limit(wanted: int = 65536) -> int:
    """Raise this process's soft limit on open files towards its hard limit (at most ``wanted``),
    as servers do; returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return wanted if soft == resource.RLIM_INFINITY else soft


def peer_of(transport: Any) -> str:
    """Whom a connection counts against: its IP address, or on a Unix socket its user id."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple):
        return str(peer[0])
    sock = transport.get_extra_info("socket")
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (AttributeError, OSError, struct.error):  # no SO_PEERCRED here
        return "unix socket"
    return f"uid {uid}"


class GuardedAcceptor(Acceptor):
    """Makes :class:`GuardedServerProtocol` connections and counts them per peer and in all."""

    storage_server: GuardedStorageServer

    def __init__(self, storage_server: GuardedStorageServer, addr: Any, ssl: Any, msgpack: bool) -> None:
        self.peers: dict[str, int] = {}
        self.open = 0
        limits = storage_server.limits
        files = raise_file_limit()
        self.max_open = (
            limits.max_connections
            if limits.max_connections is not None
            else max(limits.max_connections_per_peer, files - RESERVED_FILES)
        )
        super().__init__(storage_server, addr, ssl, False)

    def factory(self) -> GuardedServerProtocol:
        zs = self.storage_server.create_client_handler()
        return GuardedServerProtocol(self.event_loop, self.addr, zs, self)

    def admit(self, peer: str) -> str | None:
        """Count a new connection from ``peer``; or say why it is refused."""
        count, most = self.peers.get(peer, 0), self.storage_server.limits.max_connections_per_peer
        if count >= most:
            return f"more than {most} connections from this peer"
        if self.open >= self.max_open:
            return f"more than {self.max_open} connections in all"
        self.peers[peer] = count + 1
        self.open += 1
        return None

    def leave(self, peer: str) -> None:
        self.open -= 1
        count = self.peers.get(peer, 0) - 1
        if count > 0:
            self.peers[peer] = count
        else:
            self.peers.pop(peer, None)


def _checked_conflict_states(storage: Any) -> None:
    """Check every pickle the storage unpickles to resolve a conflict, before it does."""
    untransform = getattr(storage, "_crs_untransform_record_data", None)
    if untransform is not None:
        storage._crs_untransform_record_data = checked_conflict_states(untransform)


class MemoryCommitLog(CommitLog):
    """ZEO's log of a transaction's stores on the server, kept in a list up to :attr:`IN_MEMORY` bytes.

    ZEO's makes a temporary file for every transaction, pickles each record into it with protocol 1
    (each bytes object as a ``_codecs.encode`` call), and reads them all back at the vote: about 5%
    of the server's time per commit here. Past the limit (a picture's record, a big import) the
    rest goes to a file as in ZEO's, so a client that stores and never votes holds at most
    ``IN_MEMORY`` bytes of the server's memory per connection.
    """

    IN_MEMORY = 256 * 1024

    def __init__(self) -> None:  # not super(): it makes the file
        self.entries: list[tuple[str, tuple[Any, ...]]] = []
        self.in_memory = 0
        self.file: Any = None
        self.pickler: Any = None
        self.stores = 0

    def _log(self, op: str, args: tuple[Any, ...], size: int = 0) -> None:
        if self.file is None and self.in_memory + size <= self.IN_MEMORY:
            self.entries.append((op, args))
            self.in_memory += size + 50
        else:
            if self.file is None:
                self.file = tempfile.TemporaryFile(suffix=".comit-log")  # noqa: SIM115 (closed by close())
                self.pickler = Pickler(self.file, 1)
                self.pickler.fast = 1
            self.pickler.dump((op, args))
        self.stores += 1

    def size(self) -> int:
        return self.in_memory + (self.file.tell() if self.file is not None else 0)

    def delete(self, oid: bytes, serial: bytes) -> None:
        self._log("_delete", (oid, serial))

    def checkread(self, oid: bytes, serial: bytes) -> None:
        self._log("_checkread", (oid, serial))

    def store(self, oid: bytes, serial: bytes, data: bytes) -> None:
        self._log("_store", (oid, serial, data), len(data))

    def restore(self, oid: bytes, serial: bytes, data: bytes, prev_txn: Any) -> None:
        self._log("_restore", (oid, serial, data, prev_txn), len(data or b""))

    def undo(self, transaction_id: Any) -> None:
        self._log("_undo", (transaction_id,))

    def __iter__(self) -> Iterator[tuple[str, tuple[Any, ...]]]:
        yield from self.entries
        if self.file is not None:
            self.file.seek(0)
            unpickler = Unpickler(self.file)
            for _ in range(self.stores - len(self.entries)):
                yield unpickler.load()

    def close(self) -> None:
        self.entries = []
        if self.file is not None:
            self.file.close()
            self.file = None


class GuardedStorageServer(StorageServer):
    """``ZEO.StorageServer.StorageServer`` hardened as described in :mod:`zchat_nb.guard`."""

    def __init__(
        self,
        addr: Any,
        storages: dict[str, Any],
        *,
        limits: ServerLimits | None = None,
        max_blob_bytes: int = MAX_BLOB_BYTES,
        **kw: Any,
    ) -> None:
        self.limits = limits or ServerLimits()
        self.max_blob_bytes = max_blob_bytes
        rate_limit(*_PEER_LOGGERS)
        kw.pop("transaction_timeout", None)
        kw.pop("msgpack", None)
        super().__init__(addr, storages, Acceptor=GuardedAcceptor, **kw)
        ZEO.StorageServer.CommitLog = MemoryCommitLog  # made by ZEOStorage.tpc_begin, a global of ZEO's
        for manager in self.lock_managers.values():
            manager.timeout = LockWatchdog(self.limits.commit_lock_timeout)
            manager._log_waiting = QueueLog(manager)
        for storage in storages.values():
            _checked_conflict_states(storage)

    def create_client_handler(self) -> GuardedZEOStorage:
        return GuardedZEOStorage(self, self.read_only)

    def invalidate(self, zeo_storage: Any, storage_id: str, tid: bytes, invalidated: Any) -> None:
        """ZEO's broadcast of a commit's oids to every other client, the frame pickled once, and
        before it the new states of the objects each client watches (``zchat_watch``).

        ZEO pickles it again for each client and wakes its loop once per client; in a lecture
        hall that is 200 pickles and 200 wake-ups per message. The frames are the same bytes
        (every connection here speaks Z5: ``finish_connection`` refuses the others), sent in the
        same order, from one callback on the server's loop. A pushed state is loaded and pickled
        once for all the clients that watch it: each would otherwise ask for it, and wait a round
        trip, as the invalidation arrives.
        """
        invq = self.invq[storage_id]
        if len(invq) >= self.invq_bound:
            invq.pop()
        invq.insert(0, (tid, invalidated))
        targets = [zs for zs in self.zeo_storages_by_storage_id[storage_id] if zs is not zeo_storage]
        if not targets:
            return
        encode = encoder(b"Z5", True)
        frame = encode(0, True, "invalidateTransaction", (tid, invalidated))

        def send() -> None:
            # Here, not above: this runs inside the storage's tpc_finish, under its lock.
            pushes = self._pushes(storage_id, tid, invalidated, targets, encode)
            for zs in targets:
                if zs.connection is not None and not zs.connection.closed:
                    for push in pushes.get(zs, ()):
                        zs.connection.write_message(push)
                    zs.connection.write_message(frame)

        try:  # every connection runs on the acceptor's one loop
            targets[0].connection.loop.call_soon_threadsafe(send)
        except RuntimeError:  # the loop is closed: the server is stopping
            log.debug("invalidations not sent: the server's loop is closed")

    def _pushes(
        self, storage_id: str, tid: bytes, invalidated: Any, targets: list[Any], encode: Any
    ) -> dict[Any, list[bytes]]:
        """The ``zchat_pushed(tid, oid, data)`` frames for each client of ``targets`` that watches
        an object of the commit (see :data:`PUSH_MAX_OIDS` and the other bounds)."""
        watchers = [zs for zs in targets if zs.zchat_watched]
        if not watchers or len(invalidated) > PUSH_MAX_COMMIT_OIDS:
            return {}
        storage = self.storages[storage_id]
        before = p64(u64(tid) + 1)

        @functools.cache  # loaded and pickled once for all the watchers
        def frame_of(oid: bytes) -> bytes | None:
            try:
                loaded = storage.loadBefore(oid, before)
            except Exception:  # gone (a pack), or unreadable: the client loads it, and is told
                log.debug("no state of %r to push", oid, exc_info=True)
                return None
            if loaded is None:
                return None
            data, serial, end = loaded
            if serial != tid or end is not None or len(data) > PUSH_MAX_BYTES:
                return None
            return encode(0, True, "zchat_pushed", (tid, oid, data))

        pushes: dict[Any, list[bytes]] = {}
        for zs in watchers:
            watched = zs.zchat_watched
            wanted = [oid for oid in invalidated if oid in watched][:PUSH_MAX_OIDS]
            mine = [push for push in map(frame_of, wanted) if push is not None]
            if mine:
                pushes[zs] = mine
        return pushes
