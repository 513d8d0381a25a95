"""Unpickling allow-lists for clients and for the servers we start.

Clients unpickle what other clients wrote, and a ZEO server unpickles what any TCP peer sends:

- *clients*: :func:`class_factory` is given to ``ZODB.DB(class_factory=...)``. ZODB (>= 6.3) asks it
  for every global a record names, ``__reduce__`` callables included, so a crafted record cannot make
  a reader call ``os.system`` or ``eval``.
- *servers*: ZEO decodes protocol messages with ``ZEO.asyncio.marshal.server_find_global``, which
  allows every builtin (``eval`` included), and resolves conflicts with
  ``ZODB.ConflictResolution.find_global``, which imports anything. :func:`harden_server_process`
  replaces both, for the whole process, with allow-lists; BTrees still merge concurrent inserts.
- *client wire*: ZEO's client decodes its server's replies with a ``find_global`` that imports any
  module the server names. :func:`harden_client_process` makes clients check each frame with
  :func:`zchat_nb.pickles.check_pickle` and unpickle it with no globals at all; a refused frame
  closes the connection (ZEO reconnects), instead of hanging the call that waits for it.

Allow-lists stop calls, not size: every pickle is also checked by :mod:`zchat_nb.pickles` first.
"""

from __future__ import annotations

import functools
import importlib
import logging
import pickle
import re
from collections.abc import Callable, Iterable
from io import BytesIO
from typing import Any

from .exceptions import UnsafeRecordError
from .pickles import CLIENT_WIRE, RECORD, PicklePolicy, RefusedPickle, check_pickle, check_record

__all__ = [
    "CLIENT_GLOBALS",
    "CONFLICT_RESOLUTION_GLOBALS",
    "CONFLICT_STATE",
    "WIRE_GLOBALS",
    "RecordCheck",
    "check_conflict_state",
    "checked_conflict_states",
    "class_factory",
    "harden_client_process",
    "harden_conflict_resolution",
    "harden_server_process",
    "is_plain_server_frame",
]

log = logging.getLogger(__name__)

_BTREE_FAMILIES = ("OO", "OI", "IO", "II", "IF", "LO", "OL", "LL", "LF", "QQ", "OQ", "QO")
_BTREE_CLASSES = frozenset(
    (f"BTrees.{family}BTree", f"{family}{kind}")
    for family in _BTREE_FAMILIES
    for kind in ("BTree", "Bucket", "Set", "TreeSet")
)

#: Globals that records of a zchat_nb database may name, as ``(module, name)``.
CLIENT_GLOBALS: frozenset[tuple[str, str]] = _BTREE_CLASSES | {
    ("BTrees.Length", "Length"),
    ("persistent.mapping", "PersistentMapping"),
    ("persistent.list", "PersistentList"),
    ("zchat_nb.model", "Room"),
    ("zchat_nb.model", "Tail"),
    # Shared pictures and tables: the bytes are in the blob's file, not in its (empty) record.
    ("ZODB.blob", "Blob"),
}

#: Classes whose states the server may unpickle to resolve a conflict (they define
#: ``_p_resolveConflict``); anything else simply stays a conflict. ``Tail`` is only named by the
#: references in the ``tails`` index, so that two first sends at once merge there as they do in
#: ``streams``; it has no ``_p_resolveConflict``, so its own conflicts stay conflicts.
CONFLICT_RESOLUTION_GLOBALS: frozenset[tuple[str, str]] = _BTREE_CLASSES | {
    ("BTrees.Length", "Length"),
    ("zchat_nb.model", "Tail"),
}

#: States the server unpickles to resolve a conflict: BTree buckets and Length counters only.
CONFLICT_STATE = PicklePolicy(
    "conflict state",
    max_bytes=8 * 1024 * 1024,
    max_depth=16,
    persistent_ids=True,
    globals=CONFLICT_RESOLUTION_GLOBALS,
)

#: Globals a ZEO 5+ client's protocol messages may name (measured: normally none at all).
WIRE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytes"),
        ("zodbpickle", "binary"),
    }
)


@functools.lru_cache(maxsize=256)
def _resolve(module: str, name: str) -> Any:
    # Cached: a class factory resolves the same few allow-listed globals for every record loaded.
    return getattr(importlib.import_module(module), name)


def class_factory(
    extra: Iterable[tuple[str, str]] = (),
) -> Callable[[Any, str, str], Any]:
    """A ``ZODB.DB`` class factory that only loads :data:`CLIENT_GLOBALS` (and ``extra``)."""
    allowed = CLIENT_GLOBALS | frozenset(extra)

    def factory(connection: Any, module: str, name: str) -> Any:
        if (module, name) not in allowed:
            raise UnsafeRecordError(
                f"refused to load {module}.{name}: a stored record names a global outside "
                "zchat_nb's allow-list (pass connect(..., allow=[(module, name)]) to trust it)"
            )
        return _resolve(module, name)

    return factory


class RecordCheck:
    """Checks each record a client loads (:func:`~zchat_nb.pickles.check_record`) before ZODB unpickles it.

    One per database, shared by its connections' threads. It remembers the records that passed by
    object id, serial *and* content (a hash of the bytes, keyed by this process's secret hash seed),
    so the copies a storage's cache hands out again are not scanned twice, while different bytes
    under a serial already seen (a hostile server, or a row rewritten in SQL) are.
    """

    def __init__(self, policy: PicklePolicy = RECORD, remember: int = 100_000) -> None:
        self.policy = policy
        self._remember = remember
        self._passed: set[tuple[bytes, bytes, int, int]] = set()

    def __call__(self, oid: bytes, serial: bytes, data: bytes) -> None:
        """Raise :class:`RefusedPickle` naming the object if ``data`` (``oid`` at ``serial``) is refused."""
        key = (oid, serial, len(data), hash(bytes(data)))
        if key in self._passed:
            return
        try:
            check_record(data, self.policy)
        except RefusedPickle as exc:
            raise RefusedPickle(f"object {oid.hex()}: {exc}") from None
        if len(self._passed) >= self._remember:
            self._passed.clear()
        self._passed.add(key)


def check_conflict_state(data: bytes) -> None:
    """Refuse a state that conflict resolution is about to unpickle, as a ``ConflictError``.

    A ConflictError makes ZODB's ``tryToResolveConflict`` give up quietly (a debug line saying
    why): the commit stays a plain conflict, which the writer retries.
    """
    from ZODB.POSException import ConflictError

    try:
        check_record(data, CONFLICT_STATE)
    except RefusedPickle as exc:
        raise ConflictError(str(exc)) from None


def checked_conflict_states(untransform: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """A storage's ``_crs_untransform_record_data`` that checks each state too (:func:`check_conflict_state`).

    ZODB's conflict resolution passes every state it unpickles (the committed one, the old one and
    the new one) through that method first.
    """

    def checked(data: bytes) -> bytes:
        data = untransform(data)
        check_conflict_state(data)
        return data

    return checked


def _wire_find_global(module: str, name: str) -> Any:
    if (module, name) not in WIRE_GLOBALS:
        raise ImportError(f"refused global {module}.{name} in a ZEO protocol message")
    return _resolve(module, name)


def _conflict_find_global(*args: Any) -> Any:
    import ZODB.ConflictResolution as cr

    if tuple(args) not in CONFLICT_RESOLUTION_GLOBALS:
        # BadClassName makes tryToResolveConflict give up quietly: the commit stays a conflict.
        raise cr.BadClassName(*args)
    return _resolve(*args)


def harden_server_process() -> None:
    """Put the allow-lists into ZEO's wire decoder and ZODB's conflict resolution (idempotent)."""
    import ZEO.asyncio.marshal as marshal
    import ZODB.ConflictResolution as cr

    marshal.server_find_global = _wire_find_global
    cr.find_global = _conflict_find_global


def harden_conflict_resolution() -> None:
    """Put the conflict allow-list into ZODB's conflict resolution in this process (idempotent).

    RelStorage resolves conflicts in the client, unpickling states other clients wrote.
    """
    import ZODB.ConflictResolution as cr

    cr.find_global = _conflict_find_global


#: Pushed states (see ``zchat_nb.guard.GuardedStorageServer.invalidate``): a client watches at most this many
#: oids; a commit of more than :data:`PUSH_MAX_COMMIT_OIDS` objects pushes nothing; at most
#: :data:`PUSH_MAX_OIDS` states a commit to one client, none larger than :data:`PUSH_MAX_BYTES`.
#: What is not pushed the client loads, as it would without pushes.
MAX_WATCHED = 256
PUSH_MAX_COMMIT_OIDS = 64
PUSH_MAX_OIDS = 8
PUSH_MAX_BYTES = 16 * 1024
#: ``get_info()["zchat_push"]``: this server takes ``zchat_watch`` and sends ``zchat_pushed``.
PUSH_VERSION = 1

#: The server's ``invalidateTransaction(tid, [oid, ...])`` as ZEO pickles it (protocol 3, no memo;
#: the oids appended one by one or in MARK ... APPENDS batches).
_INVALIDATION = re.compile(
    rb"\x80\x03\(K\x00\x88X\x15\x00\x00\x00invalidateTransactionC\x08.{8}\]"
    rb"(?:C\x08.{8}a|\((?:C\x08.{8})+e)*\x86t\.",
    re.DOTALL,
)
#: The head of the server's answer to ``loadBefore(oid, tid)``: ``((oid, tid), 0, ".reply", ...``.
_LOAD_REPLY_HEAD = re.compile(
    rb"\x80\x03\(C\x08.{8}C\x08.{8}\x86(?:K\x00|\x89)X\x06\x00\x00\x00\.reply", re.DOTALL
)
_TID = re.compile(rb"C\x08.{8}(?:N|C\x08.{8})\x87t\.", re.DOTALL)
#: The head of a pushed state ``zchat_pushed(tid, oid, data)`` (see ``GuardedStorageServer.invalidate``).
_PUSHED_PREFIX = b"\x80\x03(K\x00\x88X\x0c\x00\x00\x00zchat_pushed"
_PUSHED_HEAD = re.compile(re.escape(_PUSHED_PREFIX) + rb"C\x08.{8}C\x08.{8}", re.DOTALL)
#: A small int as ZEO's pickler writes it (BININT1, BININT2, BININT).
_INT = rb"(?:K.|M..|J....)"
#: What the server answers a commit with: the vote's ``[]`` (nothing resolved), the finish's tid,
#: a ``None``; and the ``info({"length": ..., "size": ...})`` it sends after each commit.
_COMMIT_FRAME = re.compile(
    rb"\x80\x03\((?:" + _INT + rb"(?:K\x00|\x89)X\x06\x00\x00\x00\.reply(?:\]|N|C\x08.{8})"
    rb"|K\x00\x88X\x04\x00\x00\x00info\}\(X\x06\x00\x00\x00length"
    + _INT
    + rb"X\x04\x00\x00\x00size"
    + _INT
    + rb"u\x85)t\.",
    re.DOTALL,
)


def is_plain_server_frame(frame: bytes) -> bool:
    """True if ``frame`` is, byte for byte, one of the frames every delivered or sent message brings.

    An invalidation and the states pushed ahead of it, a load's answer ``(data, serial, next
    serial or None)``, the answers to a commit's vote and finish and the server's ``info`` after
    it: plain bytes, small ints and str in tuples, a fresh list or dict, nothing memoized, no
    globals, so there is nothing for :func:`~zchat_nb.pickles.check_pickle` to refuse but size,
    which is checked here too. Anything else, a near miss included, is left to the full check.
    """
    if frame.__class__ is not bytes or len(frame) > CLIENT_WIRE.max_bytes:
        return False
    head = _LOAD_REPLY_HEAD.match(frame)
    if head is not None:
        end = _bytes_end(frame, head.end())
        return end is not None and _TID.fullmatch(frame, end) is not None
    head = _PUSHED_HEAD.match(frame)
    if head is not None:
        end = _bytes_end(frame, head.end())
        return end is not None and frame[end:] == b"\x87t."
    return _INVALIDATION.fullmatch(frame) is not None or _COMMIT_FRAME.fullmatch(frame) is not None


def _bytes_end(frame: bytes, pos: int) -> int | None:
    """Where the bytes pickled at ``pos`` end: SHORT_BINBYTES (length in one byte) or BINBYTES
    (four, little-endian); None if there are none."""
    kind = frame[pos : pos + 1]
    if kind == b"C" and len(frame) > pos + 1:
        return pos + 2 + frame[pos + 1]
    if kind == b"B" and len(frame) >= pos + 5:
        return pos + 5 + int.from_bytes(frame[pos + 1 : pos + 5], "little")
    return None


def _no_globals(module: str, name: str) -> Any:
    raise RefusedPickle(f"refused global {module}.{name} in a frame from the ZEO server")


def _decode_server_frame(frame: bytes) -> Any:
    """ZEO's client decoder, with no globals: replies and errors of a ZEO 5 server are plain values."""
    from ZEO._compat import Unpickler

    unpickler = Unpickler(BytesIO(frame))
    unpickler.find_global = unpickler.find_class = _no_globals
    return unpickler.load()


_client_protocol: type | None = None


def harden_client_process() -> None:
    """Make every ZEO client of this process check its server's frames (idempotent)."""
    global _client_protocol
    import ZEO.asyncio.client as zeo_client

    if _client_protocol is not None:
        return

    class GuardedClientProtocol(zeo_client.Protocol):
        """ZEO's client connection, refusing a frame before unpickling it; a refusal closes it."""

        #: The frame being received matched :func:`is_plain_server_frame`.
        _zchat_plain = False

        def finish_connection(self, protocol_version: bytes) -> None:
            super().finish_connection(protocol_version)
            if protocol_version[:1] == b"Z":
                self.decode = self._zchat_decode

        def _zchat_decode(self, frame: bytes) -> Any:
            if self._zchat_plain:  # plain values, matched byte for byte: C's unpickler cannot be misled
                self._zchat_plain = False
                return pickle.loads(frame)
            return _decode_server_frame(frame)

        def message_received(self, data: bytes) -> None:
            if self.protocol_version is not None and self.protocol_version[:1] == b"Z":
                try:
                    self._zchat_plain = is_plain_server_frame(data)
                    if not self._zchat_plain:
                        check_pickle(data, CLIENT_WIRE)
                    if data.startswith(_PUSHED_PREFIX):  # ZEO knows no such call
                        self._zchat_pushed(self.decode(data)[3])
                        return
                except RefusedPickle as exc:
                    log.error("closing the connection to the ZEO server at %s: %s", self.addr, exc)
                    # As ZEO does when it loses a connection (its own close() would leave the
                    # client thinking it is connected): tell the client, which connects again.
                    client = self.client
                    self.close(exc)
                    if client is not None:
                        client.disconnected(self)
                    return
            super().message_received(data)

        def _zchat_pushed(self, args: Any) -> None:
            """A state the server pushed ahead of an invalidation: to the storage, which asked."""
            if not (
                type(args) is tuple
                and len(args) == 3
                and all(type(value) is bytes for value in args)
                and len(args[0]) == len(args[1]) == 8
                and len(args[2]) <= PUSH_MAX_BYTES
            ):
                raise RefusedPickle(f"a pushed state is (tid, oid, data), not {args!r:.80}")
            storage = getattr(self.client, "client", None)
            take = getattr(storage, "zchat_pushed", None)
            if take is not None and self.client.ready:  # while it connects, invalidations wait
                take(*args)

    _client_protocol = GuardedClientProtocol
    zeo_client.Protocol = GuardedClientProtocol
