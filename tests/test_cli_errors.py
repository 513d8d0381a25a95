"""Every CLI mistake is one line that names the fix (no traceback, no usage block)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zchat_nb.cli import main


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zchat_nb", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


@pytest.mark.parametrize(
    "args, fix",
    [
        (["serve", "--port", "70000"], "1 to 65535"),
        (["serve", "--port", "x"], "a port"),
        (["pack", "--days", "nan"], "0 or more"),
        (["pack", "--days", "-1"], "0 or more"),
        (["certs", "DIR", "--days", "-5"], "1 or more"),
        (["chat", "--backlog", "-5"], "0 or more"),
    ],
)
def test_bad_numbers_are_one_line_errors(args: list[str], fix: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fix in result.stderr and "Traceback" not in result.stderr


def test_bad_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["export", "general", "-o", str(tmp_path / "missing" / "x.csv")], "does not exist"),
        (["export", "general", "-o", str(tmp_path)], "is a folder"),
        (["certs", str(tmp_path / "c"), "--students-file", str(tmp_path / "nope.txt")], "one student name"),
        (["serve", "--path", str(tmp_path / "missing" / "chat.fs")], "does not exist"),
        (["serve", "--path", "/proc/chat.fs"], "not writable"),
    ]
    existing = tmp_path / "out.csv"
    existing.write_text("keep me")
    cases.append((["export", "general", "-o", str(existing)], "--force"))
    for args, fix in cases:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fix in err, (args, err)
    assert existing.read_text() == "keep me"
