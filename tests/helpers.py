"""Helpers that tests and benchmarks share: free ports, percentiles, ZEO servers in child processes.

The one home of these: ``tests/conftest.py`` turns them into fixtures, ``tests/browser.py`` and the
benchmarks (``python -m benchmarks.run`` from the repository root) import them from here. Nothing
here runs at import time.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from zchat_nb import ChatClient
from zchat_nb.local import spawn_server
from zchat_nb.net import Address, parse_address

__all__ = ["MakeClient", "ServerProcess", "free_port", "percentile"]

#: The type of conftest's ``make_client`` fixture: ``make_client(where, user, **options)``.
MakeClient = Callable[..., ChatClient]

#: Seconds a server process may take to listen.
SERVER_START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile() of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


def _state(task: Path) -> str:
    """A thread's state letter from ``/proc/PID/task/TID/stat`` ("" if it has exited)."""
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


class ServerProcess:
    """A ZEO server in a child process, so that a test can SIGKILL it and start it again.

    ``kind="zchat"`` runs ``zchat-nb serve`` (the hardened server users run), which announces its
    address through a pipe; ``kind="runzeo"`` runs ZEO's stock ``runzeo`` (the seed's server), ready
    once it logs that it listens. ``port=0`` picks a free port; a restart keeps the port. Output
    goes to ``log_path`` (default: nowhere). Use it as a context manager, or ``start()`` and
    ``stop()``/``kill()`` it.
    """

    def __init__(
        self, path: Path, port: int = 0, *, kind: str = "zchat", log_path: Path | None = None
    ) -> None:
        if kind not in ("zchat", "runzeo"):
            raise ValueError(f"unknown server kind {kind!r}: use 'zchat' or 'runzeo'")
        self.path = path
        self.port = port
        self.kind = kind
        self.log_path = log_path
        self.proc: subprocess.Popen[Any] | None = None
        self._log: IO[Any] | None = None
        self._drain: threading.Thread | None = None

    @property
    def address(self) -> Address:
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = SERVER_START_TIMEOUT) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"the {self.kind} server on port {self.port} is already running")
        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 (closed in _reap)
        if self.kind == "zchat":
            args = ["--path", str(self.path), "--port", str(self.port)]
            output = self._log if self._log is not None else subprocess.DEVNULL
            self.proc, line = spawn_server(args, timeout=timeout, output=output)
            if line:
                self.port = parse_address(line)[1]
        else:
            line = self._start_runzeo(timeout)
        if not line:
            self.kill()
            where = f"; see {self.log_path}" if self.log_path else ""
            raise RuntimeError(f"the {self.kind} server did not start on port {self.port}{where}")

    def _start_runzeo(self, timeout: float) -> str:
        if not self.port:
            self.port = free_port()
        cmd = [sys.executable, "-m", "ZEO.runzeo", "-a", f"127.0.0.1:{self.port}", "-f", str(self.path)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        ready = threading.Event()
        found: list[str] = []

        def drain(stdout: IO[bytes], log: IO[bytes] | None) -> None:
            # For the server's whole life: a full pipe would block its logging.
            for raw in stdout:
                if log is not None:
                    log.write(raw)
                    log.flush()
                if not ready.is_set() and b"listening on" in raw:
                    found.append(raw.decode(errors="replace").strip())
                    ready.set()
            ready.set()  # it exited

        assert self.proc.stdout is not None
        self._drain = threading.Thread(target=drain, args=(self.proc.stdout, self._log), daemon=True)
        self._drain.start()
        ready.wait(timeout)
        return found[0] if found else ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, as an operator stops a server; SIGKILL if it does not end in ``timeout`` s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a machine or process dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self._reap()

    @contextlib.contextmanager
    def stalled(self, timeout: float = 10.0) -> Iterator[None]:
        """SIGSTOP the server for the block, as a machine that hangs: nothing is answered, nothing closed.

        Returns once the kernel says every thread is stopped (``/proc/PID/stat`` state ``T``): the
        signal takes effect at the server's next entry into the kernel, and a server that is running
        meanwhile could still answer a request sent right after ``kill()``. SIGCONT at the end.
        """
        assert self.proc is not None and self.proc.poll() is None, "the server is not running"
        pid = self.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + timeout
            while not all(_state(task) == "T" for task in Path(f"/proc/{pid}/task").iterdir()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server (pid {pid}) did not stop within {timeout} s")
                time.sleep(0.001)  # the kernel gives no event for "stopped"; it takes microseconds
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait(timeout=10)
        if self._drain is not None:
            self._drain.join(5)  # it ends at the end of the output, now that the process has exited
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
        self.proc, self._drain, self._log = None, None, None

    def __enter__(self) -> ServerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Loads:
    """Counts the objects a client's storage loads (wraps its ``loadBefore``)."""

    def __init__(self, client: ChatClient) -> None:
        self.count = 0
        storage = client.db.storage
        real = storage.loadBefore

        def load_before(*args: Any) -> Any:
            self.count += 1
            return real(*args)

        storage.loadBefore = load_before

    def during(self, action: Callable[[], Any]) -> tuple[int, Any]:
        before = self.count
        result = action()
        return self.count - before, result
