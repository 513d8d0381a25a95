"""zchat_nb: the ZODB/ZEO chat of Kuchling's guide, shared by notebook kernels through one ZEO server.

Importing this package starts nothing and does not import IPython or ipywidgets::

    import zchat_nb
    server = zchat_nb.serve()                        # a ZEO server in this process
    client = zchat_nb.connect(server.address, user="alice")
    chat = client.session("general")
    chat.add_message("hello")
    chat.new_messages(timeout=2.0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import ChatClient, ClientEvent, connect, default_user
from .exceptions import (
    AttachmentError,
    InvalidMessageError,
    UnsafeRecordError,
    ZChatConnectionError,
    ZChatDisconnected,
    ZChatError,
    ZChatPermissionError,
    ZChatSendError,
    ZChatServerError,
)
from .model import Attachment, ChatSession, Message, Room, SendPolicy
from .server import Server, serve

if TYPE_CHECKING:
    from .inspector import Inspector
    from .widget import ChatWidget

__version__ = "0.1.0"

__all__ = [
    "Attachment",
    "AttachmentError",
    "ChatClient",
    "ChatSession",
    "ChatWidget",
    "ClientEvent",
    "Inspector",
    "InvalidMessageError",
    "Message",
    "Room",
    "SendPolicy",
    "Server",
    "UnsafeRecordError",
    "ZChatConnectionError",
    "ZChatDisconnected",
    "ZChatError",
    "ZChatPermissionError",
    "ZChatSendError",
    "ZChatServerError",
    "__version__",
    "connect",
    "default_user",
    "load_ipython_extension",
    "serve",
    "unload_ipython_extension",
]


def __getattr__(name: str) -> Any:
    # The widget pulls in ipywidgets, which has import-time side effects: load it on first use.
    if name == "ChatWidget":
        from .widget import ChatWidget

        return ChatWidget
    if name == "Inspector":
        from .inspector import Inspector

        return Inspector
    raise AttributeError(f"module 'zchat_nb' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext zchat_nb``: register the ``%zchat`` magics."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext zchat_nb``: stop every widget poller and close the magics' client."""
    from .magics import unload_ipython_extension as unload

    unload(ipython)
