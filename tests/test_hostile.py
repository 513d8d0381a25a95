"""Hostile peers against a real server: each attack, then an honest pair of clients is still served.

Every attack is bounded in time (socket timeouts, deadlines) and stays on 127.0.0.1. A server
frozen by an attack would fail the deadline, not hang the suite: the wire attacks run against
``zchat-nb serve`` in a child process (see ``server_process`` in conftest).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import threading
from pathlib import Path

import pytest
import ZEO
from BTrees.Length import Length
from ZEO.Exceptions import ClientDisconnected
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError, StorageTransactionError
from ZODB.utils import load_current, p64, z64

import zchat_nb
from zchat_nb.guard import ServerLimits, peer_of
from zchat_nb.model import ROOMS_KEY

from .attacks import RawPeer, call, dag_frame, dag_pickle, frame, honest_pair_works, rss_bytes
from .conftest import ServerProcess

pytestmark = pytest.mark.integration

DEPTH = 64  # 2**64 tuples: a stock ZEO server never finishes hashing it


@pytest.mark.parametrize("wrap", ["frozenset", "dict", "plain"])
def test_a_memo_dag_frame_before_login_is_refused(server_process: ServerProcess, wrap: str) -> None:
    peer = RawPeer(server_process.address)
    peer.hello()
    peer.send(frame(dag_frame(DEPTH, wrap, "register")))
    assert peer.closed_by_server(timeout=10), "the server did not drop the DAG frame's sender"
    peer.close()
    honest_pair_works(server_process.address)


@pytest.mark.parametrize("wrap", ["frozenset", "dict", "plain"])
def test_a_memo_dag_as_a_call_argument_is_refused(server_process: ServerProcess, wrap: str) -> None:
    peer = RawPeer(server_process.address)
    peer.register()
    peer.send(frame(dag_frame(DEPTH, wrap, "loadBefore")))
    assert peer.closed_by_server(timeout=10)
    peer.close()
    honest_pair_works(server_process.address)


def raw_commit(address: object, oid: bytes, data: bytes, **tpc_begin: object) -> None:
    storage = ZEO.client(address, wait_timeout=10)
    try:
        serial = load_current(storage, oid)[1]
        txn = TransactionMetaData()
        storage.tpc_begin(txn, **tpc_begin)
        storage.store(oid, serial, data, "", txn)
        storage.tpc_vote(txn)
        storage.tpc_finish(txn)
    finally:
        storage.close()


@pytest.mark.parametrize("tid", [b"\xff" * 8, p64(1)])
def test_a_client_chosen_tid_is_refused(server_process: ServerProcess, tid: bytes) -> None:
    honest_pair_works(server_process.address)
    storage = ZEO.client(server_process.address, wait_timeout=10)
    root = load_current(storage, z64)[0]
    storage.close()
    # tpc_begin is an asynchronous call: the server's refusal is to close the connection.
    with pytest.raises((ClientDisconnected, ConflictError)):
        raw_commit(server_process.address, z64, root, tid=tid)
    with zchat_nb.connect(server_process.address, user="judge") as client:
        assert client.db.storage.lastTransaction() not in (tid, b"\xff" * 8)
    honest_pair_works(server_process.address)
    # ... also after a restart: nothing bad was written to the file.
    server_process.kill()
    server_process.start()
    honest_pair_works(server_process.address)


@pytest.mark.parametrize(
    "method, args",
    [
        ("restorea", (z64, z64, b"x", None, 1)),
        ("undoa", (z64, 1)),
        ("undoLog", (0, 10)),
        ("iterator_start", (None, None)),
        ("history", (z64, 10)),
        ("loadSerial", (z64, z64)),
        ("storeBlobShared", (z64, z64, b"x", "/tmp/planted", 1)),
    ],
)
def test_copying_undo_history_and_shared_blob_methods_are_gone(
    server_process: ServerProcess, method: str, args: tuple[object, ...]
) -> None:
    peer = RawPeer(server_process.address)
    peer.register()
    peer.send(call(7, method, *args))
    assert peer.closed_by_server(timeout=10)
    peer.close()
    honest_pair_works(server_process.address)


def test_pack_is_still_offered(server_process: ServerProcess) -> None:
    with zchat_nb.connect(server_process.address, user="teacher") as client:
        client.session().add_message("to be packed")
        client.db.pack(days=0)
    honest_pair_works(server_process.address)


def test_a_stalled_vote_loses_the_commit_lock_and_honest_sends_go_through() -> None:
    limits = ServerLimits(commit_lock_timeout=2.0)
    with zchat_nb.serve(limits=limits) as server:
        honest_pair_works(server.address)
        # The attacker votes and then says nothing, holding the commit lock.
        storage = ZEO.client(server.address, wait_timeout=10)
        try:
            root, serial = load_current(storage, z64)
            txn = TransactionMetaData()
            storage.tpc_begin(txn)
            storage.store(z64, serial, root, "", txn)
            storage.tpc_vote(txn)
            # The lock is held now; an honest send must finish well within its own 10 s timeout.
            # (a stuck vote would raise ZChatSendError, or hang past the deadline of the suite).
            with zchat_nb.connect(server.address, user="carol", timeout=10) as honest:
                honest.session().add_message("not blocked for long")
            assert server.status()["waiting"] == 0
            with pytest.raises((ClientDisconnected, StorageTransactionError)):
                storage.tpc_finish(txn)  # the stalled transaction was aborted
        finally:
            storage.close()
        honest_pair_works(server.address)


def test_a_dag_in_a_conflict_state_stays_a_conflict(file_server: zchat_nb.Server) -> None:
    with zchat_nb.connect(file_server.address, user="alice") as client:
        chat = client.session("general")
        chat.add_message("first")
        tm, conn = client.connection()
        tm.begin()
        conn.root()["counter"] = Length()  # an object the server resolves conflicts of
        tm.commit()
        tm.begin()
        length = conn.root()["counter"]
        oid, serial = length._p_oid, length._p_serial
        length.change(1)
        tm.commit()  # the Length moves on, the attacker's serial is now old
        chat.add_message("second")
    # A Length state that is a DAG, stored against the old serial: the server tries to resolve it.
    crafted = pickle.dumps(type(length), 3) + dag_pickle(DEPTH, "plain")[0:] + b"."
    storage = ZEO.client(file_server.address, wait_timeout=10)
    try:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(oid, serial, crafted, "", txn)
        with pytest.raises(ConflictError):
            storage.tpc_vote(txn)
        storage.tpc_abort(txn)
    finally:
        storage.close()
    honest_pair_works(file_server.address)


def big_record_oid(address: object) -> bytes:
    """Store a message of 900 kB; return the oid of the stream record that holds it."""
    with zchat_nb.connect(address, user="alice", max_text_bytes=1_000_000) as client:
        client.session().add_message("x" * 900_000)
        tm, conn = client.connection()
        tm.begin()
        oid: bytes = conn.root()[ROOMS_KEY]["general"].streams[client.writer]._p_oid
        tm.abort()
        return oid


def pipeline_loads(peer: RawPeer, oid: bytes, count: int = 400) -> None:
    """Ask for ``oid`` ``count`` times and read none of the replies."""
    loads = b"".join(call(100 + i, "loadBefore", oid, b"\xff" * 8) for i in range(count))
    peer.sock.settimeout(10)
    with contextlib.suppress(OSError):  # closed by the server already
        peer.send(loads)


def test_pipelined_loads_without_reading_cost_bounded_memory(server_process: ServerProcess) -> None:
    oid = big_record_oid(server_process.address)
    assert server_process.proc is not None
    pid = server_process.proc.pid
    before = rss_bytes(pid)
    peers = [RawPeer(server_process.address) for _ in range(3)]
    for peer in peers:
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.register()
        pipeline_loads(peer, oid)
    # Served while the attackers are still connected, reading nothing.
    honest_pair_works(server_process.address)
    grown = rss_bytes(pid) - before
    for peer in peers:
        peer.close()
    # Stock ZEO: 400 replies of 900 kB queued per peer (about 1 GB in all).
    assert grown < 150 * 1024 * 1024, f"server RSS grew {grown} bytes"


def test_a_peer_that_never_reads_its_replies_is_disconnected() -> None:
    with zchat_nb.serve(limits=ServerLimits(unread_timeout=1.0)) as server:
        oid = big_record_oid(server.address)
        peer = RawPeer(server.address)
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.register()
        pipeline_loads(peer, oid)
        assert peer.closed_by_server(timeout=15)
        peer.close()
        honest_pair_works(server.address)


def test_an_oversized_frame_is_refused_before_it_is_buffered(server_process: ServerProcess) -> None:
    peer = RawPeer(server_process.address)
    peer.register()
    peer.send((100 * 1024 * 1024).to_bytes(4, "big") + b"\0" * 65536)
    assert peer.closed_by_server(timeout=10)
    peer.close()
    honest_pair_works(server_process.address)


@pytest.mark.parametrize(
    "limits",
    [
        ServerLimits(max_connections_per_peer=8, register_timeout=1.0),
        ServerLimits(max_connections=8, register_timeout=1.0),
    ],
    ids=["per peer", "in all"],
)
def test_idle_connections_are_limited_and_timed_out(limits: ServerLimits) -> None:
    with zchat_nb.serve(limits=limits) as server:
        idle = [socket.create_connection(server.address, timeout=10) for _ in range(12)]
        try:
            # Four are over the limit: closed at once. The rest never register: closed after 1 s.
            for sock in idle:
                sock.settimeout(10)
                with contextlib.suppress(ConnectionResetError):
                    while sock.recv(65536):
                        pass
        finally:
            for sock in idle:
                sock.close()
        honest_pair_works(server.address)


def test_log_lines_about_offenders_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from zchat_nb.ratelog import shared_limit

    with zchat_nb.serve() as server, caplog.at_level(logging.WARNING):
        shared_limit().reset()
        for _ in range(40):
            peer = RawPeer(server.address)
            peer.hello()
            peer.send(frame(dag_frame(DEPTH, "plain", "register")))
            assert peer.closed_by_server(timeout=10)
            peer.close()
        honest_pair_works(server.address)
    lines = [r for r in caplog.records if r.name == "zchat_nb.guard"]
    assert 0 < len(lines) <= 10


def fake_server(reply: bytes) -> tuple[socket.socket, threading.Thread]:
    """A 'server' that greets like ZEO and answers every call with ``reply`` (a pickled body)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)  # to notice its closing

    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(20)
            conn.sendall(frame(b"Z5"))
            while True:
                head = conn.recv(4)
                if len(head) < 4:
                    return
                size = int.from_bytes(head, "big")
                body = b""
                while len(body) < size:
                    body += conn.recv(size - len(body))
                if body != b"Z5":
                    conn.sendall(frame(reply))

    def run() -> None:
        while listener.fileno() != -1:  # connect() probes first, then ZEO connects (and reconnects)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("payload", ["dag", "import"])
def test_a_malicious_server_cannot_hang_or_import_in_a_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: str
) -> None:
    marker = tmp_path / "imported"
    # Stock ZEO's client find_global imports whatever module a reply names, then checks the name.
    (tmp_path / "zchat_hostile_probe.py").write_text(f"open({str(marker)!r}, 'w').close()\nx = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    if payload == "dag":
        body = dag_pickle(DEPTH, "dict", prefix=b"(K\x01\x89X\x06\x00\x00\x00.reply") + b"t."
    else:  # (1, False, ".reply", zchat_hostile_probe.x)
        body = b"\x80\x03(K\x01\x89X\x06\x00\x00\x00.replyczchat_hostile_probe\nx\nt."
    listener, thread = fake_server(body)
    try:
        with pytest.raises(zchat_nb.ZChatConnectionError):
            zchat_nb.connect(listener.getsockname(), user="victim", connect_timeout=3)
        assert not marker.exists()
    finally:
        listener.close()
        thread.join(timeout=5)


def test_on_a_unix_socket_a_peer_is_its_user(tmp_path: Path) -> None:
    """Connections are counted per user there, not all as one "unix socket" peer."""
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as client:
        listener.bind(str(tmp_path / "s"))
        listener.listen()
        client.connect(str(tmp_path / "s"))
        conn, _ = listener.accept()
        with conn:
            extra = {"peername": conn.getpeername(), "socket": conn}

            class Transport:
                def get_extra_info(self, key: str) -> object:
                    return extra[key]

            assert peer_of(Transport()) == f"uid {os.getuid()}"


def test_a_lecture_hall_behind_one_address_is_admitted() -> None:
    """200 kernels of one JupyterHub host share its address: the default limits let them all in."""
    assert ServerLimits().max_connections_per_peer >= 400  # two connections per student
    with zchat_nb.serve() as server:
        clients = [ZEO.client(server.address, wait_timeout=30) for _ in range(210)]
        try:
            assert all(c.is_connected() for c in clients)
        finally:
            for c in clients:
                c.close()
        honest_pair_works(server.address)


def test_a_clients_keep_alive_does_not_close_its_connection() -> None:
    """ZEO clients send ``(-1, 0, '.reply', None)`` every minute; the guard once took it for a bad
    frame and closed every connection older than a minute."""
    with zchat_nb.serve() as server, zchat_nb.connect(server.address, user="ada") as ada:
        storage = ada.db.storage
        runner = storage._server
        protocol = runner.client.protocol
        runner.loop.call_soon_threadsafe(protocol.heartbeat)
        # Answered on the same connection after the server has read the keep-alive.
        storage.server_status()
        assert runner.client.protocol is protocol and storage.is_connected()
        ada.session("lab").add_message("still here")
