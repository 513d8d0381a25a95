"""The errors zchat_nb raises.

Everything derives from :class:`ZChatError`, so ``except ZChatError`` catches all of them::

    ZChatError
    ├── ZChatConnectionError        no server answers / connection refused (address named)
    │   └── ZChatDisconnected       the server went away; also a transaction TransientError
    ├── ZChatSendError              a message could not be committed in time (it was not sent)
    ├── InvalidMessageError         bad input: empty, not str, too long (also a ValueError)
    ├── UnsafeRecordError           a stored record names a global outside the allow-list
    └── ZChatServerError            a server could not be started, found or stopped

A message that raised :class:`ZChatSendError` or :class:`ZChatDisconnected` was not committed:
sending it again cannot duplicate it, because retries reuse the message id.
"""

from __future__ import annotations

from transaction.interfaces import TransientError

__all__ = [
    "InvalidMessageError",
    "UnsafeRecordError",
    "ZChatConnectionError",
    "ZChatDisconnected",
    "ZChatError",
    "ZChatSendError",
    "ZChatServerError",
]


class ZChatError(Exception):
    """Base class of every zchat_nb error."""


class ZChatConnectionError(ZChatError):
    """No ZEO server answers at the address, or the connection failed."""


class ZChatDisconnected(ZChatConnectionError, TransientError):
    """The client lost its server; it reconnects by itself when the server is back."""


class ZChatSendError(ZChatError):
    """A message could not be committed within the send timeout; it was not sent."""


class InvalidMessageError(ZChatError, ValueError):
    """The text or author of a message is not acceptable."""


class UnsafeRecordError(ZChatError):
    """A stored record refers to a global that is not on the unpickling allow-list."""


class ZChatServerError(ZChatError):
    """A ZEO server could not be started, found or stopped."""
