"""A bounded-cost check of a pickle, run before anything unpickles it.

Allow-lists of globals (:mod:`zchat_nb.security`) stop a pickle from *calling* something, but not
from *describing* something huge: pickle's memo lets a few hundred bytes build ``t = (t, t)`` 64
times over, a DAG of 2**64 tuples, and whatever hashes or compares it (a dict key, a frozenset, a
BTree key comparison, a storage's oid index) then runs for ever in C, holding the GIL. No global is
named, so no allow-list sees it.

:func:`check_pickle` walks the opcodes once (linear in the bytes, like :func:`pickletools.genops`)
and simulates the stack, giving every value its *expanded size*: the number of objects reached when
it is traversed, memo references counted as the full size of what they refer to. It refuses, by
raising :class:`RefusedPickle` before any object is built:

- opcodes outside the :class:`PicklePolicy`'s allow-list (sets never; dicts, ``REDUCE`` and
  persistent ids only where the format uses them; dict keys must be atoms such as ``str``);
- globals outside the policy's list;
- more bytes, a larger expanded size or deeper nesting than the policy allows;
- mutating a list or dict that something already refers to (that would make earlier references
  larger than they were counted), or BUILD on anything but the result of a call.

It runs on every record a client loads, so it is written for speed (one loop dispatching on the
opcode byte, values as ints: about 35 MB/s, ``python -m benchmarks.checker``); the slow, plainly
written version it must agree with is ``tests/pickle_reference.py``.

The same checker guards every door: frames a server we start receives, records a client loads,
conflict states a server resolves, and replies a client decodes from its server.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, field
from typing import Any

from .exceptions import UnsafeRecordError

__all__ = [
    "CLIENT_WIRE",
    "RECORD",
    "SERVER_WIRE",
    "PicklePolicy",
    "RefusedPickle",
    "check_pickle",
    "check_record",
]


class RefusedPickle(UnsafeRecordError):
    """A pickle was refused before unpickling: a forbidden opcode or global, or too big or deep."""


@dataclass(frozen=True)
class PicklePolicy:
    """What one kind of pickle may contain, and how big it may get."""

    #: Names the kind of pickle in error messages ("ZEO frame", "record", ...).
    what: str
    #: Longest pickle accepted, in bytes.
    max_bytes: int
    #: Deepest nesting of containers.
    max_depth: int = 32
    #: Expanded size allowed: ``max_expanded_base + max_expanded_per_byte * len(data)`` objects.
    max_expanded_base: int = 100_000
    max_expanded_per_byte: int = 4
    dicts: bool = False
    lists: bool = False
    #: ``REDUCE``, ``NEWOBJ`` and ``BUILD`` (calls): only where a class factory vets the callables.
    calls: bool = False
    persistent_ids: bool = False
    #: Globals allowed as ``(module, name)``; ``None``: any name (another allow-list checks them).
    globals: frozenset[tuple[str, str]] | None = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        # The scan relies on these: a tuple of atoms (depth 1, size at most its bytes) is within them.
        if self.max_depth < 1 or self.max_expanded_base < 1 or self.max_expanded_per_byte < 1:
            raise ValueError(
                f"{self.what}: max_depth, max_expanded_base and max_expanded_per_byte must be at least 1"
            )
        if self.max_bytes + self.budget(self.max_bytes) >= 1 << _SHIFT:
            raise ValueError(f"{self.what}: max_bytes={self.max_bytes} is too large to check")

    def budget(self, size: int) -> int:
        return self.max_expanded_base + self.max_expanded_per_byte * size


# -- the scan: one function, dispatching on the opcode byte, with values as ints -----------------
#
# A value on the simulated stack is an ``int``, ``depth << _SHIFT | size``, once nothing can change
# it (atoms, tuples, globals, persistent references); a :class:`_Cell` while it may still grow (a
# list, dict or call result, until something refers to it); or ``None``
# for a MARK. Sizes stay far below ``2**_SHIFT``: every size on the stack is made of bytes read and
# of work charged, and work is refused past the budget (at most ``max_bytes * 5 + base``). So a
# tuple's size and depth are the ``sum`` and ``max`` of its items' ints, masked; a cell or a MARK
# among the items makes that arithmetic raise TypeError, and only then does slower code run.

_SHIFT = 40
_SIZE = (1 << _SHIFT) - 1
_DEPTHS = ~_SIZE
_LEVEL = 1 << _SHIFT  # one level of nesting
#: Every atom (None, bool, int, float, str, bytes) is the int 1: size 1, depth 0.
_ATOM = 1
#: A global counts as two objects, so that it is never 1 (an atom): it may not be a dict key.
_GLOBAL = 2
_EMPTY = _LEVEL | 1  # an empty tuple, list or dict

_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from
_u64 = struct.Struct("<Q").unpack_from

#: The opcodes the scan knows, by byte, named for error messages.
_KNOWN = [
    "PROTO", "FRAME", "STOP", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2",
    "BINFLOAT", "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "MARK", "BINPUT", "LONG_BINPUT",
    "MEMOIZE", "BINGET", "LONG_BINGET", "DUP", "POP", "POP_MARK", "EMPTY_DICT", "DICT", "SETITEM",
    "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS", "BINPERSID", "REDUCE", "NEWOBJ", "BUILD",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
    "SHORT_BINSTRING", "BINSTRING", "LONG1", "GLOBAL",
]  # fmt: skip
_NAMES = {getattr(pickle, name)[0]: name for name in _KNOWN}
#: Opcodes that take the items above the last MARK.
_MARKED = frozenset(b"t1due")


class _Cell:
    """A list, dict or call result: it may grow until something refers to it (then it is shared).

    Deliberately not an int, nor a list: arithmetic on it raises TypeError, sending the scan to
    its general code.
    """

    __slots__ = ("shared", "value")

    def __init__(self, value: int) -> None:
        self.value = value
        self.shared = False


def _plain(value: Any) -> int:
    """The int of a stack value; a MARK where a value is needed is an underflow."""
    if value is None:
        raise IndexError("a MARK where a value is needed")
    if value.__class__ is int:
        return value
    return value.value


def _tuple(items: list[Any]) -> int:
    """The int of a tuple of ``items`` (the general case: cells among them)."""
    plain = [_plain(item) for item in items]
    return ((max(plain) & _DEPTHS) if plain else 0) + _LEVEL + (sum(plain) & _SIZE) + 1


class _Refuse:
    """The refusals of one check, and its rarer steps (the policy names the kind of pickle)."""

    def __init__(self, policy: PicklePolicy, budget: int) -> None:
        self.policy = policy
        self.budget = budget

    def __call__(self, why: str) -> RefusedPickle:
        return RefusedPickle(f"refused a {self.policy.what}: {why}")

    def value(self, value: int) -> None:
        """Refuse a value that expands past the budget or nests too deep."""
        if value & _SIZE > self.budget:
            raise self(f"it expands to more than {self.budget} objects (memo references)")
        if value >> _SHIFT > self.policy.max_depth:
            raise self(f"it nests deeper than {self.policy.max_depth} levels")

    def work(self) -> RefusedPickle:
        return self(f"building it traverses more than {self.budget} objects")

    def grow(self, target: Any, items: list[Any], *, keys: bool) -> int:
        """APPENDS/SETITEMS into ``target``, a cell nothing refers to yet; returns the work done."""
        if target.__class__ is not _Cell:
            raise self("adds items to something that is not a list or dict")
        if target.shared:
            raise self("adds items to a list or dict that is already referred to")
        plain = [_plain(item) for item in items]
        work = 0
        if keys:
            if len(plain) % 2:
                raise self("odd number of items for a dict")
            for key in plain[::2]:
                if key != _ATOM:
                    raise self("a dict key is not a str, bytes or number")
            work = len(plain) // 2  # hashing each key
        depth = max(target.value & _DEPTHS, ((max(plain) & _DEPTHS) if plain else 0) + _LEVEL)
        target.value = depth | ((target.value + sum(plain)) & _SIZE)
        self.value(target.value)
        return work

    def build(self, target: Any, state: int) -> None:
        """BUILD: ``state`` into ``target``, a call's result that nothing refers to yet."""
        if target.__class__ is not _Cell:
            raise self("sets the state of something that is not an object")
        if target.shared:
            raise self("sets the state of an object that is already referred to")
        depth = max(target.value & _DEPTHS, (state & _DEPTHS) + _LEVEL)
        target.value = depth | ((target.value + state) & _SIZE)
        self.value(target.value)


def _scan(data: bytes, policy: PicklePolicy, budget: int, count: int) -> int:
    """Check ``count`` pickles at the start of ``data``; return where the last one ends.

    One loop with local names: a generator, opcode names or a method call per opcode made the
    scan five times slower. Underflows and reads past the end surface as IndexError.
    """
    refuse = _Refuse(policy, budget)
    too_deep = (policy.max_depth + 1) << _SHIFT  # a value at or above this nests too deep
    allowed = policy.globals
    dicts, lists, calls, persistent_ids = policy.dicts, policy.lists, policy.calls, policy.persistent_ids
    u32 = _u32
    stack: list[Any] = []
    push, pop = stack.append, stack.pop
    marks: list[int] = []  # where on the stack the open MARKs are (a None there)
    memo: dict[int, Any] = {}
    work = 0  # expanded sizes traversed while building (memo references, dict keys, calls)
    value: Any  # an int, a _Cell, or None (a MARK)
    pos = 0
    code = -1
    try:
        while True:
            code = data[pos]
            pos += 1
            # Opcodes that make one value end by pushing it (below), and by memoizing it right
            # away if a PUT follows, as it usually does. Most frequent first (measured on BTree
            # buckets and inner nodes of message streams); the others `continue`.
            if code == 0x58:  # BINUNICODE
                pos += 4 + u32(data, pos)[0]
                value = 1
            elif code == 0x86:  # TUPLE2
                b = pop()
                a = pop()
                try:
                    size = a + b
                except TypeError:
                    size = -1
                if 0 <= size < _LEVEL:  # atoms or globals: nothing nested yet
                    value = _LEVEL + size + 1
                else:
                    if size < 0:
                        value = _tuple([a, b])
                    else:
                        value = ((a if a > b else b) & _DEPTHS) + _LEVEL + (size & _SIZE) + 1
                    if value >= too_deep or value & _SIZE > budget:
                        refuse.value(value)
            elif code == 0x47:  # BINFLOAT
                pos += 8
                push(1)
                continue
            elif code == 0x68 or code == 0x6A:  # BINGET, LONG_BINGET
                if code == 0x68:
                    value = memo.get(data[pos])
                    pos += 1
                else:
                    value = memo.get(u32(data, pos)[0])
                    pos += 4
                try:
                    work += value & _SIZE
                except TypeError:
                    if value is None:
                        raise refuse(f"{_NAMES[code]} of nothing") from None
                    value.shared = True  # a cell referred to: it may not grow any more
                    work += value.value & _SIZE
                if work > budget:
                    raise refuse.work()
                push(value)
                continue
            elif code == 0x28:  # MARK
                marks.append(len(stack))
                push(None)
                continue
            elif code == 0x74:  # TUPLE
                mark = marks.pop()
                items = stack[mark + 1 :]
                del stack[mark:]
                try:
                    size = sum(items)
                except TypeError:
                    size = -1
                if 0 <= size < _LEVEL:  # atoms or globals: nothing nested yet
                    value = _LEVEL + size + 1
                else:
                    if size < 0:
                        value = _tuple(items)
                    else:
                        value = (max(items) & _DEPTHS) + _LEVEL + (size & _SIZE) + 1
                    if value >= too_deep or value & _SIZE > budget:
                        refuse.value(value)
            elif code == 0x51:  # BINPERSID
                if not persistent_ids:
                    raise refuse("opcode BINPERSID is not allowed here")
                pid = pop()
                if pid.__class__ is not int:
                    pid = _plain(pid)
                work += pid & _SIZE
                if work > budget:
                    raise refuse.work()
                value = pid + _LEVEL + 1  # one level deeper, one object more
            elif code == 0x43 or code == 0x8C:  # SHORT_BINBYTES, SHORT_BINUNICODE
                pos += 1 + data[pos]
                value = 1
            elif code == 0x71 or code == 0x72 or code == 0x94:  # BINPUT, LONG_BINPUT, MEMOIZE (alone)
                top = stack[-1]
                if top is None:
                    raise refuse("memoizes nothing")
                if code == 0x71:
                    memo[data[pos]] = top
                    pos += 1
                elif code == 0x72:
                    memo[u32(data, pos)[0]] = top
                    pos += 4
                else:
                    memo[len(memo)] = top
                continue
            elif code == 0x85:  # TUPLE1
                a = pop()
                try:
                    value = a + _LEVEL + 1  # one level deeper, one object more
                except TypeError:
                    value = _tuple([a])
                if value >= too_deep or value & _SIZE > budget:
                    refuse.value(value)
            elif code == 0x87:  # TUPLE3
                c = pop()
                b = pop()
                a = pop()
                try:
                    value = (max(a, b, c) & _DEPTHS) + _LEVEL + ((a + b + c) & _SIZE) + 1
                except TypeError:
                    value = _tuple([a, b, c])
                if value >= too_deep or value & _SIZE > budget:
                    refuse.value(value)
            elif code == 0x29:  # EMPTY_TUPLE
                value = _EMPTY
            elif code == 0x4E or code == 0x88 or code == 0x89:  # NONE, NEWTRUE, NEWFALSE
                push(1)
                continue
            elif code == 0x4B:  # BININT1
                pos += 1
                push(1)
                continue
            elif code == 0x4D:  # BININT2
                pos += 2
                push(1)
                continue
            elif code == 0x4A:  # BININT
                pos += 4
                push(1)
                continue
            elif code == 0x8A or code == 0x55:  # LONG1, SHORT_BINSTRING
                pos += 1 + data[pos]
                value = 1
            elif code == 0x42:  # BINBYTES
                pos += 4 + u32(data, pos)[0]
                value = 1
            elif code == 0x8D or code == 0x8E:  # BINUNICODE8, BINBYTES8
                pos += 8 + _u64(data, pos)[0]
                value = 1
            elif code == 0x54:  # BINSTRING: a signed length
                size = _i32(data, pos)[0]
                if size < 0:
                    raise refuse(f"BINSTRING of negative length at {pos - 1}")
                pos += 4 + size
                value = 1
            elif code == 0x2E:  # STOP
                if len(stack) != 1 or marks:
                    raise refuse("it does not end with exactly one value")
                refuse.value(_plain(pop()))
                count -= 1
                if not count:
                    return pos
                continue
            elif code == 0x63:  # GLOBAL
                first = data.find(b"\n", pos, pos + 256)
                second = data.find(b"\n", first + 1, first + 257) if first >= 0 else -1
                if second < 0:
                    raise refuse("GLOBAL without two lines")
                if allowed is not None:
                    module = data[pos:first].decode("ascii", "replace")
                    qualname = data[first + 1 : second].decode("ascii", "replace")
                    if (module, qualname) not in allowed:
                        raise refuse(f"global {module}.{qualname} is not allowed here")
                pos = second + 1
                value = _GLOBAL
            elif code == 0x80:  # PROTO
                pos += 1
                continue
            elif code == 0x95:  # FRAME
                pos += 8
                continue
            elif code == 0x32:  # DUP
                value = stack[-1]
                try:
                    work += value & _SIZE
                except TypeError:
                    if value is None:
                        raise refuse("DUP of nothing") from None
                    value.shared = True
                    work += value.value & _SIZE
                if work > budget:
                    raise refuse.work()
                push(value)
                continue
            elif code == 0x30:  # POP
                if pop() is None:
                    raise IndexError("POP of a MARK")
                continue
            elif code == 0x31:  # POP_MARK
                del stack[marks.pop() :]
                continue
            elif (code == 0x7D or code == 0x64) and dicts:  # EMPTY_DICT, DICT
                value = _Cell(_EMPTY)
                if code == 0x64:
                    mark = marks.pop()
                    items = stack[mark + 1 :]
                    del stack[mark:]
                    work += refuse.grow(value, items, keys=True)
                    if work > budget:
                        raise refuse.work()
            elif (code == 0x73 or code == 0x75) and dicts:  # SETITEM, SETITEMS
                if code == 0x73:
                    items = [_plain(stack[-2]), _plain(stack[-1])]
                    del stack[-2:]
                else:
                    mark = marks.pop()
                    items = stack[mark + 1 :]
                    del stack[mark:]
                work += refuse.grow(stack[-1] if stack else None, items, keys=True)
                if work > budget:
                    raise refuse.work()
                continue
            elif (code == 0x5D or code == 0x6C) and lists:  # EMPTY_LIST, LIST
                value = _Cell(_EMPTY)
                if code == 0x6C:
                    mark = marks.pop()
                    items = stack[mark + 1 :]
                    del stack[mark:]
                    refuse.grow(value, items, keys=False)
            elif (code == 0x61 or code == 0x65) and lists:  # APPEND, APPENDS
                if code == 0x61:
                    items = [_plain(pop())]
                else:
                    mark = marks.pop()
                    items = stack[mark + 1 :]
                    del stack[mark:]
                refuse.grow(stack[-1] if stack else None, items, keys=False)
                continue
            elif (code == 0x52 or code == 0x81) and calls:  # REDUCE, NEWOBJ
                args = _plain(pop())
                func = _plain(pop())
                work += args & _SIZE
                if work > budget:
                    raise refuse.work()
                # The result may be anything the callable makes of args (a class factory vets it).
                value = (args & _DEPTHS) + _LEVEL + ((args + func) & _SIZE) + 1
                refuse.value(value)
                value = _Cell(value)
            elif code == 0x62 and calls:  # BUILD
                state = _plain(pop())
                work += state & _SIZE
                if work > budget:
                    raise refuse.work()
                refuse.build(stack[-1] if stack else None, state)
                continue
            elif code in _NAMES:
                raise refuse(f"opcode {_NAMES[code]} is not allowed here")
            else:
                raise refuse(f"opcode {bytes([code])!r} at {pos - 1} is not allowed here")
            push(value)
            code = data[pos]
            if code == 0x71:  # BINPUT
                pos += 2
                memo[data[pos - 1]] = value
            elif code == 0x72:  # LONG_BINPUT
                pos += 5
                memo[u32(data, pos - 4)[0]] = value
            elif code == 0x94:  # MEMOIZE
                pos += 1
                memo[len(memo)] = value
    except (IndexError, struct.error):
        if pos >= len(data) or code == -1:
            raise refuse("it is truncated (no STOP)") from None
        raise refuse("no MARK on the stack" if code in _MARKED else "stack underflow") from None


def check_pickle(data: bytes, policy: PicklePolicy, *, count: int = 1) -> None:
    """Refuse ``data`` unless it is ``count`` pickles (back to back) that ``policy`` allows.

    Costs time linear in ``len(data)``; raises :class:`RefusedPickle` naming what is wrong.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RefusedPickle(f"refused a {policy.what}: {type(data).__name__}, not bytes")
    if len(data) > policy.max_bytes:
        raise RefusedPickle(
            f"refused a {policy.what} of {len(data)} bytes: over the {policy.max_bytes}-byte limit"
        )
    if data.__class__ is not bytes:
        data = bytes(data)
    # One scan for all: ZODB pickles a record's class and state with one pickler, sharing its memo.
    end = _scan(data, policy, policy.budget(len(data)), count)
    if end != len(data):
        raise RefusedPickle(f"refused a {policy.what}: {len(data) - end} bytes after the last pickle")


def check_record(data: bytes, policy: PicklePolicy | None = None) -> None:
    """Refuse a ZODB record (a class pickle followed by a state pickle) that ``policy`` forbids."""
    check_pickle(data, policy or RECORD, count=2)


MiB = 1024 * 1024

#: Frames a server we start receives from a client: ``(msgid, async, method, args)`` of plain
#: values; ``tpc_begin`` carries the transaction's extension dict.
SERVER_WIRE = PicklePolicy("ZEO frame from a client", max_bytes=8 * MiB, max_depth=16, dicts=True)

#: Replies and calls a client receives from its server: also lists (oids) and dicts (get_info).
CLIENT_WIRE = PicklePolicy(
    "ZEO frame from the server", max_bytes=64 * MiB, max_depth=16, dicts=True, lists=True
)

#: ZODB records a client loads: instance dicts, persistent references; the class factory vets
#: the globals, so calls are allowed for the classes it lets through.
RECORD = PicklePolicy(
    "stored record",
    max_bytes=8 * MiB,
    max_depth=32,
    dicts=True,
    lists=True,
    calls=True,
    persistent_ids=True,
    globals=None,
)
