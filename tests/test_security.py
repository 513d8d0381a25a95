"""Allow-lists: crafted records run nothing in readers; crafted wire messages run nothing in servers."""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import transaction
import ZEO
from BTrees.OOBTree import OOBTree
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError

import zchat_nb
from zchat_nb.model import ROOMS_KEY

from .attacks import overwrite, recv_exactly
from .helpers import ServerProcess

pytestmark = pytest.mark.integration


class Payload:
    """Pickles as a call of ``func(arg)``: what an attacker would store."""

    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (self.func, (self.arg,))


def payloads(marker: Path) -> list[Payload]:
    return [
        Payload(os.system, f"touch {marker}"),
        Payload(eval, f"open({str(marker)!r}, 'w').close()"),
    ]


@pytest.mark.parametrize("which", ["os.system", "builtins.eval"])
def test_crafted_record_runs_nothing_in_a_reader(server: zchat_nb.Server, tmp_path: Path, which: str) -> None:
    marker = tmp_path / "pwned"
    payload = payloads(marker)[0 if which == "os.system" else 1]
    with zchat_nb.connect(server.address, user="alice") as client:
        chat = client.session("general")
        chat.add_message("a real message")
        assert len(chat.new_messages()) == 1
        tm, conn = client.connection()
        tm.begin()
        stream = conn.root()[ROOMS_KEY]["general"].streams[client.writer]
        stream_oid, key = stream._p_oid, stream.maxKey()
        tm.abort()
        # The stream rewritten by "another client": a value that calls the payload when unpickled.
        crafted = pickle.dumps(OOBTree, 3) + pickle.dumps((((key, payload),),), 3)
        overwrite(server.address, stream_oid, crafted)

        with zchat_nb.connect(server.address, user="bob") as reader_client:
            reader = reader_client.session("general")
            assert reader.new_messages() == []
            assert not marker.exists()
            assert reader.skipped, "the unreadable record was not reported"
            _where, reason = reader.skipped[0]
            assert "UnsafeRecordError" in reason and "allow-list" in reason
            # The reader still works for everything it can read.
            other = reader_client.session("general", backlog=0)
            assert other.new_messages() == []  # its cursor starts here, at the end
            reader.add_message("bob still chats")
            assert [m.text for m in other.new_messages(timeout=5)] == ["bob still chats"]
    assert not marker.exists()


def test_default_class_factory_would_have_run_it(tmp_path: Path) -> None:
    """The control: without the allow-list the same kind of record does run code."""
    marker = tmp_path / "ran"
    data = pickle.dumps(Payload(os.system, f"touch {marker}"), 3)
    pickle.loads(data)
    assert marker.exists()


def zeo_handshake(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    (size,) = struct.unpack(">I", recv_exactly(sock, 4))
    server_protocol = recv_exactly(sock, size)
    assert server_protocol.startswith(b"Z")
    send_frame(sock, server_protocol)  # a client answers with the protocol it speaks
    return sock


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


@pytest.mark.parametrize("which", ["os.system", "builtins.eval"])
def test_crafted_protocol_message_runs_nothing_in_the_server(
    server: zchat_nb.Server, tmp_path: Path, which: str
) -> None:
    marker = tmp_path / "server-pwned"
    payload = payloads(marker)[0 if which == "os.system" else 1]
    sock = zeo_handshake(server.address)
    # (msgid, async flag, method, args): the args carry the payload, before any registration.
    send_frame(sock, pickle.dumps((1, False, "register", (payload,)), 3))
    sock.settimeout(10)
    try:
        leftover = sock.recv(1024)  # the server drops the connection instead of running it
    except (ConnectionError, TimeoutError):
        leftover = b""
    finally:
        sock.close()
    assert not marker.exists()
    assert leftover == b""
    with zchat_nb.connect(server.address, user="still-fine") as client:  # the server is unharmed
        client.session().add_message("ok")


def test_crafted_conflict_state_runs_nothing_and_stays_a_conflict(
    file_server: zchat_nb.Server, tmp_path: Path
) -> None:
    marker = tmp_path / "resolver-pwned"
    db = ZEO.DB(file_server.address)
    try:
        tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
        c1, c2 = db.open(tm1), db.open(tm2)
        tm1.begin()
        c1.root()["tree"] = OOBTree({"a": 1})
        tm1.commit()
        tm1.begin()
        tm2.begin()
        oid = c1.root()["tree"]._p_oid
        serial = c2.root()["tree"]._p_serial
        c1.root()["tree"]["b"] = 2
        tm1.commit()
        # A stale write of the same tree whose state calls os.system when the server unpickles it.
        crafted = pickle.dumps(OOBTree, 3) + pickle.dumps(
            ((("c", Payload(os.system, f"touch {marker}")),),), 3
        )
        storage = db.storage
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(oid, serial, crafted, "", txn)
        with pytest.raises(ConflictError):
            storage.tpc_vote(txn)
        storage.tpc_abort(txn)
        assert not marker.exists()
    finally:
        db.close()


def test_concurrent_inserts_still_merge_on_a_hardened_server(file_server: zchat_nb.Server) -> None:
    db = ZEO.DB(file_server.address)
    try:
        tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
        c1, c2 = db.open(tm1), db.open(tm2)
        tm1.begin()
        c1.root()["tree"] = OOBTree()
        tm1.commit()
        tm1.begin()
        tm2.begin()
        c1.root()["tree"]["from one"] = 1
        c2.root()["tree"]["from two"] = 2
        tm1.commit()
        tm2.commit()  # resolved on the server by BTrees' _p_resolveConflict: no ConflictError
        tm1.begin()
        assert dict(c1.root()["tree"]) == {"from one": 1, "from two": 2}
    finally:
        db.close()


def test_a_stock_zeo_server_would_have_run_it(tmp_path: Path) -> None:
    """The control for the test above: plain runzeo decodes the same frame and runs the payload."""
    marker = tmp_path / "stock-pwned"
    with ServerProcess(tmp_path / "stock.fs", kind="runzeo") as stock:
        sock = zeo_handshake(stock.address)
        payload = Payload(eval, f"open({str(marker)!r}, 'w').close()")
        send_frame(sock, pickle.dumps((1, False, "register", (payload,)), 3))
        sock.settimeout(10)
        with contextlib.suppress(ConnectionError, TimeoutError):
            sock.recv(1024)
        sock.close()
    assert marker.exists()


# -- the frames a client accepts without the full check ------------------------------------------

_OID, _TID = b"\x00" * 7 + b"\x07", b"\x03\xe5" + b"\x7f" * 6


def _server_frame(*message: object) -> bytes:
    from ZEO.asyncio.marshal import encoder

    return encoder(b"Z5", True)(*message)


def _reply(data: bytes, end: bytes | None = _TID, flag: object = 0) -> bytes:
    """A load's answer, as ZEO's server sends it (``0``: not async; a client would say ``False``)."""
    return _server_frame((_OID, _TID), flag, ".reply", (data, _TID, end))


def _invalidation(count: int) -> bytes:
    return _server_frame(0, True, "invalidateTransaction", (_TID, [_OID] * count))


def _pushed(data: bytes) -> bytes:
    """A state the server pushes ahead of an invalidation (``GuardedStorageServer.invalidate``)."""
    return _server_frame(0, True, "zchat_pushed", (_TID, _OID, data))


def _answer(msgid: int, value: object) -> bytes:
    """The server's answer to a call (a vote's ``[]``, a finish's tid)."""
    return _server_frame(msgid, 0, ".reply", value)


def _info(length: int, size: int) -> bytes:
    """What the server sends a client after its commit."""
    return _server_frame(0, True, "info", ({"length": length, "size": size},))


#: The frames a send brings its client, with message ids and sizes of each width ZEO writes.
_COMMIT_FRAMES = [
    _answer(7, []),
    _answer(300, _TID),
    _answer(70_000, None),
    _answer(2**31 - 1, []),
    _info(7, 9_000),
    _info(300, 70_000),
    _info(70_000, 2**31 - 1),
]


@pytest.mark.parametrize(
    "frame",
    [
        _reply(b"r" * 40),
        _reply(b"r" * 40, None),
        _reply(b""),
        _reply(b"r" * 3000),
        _reply(b"r" * 40, flag=False),
        *map(_invalidation, (0, 1, 3, 1001)),
        _pushed(b"p" * 40),
        _pushed(b"p" * 3000),
        *_COMMIT_FRAMES,
    ],
    ids=[
        *["reply", "last", "empty", "long", "false", "inv0", "inv1", "inv3", "inv1001"],
        *["pushed", "pushed-long"],
        *["vote", "finish", "none", "id4", "info1", "info2", "info4"],
    ],
)
def test_the_frames_of_a_delivery_or_a_send_skip_the_full_check(frame: bytes) -> None:
    from zchat_nb.pickles import CLIENT_WIRE, check_pickle
    from zchat_nb.security import _decode_server_frame, is_plain_server_frame

    assert is_plain_server_frame(frame)
    check_pickle(frame, CLIENT_WIRE)  # which would have let it through too
    # A plain frame is unpickled by C's pickle.loads: the same value as the checked decoder's.
    assert pickle.loads(frame) == _decode_server_frame(frame)


@pytest.mark.parametrize(
    "frame",
    [
        _reply(b"r" * 20),
        _reply(b"r" * 300, None),
        _reply(b"r" * 20, flag=False),
        _invalidation(2),
        _pushed(b"p" * 20),
        _pushed(b"p" * 300),
        _answer(7, []),
        _answer(300, _TID),
        _info(7, 70_000),
    ],
    ids=["short", "long", "false", "inv", "pushed", "pushed-long", "vote", "finish", "info"],
)
def test_no_one_byte_change_of_a_plain_frame_gets_past_the_full_check_unchecked(frame: bytes) -> None:
    """What the match lets through, the full check lets through as well: it is never looser."""
    from zchat_nb.pickles import CLIENT_WIRE, RefusedPickle, check_pickle
    from zchat_nb.security import _decode_server_frame, is_plain_server_frame

    looser = []
    variants = [frame[:cut] for cut in range(len(frame))] + [frame + b"."]
    for pos in range(len(frame)):
        variants += [frame[:pos] + bytes([value]) + frame[pos + 1 :] for value in range(256)]
    for variant in variants:
        if is_plain_server_frame(variant):
            try:
                check_pickle(variant, CLIENT_WIRE)
            except RefusedPickle:
                looser.append(variant)
                continue
            # The client unpickles it with pickle.loads instead of the checked decoder: same outcome.
            if _outcome(pickle.loads, variant) != _outcome(_decode_server_frame, variant):
                looser.append(variant)
    assert looser == []


def _outcome(decode: Callable[[bytes], object], frame: bytes) -> tuple[bool, object]:
    try:
        return True, decode(frame)
    except Exception:
        return False, None


def test_a_frame_naming_a_global_is_not_plain() -> None:
    from zchat_nb.security import is_plain_server_frame

    frame = _reply(b"r" * 20).replace(b"C\x08" + _TID, b"cbuiltins\neval\n", 1)
    assert not is_plain_server_frame(frame)
    assert not is_plain_server_frame(bytearray(_reply(b"r")))
