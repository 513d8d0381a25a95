"""Turning chat messages into what a browser may show (sanitised HTML, a colour and initials per user)
or a terminal prints (:func:`format_line`, made safe by :func:`terminal_safe`).

Message text comes from other people's kernels, and a view that assigns ``innerHTML`` runs whatever
event handlers the HTML carries, so every message goes through two gates:

1. ``MarkdownIt("js-default")`` escapes raw HTML instead of passing it through (the image rule is
   off, so ``![alt](url)`` shows as ``!`` and a link);
2. ``nh3.clean`` keeps only the tags listed in :data:`ALLOWED_TAGS` (no ``img``, ``svg``, ``iframe``,
   ``style`` or ``script``), only ``http``/``https``/``mailto`` link targets, and opens links in a new
   tab with ``rel="noopener noreferrer nofollow"``.

Escaped markup stays readable: ``<img src=x onerror=...>`` shows as that text.

Fenced code blocks with a known language are highlighted by Pygments into ``<span
class="zchat-hl-...">`` elements; nh3 keeps a ``class`` only where it is one of Pygments' token
classes (:data:`HIGHLIGHT_CLASSES`), never an inline style. Bare URLs become links (linkify), then
pass the same scheme rules as Markdown links.

A terminal obeys control characters instead of showing them, so every line printed for a terminal
(``zchat-nb chat``, ``%zchat history``) goes through :func:`format_line`, which passes what other
people wrote through :func:`terminal_safe`.

Markdown parsing is superlinear on some inputs (64 KiB of ``[`` took seconds): a text longer than
:data:`MAX_MARKDOWN_CHARS`, or with more markup characters than the budget, is shown as plain
escaped text instead.
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
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.token import STANDARD_TYPES
from pygments.util import ClassNotFound

from .media import IMAGE_TYPES
from .model import Message

__all__ = [
    "ALLOWED_TAGS",
    "HIGHLIGHT_CLASSES",
    "attachment_payload",
    "code_blocks",
    "first_line",
    "format_line",
    "initials",
    "message_payload",
    "render_markdown",
    "render_plain",
    "reply_quote",
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
        "span",
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

# -- code highlighting ---------------------------------------------------------------------

#: Pygments' token classes as this module emits them (prefixed, so no page style applies to them).
HIGHLIGHT_CLASSES = frozenset(f"zchat-hl-{name}" for name in STANDARD_TYPES.values() if name)
#: Longest code block that is highlighted; longer ones show plain (bounded work per message).
MAX_HIGHLIGHT_CHARS = 20_000
# Languages whose lexers are highlighted. An explicit list: each lexer is a set of regular
# expressions run on other people's text, and the common ones are the ones that are well exercised.
_LANGUAGES = frozenset(
    {
        "python", "py", "python3", "py3", "ipython", "ipython3", "pycon", "pytb",
        "bash", "sh", "shell", "zsh", "console", "shell-session",
        "json", "yaml", "yml", "toml", "ini", "cfg", "sql", "xml", "html", "css",
        "javascript", "js", "typescript", "ts", "c", "cpp", "c++", "java", "rust", "go",
        "r", "julia", "markdown", "md", "diff", "latex", "tex", "text",
    }
)  # fmt: skip
_formatter = HtmlFormatter(nowrap=True, classprefix="zchat-hl-")


def _highlight(code: str, lang: str, _attrs: str) -> str:
    """markdown-it's ``highlight`` hook: Pygments spans, or "" to let markdown-it escape the code."""
    lang = lang.strip().lower()
    if lang not in _LANGUAGES or len(code) > MAX_HIGHLIGHT_CHARS:
        return ""
    try:
        lexer = get_lexer_by_name(lang, stripnl=False, ensurenl=False)
    except ClassNotFound:  # an alias missing from this Pygments version
        return ""
    return highlight(code, lexer, _formatter)


# breaks: a single newline (Shift+Enter in the widget) is a line break, as chat users expect.
# linkify: bare URLs become links (linkify-it-py); nh3 then applies the scheme rules to them too.
_markdown = (
    MarkdownIt("js-default", {"breaks": True, "linkify": True, "highlight": _highlight})
    .enable("linkify")
    .disable("image")
)


_linkify: Any = _markdown.linkify  # linkify-it, made by the "linkify" option


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced (and indented) code blocks of Markdown ``text``, in order."""
    return [token.content for token in _markdown.parse(text) if token.type in ("fence", "code_block")]


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


#: One line of words with nothing Markdown, HTML or the sanitiser would change: no markup or
#: escape characters anywhere, a letter first (no list, heading or indented code), no edge spaces.
_PLAIN = re.compile(r"[^\W\d_][^\\`*_\[\]<>&!~|#\t\n\r\x00-\x1f\x7f\xa0]*(?<! )")


def is_plain(text: str) -> bool:
    """Whether ``text`` renders as itself in one paragraph: most chat lines. ``tests/test_render.py``
    holds this to the full rendering, over generated texts."""
    return _PLAIN.fullmatch(text) is not None and text.isprintable() and not _linkify.pretest(text)


def render_markdown(text: str) -> str:
    """Render chat ``text`` as Markdown and return HTML that is safe to assign to ``innerHTML``.

    Past the cost budget (see the module's docstring) the text is shown plain. A line with no
    Markdown at all (:func:`is_plain`) skips the parser and the sanitiser: it would come out as it is.
    """
    if len(text) <= MAX_MARKDOWN_CHARS and is_plain(text):
        return f"<p>{text}</p>"
    return render_sanitised(text)


def render_sanitised(text: str) -> str:
    """:func:`render_markdown` without its short cut for plain lines."""
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
        allowed_classes={"span": set(HIGHLIGHT_CLASSES)},
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


def message_payload(message: Message, *, own: bool, parent: Message | None = None) -> dict[str, Any]:
    """What the browser gets for one message: everything it shows, already made safe.

    ``parent``: the message this one answers, when the caller has it; its author and first line
    are quoted above the reply (the view puts them in as text, never as HTML).
    """
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
        # Conversations (zchat_nb.amend): the view draws the marks from these fields, never from text.
        "reply_to": message.reply_to,
        "edited": message.edited is not None,
        "deleted": message.deleted,
        "reactions": {emoji: list(users) for emoji, users in message.reactions.items()},
        "verified": message.verified,
        "mentions": list(message.mentions),
        "first_line": first_line(message),
        "reply": reply_quote(message.reply_to, parent),
        # The text to put back in the box when the author edits it (the view's Edit and Up arrow).
        "source": message.text if own and not message.deleted else "",
    }


def first_line(message: Message) -> str:
    """The first line of ``message``'s text, at most 120 characters ("" when deleted)."""
    return message.text.strip().split("\n", 1)[0][:120]


def reply_quote(reply_to: str | None, parent: Message | None) -> dict[str, Any] | None:
    """What a reply quotes of the message it answers: its id, author and first line, if known."""
    if reply_to is None:
        return None
    if parent is None or parent.id != reply_to:
        return {"id": reply_to, "author": "", "first_line": "", "deleted": False, "known": False}
    return {
        "id": parent.id,
        "author": parent.author,
        "first_line": first_line(parent),
        "deleted": parent.deleted,
        "known": True,
    }


def attachment_payload(message: Message) -> list[dict[str, Any]]:
    """What a view is told about a message's attachments: names and sizes, never bytes or URLs.

    The view asks the kernel for an image's bytes (checked there) when it shows the message.
    """
    return [
        {"index": i, "name": a.name, "mime": a.mime, "size": a.size, "image": a.mime in IMAGE_TYPES}
        for i, a in enumerate(message.attachments)
    ]


# C0 controls but tab and newline, DEL, C1 controls (ESC, CSI, OSC...), and the bidi overrides and
# isolates that reorder what is shown ("Trojan source"). Other people choose these characters:
# ESC [2J clears the screen, "\r" overwrites a line to forge another author, OSC 52 writes the
# clipboard. Each becomes U+FFFD, so that an attempt stays visible.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_IN_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
REPLACEMENT = "\ufffd"


def terminal_safe(text: str, *, multiline: bool = True) -> str:
    """``text`` with every character that a terminal would obey instead of show replaced by U+FFFD.

    Tabs are kept; newlines too unless ``multiline`` is false (names must stay on one line).
    """
    pattern = _UNSAFE if multiline else _UNSAFE_IN_LINE
    return pattern.sub(REPLACEMENT, text)


def format_line(message: Message) -> str:
    """One message as terminal text, ``[HH:MM] author: text`` in local time, safe to print.

    The author stays on one line; later lines of the text are indented under the first. A
    verified author gets a ``✓`` after the name; check marks in names are shown as ``?``, so an
    unverified name cannot carry one. Replies, edits, deletes, reactions and attachments are marked.
    """
    stamp = time.strftime("%H:%M", time.localtime(message.time))
    author = _CHECK_MARKS.sub("?", terminal_safe(message.author, multiline=False))
    mark = " ✓" if message.verified else ""
    if message.deleted:
        return f"[{stamp}] {author}{mark}: (message deleted)"
    text = terminal_safe(message.text).replace("\n", "\n        ")
    reply = " ↪" if message.reply_to else ""
    edited = " (edited)" if message.edited is not None else ""
    reactions = "".join(f"  {emoji}{len(users)}" for emoji, users in message.reactions.items())
    shared = "".join(
        f" [{terminal_safe(a.name, multiline=False)}: {a.mime}, {a.size} bytes]" for a in message.attachments
    )
    return f"[{stamp}] {author}{mark}{reply}: {text}{shared}{edited}{reactions}"


_CHECK_MARKS = re.compile("[\u2713\u2714\u2611\u2705\U0001f5f8\U0001f5f9]")
