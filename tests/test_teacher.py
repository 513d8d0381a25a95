"""Teacher tools: export (DataFrame, CSV, Markdown) on an in-memory database; clear, pack and the
commands against a real ZEO server on a FileStorage (marked ``integration``)."""

from __future__ import annotations

import csv
import datetime
import io
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ZODB

import zchat_nb
from zchat_nb import ChatClient, Message, teacher
from zchat_nb.cli import main

from .helpers import MakeClient

integration = pytest.mark.integration

# 2026-03-02 09:00:00 UTC, then one second per message
START = 1772442000.0
TRICKY = 'comma, "quotes" and\na second line'

#: The teacher's client, and the messages of the room 'lesson'.
Taught = tuple[ChatClient, list[Message]]


def fixed_clock() -> Iterator[float]:
    return (START + i for i in itertools.count())


def teach(where: object, make_client: MakeClient) -> Taught:
    """A teacher's client on ``where``; a room 'lesson' with messages from alice and bob, in clock order."""
    teacher_clock, clock = fixed_clock(), fixed_clock()
    client = make_client(where, "teacher", clock=lambda: next(teacher_clock))
    next(clock)  # one second after the teacher's first tick, so times never tie
    room = make_client(where, "alice", clock=lambda: next(clock)).session("lesson")
    sent = [room.add_message("hello, class"), room.add_message(TRICKY), room.add_message("=1+1")]
    sent.append(
        make_client(where, "bob", clock=lambda: START + 100)
        .session("lesson")
        .add_message("- a list\n- `code`")
    )
    return client, sent


@pytest.fixture
def taught(make_client: MakeClient) -> Taught:
    """The lesson on an in-memory database."""
    return teach(ZODB.DB(None), make_client)


@pytest.fixture
def served(file_server: zchat_nb.Server, make_client: MakeClient) -> Taught:
    """The lesson on a ZEO server with a FileStorage."""
    return teach(file_server.address, make_client)


def test_messages_are_every_message_in_time_order(taught: Taught) -> None:
    client, lesson = taught
    assert teacher.messages(client, "lesson") == lesson


def test_unknown_room_is_named_with_the_rooms_there(taught: Taught) -> None:
    client, _ = taught
    with pytest.raises(zchat_nb.ZChatError, match=r"no room 'lessons' .* rooms there: 'lesson'"):
        teacher.messages(client, "lessons")


def test_csv_has_a_header_and_round_trips_awkward_text(taught: Taught) -> None:
    client, lesson = taught
    rows = list(csv.DictReader(io.StringIO(teacher.to_csv(client, "lesson"))))
    assert list(rows[0]) == list(teacher.COLUMNS)
    assert [r["id"] for r in rows] == [m.id for m in lesson]
    assert rows[1]["text"] == TRICKY
    assert [float(r["time"]) for r in rows] == [m.time for m in lesson]
    assert rows[0]["datetime"] == "2026-03-02T09:00:01+00:00"
    assert rows[2]["text"] == "'=1+1"  # a spreadsheet shows it instead of computing it
    raw = list(csv.DictReader(io.StringIO(teacher.to_csv(client, "lesson", spreadsheet_safe=False))))
    assert raw[2]["text"] == "=1+1"


def test_dataframe_has_the_columns_and_types(taught: Taught) -> None:
    client, _ = taught
    pd = pytest.importorskip("pandas")
    frame = teacher.to_dataframe(client, "lesson")
    assert list(frame.columns) == list(teacher.COLUMNS)
    assert frame["author"].tolist() == ["alice", "alice", "alice", "bob"]
    assert frame["text"][1] == TRICKY
    assert frame["datetime"][0] == pd.Timestamp("2026-03-02 09:00:01", tz="UTC")
    assert frame["time"].dtype == "float64"


def test_dataframe_without_pandas_says_how_to_get_it(taught: Taught, monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = taught
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError, match="pip install pandas"):
        teacher.to_dataframe(client, "lesson")


def test_markdown_transcript_reads_well(taught: Taught) -> None:
    client, _ = taught
    text = teacher.to_markdown(client, "lesson", tz=datetime.timezone.utc)
    assert text.startswith("# Chat transcript: lesson\n")
    assert "4 messages from 2 people, 2026-03-02 09:00 to 2026-03-02 09:01 (UTC+0000)" in text
    assert "## Monday 02 March 2026" in text
    assert "**alice** · 09:00:01\n\n> hello, class\n" in text
    assert '> comma, "quotes" and\n> a second line\n' in text
    assert "**bob** · 09:01:40\n\n> - a list\n> - `code`\n" in text


def test_export_writes_files_in_either_format(taught: Taught, tmp_path: Path) -> None:
    client, _ = taught
    assert teacher.export(client, "lesson", tmp_path / "l.csv") == 4
    assert teacher.export(client, "lesson", tmp_path / "l.md", format="md") == 4
    assert (tmp_path / "l.csv").read_text(encoding="utf-8").startswith("id,author,text,time,datetime\n")
    assert "**bob**" in (tmp_path / "l.md").read_text(encoding="utf-8")
    with pytest.raises(zchat_nb.ZChatError, match="use 'csv' or 'md'"):
        teacher.export(client, "lesson", tmp_path / "l.x", format="xlsx")


@integration
def test_clearing_a_room_restarts_every_reader_and_leaves_other_rooms(
    served: Taught, file_server: zchat_nb.Server, make_client: MakeClient
) -> None:
    client, lesson = served
    carol = make_client(file_server.address, "carol")
    reader = carol.session("lesson")
    assert reader.new_messages() == lesson
    other = client.session("other").add_message("keep me")
    assert teacher.clear_room(client, "lesson") == 4
    assert teacher.messages(client, "lesson") == []
    assert teacher.messages(client, "other") == [other]
    # Carol's client sees the clear once ZEO's invalidation reaches it: wait for that, not for a clock.
    deadline = time.monotonic() + 10
    while True:
        generation = carol.generation()
        if reader.history() == []:
            break
        assert time.monotonic() < deadline, "the clear never reached the other client"
        carol.wait_for_change(generation, deadline - time.monotonic())
    after = client.session("lesson").add_message("a fresh start")
    assert reader.new_messages(timeout=10) == [after]


@integration
def test_pack_after_clearing_shrinks_the_file_and_keeps_current_messages(
    served: Taught, file_server: zchat_nb.Server
) -> None:
    client, _ = served
    assert file_server.path is not None
    chat = client.session("busy")
    for i in range(200):
        chat.add_message(f"message {i}: " + "x" * 200)
    kept = client.session("other").add_message("still here after the pack")
    before = file_server.path.stat().st_size
    teacher.clear_room(client, "busy")
    teacher.pack(client)
    after = file_server.path.stat().st_size
    assert after < before / 10, (before, after)
    assert teacher.messages(client, "other") == [kept]
    assert chat.new_messages() == []  # the session's cursor restarted on the cleared room
    assert chat.add_message("the room still works") in chat.new_messages(timeout=10)


def test_pack_refuses_negative_days(taught: Taught) -> None:
    client, _ = taught
    with pytest.raises(zchat_nb.ZChatError, match="days >= 0"):
        teacher.pack(client, days=-1)


# -- the command line ------------------------------------------------------------------------


@integration
def test_export_clear_and_pack_commands(
    served: Taught,
    file_server: zchat_nb.Server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    address = f"127.0.0.1:{file_server.address[1]}"
    monkeypatch.setenv("ZCHAT_ADDRESS", address)
    assert main(["export", "lesson", "--format", "md"]) == 0
    assert "> hello, class" in capsys.readouterr().out
    out_file = tmp_path / "lesson.csv"
    assert main(["export", "lesson", "-o", str(out_file), "--address", address]) == 0
    assert "wrote 4 messages" in capsys.readouterr().err
    assert len(list(csv.DictReader(out_file.open(encoding="utf-8")))) == 4

    assert main(["clear", "lesson"]) == 2  # not without --yes
    assert "export it first" in capsys.readouterr().err.lower()
    assert main(["export", "lesson"]) == 0 and "a second line" in capsys.readouterr().out
    assert main(["clear", "lesson", "--yes"]) == 0
    assert "cleared room 'lesson' (4 messages)" in capsys.readouterr().out

    assert main(["pack"]) == 0
    assert f"packed the storage at {address}" in capsys.readouterr().out
    assert main(["export", "nowhere"]) == 1
    assert "no room 'nowhere'" in capsys.readouterr().err


def test_teacher_commands_do_not_start_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "general"]) == 1
    assert "no local zchat server is recorded" in capsys.readouterr().err
