"""The demo notebook served by Voilà is a chat page: a message typed there reaches a Python client, and back.

``voila chat_demo.ipynb`` runs the notebook in a fresh kernel per page view and shows only its
outputs; the ChatWidget is an anywidget, which Voilà loads as a JupyterLab federated extension.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zchat_nb
from zchat_nb.model import Message

from .browser import (
    ARTIFACTS,
    REPO,
    Voila,
    chromium_available,
    launch_chromium,
    new_page,
    type_and_send,
    wait_for_connected_widget,
    wait_for_message,
)

pytest.importorskip("voila")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(chromium_available() is not None, reason=str(chromium_available())),
]

TIMEOUT = 30.0


@pytest.fixture
def voila_page(server: zchat_nb.Server, tmp_path: Path) -> Iterator[Any]:
    """The demo notebook in Voilà (on a copy), open in Chromium with its widget connected to ``server``."""
    from playwright.sync_api import sync_playwright

    root = tmp_path / "voila"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / "chat_demo.ipynb", root / "chat_demo.ipynb")
    env = dict(os.environ)  # ZCHAT_HOME is the test's own (conftest.zchat_home)
    env["ZCHAT_ADDRESS"] = "{}:{}".format(*server.address)
    errors: list[str] = []
    with Voila(root, "chat_demo.ipynb", env) as voila, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser, errors)
            page.goto(voila.page_url, wait_until="domcontentloaded", timeout=TIMEOUT * 1000)
            wait_for_connected_widget(page)
            yield page
        finally:
            browser.close()
    assert not [e for e in errors if e.startswith("dialog")], errors


def _wait_for_text(session: Any, text: str, timeout: float = TIMEOUT) -> list[Message]:
    """Messages with ``text`` that ``session`` receives within ``timeout`` (woken by invalidations)."""
    deadline = time.monotonic() + timeout
    found: list[Message] = []
    while not found and time.monotonic() < deadline:
        found = [m for m in session.new_messages(timeout=deadline - time.monotonic()) if m.text == text]
    return found


def test_a_message_typed_in_the_voila_page_reaches_a_python_client(
    voila_page: Any, server: zchat_nb.Server
) -> None:
    status = voila_page.locator(".zchat-widget .zchat-status").first.inner_text()
    assert "connected to {}:{}".format(*server.address) in status
    client = zchat_nb.connect(server.address, user="observer")
    try:
        session = client.session("general", backlog=0)
        session.new_messages()  # the cursor starts here
        text = f"hello from the Voilà page {secrets.token_hex(3)}"

        type_and_send(voila_page, text)

        received = _wait_for_text(session, text)
        assert len(received) == 1, received
        wait_for_message(voila_page, text)

        reply = f"hello back from Python {secrets.token_hex(3)}"
        session.add_message(reply)
        wait_for_message(voila_page, reply)
        ARTIFACTS.mkdir(exist_ok=True)
        voila_page.locator(".zchat-widget").first.screenshot(path=str(ARTIFACTS / "voila-chat.png"))
    finally:
        client.close()
