"""Classroom server: certificates, TLS with client certificates, ``serve --public``."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import zchat_nb
from zchat_nb import certs
from zchat_nb.cli import main
from zchat_nb.local import _read_line, public_notice
from zchat_nb.net import parse_address


@pytest.fixture
def classroom(tmp_path: Path) -> certs.Classroom:
    return certs.make_classroom(tmp_path / "class", ["alice", "bob"])


@pytest.fixture
def tls_server(classroom: certs.Classroom) -> Iterator[zchat_nb.Server]:
    with zchat_nb.serve(tls=classroom.directory) as server:
        yield server


def refused(address: object, timeout: float = 2.0, **kwargs: object) -> str:
    """Connect, expect a ZChatConnectionError within a few seconds, return its message."""
    started = time.monotonic()
    with pytest.raises(zchat_nb.ZChatConnectionError) as info:
        zchat_nb.connect(address, user="eve", connect_timeout=timeout, **kwargs)  # type: ignore[arg-type]
    assert time.monotonic() - started < 5 * timeout
    return str(info.value)


# -- making certificates ---------------------------------------------------------------------


def test_classroom_layout_and_private_keys_readable_by_owner_only(classroom: certs.Classroom) -> None:
    root = classroom.directory
    expected = [
        "ca.key",
        "ca.pem",
        "server/ca.pem",
        "server/server.key",
        "server/server.pem",
        "students/alice/alice.key",
        "students/alice/alice.pem",
        "students/alice/ca.pem",
        "students/bob/bob.key",
        "students/bob/bob.pem",
        "students/bob/ca.pem",
        "students/teacher/ca.pem",
        "students/teacher/teacher.key",
        "students/teacher/teacher.pem",
    ]
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == expected
    for key in root.rglob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert set(classroom.bundles) == {"alice", "bob", "teacher"}
    assert classroom.server_names[:3] == ["localhost", "127.0.0.1", "::1"]


def test_certificates_chain_to_the_classroom_ca(classroom: certs.Classroom) -> None:
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(classroom.ca.read_bytes())
    for path in [classroom.server_dir / "server.pem", classroom.bundles["alice"] / "alice.pem"]:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cert.verify_directly_issued_by(ca)
    alice = x509.load_pem_x509_certificate((classroom.bundles["alice"] / "alice.pem").read_bytes())
    assert alice.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "alice"


def test_running_again_keeps_the_ca_and_bundles_and_adds_students_and_names(
    classroom: certs.Classroom,
) -> None:
    ca_before = classroom.ca.read_bytes()
    alice_before = (classroom.bundles["alice"] / "alice.key").read_bytes()
    again = certs.make_classroom(classroom.directory, ["carol"], ["class.example.org", "192.0.2.10"])
    assert classroom.ca.read_bytes() == ca_before
    assert (classroom.bundles["alice"] / "alice.key").read_bytes() == alice_before
    assert set(again.bundles) == {"alice", "bob", "carol", "teacher"}
    assert {"class.example.org", "192.0.2.10", "localhost", "127.0.0.1"} <= set(again.server_names)
    unchanged = certs.make_classroom(classroom.directory, [], ["192.0.2.10"])
    assert unchanged.created == []  # nothing new to name: the server certificate is kept


@pytest.mark.parametrize("bad", ["", "two words", "../up", "server", "ca", "-dash", "x" * 65, "é"])
def test_bad_student_names_are_refused_with_the_rule(tmp_path: Path, bad: str) -> None:
    with pytest.raises(zchat_nb.ZChatError, match="letters, digits"):
        certs.make_classroom(tmp_path / "class", [bad])


def test_names_file_skips_blanks_and_comments(tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("# class 3B\nalice\n\n  bob  # late\n")
    assert certs.read_names(names) == ["alice", "bob"]


def test_bundle_found_from_its_folder_or_from_the_classroom_and_a_name(classroom: certs.Classroom) -> None:
    assert certs.load_bundle(classroom.bundles["bob"]).name == "bob"
    assert certs.load_bundle(classroom.bundles["bob"], "Bob the Builder").name == "bob"
    assert certs.load_bundle(classroom.directory, "alice").cert.name == "alice.pem"
    with pytest.raises(zchat_nb.ZChatError, match="name a student"):
        certs.load_bundle(classroom.directory)
    with pytest.raises(zchat_nb.ZChatError, match="no certificate folder"):
        certs.load_bundle(classroom.directory / "missing")
    with pytest.raises(zchat_nb.ZChatError, match="not a classroom directory"):
        certs.server_context(classroom.bundles["bob"])


def test_certs_command_prints_what_to_hand_each_student(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = tmp_path / "names.txt"
    names.write_text("carol\n")
    code = main(["certs", str(tmp_path / "c"), "--student", "alice", "--students-file", str(names)])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("alice", "carol", "teacher"):
        assert (tmp_path / "c" / "students" / name / f"{name}.key").exists()
        assert f"{tmp_path / 'c' / 'students' / name}/" in out
    assert "--tls alice" in out and "keep it private" in out
    assert f"zchat-nb serve --public --port 8100 --tls {tmp_path / 'c'}" in out


# -- TLS with client certificates -------------------------------------------------------------

integration = pytest.mark.integration


@integration
def test_students_with_certificates_chat(classroom: certs.Classroom, tls_server: zchat_nb.Server) -> None:
    with (
        zchat_nb.connect(tls_server.address, tls=classroom.bundles["alice"]) as alice,
        zchat_nb.connect(tls_server.address, tls=classroom.bundles["bob"], user="Bob B.") as bob,
    ):
        assert (alice.user, bob.user) == ("alice", "Bob B.")  # the certificate's name is the default
        alice_chat, bob_chat = alice.session("general"), bob.session("general")
        assert bob_chat.new_messages() == []
        sent = alice_chat.add_message("hello over TLS")
        assert bob_chat.new_messages(timeout=10) == [sent]
        answer = bob_chat.add_message("hi alice")
        seen = alice_chat.new_messages(timeout=10)  # her own, and bob's answer if it has arrived
        if len(seen) < 2:
            seen += alice_chat.new_messages(timeout=10)
        assert seen == [sent, answer]


@integration
def test_client_without_a_certificate_is_refused(
    classroom: certs.Classroom, tls_server: zchat_nb.Server
) -> None:
    no_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(classroom.ca))
    message = refused(tls_server.address, ssl=no_cert)
    assert "certificate" in message and "127.0.0.1" in message


@integration
def test_certificate_from_another_ca_is_refused_by_the_server(
    tmp_path: Path, classroom: certs.Classroom, tls_server: zchat_nb.Server
) -> None:
    other = certs.make_classroom(tmp_path / "other", ["mallory"])
    mallory = certs.load_bundle(other.bundles["mallory"])
    forged = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(classroom.ca))
    forged.load_cert_chain(mallory.cert, mallory.key)  # trusts the server, but not trusted by it
    assert "refused this client certificate" in refused(tls_server.address, ssl=forged)


@integration
def test_client_of_another_classroom_does_not_trust_the_server(
    tmp_path: Path, tls_server: zchat_nb.Server
) -> None:
    other = certs.make_classroom(tmp_path / "other", ["mallory"])
    message = refused(tls_server.address, tls=other.bundles["mallory"])
    assert "not signed by your ca.pem" in message


@integration
def test_plain_client_is_told_the_server_requires_tls(tls_server: zchat_nb.Server) -> None:
    message = refused(tls_server.address, timeout=1.0)
    assert "requires TLS" in message and "tls=" in message


@integration
def test_tls_client_is_told_a_plain_server_does_not_speak_tls(
    classroom: certs.Classroom, server: zchat_nb.Server
) -> None:
    assert "does not speak TLS" in refused(server.address, tls=classroom.bundles["alice"])


@integration
def test_address_the_server_certificate_does_not_name_is_refused(classroom: certs.Classroom) -> None:
    with zchat_nb.serve(host="127.0.0.2", tls=classroom.directory) as server:
        message = refused(server.address, tls=classroom.bundles["alice"])
    assert "does not name '127.0.0.2'" in message and "--server-name 127.0.0.2" in message


# -- zchat-nb serve --public / --tls, zchat-nb chat --tls -------------------------------------


class ServeCommand:
    """``zchat-nb serve ...`` in a child process; ``address`` is what it announced on --ready-fd."""

    def __init__(self, *args: str) -> None:
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zchat_nb", "serve", *args, "--ready-fd", str(write_fd)],
            pass_fds=(write_fd,),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(write_fd)
        try:
            line = _read_line(read_fd, 30.0)
        finally:
            os.close(read_fd)
        if not line:
            self.stop()
            raise AssertionError(f"zchat-nb serve {' '.join(args)} did not start: {self.proc.stderr}")
        self.announced = parse_address(line)

    def stop(self) -> str:
        """Stop it (SIGTERM) and return what it printed."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=20)
        return out


@integration
def test_serve_public_listens_on_all_interfaces_and_warns() -> None:
    served = ServeCommand("--public")
    try:
        host, port = served.announced
        assert host == "0.0.0.0"
        with zchat_nb.connect(("127.0.0.1", port), user="alice") as client:
            client.session("general").add_message("reached through 0.0.0.0")
    finally:
        out = served.stop()
    assert "listening on every network interface" in out
    assert "anyone who can reach this machine" in out and "--tls" in out
    assert f":{port}" in out.split("Students connect to", 1)[1].splitlines()[0]


@integration
def test_serve_tls_admits_certificates_only_and_chat_command_uses_a_bundle(
    classroom: certs.Classroom,
) -> None:
    served = ServeCommand("--tls", str(classroom.directory))
    try:
        address = served.announced
        assert address[0] == "127.0.0.1"
        assert "requires TLS" in refused(address, timeout=1.0)
        with zchat_nb.connect(address, tls=classroom.bundles["bob"]) as bob:
            reader = bob.session("general")
            typed = "hello from the terminal\n/quit\n"
            alice = str(classroom.bundles["alice"])
            chat = subprocess.run(
                [sys.executable, "-m", "zchat_nb", "chat", f"127.0.0.1:{address[1]}", "--tls", alice],
                input=typed,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert chat.returncode == 0, chat.stderr
            assert [(m.author, m.text) for m in reader.new_messages(timeout=10)] == [
                ("alice", "hello from the terminal")
            ]
    finally:
        served.stop()


def test_public_notice_names_the_address_and_the_risk() -> None:
    plain = public_notice(("0.0.0.0", 8100), tls=False)
    assert "anyone who can reach this machine on port 8100 can read and write this chat" in plain
    assert "zchat-nb chat " in plain and ":8100" in plain
    tls = public_notice(("0.0.0.0", 8100), tls=True)
    assert "--tls FOLDER" in tls and "anyone who can reach" not in tls
