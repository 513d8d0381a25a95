"""The lesson notebooks (notebooks/lessons/) run under nbclient twice: as committed, and solved.

As committed, each exercise is unsolved and its check cell must fail with a message that says what
to do; with the solution kept in this file put in place of the placeholder, every cell passes (the
lessons assert what they claim about the live objects, so a claim that stops being true fails here).

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


# The answers, kept out of the notebooks (which ship the exercises unsolved): the placeholder in the
# exercise cell, and what replaces it.
SOLUTIONS = {
    "01_persistence": (
        "...  # your turn: one call, so that the message outlives the restarts",
        "transaction.commit()",
    ),
    "02_transactions_isolation": (
        "...  # your turn: one line, so that Bob sees Alice's new message",
        "tm_bob.begin()",
    ),
    "03_conflicts": ("alice_can_add = ...  # your turn: a number", "alice_can_add = 5"),
    "04_volatile_attributes": (
        'raise NotImplementedError("your turn: write read_after")',
        "items = list(chat._messages.items(min=cursor, excludemin=True))\n"
        "    new_cursor = items[-1][0] if items else cursor\n"
        "    return [message for _, message in items], new_cursor",
    ),
    "05_btrees": (
        "last_minute = ...  # your turn: the texts with keys from last - 60 to last, by a range read",
        "last_minute = list(room._messages.values(min=last - 60, max=last))",
    ),
    "06_zeo_on_the_wire": (
        'answer = {"invalidations": ..., "objects_each": ...}  # your turn: two numbers',
        'answer = {"invalidations": 3, "objects_each": 1}',
    ),
    "07_blobs": (
        'raise NotImplementedError("your turn: find the blob and read its first 8 bytes")',
        "blob = conn.root()[BLOBS_KEY][attachment.writer][attachment.key]\n"
        '    with blob.open("r") as f:\n'
        "        return f.read(8)",
    ),
}

# What the check cell of each lesson says when the exercise is run as shipped.
SHIPPED_FAILURES = {
    "01_persistence": "Not yet: the message is not in the database after the restart",
    "02_transactions_isolation": "Not yet: Bob still reads his old snapshot",
    "03_conflicts": "Not done yet: in the exercise cell, replace `...` with the number",
    "04_volatile_attributes": "Not done yet: in the exercise cell, replace the `raise NotImplementedError`",
    "05_btrees": "Not done yet: in the exercise cell, replace `...` with a range read",
    "06_zeo_on_the_wire": "Not done yet: in the exercise cell, replace each `...` with a number",
    "07_blobs": "Not done yet: in the exercise cell, replace the `raise NotImplementedError`",
}


def _tagged(nb: object, tag: str) -> list:
    return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


def test_there_are_seven_lessons_in_order() -> None:
    assert [path.name[:3] for path in LESSONS] == ["01_", "02_", "03_", "04_", "05_", "06_", "07_"]
    assert sorted(SOLUTIONS) == sorted(SHIPPED_FAILURES) == [path.stem for path in LESSONS]


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


def _exercise_source(stem: str, source: str) -> str:
    """The exercise cell of lesson ``stem`` with the solution kept here put in place of its placeholder."""
    placeholder, solution = SOLUTIONS[stem]
    assert source.count(placeholder) == 1, f"the exercise of {stem} lost its placeholder {placeholder!r}"
    return source.replace(placeholder, solution)


def _run_lesson(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, solved: bool) -> object:
    """Run a copy of the lesson in a kernel (with the solution filled in if ``solved``)."""
    monkeypatch.setenv("ZCHAT_HOME", str(tmp_path / "zchat-home"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # what a lesson left behind, when it stops half-way
    monkeypatch.delenv("ZCHAT_ADDRESS", raising=False)
    work = tmp_path / "lessons"
    shutil.copytree(LESSONS_DIR, work, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    nb = nbformat.read(work / notebook.name, as_version=4)
    if solved:
        (exercise,) = _tagged(nb, "exercise")
        exercise.source = _exercise_source(notebook.stem, exercise.source)
    nb.cells.append(nbformat.v4.new_code_cell(LEFTOVERS_PROBE))
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    return nb


@pytest.mark.parametrize("notebook", LESSONS, ids=lambda path: path.stem)
def test_lesson_ships_its_exercise_unsolved(notebook: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
    (exercise,) = _tagged(nb, "exercise")
    placeholder, solution = SOLUTIONS[notebook.stem]
    assert placeholder in exercise.source and solution not in exercise.source
    assert "..." in placeholder or "NotImplementedError" in placeholder


@pytest.mark.integration
@pytest.mark.parametrize("notebook", LESSONS, ids=lambda path: path.stem)
def test_lesson_as_shipped_fails_its_check_with_a_helpful_message(
    notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(nbclient.exceptions.CellExecutionError) as failed:
        _run_lesson(notebook, tmp_path, monkeypatch, solved=False)
    nb = nbformat.read(notebook, as_version=4)
    (check,) = _tagged(nb, "check")
    assert failed.value.ename == "AssertionError", f"{notebook.name}: {failed.value}"
    assert SHIPPED_FAILURES[notebook.stem] in failed.value.evalue
    assert "the exercise cell" in failed.value.evalue  # it says where to go
    # It is the check that failed: every cell before it ran.
    assert check.source.strip().splitlines()[0] in str(failed.value)


@pytest.mark.integration
@pytest.mark.parametrize("notebook", LESSONS, ids=lambda path: path.stem)
def test_lesson_with_the_solution_runs_top_to_bottom(
    notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = _run_lesson(notebook, tmp_path, monkeypatch, solved=True)
    (check,) = _tagged(nb, "check")
    probe = nb.cells[-1]
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
