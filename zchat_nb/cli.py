"""The ``zchat-nb`` command: serve | status | stop | chat | demo | certs | export | clear | pack."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .exceptions import ZChatError

if TYPE_CHECKING:
    from .client import ChatClient

__all__ = ["main"]

EPILOG = (
    "Every command takes --help. ZCHAT_ADDRESS names the chat for all of them: host:port (a ZEO "
    "server), unix:/path/server.sock (a local one) or postgresql://USER:PASSWORD@HOST:PORT/DBNAME."
)

#: Exit status of a usage error (argparse's own).
USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line, naming the fix, with the usage status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


# -- argument types: each names the value and the fix -------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; give 1-65535, or 0 for any free port")
    return port


def _count(what: str, low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {what} >= {low}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _days_kept(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days >= 0 (e.g. 0 or 7.5)")
    return value


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        why = "is a directory" if Path(text).is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {why}; give a file of names, one a line")
    return text


def _storage_file(text: str) -> str:
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file in it, e.g. {path / 'chat.fs'}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {path.parent} does not exist; mkdir -p {path.parent}")
    try:  # the real test of writability (os.access says yes to root on any mounted folder)
        if path.exists():
            os.close(os.open(path, os.O_RDWR))
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            path.unlink()
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot write {text} ({exc.strerror}); FileStorage writes it and {path.name}.index, .lock "
            "and .tmp beside it: choose a folder of your own"
        ) from None
    return str(path)


def _output_file(text: str) -> str:
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name, e.g. {path / 'room.csv'}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {path.parent} does not exist; mkdir -p {path.parent}")
    return str(path)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zchat-nb",
        description="A chat shared by notebook kernels through one ZEO server.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run a ZEO server in the foreground (Ctrl-C stops it)",
        epilog="--local serves the local default (the one connect() starts) and takes no other option.",
    )
    serve.add_argument(
        "--local",
        action="store_true",
        help="run the local default server in the foreground: your data directory's chat, on its "
        "private Unix socket, where its clients look for it (brings it back after `zchat-nb stop`)",
    )
    bind = serve.add_mutually_exclusive_group()
    bind.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    bind.add_argument(
        "--public",
        action="store_true",
        help="listen on every interface (0.0.0.0) so that other machines can join; prints the address "
        "students type (give --port 8100 for one that stays the same)",
    )
    serve.add_argument("--port", type=_port, default=None, help="port (default 0: any free port)")
    serve.add_argument(
        "--path", type=_storage_file, default=None, help="FileStorage file (default: keep data in memory)"
    )
    serve.add_argument(
        "--storage",
        metavar="URI",
        default=None,
        help="keep the data in PostgreSQL instead: postgresql://USER@HOST:PORT/DBNAME, the password in "
        "~/.pgpass or $PGPASSWORD (a command line is visible to every local user; needs "
        "`pip install zchat_nb[postgres]`)",
    )
    serve.add_argument(
        "--tls",
        metavar="DIR",
        default=None,
        help="use TLS and admit only clients with a certificate from the classroom directory DIR "
        "(made by `zchat-nb certs DIR`)",
    )
    serve.add_argument(
        "--max-per-peer",
        type=_count("connections", 1),
        default=None,
        metavar="N",
        help="connections one peer may open: one IP address (every kernel of a JupyterHub host shares "
        "one) or one user on a Unix socket (default 512)",
    )
    serve.add_argument("--locked", action="store_true", help=argparse.SUPPRESS)  # the parent holds the lock
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)

    sub.add_parser("status", help="show the local default server (or $ZCHAT_ADDRESS) and whether it answers")
    sub.add_parser("stop", help="stop the local default server (`zchat-nb serve --local` brings it back)")

    demo = sub.add_parser(
        "demo",
        help="start or find the local server and open JupyterLab on the demo notebook",
        epilog="Other options are passed to `jupyter lab`, e.g. zchat-nb demo --no-browser --port 8888",
    )
    demo.add_argument(
        "--dir",
        default=None,
        help="where to put the demo notebook and the lessons (default: the data directory)",
    )

    chat = sub.add_parser("chat", help="chat in the terminal; incoming messages print while you type")
    chat.add_argument(
        "address",
        nargs="?",
        default=None,
        help="host:port or postgresql://... URI (default: $ZCHAT_ADDRESS or the local server)",
    )
    chat.add_argument("--room", default="general", help="room to join (default: general)")
    chat.add_argument(
        "--name", default=None, help="your name (default: your login name, or your certificate's with --tls)"
    )
    chat.add_argument(
        "--tls",
        metavar="FOLDER",
        default=None,
        help="your certificate folder from the teacher (ca.pem, NAME.pem, NAME.key) for a TLS server",
    )
    chat.add_argument(
        "--backlog",
        type=_count("messages", 0),
        default=20,
        help="messages of history to show first (default 20)",
    )
    _add_classroom_commands(sub)
    for command in sub.choices.values():  # a mistake found after parsing is reported the same way
        command.set_defaults(usage_error=command.error)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "demo":
            args.usage_error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, or a usage error already printed in one line
        return int(exc.code or 0)
    args.lab_args = extra
    try:
        return int(COMMANDS[args.command](args) or 0)
    except SystemExit as exc:  # a usage error found after parsing (args.usage_error)
        return int(exc.code or 0)
    except ZChatError as exc:
        print(f"zchat-nb: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file that cannot be read or written: the OS says which and why
        print(f"zchat-nb: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from .local import run_foreground, run_local

    if args.local:
        others = [
            flag
            for flag, given in [
                ("--host", args.host != "127.0.0.1"),
                ("--public", args.public),
                ("--port", args.port is not None),
                ("--path", args.path is not None),
                ("--storage", args.storage is not None),
                ("--tls", args.tls is not None),
                ("--max-per-peer", args.max_per_peer is not None),
            ]
            if given
        ]
        if others:
            args.usage_error(
                f"--local takes no {'/'.join(others)}: the local default always keeps its data in your data "
                "directory and listens on its private socket; drop --local to serve elsewhere"
            )
        run_local(ready_fd=args.ready_fd, locked=args.locked)
        return 0
    ssl = None
    if args.tls:
        from .certs import server_context

        ssl = server_context(args.tls)
    host = "0.0.0.0" if args.public else args.host
    limits = None
    if args.max_per_peer is not None:
        from .guard import ServerLimits

        limits = ServerLimits(max_connections_per_peer=args.max_per_peer)
    run_foreground(
        args.path, host, args.port or 0, ready_fd=args.ready_fd, ssl=ssl, storage=args.storage, limits=limits
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    import os

    from .local import ENV_ADDRESS, local_status, restart_hint
    from .net import parse_address, probe
    from .storage import is_storage_uri, parse_storage_uri, postgres_status

    env = os.environ.get(ENV_ADDRESS)
    if env and is_storage_uri(env):
        status = postgres_status(parse_storage_uri(env))
        status["from"] = ENV_ADDRESS
    elif env:
        address = parse_address(env)
        status = {"address": env, "storage": "ZEO server", "running": probe(address), "from": ENV_ADDRESS}
    else:
        status = {**local_status(), "storage": "ZEO server (local default)"}
    if not status.get("running") and not is_storage_uri(env):
        # The JSON stays machine-readable on stdout; the way back goes to a person, on stderr.
        status["hint"] = restart_hint(parse_address(status["address"]))
        print(f"zchat-nb: the server is not running; {status['hint']}", file=sys.stderr)
    print(json.dumps(status, indent=2))
    return 0 if status.get("running") else 3


def _stop(args: argparse.Namespace) -> int:
    from .local import stop_local_server

    if stop_local_server():
        print("zchat-nb: the local server stopped")
    else:
        print("zchat-nb: no local server was running")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .client import connect
    from .terminal import run_chat

    client = connect(args.address, user=args.name, tls=args.tls)
    try:
        return run_chat(client, client.session(args.room, backlog=args.backlog))
    finally:
        client.close()


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None, args.lab_args)


# -- classroom: certs, export, clear, pack ----------------------------------------------------

CERTS_HELP = """\
Make TLS certificates for a class. DIR gets:
  ca.pem, ca.key       the classroom CA (ca.key signs new students: keep it private)
  server/              for `zchat-nb serve --public --port 8100 --tls DIR`
  students/NAME/       ca.pem, NAME.pem, NAME.key: hand this folder to NAME, who runs
                       `zchat-nb chat HOST:8100 --tls NAME` (the folder) or, in Python,
                       zchat_nb.connect("HOST:8100", tls="NAME")
A bundle for the teacher (students/teacher) is made too. Run it again to add students.
"""


def _add_classroom_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    certs = sub.add_parser(
        "certs",
        help="make TLS certificates for a class: a CA, the server's, one per student",
        description=CERTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    certs.add_argument("dir", help="the classroom directory (created if missing)")
    certs.add_argument("--student", action="append", default=[], metavar="NAME", help="a student (repeat)")
    certs.add_argument(
        "--students-file", type=_existing_file, metavar="FILE", help="a file of student names, one a line"
    )
    certs.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="HOST",
        help="a host name or IP address students type to reach the server (repeat); localhost and "
        "this machine's address are always included",
    )
    certs.add_argument(
        "--days", type=_count("days", 1), default=365, help="validity of new certificates (default 365)"
    )

    export = sub.add_parser("export", help="write a room's messages as CSV or a Markdown transcript")
    export.add_argument("room", help="the room to export")
    export.add_argument("--format", choices=("csv", "md"), default="csv", help="csv (default) or md")
    export.add_argument(
        "-o", "--output", type=_output_file, default=None, help="file to write (default: standard output)"
    )
    export.add_argument("--force", action="store_true", help="overwrite the --output file if it exists")
    _connect_options(export)

    clear = sub.add_parser("clear", help="delete every message of a room, for everyone (export it first)")
    clear.add_argument("room", help="the room to clear")
    clear.add_argument("--yes", action="store_true", help="really delete them")
    _connect_options(clear)

    pack = sub.add_parser("pack", help="pack the server's storage: free the space of old and cleared data")
    pack.add_argument(
        "--days", type=_days_kept, default=0.0, help="keep undo history younger than this (default 0)"
    )
    _connect_options(pack)


def _connect_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="host:port or postgresql://... URI (default: $ZCHAT_ADDRESS or the local server)",
    )
    parser.add_argument(
        "--tls",
        metavar="FOLDER",
        default=None,
        help="certificate folder for a TLS server (DIR/students/teacher)",
    )
    parser.add_argument("--name", default=None, help="user name to connect as")


def _teacher_client(args: argparse.Namespace) -> ChatClient:
    from .client import connect
    from .local import ENV_ADDRESS, LOCAL_COMMAND, running_server

    # $ZCHAT_ADDRESS may be a PostgreSQL URI, which connect() takes as it is.
    address = args.address or os.environ.get(ENV_ADDRESS)
    if not address:  # the local default: a teacher's tool reads it, but never starts it
        state = running_server()
        if state is None:
            raise ZChatError(
                f"the local default server is not running; `{LOCAL_COMMAND}` brings it back with its "
                "data (or name a server with --address)"
            )
        address = state.address
    return connect(address, user=args.name, tls=args.tls)


def _certs(args: argparse.Namespace) -> int:
    from .certs import describe_classroom, make_classroom, read_names, this_machine_names

    names = list(args.student)
    if args.students_file:
        names += read_names(args.students_file)
    if not names:
        print("zchat-nb: no students named (--student NAME or --students-file FILE); making the CA, "
              "the server's certificate and the teacher's", file=sys.stderr)  # fmt: skip
    made = make_classroom(args.dir, names, [*args.server_name, *this_machine_names()], days=args.days)
    print(describe_classroom(made))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .teacher import export

    if args.output and Path(args.output).exists() and not args.force:
        args.usage_error(
            f"argument -o/--output: {args.output} exists; add --force to overwrite it, or choose another name"
        )
    with _teacher_client(args) as client:
        count = export(client, args.room, args.output or sys.stdout, format=args.format)
    if args.output:
        print(f"zchat-nb: wrote {count} messages of room {args.room!r} to {args.output}", file=sys.stderr)
    return 0


def _clear(args: argparse.Namespace) -> int:
    from .teacher import clear_room

    if not args.yes:
        print(
            f"zchat-nb: this deletes every message of room {args.room!r} for everyone. Export it first "
            f"(zchat-nb export {args.room} -o FILE), then run this again with --yes",
            file=sys.stderr,
        )
        return 2
    with _teacher_client(args) as client:
        count = clear_room(client, args.room)
    print(f"zchat-nb: cleared room {args.room!r} ({count} messages); `zchat-nb pack` frees their disk space")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from .teacher import pack

    with _teacher_client(args) as client:
        pack(client, days=args.days)
        print(f"zchat-nb: packed the storage at {client.address_text} (kept {args.days:g} days of history)")
    return 0


COMMANDS = {
    "demo": _demo,
    "serve": _serve,
    "status": _status,
    "stop": _stop,
    "chat": _chat,
    "certs": _certs,
    "export": _export,
    "clear": _clear,
    "pack": _pack,
}
