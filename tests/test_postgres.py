"""PostgreSQL through RelStorage: URIs, redaction, and a real throwaway PostgreSQL cluster.

The cluster is started once per module by :class:`tests.pg.PostgresCluster` (``initdb`` +
``pg_ctl`` as the ``postgres`` user); each test gets a database of its own.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from BTrees.Length import Length
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import StateLoadError

import zchat_nb
from zchat_nb.exceptions import UnsafeRecordError, ZChatConnectionError, ZChatSendError
from zchat_nb.storage import parse_storage_uri, redact

from .attacks import dag_pickle, finishes, honest_pair_works, overwrite, raw_storage
from .helpers import free_port
from .pg import PASSWORD, PostgresCluster, find_pg_bin
from .test_hostile_readers import bucket_record, plant_crafted_record, reader_gets, stream_oid

# -- URIs and redaction (no database) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected", "keep"),
    [
        (
            "postgresql://alice:pw@db.example:6543/chat",
            {"user": "alice", "password": "pw", "host": "db.example", "port": "6543", "dbname": "chat"},
            False,
        ),
        ("postgres://alice@127.0.0.1/chat", {"user": "alice", "host": "127.0.0.1", "dbname": "chat"}, False),
        (
            "postgresql://alice:p%40ss%3Aw%2Frd@/chat?host=/run/postgresql&port=5433",
            {
                "user": "alice",
                "password": "p@ss:w/rd",
                "host": "/run/postgresql",
                "port": "5433",
                "dbname": "chat",
            },
            False,
        ),
        (
            "postgresql://alice@h/chat?keep_history=true&sslmode=require",
            {"user": "alice", "host": "h", "dbname": "chat", "sslmode": "require"},
            True,
        ),
    ],
)
def test_postgres_uris_parse_like_libpq(uri: str, expected: dict[str, str], keep: bool) -> None:
    target = parse_storage_uri(uri)
    assert target.settings == expected
    assert target.keep_history is keep
    assert "pw" not in target.display and "p@ss" not in target.display


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("mysql://bob:hunter2@h/chat", "postgresql://user:password@host:port/dbname"),
        ("postgresql://bob:hunter2@h:99999/chat", "bad port"),
        ("postgresql://bob:hunter2@h:5432/", "names no database"),
        ("postgresql://bob:hunter2@h/chat?keep_history=maybe", "keep_history=true or false"),
        ("postgresql://bob:hunter2@h/chat?colour=blue", "colour"),
    ],
)
def test_bad_storage_uris_name_the_accepted_forms_and_hide_the_password(uri: str, says: str) -> None:
    with pytest.raises(ZChatConnectionError) as info:
        zchat_nb.connect(uri)
    assert says in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        (
            "could not connect to postgres://u:se%40cret@h:5/db: refused",
            "could not connect to postgres://u:***@h:5/db: refused",
        ),
        ("dsn: user=u password='sec ret' host=h", "dsn: user=u password=*** host=h"),
        ("?password=secret&sslmode=require", "?password=***&sslmode=require"),
        ("no secret here: 127.0.0.1:8100", "no secret here: 127.0.0.1:8100"),
    ],
)
def test_redact_removes_passwords(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_redact_removes_named_secrets_anywhere() -> None:
    assert redact("FATAL: password hunter2 rejected", ("hunter2",)) == "FATAL: password *** rejected"


# -- a real PostgreSQL -------------------------------------------------------------------------

PG_BIN = find_pg_bin()
needs_pg = [
    pytest.mark.integration,
    pytest.mark.postgres,
    pytest.mark.skipif(
        PG_BIN is None,
        reason="PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql, "
        "or set ZCHAT_PG_BIN to their directory",
    ),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    assert PG_BIN is not None
    pg = PostgresCluster(PG_BIN)
    try:
        yield pg
    finally:
        pg.close()


_databases = iter(range(1_000_000))


@pytest.fixture
def pg_uri(cluster: PostgresCluster) -> str:
    """A new, empty database (RelStorage makes its tables on first connect)."""
    return cluster.create_database(f"chat{next(_databases)}")


def _read_all(session: zchat_nb.ChatSession, want: int, timeout: float = 30.0) -> list[zchat_nb.Message]:
    got: list[zchat_nb.Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += session.new_messages(timeout=deadline - time.monotonic())
    return got


WRITER = """
import sys, zchat_nb
client = zchat_nb.connect(sys.argv[1], user=sys.argv[2])
chat = client.session("general")
for i in range(int(sys.argv[3])):
    chat.add_message(f"{sys.argv[2]} {i}")
client.close()
"""


class TestOnPostgres:
    pytestmark = needs_pg

    def test_messages_from_other_processes_arrive_exactly_once(self, pg_uri: str) -> None:
        reader = zchat_nb.connect(pg_uri, user="reader")
        chat = reader.session("general")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        procs = [
            subprocess.Popen([sys.executable, "-c", WRITER, pg_uri, f"w{n}", "25"], env=env) for n in range(3)
        ]
        got = _read_all(chat, 75)
        for proc in procs:
            assert proc.wait(60) == 0
        got += chat.new_messages()
        texts = [m.text for m in got]
        assert sorted(texts) == sorted(f"w{n} {i}" for n in range(3) for i in range(25))
        for n in range(3):  # each writer's messages in its commit order
            assert [t for t in texts if t.startswith(f"w{n} ")] == [f"w{n} {i}" for i in range(25)]
        reader.close()

    def test_late_commit_is_delivered_once(self, pg_uri: str) -> None:
        early_clock = [time.time() - 60.0]
        late = zchat_nb.connect(pg_uri, user="late", clock=lambda: early_clock[0])
        now = zchat_nb.connect(pg_uri, user="now")
        reader = zchat_nb.connect(pg_uri, user="reader")
        chat = reader.session("general")
        now.session("general").add_message("committed first, stamped later")
        assert [m.text for m in _read_all(chat, 1)] == ["committed first, stamped later"]
        late.session("general").add_message("stamped earlier, committed later")
        assert [m.text for m in _read_all(chat, 1)] == ["stamped earlier, committed later"]
        assert chat.new_messages(timeout=0.5) == []
        for client in (late, now, reader):
            client.close()

    def test_a_reader_is_woken_by_a_notification_not_by_the_fallback_poll(self, pg_uri: str) -> None:
        reader = zchat_nb.connect(pg_uri, user="reader", fallback=60.0)
        writer = zchat_nb.connect(pg_uri, user="writer")
        chat = reader.session("general")
        assert chat.new_messages() == []
        woken: list[zchat_nb.ClientEvent] = []
        waiting = threading.Event()
        reader.subscribe(woken.append)
        result: list[list[zchat_nb.Message]] = []

        def read() -> None:
            waiting.set()
            result.append(chat.new_messages(timeout=5.0))

        thread = threading.Thread(target=read)
        thread.start()
        assert waiting.wait(5)
        # Sent before or after the reader blocks, only a wake-up can end its wait before 5 s with
        # the message: the fallback poll is 60 s away, and the writer's commit wakes only its own.
        writer.session("general").add_message("wake up")
        thread.join(10)
        assert [m.text for m in result[0]] == ["wake up"]
        notified = [e for e in woken if e.kind == "invalidation" and e.details.get("source") == "notify"]
        assert notified, f"no notification event; events: {woken}"
        status = reader.server_status()
        assert status["fallback_wakes"] == 0 and status["notifications"] >= 1
        assert status["commit_trigger"] == "installed"
        reader.close()
        writer.close()

    def test_unix_socket_uri_and_status_hide_the_password(
        self, cluster: PostgresCluster, pg_uri: str
    ) -> None:
        uri = cluster.socket_uri(pg_uri.rsplit("/", 1)[1])
        client = zchat_nb.connect(uri, user="sock")
        client.session("general").add_message("over the socket")
        shown = f"{client!r} {client.address_text} {client.storage_text} {json.dumps(client.server_status())}"
        assert PASSWORD not in shown and "s3cr3t" not in shown
        assert "history-free" in client.storage_text
        client.close()
        out = subprocess.run(
            [sys.executable, "-m", "zchat_nb", "status"],
            env={**os.environ, "ZCHAT_ADDRESS": pg_uri, "PYTHONPATH": str(Path(__file__).parents[1])},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["running"] is True and status["commit_notifications"] is True
        assert "PostgreSQL" in status["storage"]
        assert "s3cr3t" not in out.stdout + out.stderr

    def test_wrong_password_error_names_no_password(self, cluster: PostgresCluster, pg_uri: str) -> None:
        bad = pg_uri.replace("s3cr3t", "hunter2")
        with pytest.raises(ZChatConnectionError) as info:
            zchat_nb.connect(bad)
        assert "hunter2" not in str(info.value) and "password authentication failed" in str(info.value)

    def test_restart_during_a_send_loop_loses_and_doubles_nothing(
        self, cluster: PostgresCluster, pg_uri: str
    ) -> None:
        writer = zchat_nb.connect(pg_uri, user="writer", timeout=20.0)
        reader = zchat_nb.connect(pg_uri, user="reader", timeout=20.0)
        chat = reader.session("general")
        sent: list[str] = []
        failed: list[str] = []
        half = threading.Event()

        def send() -> None:
            session = writer.session("general")
            for i in range(60):
                try:
                    session.add_message(f"m{i}")
                    sent.append(f"m{i}")
                except ZChatSendError:
                    failed.append(f"m{i}")
                if i == 20:
                    half.set()

        thread = threading.Thread(target=send)
        thread.start()
        assert half.wait(30)
        cluster.restart("immediate")  # a crash: every connection cut mid-whatever
        thread.join(60)
        assert not thread.is_alive()
        assert not failed, f"sends failed although the database came back within the timeout: {failed}"
        texts = [m.text for m in _read_all(chat, len(sent), timeout=30)]
        texts += [m.text for m in chat.new_messages()]
        assert texts == sent == [f"m{i}" for i in range(60)]
        writer.close()
        reader.close()

    def test_send_while_the_database_is_down_fails_clearly_after_the_timeout(
        self, cluster: PostgresCluster, pg_uri: str
    ) -> None:
        writer = zchat_nb.connect(pg_uri, user="writer", timeout=2.0)
        chat = writer.session("general")
        chat.add_message("before")
        cluster.stop("immediate")
        try:
            started = time.monotonic()
            with pytest.raises(ZChatSendError) as info:
                chat.add_message("while down")
            assert time.monotonic() - started >= 2.0
            text = str(info.value)
            assert "was not sent" in text and "127.0.0.1" in text and "s3cr3t" not in text
        finally:
            cluster.start()
        chat.add_message("after")
        reader = zchat_nb.connect(pg_uri, user="reader")
        assert [m.text for m in _read_all(reader.session("general"), 2)] == ["before", "after"]
        writer.close()
        reader.close()

    def test_serve_storage_keeps_a_zeo_servers_data_in_postgres(self, pg_uri: str) -> None:
        from zchat_nb.local import spawn_server

        port = free_port()
        proc, line = spawn_server(["--storage", pg_uri, "--port", str(port)], timeout=60)
        try:
            assert line, "zchat-nb serve --storage did not start"
            zeo = zchat_nb.connect(line, user="zeo")
            zeo.session("general").add_message("through ZEO")
            direct = zchat_nb.connect(pg_uri, user="direct")
            assert [m.text for m in _read_all(direct.session("general"), 1)] == ["through ZEO"]
            zeo.close()
            direct.close()
        finally:
            proc.terminate()
            proc.wait(20)

    def test_the_password_can_stay_out_of_the_command_line(
        self, cluster: PostgresCluster, pg_uri: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """As the README and `serve --help` say: no password in the URI, libpq reads $PGPASSWORD."""
        from zchat_nb.local import spawn_server

        monkeypatch.setenv("PGPASSWORD", cluster.password)  # the child process inherits it
        passwordless = pg_uri.replace(f":{quote(cluster.password, safe='')}@", "@")
        assert "s3cr3t" not in passwordless
        proc, line = spawn_server(["--storage", passwordless, "--port", str(free_port())], timeout=60)
        try:
            assert line, "zchat-nb serve --storage did not start"
            assert "s3cr3t" not in Path(f"/proc/{proc.pid}/cmdline").read_text(errors="replace")
            with zchat_nb.connect(line, user="zeo") as zeo:
                zeo.session("general").add_message("no password on the command line")
            with zchat_nb.connect(passwordless, user="direct") as direct:
                got = _read_all(direct.session("general"), 1)
            assert [m.text for m in got] == ["no password on the command line"]
        finally:
            proc.terminate()
            proc.wait(20)

    def test_inspector_widget_and_magic_status_say_postgresql_and_hide_the_password(
        self, pg_uri: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        from zchat_nb.inspector import Inspector
        from zchat_nb.widget import ChatWidget

        reader = zchat_nb.connect(pg_uri, user="reader", fallback=60.0)
        writer = zchat_nb.connect(pg_uri, user="writer")
        writer.session("general").add_message("the room exists")
        inspector = Inspector(reader, room="general", max_rate=20.0, status_interval=0.2)
        widget = ChatWidget(reader, "general")
        try:
            writer.session("general").add_message("seen by a notification")
            seen = inspector.wait_for(lambda s: s["server"].get("notifications", 0) >= 1, 10.0)
            assert seen["connected"]
            server = {tuple(c._dom_classes): c.value for c in inspector.children}[("zchat-inspector-server",)]
            assert "<h4>PostgreSQL</h4>" in server and "notifications" in server and "installed" in server
            assert "clients connected" not in server and "refused by the server" not in server
            shown = " ".join(str(c.value) for c in inspector.children) + widget.status_text + repr(inspector)
            assert "s3cr3t" not in shown
        finally:
            widget.close()
            inspector.close()
            reader.close()
            writer.close()
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "zchat_nb")
        try:
            shell.run_line_magic("zchat", f"join {pg_uri} --name ada")
            capsys.readouterr()
            shell.run_line_magic("zchat", "status")
            status = capsys.readouterr().out
        finally:
            shell.run_line_magic("unload_ext", "zchat_nb")
        assert "storage:   PostgreSQL via RelStorage (history-free)" in status
        assert "s3cr3t" not in status

    def test_records_naming_other_globals_are_refused(self, pg_uri: str) -> None:
        import ZODB

        from zchat_nb.storage import open_relstorage

        raw = ZODB.DB(open_relstorage(parse_storage_uri(pg_uri)))
        with raw.transaction() as conn:
            conn.root()["evil"] = zchat_nb.model.OOBTree({"x": threading.Event})
        raw.close()
        client = zchat_nb.connect(pg_uri, user="victim")
        tm, conn = client.connection()
        tm.begin()
        with pytest.raises(StateLoadError) as info:  # ZODB wraps what the class factory raised
            dict(conn.root()["evil"])
        assert isinstance(info.value.__cause__, UnsafeRecordError)
        assert "threading.Event" in str(info.value.__cause__)
        client.close()

    @pytest.mark.parametrize(
        "how, why", [("dag value", "traverses"), ("forbidden global", "allow-list"), ("deep id", "nests")]
    )
    def test_a_crafted_record_is_skipped_and_honest_clients_go_on(
        self, pg_uri: str, how: str, why: str
    ) -> None:
        """What any holder of the password can write in SQL, or through RelStorage as here."""
        plant_crafted_record(pg_uri, how)
        chat = finishes(lambda: reader_gets(pg_uri, ["honest"]), 120)
        assert chat.skipped and why in chat.skipped[0][1], chat.skipped
        honest_pair_works(pg_uri)

    @pytest.mark.parametrize("load", ["load", "loadBefore", "loadSerial"])
    def test_every_load_path_checks_the_record(self, pg_uri: str, load: str) -> None:
        """Connections use load, historical connections loadBefore, old states and conflicts loadSerial."""
        from ZODB.utils import p64, u64

        with zchat_nb.connect(pg_uri, user="alice") as alice:
            alice.session().add_message("honest")
            oid, key = stream_oid(alice)
        overwrite(pg_uri, oid, bucket_record(pickle.dumps(key, 3)[2:-1] + dag_pickle(64, "plain")[2:]))
        raw = raw_storage(pg_uri)
        serial = raw.load(oid)[1]
        raw.close()
        args = {"load": (), "loadBefore": (p64(u64(serial) + 1),), "loadSerial": (serial,)}[load]
        with zchat_nb.connect(pg_uri, user="reader") as reader:
            instance = reader.db.storage.new_instance()  # what each ZODB connection of the client uses
            try:
                with pytest.raises(UnsafeRecordError, match=f"object {oid.hex()}: .*traverses"):
                    getattr(instance, load)(oid, *args)
            finally:
                instance.release()

    def test_a_crafted_conflict_state_is_refused_before_it_is_unpickled(
        self, pg_uri: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """RelStorage resolves conflicts in the client: a state the attacker committed is checked first."""
        import logging

        from ZODB.POSException import ConflictError

        client = zchat_nb.connect(pg_uri, user="victim")
        tm, conn = client.connection()
        tm.begin()
        conn.root()["n"] = Length(0)
        tm.commit()
        counter = conn.root()["n"]
        tm.begin()
        assert counter() == 0
        dag_state = pickle.dumps((Length, None), 3) + dag_pickle(64, "plain") + b"."
        attacker = raw_storage(pg_uri)
        txn = TransactionMetaData()
        attacker.tpc_begin(txn)
        attacker.store(counter._p_oid, counter._p_serial, dag_state, "", txn)
        attacker.tpc_vote(txn)
        attacker.tpc_finish(txn)
        attacker.close()
        counter.change(1)  # conflicts with the attacker's commit: the client tries to resolve it
        with caplog.at_level(logging.DEBUG, logger="ZODB.ConflictResolution"), pytest.raises(ConflictError):
            finishes(tm.commit, 60)
        tm.abort()
        client.close()
        said = [r.getMessage() for r in caplog.records if r.name == "ZODB.ConflictResolution"]
        assert any("refused a conflict state" in line and "traverses" in line for line in said), said
        honest_pair_works(pg_uri)

    @pytest.mark.parametrize("without", ["", "allow-list", "pickle check", "both"])
    def test_conflict_resolution_runs_nothing_a_crafted_state_names(
        self, pg_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, without: str
    ) -> None:
        """Each of the two guards alone refuses the state; without both (ZODB as it comes), the
        check can be seen to fail: the state runs os.mkdir."""
        import importlib

        import ZODB.ConflictResolution as cr

        from zchat_nb import security, storage

        def unrestricted(module: str, name: str) -> object:  # what ZODB's own find_global does
            return getattr(importlib.import_module(module), name)

        if without in ("allow-list", "both"):
            monkeypatch.setattr(security, "harden_conflict_resolution", lambda: None)
            monkeypatch.setattr(cr, "find_global", unrestricted)
        if without in ("pickle check", "both"):
            monkeypatch.setattr(storage, "check_conflict_state", lambda data: None)
        ran = self._crafted_conflict(pg_uri, tmp_path / "marker")
        assert ran is (without == "both"), f"without {without or 'nothing'}: ran={ran}"

    @staticmethod
    def _crafted_conflict(uri: str, marker: Path) -> bool:
        """Commit a Length, overwrite it behind the client's back with a state whose unpickling
        calls ``os.mkdir(marker)``, then make the client commit a conflicting change."""
        from zchat_nb.storage import open_relstorage

        client = zchat_nb.connect(uri, user="victim")
        tm, conn = client.connection()
        tm.begin()
        conn.root()["n"] = Length(0)
        tm.commit()
        counter = conn.root()["n"]
        oid = counter._p_oid
        tm.begin()
        assert counter() == 0

        class Evil:
            def __reduce__(self) -> tuple[object, ...]:
                return (os.mkdir, (str(marker),))

        record = pickle.dumps((Length, None), 3) + pickle.dumps(Evil(), 3)
        attacker = open_relstorage(parse_storage_uri(uri))
        txn = TransactionMetaData()
        attacker.tpc_begin(txn)
        attacker.store(oid, counter._p_serial, record, "", txn)
        attacker.tpc_vote(txn)
        attacker.tpc_finish(txn)
        attacker.close()
        counter.change(1)
        try:
            tm.commit()
        except Exception:
            tm.abort()
        client.close()
        return marker.exists()
