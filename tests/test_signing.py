"""Signed records with real classroom certificates, on an in-memory ZODB: what verifies and what not."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import ZODB

import zchat_nb
from zchat_nb import certs
from zchat_nb.amend import Event
from zchat_nb.client import _signing
from zchat_nb.model import ROOMS_KEY, Room
from zchat_nb.signing import fingerprint


@pytest.fixture(scope="module")
def classroom(tmp_path_factory: pytest.TempPathFactory) -> certs.Classroom:
    return certs.make_classroom(tmp_path_factory.mktemp("class"), ["alice", "bob"])


@pytest.fixture
def db() -> Iterator[ZODB.DB]:
    database = ZODB.DB(None)
    yield database
    database.close()


def signed(
    db: ZODB.DB, classroom: certs.Classroom, folder: str, user: str | None = None
) -> zchat_nb.ChatClient:
    """A client that signs with ``folder``'s certificate, as connect(tls=folder) makes it."""
    bundle = certs.load_bundle(classroom.bundles[folder])
    client = zchat_nb.ChatClient(db, user=user or bundle.name)
    client.signer, client.verifier = _signing(bundle)
    return client


def room_of(client: zchat_nb.ChatClient) -> tuple[object, Room]:
    tm, conn = client.connection()
    tm.begin()
    return tm, conn.root()[ROOMS_KEY]["general"]


def test_teachers_certificate_carries_the_role_and_old_ones_are_reissued(tmp_path: Path) -> None:
    made = certs.make_classroom(tmp_path / "c", ["alice"])
    teacher_pem = made.bundles["teacher"] / "teacher.pem"
    assert certs.has_role(teacher_pem, certs.TEACHER_ROLE)
    assert not certs.has_role(made.bundles["alice"] / "alice.pem", certs.TEACHER_ROLE)
    teacher_pem.write_bytes((made.bundles["alice"] / "alice.pem").read_bytes())  # as if made without a role
    certs.make_classroom(tmp_path / "c", ["alice"])
    assert certs.has_role(teacher_pem, certs.TEACHER_ROLE)


def test_signed_messages_verify_and_a_forged_name_does_not(db: ZODB.DB, classroom: certs.Classroom) -> None:
    alice = signed(db, classroom, "alice").session("general")
    impostor = signed(db, classroom, "bob", user="teacher").session("general")
    assert alice.add_message("mine").verified
    assert not impostor.add_message("I am the teacher").verified
    reader = signed(db, classroom, "teacher").session("general")
    assert [(m.author, m.verified) for m in reader.new_messages()] == [("alice", True), ("teacher", False)]
    unsigned_reader = zchat_nb.ChatClient(db, user="nobody").session("general")
    assert [m.verified for m in unsigned_reader.new_messages()] == [False, False]  # no CA: nothing verified


def test_forged_edits_and_deletes_by_a_student_are_ignored_and_the_teachers_delete_counts(
    db: ZODB.DB, classroom: certs.Classroom
) -> None:
    alice = signed(db, classroom, "alice").session("general")
    bob_client = signed(db, classroom, "bob")
    bob = bob_client.session("general")
    m = alice.add_message("answer: 42")
    reader = signed(db, classroom, "alice").session("general")  # alice in another kernel
    reader.new_messages()
    with pytest.raises(zchat_nb.ZChatPermissionError, match="only alice"):
        bob.edit(m, "answer: 41")
    with pytest.raises(zchat_nb.ZChatPermissionError, match="teacher may delete"):
        bob.delete(m)
    # bob writes events himself, validly signed with his own key: one claims to be alice's edit,
    # one is his own delete of her message.
    seal = bob._sealer(bob_client.writer)
    tm, room = room_of(bob_client)
    room.add_cert(bob_client.signer.fingerprint, bob_client.signer.cert_pem)
    for i, (author, kind, arg) in enumerate([("alice", "edit", "answer: 41"), ("bob", "delete", "")]):
        event = Event(f"{i}" * 32, author, 5e9 + i, kind, m.writer, m.time, m.id, 7, arg)
        room.amend(bob_client.writer, event, seal)
    tm.commit()
    assert reader.updated_messages() == []
    assert [(x.text, x.deleted) for x in reader.history(5)] == [("answer: 42", False)]
    assert sorted(w for w, _ in reader.skipped) == ["delete " + "1" * 32, "edit " + "0" * 32]
    # alice edits from her other kernel: her signature counts wherever she writes from.
    assert reader.edit(m, "answer: 42!").text == "answer: 42!"
    teacher = signed(db, classroom, "teacher").session("general")
    assert teacher.delete(m).deleted
    [seen] = alice.new_messages()
    assert (seen.deleted, seen.text, seen.verified) == (True, "", True)


def test_a_crafted_signature_does_not_verify(db: ZODB.DB, classroom: certs.Classroom) -> None:
    alice_client = signed(db, classroom, "alice")
    m = alice_client.session("general").add_message("signed")
    sig = bytearray(base64.b64decode(m.signature))
    sig[-1] ^= 1
    tm, room = room_of(alice_client)
    crafted = dataclasses.replace(m, id="c" * 32, time=m.time + 1, signature=base64.b64encode(sig).decode())
    room.append(alice_client.writer, crafted)
    moved = dataclasses.replace(m, id="d" * 32, time=m.time + 2, text="not what alice signed")
    room.append(alice_client.writer, moved)  # her signature, over other text
    tm.commit()
    reader = signed(db, classroom, "bob").session("general")
    assert [(x.text, x.verified) for x in reader.new_messages()] == [
        ("signed", True),
        ("signed", False),
        ("not what alice signed", False),
    ]


def test_a_certificate_the_class_ca_did_not_issue_does_not_verify(
    db: ZODB.DB, classroom: certs.Classroom, tmp_path: Path
) -> None:
    other = certs.make_classroom(tmp_path / "other", ["alice"])  # mallory's own CA, her own "alice"
    forger_bundle = certs.load_bundle(other.bundles["alice"])
    forger = zchat_nb.ChatClient(db, user="alice")
    forger.signer, forger.verifier = _signing(forger_bundle)
    forger.session("general").add_message("alice here, honest")
    # The server's certificate is issued by the class CA but is no client certificate.
    server_pem = (classroom.server_dir / "server.pem").read_text()
    tm, room = room_of(forger)
    room.add_cert(fingerprint(server_pem), server_pem)
    room.add_cert("0" * 64, (classroom.bundles["alice"] / "alice.pem").read_text())  # under a wrong key
    tm.commit()
    reader = signed(db, classroom, "bob").session("general")
    [seen] = reader.new_messages()
    assert (seen.author, seen.verified) == ("alice", False)
    verifier = reader._host.verifier
    assert verifier is not None
    assert verifier.identify(fingerprint(server_pem), server_pem, b"x", "AAAA") is None
    pem = (classroom.bundles["alice"] / "alice.pem").read_text()
    assert verifier.identify("0" * 64, pem, b"x", "AAAA") is None


def test_a_bogus_certificate_stored_first_under_a_fingerprint_is_replaced(
    db: ZODB.DB, classroom: certs.Classroom
) -> None:
    alice_client = signed(db, classroom, "alice")
    chat = alice_client.session("general")
    chat.add_message("first")  # creates the room
    tm, room = room_of(alice_client)
    room.certs[alice_client.signer.fingerprint] = "-----BEGIN CERTIFICATE-----\nbogus"
    tm.commit()
    chat.add_message("second")
    reader = signed(db, classroom, "bob").session("general")
    assert [m.verified for m in reader.new_messages()] == [True, True]
