"""Rate-limited logging: a hostile peer must not be able to fill the disk with our log lines.

:class:`RateLimit` is a ``logging.Filter``: each message template may log ``burst`` lines per
``period`` seconds; the lines beyond are dropped and counted, and the next line let through says how
many were dropped. Every line is also cut to ``max_chars``, so a log line cannot carry a peer's
megabytes (ZEO logs the repr of a frame it could not process).
"""

from __future__ import annotations

import logging
import re
import threading
import time

__all__ = ["RateLimit", "add_filter_once", "rate_limit", "shared_limit"]

_VARYING = re.compile(r"\([^)]*\)|\d+")


class RateLimit(logging.Filter):
    """Let through at most ``burst`` records per message template in each ``period`` seconds."""

    def __init__(self, burst: int = 10, period: float = 60.0, max_chars: int = 500) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self.max_chars = max_chars
        self._lock = threading.Lock()
        #: template -> (window start, lines in this window, lines dropped since the last one let through)
        self._windows: dict[str, tuple[float, int, int]] = {}

    def reset(self) -> None:
        """Forget every window (tests start from a clean slate)."""
        with self._lock:
            self._windows.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        # ZEO puts the peer's address and counters into its messages: one template for all of them.
        key = record.name + ":" + _VARYING.sub("#", str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            start, count, dropped = self._windows.get(key, (now, 0, 0))
            if now - start >= self.period:
                start, count = now, 0
            if count >= self.burst:
                self._windows[key] = (start, count, dropped + 1)
                return False
            if len(self._windows) > 1000:  # many templates: forget the old windows
                self._windows.clear()
            self._windows[key] = (start, count + 1, 0)
        try:
            text = record.getMessage()
        except Exception:  # a bad format string is the logging call's problem, not ours
            return True
        if dropped:
            text += f" ({dropped} similar lines dropped)"
        if len(text) > self.max_chars:
            text = text[: self.max_chars] + f"... ({len(text)} characters)"
        record.msg, record.args = text, None
        if record.exc_info and record.levelno < logging.ERROR:
            record.exc_info = None
        return True


_installed: dict[str, RateLimit] = {}


def shared_limit() -> RateLimit:
    """The one :class:`RateLimit` that :func:`rate_limit` puts on loggers."""
    return _installed.setdefault("shared", RateLimit())


def rate_limit(*names: str) -> None:
    """Put the shared :class:`RateLimit` on the loggers ``names`` (idempotent)."""
    limit = shared_limit()
    for name in names:
        logger = logging.getLogger(name)
        if limit not in logger.filters:
            logger.addFilter(limit)


def add_filter_once(name: str, kind: type[logging.Filter]) -> None:
    """Put a ``kind()`` on the logger ``name`` unless it has one already (idempotent)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())
