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
from zchat_nb.local import stop_local_server

pytestmark = pytest.mark.integration


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
        assert "chat server at unix:" in "".join(seen)  # the local default: a private Unix socket
        url = f"http://127.0.0.1:{port}/api/contents/chat_demo.ipynb?token={token}&content=0"
        assert json.loads(get_when_listening(url))["type"] == "notebook"
        assert (zchat_home / "notebooks" / "chat_demo.ipynb").exists()
        with zchat_nb.connect(user="after-demo") as client:  # the local default server it started
            client.session().add_message("the demo's server answers")
    finally:
        proc.terminate()
        proc.wait(30)
        stop_local_server()


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
        proc.stdin.write("hi from the terminal\n")
        proc.stdin.flush()
        assert proc.stdout.readline().rstrip().endswith("term: hi from the terminal")
        watcher = other.session("lab", backlog=1)
        assert [m.text for m in watcher.new_messages(timeout=10)] == ["hi from the terminal"]
        other.session("lab").add_message("reply")
        assert proc.stdout.readline().rstrip().endswith("other: reply")
        proc.stdin.write("/quit\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
