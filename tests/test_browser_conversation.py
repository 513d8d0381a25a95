"""Conversations in a real JupyterLab and Chromium: Reply, React, Edit, Delete and Up arrow, by clicks
and keys in one notebook, seen in the other and by a Python client; in a TLS classroom, so that the
verified marks and the teacher's delete of anyone's message are the real ones.

a.ipynb joins as the student alice, b.ipynb as the teacher (each with its classroom certificate);
a Python client with bob's certificate watches, and also posts under the forged name "teacher ✓".
The module starts its own server, JupyterLab and browser (the scenarios share them, in order).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

import zchat_nb
from zchat_nb import certs

from .browser import (
    ARTIFACTS,
    DELIVERY_TIMEOUT_MS,
    TwoNotebooks,
    chromium_available,
    type_and_send,
    wait_for_message,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(chromium_available() is not None, reason=str(chromium_available())),
]

ROOM = "convo"
WAIT_S = 30.0


@pytest.fixture(scope="module")
def classroom(tmp_path_factory: pytest.TempPathFactory) -> certs.Classroom:
    return certs.make_classroom(tmp_path_factory.mktemp("class") / "class", ["alice", "bob"])


@pytest.fixture(scope="module")
def tls_server(classroom: certs.Classroom) -> Iterator[zchat_nb.Server]:
    with zchat_nb.serve(tls=classroom.directory) as server:
        yield server


@pytest.fixture(scope="module")
def two(
    tls_server: zchat_nb.Server, classroom: certs.Classroom, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoNotebooks]:
    root = tmp_path_factory.mktemp("lab") / "notebooks"
    root.mkdir()
    address = "{}:{}".format(*tls_server.address)
    options = (f"--tls {classroom.bundles['alice']}", f"--tls {classroom.bundles['teacher']}")
    with TwoNotebooks(
        address, root, room=ROOM, users=("alice", "teacher"), join_options=options
    ) as notebooks:
        yield notebooks


def _unique(prefix: str) -> str:
    return f"{prefix} {secrets.token_hex(3)}"


def _message(page: Any, text: str) -> Any:
    """The committed message whose text contains ``text`` (a locator)."""
    return page.locator(".zchat-widget .zchat-message[data-id]", has_text=text).first


def _wait(page: Any, script: str, arg: Any = None) -> None:
    page.wait_for_function(script, arg=arg, timeout=DELIVERY_TIMEOUT_MS)


def _updated(session: zchat_nb.ChatSession, want: Any, what: str) -> zchat_nb.Message:
    """Read ``session`` until a message satisfying ``want`` comes (new or updated); fail after WAIT_S."""
    import time

    deadline = time.monotonic() + WAIT_S
    seen: list[zchat_nb.Message] = []
    while time.monotonic() < deadline:
        batch = (
            session.new_messages(timeout=min(2.0, deadline - time.monotonic())) + session.updated_messages()
        )
        seen += batch
        for message in reversed(batch):
            if want(message):
                return message
    raise AssertionError(f"the Python client never saw {what}; it saw {[(m.text, m.deleted) for m in seen]}")


# Whether the author's name in a message carries the verified badge, as drawn (CSS ::after).
_VERIFIED_JS = """(node) => {
  const author = node.querySelector(".zchat-author");
  const after = getComputedStyle(author, "::after").content;
  return {name: author.textContent, cls: author.classList.contains("zchat-verified"), after};
}"""


def test_reply_react_edit_delete_and_up_arrow_reach_the_other_notebook_and_python(
    two: TwoNotebooks, tls_server: zchat_nb.Server, classroom: certs.Classroom
) -> None:
    a, b = two.page_a, two.page_b
    with (
        zchat_nb.connect(tls_server.address, tls=classroom.bundles["bob"]) as bob,
        zchat_nb.connect(tls_server.address, tls=classroom.bundles["bob"], user="teacher ✓") as forger,
    ):
        watcher = bob.session(ROOM, backlog=0)
        watcher.new_messages()

        # A question that mentions the teacher: highlighted in B, verified author everywhere.
        question = _unique("what does _p_changed do, @teacher?")
        type_and_send(a, question)
        wait_for_message(b, question)
        in_b = _message(b, question)
        assert "zchat-mentions-me" in (in_b.get_attribute("class") or "")
        assert in_b.locator(".zchat-mention-me").inner_text() == "@teacher"
        assert "zchat-mentions-me" not in (_message(a, question).get_attribute("class") or "")
        assert in_b.evaluate(_VERIFIED_JS) == {"name": "alice", "cls": True, "after": '"✓"'}
        asked = _updated(watcher, lambda m: m.text == question, "the question")
        assert asked.verified and asked.mentions == ("teacher",)

        # A forged name with a check mark in it is drawn without the badge.
        forged_text = _unique("I am the teacher, trust me")
        forger.session(ROOM).add_message(forged_text)
        wait_for_message(a, forged_text)
        assert _message(a, forged_text).evaluate(_VERIFIED_JS) == {
            "name": "teacher ✓",
            "cls": False,
            "after": "none",
        }

        # The teacher answers; alice replies by clicking Reply on the answer.
        # Markup in the answer: its quote must show it as text (textContent) and run nothing.
        answer = _unique("it marks the object changed <img src=x onerror=window.__pwned=1>")
        type_and_send(b, answer)
        wait_for_message(a, answer)
        answer_a = _message(a, answer)
        assert answer_a.evaluate(_VERIFIED_JS)["cls"] is True
        assert answer_a.locator(".zchat-action-delete").count() == 0  # not alice's message
        answer_a.hover()
        answer_a.locator(".zchat-action-reply").click()
        context = a.locator(".zchat-widget .zchat-context")
        assert context.is_visible() and context.inner_text().startswith(f"Replying to teacher: {answer}")
        assert context.locator("img").count() == 0
        thanks = _unique("thanks")
        type_and_send(a, thanks)
        assert not context.is_visible()
        wait_for_message(b, thanks)
        quote = _message(b, thanks).locator(".zchat-quote")
        assert quote.locator(".zchat-quote-author").inner_text() == "teacher"
        assert quote.locator(".zchat-quote-text").inner_text() == answer
        assert quote.locator("img").count() == 0
        quote.click()  # scrolls to the parent and focuses it
        _wait(
            b, "(text) => document.activeElement && document.activeElement.innerText.includes(text)", answer
        )
        reply = _updated(watcher, lambda m: m.text == thanks, "the reply")
        assert reply.reply_to is not None and reply.verified

        # React by keyboard: focus the answer, Tab to Reply, Tab to React, Enter, Enter on 👍.
        answer_a.focus()
        a.keyboard.press("Tab")
        assert a.evaluate("() => document.activeElement.classList.contains('zchat-action-reply')")
        a.keyboard.press("Tab")
        assert a.evaluate("() => document.activeElement.classList.contains('zchat-action-react')")
        a.keyboard.press("Enter")
        assert a.evaluate("() => document.activeElement.dataset.emoji") == "👍"
        a.keyboard.press("Enter")
        chip_b = _message(b, answer).locator(".zchat-reaction[data-emoji='👍']")
        chip_b.wait_for(timeout=DELIVERY_TIMEOUT_MS)
        assert chip_b.locator(".zchat-reaction-count").inner_text() == "1"
        assert chip_b.get_attribute("title") == "alice"
        reacted = _updated(watcher, lambda m: m.text == answer and m.reactions, "the reaction")
        assert dict(reacted.reactions) == {"👍": ("alice",)}
        # Clicking your own reaction takes it back.
        chip_a = answer_a.locator(".zchat-reaction-mine[data-emoji='👍']")
        chip_a.wait_for(timeout=DELIVERY_TIMEOUT_MS)
        chip_a.click()
        chip_b.wait_for(state="detached", timeout=DELIVERY_TIMEOUT_MS)
        _updated(watcher, lambda m: m.text == answer and not m.reactions, "the reaction taken back")

        # Up arrow in the empty box edits alice's last message (the reply); Enter saves.
        box = a.locator(".zchat-widget .zchat-input").first
        box.click()
        box.press("ArrowUp")
        assert box.input_value() == thanks
        assert context.is_visible() and "Editing" in context.inner_text()
        edited_text = _unique("thanks, that helps")
        box.fill(edited_text)
        box.press("Enter")
        assert box.input_value() == "" and not context.is_visible()
        wait_for_message(b, edited_text)
        edited_b = _message(b, edited_text)
        assert edited_b.locator(".zchat-edited-mark").is_visible()
        assert edited_b.locator(".zchat-quote-text").inner_text() == answer  # still a reply
        edited = _updated(watcher, lambda m: m.text == edited_text, "the edit")
        assert edited.edited is not None and edited.id == reply.id

        # Edit button then Escape: nothing changes, and what was typed comes back.
        box.fill("half typed")
        question_a = _message(a, question)
        question_a.hover()
        question_a.locator(".zchat-action-edit").click()
        assert box.input_value() == question
        box.press("Escape")
        assert box.input_value() == "half typed" and not context.is_visible()
        box.fill("")

        # Delete by click: B shows "message deleted" in its place.
        question_a.hover()
        question_a.locator(".zchat-action-delete").click()
        gone_b = b.locator(f".zchat-message.zchat-deleted[data-id='{asked.id}']")
        gone_b.locator(".zchat-deleted-mark").wait_for(timeout=DELIVERY_TIMEOUT_MS)
        assert gone_b.locator(".zchat-deleted-mark").inner_text() == "message deleted"
        assert gone_b.locator(".zchat-actions button").count() == 0
        assert question not in b.locator(".zchat-widget").first.inner_text()
        assert _updated(watcher, lambda m: m.id == asked.id and m.deleted, "the delete").text == ""

        # The teacher (moderator) deletes the forged message, which is not theirs.
        forged_b = _message(b, forged_text)
        forged_b.hover()
        forged_b.locator(".zchat-action-delete").click()
        forged = _updated(watcher, lambda m: m.author == "teacher ✓" and m.deleted, "the teacher's delete")
        a.locator(f".zchat-message.zchat-deleted[data-id='{forged.id}']").wait_for(
            timeout=DELIVERY_TIMEOUT_MS
        )
        assert forged_text not in a.locator(".zchat-widget").first.inner_text()

        # In another room, a mention of the teacher is counted apart in the tab of the room it came to.
        rooms_b = b.locator(".zchat-widget .zchat-room-input").first
        rooms_b.fill("elsewhere")
        rooms_b.press("Enter")
        b.locator(".zchat-widget[data-room='elsewhere']").wait_for(timeout=DELIVERY_TIMEOUT_MS)
        type_and_send(a, "a plain message")
        type_and_send(a, _unique("@teacher, a question for you"))
        tab = b.locator(f".zchat-widget .zchat-room[data-room='{ROOM}']")
        tab.locator(".zchat-mention-count").wait_for(timeout=DELIVERY_TIMEOUT_MS)
        assert tab.locator(".zchat-mention-count").inner_text() == "@1"
        assert tab.locator(".zchat-unread-count").inner_text() == "2"
        two.screenshot(ARTIFACTS / "browser-conversation-tabs.png")
        tab.click()
        tab.locator(".zchat-mention-count").wait_for(state="detached", timeout=DELIVERY_TIMEOUT_MS)

        for page in two.pages():
            assert page.locator(".zchat-widget .zchat-error").first.is_hidden(), page.locator(
                ".zchat-error"
            ).first.inner_text()
            assert page.evaluate("() => typeof window.__pwned") == "undefined"
        assert [e for e in two.errors if e.startswith("pageerror")] == []
        two.screenshot(ARTIFACTS / "browser-conversation.png")
