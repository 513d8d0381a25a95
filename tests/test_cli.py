"""The zchat-nb command line: the demo (main job) and the terminal chat, as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import zchat_nb
from zchat_nb.cli import main
from zchat_nb.local import stop_local_server


def get_when_listening(url: str, timeout: float = 30.0) -> bytes:
    """GET ``url``; JupyterLab may log its URL a moment before it accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # nothing to wait on but the socket itself


@pytest.mark.integration
def test_demo_starts_the_local_server_and_jupyterlab_on_the_demo(zchat_home: Path, free_port: int) -> None:
    port, token = free_port, "zchat-test-token"
    lab_args = ["--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0"]
    lab_args += [f"--IdentityProvider.token={token}", f"--LabApp.workspaces_dir={zchat_home / 'ws'}"]
    if os.geteuid() == 0:
        lab_args.append("--allow-root")
    proc = subprocess.Popen(
        [sys.executable, "-m", "zchat_nb", "demo", *lab_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "ZCHAT_HOME": str(zchat_home)},
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # JupyterLab prints its URL once it serves
            seen.append(line)
            if f"127.0.0.1:{port}/" in line:
                break
        else:
            pytest.fail("JupyterLab never served:\n" + "".join(seen))
        assert f"chat server at unix:{zchat_home / 'server.sock'}" in "".join(seen)
        url = f"http://127.0.0.1:{port}/api/contents/chat_demo.ipynb?token={token}&content=0"
        assert json.loads(get_when_listening(url))["type"] == "notebook"
        assert (zchat_home / "notebooks" / "chat_demo.ipynb").exists()
        with zchat_nb.connect(user="after-demo") as client:  # the local default server it started
            client.session().add_message("the demo's server answers")
    finally:
        proc.terminate()
        proc.wait(30)
        stop_local_server()


@pytest.mark.integration
def test_terminal_chat_sends_lines_and_prints_incoming(server: zchat_nb.Server) -> None:
    address = "{}:{}".format(*server.address)
    with zchat_nb.connect(server.address, user="other") as other:
        other.session("lab").add_message("already there")
        proc = subprocess.Popen(
            [sys.executable, "-m", "zchat_nb", "chat", address, "--room", "lab", "--name", "term"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        assert "term in room 'lab'" in proc.stdout.readline()
        assert proc.stdout.readline().rstrip().endswith("other: already there")
        watcher = other.session("lab", backlog=0)
        assert watcher.new_messages() == []  # its cursor is at the end now
        proc.stdin.write("hi from the terminal\n")
        proc.stdin.flush()
        assert proc.stdout.readline().rstrip().endswith("term: hi from the terminal")
        # woken by the invalidation (a session made now could start before this client heard of it)
        assert [m.text for m in watcher.new_messages(timeout=10)] == ["hi from the terminal"]
        other.session("lab").add_message("reply")
        assert proc.stdout.readline().rstrip().endswith("other: reply")
        proc.stdin.write("/quit\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0


# -- mistakes on the command line: one line naming the fix, status 2 ---------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["export", "general", "-o", "{tmp}/missing/room.csv"],
            "the folder {tmp}/missing does not exist; mkdir -p",
        ),
        (["export", "general", "-o", "{tmp}"], "{tmp} is a directory; give a file name"),
        (["export", "general", "-o", "{tmp}/old.csv"], "{tmp}/old.csv exists; add --force to overwrite it"),
        (["pack", "--days", "nan"], "argument --days: 'nan' is not a number of days >= 0"),
        (["pack", "--days", "inf"], "argument --days: 'inf' is not a number of days >= 0"),
        (["serve", "--port", "70000"], "argument --port: '70000' is not a TCP port; give 1-65535, or 0"),
        (["serve", "--port", "-1"], "argument --port: '-1' is not a TCP port"),
        (["serve", "--path", "/proc/chat.fs"], "cannot write /proc/chat.fs (No such file or directory)"),
        (["serve", "--path", "{tmp}/missing/chat.fs"], "the folder {tmp}/missing does not exist"),
        (["serve", "--local", "--path", "{tmp}/chat.fs"], "--local takes no --path"),
        (
            ["certs", "{tmp}/class", "--days", "-5"],
            "argument --days: '-5' is not a whole number of days >= 1",
        ),
        (["certs", "{tmp}/class", "--students-file", "{tmp}/names.txt"], "{tmp}/names.txt does not exist"),
        (["certs", "{tmp}/class", "--students-file", "{tmp}"], "{tmp} is a directory; give a file of names"),
        (["chat", "--backlog", "-5"], "argument --backlog: '-5' is not a whole number of messages >= 0"),
        (["serve", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_command_line_mistake_is_one_line_naming_the_fix(
    args: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "old.csv").write_text("kept\n")
    tmp = str(tmp_path)
    assert main([arg.format(tmp=tmp) for arg in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert says.format(tmp=tmp) in err
    assert err.startswith(f"zchat-nb {args[0]}: ") and f"`zchat-nb {args[0]} --help`" in err
    assert (tmp_path / "old.csv").read_text() == "kept\n"  # nothing was overwritten
    assert not (tmp_path / "class").exists()  # nothing was made


@pytest.mark.integration
def test_export_overwrites_only_with_force(server: zchat_nb.Server, tmp_path: Path) -> None:
    with zchat_nb.connect(server.address, user="ann") as client:
        client.session("general").add_message("exported")
    out = tmp_path / "room.csv"
    out.write_text("old\n")
    address = ["--address", zchat_nb.net.format_address(server.address)]
    assert main(["export", "general", "-o", str(out), *address]) == 2
    assert out.read_text() == "old\n"
    assert main(["export", "general", "-o", str(out), "--force", *address]) == 0
    assert "exported" in out.read_text()


def test_status_of_a_stopped_local_default_names_the_command_that_brings_it_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status"]) == 3
    out, err = capsys.readouterr()
    assert json.loads(out)["running"] is False
    assert "`zchat-nb serve --local` brings it back with its data" in err
