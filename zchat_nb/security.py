"""Unpickling allow-lists for clients and for the servers we start.

Clients unpickle what other clients wrote, and a ZEO server unpickles what any TCP peer sends:

- *clients*: :func:`class_factory` is given to ``ZODB.DB(class_factory=...)``. ZODB (>= 6.3) asks it
  for every global a record names, ``__reduce__`` callables included, so a crafted record cannot make
  a reader call ``os.system`` or ``eval``.
- *servers*: ZEO decodes protocol messages with ``ZEO.asyncio.marshal.server_find_global``, which
  allows every builtin (``eval`` included), and resolves conflicts with
  ``ZODB.ConflictResolution.find_global``, which imports anything. :func:`harden_server_process`
  replaces both, for the whole process, with allow-lists; BTrees still merge concurrent inserts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

from .exceptions import UnsafeRecordError

__all__ = [
    "CLIENT_GLOBALS",
    "CONFLICT_RESOLUTION_GLOBALS",
    "WIRE_GLOBALS",
    "class_factory",
    "harden_conflict_resolution",
    "harden_server_process",
]

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
}

#: Classes whose states the server may unpickle to resolve a conflict (they define
#: ``_p_resolveConflict``); anything else simply stays a conflict.
CONFLICT_RESOLUTION_GLOBALS: frozenset[tuple[str, str]] = _BTREE_CLASSES | {
    ("BTrees.Length", "Length"),
}

#: Globals a ZEO 5+ client's protocol messages may name (measured: normally none at all).
WIRE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytes"),
        ("zodbpickle", "binary"),
    }
)


def _resolve(module: str, name: str) -> Any:
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
