"""Server lifecycle, addresses, the embedded default, and connection errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zchat_nb
from zchat_nb.local import local_status, read_state, stop_local_server

integration = pytest.mark.integration


def test_bad_address_given_to_connect_is_a_zchat_error() -> None:
    with pytest.raises(zchat_nb.ZChatConnectionError, match="bad server address 'nowhere:xx'"):
        zchat_nb.connect("nowhere:xx")


@integration
def test_no_server_listening_is_reported_quickly_with_the_way_out(free_port: int) -> None:
    port = free_port
    started = time.monotonic()
    with pytest.raises(zchat_nb.ZChatConnectionError) as info:
        zchat_nb.connect(("127.0.0.1", port))
    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "zchat-nb serve" in str(info.value)


@integration
def test_stop_is_safe_twice_and_server_is_a_context_manager() -> None:
    with zchat_nb.serve() as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        with zchat_nb.connect(server.address, user="a") as client:
            client.session().add_message("hi")
        assert server.status()["running"]
    server.stop()
    server.stop()
    assert server.status() == {"running": False}
    with pytest.raises(zchat_nb.ZChatConnectionError):
        zchat_nb.connect(server.address, connect_timeout=1)


@integration
def test_file_storage_keeps_messages_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "chat.fs"
    with zchat_nb.serve(path=path) as server, zchat_nb.connect(server.address, user="a") as client:
        client.session("general").add_message("kept")
    with zchat_nb.serve(path=path) as server, zchat_nb.connect(server.address, user="b") as client:
        assert [m.text for m in client.session("general").new_messages()] == ["kept"]


@integration
def test_port_in_use_is_a_clear_error(server: zchat_nb.Server) -> None:
    with pytest.raises(zchat_nb.ZChatServerError, match=f"{server.address[1]}.*--port 0"):
        zchat_nb.serve(port=server.address[1])


@integration
def test_zchat_address_names_the_server(monkeypatch: pytest.MonkeyPatch, server: zchat_nb.Server) -> None:
    monkeypatch.setenv("ZCHAT_ADDRESS", "{}:{}".format(*server.address))
    with zchat_nb.connect(user="a") as client:
        assert client.address == server.address


@integration
def test_embedded_default_is_started_once_and_shared(zchat_home: Path) -> None:
    """Two clients (here: two processes) calling connect() with no address share one local server."""
    code = (
        "import sys, zchat_nb\n"
        "c = zchat_nb.connect(user=sys.argv[1])\n"
        "c.session('general').add_message('from ' + sys.argv[1])\n"
        "print('%s:%d' % c.address)\n"
        "c.close()\n"
    )
    env = {**os.environ, "ZCHAT_HOME": str(zchat_home)}
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", code, name], env=env, stdout=subprocess.PIPE, text=True)
            for name in ("ann", "ben")
        ]
        addresses = {p.communicate(timeout=60)[0].strip() for p in procs}
        assert all(p.returncode == 0 for p in procs)
        assert len(addresses) == 1
        state = read_state()
        assert state is not None and "{}:{}".format(*state.address) in addresses
        assert Path(state.path).parent == zchat_home
        with zchat_nb.connect(user="cat") as client:
            got = sorted(m.text for m in client.session("general").new_messages())
        assert got == ["from ann", "from ben"]
        assert local_status()["running"] is True
    finally:
        assert stop_local_server() is True
    assert local_status()["running"] is False
    assert read_state() is None
    assert stop_local_server() is False


@integration
def test_cli_status_and_stop_without_a_server(zchat_home: Path) -> None:
    env = {**os.environ, "ZCHAT_HOME": str(zchat_home)}
    status = subprocess.run(
        [sys.executable, "-m", "zchat_nb", "status"], env=env, capture_output=True, text=True
    )
    assert status.returncode == 3 and '"running": false' in status.stdout
    stop = subprocess.run([sys.executable, "-m", "zchat_nb", "stop"], env=env, capture_output=True, text=True)
    assert stop.returncode == 0 and "no local server" in stop.stdout


@pytest.mark.parametrize("command", ["serve", "status", "stop", "chat"])
def test_every_command_has_help(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "zchat_nb", command, "--help"], capture_output=True, text=True, check=True
    )
    assert f"zchat-nb {command}" in out.stdout


@integration
def test_a_stale_state_file_does_not_send_clients_to_a_stranger(zchat_home: Path) -> None:
    """A recorded server whose process is gone is replaced, even if its port now answers."""
    from zchat_nb.local import LocalState, write_state

    with zchat_nb.serve() as stranger:  # some other program listening on the recorded port
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        write_state(LocalState(*stranger.address, dead.pid, str(zchat_home / "chat.fs")))
        try:
            with zchat_nb.connect(user="ann") as client:
                assert client.address != stranger.address
                assert read_state() is not None and read_state().pid != dead.pid
        finally:
            assert stop_local_server() is True


@integration
def test_a_client_reset_is_not_reported_as_an_error(
    server: zchat_nb.Server, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import socket
    import struct

    with caplog.at_level(logging.INFO, logger="ZEO.asyncio.server"):
        sock = socket.create_connection(server.address, timeout=10)
        sock.recv(4)  # the server's greeting has started: the connection is established
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, as when a kernel dies
        with zchat_nb.connect(server.address, user="next") as client:  # the server is still fine
            client.session().add_message("after the reset")
    resets = [r for r in caplog.records if "ConnectionReset" in r.getMessage()]
    assert resets and all(r.levelno == logging.INFO for r in resets)
