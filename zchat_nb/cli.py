"""The ``zchat-nb`` command: serve | status | stop | chat | demo."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .exceptions import ZChatError

__all__ = ["main"]

EPILOG = "Every command takes --help. ZCHAT_ADDRESS=host:port names the server for all of them."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zchat-nb",
        description="A chat shared by notebook kernels through one ZEO server.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run a ZEO server in the foreground (Ctrl-C stops it)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    serve.add_argument("--path", default=None, help="FileStorage file (default: keep data in memory)")
    serve.add_argument("--state-file", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)

    sub.add_parser("status", help="show the local default server (or $ZCHAT_ADDRESS) and whether it answers")
    sub.add_parser("stop", help="stop the local default server")

    demo = sub.add_parser(
        "demo",
        help="start or find the local server and open JupyterLab on the demo notebook",
        epilog="Other options are passed to `jupyter lab`, e.g. zchat-nb demo --no-browser --port 8888",
    )
    demo.add_argument(
        "--dir", default=None, help="where to put the demo notebook (default: the data directory)"
    )

    chat = sub.add_parser("chat", help="chat in the terminal; incoming messages print while you type")
    chat.add_argument(
        "address", nargs="?", default=None, help="host:port (default: $ZCHAT_ADDRESS or the local server)"
    )
    chat.add_argument("--room", default="general", help="room to join (default: general)")
    chat.add_argument("--name", default=None, help="your name (default: your login name)")
    chat.add_argument(
        "--backlog", type=int, default=20, help="messages of history to show first (default 20)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.lab_args = extra
    try:
        return int(COMMANDS[args.command](args) or 0)
    except ZChatError as exc:
        print(f"zchat-nb: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from .server import run_foreground

    run_foreground(args.path, args.host, args.port, state_file=args.state_file, ready_fd=args.ready_fd)
    return 0


def _status(args: argparse.Namespace) -> int:
    import os

    from .server import ENV_ADDRESS, local_status, parse_address, probe

    env = os.environ.get(ENV_ADDRESS)
    if env:
        address = parse_address(env)
        status = {"address": env, "running": probe(address), "from": ENV_ADDRESS}
    else:
        status = local_status()
    print(json.dumps(status, indent=2))
    return 0 if status.get("running") else 3


def _stop(args: argparse.Namespace) -> int:
    from .server import stop_local_server

    if stop_local_server():
        print("zchat-nb: the local server stopped")
    else:
        print("zchat-nb: no local server was running")
    return 0


def format_line(message: object) -> str:
    from .model import Message

    assert isinstance(message, Message)
    stamp = time.strftime("%H:%M", time.localtime(message.time))
    return f"[{stamp}] {message.author}: {message.text}"


def _chat(args: argparse.Namespace) -> int:
    from .client import connect

    client = connect(args.address, user=args.name)
    session = client.session(args.room, backlog=args.backlog)
    prompt = f"{client.user}@{args.room}> "
    stop = threading.Event()
    interactive = sys.stdin.isatty()

    def show(text: str) -> None:
        if interactive:
            try:
                import readline

                typed = readline.get_line_buffer()
            except ImportError:
                typed = ""
            # Erase the prompt line, print the message, then give the prompt and typed text back.
            sys.stdout.write(f"\r\033[K{text}\n{prompt}{typed}")
        else:
            sys.stdout.write(f"{text}\n")
        sys.stdout.flush()

    def reader() -> None:
        while not stop.is_set():
            try:
                for message in session.new_messages(timeout=5.0):
                    show(format_line(message))
            except ZChatError as exc:
                if stop.is_set() or client.closed:
                    return
                show(f"* {exc}")
                client.wait_connected(5.0)

    print(f"zchat-nb: {client.user} in room {args.room!r} at {client.address_text}; /quit or Ctrl-D leaves")
    thread = threading.Thread(target=reader, name="zchat-nb chat reader", daemon=True)
    thread.start()
    try:
        while True:
            try:
                line = input(prompt if interactive else "")
            except EOFError:
                break
            if line.strip() in ("/quit", "/exit"):
                break
            if not line.strip():
                continue
            try:
                session.add_message(line)
            except ZChatError as exc:
                show(f"* not sent: {exc}")
    finally:
        stop.set()
        client.close()
        thread.join(timeout=5)
    return 0


def demo_notebook() -> Path:
    """The demo notebook shipped with the package (wheel) or beside it (checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "notebooks", here.parent / "notebooks"):
        if (candidate / "chat_demo.ipynb").exists():
            return candidate / "chat_demo.ipynb"
    raise ZChatError(f"the demo notebook is missing from {here}; reinstall zchat_nb")


def _demo(args: argparse.Namespace) -> int:
    import os
    import shutil
    import subprocess

    from .server import ENV_ADDRESS, data_dir, format_address, resolve_address

    address = format_address(resolve_address(None))
    workdir = Path(args.dir) if args.dir else data_dir() / "notebooks"
    workdir.mkdir(parents=True, exist_ok=True)
    notebook = workdir / "chat_demo.ipynb"
    if not notebook.exists():  # a copy, so that JupyterLab's autosave never edits the installed one
        shutil.copy(demo_notebook(), notebook)
    print(f"zchat-nb: chat server at {address}; opening {notebook} in JupyterLab (Ctrl-C stops JupyterLab;")
    print("          the server keeps running until `zchat-nb stop`)", flush=True)
    env = {**os.environ, ENV_ADDRESS: address}
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={workdir}",
        *args.lab_args,
        notebook.name,
    ]
    try:
        return subprocess.call(cmd, env=env, cwd=workdir)
    except KeyboardInterrupt:
        return 0


COMMANDS = {"demo": _demo, "serve": _serve, "status": _status, "stop": _stop, "chat": _chat}
