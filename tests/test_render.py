"""zchat_nb.render: message text becomes inert, readable HTML; users get stable colours and initials."""

from __future__ import annotations

import dataclasses
import random
import re
import time

import pytest

from zchat_nb import render
from zchat_nb.model import Message
from zchat_nb.render import (
    ALLOWED_TAGS,
    HIGHLIGHT_CLASSES,
    MAX_HIGHLIGHT_CHARS,
    code_blocks,
    format_line,
    initials,
    message_payload,
    render_markdown,
    terminal_safe,
    user_color,
    user_hue,
)

# (payload, text that must be visible once the HTML is shown)
ATTACKS = [
    ("<img src=x onerror=alert(1)>", "<img src=x onerror=alert(1)>"),
    ("<script>alert(1)</script>", "<script>alert(1)</script>"),
    ("<svg onload=alert(1)>", "<svg onload=alert(1)>"),
    ("[x](javascript:alert(1))", "[x](javascript:alert(1))"),
    ('<iframe srcdoc="<script>alert(1)</script>"></iframe>', "<iframe srcdoc="),
    ("![pic](https://example.org/x.png)", "pic"),
    ('<a href="javascript:alert(1)">click</a>', '<a href="javascript:alert(1)">click</a>'),
    ("[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)", "[x]"),
    ('<div style="background:url(javascript:alert(1))">', "<div style="),
    ("<style>*{display:none}</style>", "<style>"),
    ("`<img src=x onerror=alert(1)>`", "<img src=x onerror=alert(1)>"),
    ("```\n<script>alert(1)</script>\n```", "<script>alert(1)</script>"),
]

_TAG = re.compile(r"<\s*([a-zA-Z0-9]+)([^>]*)>")


def visible_text(html: str) -> str:
    """What a browser shows for ``html`` (tags dropped, entities decoded)."""
    import html as html_module

    return html_module.unescape(re.sub(r"<[^>]*>", "", html))


@pytest.mark.parametrize(("payload", "shown"), ATTACKS, ids=[a[0][:30] for a in ATTACKS])
def test_attack_payloads_render_inert_and_readable(payload: str, shown: str) -> None:
    html = render_markdown(payload)
    for tag, attrs in _TAG.findall(html):
        assert tag.lower() in ALLOWED_TAGS, f"{tag} survived in {html!r}"
        assert not re.search(r"\bon\w+\s*=", attrs, re.I), f"event handler survived in {html!r}"
        assert "javascript:" not in attrs.lower() and "data:" not in attrs.lower()
        assert "srcdoc" not in attrs.lower() and "style" not in attrs.lower()
    assert shown in visible_text(html)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("**bold** and *em*", "<strong>bold</strong> and <em>em</em>"),
        ("```\nprint('hi')\n```", "<pre><code>print('hi')\n</code></pre>"),
        ("inline `x < 1`", "<code>x &lt; 1</code>"),
        ("line one\nline two", "line one<br>"),
        ("> quoted", "<blockquote>"),
        ("- a\n- b", "<ul>"),
        ("~~gone~~", "<s>gone</s>"),
    ],
)
def test_markdown_is_rendered(text: str, expected: str) -> None:
    assert expected in render_markdown(text)


@pytest.mark.parametrize(
    "link",
    ["[site](https://example.org/a?b=c)", "<https://example.org/a?b=c>", "[mail](mailto:ada@example.org)"],
)
def test_allowed_links_open_in_a_new_tab_without_referrer(link: str) -> None:
    html = render_markdown(link)
    assert 'href="' in html
    assert 'target="_blank"' in html
    assert 'rel="noopener noreferrer nofollow"' in html


@pytest.mark.parametrize(
    "link", ["[f](ftp://example.org/x)", "[r](/files/secret.txt)", "[v](vbscript:msgbox)"]
)
def test_other_link_targets_are_dropped(link: str) -> None:
    assert "href" not in render_markdown(link)


def test_table_alignment_survives_but_no_other_style() -> None:
    html = render_markdown("| a | b |\n|--:|---|\n| 1 | 2 |")
    assert '<th style="text-align:right">a</th>' in html
    assert "<td>2</td>" in html


def test_user_colour_is_stable_and_differs_between_users() -> None:
    assert user_hue("alice") == user_hue("alice")
    assert 0 <= user_hue("alice") < 360
    assert user_color("alice") == f"hsl({user_hue('alice')}, 60%, 40%)"
    assert len({user_hue(name) for name in ["alice", "bob", "carol", "dave", "erin", "frank"]}) > 3


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Ada Lovelace", "AL"), ("ada", "AD"), ("grace.hopper", "GH"), ("élise", "ÉL"), ("x", "X"), ("__", "?")],
)
def test_initials(name: str, expected: str) -> None:
    assert initials(name) == expected


def test_message_payload_carries_what_the_view_shows() -> None:
    message = Message("abc", "bob", "<b>hi</b>", 1_764_000_000.25)
    payload = message_payload(message, own=False)
    assert payload == {
        "id": "abc",
        "author": "bob",
        "initials": "BO",
        "color": user_color("bob"),
        "hue": user_hue("bob"),
        "time": "2025-11-24T16:00:00.250+00:00",
        "ts": 1_764_000_000.25,
        "html": "<p>&lt;b&gt;hi&lt;/b&gt;</p>",
        "own": False,
        "reply_to": None,
        "edited": False,
        "deleted": False,
        "reactions": {},
        "verified": False,
        "mentions": [],
        "first_line": "<b>hi</b>",
        "reply": None,
        "source": "",
    }
    mine = message_payload(message, own=True)
    assert mine["own"] is True and mine["source"] == "<b>hi</b>"  # the text the author's Edit starts from


def test_message_payload_carries_the_conversation_and_no_text_of_a_deleted_message() -> None:
    from types import MappingProxyType

    replied = Message("r", "ada", "@bob look\nsecond line", 1.0, reply_to="abc", edited=2.0, verified=True)
    replied = dataclasses.replace(replied, reactions=MappingProxyType({"👍": ("bob", "cy")}))
    payload = message_payload(replied, own=False)
    assert payload["reply_to"] == "abc" and payload["edited"] and payload["verified"]
    assert payload["reactions"] == {"👍": ["bob", "cy"]} and payload["mentions"] == ["bob"]
    assert payload["first_line"] == "@bob look"
    gone = message_payload(Message("d", "ada", "", 1.0, deleted=True), own=False)
    assert gone["deleted"] and gone["html"] == "" and gone["first_line"] == ""
    assert payload["source"] == ""  # only the author gets the text back to edit


def test_a_reply_quotes_its_parents_author_and_first_line_when_the_parent_is_known() -> None:
    parent = Message("abc", "<b>bob</b>", "first <i>line</i>\nsecond", 1.0)
    reply = Message("r", "ada", "yes", 2.0, reply_to="abc")
    quoted = message_payload(reply, own=False, parent=parent)["reply"]
    # Text, not HTML: the view puts author and first line in with textContent.
    assert quoted == {
        "id": "abc",
        "author": "<b>bob</b>",
        "first_line": "first <i>line</i>",
        "deleted": False,
        "known": True,
    }
    unknown = message_payload(reply, own=False, parent=None)["reply"]
    assert unknown == {"id": "abc", "author": "", "first_line": "", "deleted": False, "known": False}
    other = message_payload(reply, own=False, parent=Message("zzz", "cy", "not the parent", 1.0))["reply"]
    assert other is not None and other["known"] is False
    gone = Message("abc", "bob", "", 1.0, deleted=True)
    quoted_gone = message_payload(reply, own=False, parent=gone)["reply"]
    assert quoted_gone is not None and quoted_gone["deleted"] and quoted_gone["first_line"] == ""


def test_a_check_mark_in_a_name_is_not_verified() -> None:
    """The view draws the verified mark from this boolean only (CSS on .zchat-verified), never from text."""
    forged = message_payload(Message("f", "teacher ✓", "hi", 1.0), own=False)
    assert forged["verified"] is False and forged["author"] == "teacher ✓"
    signed = message_payload(Message("s", "teacher", "hi", 1.0, verified=True), own=False)
    assert signed["verified"] is True and signed["author"] == "teacher"


def test_message_payload_survives_an_absurd_time() -> None:
    assert message_payload(Message("abc", "bob", "hi", 1e300), own=False)["time"] == ""


# -- code highlighting, links, code blocks -----------------------------------------------------

_CLASS = re.compile(r'class="([^"]*)"')


def test_a_python_block_is_highlighted_with_allowed_classes_only() -> None:
    html = render_markdown("```python\ndef f(x):\n    return '<img src=x onerror=alert(1)>'  # c\n```")
    assert '<span class="zchat-hl-k">def</span>' in html
    assert '<span class="zchat-hl-nf">f</span>' in html
    assert "zchat-hl-c1" in html  # the comment
    classes = _CLASS.findall(html)
    assert classes and set(classes) <= HIGHLIGHT_CLASSES
    assert "style" not in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert visible_text(html).startswith("def f(x):\n    return '<img src=x onerror=alert(1)>'")


@pytest.mark.parametrize(
    "text",
    [
        "```nosuchlanguage\nx = 1\n```",
        "```\nx = 1\n```",
        "```python\n" + "x = 1\n" * (MAX_HIGHLIGHT_CHARS // 6 + 1) + "```",
    ],
    ids=["unknown language", "no language", "too long"],
)
def test_other_blocks_show_plain(text: str) -> None:
    html = render_markdown(text)
    assert "<span" not in html and "x = 1" in html


def test_span_markup_typed_by_a_user_stays_text() -> None:
    payload = '<span class="zchat-hl-k" style="position:fixed">x</span>'
    html = render_markdown(payload)
    assert "<span" not in html and visible_text(html).strip() == payload


@pytest.mark.parametrize(
    ("text", "href"),
    [
        ("see https://zodb.org/docs?a=1 now", "https://zodb.org/docs?a=1"),
        ("see www.python.org now", "http://www.python.org"),
        ("mail ada@example.org", "mailto:ada@example.org"),
    ],
)
def test_bare_urls_become_links(text: str, href: str) -> None:
    html = render_markdown(text)
    assert f'href="{href}"' in html
    assert 'rel="noopener noreferrer nofollow"' in html


@pytest.mark.parametrize("text", ["javascript:alert(1)", "ftp://example.org/x", "data:text/html,<b>x</b>"])
def test_bare_urls_of_other_schemes_are_not_links(text: str) -> None:
    html = render_markdown(text)
    assert "href" not in html
    assert text in visible_text(html)


def test_code_blocks_are_found_in_order() -> None:
    text = "look:\n```python\nx = 1\n```\nand\n\n    indented()\n\n```\ny = 2\n```\n`inline` is not one"
    assert code_blocks(text) == ["x = 1\n", "indented()\n", "y = 2\n"]
    assert code_blocks("no code here") == []


def test_a_terminal_line_names_the_attachments() -> None:
    from zchat_nb.model import Attachment
    from zchat_nb.render import attachment_payload

    attachment = Attachment("plot.png", "image/png", 1234, "w/abc/0")
    message = Message("abc", "bob", "my plot", 1.0e9, attachments=(attachment,))
    assert format_line(message).endswith("bob: my plot [plot.png: image/png, 1234 bytes]")
    assert attachment_payload(message) == [
        {"index": 0, "name": "plot.png", "mime": "image/png", "size": 1234, "image": True}
    ]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[2Jclear", "\ufffd[2Jclear"),
        ("over\rwrite", "over\ufffdwrite"),
        ("\x1b]52;c;ZXZpbA==\x07", "\ufffd]52;c;ZXZpbA==\ufffd"),
        ("\x9b31m C1 CSI", "\ufffd31m C1 CSI"),
        ("bidi \u202eevil\u202c", "bidi \ufffdevil\ufffd"),
        ("tab\tand\nnewline stay", "tab\tand\nnewline stay"),
        ("bell\x07 del\x7f", "bell\ufffd del\ufffd"),
    ],
)
def test_terminal_safe_replaces_what_a_terminal_would_obey(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown


def test_names_stay_on_one_line_and_message_lines_are_indented() -> None:
    message = Message("id1", "eve\nteacher", "one\ntwo", time.time())
    line = format_line(message)
    assert "eve\ufffdteacher: one\n" in line
    assert line.endswith("\n        two")


@pytest.mark.parametrize(
    "text, plain",
    [
        ("hello world", True),
        ("message 5 sent=1733212121.123456", True),
        ('she said "hi", it\'s fine: 3/4 done (mostly)!', False),  # "!" may start an image
        ("she said hi; it is fine (mostly)", True),
        ("see example.com", False),  # a link
        ("1. first", False),  # a list
        ("    indented", False),  # code
        ("two  spaces at the end  ", False),  # a line break
        ("a\u00a0b", False),  # the sanitiser writes &nbsp;
        ("x < y & z", False),
    ],
)
def test_plain_lines_are_told_apart(text: str, plain: bool) -> None:
    assert render.is_plain(text) is plain
    assert render.render_markdown(text) == render.render_sanitised(text)


def test_the_plain_line_short_cut_renders_what_the_full_rendering_does() -> None:
    rng = random.Random(7)
    pieces = [*"aZé9 .,:;'\"?!=-+()/@%$^{}#*_`[]<>&~|\\\t\n\u00a0\u200b\u2028😀ß"]
    pieces += ["http://", "www.", ".com", "a@b.co", "  ", "1. ", "- ", "ab", "cd ef"]
    plain = 0
    for _ in range(50_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        if render.is_plain(text):
            plain += 1
            assert render.render_markdown(text) == render.render_sanitised(text), text
    assert plain > 500  # the generator does make plain lines (888 with this seed)
