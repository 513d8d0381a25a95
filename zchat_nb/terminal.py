"""The terminal chat behind ``zchat-nb chat``: incoming messages print above the line being typed.

On a terminal, the prompt is a prompt_toolkit ``PromptSession`` run inside ``patch_stdout()``: the
reader thread's prints go through prompt_toolkit, which erases the prompt, writes the text and
redraws the prompt with the half-typed line intact. (The earlier hand-made readline redraw lost the
typed line and garbled the prompt, because readline was set up in the reader thread after the
first ``input()`` had started.) Without a terminal (a pipe), it reads plain lines and prints plain lines.

Own messages are echoed once, by the reader: ``ChatSession.new_messages`` delivers them like
everyone else's. Everything other people wrote passes :func:`terminal_safe` before it is printed.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from .exceptions import ZChatError

if TYPE_CHECKING:
    from .client import ChatClient
    from .model import ChatSession, Message

__all__ = ["HELP", "format_message", "run_chat", "terminal_safe"]

HELP = """\
* /help          this list
* /quit, /exit   leave (Ctrl-D or Ctrl-C leave too)
* //TEXT         send a line that begins with / (as /TEXT)
* anything else is sent to the room; incoming messages print above the prompt"""

QUIT_COMMANDS = frozenset({"/quit", "/exit"})

# C0 controls but tab and newline, DEL, C1 controls (ESC, CSI, OSC...), and the bidi overrides and
# isolates that reorder what is shown ("Trojan source"). Other people choose these characters:
# ESC [2J clears the screen, "\r" overwrites a line to forge another author, OSC 52 writes the
# clipboard. Each becomes U+FFFD, so that an attempt stays visible.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_IN_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
REPLACEMENT = "\ufffd"


def terminal_safe(text: str, *, multiline: bool = True) -> str:
    """``text`` with every character that a terminal would obey instead of show replaced by U+FFFD.

    Tabs are kept; newlines too unless ``multiline`` is false (names must stay on one line).
    """
    pattern = _UNSAFE if multiline else _UNSAFE_IN_LINE
    return pattern.sub(REPLACEMENT, text)


def format_message(message: Message) -> str:
    """``[HH:MM] author: text``, safe to write to a terminal; later lines of the text are indented."""
    stamp = time.strftime("%H:%M", time.localtime(message.time))
    author = terminal_safe(message.author, multiline=False)
    text = terminal_safe(message.text).replace("\n", "\n        ")
    return f"[{stamp}] {author}: {text}"


def run_chat(client: ChatClient, session: ChatSession, *, stdin: TextIO | None = None) -> int:
    """Chat in ``session`` until /quit, Ctrl-D or Ctrl-C; returns the exit status (0)."""
    stdin = sys.stdin if stdin is None else stdin
    interactive = stdin.isatty() and sys.stdout.isatty()
    user = terminal_safe(client.user, multiline=False)
    room = terminal_safe(session.room, multiline=False)
    print(f"zchat-nb: {user} in room {room!r} at {client.address_text}; /help lists commands, /quit leaves")
    if interactive:
        return _run_prompt(client, session, f"{user}@{room}> ")
    return _run_lines(client, session, stdin)


def _run_prompt(client: ChatClient, session: ChatSession, prompt: str) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    prompter: PromptSession[str] = PromptSession(prompt)
    # Inside patch_stdout, print() from any thread lands above the prompt, which is then redrawn.
    with patch_stdout(raw=False), _Reader(client, session, print):
        while True:
            try:
                line = prompter.prompt()
            except (EOFError, KeyboardInterrupt):
                break
            if not _handle(line, session, print):
                break
    return 0


def _run_lines(client: ChatClient, session: ChatSession, stdin: TextIO) -> int:
    lock = threading.Lock()

    def show(text: str) -> None:
        with lock:
            print(text, flush=True)

    with _Reader(client, session, show):
        for line in stdin:
            if not _handle(line.rstrip("\n"), session, show):
                break
    return 0


def _handle(line: str, session: ChatSession, show: Callable[[str], None]) -> bool:
    """Act on one typed line; returns False when the user leaves."""
    command = line.strip()
    if not command:
        return True
    if command in QUIT_COMMANDS:
        return False
    if command == "/help":
        show(HELP)
        return True
    if command.startswith("/") and not command.startswith("//"):
        word = terminal_safe(command.split()[0], multiline=False)
        show(f"* unknown command {word}; /help lists the commands (type //TEXT to send /TEXT)")
        return True
    text = line.lstrip()[1:] if command.startswith("//") else line
    try:
        session.add_message(text)  # the reader echoes it, once, when new_messages delivers it
    except ZChatError as exc:
        show(f"* not sent: {exc}")
    return True


class _Reader:
    """A daemon thread that shows the session's new messages until the block it guards ends."""

    def __init__(self, client: ChatClient, session: ChatSession, show: Callable[[str], None]) -> None:
        self._client = client
        self._session = session
        self._show = show
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zchat-nb chat reader", daemon=True)

    def __enter__(self) -> _Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._client.close()  # wakes the reader if it is waiting in new_messages
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for message in self._session.new_messages(timeout=5.0):
                    self._show(format_message(message))
            except ZChatError as exc:
                if self._stop.is_set() or self._client.closed:
                    return
                self._show(f"* {terminal_safe(str(exc))}")
                self._client.wait_connected(5.0)
