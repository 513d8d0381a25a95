"""``zchat-nb chat`` in a real pseudo-terminal, read back through a terminal emulator (pyte).

The screen is what a person sees: an incoming message must appear above the prompt while the
half-typed line stays intact, and the prompt must not be garbled by own sends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pyte
import pytest

import zchat_nb
from zchat_nb.model import Message
from zchat_nb.terminal import format_message, terminal_safe

ROOT = Path(__file__).resolve().parent.parent
COLUMNS, LINES = 100, 30
PROMPT = "term@lab> "


class Terminal:
    """A child process on a pty, and the screen a VT100 terminal would show for its output."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env["TERM"] = "xterm"
        self.child = pexpect.spawn(
            sys.executable, args, env=env, dimensions=(LINES, COLUMNS), encoding=None, timeout=30
        )
        self.screen = pyte.Screen(COLUMNS, LINES)
        # Answer the terminal's reports (prompt_toolkit asks where the cursor is) as a terminal does.
        self.screen.write_process_input = lambda data: self.child.send(data.encode())  # type: ignore[method-assign]
        self.stream = pyte.ByteStream(self.screen)

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(line for line in self.lines() if line)

    def wait_for(self, what: str, check: Callable[[list[str]], bool], timeout: float = 20.0) -> None:
        """Read output into the screen until ``check(lines)`` holds; fail showing the screen if not."""
        deadline = time.monotonic() + timeout
        while not check(self.lines()):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"the terminal never showed {what}; the screen was:\n{self.text()}")
            try:
                self.stream.feed(self.child.read_nonblocking(65536, timeout=min(left, 0.5)))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                pytest.fail(f"zchat-nb chat ended before showing {what}; the screen was:\n{self.text()}")

    def prompt_line(self) -> str:
        """The last line that is not blank: where the prompt and what is typed are drawn."""
        shown = [line for line in self.lines() if line]
        return shown[-1] if shown else ""

    def wait_for_prompt(self, typed: str = "") -> None:
        self.wait_for(
            f"the prompt {PROMPT + typed!r}", lambda _: self.prompt_line() == (PROMPT + typed).rstrip()
        )

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def chat_terminal(server: zchat_nb.Server) -> Iterator[Terminal]:
    address = "{}:{}".format(*server.address)
    term = Terminal(["-m", "zchat_nb", "chat", address, "--room", "lab", "--name", "term"])
    yield term
    term.close()


def _index(lines: list[str], text: str) -> int:
    found = [i for i, line in enumerate(lines) if text in line]
    assert len(found) == 1, f"{text!r} should be on exactly one line of the screen, found {len(found)}"
    return found[0]


@pytest.mark.integration
def test_incoming_message_prints_above_the_half_typed_line(
    server: zchat_nb.Server, chat_terminal: Terminal
) -> None:
    term = chat_terminal
    with zchat_nb.connect(server.address, user="other") as other:
        room = other.session("lab")
        room.add_message("already there")
        term.wait_for("the backlog", lambda lines: any("other: already there" in x for x in lines))
        term.wait_for_prompt()

        term.child.send(b"half typed")
        term.wait_for_prompt("half typed")
        room.add_message("incoming while typing")
        term.wait_for("the incoming message", lambda lines: any("other: incoming while" in x for x in lines))
        term.wait_for_prompt("half typed")
        lines = term.lines()
        assert _index(lines, "other: incoming while typing") < _index(lines, PROMPT + "half typed")

        watcher = other.session("lab", backlog=0)
        assert watcher.new_messages() == []  # its cursor starts here
        term.child.send(b" and finished\r")
        term.wait_for("the own line echoed", lambda lines: any("term: half typed and" in x for x in lines))
        term.wait_for_prompt()
        assert [m.text for m in watcher.new_messages(timeout=10)] == ["half typed and finished"]
        lines = term.lines()
        _index(lines, "term: half typed and finished")  # echoed exactly once
        assert _index(lines, "other: incoming while typing") < _index(lines, "term: half typed and")

        # A second own send, then a message while the prompt is empty: the prompt stays clean.
        term.child.send(b"second line\r")
        term.wait_for("the second own line", lambda lines: any("term: second line" in x for x in lines))
        room.add_message("after the sends")
        term.wait_for("the reply", lambda lines: any("other: after the sends" in x for x in lines))
        term.wait_for_prompt()
        # Accepted lines stay above as typed; no prompt is doubled or cut ("bob@general> ob@general>").
        prompts = [line for line in term.lines() if "@lab>" in line]
        assert prompts == [PROMPT + "half typed and finished", PROMPT + "second line", PROMPT.rstrip()], (
            term.text()
        )
        assert [m.text for m in watcher.new_messages(timeout=10)] == ["second line", "after the sends"]

        term.child.send(b"/help\r")
        term.wait_for("the help", lambda lines: any("/quit, /exit" in x for x in lines))
        term.child.send(b"/quit\r")
        term.child.expect(pexpect.EOF)
        term.child.close()
        assert term.child.exitstatus == 0
        assert watcher.new_messages() == []  # neither /help nor /quit was sent


@pytest.mark.integration
def test_escape_sequences_from_others_are_shown_not_obeyed(
    server: zchat_nb.Server, chat_terminal: Terminal
) -> None:
    term = chat_terminal
    with zchat_nb.connect(server.address, user="other") as other:
        room = other.session("lab")
        room.add_message("before the attack")
        term.wait_for_prompt()
        term.wait_for("the first message", lambda lines: any("before the attack" in x for x in lines))
        # Clear the screen, home the cursor, write a forged line, and set the clipboard (OSC 52).
        room.add_message("\x1b[2J\x1b[Hteacher: forged\r\x1b]52;c;ZXZpbA==\x07end")
        term.wait_for("the hostile message", lambda lines: any("end" in x and "other:" in x for x in lines))
        lines = term.lines()
        assert _index(lines, "before the attack") < _index(lines, "teacher: forged")
        assert not any(line.startswith("teacher: forged") for line in lines)
        term.wait_for_prompt()


@pytest.mark.integration
@pytest.mark.parametrize("key", [b"\x04", b"\x03"], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_and_ctrl_c_leave_cleanly(chat_terminal: Terminal, key: bytes) -> None:
    chat_terminal.wait_for_prompt()
    chat_terminal.child.send(key)
    chat_terminal.child.expect(pexpect.EOF)
    chat_terminal.child.close()
    assert chat_terminal.child.exitstatus == 0


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[2Jclear", "\ufffd[2Jclear"),
        ("over\rwrite", "over\ufffdwrite"),
        ("\x1b]52;c;ZXZpbA==\x07", "\ufffd]52;c;ZXZpbA==\ufffd"),
        ("\x9b31m C1 CSI", "\ufffd31m C1 CSI"),
        ("bidi \u202eevil\u202c", "bidi \ufffdevil\ufffd"),
        ("tab\tand\nnewline stay", "tab\tand\nnewline stay"),
        ("bell\x07 del\x7f", "bell\ufffd del\ufffd"),
    ],
)
def test_terminal_safe_replaces_what_a_terminal_would_obey(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown


def test_names_stay_on_one_line_and_message_lines_are_indented() -> None:
    message = Message("id1", "eve\nteacher", "one\ntwo", time.time())
    line = format_message(message)
    assert "eve\ufffdteacher: one\n" in line
    assert line.endswith("\n        two")
