"""Attack costs against ``zchat-nb serve``: server CPU per hostile frame, and what honest clients wait.

Run from a checkout (its zchat_nb is the one measured):

    PYTHONPATH=$PWD python benchmarks/hostile.py            # this checkout
    PYTHONPATH=/path/to/other/checkout python benchmarks/hostile.py   # e.g. before the hardening

Prints a table: attack, server CPU seconds it cost, whether the server still answered afterwards.
Each attack has a deadline (30 s of waiting for the server's reply); then the server is killed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after $PYTHONPATH: it picks zchat_nb
from tests.attacks import RawPeer, cpu_seconds, dag_frame, frame

DEADLINE = 30.0
STALL_DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(tmp: Path) -> tuple[subprocess.Popen[bytes], tuple[str, int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zchat_nb", "serve", "--port", str(port), "--path", str(tmp / "chat.fs")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp,  # `python -m` puts the cwd first on sys.path: $PYTHONPATH must pick zchat_nb
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            RawPeer(("127.0.0.1", port), timeout=1).close()
            return proc, ("127.0.0.1", port)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def answers(address: tuple[str, int], timeout: float) -> bool:
    """Whether a new client gets registered within ``timeout`` seconds."""
    try:
        peer = RawPeer(address, timeout=timeout)
        peer.register()
        peer.close()
        return True
    except OSError:
        return False


def dag_attack(depth: int, wrap: str) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start(Path(tmp))
        try:
            before = cpu_seconds(proc.pid)
            peer = RawPeer(address)
            peer.hello()
            peer.send(frame(dag_frame(depth, wrap, "register")))
            peer.sock.settimeout(DEADLINE)
            with contextlib.suppress(OSError):  # its error reply (register(DAG) fails) or its hang-up
                peer.read_frame()
            cost = cpu_seconds(proc.pid) - before
            ok = answers(address, 5.0)
            peer.close()
            return (
                f"DAG frame depth {depth} in {wrap}, before login",
                cost,
                "yes" if ok else f"no (>{DEADLINE:g} s)",
            )
        finally:
            proc.kill()
            proc.wait()


def stalled_vote() -> tuple[str, float, str]:
    import ZEO
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import load_current, z64

    import zchat_nb

    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start(Path(tmp))
        try:
            storage = ZEO.client(address, wait_timeout=10)
            root, serial = load_current(storage, z64)
            txn = TransactionMetaData()
            storage.tpc_begin(txn)
            storage.store(z64, serial, root, "", txn)
            storage.tpc_vote(txn)  # and silence: the commit lock is held
            client = zchat_nb.connect(address, user="honest", timeout=10)
            outcome: list[str] = []

            def send() -> None:
                try:
                    client.session().add_message("honest")
                    outcome.append("sent")
                except Exception as exc:
                    outcome.append(type(exc).__name__)

            started = time.monotonic()
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            sender.join(STALL_DEADLINE)  # a send that never returns is left behind
            waited = time.monotonic() - started
            what = f"{outcome[0]} after {waited:.1f} s" if outcome else f"still blocked after {waited:.0f} s"
            return "honest send (timeout 10 s) while a client holds the lock", waited, what
        finally:
            proc.kill()
            proc.wait()


def main() -> None:
    print(f"zchat_nb from {__import__('zchat_nb').__file__}")
    print(f"{'attack':55} {'seconds':>9}  served afterwards", flush=True)
    attacks = ((22, "frozenset"), (26, "frozenset"), (26, "dict"), (64, "frozenset"))
    for name, cost, ok in [*(dag_attack(depth, wrap) for depth, wrap in attacks), stalled_vote()]:
        print(f"{name:55} {cost:9.2f}  {ok}", flush=True)
    os._exit(0)  # a send still blocked in a stock client would keep the process alive


if __name__ == "__main__":
    os.environ.pop("ZCHAT_ADDRESS", None)
    main()
