"""The lesson notebooks (notebooks/lessons/) run top to bottom under nbclient, as committed.

Each lesson runs in a copy of the lessons folder in a temporary directory (lessons write files next
to themselves), with ``ZCHAT_HOME`` pointing into that directory so that no user state is touched.
Every lesson starts its ZEO server with ``zchat_nb.serve()`` and stops it at the end; a probe cell
run after the lesson shows that no server, ZEO client or child process is left behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbclient
import nbformat
import pytest

LESSONS_DIR = Path(__file__).resolve().parent.parent / "notebooks" / "lessons"
LESSONS = sorted(LESSONS_DIR.glob("[0-9][0-9]_*.ipynb"))


# Run in the kernel after the last cell of a lesson: what the lesson left running.
LEFTOVERS_PROBE = """
import os, threading
threads = sorted(t.name for t in threading.enumerate() if "StorageServer" in t.name or "zeo client" in t.name)
try:
    os.waitpid(-1, os.WNOHANG)  # (0, 0): a child process is still running; reaps a finished one
    children = "a child process"
except ChildProcessError:
    children = "none"
print("leftovers:", threads, children)
"""


def _tagged(nb: object, tag: str) -> list:
    return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


def test_there_are_six_lessons_in_order() -> None:
    assert [path.name[:3] for path in LESSONS] == ["01_", "02_", "03_", "04_", "05_", "06_"]


@pytest.mark.parametrize("notebook", LESSONS, ids=lambda path: path.stem)
def test_lesson_is_committed_without_outputs_and_has_one_checked_exercise(notebook: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is None and cell.outputs == [], f"{notebook.name} has outputs"
    exercise, check = _tagged(nb, "exercise"), _tagged(nb, "check")
    assert len(exercise) == 1 and len(check) == 1, "one exercise cell and one check cell"
    assert nb.cells.index(check[0]) == nb.cells.index(exercise[0]) + 1, "the check follows the exercise"


@pytest.mark.integration
@pytest.mark.parametrize("notebook", LESSONS, ids=lambda path: path.stem)
def test_lesson_runs_top_to_bottom(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZCHAT_HOME", str(tmp_path / "zchat-home"))
    monkeypatch.delenv("ZCHAT_ADDRESS", raising=False)
    work = tmp_path / "lessons"
    shutil.copytree(LESSONS_DIR, work, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    nb = nbformat.read(work / notebook.name, as_version=4)
    probe = nbformat.v4.new_code_cell(LEFTOVERS_PROBE)
    nb.cells.append(probe)

    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    (check,) = _tagged(nb, "check")
    printed = "".join(out.get("text", "") for out in check.outputs if out.output_type == "stream")
    assert "Correct" in printed, f"the exercise check of {notebook.name} printed: {printed!r}"
    left = "".join(out.get("text", "") for out in probe.outputs if out.output_type == "stream")
    assert left.strip() == "leftovers: [] none", f"{notebook.name} left running: {left!r}"
    # A lesson shows students no tracebacks or log noise: nothing is printed to stderr.
    stderr = [
        out.text
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.output_type == "stream" and out.name == "stderr"
    ]
    assert stderr == [], f"{notebook.name} printed to stderr: {stderr}"
