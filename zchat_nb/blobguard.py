"""Bounds on the blobs a ZEO client may upload to a server we start.

ZEO's server streams an uploaded blob into a temporary file chunk by chunk (``storeBlobStart``,
``storeBlobChunk``..., ``storeBlobEnd``) and never asks how big it is getting: one client could
fill the server's disk, and every reader that opens such a blob would download all of it into its
blob cache before it could check the size. :class:`BlobLimitedStorageServer` counts the bytes:

- a blob over ``max_blob_bytes``, or a transaction whose blobs add up to more than
  ``MAX_BLOBS_PER_TRANSACTION`` times that, closes the offender's connection (its temporary file
  is removed, its transaction aborted); other clients go on;
- a blob upload needs a transaction (ZEO would otherwise accept chunks outside any);
- ``storeBlobShared`` (a client naming a file in a blob directory it shares with the server) is
  refused: our clients keep private blob caches and upload the bytes.

Readers still check every attachment's size and type themselves (:func:`zchat_nb.model.read_attachment`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from ZEO.StorageServer import StorageServer, ZEOStorage
from ZODB.POSException import StorageTransactionError

__all__ = ["MAX_BLOBS_PER_TRANSACTION", "MAX_BLOB_BYTES", "BlobLimitedStorageServer"]

log = logging.getLogger(__name__)

#: Largest blob a server we start accepts (clients share at most 5 MB unless told otherwise).
MAX_BLOB_BYTES = 64 * 1024 * 1024
#: Blobs of one transaction may add up to this many times ``max_blob_bytes``.
MAX_BLOBS_PER_TRANSACTION = 4


class _BlobLimitedZEOStorage(ZEOStorage):
    """One client's view of the storage, with its blob uploads counted."""

    server: BlobLimitedStorageServer
    blob_tempfile: tuple[int, str] | None = None
    _blob_bytes = 0
    _transaction_blob_bytes = 0

    def tpc_begin(self, *args: Any, **kwargs: Any) -> Any:
        self._transaction_blob_bytes = 0
        return super().tpc_begin(*args, **kwargs)

    def storeBlobStart(self) -> None:
        if self.transaction is None:
            raise StorageTransactionError("a blob upload needs a transaction (tpc_begin first)")
        self._blob_bytes = 0
        super().storeBlobStart()

    def storeBlobChunk(self, chunk: bytes) -> None:
        if self.blob_tempfile is None:  # refused already, or never started
            return
        limit = self.server.max_blob_bytes
        self._blob_bytes += len(chunk)
        self._transaction_blob_bytes += len(chunk)
        if self._blob_bytes > limit or self._transaction_blob_bytes > MAX_BLOBS_PER_TRANSACTION * limit:
            self._drop_blob_tempfile()
            log.warning(
                "closing %s: it uploaded a blob over the %d-byte limit (%d bytes in this transaction)",
                self.log_label,
                limit,
                self._transaction_blob_bytes,
            )
            self.connection.close()  # notify_disconnected aborts its transaction
            return
        super().storeBlobChunk(chunk)

    def storeBlobShared(self, *args: Any) -> None:
        raise StorageTransactionError("this server takes blob bytes only (storeBlobStart/Chunk/End)")

    def notify_disconnected(self) -> None:
        self._drop_blob_tempfile()  # an upload cut off midway: ZEO would leave its file behind
        super().notify_disconnected()

    def _drop_blob_tempfile(self) -> None:
        if self.blob_tempfile is None:
            return
        fd, name = self.blob_tempfile
        self.blob_tempfile = None
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(name)


class BlobLimitedStorageServer(StorageServer):
    """``ZEO.StorageServer`` whose clients' blob uploads are bounded (see the module docstring)."""

    max_blob_bytes = MAX_BLOB_BYTES

    def create_client_handler(self) -> ZEOStorage:
        return _BlobLimitedZEOStorage(self, self.read_only)
