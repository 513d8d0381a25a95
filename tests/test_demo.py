"""``zchat-nb demo``: JupyterLab's command line, the demo folder, the advice in the demo notebook,
and what happens to the chat server when JupyterLab fails to start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from zchat_nb.demo import DEMO_NOTEBOOK, LESSONS_DIR, ROOT_NOTICE, lab_command, prepare_demo_dir
from zchat_nb.local import local_status, stop_local_server

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ROOT = NOTEBOOKS.parent


def test_as_root_jupyterlab_gets_allow_root_with_a_notice(tmp_path: Path) -> None:
    cmd, notices = lab_command(tmp_path, DEMO_NOTEBOOK, ["--no-browser"], euid=0)
    assert cmd.count("--allow-root") == 1 and cmd[-1] == DEMO_NOTEBOOK
    assert cmd[:3] == [sys.executable, "-m", "jupyterlab"] and f"--ServerApp.root_dir={tmp_path}" in cmd
    assert notices == [ROOT_NOTICE] and "--allow-root" in ROOT_NOTICE


@pytest.mark.parametrize("given", ["--allow-root", "--ServerApp.allow_root=True"])
def test_as_root_an_allow_root_the_user_gave_is_not_added_again(tmp_path: Path, given: str) -> None:
    cmd, notices = lab_command(tmp_path, DEMO_NOTEBOOK, ["--no-browser", given], euid=0)
    assert [a for a in cmd if a.startswith(("--allow-root", "--ServerApp.allow_root"))] == [given]
    assert notices == []


def test_as_another_user_nothing_is_added(tmp_path: Path) -> None:
    cmd, notices = lab_command(tmp_path, DEMO_NOTEBOOK, ["--port=8899"], euid=1000)
    assert "--allow-root" not in cmd and notices == [] and "--port=8899" in cmd


def test_demo_folder_holds_the_demo_and_every_lesson(tmp_path: Path) -> None:
    notebook = prepare_demo_dir(tmp_path / "demo", NOTEBOOKS)
    assert (
        notebook == tmp_path / "demo" / DEMO_NOTEBOOK
        and notebook.read_bytes() == (NOTEBOOKS / DEMO_NOTEBOOK).read_bytes()
    )
    shipped = sorted(path.name for path in (NOTEBOOKS / "lessons").glob("*.ipynb"))
    copied = sorted(path.name for path in (tmp_path / "demo" / LESSONS_DIR).glob("*.ipynb"))
    assert copied == shipped and len(shipped) == 6


def test_demo_folder_keeps_what_a_student_wrote(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    prepare_demo_dir(workdir, NOTEBOOKS)
    lesson = next((workdir / LESSONS_DIR).glob("01_*.ipynb"))
    lesson.write_text(lesson.read_text().replace("Lesson 1", "My lesson 1"))
    (workdir / DEMO_NOTEBOOK).write_text("{}")
    prepare_demo_dir(workdir, NOTEBOOKS)
    assert "My lesson 1" in lesson.read_text() and (workdir / DEMO_NOTEBOOK).read_text() == "{}"


def test_demo_notebook_advises_a_new_notebook_and_a_docked_output_view() -> None:
    nb = nbformat.read(NOTEBOOKS / DEMO_NOTEBOOK, as_version=4)
    text = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    # The old advice replaced the notebook's only kernel, and both widgets vanished.
    assert "Change Kernel → Start a new kernel" not in text and "Change Kernel -> Start" not in text
    assert "File → New → Notebook" in text
    assert "%load_ext zchat_nb" in text and "%zchat join" in text
    assert "Create New View for Output" in text
    assert "`lessons` folder beside this notebook" in text


@pytest.mark.integration
def test_when_jupyterlab_fails_the_server_the_demo_started_is_stopped(zchat_home: Path) -> None:
    with socket.socket() as taken:  # JupyterLab cannot listen here, and may not try another port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert not local_status()["running"]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "zchat_nb",
                "demo",
                "--dir",
                str(zchat_home / "demo"),
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={port}",
                "--ServerApp.port_retries=0",
                f"--LabApp.workspaces_dir={zchat_home / 'ws'}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "ZCHAT_HOME": str(zchat_home), "PYTHONPATH": str(ROOT)},
        )
    try:
        assert done.returncode != 0, done.stdout + done.stderr
        assert "JupyterLab failed" in done.stderr and "stopped the chat server" in done.stderr, done.stderr
        assert not local_status()["running"], "the demo left its chat server running"
        if os.geteuid() == 0:
            assert ROOT_NOTICE in done.stdout
        assert sorted(p.name for p in (zchat_home / "demo" / LESSONS_DIR).iterdir())[0].startswith("01_")
    finally:
        stop_local_server()
