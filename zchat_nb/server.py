"""A ZEO server in this process: :func:`serve` and the :class:`Server` it returns.

:func:`serve` runs a hardened ``ZEO.StorageServer`` (see :mod:`zchat_nb.security`) in a daemon thread,
on a FileStorage or on :class:`MemoryStorage`. The embedded default, one server per user in a
process of its own, is :mod:`zchat_nb.local`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import shutil
import ssl as ssl_module
import tempfile
import threading
from pathlib import Path
from typing import Any

import ZODB.POSException
from ZODB.ConflictResolution import ConflictResolvingStorage
from ZODB.MappingStorage import MappingStorage

from .exceptions import ZChatServerError
from .guard import ServerLimits
from .net import Address, format_address
from .ratelog import add_filter_once
from .security import harden_server_process

__all__ = ["MemoryStorage", "Server", "serve"]

log = logging.getLogger(__name__)


class MemoryStorage(ConflictResolvingStorage, MappingStorage):
    """MappingStorage that resolves conflicts, as FileStorage does (BTrees merge inserts)."""

    def __init__(self, name: str = "zchat_nb memory") -> None:
        super().__init__(name)
        self._resolved: list[bytes] = []

    def tpc_begin(self, transaction: Any, tid: Any = None) -> None:
        super().tpc_begin(transaction, tid)
        self._resolved = []

    def store(self, oid: bytes, serial: bytes, data: bytes, version: str, transaction: Any) -> None:
        try:
            super().store(oid, serial, data, version, transaction)
        except ZODB.POSException.ConflictError:
            committed = self._data[oid].maxKey()
            data = self.tryToResolveConflict(oid, committed, serial, data)
            super().store(oid, committed, data, version, transaction)
            self._resolved.append(oid)

    def tpc_vote(self, transaction: Any) -> list[bytes]:
        super().tpc_vote(transaction)
        return self._resolved


def blob_dir_of(path: str | os.PathLike[str]) -> Path:
    """Where a FileStorage's blobs live: beside the file, ``chat.fs`` -> ``chat.fs.blobs``."""
    path = Path(path)
    return path.with_name(path.name + ".blobs")


def _open_storage(path: Path | None) -> tuple[Any, str | None]:
    """The storage to serve, with blob support, and a scratch directory to remove at stop (or None).

    A FileStorage keeps its blobs in :func:`blob_dir_of` its file (ZODB makes it 0700). The
    in-memory storage has no blobs of its own: ``BlobStorage`` wraps it around a private temporary
    directory, which lives as long as the server (measured: ZEO serves and streams blobs from both,
    and conflict resolution still goes through MemoryStorage).
    """
    from ZODB.blob import BlobStorage
    from ZODB.FileStorage import FileStorage

    if path is not None:
        return FileStorage(str(path), pack_keep_old=False, blob_dir=str(blob_dir_of(path))), None
    scratch = tempfile.mkdtemp(prefix="zchat-server-blobs-")
    return BlobStorage(scratch, MemoryStorage()), scratch


def _ensure_root(storage: Any) -> None:
    """Store the root object now, so that first clients connecting at once do not race to create it."""
    import ZODB
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import load_current, z64

    try:
        load_current(storage, z64)
        return
    except ZODB.POSException.POSKeyError:
        pass
    scratch = ZODB.DB(None)  # let ZODB serialise an empty root, as ZODB.DB() itself would
    data = load_current(scratch.storage, z64)[0]
    scratch.close()
    txn = TransactionMetaData(description="zchat_nb: initial database creation")
    storage.tpc_begin(txn)
    storage.store(z64, z64, data, "", txn)
    storage.tpc_vote(txn)
    storage.tpc_finish(txn)


class _ClientDisconnectsAreInfo(logging.Filter):
    """ZEO logs a client whose connection was reset as an ERROR; for a chat server it is routine.

    Kernels restart and laptops close all the time, and in a notebook that serves, Python's
    last-resort handler would print each of them to stderr. Other errors are left as they are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and record.getMessage().startswith("Disconnected ConnectionReset"):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class Server:
    """A ZEO server running in a daemon thread of this process. ``stop()`` is safe to call twice."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl: ssl_module.SSLContext | None = None,
        storage_uri: str | None = None,
        limits: ServerLimits | None = None,
        unix: str | os.PathLike[str] | None = None,
        max_blob_bytes: int | None = None,
    ) -> None:
        from .blobguard import MAX_BLOB_BYTES
        from .guard import GuardedStorageServer

        harden_server_process()
        add_filter_once("ZEO.asyncio.server", _ClientDisconnectsAreInfo)
        self.path = None if path is None else Path(path)
        self.storage_text = "in memory" if self.path is None else str(self.path)
        self._scratch: str | None = None
        if storage_uri is not None:  # PostgreSQL through RelStorage (zchat_nb.storage)
            if path is not None:
                raise ZChatServerError("give the server a FileStorage path or a --storage URI, not both")
            from .storage import open_relstorage, parse_storage_uri

            target = parse_storage_uri(storage_uri)
            self.storage_text = target.description
            storage = open_relstorage(target)
        else:  # FileStorage or memory, each with a blob directory (see _open_storage)
            storage, self._scratch = _open_storage(self.path)
        # ZEO listens on a Unix socket when given a path instead of (host, port).
        bind: Address = (host, port) if unix is None else os.path.abspath(unix)
        try:
            _ensure_root(storage)
            # ZEO binds by running an event loop in the calling thread, which fails where one already
            # runs (a Jupyter kernel's main thread): build the server on a helper thread.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                self._server = pool.submit(
                    GuardedStorageServer,
                    bind,
                    {"1": storage},
                    ssl=ssl,
                    limits=limits,
                    max_blob_bytes=MAX_BLOB_BYTES if max_blob_bytes is None else max_blob_bytes,
                ).result()
        except OSError as exc:
            storage.close()
            self._remove_scratch()
            raise ZChatServerError(_cannot_listen(bind, exc)) from exc
        except BaseException:
            storage.close()
            self._remove_scratch()
            raise
        self.address: Address = bind if isinstance(bind, str) else (host, self._server.addr[1])
        self.tls = ssl is not None
        self._stopped = threading.Event()
        self._server.start_thread(daemon=True)

    def status(self) -> dict[str, Any]:
        """Server statistics: ``connections``, ``last-transaction`` (hex), commits, conflicts..."""
        if self._stopped.is_set():
            return {"running": False}
        return {"running": True, **self._server.server_status("1")}

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._close_client_connections()
        self._server.close(join_timeout=5)
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _close_client_connections(self, timeout: float = 5.0) -> None:
        """Close every client connection on the server's event loop, and wait until they are closed.

        ZEO's ``StorageServer.close()`` stops its event loop and then schedules the connections'
        closing on it; when the loop has closed first, the sockets stay open and clients never
        learn that the server went away.
        """
        server = self._server

        async def close_all() -> None:
            # Stop listening first: a client whose connection closes reconnects at once, and a
            # connection accepted now would be left open when the loop stops.
            if server.acceptor.server is not None:
                server.acceptor.server.close()
            protocols = [
                zs.connection
                for storages in server.zeo_storages_by_storage_id.values()
                for zs in storages
                if getattr(zs, "connection", None) is not None
            ]
            closing = [protocol.close() or protocol.closing for protocol in protocols]
            closing = [future for future in closing if future is not None]
            if closing:
                await asyncio.wait(closing, timeout=timeout)

        try:
            asyncio.run_coroutine_threadsafe(close_all(), server.acceptor.event_loop).result(timeout + 1)
        except Exception:  # the loop is already gone: nothing is left to close
            log.debug("closing the ZEO server's client connections failed", exc_info=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` is called (from a signal handler, say)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped.is_set() else "running"
        return f"<zchat_nb.Server {format_address(self.address)} {self.storage_text} {state}>"


def _cannot_listen(bind: Address, exc: OSError) -> str:
    where = format_address(bind)
    if isinstance(bind, str):
        return f"cannot listen on {where}: {exc.strerror}; check that its directory exists and is yours"
    if exc.errno == errno.EADDRINUSE and bind[1]:
        return (
            f"cannot listen on {where}: port {bind[1]} is taken by another program "
            f"(`ss -ltnp 'sport = :{bind[1]}'` names it); stop that program to get this port back, "
            "or choose another port (--port 0 picks a free one)"
        )
    return f"cannot listen on {where}: {exc.strerror}; choose another port (--port 0 picks a free one)"


def serve(
    path: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl: ssl_module.SSLContext | None = None,
    tls: str | os.PathLike[str] | None = None,
    storage: str | None = None,
    limits: ServerLimits | None = None,
    unix: str | os.PathLike[str] | None = None,
    max_blob_bytes: int | None = None,
) -> Server:
    """Start a ZEO server in this process: in memory, in the FileStorage at ``path``, or in PostgreSQL.

    ``storage``: a ``postgresql://`` URI (:mod:`zchat_nb.storage`); the data then lives in that
    database, through RelStorage.

    Binds 127.0.0.1 unless told otherwise; ``port=0`` picks a free port (see ``.address``).
    ``tls`` (instead of ``ssl``): a classroom directory made by ``zchat-nb certs``; clients then
    need a certificate from it (:mod:`zchat_nb.certs`). ``limits``: what one connection may
    cost the server (:class:`zchat_nb.guard.ServerLimits`). ``unix``: listen on this Unix socket path
    instead of ``host:port`` (a stale socket file there is replaced; keep it in a directory only
    you can write, as the local default does). ``max_blob_bytes``: the largest shared picture or
    table a client may upload (default 64 MiB, :mod:`zchat_nb.blobguard`; clients have their own
    limit, 5 MB by default).
    """
    if tls is not None:
        from .certs import server_context

        if ssl is not None:
            raise ZChatServerError("give serve() tls= (a classroom directory) or ssl=, not both")
        ssl = server_context(tls)
    return Server(
        path,
        host,
        port,
        ssl=ssl,
        storage_uri=storage,
        limits=limits,
        unix=unix,
        max_blob_bytes=max_blob_bytes,
    )
