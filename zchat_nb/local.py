"""The embedded default: one local ZEO server per user, in a process of its own.

Its state file (``server.json``: address, pid, data file) and lock live in the user data directory
(``$ZCHAT_HOME`` or platformdirs' ``user_data_dir("zchat-nb")``), which is private to its user: the
directory ``0700``, its files ``0600``, opened without following symlinks, and the server listens on
a Unix socket in it (``server.sock``), so no other local user can connect (loopback TCP would let
every local user read the chat). A recorded pid is trusted only if it is this user's
``zchat-nb serve`` for this directory: ``zchat-nb stop`` never signals another process.

:func:`ensure_local_server` finds the recorded server, or starts it as a detached ``zchat-nb serve``
process with a FileStorage in that directory; :func:`resolve_address` picks the address a client
uses; :func:`run_foreground` is what ``zchat-nb serve`` runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import ssl as ssl_module
import stat
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
SOCKET_FILE = "server.sock"
START_TIMEOUT = 20.0


def public_notice(address: tuple[str, int], *, tls: bool) -> str:
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
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid():
        raise ZChatServerError(
            f"the zchat data directory {path} is not a directory of yours (a symlink, or another "
            f"user's); remove it or set {ENV_HOME} to a directory of your own"
        )
    if info.st_mode & 0o077:  # made by an older version, or by hand: make it private
        path.chmod(0o700)
    return path


def _open_private(path: Path, flags: int) -> int:
    """Open a file of the data directory: created ``0600``, never through a symlink."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ZChatServerError(f"{path} is a symlink (planted?); remove it") from exc
        raise
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd


@dataclass(frozen=True)
class LocalState:
    """What the embedded default's state file records."""

    host: str
    port: int
    pid: int
    path: str
    #: The Unix socket the server listens on ("" for an older TCP state file).
    socket: str = ""

    @property
    def address(self) -> Address:
        return self.socket if self.socket else (self.host, self.port)


def read_state() -> LocalState | None:
    try:
        fd = _open_private(data_dir() / STATE_FILE, os.O_RDONLY)
        with os.fdopen(fd) as file:
            raw = json.loads(file.read(65536))
        return LocalState(
            str(raw["host"]), int(raw["port"]), int(raw["pid"]), str(raw["path"]), str(raw.get("socket", ""))
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZChatServerError):
        return None  # missing, unreadable or planted: no server is recorded


def write_state(state: LocalState) -> None:
    target = data_dir() / STATE_FILE
    tmp = target.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # whatever it is (a planted symlink): replaced, not followed
    fd = _open_private(tmp, os.O_WRONLY | os.O_EXCL)
    with os.fdopen(fd, "w") as file:
        file.write(json.dumps(state.__dict__))
    tmp.replace(target)


def is_our_server(pid: int, directory: Path | None = None) -> bool:
    """Whether ``pid`` is this user's ``zchat-nb serve`` of the local default in ``directory``.

    A state file outlives its server: after a crash or a reboot its pid may be anyone's process.
    """
    directory = directory or data_dir()
    try:
        proc = Path(f"/proc/{pid}")
        if proc.stat().st_uid != os.getuid():
            return False
        args = (proc / "cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    expected = os.fsencode(directory / DATA_FILE)
    return b"zchat_nb" in args and b"serve" in args and b"--state-file" in args and expected in args


def clear_state(pid: int) -> None:
    """Remove the state file if it still describes process ``pid``."""
    state = read_state()
    if state is not None and state.pid == pid:
        with contextlib.suppress(OSError):
            (data_dir() / STATE_FILE).unlink()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise find-or-start between processes, so two kernels never start two servers."""
    # Not open(..., "w"): a planted symlink would truncate its target.
    fd = _open_private(data_dir() / "server.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_local_server(timeout: float = START_TIMEOUT) -> Address:
    """The embedded default's address: the recorded server if it answers, else a new one."""
    with _locked():
        state = read_state()
        # Its process must be ours and alive: after a reboot the pid and port may be anyone's.
        if state is not None and is_our_server(state.pid) and probe(state.address, timeout=1.0):
            return state.address
        return _start_detached(timeout)


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


def _start_detached(timeout: float) -> Address:
    directory = data_dir()
    args = ["--path", str(directory / DATA_FILE), "--socket", str(directory / SOCKET_FILE), "--state-file"]
    with os.fdopen(_open_private(directory / "server.log", os.O_WRONLY | os.O_APPEND), "ab") as logfile:
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


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a server that died; refuse to replace anything else, or a live one."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise ZChatServerError(
            f"{path} exists and is not a socket of yours; remove it, or choose another path"
        )
    if probe(str(path), timeout=1.0):
        raise ZChatServerError(f"a server already listens on {path}; stop it with `zchat-nb stop`")
    path.unlink()


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
        "running": is_our_server(state.pid) and probe(state.address, timeout=1.0),
        "address": format_address(state.address),
        "pid": state.pid,
        "path": state.path,
        "data_dir": str(data_dir()),
    }


def stop_local_server(timeout: float = 10.0) -> bool:
    """Stop the embedded default; returns whether a running server was stopped."""
    state = read_state()
    if state is None or not is_our_server(state.pid) or not probe(state.address, timeout=1.0):
        if state is not None:  # stale: its pid may be anyone's process now, which we never signal
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
        if state is None or not is_our_server(state.pid):
            raise ZChatConnectionError(
                "no local zchat server is running; start one with `zchat-nb serve` "
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
    unix: str | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (``zchat-nb serve``); optionally record the embedded state.

    ``unix``: listen on a Unix socket at that path instead of TCP.
    """
    if state_file:
        os.umask(0o077)  # the local default's files (chat.fs, its index and lock) are private
        if path is not None:
            for name in (path, f"{path}.index", f"{path}.lock", f"{path}.tmp"):
                with contextlib.suppress(OSError):
                    if Path(name).lstat().st_mode & 0o077 and not Path(name).is_symlink():
                        Path(name).chmod(0o600)
    if unix is not None:
        _remove_stale_socket(Path(unix))
    server = serve(path, host, port, ssl=ssl, storage=storage, unix=unix)
    text = format_address(server.address)
    if state_file:
        where = server.address
        host_text, port_number = ("", 0) if isinstance(where, str) else where
        socket_text = where if isinstance(where, str) else ""
        write_state(LocalState(host_text, port_number, os.getpid(), str(path), socket_text))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    if announce:
        print(f"zchat_nb: ZEO server listening on {text} ({server.storage_text})", flush=True)
        if (
            not isinstance(server.address, str)
            and host not in ("localhost", "::1")
            and not host.startswith("127.")
        ):
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
