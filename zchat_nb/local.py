"""The embedded default: one local ZEO server per user, in a process of its own, private to that user.

It lives in the user data directory (``$ZCHAT_HOME`` or platformdirs' ``user_data_dir("zchat-nb")``):
its data (``chat.fs``), its Unix socket (``server.sock``: its address, always the same, so a restarted
server is where its clients left it), its state file (``server.json``: address, pid, data file), its
lock and its log. The directory is ``0700`` and every file ``0600``, opened without following
symbolic links: other users of the machine can neither read the chat nor connect to the socket
(a loopback TCP port would be open to all of them).

:func:`ensure_local_server` finds the running server, or starts it as a detached
``zchat-nb serve --local`` process; :func:`run_local` is what that command runs (in the foreground
when a user types it). A pid from the state file is trusted only once ``/proc`` shows it is this
user's ``zchat-nb serve`` holding that socket, so ``zchat-nb stop`` never signals a stranger.
:func:`resolve_address` picks the address a client uses; :func:`run_foreground` is what
``zchat-nb serve`` runs for an explicit TCP address.
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
from .guard import ServerLimits
from .net import Address, format_address, outward_ip, parse_address, probe
from .server import Server, serve

__all__ = [
    "ENV_ADDRESS",
    "ENV_HOME",
    "LocalState",
    "data_dir",
    "ensure_local_server",
    "is_local_default",
    "local_address",
    "local_status",
    "public_notice",
    "resolve_address",
    "restart_hint",
    "run_foreground",
    "run_local",
    "running_server",
    "spawn_server",
    "stop_local_server",
]

ENV_ADDRESS = "ZCHAT_ADDRESS"
ENV_HOME = "ZCHAT_HOME"
STATE_FILE = "server.json"
DATA_FILE = "chat.fs"
SOCKET_FILE = "server.sock"
LOCK_FILE = "server.lock"
LOG_FILE = "server.log"
START_TIMEOUT = 20.0
#: The command that brings the local default back, with its data, in the foreground.
LOCAL_COMMAND = "zchat-nb serve --local"
#: Longest Unix socket path Linux accepts (``sun_path`` is 108 bytes with its NUL).
_MAX_SOCKET_PATH = 107


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


# -- the private data directory ---------------------------------------------------------------


def data_dir() -> Path:
    """Where the embedded default keeps its data, socket, state file and log: ``0700``, ours.

    Created ``0700`` if missing; an existing directory of ours that others may read is made
    ``0700``; one owned by another user is refused (they could read or replace what is in it).
    """
    home = os.environ.get(ENV_HOME)
    if home:
        path = Path(home)
    else:
        import platformdirs

        path = Path(platformdirs.user_data_dir("zchat-nb", appauthor=False))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise ZChatServerError(f"the zchat_nb data directory {path} is not a directory; set {ENV_HOME}=DIR")
    if info.st_uid != os.geteuid():
        raise ZChatServerError(
            f"the zchat_nb data directory {path} belongs to another user (uid {info.st_uid}); they could "
            f"read or replace your chat there. Set {ENV_HOME} to a directory of your own"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)  # ours, but others could look in: an older zchat_nb made it 0755
    return path


def _open_private(path: Path, flags: int) -> int:
    """``os.open`` a file of the data directory as ``0600``, never through a symbolic link."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ZChatServerError(
                f"{path} is a symbolic link; zchat_nb follows no links in its data directory "
                "(one planted there could make it overwrite another file). Remove the link"
            ) from exc
        raise
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ZChatServerError(f"{path} is not a file of yours; remove it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def _make_files_private(directory: Path) -> None:
    """Make the files an older zchat_nb left readable to others (``chat.fs`` was ``0644``) ``0600``."""
    for entry in os.scandir(directory):
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(entry.path, 0o600, follow_symlinks=False)


def local_address() -> str:
    """The local default's address: the Unix socket in the data directory (always the same)."""
    path = str(data_dir() / SOCKET_FILE)
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ZChatServerError(
            f"the socket path {path} is longer than the {_MAX_SOCKET_PATH} bytes Unix sockets allow; "
            f"set {ENV_HOME} to a shorter directory"
        )
    return path


def is_local_default(address: Address) -> bool:
    """Whether ``address`` is this user's local default server (the socket in the data directory)."""
    return isinstance(address, str) and Path(address).name == SOCKET_FILE and address == local_address()


def restart_hint(address: Address) -> str:
    """How to bring back the server at ``address`` with its data, for messages that say it is away."""
    if isinstance(address, str) and Path(address).name == SOCKET_FILE:
        home = Path(address).parent
        current = os.environ.get(ENV_HOME)
        try:
            ours = is_local_default(address)
        except ZChatServerError:
            ours = False
        prefix = "" if ours else f"{ENV_HOME}={home} "
        if ours and current is not None and Path(current) != home:
            prefix = f"{ENV_HOME}={home} "
        return (
            f"it is the local default server of {home}: `{prefix}{LOCAL_COMMAND}` brings it back with "
            "its data (connect() or `%zchat join` with no address starts it too)"
        )
    where = format_address(address)
    if isinstance(address, str):
        return f"restart the server that listened on {where} (with the same --path to keep its data)"
    return (
        f"restart the server that listened at {where} on the same port with its data file "
        f"(`zchat-nb serve --port {address[1]} --path FILE`, with --host/--public/--tls as before); "
        "if another program took that port meanwhile, the server says so"
    )


# -- the state file and the lock -------------------------------------------------------------


@dataclass(frozen=True)
class LocalState:
    """What the embedded default's state file records."""

    address: Address
    pid: int
    path: str


def read_state() -> LocalState | None:
    """The state file's record, or None if there is none (or it is unreadable, or a link)."""
    try:
        fd = _open_private(data_dir() / STATE_FILE, os.O_RDONLY)
    except (OSError, ZChatServerError):
        return None
    try:
        with os.fdopen(fd, "rb") as file:
            raw = json.loads(file.read(64 * 1024))
        if "address" in raw:
            address = parse_address(str(raw["address"]))
        else:  # written by an older zchat_nb, which served the default on loopback TCP
            address = (str(raw["host"]), int(raw["port"]))
        return LocalState(address, int(raw["pid"]), str(raw["path"]))
    except (OSError, ValueError, KeyError, TypeError, ZChatConnectionError):
        return None


def write_state(state: LocalState) -> None:
    """Replace the state file atomically; a link planted in its place is replaced, never followed."""
    directory = data_dir()
    tmp = directory / f"{STATE_FILE}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = _open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    record = {"address": format_address(state.address), "pid": state.pid, "path": state.path}
    with os.fdopen(fd, "w") as file:
        json.dump(record, file)
    os.replace(tmp, directory / STATE_FILE)  # rename() replaces a link itself, not its target


def clear_state(pid: int) -> None:
    """Remove the state file if it still describes process ``pid``."""
    state = read_state()
    if state is not None and state.pid == pid:
        with contextlib.suppress(OSError):
            (data_dir() / STATE_FILE).unlink()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise find-or-start between processes, so two kernels never start two servers."""
    fd = _open_private(data_dir() / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # no O_TRUNC: nothing is written
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# -- is the recorded pid really our server? --------------------------------------------------


def _socket_inodes(address: Address) -> set[str]:
    """The sockets bound to ``address`` (from ``/proc/net``), named as ``/proc/PID/fd`` links name them."""
    found: set[str] = set()
    if isinstance(address, str):
        with contextlib.suppress(OSError), open("/proc/net/unix") as table:
            next(table, None)
            for line in table:
                fields = line.rstrip("\n").split(maxsplit=7)
                if len(fields) == 8 and fields[7] == address:
                    found.add(f"socket:[{fields[6]}]")
        return found
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as table:
            next(table, None)
            for line in table:
                fields = line.split()
                listening = len(fields) > 9 and fields[3] == "0A"
                if listening and int(fields[1].rpartition(":")[2], 16) == address[1]:
                    found.add(f"socket:[{fields[9]}]")
    return found


def is_our_server(pid: int, address: Address) -> bool:
    """Whether process ``pid`` is this user's ``zchat-nb serve`` and holds the socket at ``address``.

    A state file outlives its server (a crash, a reboot): by then the pid may be any process and the
    port anyone's. Linux's ``/proc`` says who runs ``pid``, what it runs, and which sockets it holds.
    """
    proc = Path(f"/proc/{pid}")
    try:
        status = (proc / "status").read_text()
        args = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")]
    except OSError:
        return False
    uids = next((line.split()[1:3] for line in status.splitlines() if line.startswith("Uid:")), [])
    if len(uids) != 2 or any(int(uid) != os.getuid() for uid in uids):
        return False
    if "serve" not in args or not any("zchat_nb" in a or "zchat-nb" in a for a in args[:3]):
        return False
    inodes = _socket_inodes(address)
    if not inodes:
        return False
    try:
        fds = os.listdir(proc / "fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(proc / "fd" / fd) in inodes:
                return True
    return False


def running_server() -> LocalState | None:
    """The local default's record, if its process is our server, holds its address and answers."""
    state = read_state()
    if state is None or not is_our_server(state.pid, state.address):
        return None
    return state if probe(state.address, timeout=1.0) else None


# -- starting and stopping the local default -------------------------------------------------


def ensure_local_server(timeout: float = START_TIMEOUT) -> Address:
    """The embedded default's address: the running server, else a new one on the same socket."""
    with _locked():
        state = running_server()
        if state is not None:
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
    log_path = directory / LOG_FILE
    # The caller holds the lock and found no server: the child must not wait for that lock.
    with os.fdopen(_open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab") as logfile:
        proc, line = spawn_server(["--local", "--locked"], timeout=timeout, detached=True, output=logfile)
    if not line:
        code = proc.poll()
        if code is None:
            proc.kill()
        raise ZChatServerError(
            f"the local ZEO server did not start within {timeout:g} s (exit code {code}); "
            f"its log {log_path} ends with:\n{_tail(log_path)}"
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
        with os.fdopen(_open_private(path, os.O_RDONLY), "r", errors="replace") as file:
            return "\n".join(file.read().splitlines()[-lines:])
    except (OSError, ZChatServerError):
        return "(no log)"


def local_status() -> dict[str, Any]:
    """What is known about the embedded default, without starting anything."""
    status: dict[str, Any] = {"running": False, "address": format_address(local_address())}
    state = read_state()
    if state is not None and is_our_server(state.pid, state.address):
        status.update(
            running=probe(state.address, timeout=1.0),
            address=format_address(state.address),
            pid=state.pid,
            path=state.path,
        )
    elif state is not None:
        status["stale"] = f"the state file names pid {state.pid}, which is not your zchat-nb server: ignored"
    status["data_dir"] = str(data_dir())
    return status


def stop_local_server(timeout: float = 10.0) -> bool:
    """Stop the embedded default; returns whether a running server was stopped.

    Signals only a process that is, at that moment, this user's zchat-nb server holding the
    recorded address: the pid is pinned with a pidfd first, so it cannot be reused in between.
    """
    state = read_state()
    if state is None:
        return False
    try:
        pidfd = os.pidfd_open(state.pid)
    except OSError:  # gone (or not ours to look at)
        clear_state(state.pid)
        return False
    try:
        if not is_our_server(state.pid, state.address):
            clear_state(state.pid)  # stale: the pid is another process now
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not select.select([pidfd], [], [], timeout)[0]:  # readable once it has exited
            raise ZChatServerError(
                f"the local server (pid {state.pid}) did not stop within {timeout:g} s; "
                f"kill it with `kill -9 {state.pid}`"
            )
    finally:
        os.close(pidfd)
    clear_state(state.pid)
    return True


def resolve_address(address: object = None, *, start: bool = True) -> Address:
    """The address to use: ``address``, else ``$ZCHAT_ADDRESS``, else the embedded default.

    The embedded default, named or not, is started if it is not running. ``start=False`` never
    starts it: its address is returned whether it runs or not.
    """
    if address is None and os.environ.get(ENV_ADDRESS):
        address = os.environ[ENV_ADDRESS]
    if address is not None:
        parsed = parse_address(address)
        # The local default named explicitly (JupyterLab's kernels get it from `zchat-nb demo`):
        # whoever asks for it brings it back, as connect() with no address does.
        if start and is_local_default(parsed):
            return ensure_local_server()
        return parsed
    if not start:
        state = running_server()
        return state.address if state is not None else local_address()
    return ensure_local_server()


# -- running a server in the foreground ------------------------------------------------------


def run_local(*, ready_fd: int | None = None, locked: bool = False, announce: bool = True) -> None:
    """Serve the local default until SIGTERM or SIGINT (``zchat-nb serve --local``).

    Its data, socket and state file are those of the data directory, so this brings back the
    server its clients knew, with its data. ``locked``: the caller already holds the data
    directory's lock and found no server running (:func:`ensure_local_server`).
    """
    os.umask(0o077)  # FileStorage's chat.fs, .index, .lock and .tmp, and the socket: ours only
    directory = data_dir()
    _make_files_private(directory)
    with contextlib.nullcontext() if locked else _locked():
        running = None if locked else running_server()
        if running is not None:
            raise ZChatServerError(
                f"the local default server already runs at {format_address(running.address)} "
                f"(pid {running.pid}); `zchat-nb stop` stops it"
            )
        path = directory / DATA_FILE
        if path.is_symlink():
            raise ZChatServerError(f"{path} is a symbolic link; zchat_nb follows no links there. Remove it")
        server = serve(path, unix=local_address())
        write_state(LocalState(server.address, os.getpid(), str(path)))
    _serve_until_stopped(server, ready_fd=ready_fd, announce=announce, local=True)


def run_foreground(
    path: str | None,
    host: str,
    port: int,
    *,
    ready_fd: int | None = None,
    ssl: ssl_module.SSLContext | None = None,
    announce: bool = True,
    storage: str | None = None,
    limits: ServerLimits | None = None,
) -> None:
    """Serve ``host:port`` until SIGTERM or SIGINT (``zchat-nb serve``)."""
    server = serve(path, host, port, ssl=ssl, storage=storage, limits=limits)
    _serve_until_stopped(server, ready_fd=ready_fd, announce=announce)


def _serve_until_stopped(
    server: Server, *, ready_fd: int | None, announce: bool, local: bool = False
) -> None:
    text = format_address(server.address)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    if announce:
        print(f"zchat_nb: ZEO server listening on {text} ({server.storage_text})", flush=True)
        if not isinstance(server.address, str):
            host = server.address[0]
            if host != "localhost" and not host.startswith("127.") and host != "::1":
                print(public_notice(server.address, tls=server.tls), flush=True)
    if ready_fd is not None:
        os.write(ready_fd, f"{text}\n".encode())
        os.close(ready_fd)
    try:
        server.wait()  # lock waits are interrupted by signals, so the handlers above run
    finally:
        server.stop()
        if local:
            clear_state(os.getpid())
