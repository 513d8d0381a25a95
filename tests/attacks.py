"""What a hostile peer sends: raw ZEO frames, memo DAGs, and the honest pair that must still be served."""

from __future__ import annotations

import contextlib
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ZEO
from ZODB.Connection import TransactionMetaData
from ZODB.utils import load_current

import zchat_nb
from zchat_nb.storage import is_storage_uri, open_relstorage, parse_storage_uri

T = TypeVar("T")


def dag_pickle(depth: int, wrap: str = "plain", prefix: bytes = b"") -> bytes:
    """A pickle of ``t_depth`` where ``t_0 = ()`` and ``t_i+1 = (t_i, t_i)`` through the memo.

    ``wrap``: "frozenset" (``frozenset(((t,),))``), "dict" (``{t: None}``) or "plain" (``t``).
    ``prefix`` is pickled before it (inside a tuple), to put the DAG inside a frame.
    """
    out = bytearray(b"\x80\x03" + prefix)
    if wrap == "frozenset":
        out += b"cbuiltins\nfrozenset\n"
    elif wrap == "dict":
        out += b"}"
    out += b")q\x000"  # EMPTY_TUPLE, BINPUT 0, POP
    for i in range(depth):
        out += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    out += b"h" + bytes([depth])
    if wrap == "frozenset":
        out += b"\x85\x85R"
    elif wrap == "dict":
        out += b"Ns"
    return bytes(out)


def dag_frame(depth: int, wrap: str, method: str = "register") -> bytes:
    """A ZEO frame ``(1, False, method, (DAG,))``, body only."""
    name = method.encode()
    # BINUNICODE: ZEO unpickles with zodbpickle, which knows protocol 3 opcodes only.
    body = dag_pickle(depth, wrap, prefix=b"(K\x01\x89X" + len(name).to_bytes(4, "little") + name)
    return body + b"\x85t."  # TUPLE1 (the args), TUPLE (msgid, async, method, args) from the MARK


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def call(msgid: int, method: str, *args: object, asynchronous: bool = False) -> bytes:
    return frame(pickle.dumps((msgid, asynchronous, method, args), 3))


class RawPeer:
    """A TCP peer that speaks ZEO frames by hand."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.greeting = self.read_frame()  # b"Z5"

    def hello(self) -> None:
        self.sock.sendall(frame(b"Z5"))

    def register(self) -> None:
        self.hello()
        self.send(call(1, "register", "1", False))
        self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the server")
            data += chunk
        return data

    def read_frame(self) -> bytes:
        (size,) = struct.unpack(">I", self.read_exactly(4))
        return self.read_exactly(size)

    def reply(self) -> object:
        """The next frame that is a reply (invalidations and info calls skipped)."""
        while True:
            message = pickle.loads(self.read_frame())
            if message[2] == ".reply":
                return message[3]

    def closed_by_server(self, timeout: float) -> bool:
        """Whether the server closes this connection within ``timeout`` (reads and drops data)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()


def honest_pair_works(address: object, room: str = "general", timeout: float = 10.0) -> None:
    """Two clients on ``address``: one sends, the other receives it; fails loudly otherwise."""
    with (
        zchat_nb.connect(address, user="alice", timeout=timeout) as alice,
        zchat_nb.connect(address, user="bob", timeout=timeout) as bob,
    ):
        reader = bob.session(room, backlog=0)
        reader.new_messages()
        sent = alice.session(room).add_message(f"still here {time.time()}")
        got = reader.new_messages(timeout=timeout)
        assert [m.id for m in got] == [sent.id], got


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    import os

    return ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def raw_storage(address: object) -> Any:
    """The storage at ``address`` (a ZEO server, or a PostgreSQL URI) with none of zchat_nb's checks."""
    if is_storage_uri(address):
        return open_relstorage(parse_storage_uri(str(address)))
    return ZEO.client(address, wait_timeout=10)


def overwrite(address: object, oid: bytes, data: bytes) -> None:
    """Store ``data`` as the new state of ``oid`` through the raw storage API, as a hostile client would."""
    storage = raw_storage(address)
    try:
        serial = load_current(storage, oid)[1]
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(oid, serial, data, "", txn)
        storage.tpc_vote(txn)
        storage.tpc_finish(txn)
    finally:
        storage.close()


def finishes(call: Callable[[], T], deadline: float = 60.0) -> T:
    """``call()`` run in a thread: its result or its error, or a loud failure if it hangs past ``deadline`` s.

    For calls that hung for ever before a fix: the suite fails instead of hanging.
    """
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    if not outcome:
        raise AssertionError(f"{call} did not return within {deadline:g} s: it hangs")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class SilentProxy:
    """A hostile (or stalled) ZEO server: a proxy in front of a real one that stops answering reads.

    It passes every frame both ways, so a client connects, registers, commits and hears
    invalidations; but while :attr:`holding` is set, the first answer to a call named in
    ``methods`` (loads, by default) stalls that connection: the answer, and everything the server
    sends after it, is kept, in order, as by a server stuck on that call. (Passing later frames,
    invalidations say, ahead of a kept answer would make ZEO cache a stale state as current.)
    :meth:`release` sends what it kept, in order, as a server back from a stall would; :meth:`cut`
    drops it and closes every connection (the client reconnects, through the proxy, to the same
    server).
    """

    def __init__(self, upstream: tuple[str, int], methods: tuple[str, ...] = ("loadBefore",)) -> None:
        self.upstream = upstream
        self.methods = methods
        self.holding = threading.Event()
        self._held: list[tuple[socket.socket, bytes]] = []
        self._lock = threading.Lock()
        self._kept = threading.Condition(self._lock)  # notified as an answer is kept
        self._socks: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def held(self) -> int:
        """How many answers it keeps now."""
        with self._lock:
            return len(self._held)

    def wait_held(self, timeout: float) -> bool:
        """Wait until an answer is kept (True), at most ``timeout`` seconds."""
        with self._kept:
            return self._kept.wait_for(lambda: bool(self._held), timeout)

    def release(self) -> None:
        """Stop holding, and send the answers kept so far."""
        with self._lock:  # the pumps send nothing meanwhile: the kept frames go first
            self.holding.clear()
            held, self._held = self._held, []
            for sock, data in held:
                with contextlib.suppress(OSError):
                    sock.sendall(data)

    def cut(self) -> None:
        """Close every connection (kept answers are lost) and stop holding."""
        with self._lock:
            self.holding.clear()
            socks, self._socks, self._held = self._socks, [], []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
        self.cut()
        self._thread.join(10)

    def __enter__(self) -> SilentProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._socks += [client, server]
            asked: set[object] = set()  # ids of this connection's calls whose answers may be kept
            for source, sink, answers in ((client, server, False), (server, client, True)):
                args = (source, sink, answers, asked)
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool, asked: set[object]) -> None:
        with contextlib.suppress(OSError, ConnectionError, struct.error):
            while True:
                head = recv_exactly(source, 4)
                body = recv_exactly(source, struct.unpack(">I", head)[0])
                stalls = False
                if body[:1] == b"\x80":  # not the protocol handshake: (id, async, method, args)
                    # From our own client or the real server behind us: safe to unpickle.
                    msgid, _, method, _ = pickle.loads(body)
                    if not answers and method in self.methods:
                        asked.add(msgid)
                    elif answers and method == ".reply" and msgid in asked:
                        asked.discard(msgid)
                        stalls = True
                with self._lock:  # keeping or sending, in the order received
                    stalled = answers and any(kept is sink for kept, _ in self._held)
                    if self.holding.is_set() and (stalls or stalled):
                        self._held.append((sink, head + body))
                        self._kept.notify_all()
                        continue
                    sink.sendall(head + body)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock``; ConnectionError if it closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data
