"""Where a chat's data lives: a ZEO server (``host:port``) or PostgreSQL through RelStorage (a URI).

Every place that takes a server address (``connect()``, ``$ZCHAT_ADDRESS``, ``%zchat join``,
``zchat-nb chat``, the teacher commands) also takes a PostgreSQL URI::

    127.0.0.1:8100                                          a ZEO server
    postgresql://USER:PASSWORD@HOST:PORT/DBNAME             PostgreSQL over TCP (also postgres://)
    postgresql://USER:PASSWORD@/DBNAME?host=/run/postgresql a Unix socket directory
    ...?keep_history=true                                   keep old revisions (default: history-free)

Parsing: zodburi's convention (a scheme picks the storage, query parameters its options), but
not zodburi itself. RelStorage's zodburi resolver knows only ``postgres://``, keeps history
unless told otherwise, splices the password into a DSN without quoting, and cannot name a socket
directory. Here the storage options (``keep_history``) are ours, and everything else is handed to
libpq's own URI parser (``psycopg2.extensions.parse_dsn``), so a URI means exactly what it means
to ``psql``; the DSN given to RelStorage is rebuilt with libpq quoting.

Passwords are secrets: :func:`redact` removes them from any text (errors, logs, status lines) and
:attr:`PostgresTarget.display` never contains one.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .exceptions import ZChatConnectionError, ZChatDisconnected
from .security import RecordCheck, check_conflict_state

__all__ = [
    "ACCEPTED_FORMS",
    "PostgresTarget",
    "is_storage_uri",
    "open_relstorage",
    "parse_storage_uri",
    "postgres_status",
    "redact",
]

log = logging.getLogger(__name__)

SCHEMES = ("postgresql", "postgres")
ACCEPTED_FORMS = (
    '"host:port" for a ZEO server, "postgresql://user:password@host:port/dbname" for PostgreSQL '
    '(also postgres://; "postgresql://user:password@/dbname?host=/socket/dir" for a Unix socket; '
    'add "?keep_history=true" to keep history)'
)
#: Query parameters that are ours, not libpq's.
_OUR_PARAMETERS = ("keep_history",)
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
#: The LISTEN/NOTIFY channel; notifications are scoped to one database already.
CHANNEL = "zchat_nb_commit"

_URI_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^@\s]*(?=@)", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with passwords removed: in URIs, ``password=`` settings, and each of ``secrets``."""
    text = _URI_PASSWORD.sub(r"\g<head>***", text)
    text = _KEYWORD_PASSWORD.sub(r"\g<head>***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def is_storage_uri(value: object) -> bool:
    """Whether ``value`` is a URI (``scheme://...``) rather than a ZEO ``host:port``.

    Any scheme counts, so that a misspelt one is rejected by :func:`parse_storage_uri` with the
    accepted forms, and its password redacted, instead of reading as a bad ``host:port``.
    """
    return isinstance(value, str) and "://" in value


@dataclass(frozen=True)
class PostgresTarget:
    """A parsed PostgreSQL URI: the libpq settings, and our storage options."""

    settings: dict[str, str] = field(repr=False)
    keep_history: bool = False

    @property
    def password(self) -> str:
        return self.settings.get("password", "")

    @property
    def dsn(self) -> str:
        """The libpq keyword DSN (contains the password: never show it)."""
        from psycopg2.extensions import make_dsn

        return str(make_dsn(**self.settings))

    @property
    def display(self) -> str:
        """The URI without its password, for status lines, errors and logs."""
        s = self.settings
        user = s.get("user", "")
        auth = f"{user}{':***' if self.password else ''}@" if user or self.password else ""
        host = s.get("host", "")
        netloc = host if host and not host.startswith("/") else ""
        if netloc and s.get("port"):
            netloc = f"{netloc}:{s['port']}"
        query = {
            k: v
            for k, v in s.items()
            if k not in ("user", "password", "dbname")
            and not (k == "host" and netloc)
            and not (k == "port" and netloc)
        }
        if self.keep_history:
            query["keep_history"] = "true"
        tail = f"?{urlencode(query, safe='/')}" if query else ""
        return f"postgresql://{auth}{netloc}/{s.get('dbname', '')}{tail}"

    @property
    def description(self) -> str:
        mode = "keeps history" if self.keep_history else "history-free"
        return f"PostgreSQL via RelStorage ({mode}) at {self.display}"

    def __str__(self) -> str:
        return self.display


def parse_storage_uri(uri: str) -> PostgresTarget:
    """Parse a ``postgresql://`` (or ``postgres://``) URI; a bad one raises naming the accepted forms."""
    shown = redact(uri)
    scheme, sep, _ = uri.strip().partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ZChatConnectionError(f"bad storage address {shown!r}: give {ACCEPTED_FORMS}")
    parts = urlsplit(uri.strip())
    try:
        parts.port  # noqa: B018 -- urllib checks the port only when asked
    except ValueError:
        raise ZChatConnectionError(f"bad port in {shown!r}: give {ACCEPTED_FORMS}") from None
    if parts.fragment:
        raise ZChatConnectionError(f"bad storage address {shown!r} (a '#' in it?): give {ACCEPTED_FORMS}")
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname or "/" in dbname:
        raise ZChatConnectionError(
            f"{shown!r} names no database: end the URI with /DBNAME (give {ACCEPTED_FORMS})"
        )
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _OUR_PARAMETERS:
            ours[key] = value
        else:
            theirs.append((key, value))
    keep = ours.get("keep_history", "false").lower()
    if keep not in _TRUE + _FALSE:
        raise ZChatConnectionError(f"keep_history={keep!r} in {shown!r}: give keep_history=true or false")
    try:
        from psycopg2.extensions import parse_dsn
    except ImportError as exc:
        raise ZChatConnectionError(
            "PostgreSQL storage needs RelStorage and psycopg2: pip install 'zchat_nb[postgres]'"
        ) from exc
    libpq_uri = parts._replace(scheme="postgresql", query=urlencode(theirs)).geturl()
    try:
        settings = {k: str(v) for k, v in parse_dsn(libpq_uri).items()}
    except Exception as exc:  # psycopg2.ProgrammingError: libpq names what it did not accept
        raise ZChatConnectionError(
            f"bad PostgreSQL URI {shown!r}: {redact(str(exc).strip())}; give {ACCEPTED_FORMS}"
        ) from None
    return PostgresTarget(settings, keep_history=keep in _TRUE)


# -- RelStorage ------------------------------------------------------------------------------------

#: The entry points through which ZODB reaches a RelStorage instance (some are instance attributes
#: that RelStorage copies from its loader and storer, so they are wrapped per instance).
_WRAPPED = (
    "load", "loadBefore", "loadSerial", "prefetch", "store", "checkCurrentSerialInTransaction",
    "poll_invalidations", "sync", "new_oid", "tpc_begin", "tpc_vote", "tpc_finish", "lastTransaction",
)  # fmt: skip


#: Calls ZODB makes at transaction boundaries, where a lost connection means "forget the cache".
_POLLS = ("poll_invalidations", "sync")

#: The calls through which ZODB gets records from a RelStorage instance (Connection: load;
#: historical connections: loadBefore; ``Connection.oldstate`` and conflict resolution: loadSerial).
#: ``prefetch`` only fills RelStorage's cache, which these read.
_LOADS = ("load", "loadBefore", "loadSerial")


def _relstorage_class() -> type:
    from relstorage.storage import RelStorage

    class ZChatRelStorage(RelStorage):
        """RelStorage whose driver disconnects surface as :class:`ZChatDisconnected` (a TransientError).

        The one boundary for PostgreSQL's connection errors: the model retries TransientErrors
        (a send whose commit answer was lost is retried without duplicating: see ``Room.append``).

        Records are what any holder of the database password wrote: with :attr:`_zchat_records`
        set (a client sets it), each one ZODB loads is checked before it is unpickled, and so is
        each state conflict resolution unpickles (RelStorage resolves conflicts in the client).
        """

        _zchat_target: PostgresTarget | None = None
        #: Checks each record a load returns (None: no check); new instances share it.
        _zchat_records: RecordCheck | None = None
        _zchat_on_lost: Callable[[BaseException], None] | None = None
        _zchat_after_commit: Callable[[], None] | None = None
        #: Set when a call lost the database: the next successful poll drops the object cache.
        _zchat_forget = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            lost = self._adapter.driver.disconnected_exceptions
            for name in _WRAPPED:
                setattr(self, name, self._zchat_guard(getattr(self, name), lost))
            for name in _LOADS:
                setattr(self, name, self._zchat_checked(getattr(self, name)))

        def _zchat_checked(self, load: Callable[..., Any]) -> Callable[..., Any]:
            serial_given = load.__name__ == "loadSerial"  # returns the state alone

            @functools.wraps(load)
            def checked(oid: bytes, *args: Any) -> Any:
                result = load(oid, *args)
                check = self._zchat_records
                if check is not None and result is not None:
                    data, serial = (result, args[0]) if serial_given else (result[0], result[1])
                    if data is not None:  # nothing to unpickle: ZODB says so itself
                        check(oid, serial, data)
                return result

            return checked

        def _crs_untransform_record_data(self, data: bytes) -> bytes:
            # Every state conflict resolution unpickles passes here first. (ZODB.DB calls no
            # registerDB on an MVCC storage, which would replace this; a ZEO server does, and
            # checks the states itself: see zchat_nb.guard.)
            check_conflict_state(data)
            return data

        def _zchat_guard(
            self, method: Callable[..., Any], lost: tuple[type[BaseException], ...]
        ) -> Callable[..., Any]:
            @functools.wraps(method)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                try:
                    result = method(*args, **kwargs)
                    if self._zchat_forget and method.__name__ == "poll_invalidations":
                        # Lost mid-commit, a commit may have happened that this cache never saw
                        # (tpc_finish's answer was lost): forget every object, as ZEO's client
                        # does on reconnect, so the retry reads what is really stored.
                        self._zchat_forget = False
                        return None
                except lost as exc:
                    self._zchat_forget = True
                    where = self._zchat_target.display if self._zchat_target else "PostgreSQL"
                    secrets = (self._zchat_target.password,) if self._zchat_target else ()
                    if self._zchat_on_lost is not None:
                        self._zchat_on_lost(exc)
                    if method.__name__ in _POLLS:
                        # ZODB polls after every abort and commit too (afterCompletion): failing
                        # there would make tm.abort() itself raise. Drop the whole object cache
                        # instead (None means just that); the next load reconnects to a fresh
                        # snapshot or raises, so nothing stale is read.
                        return None
                    raise ZChatDisconnected(
                        f"lost the connection to {where}: {redact(str(exc).strip(), secrets)}; "
                        "the client reconnects by itself when the database is back"
                    ) from exc
                if method.__name__ == "tpc_finish" and self._zchat_after_commit is not None:
                    # Wake this client's own readers at once rather than when NOTIFY comes round.
                    self._zchat_after_commit()
                return result

            return guarded

        def new_instance(self, before: Any = None) -> Any:
            other = super().new_instance(before)
            other._zchat_target = self._zchat_target
            other._zchat_on_lost = self._zchat_on_lost
            other._zchat_after_commit = self._zchat_after_commit
            other._zchat_records = self._zchat_records
            return other

    return ZChatRelStorage


def open_relstorage(target: PostgresTarget, *, connect_timeout: float = 5.0) -> Any:
    """Open (creating its tables on first use) the RelStorage at ``target``; errors name no password."""
    try:
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
    except ImportError as exc:
        raise ZChatConnectionError(
            "PostgreSQL storage needs RelStorage and psycopg2: pip install 'zchat_nb[postgres]'"
        ) from exc
    settings = dict(target.settings)
    settings.setdefault("connect_timeout", str(max(1, round(connect_timeout))))
    dsn_target = PostgresTarget(settings, target.keep_history)
    options = Options(keep_history=target.keep_history, driver="psycopg2")
    try:
        adapter = PostgreSQLAdapter(dsn=dsn_target.dsn, options=options)
        storage = _relstorage_class()(adapter=adapter, options=options)
    except ZChatConnectionError:
        raise
    except Exception as exc:  # driver errors (refused, bad password, no such database)
        raise ZChatConnectionError(
            f"cannot open {target.description}: {redact(str(exc).strip(), (target.password,))}"
        ) from None
    storage._zchat_target = target
    return storage


NOTIFY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION zchat_nb_notify_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Delivered only when the writing transaction commits, after it is visible; identical
    -- notifications of one transaction fold into one, so a commit sends one per database.
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END $$
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER zchat_nb_notify_commit AFTER INSERT OR UPDATE OR DELETE ON object_state
FOR EACH STATEMENT EXECUTE FUNCTION zchat_nb_notify_commit()
"""


def install_notify_trigger(target: PostgresTarget) -> str | None:
    """Make every commit to the database send a NOTIFY; returns why not (None when installed).

    A trigger on RelStorage's ``object_state`` table, so every writer notifies, zchat_nb or not
    (a ZEO server storing here, an admin script). Needs the right to create triggers on the table
    (its owner, normally the user that created RelStorage's tables); without it clients still work
    and learn of commits by their periodic poll.
    """
    import psycopg2

    try:
        conn = psycopg2.connect(target.dsn, connect_timeout=5)
    except psycopg2.Error as exc:
        return redact(str(exc).strip(), (target.password,))
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('zchat_nb_notify_commit'))")
            cur.execute(
                "SELECT 1 FROM pg_trigger WHERE tgname = 'zchat_nb_notify_commit' "
                "AND tgrelid = 'object_state'::regclass"
            )
            if cur.fetchone() is None:
                cur.execute(NOTIFY_FUNCTION)
                cur.execute(NOTIFY_TRIGGER)
        return None
    except psycopg2.Error as exc:
        return redact(str(exc).strip(), (target.password,))
    finally:
        conn.close()


def postgres_status(target: PostgresTarget, timeout: float = 5.0) -> dict[str, Any]:
    """What ``zchat-nb status`` says about a PostgreSQL target: whether it answers, and its chat."""
    import psycopg2

    status: dict[str, Any] = {"address": target.display, "storage": target.description, "running": False}
    try:
        conn = psycopg2.connect(target.dsn, connect_timeout=max(1, round(timeout)))
    except psycopg2.Error as exc:
        status["error"] = redact(str(exc).strip(), (target.password,))
        return status
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('object_state') IS NOT NULL")
            row = cur.fetchone()
            status["running"] = True
            status["tables"] = "RelStorage's" if row and row[0] else "none yet (made by the first client)"
            cur.execute("SELECT 1 FROM pg_trigger WHERE tgname = 'zchat_nb_notify_commit'")
            status["commit_notifications"] = cur.fetchone() is not None
    except psycopg2.Error as exc:
        status["error"] = redact(str(exc).strip(), (target.password,))
    finally:
        conn.close()
    return status
