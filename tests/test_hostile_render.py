"""What others typed, shown: bounded rendering cost, inert terminals, inert Markdown transcripts."""

from __future__ import annotations

import time

import pytest

import zchat_nb
from zchat_nb import teacher
from zchat_nb.model import Message
from zchat_nb.render import format_line, render_markdown, render_plain, terminal_safe


@pytest.mark.parametrize("text", ["[" * 65536, "[a](" * 16000, "*a" * 4096, "x" * 100_000])
def test_markdown_past_its_budget_is_shown_as_plain_escaped_text(text: str) -> None:
    assert render_markdown(text) == render_plain(text)


def test_ordinary_markdown_is_still_markdown() -> None:
    assert "<strong>bold</strong>" in render_markdown("**bold** and [a link](https://example.org)")
    assert render_plain("<b>\nx") == "<p>&lt;b&gt;<br>\nx</p>"


@pytest.mark.parametrize(
    "evil",
    [
        "\x1b[2J\x1b[H",  # clear the screen
        "\rroot: forged line",  # overwrite the line
        "\x1b]52;c;ZXZpbA==\x07",  # OSC 52: write the clipboard
        "\x1b]0;title\x07",  # window title
        "\u202eevil",  # right-to-left override
        "\x9b2J",  # C1 CSI
    ],
)
def test_terminal_output_shows_control_characters_instead_of_obeying_them(evil: str) -> None:
    line = format_line(Message("a" * 32, f"eve{evil}", f"hi {evil}\nsecond line", time.time()))
    assert not any(ch in line for ch in "\x1b\r\x07\x9b\u202e")
    assert "second line" in line and "\n" in line  # a message's own newlines stay
    assert "\n" not in terminal_safe("eve\nmallory", multiline=False)


@pytest.mark.integration
def test_markdown_exports_escape_html(server: zchat_nb.Server) -> None:
    with zchat_nb.connect(server.address, user="eve") as client:
        chat = client.session("general")
        chat.add_message("<script>alert(1)</script>")
        chat.add_message('<img src=x onerror="alert(2)"> and **bold**')
        transcript = teacher.to_markdown(client, "general")
    assert "<script>" not in transcript and "<img" not in transcript
    assert "&lt;script&gt;" in transcript and "**bold**" in transcript
