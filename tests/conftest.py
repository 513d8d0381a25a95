"""Shared fixtures: an isolated data directory, ZEO servers in a thread or a child process, clients,
free ports.

The helpers behind them (shared with the benchmarks) are in ``tests/helpers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ZODB

import zchat_nb
from zchat_nb import ChatClient

from . import helpers
from .helpers import MakeClient, ServerProcess


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


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return helpers.free_port()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """``zchat-nb serve`` on a FileStorage in a child process: tests can SIGKILL it and start it again."""
    proc = ServerProcess(tmp_path / "chat.fs", helpers.free_port())
    proc.start()
    yield proc
    proc.kill()


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """``make_client(where, user, **options)``: a client, closed after the test.

    ``where`` is a ``ZODB.DB`` (a unit test's in-memory database: ``ChatClient(db, ...)``) or a
    server's address (``zchat_nb.connect(where, ...)``).
    """
    made: list[ChatClient] = []

    def make(where: object, user: str, **options: object) -> ChatClient:
        if isinstance(where, ZODB.DB):
            client = ChatClient(where, user=user, **options)
        else:
            client = zchat_nb.connect(where, user=user, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(make_client: MakeClient) -> ChatClient:
    """alice, on an in-memory database of her own (``ZODB.DB(None)``): for unit tests."""
    return make_client(ZODB.DB(None), "alice")
