"""ZEO server lifecycle: start one in a thread, find or start the embedded default, stop it.

:func:`serve` runs a hardened ``ZEO.StorageServer`` in a daemon thread of this process.
The *embedded default* is one server per user, recorded in a state file in the user data directory
(``$ZCHAT_HOME`` or platformdirs' ``user_data_dir("zchat-nb")``): :func:`ensure_local_server` finds
it, or starts it as a detached ``zchat-nb serve`` process with a FileStorage in that directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import socket
import ssl as ssl_module
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ZODB.POSException
from ZODB.ConflictResolution import ConflictResolvingStorage
from ZODB.MappingStorage import MappingStorage

from .exceptions import ZChatConnectionError, ZChatServerError
from .guard import ServerLimits
from .security import harden_server_process

__all__ = [
    "Address",
    "Server",
    "data_dir",
    "ensure_local_server",
    "local_status",
    "parse_address",
    "probe",
    "resolve_address",
    "serve",
    "stop_local_server",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]
ENV_ADDRESS = "ZCHAT_ADDRESS"
ENV_HOME = "ZCHAT_HOME"
STATE_FILE = "server.json"
DATA_FILE = "chat.fs"
START_TIMEOUT = 20.0


class MemoryStorage(ConflictResolvingStorage, MappingStorage):
    """MappingStorage that resolves conflicts, as FileStorage does (BTrees merge inserts)."""

    def __init__(self, name: str = "zchat_nb memory") -> None:
        super().__init__(name)
        self._resolved: list[bytes] = []

    def tpc_begin(self, transaction: Any, tid: Any = None) -> None:
        super().tpc_begin(transaction, tid)
        self._resolved = []

    def store(self, oid: bytes, serial: bytes, data: bytes, version: str, transaction: Any) -> None:
        try:
            super().store(oid, serial, data, version, transaction)
        except ZODB.POSException.ConflictError:
            committed = self._data[oid].maxKey()
            data = self.tryToResolveConflict(oid, committed, serial, data)
            super().store(oid, committed, data, version, transaction)
            self._resolved.append(oid)

    def tpc_vote(self, transaction: Any) -> list[bytes]:
        super().tpc_vote(transaction)
        return self._resolved


def _ensure_root(storage: Any) -> None:
    """Store the root object now, so that first clients connecting at once do not race to create it."""
    import ZODB
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import load_current, z64

    try:
        load_current(storage, z64)
        return
    except ZODB.POSException.POSKeyError:
        pass
    scratch = ZODB.DB(None)  # let ZODB serialise an empty root, as ZODB.DB() itself would
    data = load_current(scratch.storage, z64)[0]
    scratch.close()
    txn = TransactionMetaData(description="zchat_nb: initial database creation")
    storage.tpc_begin(txn)
    storage.store(z64, z64, data, "", txn)
    storage.tpc_vote(txn)
    storage.tpc_finish(txn)


def parse_address(address: object) -> Address:
    """Turn ``(host, port)``, ``"host:port"`` or ``"port"`` into ``(host, port)``."""
    how = 'give ("127.0.0.1", 8100) or "127.0.0.1:8100"'
    if isinstance(address, str):
        host, sep, port_text = address.strip().rpartition(":")
        if not sep:
            host = "127.0.0.1"
        host = host.strip("[]") or "127.0.0.1"
        try:
            port = int(port_text)
        except ValueError:
            raise ZChatConnectionError(f"bad server address {address!r}: {how}") from None
    elif isinstance(address, (tuple, list)) and len(address) == 2:
        host, port = address
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
            raise ZChatConnectionError(f"bad server address {address!r}: {how}")
    else:
        raise ZChatConnectionError(f"bad server address {address!r}: {how}")
    if not 0 < port < 65536:
        raise ZChatConnectionError(f"bad port {port} in server address {address!r}: {how}")
    return host, port


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def probe(address: Address, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at ``address``."""
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            # Read the server's greeting before closing: closing with it unread sends a RST, which
            # ZEO logs as an error ("Disconnected ConnectionResetError") in the server's process.
            sock.settimeout(min(timeout, 0.5))
            with contextlib.suppress(OSError):
                sock.recv(256)
            return True
    except OSError:
        return False


class _ClientDisconnectsAreInfo(logging.Filter):
    """ZEO logs a client whose connection was reset as an ERROR; for a chat server it is routine.

    Kernels restart and laptops close all the time, and in a notebook that serves, Python's
    last-resort handler would print each of them to stderr. Other errors are left as they are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and record.getMessage().startswith("Disconnected ConnectionReset"):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _demote_client_disconnects() -> None:
    zeo_server_log = logging.getLogger("ZEO.asyncio.server")
    if not any(isinstance(f, _ClientDisconnectsAreInfo) for f in zeo_server_log.filters):
        zeo_server_log.addFilter(_ClientDisconnectsAreInfo())


class Server:
    """A ZEO server running in a daemon thread of this process. ``stop()`` is safe to call twice."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl: ssl_module.SSLContext | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        from ZODB.FileStorage import FileStorage

        from .guard import GuardedStorageServer

        harden_server_process()
        _demote_client_disconnects()
        self.path = None if path is None else Path(path)
        storage = MemoryStorage() if self.path is None else FileStorage(str(self.path), pack_keep_old=False)
        try:
            _ensure_root(storage)
            # ZEO binds by running an event loop in the calling thread, which fails where one already
            # runs (a Jupyter kernel's main thread): build the server on a helper thread.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                self._server = pool.submit(
                    GuardedStorageServer, (host, port), {"1": storage}, ssl=ssl, limits=limits
                ).result()
        except OSError as exc:
            storage.close()
            raise ZChatServerError(
                f"cannot listen on {format_address((host, port))}: {exc.strerror}; "
                "choose another port (--port 0 picks a free one)"
            ) from exc
        except BaseException:
            storage.close()
            raise
        self.address: Address = (host, self._server.addr[1])
        self.tls = ssl is not None
        self._stopped = threading.Event()
        self._server.start_thread(daemon=True)

    def status(self) -> dict[str, Any]:
        """Server statistics: ``connections``, ``last-transaction`` (hex), commits, conflicts..."""
        if self._stopped.is_set():
            return {"running": False}
        return {"running": True, **self._server.server_status("1")}

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._close_client_connections()
        self._server.close(join_timeout=5)

    def _close_client_connections(self, timeout: float = 5.0) -> None:
        """Close every client connection on the server's event loop, and wait until they are closed.

        ZEO's ``StorageServer.close()`` stops its event loop and then schedules the connections'
        closing on it; when the loop has closed first, the sockets stay open and clients never
        learn that the server went away.
        """
        server = self._server

        async def close_all() -> None:
            # Stop listening first: a client whose connection closes reconnects at once, and a
            # connection accepted now would be left open when the loop stops.
            if server.acceptor.server is not None:
                server.acceptor.server.close()
            protocols = [
                zs.connection
                for storages in server.zeo_storages_by_storage_id.values()
                for zs in storages
                if getattr(zs, "connection", None) is not None
            ]
            closing = [protocol.close() or protocol.closing for protocol in protocols]
            closing = [future for future in closing if future is not None]
            if closing:
                await asyncio.wait(closing, timeout=timeout)

        try:
            asyncio.run_coroutine_threadsafe(close_all(), server.acceptor.event_loop).result(timeout + 1)
        except Exception:  # the loop is already gone: nothing is left to close
            log.debug("closing the ZEO server's client connections failed", exc_info=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` is called (from a signal handler, say)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped.is_set() else "running"
        where = self.path or "memory"
        return f"<zchat_nb.Server {format_address(self.address)} {where} {state}>"


def serve(
    path: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl: ssl_module.SSLContext | None = None,
    tls: str | os.PathLike[str] | None = None,
    limits: ServerLimits | None = None,
) -> Server:
    """Start a ZEO server in this process: in memory, or in the FileStorage at ``path``.

    Binds 127.0.0.1 unless told otherwise; ``port=0`` picks a free port (see ``.address``).
    ``tls`` (instead of ``ssl``): a classroom directory made by ``zchat-nb certs``; clients then
    need a certificate from it (:mod:`zchat_nb.certs`). ``limits``: what one connection may
    cost the server (:class:`zchat_nb.guard.ServerLimits`).
    """
    if tls is not None:
        from .certs import server_context

        if ssl is not None:
            raise ZChatServerError("give serve() tls= (a classroom directory) or ssl=, not both")
        ssl = server_context(tls)
    return Server(path, host, port, ssl=ssl, limits=limits)


def outward_ip() -> str:
    """This machine's address on its network, as students should type it; sends no packet."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # Connecting a UDP socket only picks the route (to a documentation address, RFC 5737).
        sock.connect(("192.0.2.1", 9))
        ip = str(sock.getsockname()[0])
        if not ip.startswith(("127.", "0.")):
            return ip
    with contextlib.suppress(OSError):
        for ip in socket.gethostbyname_ex(socket.gethostname())[2]:
            if not ip.startswith("127."):
                return str(ip)
    return "127.0.0.1"


def public_notice(address: Address, *, tls: bool) -> str:
    """What ``zchat-nb serve`` prints when it listens beyond this machine: the address, and a warning."""
    host, port = address
    shown = format_address((outward_ip() if host in ("0.0.0.0", "::", "") else host, port))
    where = "on every network interface" if host in ("0.0.0.0", "::", "") else f"on {host}"
    lines = [f"zchat_nb: listening {where}. Students connect to {shown}:"]
    if tls:
        lines += [
            f"    zchat-nb chat {shown} --tls FOLDER",
            f'  or in Python: zchat_nb.connect("{shown}", tls=FOLDER), where FOLDER is the student\'s',
            "  certificate folder from `zchat-nb certs` (DIR/students/NAME). The server certificate must",
            f"  name {shown.rpartition(':')[0]} (`zchat-nb certs DIR --server-name HOST` adds a name).",
            "  Only clients with a certificate from this classroom's CA get in.",
        ]
    else:
        lines += [
            f'    zchat-nb chat {shown}    or in Python: zchat_nb.connect("{shown}")',
            f"  WARNING: anyone who can reach this machine on port {port} can read and write this chat:",
            "  there is no password. Use a network you trust, stop the server after class, or make",
            "  certificates with `zchat-nb certs DIR --student NAME ...` and serve with `--tls DIR`.",
        ]
    return "\n".join(lines)


# -- the embedded default -------------------------------------------------------------------


def data_dir() -> Path:
    """Where the embedded default keeps its state file, data and log."""
    home = os.environ.get(ENV_HOME)
    if home:
        path = Path(home)
    else:
        import platformdirs

        path = Path(platformdirs.user_data_dir("zchat-nb", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class LocalState:
    """What the embedded default's state file records."""

    host: str
    port: int
    pid: int
    path: str

    @property
    def address(self) -> Address:
        return (self.host, self.port)


def read_state() -> LocalState | None:
    try:
        raw = json.loads((data_dir() / STATE_FILE).read_text())
        return LocalState(str(raw["host"]), int(raw["port"]), int(raw["pid"]), str(raw["path"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_state(state: LocalState) -> None:
    target = data_dir() / STATE_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.__dict__))
    tmp.replace(target)


def clear_state(pid: int) -> None:
    """Remove the state file if it still describes process ``pid``."""
    state = read_state()
    if state is not None and state.pid == pid:
        with contextlib.suppress(OSError):
            (data_dir() / STATE_FILE).unlink()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise find-or-start between processes, so two kernels never start two servers."""
    with open(data_dir() / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_local_server(timeout: float = START_TIMEOUT) -> Address:
    """The embedded default's address: the recorded server if it answers, else a new one."""
    with _locked():
        state = read_state()
        # Its process must be alive too: after a reboot the port may belong to something else.
        if state is not None and _alive(state.pid) and probe(state.address, timeout=1.0):
            return state.address
        port = state.port if state is not None else 0
        return _start_detached(port, timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def spawn_server(
    args: list[str], *, timeout: float, detached: bool = False, output: Any = subprocess.DEVNULL
) -> tuple[subprocess.Popen[bytes], str]:
    """Run ``zchat-nb serve ARGS`` as a child process and wait until it listens.

    Returns the process and the address it announced through a pipe (an event, not a poll), or
    ``""`` if it exited or said nothing within ``timeout`` seconds. ``detached`` puts it in a
    session of its own, so that it outlives this process and its terminal.
    """
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "zchat_nb", "serve", *args, "--ready-fd", str(write_fd)]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            pass_fds=(write_fd,),
            start_new_session=detached,
        )
    finally:
        os.close(write_fd)
    try:
        return proc, _read_line(read_fd, timeout)
    finally:
        os.close(read_fd)


def _start_detached(port: int, timeout: float) -> Address:
    directory = data_dir()
    args = ["--path", str(directory / DATA_FILE), "--port", str(port), "--state-file"]
    with open(directory / "server.log", "ab") as logfile:
        proc, line = spawn_server(args, timeout=timeout, detached=True, output=logfile)
    if not line:
        code = proc.poll()
        if code is None:
            proc.kill()
        tail = _tail(directory / "server.log")
        raise ZChatServerError(
            f"the local ZEO server did not start within {timeout:g} s (exit code {code}); "
            f"its log {directory / 'server.log'} ends with:\n{tail}"
        )
    return parse_address(line)


def _read_line(fd: int, timeout: float) -> str:
    """Read one line from ``fd``, waiting at most ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return ""
        chunk = os.read(fd, 256)
        if not chunk:
            return ""
        data += chunk
    return data.decode().strip()


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def local_status() -> dict[str, Any]:
    """What is known about the embedded default, without starting anything."""
    state = read_state()
    if state is None:
        return {"running": False, "data_dir": str(data_dir())}
    return {
        "running": probe(state.address, timeout=1.0),
        "address": format_address(state.address),
        "pid": state.pid,
        "path": state.path,
        "data_dir": str(data_dir()),
    }


def stop_local_server(timeout: float = 10.0) -> bool:
    """Stop the embedded default; returns whether a running server was stopped."""
    state = read_state()
    if state is None or not probe(state.address, timeout=1.0):
        if state is not None:
            clear_state(state.pid)
        return False
    try:
        os.kill(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        clear_state(state.pid)
        return False
    if not _wait_pid(state.pid, timeout):
        raise ZChatServerError(
            f"the local server (pid {state.pid}) did not stop within {timeout:g} s; "
            f"kill it with `kill -9 {state.pid}`"
        )
    clear_state(state.pid)
    return True


def _wait_pid(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit (pidfd: an event, not a poll)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def resolve_address(address: object = None, *, start: bool = True) -> Address:
    """The address to use: ``address``, else ``$ZCHAT_ADDRESS``, else the embedded default."""
    if address is not None:
        return parse_address(address)
    env = os.environ.get(ENV_ADDRESS)
    if env:
        return parse_address(env)
    if not start:
        state = read_state()
        if state is None:
            raise ZChatConnectionError(
                "no local zchat server is recorded; start one with `zchat-nb serve` "
                f"or set {ENV_ADDRESS}=host:port"
            )
        return state.address
    return ensure_local_server()


def run_foreground(
    path: str | None,
    host: str,
    port: int,
    *,
    state_file: bool = False,
    ready_fd: int | None = None,
    ssl: ssl_module.SSLContext | None = None,
    announce: bool = True,
) -> None:
    """Serve until SIGTERM or SIGINT (``zchat-nb serve``); optionally record the embedded state."""
    try:
        server = serve(path, host, port, ssl=ssl)
    except ZChatServerError:
        if port and state_file:  # the recorded port is taken: any free one will do
            server = serve(path, host, 0, ssl=ssl)
        else:
            raise
    text = format_address(server.address)
    if state_file:
        write_state(LocalState(server.address[0], server.address[1], os.getpid(), str(path)))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    if announce:
        print(f"zchat_nb: ZEO server listening on {text} ({path or 'in memory'})", flush=True)
        if host != "localhost" and not host.startswith("127.") and host != "::1":
            print(public_notice(server.address, tls=ssl is not None), flush=True)
    if ready_fd is not None:
        os.write(ready_fd, f"{text}\n".encode())
        os.close(ready_fd)
    try:
        server.wait()  # lock waits are interrupted by signals, so the handlers above run
    finally:
        server.stop()
        if state_file:
            clear_state(os.getpid())
