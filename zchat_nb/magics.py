"""``%load_ext zchat_nb``: the ``%zchat`` line magic and the ``%%zchat`` cell magic.

Settings are traitlets on the ``ZChat`` configurable: ``%config ZChat.poll_interval = 0.5``.
"""

from __future__ import annotations

import argparse
import atexit
import shlex
import sys
import textwrap
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from traitlets import Float, Unicode, default
from traitlets.config import Configurable

from .client import ChatClient, connect, default_user
from .exceptions import ZChatError
from .model import ChatSession
from .net import format_address, parse_address
from .render import format_line
from .server import Server, serve

__all__ = ["ZChat", "ZChatMagics", "load_ipython_extension", "unload_ipython_extension", "usage"]


class ZChat(Configurable):
    """Settings of the ``%zchat`` magics."""

    user = Unicode(help="Name shown with your messages (default: JupyterHub user or login name).").tag(
        config=True
    )
    room = Unicode("general", help="Room that `%zchat join` joins when --room is not given.").tag(config=True)
    poll_interval = Float(
        1.0, help="Seconds between the widget's fallback polls; ZEO invalidations wake it at once anyway."
    ).tag(config=True)
    timeout = Float(10.0, help="Seconds a send may wait for the server before it reports a failure.").tag(
        config=True
    )

    @default("user")
    def _default_user(self) -> str:
        return default_user()


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as IPython UsageErrors instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}\n\n{self.format_usage()}See `%zchat --help`.")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message)
        raise _Done


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


class _Done(Exception):
    """``--help`` was printed: nothing else to do."""


def _parsers() -> dict[str, _Parser]:
    """Every command's arguments, declared once: parsing, ``--help`` and :func:`usage` come from here."""

    def make(name: str, description: str) -> _Parser:
        return _Parser(prog=f"%zchat {name}", description=description, add_help=True)

    p = {}
    p["serve"] = make("serve", "Start a hardened ZEO server inside this kernel; prints the address to join.")
    p["serve"].add_argument("--host", default="127.0.0.1", metavar="H", help="interface (default 127.0.0.1)")
    p["serve"].add_argument("--port", type=int, default=0, metavar="P", help="port (default 0: any free one)")
    p["serve"].add_argument("--path", default=None, metavar="FILE", help="FileStorage (default: in memory)")
    p["serve"].add_argument(
        "--tls",
        default=None,
        metavar="DIR",
        help="admit only clients with a certificate from the classroom directory DIR (zchat-nb certs DIR)",
    )
    p["join"] = make(
        "join",
        "Join a chat and show the widget (no ADDRESS: the server this kernel serves, else $ZCHAT_ADDRESS, "
        "else the local default server, started if needed).",
    )
    p["join"].add_argument("address", nargs="?", default=None, metavar="ADDRESS", help="host:port")
    p["join"].add_argument("--room", default=None, metavar="R", help="the room (default: ZChat.room)")
    p["join"].add_argument("--name", default=None, metavar="N", help="your name (default: ZChat.user)")
    p["join"].add_argument(
        "--tls", default=None, metavar="FOLDER", help="your certificate folder (zchat-nb certs)"
    )
    p["send"] = make(
        "send",
        "Send TEXT to the room you joined. As `%%zchat send [--raw]`: the cell body as one message "
        "(a code block unless --raw).",
    )
    p["send"].add_argument("text", nargs="*", metavar="TEXT")
    p["send"].add_argument("--raw", action="store_true", help="cell body as typed, not as a code block")
    p["history"] = make("history", "Print the last N messages of the room you joined.")
    p["history"].add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    for name, text in [
        ("rooms", "List the rooms."),
        ("status", "Show the connection, user, room and server."),
        ("inspect", "Show the live ZEO inspector beside the chat."),
        ("leave", "Close the widgets and the connection."),
        ("stop", "Stop the server this kernel started."),
    ]:
        p[name] = make(name, text)
    return p


def synopsis(parser: argparse.ArgumentParser) -> str:
    """One command's usage line, as argparse makes it, without ``usage:`` and ``[-h]``."""
    text = " ".join(parser.format_usage().split())
    return text.removeprefix("usage: ").replace(" [-h]", "")


def usage(parsers: dict[str, _Parser]) -> str:
    """What ``%zchat --help`` prints: every command and setting, from the parsers and traitlets."""
    lines = []
    for parser in parsers.values():
        lines.append(synopsis(parser))
        lines += textwrap.wrap(parser.description or "", 96, initial_indent="    ", subsequent_indent="    ")
    lines += ["", "`%zchat COMMAND --help` for one command's options. Settings (%config ZChat.NAME = VALUE):"]
    for name, trait in sorted(ZChat.class_traits(config=True).items()):
        setting = f"ZChat.{name}: {trait.help}"
        lines += textwrap.wrap(setting, 96, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


@magics_class
class ZChatMagics(Magics):
    """The ``%zchat`` / ``%%zchat`` magics; one instance per IPython shell."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.settings = ZChat(parent=shell)
        shell.configurables.append(self.settings)
        self.server: Server | None = None
        self.client: ChatClient | None = None
        self.room: str | None = None
        self.session: ChatSession | None = None
        self.widgets: list[Any] = []
        self._parsers = _parsers()

    @line_cell_magic
    def zchat(self, line: str, cell: str | None = None) -> Any:
        """Chat with other kernels through ZEO. `%zchat --help` lists the commands."""
        command, _, rest = line.strip().partition(" ")
        if command == "send" and cell is None and rest.strip() and not rest.lstrip().startswith("-"):
            # The message is the rest of the line as typed: no shell-style parsing of the user's text.
            return self._call("send", argparse.Namespace(text=[_unquote(rest.strip())], raw=False), cell)
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%zchat: cannot parse {line!r}: {exc}") from None
        if not words or words[0] in ("-h", "--help", "help"):
            print(usage(self._parsers))
            return None
        command = words[0]
        parser = self._parsers.get(command)
        if parser is None:
            raise UsageError(
                f"%zchat: unknown command {command!r}; the commands are:\n\n{usage(self._parsers)}"
            )
        if cell is not None and command != "send":
            raise UsageError(f"%%zchat {command}: only `%%zchat send` takes a cell body")
        try:
            args = parser.parse_args(words[1:])
        except _Done:
            return None
        return self._call(command, args, cell)

    def _call(self, command: str, args: argparse.Namespace, cell: str | None) -> Any:
        try:
            return getattr(self, f"_{command}")(args, cell)
        except ZChatError as exc:
            raise UsageError(f"%zchat {command}: {exc}") from exc

    # -- commands ------------------------------------------------------------------------

    def _serve(self, args: argparse.Namespace, cell: str | None) -> None:
        if self.server is not None:
            raise UsageError(
                f"%zchat serve: this kernel already serves at {format_address(self.server.address)}; "
                "`%zchat stop` it first"
            )
        self.server = serve(args.path, args.host, args.port, tls=args.tls)
        where = format_address(self.server.address)
        print(f"ZEO server listening on {where} ({args.path or 'in memory'}).")
        with_tls = " --tls FOLDER   (FOLDER: a student's certificate folder)" if args.tls else ""
        print(f"Join from any kernel on this machine with:  %zchat join {where}{with_tls}")

    def _join(self, args: argparse.Namespace, cell: str | None) -> Any:
        from IPython.display import display

        from .widget import ChatWidget

        # With --tls and no --name, the name is the one on the certificate.
        user = args.name or (None if args.tls else self.settings.user)
        address = args.address
        if address is None and self.server is not None:
            address = self.server.address
        wanted = _target(address) if address is not None else None
        client = self.client
        reuse = (
            client is not None
            and not client.closed
            and not args.tls
            and client.user == user
            and (wanted is None or wanted == client.target)
        )
        if client is None or not reuse:
            self._close_client()
            client = self.client = connect(address, user=user, timeout=self.settings.timeout, tls=args.tls)
        self.room = args.room or self.settings.room
        self.session = client.session(self.room, backlog=0)
        widget = ChatWidget(client, self.room, poll_interval=self.settings.poll_interval)
        self.widgets.append(widget)
        display(widget)
        return None

    def _joined(self) -> ChatSession:
        if self.client is None or self.client.closed or self.session is None:
            raise UsageError("%zchat: you have not joined a chat; run `%zchat join` first")
        return self.session

    def _send(self, args: argparse.Namespace, cell: str | None) -> None:
        session = self._joined()
        if cell is not None:
            if args.text:
                raise UsageError("%%zchat send: the message is the cell body; put nothing after `send`")
            body = cell.strip("\n")
            if not body.strip():
                raise UsageError("%%zchat send: the cell is empty; write the message below `%%zchat send`")
            text = body if args.raw or "```" in body else f"```python\n{body}\n```"
        else:
            if not args.text:
                raise UsageError('%zchat send: nothing to send; write `%zchat send "hello"`')
            text = " ".join(args.text)
        session.add_message(text)

    def _history(self, args: argparse.Namespace, cell: str | None) -> None:
        session = self._joined()
        if args.n < 0:
            raise UsageError(f"%zchat history: -n must be 0 or more, not {args.n}")
        for message in session.history(args.n):
            print(format_line(message))

    def _rooms(self, args: argparse.Namespace, cell: str | None) -> None:
        client = self.client if self.client is not None and not self.client.closed else self._any_client()
        for name in client.rooms():
            marker = "  <- joined" if name == self.room else ""
            print(f"{name}{marker}")

    def _any_client(self) -> ChatClient:
        self.client = connect(
            self.server.address if self.server else None,
            user=self.settings.user,
            timeout=self.settings.timeout,
        )
        return self.client

    def _status(self, args: argparse.Namespace, cell: str | None) -> None:
        if self.server is not None:
            status = self.server.status()
            print(
                f"serving:   {format_address(self.server.address)}, "
                f"{status.get('connections', 0)} client connection(s)"
            )
        if self.client is None or self.client.closed:
            print("chat:      not joined (`%zchat join`)")
            return
        state = "connected" if self.client.is_connected() else "disconnected (reconnecting)"
        print(f"chat:      {state} to {self.client.address_text} as {self.client.user!r}, room {self.room!r}")
        print(f"storage:   {self.client.storage_text}")
        print(f"widgets:   {sum(1 for w in self.widgets if not getattr(w, 'closed', False))} open")

    def _inspect(self, args: argparse.Namespace, cell: str | None) -> Any:
        import ipywidgets
        from IPython.display import display

        from .inspector import Inspector
        from .widget import ChatWidget

        self._joined()
        assert self.client is not None and self.room is not None
        inspector = Inspector(self.client, room=self.room)
        self.widgets.append(inspector)
        # Beside the chat: another view of the chat widget this kernel joined with, if there is one.
        chats = [w for w in self.widgets if isinstance(w, ChatWidget) and not w.closed]
        if chats:
            row = ipywidgets.HBox([chats[-1], inspector], layout={"align_items": "flex-start"})
            row.add_class("zchat-inspect-row")
            display(row)
        else:
            display(inspector)
        return None

    def _leave(self, args: argparse.Namespace, cell: str | None) -> None:
        was = self.client is not None and not self.client.closed
        self._close_client()
        print("Left the chat." if was else "You were not in a chat.")

    def _stop(self, args: argparse.Namespace, cell: str | None) -> None:
        if self.server is None:
            raise UsageError(
                "%zchat stop: this kernel started no server; stop the local default one with `zchat-nb stop`"
            )
        self._close_client()
        self.server.stop()
        self.server = None
        print("Server stopped.")

    # -- lifecycle -----------------------------------------------------------------------

    def _close_client(self) -> None:
        for widget in self.widgets:
            widget.close()
        self.widgets.clear()
        if self.client is not None:
            self.client.close()
        self.client = None
        self.room = None
        self.session = None

    def close(self) -> None:
        """Close widgets (their pollers), the client and any server this kernel started."""
        self._close_client()
        if self.server is not None:
            self.server.stop()
            self.server = None


_magics: ZChatMagics | None = None


def load_ipython_extension(ipython: Any) -> None:
    global _magics
    if _magics is not None and _magics.shell is ipython:
        return
    _magics = ZChatMagics(ipython)
    ipython.register_magics(_magics)
    atexit.register(_close_at_exit)  # kernel shutdown: stop pollers, close the client and server


def _close_at_exit() -> None:
    if _magics is not None:
        _magics.close()


def unload_ipython_extension(ipython: Any) -> None:
    global _magics
    widget_module = sys.modules.get("zchat_nb.widget")
    if widget_module is not None:  # widgets made in code too, not only by %zchat join
        widget_module.close_all()
    if _magics is None:
        return
    _magics.close()
    if _magics.settings in ipython.configurables:
        ipython.configurables.remove(_magics.settings)
    ipython.magics_manager.magics["line"].pop("zchat", None)
    ipython.magics_manager.magics["cell"].pop("zchat", None)
    atexit.unregister(_close_at_exit)
    _magics = None


def _target(address: object) -> object:
    """What ``%zchat join ADDRESS`` names: a ZEO ``(host, port)`` or a PostgreSQL target."""
    from .storage import is_storage_uri, parse_storage_uri

    return parse_storage_uri(str(address)) if is_storage_uri(address) else parse_address(address)
