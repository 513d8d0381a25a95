"""What can be shared in a chat besides text: pictures and tables, turned into checked bytes.

:func:`prepare` takes what a user hands to ``ChatClient.share`` / ``%zchat share`` (image bytes, a
file path, a matplotlib Figure, a PIL Image, a pandas DataFrame) and returns :class:`Prepared`
bytes with a MIME type found from the bytes themselves (:func:`sniff`, magic numbers), never from a
file name. The bytes are stored in a ZODB blob (:mod:`zchat_nb.model`); readers sniff them again.

matplotlib, PIL and pandas are never imported here: an object is recognised by its type's module,
so sharing works where they are installed and costs nothing where they are not.
"""

from __future__ import annotations

import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .exceptions import AttachmentError

__all__ = [
    "DEFAULT_MAX_ATTACHMENT_BYTES",
    "IMAGE_TYPES",
    "KNOWN_TYPES",
    "TABLE_ROWS",
    "Prepared",
    "prepare",
    "sniff",
]

#: Largest attachment accepted when sharing and when reading (``connect(max_attachment_bytes=...)``).
DEFAULT_MAX_ATTACHMENT_BYTES = 5 * 1024 * 1024
#: Rows of a DataFrame shown as a table in the message (the whole frame is the CSV attachment).
TABLE_ROWS = 10
_TABLE_COLUMNS = 12
_CELL_CHARS = 40

#: Image types that may be shared and shown inline, each recognised by its first bytes.
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
#: Every type an attachment may have.
KNOWN_TYPES = IMAGE_TYPES | {"text/csv"}


def sniff(data: bytes) -> str | None:
    """The MIME type of ``data`` from its magic numbers, or None if it is none of :data:`KNOWN_TYPES`.

    CSV has no magic number: it is text/csv when it is UTF-8 text without NUL bytes.
    """
    head = bytes(data[:16])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if data and b"\x00" not in data:
        try:
            bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            return None
        return "text/csv"
    return None


@dataclass(frozen=True)
class Prepared:
    """One attachment, ready to store: its bytes, their type, a file name, and text for the message."""

    name: str
    mime: str
    data: bytes
    #: Markdown to show with it (a DataFrame's first rows); empty for pictures.
    text: str = ""


def _too_big(what: str, size: int, limit: int) -> AttachmentError:
    return AttachmentError(
        f"{what} is {size} bytes, over the {limit}-byte attachment limit; make it smaller "
        "(a lower dpi, fewer rows) or raise the limit with connect(..., max_attachment_bytes=N)"
    )


def _checked_image(data: bytes, what: str, limit: int) -> str:
    if len(data) > limit:
        raise _too_big(what, len(data), limit)
    mime = sniff(data)
    if mime not in IMAGE_TYPES:
        raise AttachmentError(
            f"{what} is not a PNG, JPEG, GIF or WebP image (its first bytes are {bytes(data[:8])!r}); "
            "share an image file, a matplotlib Figure, a PIL Image or a pandas DataFrame"
        )
    return mime


def _read_file(path: Path, limit: int) -> bytes:
    try:
        # O_NONBLOCK: a FIFO named by mistake does not hang the kernel; the size is checked on the
        # open file, so it cannot change between the check and the read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise AttachmentError(
            f"cannot read {str(path)!r}: {exc.strerror}; give the path of an image file"
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AttachmentError(f"{str(path)!r} is not a regular file; give the path of an image file")
        if info.st_size > limit:
            raise _too_big(repr(str(path)), info.st_size, limit)
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read(limit + 1)
    finally:
        os.close(fd)


_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&])")


def _cell(value: Any) -> str:
    """A table cell as literal Markdown: every punctuation escaped, one line, bounded length."""
    text = " ".join(str(value).split())
    if len(text) > _CELL_CHARS:
        text = text[: _CELL_CHARS - 1] + "…"
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", text) or " "


def _table(frame: Any) -> str:
    """The first :data:`TABLE_ROWS` rows (and columns) of a DataFrame as a Markdown table."""
    shown = frame.iloc[:TABLE_ROWS, :_TABLE_COLUMNS]
    header = [_cell(frame.index.name or "")] + [_cell(c) for c in shown.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in zip(shown.index, shown.itertuples(index=False), strict=True):
        lines.append("| " + " | ".join([_cell(index), *(_cell(v) for v in row)]) + " |")
    rows, columns = frame.shape
    lines.append("")
    lines.append(
        f"{rows} rows × {columns} columns" + (f", first {TABLE_ROWS} shown" if rows > TABLE_ROWS else "")
    )
    return "\n".join(lines)


def _kind(obj: Any) -> str:
    module = type(obj).__module__ or ""
    return module.split(".")[0]


def prepare(obj: Any, max_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES, name: str | None = None) -> Prepared:
    """Turn ``obj`` into checked attachment bytes, or raise :class:`AttachmentError` saying why not.

    ``obj``: PNG/JPEG/GIF/WebP bytes, a path to such a file, a matplotlib Figure (saved as PNG), a
    PIL Image (saved as PNG), or a pandas DataFrame (its CSV, plus its first rows as a table).
    """
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        mime = _checked_image(data, "the data", max_bytes)
        return Prepared(name or f"image.{mime.split('/')[1]}", mime, data)
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        data = _read_file(path, max_bytes)
        mime = _checked_image(data, repr(str(path)), max_bytes)
        return Prepared(name or path.name[:200] or "image", mime, data)
    kind = _kind(obj)
    if kind == "matplotlib" and hasattr(obj, "savefig"):
        buffer = io.BytesIO()
        obj.savefig(buffer, format="png", bbox_inches="tight")
        data = buffer.getvalue()
        return Prepared(name or "figure.png", _checked_image(data, "the figure as PNG", max_bytes), data)
    if kind == "PIL" and hasattr(obj, "save"):
        buffer = io.BytesIO()
        image = obj if obj.mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16") else obj.convert("RGBA")
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        return Prepared(name or "image.png", _checked_image(data, "the image as PNG", max_bytes), data)
    if kind == "pandas" and hasattr(obj, "to_csv") and hasattr(obj, "iloc"):
        if getattr(obj, "ndim", 2) == 1:
            obj = obj.to_frame()
        data = obj.to_csv().encode("utf-8")
        if len(data) > max_bytes:
            raise _too_big("the table as CSV", len(data), max_bytes)
        return Prepared(name or "table.csv", "text/csv", data, _table(obj))
    raise AttachmentError(
        f"cannot share a {type(obj).__module__}.{type(obj).__qualname__}: share image bytes (PNG, JPEG, "
        "GIF, WebP), a path to an image file, a matplotlib Figure, a PIL Image or a pandas DataFrame"
    )
