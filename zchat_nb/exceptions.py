"""The errors zchat_nb raises.

Everything derives from :class:`ZChatError`, so ``except ZChatError`` catches all of them::

    ZChatError
    ├── ZChatConnectionError        no server answers / connection refused (address named)
    │   └── ZChatDisconnected       the server went away; also a transaction TransientError
    ├── ZChatSendError              a message (or a teacher's clear) could not be committed in time
    ├── InvalidMessageError         bad input: empty, not str, too long (also a ValueError)
    │   └── AttachmentError         a picture or table cannot be shared or read: type, size, missing
    ├── ZChatPermissionError        editing or deleting someone else's message, or a bad reaction
    ├── UnsafeRecordError           a stored record names a global outside the allow-list
    └── ZChatServerError            a server could not be started, found or stopped

A :class:`ZChatSendError` says whether the message was not stored, or (its answer lost) may have
been: ``ChatSession.post()`` of the same :class:`~zchat_nb.model.Message` again stores it at most
once, because the message id is made by the sender and checked.

:func:`server_boundary` is the one place where a foreign error of a server that went away (ZEO's
``ClientDisconnected``, raised by any load or commit while it is away) becomes
:class:`ZChatDisconnected`; every public read and write goes through it. A server that is connected
but does not answer a call in time (stalled, overloaded, or hostile) raises :class:`NoAnswer` (a
``TransientError`` too), which becomes a :class:`ZChatDisconnected` saying just that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from transaction.interfaces import TransientError
from ZODB.POSException import ConflictError

__all__ = [
    "AttachmentError",
    "InvalidMessageError",
    "NoAnswer",
    "UnsafeRecordError",
    "ZChatConnectionError",
    "ZChatDisconnected",
    "ZChatError",
    "ZChatPermissionError",
    "ZChatSendError",
    "ZChatServerError",
    "disconnected",
    "no_answer",
    "server_boundary",
]


class ZChatError(Exception):
    """Base class of every zchat_nb error."""


class ZChatConnectionError(ZChatError):
    """No ZEO server answers at the address, or the connection failed."""


class ZChatDisconnected(ZChatConnectionError, TransientError):
    """The client lost its server; it reconnects by itself when the server is back."""


class ZChatSendError(ZChatError):
    """A message (or another change) could not be committed: not stored, or unknown; the text says which."""


class InvalidMessageError(ZChatError, ValueError):
    """The text or author of a message is not acceptable."""


class AttachmentError(InvalidMessageError):
    """An attachment cannot be shared (unknown type, over the size limit) or read (missing, altered)."""


class ZChatPermissionError(ZChatError):
    """This user may not make that change (someone else's message, or a reaction that is no emoji).

    The message names who may.
    """


class UnsafeRecordError(ZChatError):
    """A stored record refers to a global that is not on the unpickling allow-list."""


class ZChatServerError(ZChatError):
    """A ZEO server could not be started, found or stopped."""


class NoAnswer(TransientError):
    """A connected server did not answer a call within the client's timeout (not a ZChatError:
    :func:`server_boundary` turns it into one).

    The client's ZEO storage raises it (as a ``ClientDisconnected`` too, so ZEO's own handling of a
    lost server applies); the call can be repeated, and is answered once the server answers again.
    """

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"no answer to {what} from the server within {timeout:g} s")
        self.what = what
        self.timeout = timeout


def disconnected(where: str, hint: str = "") -> ZChatDisconnected:
    """The error of a call made while the server at ``where`` is away, with the way out.

    ``hint`` says how to bring back that very server with its data (``ChatClient.restart_hint``).
    """
    way_out = hint or "`zchat-nb status` tells whether the local default runs"
    return ZChatDisconnected(
        f"not connected to the server at {where}; the client reconnects by itself when that "
        f"server is back ({way_out})"
    )


def no_answer(where: str, timeout: float, hint: str = "") -> ZChatDisconnected:
    """The error of a call that the (connected) server at ``where`` did not answer within ``timeout`` s."""
    way_out = hint or "`zchat-nb status` tells whether the local default runs"
    return ZChatDisconnected(
        f"the server at {where} did not answer within {timeout:g} s (stalled, overloaded, or not a "
        f"zchat_nb server); try again: the client goes on as soon as it answers, and reconnects by "
        f"itself if it goes away. If it stays silent, restart it ({way_out})"
    )


@contextlib.contextmanager
def server_boundary(where: str, hint: str | Callable[[], str] = "") -> Iterator[None]:
    """Turn a server that went away, mid-call, into :class:`ZChatDisconnected` naming ``where``.

    ``hint`` (or a callable that makes it, called only on failure: it may look at files) says how to
    bring that server back with its data.

    ZEO's ``ClientDisconnected`` is a ``transaction.interfaces.TransientError``, which is caught here
    without importing ZEO. A ``ConflictError`` is transient too but says nothing about the server,
    and our own errors are already ours: both pass unchanged.
    """
    try:
        yield
    except (ZChatError, ConflictError):
        raise
    except NoAnswer as exc:
        raise no_answer(where, exc.timeout, hint() if callable(hint) else hint) from exc
    except TransientError as exc:
        raise disconnected(where, hint() if callable(hint) else hint) from exc
