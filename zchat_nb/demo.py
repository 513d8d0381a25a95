"""``zchat-nb demo``: the local chat server, a folder with the demo notebook and lessons, JupyterLab.

JupyterLab runs as a child process (not ``exec``) so that zchat-nb is still there when it ends: if
JupyterLab fails (it refuses to run as root without ``--allow-root``, its port is taken, ...), the
chat server that this demo started is stopped again instead of being left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .exceptions import ZChatError

__all__ = ["DEMO_NOTEBOOK", "LESSONS_DIR", "lab_command", "notebooks_dir", "prepare_demo_dir", "run_demo"]

DEMO_NOTEBOOK = "chat_demo.ipynb"
LESSONS_DIR = "lessons"
ROOT_NOTICE = (
    "zchat-nb: running as root, so JupyterLab gets --allow-root (it refuses to start as root without it)"
)


def notebooks_dir() -> Path:
    """The notebooks shipped with the package (wheel) or beside it (checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "notebooks", here.parent / "notebooks"):
        if (candidate / DEMO_NOTEBOOK).exists():
            return candidate
    raise ZChatError(f"the demo notebook is missing from {here}; reinstall zchat_nb")


def prepare_demo_dir(workdir: Path, source: Path | None = None) -> Path:
    """Copy the demo notebook and the lessons into ``workdir``; returns the demo notebook's path.

    Copies, so that JupyterLab's autosave never edits the installed files; an existing copy is
    left alone, so that what a student wrote in it survives the next ``zchat-nb demo``.
    """
    source = notebooks_dir() if source is None else source
    workdir.mkdir(parents=True, exist_ok=True)
    notebook = workdir / DEMO_NOTEBOOK
    if not notebook.exists():
        shutil.copy(source / DEMO_NOTEBOOK, notebook)
    lessons = workdir / LESSONS_DIR
    lessons.mkdir(exist_ok=True)
    for lesson in sorted((source / LESSONS_DIR).glob("*.ipynb")):
        if not (lessons / lesson.name).exists():
            shutil.copy(lesson, lessons / lesson.name)
    return notebook


def _gives_allow_root(lab_args: Sequence[str]) -> bool:
    return any(arg == "--allow-root" or arg.startswith("--ServerApp.allow_root") for arg in lab_args)


def lab_command(
    workdir: Path, notebook: str, lab_args: Sequence[str], *, euid: int | None = None
) -> tuple[list[str], list[str]]:
    """The JupyterLab command line for the demo, and the notices to print before running it."""
    euid = os.geteuid() if euid is None else euid
    args, notices = list(lab_args), []
    if euid == 0 and not _gives_allow_root(args):
        args.append("--allow-root")
        notices.append(ROOT_NOTICE)
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={workdir}", *args, notebook]
    return cmd, notices


def run_demo(workdir: Path | None, lab_args: Sequence[str]) -> int:
    """Start or find the local server, prepare ``workdir``, run JupyterLab until it ends."""
    from .local import ENV_ADDRESS, data_dir, local_status, resolve_address, stop_local_server
    from .net import format_address

    # Only a server this demo started is stopped when JupyterLab fails; one that was running stays.
    starts_server = not os.environ.get(ENV_ADDRESS) and not local_status()["running"]
    address = format_address(resolve_address(None))
    workdir = workdir if workdir is not None else data_dir() / "notebooks"
    notebook = prepare_demo_dir(workdir)
    cmd, notices = lab_command(workdir, notebook.name, lab_args)
    for notice in notices:
        print(notice)
    print(f"zchat-nb: chat server at {address}; opening {notebook} in JupyterLab, the lessons beside it")
    print("          (Ctrl-C stops JupyterLab; the server keeps running until `zchat-nb stop`)")
    sys.stdout.flush()
    status = _run_until_done(cmd, {**os.environ, ENV_ADDRESS: address}, workdir)
    if status > 0:
        if starts_server and stop_local_server():
            print(f"zchat-nb: JupyterLab failed (exit status {status}, see above); stopped the chat server "
                  "this demo had started", file=sys.stderr)  # fmt: skip
        else:
            print(f"zchat-nb: JupyterLab failed (exit status {status}, see above); the chat server at "
                  f"{address} keeps running (`zchat-nb stop` stops it)", file=sys.stderr)  # fmt: skip
        return status
    return 0


def _run_until_done(cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    """Run ``cmd``, passing on the signals that would have stopped it had it been this process."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd)

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signum)

    # Ctrl-C reaches JupyterLab from the terminal itself (same process group): it asks to confirm.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, forward)
    try:
        return proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
