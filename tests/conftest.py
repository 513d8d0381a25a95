"""Shared fixtures: an isolated data directory, in-thread and out-of-process ZEO servers."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import zchat_nb
from zchat_nb.server import spawn_server


@pytest.fixture(autouse=True)
def zchat_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data directory and no $ZCHAT_ADDRESS: the user's state is never touched."""
    home = tmp_path_factory.mktemp("zchat-home")
    monkeypatch.setenv("ZCHAT_HOME", str(home))
    monkeypatch.delenv("ZCHAT_ADDRESS", raising=False)
    return home


@pytest.fixture
def server() -> Iterator[zchat_nb.Server]:
    """A hardened ZEO server with in-memory storage, in a thread of the test process."""
    with zchat_nb.serve() as srv:
        yield srv


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[zchat_nb.Server]:
    """A hardened ZEO server on a FileStorage (conflict resolution as in production)."""
    with zchat_nb.serve(path=tmp_path / "chat.fs") as srv:
        yield srv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``zchat-nb serve`` in a child process, so that tests can SIGKILL it and start it again."""

    def __init__(self, path: Path, port: int) -> None:
        self.path = path
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = 30.0) -> None:
        args = ["--path", str(self.path), "--port", str(self.port)]
        self.proc, line = spawn_server(args, timeout=timeout)
        if not line:
            self.kill()
            raise RuntimeError(f"zchat-nb serve did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a machine or process dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "chat.fs", free_port())
    proc.start()
    yield proc
    proc.kill()
