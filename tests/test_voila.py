"""Voilà pages: the chat page (``notebooks/chat.ipynb``) and the demo notebook.

``voila NOTEBOOK`` runs the notebook in a fresh kernel per page view and shows only its outputs;
the ChatWidget is an anywidget, which Voilà loads as a JupyterLab federated extension. The chat
page asks each visitor for a display name (remembered by the browser) and posts nothing on load.
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
    message_texts,
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


# -- the chat page ------------------------------------------------------------------------------


def _open_chat_page(browser: Any, voila: Voila, errors: list[str]) -> Any:
    """A visitor: a browser context of its own (own localStorage), the chat page open and connected."""
    page = new_page(browser, errors)
    page.goto(voila.page_url, wait_until="domcontentloaded", timeout=TIMEOUT * 1000)
    wait_for_connected_widget(page)
    return page


def _choose_name(page: Any, name: str) -> None:
    field = page.locator(".zchat-widget .zchat-name").first
    field.fill(name)
    field.press("Enter")
    _wait_named(page, name)


def _wait_named(page: Any, name: str) -> None:
    """Wait until the kernel took ``name``: the status line says who this page sends as."""
    page.wait_for_selector(f".zchat-widget .zchat-status:has-text('as {name}')", timeout=TIMEOUT * 1000)


def _author_of(page: Any, text: str) -> str:
    wait_for_message(page, text)
    message = page.locator(".zchat-widget .zchat-message", has_text=text).last
    return str(message.locator(".zchat-author").inner_text())


def test_two_visitors_of_the_chat_page_chat_under_their_names_and_reloads_post_nothing(
    server: zchat_nb.Server, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    root = tmp_path / "voila"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / "chat.ipynb", root / "chat.ipynb")
    env = dict(os.environ)
    env["ZCHAT_ADDRESS"] = "{}:{}".format(*server.address)
    observer = zchat_nb.connect(server.address, user="observer")
    errors: list[str] = []
    try:
        session = observer.session("general", backlog=0)
        session.new_messages()  # the cursor starts here
        with Voila(root, "chat.ipynb", env) as voila, sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                ada = _open_chat_page(browser, voila, errors)
                grace = _open_chat_page(browser, voila, errors)
                assert ada.locator(".zchat-widget .zchat-name").first.is_visible()
                assert ada.locator(".zchat-widget .zchat-room[data-room='general']").count() == 1  # room tabs
                assert session.new_messages(timeout=0.5) == []  # two page loads posted nothing
                _choose_name(ada, "Ada")
                _choose_name(grace, "Grace Hopper")

                run = secrets.token_hex(3)
                type_and_send(ada, f"hello from Ada {run}")
                assert _author_of(grace, f"hello from Ada {run}") == "Ada"
                type_and_send(grace, f"hello back {run}")
                assert _author_of(ada, f"hello back {run}") == "Grace Hopper"
                got = _wait_for_count(session, 2)
                assert [(m.author, m.text) for m in got] == [
                    ("Ada", f"hello from Ada {run}"),
                    ("Grace Hopper", f"hello back {run}"),
                ]
                ARTIFACTS.mkdir(exist_ok=True)
                ada.locator(".zchat-widget").first.screenshot(path=str(ARTIFACTS / "voila-chat-page.png"))

                before = len(session.history(1000))
                ada.reload(wait_until="domcontentloaded", timeout=TIMEOUT * 1000)
                wait_for_connected_widget(ada)
                field = ada.locator(".zchat-widget .zchat-name").first
                assert field.input_value() == "Ada"  # remembered by the browser
                _wait_named(ada, "Ada")  # the view gave the remembered name to the new kernel
                assert f"hello back {run}" in message_texts(ada)  # the room's history, as before
                assert len(session.history(1000)) == before  # the reload posted nothing
                type_and_send(ada, f"after the reload {run}")
                (after,) = _wait_for_count(session, 1)  # the only new message is the one typed
                assert (after.author, after.text) == ("Ada", f"after the reload {run}")
            finally:
                browser.close()
    finally:
        observer.close()
    assert not [e for e in errors if e.startswith(("dialog", "pageerror"))], errors


def _wait_for_count(session: Any, count: int, timeout: float = TIMEOUT) -> list[Message]:
    """The next ``count`` messages ``session`` receives; fails if more or fewer arrive in time."""
    deadline = time.monotonic() + timeout
    found: list[Message] = []
    while len(found) < count and time.monotonic() < deadline:
        found += session.new_messages(timeout=deadline - time.monotonic())
    assert len(found) == count, found
    return found
