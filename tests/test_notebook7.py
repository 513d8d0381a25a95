"""The ChatWidget in Jupyter Notebook 7: a message typed in the page reaches a Python client once, and back.

``jupyter notebook`` (Notebook 7) serves a fresh notebook that runs ``%load_ext zchat_nb`` and
``%zchat join`` against ``$ZCHAT_ADDRESS``; Chromium opens it at ``/notebooks/NAME``, runs all its
cells through ``window.jupyterapp`` (Notebook 7 exposes its app as JupyterLab does) and types into
the widget. A screenshot is written to ``test-artifacts/notebook7.png`` (git-ignored).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zchat_nb
from zchat_nb.model import ChatSession, Message

from .browser import (
    ARTIFACTS,
    Notebook7,
    chromium_available,
    launch_chromium,
    new_page,
    open_notebook_and_run,
    type_and_send,
    wait_for_message,
    write_notebook,
)

pytest.importorskip("notebook", minversion="7")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(chromium_available() is not None, reason=str(chromium_available())),
]

ROOM = "notebook7"
USER = "nina"
NOTEBOOK = "chat.ipynb"
TIMEOUT = 30.0

_CELL_COUNT_JS = "() => window.jupyterapp.shell.currentWidget.content.widgets.length"


@pytest.fixture
def notebook7_page(server: zchat_nb.Server, tmp_path: Path) -> Iterator[Any]:
    """A Notebook 7 page on a fresh notebook, all cells run, its widget connected to ``server``."""
    from playwright.sync_api import sync_playwright

    root = tmp_path / "notebooks"
    root.mkdir()
    write_notebook(root / NOTEBOOK, ["%load_ext zchat_nb", f"%zchat join --room {ROOM} --name {USER}"])
    env = dict(os.environ)  # ZCHAT_HOME is the test's own (conftest.zchat_home)
    env["ZCHAT_ADDRESS"] = "{}:{}".format(*server.address)
    errors: list[str] = []
    stacks: list[str] = []
    notebook = Notebook7(root, env)
    with notebook, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser, errors)
            page.on("pageerror", lambda exc: stacks.append(exc.stack or exc.message))
            open_notebook_and_run(page, notebook, NOTEBOOK, workspace="")
            yield page
        finally:
            browser.close()
    assert not [e for e in errors if e.startswith("dialog")], errors
    assert not [stack for stack in stacks if not _only_notebook_frames(stack)], stacks


def _only_notebook_frames(stack: str) -> bool:
    """True when every script in an error's stack is one of Notebook 7's own bundles.

    Notebook 7.6.5 itself throws "Cannot read properties of undefined (reading 'schema')" while it
    loads (its shortcuts plugin handles ``pluginChanged`` for a plugin not yet in the registry),
    also on a notebook that only runs ``1+1``; an error from the widget would name another script.
    """
    scripts = re.findall(r"(?:https?|blob):\S+", stack)
    return bool(scripts) and all("/static/notebook/" in script for script in scripts)


def _receive_until(session: ChatSession, text: str, timeout: float = TIMEOUT) -> list[Message]:
    """Everything ``session`` receives up to and including the first message with ``text``."""
    deadline = time.monotonic() + timeout
    received: list[Message] = []
    while not any(m.text == text for m in received):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{text!r} did not arrive within {timeout} s; got {received!r}")
        received.extend(session.new_messages(timeout=left))
    return received


def test_a_message_typed_in_notebook_7_reaches_a_python_client_once_and_back(
    notebook7_page: Any, server: zchat_nb.Server
) -> None:
    page = notebook7_page
    assert page.evaluate("() => window.jupyterapp.name") == "Jupyter Notebook"  # not JupyterLab
    assert page.url.split("?")[0].endswith(f"/notebooks/{NOTEBOOK}")
    status = page.locator(".zchat-widget .zchat-status").first.inner_text()
    assert "connected to {}:{} as {}".format(*server.address, USER) in status
    client = zchat_nb.connect(server.address, user="observer")
    try:
        session = client.session(ROOM, backlog=0)
        session.new_messages()  # the cursor starts here
        text = f"hello from Notebook 7 {secrets.token_hex(3)}"

        type_and_send(page, text)  # returns once the box cleared: the kernel says it committed

        wait_for_message(page, text)
        own = page.locator(".zchat-message", has_text=text)
        assert "zchat-own" in (own.first.get_attribute("class") or "")

        # The reply doubles as a fence: whatever the page sent before it has arrived by then.
        reply = f"hello back from Python {secrets.token_hex(3)}"
        session.add_message(reply)
        received = _receive_until(session, reply)
        assert [(m.author, m.text) for m in received if m.text == text] == [(USER, text)]

        wait_for_message(page, reply)
        assert own.count() == 1
        assert page.locator(".zchat-message", has_text=reply).count() == 1

        # Shift+Enter is a newline in the box, not Notebook 7's "run cell" shortcut.
        box = page.locator(".zchat-widget .zchat-input").first
        first, second = f"line one {secrets.token_hex(3)}", "line two"
        box.fill(first)
        box.press("Shift+Enter")
        box.type(second)
        assert box.input_value() == f"{first}\n{second}"
        box.press("Enter")
        wait_for_message(page, f"{first}\n{second}")
        assert page.evaluate(_CELL_COUNT_JS) == 2  # no cell was run or added by the keys
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "notebook7.png"))
    finally:
        client.close()
