"""The local default: private to its user, trusted only when /proc says it is ours, back where it was."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zchat_nb
from zchat_nb.client import ClientEvent
from zchat_nb.local import (
    LocalState,
    ensure_local_server,
    is_our_server,
    local_address,
    read_state,
    restart_hint,
    spawn_server,
    stop_local_server,
    write_state,
)
from zchat_nb.widget import ChatWidget

from .test_widget import comms, recorder  # noqa: F401 (a fixture and a helper)

pytestmark = pytest.mark.integration

RECONNECT_WITHIN = 5.0


def zchat_nb_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ZCHAT_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "zchat_nb", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def local_default(zchat_home: Path) -> Iterator[str]:
    """The local default server, started as connect() starts it; stopped afterwards."""
    address = ensure_local_server()
    assert isinstance(address, str)
    yield address
    stop_local_server()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process of ours, whose pid a stale state file may name."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


# -- private to its user ---------------------------------------------------------------------


def test_the_local_default_listens_on_a_socket_in_a_private_directory(
    zchat_home: Path, local_default: str
) -> None:
    assert local_default == str(zchat_home / "server.sock") == local_address()
    assert stat.S_IMODE(zchat_home.stat().st_mode) == 0o700
    with zchat_nb.connect(user="ann") as client:
        assert client.address == local_default
        client.session().add_message("private")
    files = {entry.name: entry.stat(follow_symlinks=False) for entry in os.scandir(zchat_home)}
    expected = {"chat.fs", "chat.fs.index", "chat.fs.lock", "server.json", "server.lock", "server.log"}
    assert expected <= set(files)
    for name, info in files.items():
        if stat.S_ISSOCK(info.st_mode):
            assert stat.S_IMODE(info.st_mode) & 0o077 == 0, name
        elif stat.S_ISDIR(info.st_mode):  # the blob directory of shared pictures
            assert stat.S_IMODE(info.st_mode) == 0o700, f"{name} is {stat.S_IMODE(info.st_mode):o}"
        else:
            assert stat.S_IMODE(info.st_mode) == 0o600, f"{name} is {stat.S_IMODE(info.st_mode):o}"


def test_an_existing_data_directory_of_ours_is_made_private(zchat_home: Path) -> None:
    zchat_home.chmod(0o755)
    (zchat_home / "chat.fs").write_bytes(b"")  # as an older zchat_nb left it: 0644
    (zchat_home / "chat.fs").chmod(0o644)
    address = ensure_local_server()
    try:
        assert stat.S_IMODE(zchat_home.stat().st_mode) == 0o700
        assert stat.S_IMODE((zchat_home / "chat.fs").stat().st_mode) == 0o600
        assert address == local_address()
    finally:
        assert stop_local_server() is True


def test_a_data_directory_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/tmp")  # root's
    monkeypatch.setenv("ZCHAT_HOME", str(theirs))
    with pytest.raises(zchat_nb.ZChatServerError, match=f"{theirs} belongs to another user.*ZCHAT_HOME"):
        zchat_nb.connect(user="ann")
    if os.geteuid() == 0:
        assert stat.S_IMODE(theirs.stat().st_mode) == 0o755  # not ours to change


def _as_another_user(action: str, path: str) -> int:
    """Fork, become uid 65534, try ``action`` on ``path``; the child's exit code: 0 if it worked."""
    pid = os.fork()
    if pid == 0:  # the child: no threads, no pytest, only this
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            if action == "connect":
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(2)
                    sock.connect(path)
            else:
                with open(path, "rb") as file:
                    file.read(1)
            code = 0
        except PermissionError:
            code = 13
        except BaseException:
            code = 2
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_another_user_can_neither_connect_nor_read_the_data(zchat_home: Path, local_default: str) -> None:
    with zchat_nb.connect(user="ann") as client:
        client.session().add_message("for ann's eyes")
    # Even if the directory were opened up, the socket and the file stay the owner's.
    assert _as_another_user("connect", local_default) == 13
    assert _as_another_user("read", str(zchat_home / "chat.fs")) == 13
    zchat_home.chmod(0o711)
    try:
        assert _as_another_user("read", str(zchat_home / "chat.fs")) == 13
    finally:
        zchat_home.chmod(0o700)


def test_a_planted_lock_link_truncates_nothing(zchat_home: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (zchat_home / "server.lock").symlink_to(precious)
    with pytest.raises(zchat_nb.ZChatServerError, match=r"server\.lock is a symbolic link.*Remove"):
        zchat_nb.connect(user="ann")
    assert precious.read_text() == "keep me"
    result = zchat_nb_cli("serve", "--local", home=zchat_home)
    assert result.returncode == 1 and "symbolic link" in result.stderr and "Traceback" not in result.stderr
    assert precious.read_text() == "keep me"


def test_a_planted_state_link_is_neither_followed_nor_overwritten(zchat_home: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious.json"
    precious.write_text('{"address": "127.0.0.1:1", "pid": 1, "path": "x"}')
    (zchat_home / "server.json").symlink_to(precious)
    assert read_state() is None  # not read through the link
    write_state(LocalState(local_address(), os.getpid(), str(zchat_home / "chat.fs")))
    assert precious.read_text() == '{"address": "127.0.0.1:1", "pid": 1, "path": "x"}'
    assert not (zchat_home / "server.json").is_symlink()
    state = read_state()
    assert state is not None and state.pid == os.getpid()


# -- a stale state file ----------------------------------------------------------------------


def test_stop_never_signals_a_process_that_is_not_our_server(
    zchat_home: Path, sleeper: subprocess.Popen[bytes], server: zchat_nb.Server
) -> None:
    for recorded in (local_address(), server.address):  # the socket, or a port a stranger holds now
        write_state(LocalState(recorded, sleeper.pid, str(zchat_home / "chat.fs")))
        assert not is_our_server(sleeper.pid, recorded)
        stopped = zchat_nb_cli("stop", home=zchat_home)
        assert stopped.returncode == 0 and "no local server was running" in stopped.stdout
        assert sleeper.poll() is None  # alive
        assert read_state() is None  # the stale record is gone


def test_connect_does_not_talk_to_whoever_holds_a_recorded_port(
    zchat_home: Path, sleeper: subprocess.Popen[bytes], server: zchat_nb.Server
) -> None:
    write_state(LocalState(server.address, sleeper.pid, str(zchat_home / "chat.fs")))
    with zchat_nb.connect(user="ann") as client:
        assert client.address == local_address() != server.address
        state = read_state()
        assert state is not None and state.pid != sleeper.pid and is_our_server(state.pid, state.address)
    assert server.status()["connections"] == 0
    assert stop_local_server() is True
    assert sleeper.poll() is None


def test_our_server_is_recognised_and_nothing_else(local_default: str, server: zchat_nb.Server) -> None:
    state = read_state()
    assert state is not None and is_our_server(state.pid, local_default)
    assert not is_our_server(state.pid, server.address)  # ours, but not holding that address
    assert not is_our_server(os.getpid(), local_default)  # holds no such socket
    assert not is_our_server(1, local_default)


# -- back where it was -----------------------------------------------------------------------


def _watch(client: zchat_nb.ChatClient) -> tuple[threading.Event, threading.Event]:
    connected, disconnected = threading.Event(), threading.Event()

    def on_event(event: ClientEvent) -> None:
        if event.kind == "connected":
            connected.set()
        elif event.kind == "disconnected":
            disconnected.set()

    client.subscribe(on_event)
    return connected, disconnected


def test_a_client_follows_the_local_default_through_stop_and_serve_local(
    zchat_home: Path,
    local_default: str,
    comms: Any,  # noqa: F811
) -> None:
    ann = zchat_nb.connect(user="ann", timeout=1.0)
    widget = ChatWidget(client=ann, poll_interval=0.2)
    restarted: subprocess.Popen[bytes] | None = None
    try:
        ann_chat = ann.session("general")
        rec = recorder(widget)
        rec.wait_state("status", lambda status: status == "connected")
        connected, disconnected = _watch(ann)

        stopped = zchat_nb_cli("stop", home=zchat_home)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert disconnected.wait(10)
        rec.wait_state("status", lambda status: status == "reconnecting")
        assert "`zchat-nb serve --local` brings it back with its data" in widget.status_text
        with pytest.raises(zchat_nb.ZChatSendError):
            widget.send_message("into the void").result(10)
        rec.wait_state("error", lambda error: error.startswith("not sent"))
        connected.clear()

        start = rec.mark()
        started_at = time.monotonic()
        restarted, line = spawn_server(["--local"], timeout=30)  # `zchat-nb serve --local`
        assert line == f"unix:{local_default}"
        with zchat_nb.connect(user="ben") as ben:  # sends while ann is still away
            ben_chat = ben.session("general")
            ben_chat.add_message("sent meanwhile")
            assert [m.text for m in ben_chat.new_messages()] == ["sent meanwhile"]
            assert connected.wait(RECONNECT_WITHIN), "ann did not reconnect"
            assert time.monotonic() - started_at < RECONNECT_WITHIN
            assert [m.text for m in ann_chat.new_messages(timeout=10)] == ["sent meanwhile"]
            ann_chat.add_message("ann is back")
            assert [m.text for m in ben_chat.new_messages(timeout=10)] == ["ann is back"]
        rec.wait_state("status", lambda status: status == "connected", start)
        rec.wait_state("error", lambda error: error == "", start)
        assert widget.error == ""
    finally:
        widget.close()
        ann.close()
        if restarted is not None:
            restarted.terminate()
            assert restarted.wait(30) == 0


def test_serve_local_refuses_a_second_server_and_other_options(zchat_home: Path, local_default: str) -> None:
    again = zchat_nb_cli("serve", "--local", home=zchat_home)
    assert again.returncode == 1 and "already runs at unix:" in again.stderr
    assert "zchat-nb stop" in again.stderr
    mixed = zchat_nb_cli("serve", "--local", "--port", "8100", home=zchat_home)
    assert mixed.returncode == 2 and "--local takes no --port" in mixed.stderr


def test_hints_name_the_command_that_brings_back_this_server_with_its_data(
    zchat_home: Path, tmp_path: Path
) -> None:
    assert "`zchat-nb serve --local` brings it back with its data" in restart_hint(local_address())
    elsewhere = str(tmp_path / "other-home" / "server.sock")  # another data directory's default
    assert f"`ZCHAT_HOME={tmp_path / 'other-home'} zchat-nb serve --local`" in restart_hint(elsewhere)
    assert "zchat-nb serve --port 8100 --path FILE" in restart_hint(("127.0.0.1", 8100))


def test_the_local_default_named_explicitly_is_started_too(
    zchat_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JupyterLab's kernels from `zchat-nb demo` have ZCHAT_ADDRESS=unix:...: they bring it back."""
    monkeypatch.setenv("ZCHAT_ADDRESS", f"unix:{zchat_home / 'server.sock'}")
    try:
        with zchat_nb.connect(user="ann") as client:
            assert client.address == str(zchat_home / "server.sock")
    finally:
        assert stop_local_server() is True


def test_a_tcp_server_away_names_its_port_and_data(free_port: int) -> None:
    with pytest.raises(zchat_nb.ZChatConnectionError) as info:
        zchat_nb.connect(("127.0.0.1", free_port), connect_timeout=1)
    assert f"zchat-nb serve --port {free_port} --path FILE" in str(info.value)


def test_a_port_taken_by_another_program_is_named(server: zchat_nb.Server) -> None:
    port = server.address[1]
    with pytest.raises(zchat_nb.ZChatServerError, match=f"port {port} is taken by another program"):
        zchat_nb.serve(port=port)


def test_zchat_join_to_a_server_away_names_its_port_and_data(free_port: int) -> None:
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "zchat_nb")
    try:
        with pytest.raises(UsageError) as info:
            shell.run_line_magic("zchat", f"join 127.0.0.1:{free_port}")
    finally:
        shell.run_line_magic("unload_ext", "zchat_nb")
    message = str(info.value)
    assert f"no ZEO server answers at 127.0.0.1:{free_port}" in message
    assert f"`zchat-nb serve --port {free_port} --path FILE`" in message  # the same port, its data
