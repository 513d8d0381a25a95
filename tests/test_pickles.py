"""The bounded pickle checker: honest pickles pass, crafted ones are refused, and the fast scan
agrees with the plainly written reference (``tests/pickle_reference.py``) on every pickle tried.

The fast scan (``zchat_nb/pickles.py``) takes shortcuts: values as ints, a tuple of atoms made
without looking at its items one by one, a PUT after a value handled with that value. Each
shortcut has a crafted pickle below that tries to slip something through it.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
import struct
from collections.abc import Callable, Iterator

import pytest
import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from ZODB.MappingStorage import MappingStorage

from zchat_nb import ChatClient
from zchat_nb.pickles import (
    CLIENT_WIRE,
    RECORD,
    SERVER_WIRE,
    PicklePolicy,
    RefusedPickle,
    check_pickle,
    check_record,
)
from zchat_nb.security import CONFLICT_STATE

from . import pickle_reference
from .attacks import dag_pickle

POLICIES = {
    "record": RECORD,
    "server wire": SERVER_WIRE,
    "client wire": CLIENT_WIRE,
    "conflict": CONFLICT_STATE,
}
#: Small limits, so that random pickles often end right at them.
TIGHT = PicklePolicy(
    "tight", max_bytes=4096, max_depth=4, max_expanded_base=40, max_expanded_per_byte=1,
    dicts=True, lists=True, calls=True, persistent_ids=True, globals=None,
)  # fmt: skip
#: A budget of about one object per byte: memo references and calls soon exceed it.
SMALL = dataclasses.replace(TIGHT, what="small", max_depth=32, max_expanded_base=1)


def refusal(check: Callable[[], None]) -> str | None:
    try:
        check()
    except RefusedPickle as exc:
        return str(exc)
    return None


# -- honest pickles ------------------------------------------------------------------------------


def stored_records() -> Iterator[bytes]:
    """Every record of a database the model wrote: rooms, streams, buckets, amends, presence."""
    storage = MappingStorage()
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tree = conn.root()["big"] = OOBTree()  # big enough for inner nodes
    for i in range(3000):
        tree[(1.7e9 + i, f"{i:032x}")] = ("user", f"text {i}", 1.7e9 + i)
    tm.commit()
    conn.close()
    ticks = iter(range(1_000_000))
    alice = ChatClient(db, user="alice", clock=lambda: 1.7e9 + next(ticks))
    bob = ChatClient(db, user="bob", clock=lambda: 1.7e9 + next(ticks))
    try:
        chat, other = alice.session("general"), bob.session("general")
        sent = [chat.add_message(f"message {i} with *markdown* and é") for i in range(120)]
        other.add_message("@alice a reply", reply_to=sent[3])
        chat.edit(sent[5], "edited")
        chat.delete(sent[6])
        other.react(sent[7], "👍")
        alice.session("random").add_message("another room")
        for txn in storage.iterator():
            for record in txn:
                if record.data:
                    yield record.data
    finally:
        alice.close()
        bob.close()
        db.close()


@pytest.fixture(scope="module")
def records() -> list[bytes]:
    return list(stored_records())


def test_every_record_the_model_writes_passes(records: list[bytes]) -> None:
    assert len(records) > 50
    for data in records:
        check_record(data)
        pickle_reference.check_pickle(data, RECORD, count=2)


def test_bucket_states_pass_as_conflict_states(records: list[bytes]) -> None:
    buckets = [data for data in records if b"OOBucket" in data[:40]]
    assert buckets
    for data in buckets:
        check_record(data, CONFLICT_STATE)


WIRE = [
    (1, False, "register", ("1", False)),
    (2, False, "loadBefore", (b"\0" * 8, b"\xff" * 8)),
    (3, False, "tpc_begin", (7, "alice", "a send", {"zchat": "x", "n": 1})),
    (4, True, "storea", (b"\0" * 7 + b"\1", b"\0" * 8, b"record bytes" * 100, 7)),
    (5, False, ".reply", (b"data" * 50, b"\0" * 8, None)),
    (6, False, ".reply", {"size": 10, "length": 3, "supportsUndo": False, "interfaces": [("ZODB", "I")]}),
    (7, True, "invalidateTransaction", (b"\1" * 8, [b"\0" * 8, b"\1" * 8])),
]


@pytest.mark.parametrize("message", WIRE, ids=[m[2] for m in WIRE])
def test_zeo_frames_pass(message: tuple[object, ...]) -> None:
    policy = (
        SERVER_WIRE if isinstance(message[3], tuple) and not isinstance(message[3], dict) else CLIENT_WIRE
    )
    if any(isinstance(arg, list) for arg in message[3]):
        policy = CLIENT_WIRE
    for protocol in (3, 4, 5):
        check_pickle(pickle.dumps(message, protocol), policy)


# -- crafted pickles -----------------------------------------------------------------------------

PROTO = b"\x80\x03"
#: A list that is referred to (BINGET), then grown: the reference counted its smaller size.
GROWN_AFTER_GET = PROTO + b"]q\x00h\x00(K\x01K\x02e" + b"\x86."
CRAFTED = {
    # memo DAGs, through every way of making a tuple
    "dag plain": dag_pickle(64) + b".",
    "dag in a dict key": dag_pickle(64, "dict") + b".",
    "dag in a frozenset": dag_pickle(64, "frozenset") + b".",
    "dag by TUPLE3": PROTO + b")q\x000" + b"".join(
        b"h%ch%ch%c\x87q%c0" % (i, i, i, i + 1) for i in range(40)) + b"h\x28.",
    "dag by TUPLE": PROTO + b")q\x000" + b"".join(
        b"(h%ch%ct" % (i, i) + b"q%c0" % (i + 1) for i in range(40)) + b"h\x28.",
    "dag by DUP": PROTO + b")" + b"2\x86" * 64 + b".",
    "dag by LONG_BINGET": PROTO + b")r\x00\x00\x00\x000" + b"".join(
        b"j%sj%s\x86r%s0" % (struct.pack("<I", i), struct.pack("<I", i), struct.pack("<I", i + 1))
        for i in range(64)) + b"j" + struct.pack("<I", 64) + b".",
    "dag by a fused PUT": PROTO + b")q\x000" + b"".join(
        b"h%ch%c\x86q%c" % (i, i, i + 1) + b"0" for i in range(64)) + b"h\x40.",
    "dag by MEMOIZE": b"\x80\x04)\x94" + b"".join(b"h%ch%c\x86\x94" % (i, i) for i in range(64)) + b".",
    "dag in a list": PROTO + b"]q\x00" + b"".join(b"h\x00" for _ in range(200)) + b".",
    "dag in a persistent id": PROTO + b")q\x000" + b"".join(
        b"h%ch%c\x86q%c0" % (i, i, i + 1) for i in range(40)) + b"h\x28Q.",
    "dag as call arguments": PROTO + b"cmod\nf\nq\x00)q\x010" + b"".join(
        b"h%ch%c\x86q%c0" % (i + 1, i + 1, i + 2) for i in range(40)) + b"h\x00h\x29R.",
    "too deep": PROTO + b")" + b"\x85" * 100 + b".",
    "too deep by TUPLE": PROTO + b"(" * 100 + b")" + b"t" * 100 + b".",
    "too deep in a list": PROTO + b"]" * 40 + b"a" * 39 + b".",
    # mutating what is already referred to
    "a list grown after BINGET": GROWN_AFTER_GET,
    "a list grown after DUP": PROTO + b"]2(K\x01e\x86.",
    "a dict grown after BINGET": PROTO + b"}q\x00h\x00X\x01\x00\x00\x00aK\x01s\x86.",
    "an object built after BINGET": PROTO + b"cmod\nC\n)Rq\x00h\x00}b\x86.",
    "BUILD on an atom": PROTO + b"K\x01K\x02b.",
    "BUILD on a tuple": PROTO + b"K\x01\x85K\x02b.",
    "BUILD on a global": PROTO + b"cmod\nC\nK\x02b.",
    "APPENDS to a tuple": PROTO + b")(K\x01e.",
    "SETITEM on an atom": PROTO + b"K\x01X\x01\x00\x00\x00aK\x02s.",
    # dict keys
    "a tuple as a dict key": PROTO + b"}K\x01\x85K\x02s.",
    "a global as a dict key": PROTO + b"}cmod\nC\nK\x02s.",
    "a list as a dict key": PROTO + b"}]K\x02s.",
    "odd items for a dict": PROTO + b"}(K\x01u.",
    # the stack and the memo
    "a MARK memoized": PROTO + b"(q\x00K\x01t.",
    "a MARK memoized by a fused PUT": PROTO + b"(\x94K\x01t.",
    "BINGET of nothing": PROTO + b"h\x05.",
    "a MARK in a TUPLE2": PROTO + b"(K\x01\x86t.",
    "a MARK in a TUPLE1": PROTO + b"(\x85t.",
    "POP of a MARK": PROTO + b"K\x01(0.",
    "STOP with a MARK open": PROTO + b"(K\x01.",
    "two values at STOP": PROTO + b"K\x01K\x02.",
    "nothing at STOP": PROTO + b".",
    "TUPLE without MARK": PROTO + b"K\x01t.",
    "underflow": PROTO + b"\x86.",
    "REDUCE on a MARK": PROTO + b"cmod\nf\n(R.",
    # bytes
    "truncated": PROTO + b"X\x05\x00\x00\x00ab",
    "truncated length": PROTO + b"X\x05\x00",
    "truncated in a fused PUT": PROTO + b"K\x01q",
    "truncated in a fused LONG_BINPUT": PROTO + b"K\x01r\x00\x00",
    "huge length": PROTO + b"\x8d" + struct.pack("<Q", 2**63) + b"x.",
    "negative BINSTRING": PROTO + b"T\xff\xff\xff\xff.",
    "bytes after STOP": PROTO + b"K\x01.K",
    "an unknown opcode": PROTO + b"\xffK\x01.",
    "LONG4": PROTO + b"\x8b\x01\x00\x00\x00\x01.",
    "a set": b"\x80\x04\x8f(K\x01\x90.",
    "GLOBAL without lines": PROTO + b"cos",
    "INST": PROTO + b"(ios\nsystem\nX\x02\x00\x00\x00lsb.",
}  # fmt: skip


@pytest.mark.parametrize("name", CRAFTED)
def test_a_crafted_pickle_is_refused(name: str) -> None:
    data = CRAFTED[name]
    assert refusal(lambda: check_pickle(data, TIGHT if name.startswith("too deep") else RECORD)) is not None
    assert refusal(
        lambda: pickle_reference.check_pickle(data, RECORD if not name.startswith("too deep") else TIGHT)
    )


def test_a_crafted_pickle_leaves_the_next_check_alone(records: list[bytes]) -> None:
    # The first checker kept one shared value for every atom: BUILD on an atom grew it for good,
    # after which every honest record was refused as too big or deep.
    for _ in range(40):
        refusal(lambda: check_record(b"\x80\x03cmod\nC\nq\x00.\x80\x03K\x01K\x01b."))
    for data in records[:20]:
        check_record(data)


def test_policies_refuse_what_their_format_never_needs() -> None:
    lists = pickle.dumps([1, 2], 3)
    assert refusal(lambda: check_pickle(lists, SERVER_WIRE))
    check_pickle(lists, CLIENT_WIRE)
    calls = b"\x80\x03cmod\nf\n)R."
    assert refusal(lambda: check_pickle(calls, CLIENT_WIRE))
    assert "global" in (
        refusal(lambda: check_pickle(calls, dataclasses.replace(RECORD, globals=frozenset()))) or ""
    )
    persistent = b"\x80\x03K\x01Q."
    assert refusal(lambda: check_pickle(persistent, SERVER_WIRE))
    check_pickle(persistent, CONFLICT_STATE)


def test_a_policy_the_scan_cannot_keep_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PicklePolicy("bad", max_bytes=10, max_depth=0)
    with pytest.raises(ValueError, match="too large"):
        PicklePolicy("bad", max_bytes=2**40)


# -- the fast scan agrees with the reference -----------------------------------------------------


ATOMS = [
    b"N", b"\x88", b"K\x07", b"M\x01\x02", b"J\x01\x02\x03\x04", b"G" + b"\x00" * 8, b"X\x02\x00\x00\x00ab",
    b"\x8c\x01a", b"C\x02ab", b"U\x01a", b"T\x01\x00\x00\x00a", b"\x8a\x01\x05", b"B\x01\x00\x00\x00a",
]  # fmt: skip
ANY_OP = b"N)](}q\x94h2013\x85\x86\x87tlaesudRb\x81Q."


def random_pickle(rng: random.Random) -> bytes:
    """A pickle made by following a model of the stack, with a wrong opcode now and then.

    About half pass; the others stop at a limit (depth, expanded size, a grown shared list, a
    non-atom key) or at the wrong opcode.
    """
    out = bytearray(rng.choice([b"\x80\x03", b"\x80\x04", b"\x80\x02"]))
    stack: list[str] = []  # a atom, g global, t tuple, l list, d dict, o object, M mark
    puts = 0

    def top(n: int) -> bool:  # n values above the last MARK
        return len(stack) >= n and "M" not in stack[len(stack) - n :]

    for _ in range(rng.randrange(1, 50)):
        roll = rng.random()
        if roll < 0.03:
            out += bytes([rng.choice(ANY_OP)])
            break
        if roll < 0.30:
            kind = rng.choice("aaaaagtldM")
            out += {"a": rng.choice(ATOMS), "g": b"cmod\nC\n", "t": b")", "l": b"]", "d": b"}", "M": b"("}[
                kind
            ]
            stack.append(kind)
        elif roll < 0.42 and top(1):
            out += b"q%c" % puts if puts < 256 else b"r" + struct.pack("<I", puts)
            puts += 1
        elif roll < 0.55 and puts:
            index = rng.randrange(puts)
            out += b"h%c" % index if index < 256 else b"j" + struct.pack("<I", index)
            stack.append("t")
        elif roll < 0.58 and top(1):
            out += b"2"
            stack.append(stack[-1])
        elif roll < 0.72 and top(1):
            n = rng.choice([n for n in (1, 2, 3) if top(n)])
            out += b"\x84\x85\x86\x87"[n : n + 1]
            del stack[len(stack) - n :]
            stack.append("t")
        elif roll < 0.80 and "M" in stack:
            mark = len(stack) - 1 - stack[::-1].index("M")
            below = stack[mark - 1] if mark else ""
            op = b"t"
            if below == "l" and rng.random() < 0.7:
                op = b"e"
            elif below == "d" and rng.random() < 0.7:
                op = b"u"
            elif rng.random() < 0.2:
                op = rng.choice([b"l", b"d", b"1"])
            out += op
            del stack[mark:]
            if op in (b"t", b"l", b"d"):
                stack.append({b"t": "t", b"l": "l", b"d": "d"}[op])
        elif roll < 0.85 and top(2) and stack[-2] in "lo":
            out += b"a" if stack[-2] == "l" else b"b"
            stack.pop()
        elif roll < 0.88 and top(3) and stack[-3] == "d":
            out += b"s"
            del stack[-2:]
        elif roll < 0.93 and top(2):
            out += rng.choice([b"R", b"\x81"])
            del stack[-2:]
            stack.append("o")
        elif top(1):
            out += rng.choice([b"Q", b"0"])
            if out[-1:] == b"0":
                stack.pop()
            else:
                stack[-1] = "t"
    while "M" in stack:
        mark = len(stack) - 1 - stack[::-1].index("M")
        out += b"t"
        del stack[mark:]
        stack.append("t")
    if len(stack) != 1:
        out[2:2] = b"("
        out += b"t"
    return bytes(out + b".")


def mutated(data: bytes, rng: random.Random) -> bytes:
    pos = rng.randrange(len(data))
    how = rng.randrange(3)
    if how == 0:
        return data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1 :]
    if how == 1:
        return data[:pos]
    return data[:pos] + data[rng.randrange(len(data)) :]


@pytest.mark.parametrize("policy", [TIGHT, SMALL, *POLICIES.values()], ids=["tight", "small", *POLICIES])
def test_the_fast_scan_agrees_with_the_reference_on_random_pickles(policy: PicklePolicy) -> None:
    rng = random.Random(8)
    outcomes = {"passed": 0, "refused": 0}
    for _ in range(4000):
        data = random_pickle(rng)
        fast = refusal(lambda: check_pickle(data, policy))  # noqa: B023
        reference = refusal(lambda: pickle_reference.check_pickle(data, policy))  # noqa: B023
        assert (fast is None) == (reference is None), (data, fast, reference)
        outcomes["refused" if fast else "passed"] += 1
    assert min(outcomes.values()) > 200, outcomes


def test_the_fast_scan_agrees_with_the_reference_on_mutated_records(records: list[bytes]) -> None:
    rng = random.Random(11)
    samples = [data for data in records if len(data) < 5000]
    seeds = samples + list(CRAFTED.values())
    for _ in range(3000):
        data = mutated(rng.choice(seeds), rng)
        for policy in (RECORD, TIGHT, SMALL):
            fast = refusal(lambda: check_pickle(data, policy, count=2))  # noqa: B023
            reference = refusal(lambda: pickle_reference.check_pickle(data, policy, count=2))  # noqa: B023
            assert (fast is None) == (reference is None), (data, fast, reference)
