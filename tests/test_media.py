"""Pictures and tables shared as ZODB blobs: types from magic numbers, limits, ZEO moving the bytes.

Unit tests check :mod:`zchat_nb.media` (what can be shared, and the errors) and the record format;
integration tests share every kind from a child process through a real ZEO server (in memory and
on a FileStorage with a blob directory) and compare the bytes another client reads, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction

import zchat_nb
from zchat_nb.amend import MESSAGE_TAG
from zchat_nb.exceptions import AttachmentError
from zchat_nb.media import DEFAULT_MAX_ATTACHMENT_BYTES, prepare, sniff
from zchat_nb.model import BLOBS_KEY, Attachment, Message, _new_blob, _writer_blobs, commit

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 24
GIF = b"GIF89a" + b"\x00" * 24
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 16


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (PNG, "image/png"),
        (JPEG, "image/jpeg"),
        (GIF, "image/gif"),
        (b"GIF87a" + b"\x00" * 8, "image/gif"),
        (WEBP, "image/webp"),
        (b"a,b\n1,2\n", "text/csv"),
        (b"\x00\x01binary", None),
        (b"\xff\xfe not utf-8", None),
        (b"", None),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
    ],
)
def test_types_come_from_the_bytes(data: bytes, mime: str | None) -> None:
    assert sniff(data) == mime


def test_image_bytes_and_files_are_prepared_by_their_content_not_their_name(tmp_path: Path) -> None:
    assert prepare(PNG).mime == "image/png"
    lying = tmp_path / "photo.png"
    lying.write_bytes(GIF)
    prepared = prepare(lying)
    assert (prepared.name, prepared.mime, prepared.data) == ("photo.png", "image/gif", GIF)
    assert prepare(str(lying)).data == GIF


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (b"<svg onload=alert(1)>", "is not a PNG, JPEG, GIF or WebP image"),
        (b"%PDF-1.7", "is not a PNG, JPEG, GIF or WebP image"),
        (b"a,b\n1,2\n", "is not a PNG, JPEG, GIF or WebP image"),  # CSV only from a DataFrame
        (42, "cannot share a builtins.int: share image bytes"),
        ({"a": 1}, "cannot share a builtins.dict"),
    ],
)
def test_what_cannot_be_shared_is_refused_with_the_way_out(obj: Any, match: str) -> None:
    with pytest.raises(AttachmentError, match=match):
        prepare(obj)


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(AttachmentError, match="No such file or directory; give the path of an image"):
        prepare(tmp_path / "missing.png")
    with pytest.raises(AttachmentError, match="is not a regular file"):
        prepare(tmp_path)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(AttachmentError, match="is not a regular file"):
        prepare(fifo)  # and it did not block on the FIFO
    text = tmp_path / "notes.png"
    text.write_text("<script>alert(1)</script>")
    with pytest.raises(AttachmentError, match=r"notes\.png' is not a PNG"):
        prepare(text)


def test_limits_are_checked_before_reading_and_name_the_setting(tmp_path: Path) -> None:
    big = PNG + b"\x00" * DEFAULT_MAX_ATTACHMENT_BYTES
    with pytest.raises(
        AttachmentError, match=r"over the 5242880-byte attachment limit.*max_attachment_bytes"
    ):
        prepare(big)
    path = tmp_path / "big.png"
    path.write_bytes(big)
    with pytest.raises(AttachmentError, match=r"big\.png' is 5242912 bytes"):
        prepare(path)
    assert prepare(big, max_bytes=len(big)).data == big


def test_a_pil_image_is_shared_as_png() -> None:
    image_module = pytest.importorskip("PIL.Image")
    image = image_module.new("RGB", (8, 4), "blue")
    prepared = prepare(image)
    assert prepared.mime == "image/png" and prepared.name == "image.png"
    assert image_module.open(io.BytesIO(prepared.data)).size == (8, 4)


def test_a_matplotlib_figure_is_shared_as_png() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure list

    figure = Figure(figsize=(2, 1))
    figure.add_subplot().plot([1, 2, 3])
    prepared = prepare(figure)
    assert prepared.mime == "image/png" and prepared.data.startswith(b"\x89PNG")


def test_a_dataframe_is_a_csv_attachment_and_an_inert_table() -> None:
    pd = pytest.importorskip("pandas")
    from zchat_nb.render import render_markdown

    frame = pd.DataFrame({"x": range(25), "<img src=x onerror=alert(1)>": ["|*a*|"] * 25})
    prepared = prepare(frame)
    assert prepared.mime == "text/csv" and prepared.name == "table.csv"
    assert prepared.data == frame.to_csv().encode()
    assert "25 rows × 2 columns, first 10 shown" in prepared.text
    html = render_markdown(prepared.text)
    assert "<table>" in html and html.count("<tr>") == 11  # header and the first 10 rows
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<em>" not in html and "|*a*|" in html  # cell text shown literally


# -- records --------------------------------------------------------------------------------------


def test_a_message_with_attachments_round_trips_as_plain_values() -> None:
    attachment = Attachment("plot.png", "image/png", 123, "w1/abc/0")
    message = Message("abc", "ada", "", 1.5, attachments=(attachment,))
    record = message.to_record()
    entries = (("plot.png", "image/png", 123, "w1/abc/0"),)
    assert record == (MESSAGE_TAG, "abc", "ada", "", 1.5, "", "", entries, "")  # signed with the rest
    assert Message.from_record(record) == message
    assert Message("abc", "ada", "hi", 1.5).to_record() == ("abc", "ada", "hi", 1.5)  # as before


@pytest.mark.parametrize(
    "entries",
    [
        (),
        ("plot.png",),
        (("plot.png", "image/png", -1, "w/a/0"),),
        (("plot.png", "image/png", 1.0, "w/a/0"),),
        (("plot.png", "image/png", True, "w/a/0"),),
        (("", "image/png", 1, "w/a/0"),),
        (("p", "image/png", 1, "no-slashes"),),
        (("p", "image/png", 1, "w/a/0"),) * 5,
        [("p", "image/png", 1, "w/a/0")],
    ],
)
def test_crafted_attachment_entries_are_rejected(entries: Any) -> None:
    with pytest.raises(ValueError):
        Message.from_record((MESSAGE_TAG, "abc", "ada", "", 1.5, "", "", entries, ""))


# -- through a real ZEO server ---------------------------------------------------------------------

# Run in a child process: share one of each kind and print what was shared (sha256 per kind).
_SHARER = textwrap.dedent(
    """
    import hashlib, io, json, sys
    import pandas as pd
    from matplotlib.figure import Figure
    from PIL import Image
    import zchat_nb
    from zchat_nb.media import prepare

    host, port, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    figure = Figure(figsize=(2, 1))
    figure.add_subplot().plot([3, 1, 2])
    image = Image.new("RGB", (16, 9), "green")
    def encoded(fmt):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        return buffer.getvalue()
    path = workdir + "/photo.jpg"
    with open(path, "wb") as f:
        f.write(encoded("JPEG"))
    kinds = {
        "png bytes": encoded("PNG"),
        "jpeg path": path,
        "gif bytes": encoded("GIF"),
        "webp bytes": encoded("WEBP"),
        "figure": figure,
        "pil image": image,
        "dataframe": pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}),
    }
    client = zchat_nb.connect((host, port), user="sharer")
    chat = client.session("media")
    shared = {}
    for kind, obj in kinds.items():
        message = chat.share(obj, caption=kind)
        shared[kind] = [hashlib.sha256(prepare(obj).data).hexdigest(), message.attachments[0].mime]
    client.close()
    print(json.dumps(shared))
    """
)


@pytest.fixture(params=["memory", "filestorage"])
def any_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[zchat_nb.Server]:
    path = None if request.param == "memory" else tmp_path / "chat.fs"
    with zchat_nb.serve(path) as srv:
        yield srv


@pytest.mark.integration
def test_every_kind_shared_in_one_process_reads_back_byte_for_byte_in_another(
    any_server: zchat_nb.Server, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    pytest.importorskip("pandas")
    reader = zchat_nb.connect(any_server.address, user="reader")
    try:
        chat = reader.session("media")
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        )
        host, port = any_server.address
        done = subprocess.run(
            [sys.executable, "-c", _SHARER, host, str(port), str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        shared = json.loads(done.stdout)
        messages = _read(chat, len(shared))
        by_caption = {m.text.split("\n")[0]: m for m in messages}
        assert set(by_caption) == set(shared)
        for kind, (digest, mime) in shared.items():
            message = by_caption[kind]
            (attachment,) = message.attachments
            assert attachment.mime == mime
            data = reader.attachment_bytes(message)
            assert hashlib.sha256(data).hexdigest() == digest, kind
            assert len(data) == attachment.size
        assert shared["dataframe"][1] == "text/csv"
        assert "| 0 | 1 | x |" in by_caption["dataframe"].text
        assert {shared[k][1] for k in ("png bytes", "figure", "pil image")} == {"image/png"}
        assert shared["jpeg path"][1] == "image/jpeg" and shared["webp bytes"][1] == "image/webp"
        # The records hold plain values only; the bytes are in blobs, not in any record.
        assert all(len(repr(m.to_record())) < 1000 for m in messages)
    finally:
        reader.close()


@pytest.mark.integration
def test_the_limit_is_configurable_and_checked_when_sharing(server: zchat_nb.Server) -> None:
    big = PNG + b"\x00" * 100_000
    small = zchat_nb.connect(server.address, user="small", max_attachment_bytes=50_000)
    large = zchat_nb.connect(server.address, user="large", max_attachment_bytes=200_000)
    try:
        with pytest.raises(AttachmentError, match="over the 50000-byte attachment limit"):
            small.session("limits").share(big)
        message = large.session("limits").share(big)
        (got,) = _read(small.session("limits"), 1)
        assert got.id == message.id
        with pytest.raises(
            AttachmentError, match=r"100032 bytes, over the 50000-byte limit; it is not loaded"
        ):
            small.attachment_bytes(got)
        assert large.attachment_bytes(got) == big
        with pytest.raises(AttachmentError, match="there is no index 1"):
            large.attachment_bytes(got, 1)
    finally:
        small.close()
        large.close()


def _read(chat: Any, count: int, timeout: float = 20.0) -> list[Message]:
    """The next ``count`` messages of ``chat``, waiting (woken by invalidations) up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    found: list[Message] = []
    while len(found) < count and time.monotonic() < deadline:
        found.extend(chat.new_messages(timeout=deadline - time.monotonic()))
    assert len(found) == count, [m.text for m in found]
    return found


def _plant(client: zchat_nb.ChatClient, room: str, attachment: Attachment, data: bytes | None) -> None:
    """Write, as a hostile client would, a blob under ``attachment.key`` and a message naming it."""
    chat = client.session(room)
    message = Message("f" * 32, client.user, "crafted", float(client.clock()), attachments=(attachment,))
    if data is not None:

        def store(conn: Any) -> None:
            _writer_blobs(conn, attachment.writer)[attachment.key] = _new_blob(data)

        commit(client, store, what="planting a blob")
    chat.post(message)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("claimed", "data", "match"),
    [
        (("a.png", "image/png", len(GIF)), GIF, "claims to be image/png but its bytes are image/gif"),
        (("a.png", "image/png", 3), PNG, f"is {len(PNG)} bytes, not the 3 its message says"),
        (("a.png", "image/png", len(PNG)), None, "is missing from the database"),
        (("a.svg", "image/svg+xml", 10), b"<svg onload=alert(1)>", "unknown type 'image/svg\\+xml'"),
        (("a.png", "image/png", 10**12), PNG, "over the 5242880-byte limit; it is not loaded"),
    ],
    ids=["wrong magic", "size lie", "no blob", "svg", "oversized"],
)
def test_a_crafted_attachment_is_refused_and_the_room_reads_on(
    server: zchat_nb.Server, claimed: tuple[str, str, int], data: bytes | None, match: str
) -> None:
    mallory = zchat_nb.connect(server.address, user="mallory")
    reader = zchat_nb.connect(server.address, user="reader")
    try:
        chat = reader.session("crafted")
        chat.new_messages()
        _plant(mallory, "crafted", Attachment(*claimed, key=f"{mallory.writer}/x/0"), data)
        mallory.session("crafted").add_message("after it")
        messages = _read(chat, 2)
        assert [m.text for m in messages] == ["crafted", "after it"]
        with pytest.raises(AttachmentError, match=match):
            reader.attachment_bytes(messages[0])
        transaction.abort()
    finally:
        mallory.close()
        reader.close()


@pytest.mark.integration
def test_blobs_live_in_one_tree_per_writer(server: zchat_nb.Server) -> None:
    a = zchat_nb.connect(server.address, user="a")
    b = zchat_nb.connect(server.address, user="b")
    try:
        ma = a.session("trees").share(PNG)
        mb = b.session("trees").share(GIF)
        # A client connected after both commits sees both (a and b may not have heard yet).
        fresh = zchat_nb.connect(server.address, user="fresh")
        tm, conn = fresh.connection()
        tm.begin()
        writers = conn.root()[BLOBS_KEY]
        assert set(writers.keys()) == {a.writer, b.writer}
        assert list(writers[a.writer].keys()) == [ma.attachments[0].key]
        assert list(writers[b.writer].keys()) == [mb.attachments[0].key]
        tm.abort()
        fresh.close()
    finally:
        a.close()
        b.close()


def test_a_database_without_blobs_says_so(make_client: Any) -> None:
    import ZODB

    client = make_client(ZODB.DB(None), "ada")  # MappingStorage: no blobs
    with pytest.raises(AttachmentError, match="keeps no blobs, so nothing can be shared there"):
        client.session("r").share(PNG)
    assert client.session("r").history(5) == []


@pytest.mark.integration
def test_the_server_refuses_a_blob_over_its_limit_and_serves_the_others_on(tmp_path: Path) -> None:
    from zchat_nb.exceptions import ZChatSendError
    from zchat_nb.server import blob_dir_of

    path = tmp_path / "chat.fs"
    with zchat_nb.serve(path, max_blob_bytes=100_000) as srv:
        # A client that ignores the limit (its own is raised): the server is what stops it.
        greedy = zchat_nb.connect(srv.address, user="greedy", max_attachment_bytes=10**7, timeout=3)
        honest = zchat_nb.connect(srv.address, user="honest")
        try:
            with pytest.raises(ZChatSendError, match="was not sent"):
                greedy.session("cap").share(PNG + b"\x00" * 300_000)
            fits = honest.session("cap").share(PNG + b"\x00" * 90_000)
            (seen,) = [m for m in _read(greedy.session("cap"), 1)]
            assert seen.id == fits.id
            assert greedy.attachment_bytes(seen) == PNG + b"\x00" * 90_000
        finally:
            greedy.close()
            honest.close()
        leftovers = [p for p in (blob_dir_of(path) / "tmp").iterdir()]
        assert leftovers == [], leftovers  # no half-uploaded blob left on the server's disk
