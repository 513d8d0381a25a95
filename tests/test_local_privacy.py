"""The local default is private to its user: its folder, its files, its socket, its pid."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import zchat_nb
from zchat_nb.local import (
    LocalState,
    data_dir,
    ensure_local_server,
    is_our_server,
    read_state,
    stop_local_server,
    write_state,
)

pytestmark = pytest.mark.integration


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_local_default_is_private(zchat_home: Path) -> None:
    zchat_home.chmod(0o755)  # as an older version left it
    try:
        address = ensure_local_server()
        assert isinstance(address, str) and Path(address).parent == zchat_home  # a Unix socket
        with zchat_nb.connect(user="ann") as client:
            client.session().add_message("private")
        assert mode(zchat_home) == 0o700
        for name in ("chat.fs", "chat.fs.index", "server.json", "server.lock", "server.log"):
            path = zchat_home / name
            if path.exists():
                assert mode(path) & 0o077 == 0, f"{name} is {oct(mode(path))}"
        assert stat.S_ISSOCK((zchat_home / "server.sock").lstat().st_mode)
    finally:
        assert stop_local_server() is True


def test_a_planted_lock_symlink_does_not_truncate_its_target(zchat_home: Path, tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me")
    (zchat_home / "server.lock").symlink_to(victim)
    with pytest.raises(zchat_nb.ZChatServerError, match="symlink"):
        ensure_local_server()
    assert victim.read_text() == "do not truncate me"


def test_a_planted_state_symlink_is_not_followed(zchat_home: Path, tmp_path: Path) -> None:
    victim = tmp_path / "precious.json"
    victim.write_text('{"host": "127.0.0.1", "port": 1, "pid": 1, "path": "x"}')
    (zchat_home / "server.json").symlink_to(victim)
    assert read_state() is None
    (zchat_home / "server.tmp").symlink_to(victim)
    write_state(LocalState("", 0, os.getpid(), "x", "/nowhere"))
    assert victim.read_text().startswith('{"host": "127.0.0.1", "port": 1')


def test_stop_never_signals_a_process_that_is_not_our_server(zchat_home: Path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with zchat_nb.serve() as stranger:  # something that answers at the recorded address
            write_state(LocalState(*stranger.address, bystander.pid, str(zchat_home / "chat.fs")))
            assert not is_our_server(bystander.pid)
            assert stop_local_server() is False
            assert bystander.poll() is None  # not signalled
            assert read_state() is None  # the stale record is gone
    finally:
        bystander.kill()
        bystander.wait()


def test_a_data_dir_that_is_a_symlink_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "someone-elses"
    real.mkdir()
    link = tmp_path / "home-link"
    link.symlink_to(real)
    monkeypatch.setenv("ZCHAT_HOME", str(link))
    with pytest.raises(zchat_nb.ZChatServerError, match="not a directory of yours"):
        data_dir()


def test_the_local_default_restarts_on_its_socket_with_its_data(zchat_home: Path) -> None:
    first = ensure_local_server()
    with zchat_nb.connect(user="ann") as client:
        client.session().add_message("kept")
    state = read_state()
    assert state is not None
    os.kill(state.pid, 9)  # a crash: the socket file stays behind
    try:
        assert ensure_local_server() == first
        with zchat_nb.connect(user="ben") as client:
            assert [m.text for m in client.session().new_messages()] == ["kept"]
    finally:
        assert stop_local_server() is True
