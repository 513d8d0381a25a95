"""Two notebooks in a real JupyterLab, on two kernels, in a real Chromium, chatting through one ZEO server.

a.ipynb (alice) and b.ipynb (bob) both run ``%load_ext zchat_nb`` and ``%zchat join --room browser
--name ...`` against ``$ZCHAT_ADDRESS``. What is typed into one widget and sent with Enter shows up
in the other; markup in messages shows as text and runs nothing. Screenshots and the browser ->
browser delivery times are written to ``test-artifacts/`` (git-ignored).

The whole module shares one server, one JupyterLab and one browser (about 15 s to start).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zchat_nb

from .browser import (
    ARTIFACTS,
    TwoNotebooks,
    chromium_available,
    measure_delivery,
    message_texts,
    set_theme,
    type_and_send,
    wait_for_message,
)
from .helpers import MakeClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(chromium_available() is not None, reason=str(chromium_available())),
]

ROOM = "browser"
DELIVERY_MESSAGES = 30

# Each payload, sent as a chat message, must show as its own text and run nothing.
PAYLOADS = [
    "<img src=x onerror=window.__pwned=1>",
    "<script>window.__pwned=2</script>",
    "<svg onload=window.__pwned=3>",
    "[x](javascript:window.__pwned=4)",
    "<iframe srcdoc='<script>parent.__pwned=5</script>'></iframe>",
    '<a href="javascript:window.__pwned=6">click</a>',
]

# What a message's .zchat-text holds in a page: its text, and anything that could run script.
_INSPECT_JS = """(text) => {
  const nodes = [...document.querySelectorAll(".zchat-widget .zchat-message .zchat-text")]
    .filter((node) => node.innerText.trim() === text);
  const all = nodes.flatMap((node) => [...node.querySelectorAll("*")]);
  return {
    count: nodes.length,
    html: nodes.map((node) => node.innerHTML),
    active: all.filter((e) => ["IMG", "SVG", "SCRIPT", "IFRAME", "OBJECT", "EMBED", "STYLE", "svg"]
                                 .includes(e.tagName)).map((e) => e.outerHTML),
    handlers: all.flatMap((e) => [...e.attributes].filter((a) => a.name.startsWith("on"))
                                 .map((a) => e.tagName + " " + a.name)),
    hrefs: all.filter((e) => e.hasAttribute("href") || e.hasAttribute("src"))
              .map((e) => e.getAttribute("href") || e.getAttribute("src")),
  };
}"""

# A positive control: in this page, an inline onerror handler does run (no CSP stops it), so
# window.__pwned staying undefined means no payload got as far as the DOM.
_CONTROL_JS = """() => new Promise((resolve) => {
  window.__control = 0;
  const box = document.createElement("div");
  box.innerHTML = '<img src="data:," onerror="window.__control = 1">';
  document.body.append(box);
  const check = () => window.__control === 1 ? (box.remove(), resolve(true)) : setTimeout(check, 10);
  check();
})"""


@pytest.fixture(scope="module")
def chat_server() -> Iterator[zchat_nb.Server]:
    """One in-memory ZEO server for the module (the notebooks find it through $ZCHAT_ADDRESS)."""
    with zchat_nb.serve() as server:
        yield server


@pytest.fixture(scope="module")
def two(chat_server: zchat_nb.Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNotebooks]:
    """JupyterLab on fresh copies of a.ipynb and b.ipynb, each open and joined in its own page."""
    root = tmp_path_factory.mktemp("lab") / "notebooks"
    root.mkdir()
    address = "{}:{}".format(*chat_server.address)
    with TwoNotebooks(address, root, room=ROOM) as notebooks:
        yield notebooks


def _unique(prefix: str) -> str:
    return f"{prefix} {secrets.token_hex(3)}"


def test_both_widgets_are_connected_to_the_test_server(two: TwoNotebooks, chat_server: Any) -> None:
    where = "{}:{}".format(*chat_server.address)
    for page, user in ((two.page_a, "alice"), (two.page_b, "bob")):
        status = page.locator(".zchat-widget .zchat-status").first.inner_text()
        assert f"connected to {where} as {user}" in status


def test_enter_in_one_notebook_shows_the_message_in_the_other(
    two: TwoNotebooks, chat_server: zchat_nb.Server, make_client: MakeClient
) -> None:
    observer = make_client(chat_server.address, "observer").session(ROOM, backlog=0)
    observer.new_messages()  # the cursor starts here
    text = _unique("hello bob, from alice's notebook")

    type_and_send(two.page_a, text)  # returns once A's box cleared: the kernel says it committed

    wait_for_message(two.page_b, text)
    assert two.page_a.locator(".zchat-widget .zchat-input").first.input_value() == ""
    received = two.page_b.locator(".zchat-message", has_text=text).first
    assert received.locator(".zchat-author").inner_text() == "alice"
    assert "zchat-own" not in (received.get_attribute("class") or "")
    own = two.page_a.locator(".zchat-message", has_text=text).first
    assert "zchat-own" in (own.get_attribute("class") or "")
    committed = [m for m in observer.new_messages(timeout=10) if m.text == text]
    assert [m.author for m in committed] == ["alice"]

    reply = _unique("hi alice, bob here")
    type_and_send(two.page_b, reply)
    wait_for_message(two.page_a, reply)


def test_shift_enter_starts_a_new_line_instead_of_sending(two: TwoNotebooks) -> None:
    box = two.page_a.locator(".zchat-widget .zchat-input").first
    first, second = _unique("line one"), "line two"
    box.fill(first)
    box.press("Shift+Enter")
    box.type(second)
    assert box.input_value() == f"{first}\n{second}"
    box.press("Enter")
    two.page_a.wait_for_function(
        "() => document.querySelector('.zchat-widget .zchat-input').value === ''", timeout=20_000
    )
    wait_for_message(two.page_b, f"{first}\n{second}")


@pytest.mark.parametrize("payload", PAYLOADS)
def test_markup_in_a_message_shows_as_text_and_runs_nothing(two: TwoNotebooks, payload: str) -> None:
    type_and_send(two.page_a, payload)
    wait_for_message(two.page_b, payload)

    for page in two.pages():
        assert page.evaluate(_CONTROL_JS) is True  # inline handlers do run in this page
        found = page.evaluate(_INSPECT_JS, payload)
        assert found["count"] >= 1, (payload, message_texts(page)[-3:])
        assert found["active"] == [], found
        assert found["handlers"] == [], found
        assert not [h for h in found["hrefs"] if not h.startswith(("http:", "https:", "mailto:"))], found
        assert page.evaluate("() => typeof window.__pwned") == "undefined", found
    assert not [e for e in two.errors if e.startswith("dialog")], two.errors


def test_screenshot_of_the_two_notebooks(two: TwoNotebooks) -> None:
    type_and_send(two.page_a, "Screenshot time: *Markdown* with `code` and a [link](https://zodb.org)")
    type_and_send(two.page_b, "```python\nroot.chat.add_message('hi')\n```")
    wait_for_message(two.page_a, "root.chat.add_message('hi')")

    shots = [two.screenshot(ARTIFACTS / "browser-two-notebooks.png")]
    shots.append(_widget_shot(two.page_b, "browser-widget-bob.png"))
    for page in two.pages():
        set_theme(page, "JupyterLab Dark")
    try:
        shots.append(two.screenshot(ARTIFACTS / "browser-two-notebooks-dark.png"))
        shots.append(_widget_shot(two.page_a, "browser-widget-alice-dark.png"))
    finally:
        for page in two.pages():
            set_theme(page, "JupyterLab Light")
    for path in shots:
        assert path.stat().st_size > 10_000, path


def _widget_shot(page: Any, name: str) -> Path:
    path = ARTIFACTS / name
    page.locator(".zchat-widget").first.screenshot(path=str(path))
    return path


def test_browser_to_browser_delivery(two: TwoNotebooks) -> None:
    """30 messages typed into A, each timed from its Enter in A to its element in B (no timing asserted)."""
    result = measure_delivery(two.page_a, two.page_b, DELIVERY_MESSAGES, tag="timed")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "browser-delivery.json").write_text(json.dumps(result, indent=2) + "\n")
    assert result["missing"] == []
    assert result["arrived"] == DELIVERY_MESSAGES
    assert len(result["latencies_ms"]) == DELIVERY_MESSAGES
