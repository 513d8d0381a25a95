"""The terminal chat behind ``zchat-nb chat``: incoming messages print above the line being typed.

On a terminal, the prompt is a prompt_toolkit ``PromptSession`` run inside ``patch_stdout()``: the
reader thread's prints go through prompt_toolkit, which erases the prompt, writes the text and
redraws the prompt with the half-typed line intact. (The earlier hand-made readline redraw lost the
typed line and garbled the prompt, because readline was set up in the reader thread after the
first ``input()`` had started.) Without a terminal (a pipe), it reads plain lines and prints plain lines.

Own messages are echoed once, by the reader: ``ChatSession.new_messages`` delivers them like
everyone else's. Everything other people wrote passes :func:`~zchat_nb.render.terminal_safe` before it
is printed (:func:`~zchat_nb.render.format_line` for messages).
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from .exceptions import ZChatError
from .render import format_line, terminal_safe

if TYPE_CHECKING:
    from .client import ChatClient
    from .model import ChatSession, Message

__all__ = ["HELP", "format_update", "run_chat", "run_command"]

HELP = """\
* /help            this list
* /quit, /exit     leave (Ctrl-D or Ctrl-C leave too)
* /reply N TEXT    answer message N (N counts back from the newest shown: 1 is the last one)
* /edit N TEXT     replace the text of your message N
* /delete N        delete your message N (a verified teacher: anyone's)
* /react N EMOJI   react to message N (👍 ❤️ 😂 🎉 ❓ ✅); /unreact N EMOJI takes it back
* //TEXT           send a line that begins with / (as /TEXT)
* anything else is sent to the room; incoming messages print above the prompt
* ✓ after a name: signed with that person's classroom certificate"""

QUIT_COMMANDS = frozenset({"/quit", "/exit"})


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
    shown: deque[Message] = deque(maxlen=SHOWN)
    with patch_stdout(raw=False), _Reader(client, session, print, shown):
        while True:
            try:
                line = prompter.prompt()
            except (EOFError, KeyboardInterrupt):
                break
            if not _handle(line, session, print, shown):
                break
    return 0


def _run_lines(client: ChatClient, session: ChatSession, stdin: TextIO) -> int:
    lock = threading.Lock()

    def show(text: str) -> None:
        with lock:
            print(text, flush=True)

    shown: deque[Message] = deque(maxlen=SHOWN)
    with _Reader(client, session, show, shown):
        for line in stdin:
            if not _handle(line.rstrip("\n"), session, show, shown):
                break
    return 0


def _handle(
    line: str, session: ChatSession, show: Callable[[str], None], shown: Sequence[Message] = ()
) -> bool:
    """Act on one typed line; returns False when the user leaves."""
    command = line.strip()
    if not command:
        return True
    if command in QUIT_COMMANDS:
        return False
    if command == "/help":
        show(HELP)
        return True
    if command.split()[0] in CONVERSATION_COMMANDS:
        answer = run_command(command, session, shown)
        if answer:
            show(answer)
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

    def __init__(
        self,
        client: ChatClient,
        session: ChatSession,
        show: Callable[[str], None],
        shown: deque[Message] | None = None,
    ) -> None:
        self._client = client
        self._session = session
        self._show = show
        self._shown = shown if shown is not None else deque(maxlen=SHOWN)
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
                    self._shown.append(message)
                    self._show(format_line(message))
                for message in self._session.updated_messages():  # edits, deletes, reactions
                    self._show(format_update(message))
            except ZChatError as exc:
                if self._stop.is_set() or self._client.closed:
                    return
                self._show(f"* {terminal_safe(str(exc))}")
                self._client.wait_connected(5.0)


# -- conversation commands: /reply /edit /delete /react /unreact -----------------------------

#: Messages the commands can name (N counts back from the newest shown).
SHOWN = 500
CONVERSATION_COMMANDS = frozenset({"/reply", "/edit", "/delete", "/react", "/unreact"})
_USAGE = {
    "/reply": "/reply N TEXT",
    "/edit": "/edit N TEXT",
    "/delete": "/delete N",
    "/react": "/react N EMOJI",
    "/unreact": "/unreact N EMOJI",
}


def format_update(message: Message) -> str:
    """An edit, delete or reaction seen on a message shown earlier: ``* changed: [HH:MM] ...``."""
    return f"* changed: {format_line(message)}"


def run_command(command: str, session: ChatSession, shown: Sequence[Message]) -> str | None:
    """Run one of :data:`CONVERSATION_COMMANDS`; returns what to show (an error, or None).

    The terminal shows the outcome itself when the reader sees the change, like any other.
    """
    name, _, rest = command.partition(" ")
    number, _, arg = rest.strip().partition(" ")
    usage = _USAGE[name]
    if not number.isdigit() or not 0 < int(number) <= len(shown):
        return f"* usage: {usage}, with N from 1 (the newest message shown) to {len(shown)}"
    target = list(shown)[-int(number)]
    needs_arg = name != "/delete"
    if needs_arg != bool(arg.strip()):
        return f"* usage: {usage}"
    try:
        if name == "/reply":
            session.add_message(arg, reply_to=target)
        elif name == "/edit":
            session.edit(target, arg)
        elif name == "/delete":
            session.delete(target)
        elif name == "/react":
            session.react(target, arg.strip())
        else:
            session.unreact(target, arg.strip())
    except ZChatError as exc:
        return f"* {name[1:]} failed: {terminal_safe(str(exc))}"
    return None
