"""Two real kernels joined to one real ZEO server: a message sent from kernel B reaches the widget
in kernel A, as a comm message on A's IOPub channel, while A is idle (no cell running)."""

from __future__ import annotations

import os
import queue
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zchat_nb

jupyter_client = pytest.importorskip("jupyter_client")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 60.0


class Kernel:
    """A started kernel and its client, with helpers to run code and read IOPub."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.manager = jupyter_client.KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=env, cwd=str(cwd))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=TIMEOUT)

    def run(self, code: str) -> list[dict[str, Any]]:
        """Execute ``code``, fail on an error, and return the IOPub messages up to the kernel's idle."""
        msg_id = self.client.execute(textwrap.dedent(code))
        reply = self.client.get_shell_msg(timeout=TIMEOUT)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.client.get_shell_msg(timeout=TIMEOUT)
        seen: list[dict[str, Any]] = []
        while True:
            msg = self.client.get_iopub_msg(timeout=TIMEOUT)
            seen.append(msg)
            if (
                msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
                and msg["parent_header"].get("msg_id") == msg_id
            ):
                break
        errors = [m["content"] for m in seen if m["msg_type"] == "error"]
        assert reply["content"]["status"] == "ok", errors or reply["content"]
        return seen

    def stop(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)  # a clean shutdown: the widget's atexit hook runs


@pytest.fixture
def kernels(tmp_path: Path, server: zchat_nb.Server) -> Iterator[tuple[Kernel, Kernel]]:
    env = dict(os.environ)
    env["ZCHAT_HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    started: list[Kernel] = []
    try:
        for _ in range(2):
            started.append(Kernel(env, tmp_path))
        yield started[0], started[1]
    finally:
        for kernel in started:
            kernel.stop()


def test_a_message_from_kernel_b_reaches_the_idle_widget_in_kernel_a(
    server: zchat_nb.Server, kernels: tuple[Kernel, Kernel]
) -> None:
    a, b = kernels
    host, port = server.address
    # A long fallback interval: only the ZEO invalidation can wake A's poller in time.
    opened = a.run(
        f"""
        import zchat_nb
        from IPython.display import display
        client = zchat_nb.connect(({host!r}, {port}), user="alice")
        chat = zchat_nb.ChatWidget(client=client, room="general", poll_interval=600)
        display(chat)
        """
    )
    (comm_id,) = [
        m["content"]["comm_id"]
        for m in opened
        if m["msg_type"] == "comm_open"
        and m["content"]["data"]["state"].get("_anywidget_id") == "zchat_nb.widget.ChatWidget"
    ]

    text = f"hello from kernel B {time.time_ns()}"
    b.run(
        f"""
        import zchat_nb
        with zchat_nb.connect(({host!r}, {port}), user="bob") as client:
            client.session("general").add_message({text!r})
        """
    )

    # Kernel A has been idle since its cell finished; nothing is asked of it from here on.
    deadline = time.monotonic() + TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "kernel A's widget never sent the message"
        try:
            msg = a.client.get_iopub_msg(timeout=remaining)
        except queue.Empty:
            continue
        assert not (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "busy"), (
            "kernel A ran something while it should have been idle"
        )
        if msg["msg_type"] != "comm_msg" or msg["content"]["comm_id"] != comm_id:
            continue
        data = msg["content"]["data"]
        if data.get("method") == "custom" and data["content"]["type"] == "append":
            (message,) = data["content"]["messages"]
            assert message["author"] == "bob" and text in message["html"]
            assert message["own"] is False
            break
