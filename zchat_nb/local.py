"""The embedded default: one local ZEO server per user, in a process of its own.

Its state file (``server.json``: address, pid, data file) and lock live in the user data directory
(``$ZCHAT_HOME`` or platformdirs' ``user_data_dir("zchat-nb")``). :func:`ensure_local_server` finds
the recorded server, or starts it as a detached ``zchat-nb serve`` process with a FileStorage in that
directory; :func:`resolve_address` picks the address a client uses; :func:`run_foreground` is what
``zchat-nb serve`` runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import ssl as ssl_module
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .exceptions import ZChatConnectionError, ZChatServerError
from .net import Address, format_address, outward_ip, parse_address, probe
from .server import serve

__all__ = [
    "ENV_ADDRESS",
    "ENV_HOME",
    "LocalState",
    "data_dir",
    "ensure_local_server",
    "local_status",
    "public_notice",
    "resolve_address",
    "run_foreground",
    "spawn_server",
    "stop_local_server",
]

ENV_ADDRESS = "ZCHAT_ADDRESS"
ENV_HOME = "ZCHAT_HOME"
STATE_FILE = "server.json"
DATA_FILE = "chat.fs"
START_TIMEOUT = 20.0


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
    storage: str | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (``zchat-nb serve``); optionally record the embedded state."""
    try:
        server = serve(path, host, port, ssl=ssl, storage=storage)
    except ZChatServerError:
        if port and state_file:  # the recorded port is taken: any free one will do
            server = serve(path, host, 0, ssl=ssl, storage=storage)
        else:
            raise
    text = format_address(server.address)
    if state_file:
        write_state(LocalState(server.address[0], server.address[1], os.getpid(), str(path)))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    if announce:
        print(f"zchat_nb: ZEO server listening on {text} ({server.storage_text})", flush=True)
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
