"""binder/: ``start`` brings up the local server in a fresh environment; two clients chat through it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import zchat_nb
from zchat_nb.net import parse_address

integration = pytest.mark.integration

BINDER = Path(__file__).resolve().parent.parent / "binder"


@pytest.fixture
def fresh_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment as bare as a new Binder container's: HOME, PATH, and a ZCHAT_HOME of its own.

    Stops the server ``binder/start`` started, with ``zchat-nb stop`` in that environment.
    """
    home = tmp_path / "home"
    home.mkdir()
    python_bin = os.path.dirname(sys.executable)  # the interpreter that has zchat_nb installed
    env = {"HOME": str(home), "PATH": f"{python_bin}:/usr/bin:/bin", "ZCHAT_HOME": str(home / "zchat")}
    yield env
    stopped = subprocess.run(
        ["env", "-i", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-m", "zchat_nb", "stop"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert stopped.returncode == 0, stopped.stderr


def run_start(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["env", "-i", *(f"{k}={v}" for k, v in env.items()), str(BINDER / "start"), *command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=BINDER.parent,
    )


def test_requirements_install_the_project_and_jupyterlab() -> None:
    lines = [ln.split("#")[0].strip() for ln in (BINDER / "requirements.txt").read_text().splitlines()]
    assert "-e ." in lines
    assert any(ln.startswith("jupyterlab") for ln in lines)


def test_start_is_executable_and_ends_with_exec() -> None:
    start = BINDER / "start"
    assert os.access(start, os.X_OK)
    text = start.read_text()
    assert text.startswith("#!/bin/bash\n")
    code = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert code[-1] == 'exec "$@"'


@integration
def test_start_exports_the_address_of_a_server_two_clients_chat_through(fresh_env: dict[str, str]) -> None:
    started = run_start(fresh_env, "python", "-c", "import os; print(os.environ['ZCHAT_ADDRESS'])")
    assert started.returncode == 0, started.stderr
    address = parse_address(started.stdout.strip())
    assert address[0] == "127.0.0.1"
    assert (Path(fresh_env["ZCHAT_HOME"]) / "chat.fs").exists()  # the server keeps the chat on disk

    with (
        zchat_nb.connect(address, user="alice") as alice,
        zchat_nb.connect(address, user="bob") as bob,
    ):
        bob_chat = bob.session("general")
        assert bob_chat.new_messages() == []
        sent = alice.session("general").add_message("hello from binder")
        assert bob_chat.new_messages(timeout=10) == [sent]

    again = run_start(fresh_env, "sh", "-c", 'echo "$ZCHAT_ADDRESS"')
    assert again.returncode == 0, again.stderr
    assert parse_address(again.stdout.strip()) == address  # the running server is found, not doubled


@integration
def test_start_passes_the_exit_code_of_the_command(fresh_env: dict[str, str]) -> None:
    assert run_start(fresh_env, "sh", "-c", "exit 7").returncode == 7
