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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zchat_nb

from .browser import (
    ARTIFACTS,
    UNSENT,
    TwoNotebooks,
    chromium_available,
    measure_delivery,
    message_texts,
    set_theme,
    type_and_send,
    wait_for_message,
    wait_until_all_sent,
)
from .helpers import MakeClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(chromium_available() is not None, reason=str(chromium_available())),
]

ROOM = "browser"
DELIVERY_MESSAGES = 30
#: The fast typist: this many messages back to back, a key every KEY_DELAY_MS (about 80 keys a second).
FAST_MESSAGES = 30
KEY_DELAY_MS = 12

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


def test_a_fast_typist_loses_no_keystroke(
    two: TwoNotebooks, chat_server: zchat_nb.Server, make_client: MakeClient
) -> None:
    """30 messages typed back to back at about 80 keys a second all arrive intact, in order, once."""
    observer = make_client(chat_server.address, "observer").session(ROOM, backlog=0)
    observer.new_messages()  # the cursor starts here
    run = secrets.token_hex(3)
    texts = [f"quick brown fox {run} {i:02d}" for i in range(FAST_MESSAGES)]
    page = two.page_a
    page.locator(".zchat-widget .zchat-input").first.click()

    for text in texts:
        page.keyboard.type(text, delay=KEY_DELAY_MS)  # no waiting for the commit between messages
        page.keyboard.press("Enter")

    received: list[str] = []
    deadline = time.monotonic() + 60
    while len(received) < len(texts) and time.monotonic() < deadline:
        batch = observer.new_messages(timeout=deadline - time.monotonic())
        received += [m.text for m in batch if m.author == "alice" and run in m.text]
    assert received == texts
    wait_until_all_sent(page)  # every pending message became the committed one...
    assert [t for t in message_texts(page) if run in t] == texts  # ...shown once, in order
    wait_for_message(two.page_b, texts[-1])
    assert [t for t in message_texts(two.page_b) if run in t] == texts


def test_a_failed_send_shows_not_sent_with_retry_and_edit_and_loses_nothing(two: TwoNotebooks) -> None:
    page = two.page_a
    box = page.locator(".zchat-widget .zchat-input").first
    too_long = "x" * 70_000  # over the 64 KiB limit: the kernel refuses it
    box.fill(too_long)
    box.press("Enter")
    assert box.input_value() == ""  # cleared at once, editable
    assert box.is_editable()
    failed = page.locator(".zchat-widget .zchat-message.zchat-failed").first
    failed.wait_for(timeout=20_000)
    assert "not sent" in failed.inner_text() and "limit" in failed.inner_text()
    assert failed.locator(".zchat-retry").is_visible()

    box.type("half typed")
    failed.locator(".zchat-edit").click()
    assert box.input_value() == f"{too_long}\nhalf typed"  # the unsent text is back, the rest kept
    assert page.locator(UNSENT).count() == 0
    box.fill("")


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


# -- code, links, grouping, pictures (issue 12) -------------------------------------------------

_STUB_CLIPBOARD_JS = """(mode) => {
  // Record what the Copy button would write. "api": navigator.clipboard works; "fallback": it is
  // missing (plain http), so the widget selects a hidden textarea and runs execCommand("copy").
  window.__copied = [];
  if (mode === "api") {
    Object.defineProperty(navigator, "clipboard", {configurable: true, value: {
      writeText: async (text) => { window.__copied.push(["api", text]); },
    }});
  } else {
    Object.defineProperty(navigator, "clipboard", {configurable: true, value: undefined});
    document.execCommand = (command) => {
      window.__copied.push([command, document.activeElement && document.activeElement.value]);
      return true;
    };
  }
}"""

_CODE_BLOCK_JS = """(marker) => {
  const message = [...document.querySelectorAll(".zchat-widget .zchat-message")]
    .find((node) => node.querySelector(".zchat-text").innerText.includes(marker));
  if (!message) return null;
  const pre = message.querySelector(".zchat-code pre");
  const keyword = message.querySelector(".zchat-hl-k");
  return {
    classes: [...message.querySelectorAll(".zchat-text pre [class]")].map((e) => e.className),
    styled: message.querySelectorAll(".zchat-text [style]").length,
    keywordColor: keyword && getComputedStyle(keyword).color,
    textColor: getComputedStyle(pre).color,
    scrolls: pre.scrollWidth > pre.clientWidth,
    copyButtons: message.querySelectorAll(".zchat-code > button.zchat-copy").length,
  };
}"""


def test_a_code_block_is_highlighted_scrolls_and_copies_its_text(two: TwoNotebooks) -> None:
    marker = secrets.token_hex(3)
    long_line = "    return " + " + ".join(f"value_{i}" for i in range(40))
    code = f"def shared_{marker}(value_0):\n{long_line}  # a comment"
    type_and_send(two.page_a, f"```python\n{code}\n```")
    page = two.page_b
    page.wait_for_function(
        """(marker) => [...document.querySelectorAll(".zchat-widget .zchat-text")]
                         .some((node) => node.innerText.includes(marker))""",
        arg=marker,
        timeout=20_000,
    )
    found = page.evaluate(_CODE_BLOCK_JS, marker)
    assert found is not None
    assert found["classes"] and all(c.startswith("zchat-hl-") for c in found["classes"]), found["classes"]
    assert found["styled"] == 0  # colours come from the stylesheet, never inline styles
    assert found["keywordColor"] != found["textColor"]  # the theme's keyword colour applies
    assert found["scrolls"], "a long line scrolls horizontally instead of wrapping"
    assert found["copyButtons"] == 1

    copy = page.locator(".zchat-message", has_text=marker).locator("button.zchat-copy").first
    for mode, kind in (("api", "api"), ("fallback", "copy")):
        page.evaluate(_STUB_CLIPBOARD_JS, mode)
        copy.click()
        page.wait_for_function("() => window.__copied.length > 0", timeout=10_000)
        assert page.evaluate("() => window.__copied") == [[kind, code]]
        assert copy.get_attribute("data-label") == "Copied"


def test_bare_urls_are_links_and_a_run_of_messages_shares_one_header(two: TwoNotebooks) -> None:
    marker = secrets.token_hex(3)
    first, second = f"first {marker} see https://zodb.org/en/latest/", f"second {marker}"
    type_and_send(two.page_b, first)
    type_and_send(two.page_b, second)
    page = two.page_a
    wait_for_message(page, second)
    link = page.locator(".zchat-message", has_text=first).locator("a[href='https://zodb.org/en/latest/']")
    assert link.get_attribute("target") == "_blank"
    assert "noopener" in (link.get_attribute("rel") or "")
    one = page.locator(".zchat-message", has_text=first).first
    two_ = page.locator(".zchat-message", has_text=second).first
    assert "zchat-continued" in (two_.get_attribute("class") or "")  # same author, seconds apart
    assert not two_.locator(".zchat-meta").is_visible()
    assert one.locator(".zchat-author").is_visible() or "zchat-continued" in (
        one.get_attribute("class") or ""
    )
    days = page.locator(".zchat-widget .zchat-day")
    assert days.count() >= 1 and "Today" in days.last.inner_text()


def _png(color: str, size: tuple[int, int] = (48, 32)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


_IMAGE_READY_JS = """(name) => {
  const figure = [...document.querySelectorAll(".zchat-widget .zchat-attachment")]
    .find((node) => node.dataset.name === name);
  const img = figure && figure.querySelector("img.zchat-image");
  return Boolean(img && img.complete && img.naturalWidth);
}"""

_IMAGE_JS = """async (name) => {
  const figure = [...document.querySelectorAll(".zchat-widget .zchat-attachment")]
    .find((node) => node.dataset.name === name);
  const img = figure && figure.querySelector("img.zchat-image");
  if (!img || !img.complete || !img.naturalWidth) return null;
  const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return {src: img.src, width: img.naturalWidth, height: img.naturalHeight, b64: btoa(binary)};
}"""


def test_a_shared_picture_shows_in_both_notebooks_from_its_bytes(
    two: TwoNotebooks, chat_server: zchat_nb.Server, make_client: MakeClient
) -> None:
    import base64

    pytest.importorskip("PIL")
    data = _png("orange")
    name = f"orange-{secrets.token_hex(3)}.png"
    sharer = make_client(chat_server.address, "carol").session(ROOM)
    sharer.share_files([(name, "image/png", data)], text="an orange box")
    for page in two.pages():
        page.wait_for_function(_IMAGE_READY_JS, arg=name, timeout=20_000)
        shown = page.evaluate(_IMAGE_JS, name)
        assert shown["src"].startswith("blob:")  # made in the page from the kernel's bytes
        assert (shown["width"], shown["height"]) == (48, 32)
        assert base64.b64decode(shown["b64"]) == data
    page = two.page_b
    page.locator(f".zchat-attachment[data-name='{name}'] img.zchat-image").click()
    page.wait_for_selector(".zchat-lightbox img.zchat-lightbox-image", timeout=5_000)
    page.locator(".zchat-lightbox").click()
    page.wait_for_selector(".zchat-lightbox", state="detached", timeout=5_000)
    shots = [_widget_shot(page, "browser-widget-media.png")]
    set_theme(page, "JupyterLab Dark")
    try:
        shots.append(_widget_shot(page, "browser-widget-media-dark.png"))
    finally:
        set_theme(page, "JupyterLab Light")
    assert all(path.stat().st_size > 10_000 for path in shots)


def test_markdown_image_syntax_fetches_nothing(two: TwoNotebooks) -> None:
    from .helpers import free_port

    probe = f"http://127.0.0.1:{free_port()}/probe-{secrets.token_hex(3)}.png"
    requested: list[str] = []
    for page in two.pages():
        page.on("request", lambda request: requested.append(request.url))
    text = f"![a picture]({probe}) and <img src='{probe}'>"
    type_and_send(two.page_a, text)
    marker = "a picture"
    two.page_b.wait_for_function(
        """(probe) => [...document.querySelectorAll(".zchat-widget .zchat-text")]
                        .some((node) => node.innerText.includes(probe))""",
        arg=probe,
        timeout=20_000,
    )
    for page in two.pages():
        message = page.locator(".zchat-message", has_text=probe).last
        assert message.locator("img").count() == 0
        assert marker in message.inner_text()
    assert not [url for url in requested if url.startswith(probe)]


_PASTE_JS = """async ({b64, name, how}) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, {type: "image/png"}));
  const box = document.querySelector(".zchat-widget .zchat-input");
  const event = how === "paste"
    ? new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true})
    : new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true});
  box.dispatchEvent(event);
  return event.defaultPrevented;
}"""


@pytest.mark.parametrize("how", ["paste", "drop"])
def test_a_picture_pasted_or_dropped_into_the_box_is_shared(
    two: TwoNotebooks, chat_server: zchat_nb.Server, make_client: MakeClient, how: str
) -> None:
    import base64

    pytest.importorskip("PIL")
    client = make_client(chat_server.address, "observer")
    observer = client.session(ROOM, backlog=0)
    observer.new_messages()
    data = _png("purple", (20, 10))
    name = f"{how}-{secrets.token_hex(3)}.png"
    handled = two.page_a.evaluate(
        _PASTE_JS, {"b64": base64.b64encode(data).decode(), "name": name, "how": how}
    )
    assert handled is True
    found: list[zchat_nb.Message] = []
    deadline = time.monotonic() + 20
    while not found and time.monotonic() < deadline:
        found = [m for m in observer.new_messages(timeout=deadline - time.monotonic()) if m.attachments]
    (message,) = found
    assert message.author == "alice" and message.attachments[0].name == name
    assert client.attachment_bytes(message) == data
    two.page_b.wait_for_function(_IMAGE_READY_JS, arg=name, timeout=20_000)
