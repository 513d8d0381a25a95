"""Turning chat messages into what a browser may show (sanitised HTML, a colour and initials per user)
or a terminal prints (:func:`format_line`).

Message text comes from other people's kernels, and a view that assigns ``innerHTML`` runs whatever
event handlers the HTML carries, so every message goes through two gates:

1. ``MarkdownIt("js-default")`` escapes raw HTML instead of passing it through (the image rule is
   off, so ``![alt](url)`` shows as ``!`` and a link);
2. ``nh3.clean`` keeps only the tags listed in :data:`ALLOWED_TAGS` (no ``img``, ``svg``, ``iframe``,
   ``style`` or ``script``), only ``http``/``https``/``mailto`` link targets, and opens links in a new
   tab with ``rel="noopener noreferrer nofollow"``.

Escaped markup stays readable: ``<img src=x onerror=...>`` shows as that text.

Markdown parsing is superlinear on some inputs (64 KiB of ``[`` took seconds): a text longer than
:data:`MAX_MARKDOWN_CHARS`, or with more markup characters than the budget, is shown as plain
escaped text instead. :func:`terminal_safe` makes names and texts safe to print on a terminal.
"""

from __future__ import annotations

import hashlib
import html
import re
import time
import unicodedata
from datetime import datetime, timezone
from typing import Any

import nh3
from markdown_it import MarkdownIt

from .model import Message

__all__ = [
    "ALLOWED_TAGS",
    "format_line",
    "initials",
    "message_payload",
    "render_markdown",
    "render_plain",
    "terminal_safe",
    "user_color",
    "user_hue",
]

#: Tags that survive sanitising; everything else is dropped (its text kept).
ALLOWED_TAGS = frozenset(
    {
        "a",
        "blockquote",
        "br",
        "code",
        "del",
        "em",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "li",
        "ol",
        "p",
        "pre",
        "s",
        "strong",
        "table",
        "tbody",
        "td",
        "th",
        "thead",
        "tr",
        "ul",
    }
)
_ATTRIBUTES = {"a": {"href"}, "ol": {"start"}, "th": {"style"}, "td": {"style"}}
_URL_SCHEMES = {"http", "https", "mailto"}
_LINK_REL = "noopener noreferrer nofollow"

# breaks: a single newline (Shift+Enter in the widget) is a line break, as chat users expect.
_markdown = MarkdownIt("js-default", {"breaks": True}).disable("image")


#: Longest text rendered as Markdown; longer texts are shown as plain text.
MAX_MARKDOWN_CHARS = 16 * 1024
#: Most ``[`` (links nest and backtrack) and most markup characters in all, for Markdown.
MAX_BRACKETS = 256
MAX_MARKUP = 2048
_MARKUP = re.compile(r"[\[\]()*_`<>~|]")


def _over_budget(text: str) -> bool:
    if len(text) > MAX_MARKDOWN_CHARS or text.count("[") > MAX_BRACKETS:
        return True
    return len(_MARKUP.findall(text, 0, MAX_MARKDOWN_CHARS)) > MAX_MARKUP


def render_plain(text: str) -> str:
    """``text`` as escaped HTML, line breaks kept: costs time linear in its length."""
    return "<p>" + html.escape(text).replace("\n", "<br>\n") + "</p>"


def render_markdown(text: str) -> str:
    """Render chat ``text`` as Markdown and return HTML that is safe to assign to ``innerHTML``.

    Past the cost budget (see the module's docstring) the text is shown plain.
    """
    if _over_budget(text):
        return render_plain(text)
    rendered = _markdown.render(text)
    return nh3.clean(
        rendered,
        tags=set(ALLOWED_TAGS),
        attributes=_ATTRIBUTES,
        url_schemes=_URL_SCHEMES,
        url_relative="deny",  # a relative link would point into the Jupyter server
        link_rel=_LINK_REL,
        set_tag_attribute_values={"a": {"target": "_blank"}},
        filter_style_properties={"text-align"},  # table column alignment only
    ).strip()


def user_hue(name: str) -> int:
    """A hue in degrees (0-359) that is the same for ``name`` in every process."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "big") % 360


def user_color(name: str) -> str:
    """A CSS colour for ``name``, readable on light backgrounds (the view adapts it to dark themes)."""
    return f"hsl({user_hue(name)}, 60%, 40%)"


_WORD_SPLIT = re.compile(r"[\s._\-@]+")


def initials(name: str) -> str:
    """One or two capital letters for ``name``: "Ada Lovelace" -> "AL", "ada" -> "AD"."""
    words = [w for w in _WORD_SPLIT.split(name) if w]
    if not words:
        return "?"
    letters = [w[0] for w in words[:2]] if len(words) > 1 else list(words[0][:2])
    # Drop combining marks and the like so that a letter, not an accent, is shown.
    letters = [c for c in letters if unicodedata.category(c)[0] in "LN"] or ["?"]
    return "".join(letters).upper()


def message_payload(message: Message, *, own: bool) -> dict[str, Any]:
    """What the browser gets for one message: everything it shows, already made safe."""
    try:
        when = datetime.fromtimestamp(message.time, tz=timezone.utc).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):  # another client's clock (or record) is far off
        when = ""
    return {
        "id": message.id,
        "author": message.author,
        "initials": initials(message.author),
        "color": user_color(message.author),
        "hue": user_hue(message.author),
        "time": when,
        "ts": message.time,
        "html": render_markdown(message.text),
        "own": own,
    }


#: C0 and C1 controls, DEL, and the Unicode format characters that reorder or hide text.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"^{chr(code + 64)}" if code < 32 else f"\\u{code:04x}" if code > 0x7F else "^?"


def terminal_safe(text: str, *, newlines: bool = True) -> str:
    """``text`` with control characters shown (``ESC`` as ``^[``) instead of acted on by a terminal.

    Another person's name or message must not clear the screen, forge lines (carriage return),
    set the window title or write the clipboard (OSC 52). ``newlines=False`` also shows newlines
    and tabs (for names).
    """
    text = _CONTROLS.sub(_shown, text)
    if not newlines:
        text = text.replace("\n", "^J").replace("\t", "^I")
    return text


def format_line(message: Message) -> str:
    """One message as a terminal line: ``[HH:MM] author: text`` in local time, controls made visible."""
    stamp = time.strftime("%H:%M", time.localtime(message.time))
    return f"[{stamp}] {terminal_safe(message.author, newlines=False)}: {terminal_safe(message.text)}"
