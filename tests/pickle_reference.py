"""The pickle checker as it was first written: slow, plainly readable, and the specification that
:mod:`zchat_nb.pickles`' fast scan must agree with (``tests/test_pickles.py`` compares the two).

One value object per stack entry, a generator of ``(opcode name, argument)``; a global counts as
two objects and BUILD needs a call's result as its target, as in the fast scan.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from zchat_nb.pickles import PicklePolicy, RefusedPickle


class _Value:
    """A value on the simulated stack: its expanded size, nesting depth and kind."""

    __slots__ = ("atom", "depth", "mutable", "shared", "size")

    def __init__(self, size: int, depth: int, *, atom: bool = False, mutable: bool = False) -> None:
        self.size = size
        self.depth = depth
        self.atom = atom
        self.mutable = mutable
        self.shared = False  # referred to from the memo (GET) or DUP: its size is counted elsewhere too


_MARK = _Value(0, 0)
#: Every atom is the same: size 1, depth 0, never grown (so sharing one is safe).
_ATOM = _Value(1, 0, atom=True)

_ATOMS = frozenset(
    {
        "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
        "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
        "SHORT_BINSTRING", "BINSTRING",
    }
)  # fmt: skip
_TUPLE_N = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_PUTS = frozenset({"BINPUT", "LONG_BINPUT", "MEMOIZE"})
_GETS = frozenset({"BINGET", "LONG_BINGET"})


# -- a lean opcode walker: pickletools.genops decodes every argument, about 5x slower -------------

#: Opcodes whose argument has a fixed size (bytes to skip or read).
_FIXED = {
    b"\x80"[0]: ("PROTO", 1), b"\x95"[0]: ("FRAME", 8), b"."[0]: ("STOP", 0), b"N"[0]: ("NONE", 0),
    b"\x88"[0]: ("NEWTRUE", 0), b"\x89"[0]: ("NEWFALSE", 0), b"J"[0]: ("BININT", 4),
    b"K"[0]: ("BININT1", 1), b"M"[0]: ("BININT2", 2), b"G"[0]: ("BINFLOAT", 8),
    b")"[0]: ("EMPTY_TUPLE", 0), b"\x85"[0]: ("TUPLE1", 0), b"\x86"[0]: ("TUPLE2", 0),
    b"\x87"[0]: ("TUPLE3", 0), b"t"[0]: ("TUPLE", 0), b"("[0]: ("MARK", 0), b"q"[0]: ("BINPUT", 1),
    b"r"[0]: ("LONG_BINPUT", 4), b"\x94"[0]: ("MEMOIZE", 0), b"h"[0]: ("BINGET", 1),
    b"j"[0]: ("LONG_BINGET", 4), b"2"[0]: ("DUP", 0), b"0"[0]: ("POP", 0), b"1"[0]: ("POP_MARK", 0),
    b"}"[0]: ("EMPTY_DICT", 0), b"d"[0]: ("DICT", 0), b"s"[0]: ("SETITEM", 0),
    b"u"[0]: ("SETITEMS", 0), b"]"[0]: ("EMPTY_LIST", 0), b"l"[0]: ("LIST", 0),
    b"a"[0]: ("APPEND", 0), b"e"[0]: ("APPENDS", 0), b"Q"[0]: ("BINPERSID", 0),
    b"R"[0]: ("REDUCE", 0), b"\x81"[0]: ("NEWOBJ", 0), b"b"[0]: ("BUILD", 0),
}  # fmt: skip
#: Opcodes followed by a little-endian length of this many bytes, then that many bytes.
_SIZED = {
    b"\x8c"[0]: ("SHORT_BINUNICODE", 1), b"X"[0]: ("BINUNICODE", 4), b"\x8d"[0]: ("BINUNICODE8", 8),
    b"C"[0]: ("SHORT_BINBYTES", 1), b"B"[0]: ("BINBYTES", 4), b"\x8e"[0]: ("BINBYTES8", 8),
    b"U"[0]: ("SHORT_BINSTRING", 1), b"T"[0]: ("BINSTRING", 4), b"\x8a"[0]: ("LONG1", 1),
}  # fmt: skip
_INDEXED = frozenset({"BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"})


class _Ops:
    """Iterate ``(name, arg)`` over one pickle of ``data`` from ``pos``; ``pos`` ends past STOP."""

    def __init__(self, data: bytes | bytearray | memoryview, pos: int, refuse: Any) -> None:
        self.data = bytes(data)
        self.pos = pos
        self.refuse = refuse

    def __iter__(self) -> Iterator[tuple[str, object]]:
        data, end = self.data, len(self.data)
        pos = self.pos
        while pos < end:
            code = data[pos]
            pos += 1
            fixed = _FIXED.get(code)
            if fixed is not None:
                name, width = fixed
                if pos + width > end:
                    break
                arg = int.from_bytes(data[pos : pos + width], "little") if name in _INDEXED else None
                pos += width
                self.pos = pos
                yield name, arg
                if name == "STOP":
                    return
                continue
            sized = _SIZED.get(code)
            if sized is not None:
                name, width = sized
                size = int.from_bytes(data[pos : pos + width], "little", signed=name == "BINSTRING")
                pos += width + size
                if size < 0 or pos > end:
                    break
                self.pos = pos
                yield name, None
                continue
            if code == b"c"[0]:
                first = data.find(b"\n", pos, pos + 256)
                second = data.find(b"\n", first + 1, first + 257) if first >= 0 else -1
                if second < 0:
                    raise self.refuse("GLOBAL without two lines")
                module = data[pos:first].decode("ascii", "replace")
                qualname = data[first + 1 : second].decode("ascii", "replace")
                pos = second + 1
                self.pos = pos
                yield "GLOBAL", f"{module} {qualname}"
                continue
            raise self.refuse(f"opcode {bytes([code])!r} at {pos - 1} is not allowed here")
        raise self.refuse("it is truncated (no STOP)")


class _Scan:
    """One pass over one pickle (up to its STOP), keeping the expanded-size books."""

    def __init__(self, policy: PicklePolicy, budget: int) -> None:
        self.policy = policy
        self.budget = budget
        self.work = 0  # expanded sizes of everything traversed while building (GETs, keys, calls)
        self.stack: list[_Value] = []
        self.memo: dict[int, _Value] = {}

    def refuse(self, why: str) -> RefusedPickle:
        return RefusedPickle(f"refused a {self.policy.what}: {why}")

    def pop(self) -> _Value:
        if not self.stack or self.stack[-1] is _MARK:
            raise self.refuse("stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[_Value]:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index] is _MARK:
                items = self.stack[index + 1 :]
                del self.stack[index:]
                return items
        raise self.refuse("no MARK on the stack")

    def container(self, items: list[_Value]) -> _Value:
        size, depth = 1, 0
        for item in items:
            size += item.size
            if item.depth > depth:
                depth = item.depth
        value = _Value(size, depth + 1)
        if size > self.budget or depth >= self.policy.max_depth:
            self.check_value(value)
        return value

    def check_value(self, value: _Value) -> None:
        if value.size > self.budget:
            raise self.refuse(f"it expands to more than {self.budget} objects (memo references)")
        if value.depth > self.policy.max_depth:
            raise self.refuse(f"it nests deeper than {self.policy.max_depth} levels")

    def charge(self, size: int) -> None:
        self.work += size
        if self.work > self.budget:
            raise self.refuse(f"building it traverses more than {self.budget} objects")

    def grow(self, target: _Value, items: list[_Value], *, keys: bool) -> None:
        """APPENDS/SETITEMS/BUILD into ``target``, which nothing may refer to yet."""
        if not target.mutable:
            raise self.refuse("adds items to something that is not a list or dict")
        if target.shared:
            raise self.refuse("adds items to a list or dict that is already referred to")
        if keys:
            if len(items) % 2:
                raise self.refuse("odd number of items for a dict")
            for key in items[::2]:
                if not key.atom:
                    raise self.refuse("a dict key is not a str, bytes or number")
                self.charge(key.size)
        target.size += sum(item.size for item in items)
        target.depth = max(target.depth, 1 + max((item.depth for item in items), default=0))
        self.check_value(target)

    def run(self, ops: Iterable[tuple[str, object]]) -> None:
        policy = self.policy
        for name, arg in ops:
            if name in _ATOMS:
                self.stack.append(_ATOM)
            elif name in _TUPLE_N:
                n = _TUPLE_N[name]
                items = [self.pop() for _ in range(n)][::-1]
                self.stack.append(self.container(items))
            elif name == "TUPLE":
                self.stack.append(self.container(self.pop_mark()))
            elif name == "MARK":
                self.stack.append(_MARK)
            elif name in _PUTS:
                if not self.stack or self.stack[-1] is _MARK:
                    raise self.refuse("memoizes nothing")
                key = len(self.memo) if name == "MEMOIZE" else int(arg)  # type: ignore[call-overload]
                self.memo[key] = self.stack[-1]
            elif name in _GETS or name == "DUP":
                if name == "DUP":
                    value = self.stack[-1] if self.stack and self.stack[-1] is not _MARK else None
                else:
                    value = self.memo.get(int(arg))  # type: ignore[call-overload]
                if value is None:
                    raise self.refuse(f"{name} of nothing")
                value.shared = True
                self.charge(value.size)
                self.stack.append(value)
            elif name == "POP":
                self.pop()
            elif name == "POP_MARK":
                self.pop_mark()
            elif name in ("PROTO", "FRAME"):
                pass
            elif name == "STOP":
                if len(self.stack) != 1 or self.stack[0] is _MARK:
                    raise self.refuse("it does not end with exactly one value")
                self.check_value(self.stack.pop())
                return
            elif name in ("EMPTY_DICT", "DICT") and policy.dicts:
                value = _Value(1, 1, mutable=True)
                if name == "DICT":
                    self.grow(value, self.pop_mark(), keys=True)
                self.stack.append(value)
            elif name in ("SETITEM", "SETITEMS") and policy.dicts:
                items = [self.pop(), self.pop()][::-1] if name == "SETITEM" else self.pop_mark()
                self.grow(self.stack[-1] if self.stack else _MARK, items, keys=True)
            elif name in ("EMPTY_LIST", "LIST") and policy.lists:
                value = _Value(1, 1, mutable=True)
                if name == "LIST":
                    self.grow(value, self.pop_mark(), keys=False)
                self.stack.append(value)
            elif name in ("APPEND", "APPENDS") and policy.lists:
                items = [self.pop()] if name == "APPEND" else self.pop_mark()
                self.grow(self.stack[-1] if self.stack else _MARK, items, keys=False)
            elif name == "GLOBAL":
                module, _, qualname = str(arg).partition(" ")
                if policy.globals is not None and (module, qualname) not in policy.globals:
                    raise self.refuse(f"global {module}.{qualname} is not allowed here")
                self.stack.append(_Value(2, 0))  # a global counts as two objects
            elif name == "BINPERSID" and policy.persistent_ids:
                pid = self.pop()
                self.charge(pid.size)
                self.stack.append(_Value(1 + pid.size, 1 + pid.depth))
            elif name in ("REDUCE", "NEWOBJ") and policy.calls:
                args, func = self.pop(), self.pop()
                self.charge(args.size)
                # The result may be anything the callable makes of args (a class factory vets it).
                value = _Value(1 + args.size + func.size, 1 + args.depth, mutable=True)
                self.check_value(value)
                self.stack.append(value)
            elif name == "BUILD" and policy.calls:
                state = self.pop()
                self.charge(state.size)
                target = self.stack[-1] if self.stack else _MARK
                if not target.mutable:
                    raise self.refuse("sets the state of something that is not an object")
                if target.shared:
                    raise self.refuse("sets the state of an object that is already referred to")
                target.size += state.size
                target.depth = max(target.depth, 1 + state.depth)
                self.check_value(target)
            else:
                raise self.refuse(f"opcode {name} is not allowed here")
        raise self.refuse("it ends without STOP")


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
    # One scan for all: ZODB pickles a record's class and state with one pickler, sharing its memo.
    scan = _Scan(policy, policy.budget(len(data)))
    ops = _Ops(data, 0, scan.refuse)
    for _ in range(count):
        scan.run(ops)
    if ops.pos != len(data):
        raise RefusedPickle(f"refused a {policy.what}: {len(data) - ops.pos} bytes after the last pickle")
