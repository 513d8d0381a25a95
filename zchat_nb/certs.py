"""Certificates for a classroom server: one CA, a server certificate, a client certificate per student.

ZEO 6 authenticates clients only through TLS client certificates: a server started with TLS
requires every client to present a certificate signed by the CA it trusts. :func:`make_classroom`
(``zchat-nb certs DIR --student alice ...``) makes everything a class needs::

    DIR/
      ca.pem  ca.key          the classroom CA; ca.key signs new students: keep it private
      server/                 what `zchat-nb serve --tls DIR` (or serve(tls=DIR)) loads
        ca.pem  server.pem  server.key
      students/alice/         hand this folder to alice; she runs
        ca.pem  alice.pem  alice.key      `zchat-nb chat HOST:PORT --tls alice` or connect(..., tls="alice")

Running it again on the same directory keeps the CA and every bundle already made, adds the new
students, and re-issues the server certificate only if it must name new hosts.

A certificate proves that its holder belongs to the class, not who they are in the chat: the
server does not tie a message's author to the certificate that sent it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .exceptions import ZChatError
from .net import outward_ip

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "Bundle",
    "Classroom",
    "client_context",
    "describe_classroom",
    "load_bundle",
    "make_classroom",
    "read_names",
    "server_context",
    "this_machine_names",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_DIR = "server"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
STUDENTS_DIR = "students"
DEFAULT_DAYS = 365
ALWAYS_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    """A student name usable as a file name and a certificate CN, or :class:`ZChatError` saying why."""
    name = name.strip()
    if not _NAME.match(name) or name in (SERVER_DIR, "ca"):
        raise ZChatError(
            f"bad student name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit (and not {SERVER_DIR!r} or 'ca')"
        )
    return name


def read_names(path: str | os.PathLike[str]) -> list[str]:
    """Student names from a text file: one a line; blank lines and ``#`` comments are skipped."""
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(check_name(line))
    return names


# -- making certificates ---------------------------------------------------------------------


@dataclass
class Classroom:
    """What :func:`make_classroom` made or found."""

    directory: Path
    server_names: list[str]
    #: ``name -> bundle folder`` for every student (and the teacher), old and new.
    bundles: dict[str, Path] = field(default_factory=dict)
    #: Files written by this call.
    created: list[Path] = field(default_factory=list)

    @property
    def ca(self) -> Path:
        return self.directory / CA_CERT

    @property
    def server_dir(self) -> Path:
        return self.directory / SERVER_DIR


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data``; a private key is created 0600 (never readable by others, even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(
    subject_cn: str,
    key: Any,
    *,
    issuer: x509.Certificate | None,
    issuer_key: Any,
    days: int,
    ca: bool = False,
    server_names: Iterable[str] = (),
    client: bool = False,
) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zchat_nb classroom"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate a slightly slow clock
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    names = list(server_names)
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _san_names(cert: x509.Certificate) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.IPAddress)] + list(
        san.get_values_for_type(x509.DNSName)
    )


def _check_server_name(name: str) -> str:
    name = name.strip()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not name or not all(
        re.match(r"^(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)$", lb) for lb in labels
    ):
        raise ZChatError(f"bad server name {name!r}: give a host name (class.example.org) or an IP address")
    return name.rstrip(".").lower()


def make_classroom(
    directory: str | os.PathLike[str],
    students: Iterable[str] = (),
    server_names: Iterable[str] = (),
    *,
    teacher: str | None = "teacher",
    days: int = DEFAULT_DAYS,
) -> Classroom:
    """Create (or extend) a classroom directory: a CA, a server certificate, one bundle per student.

    Parameters
    ----------
    directory
        Where to put everything (see the module docstring for the layout); created if missing.
    students
        Names of the students; each gets ``students/NAME/{ca.pem,NAME.pem,NAME.key}``.
    server_names
        Host names and IP addresses students will type to reach the server, besides
        ``localhost``, ``127.0.0.1`` and ``::1``, which are always in the server certificate.
    teacher
        A bundle made for the teacher as well (None: none).
    days
        How long new certificates stay valid.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    root = Path(directory)
    names = [check_name(n) for n in students]
    if teacher is not None:
        names.append(check_name(teacher))
    names = list(dict.fromkeys(names))
    wanted = list(dict.fromkeys([*ALWAYS_SERVER_NAMES, *(_check_server_name(n) for n in server_names)]))
    made = Classroom(root, wanted)
    root.mkdir(parents=True, exist_ok=True)

    ca_cert_path, ca_key_path = root / CA_CERT, root / CA_KEY
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    else:
        ca_key = _new_key()
        ca_cert = _issue(
            f"zchat_nb classroom CA {root.resolve().name}",
            ca_key,
            issuer=None,
            issuer_key=ca_key,
            days=max(days, 2 * DEFAULT_DAYS),
            ca=True,
        )
        _write(ca_key_path, _key_pem(ca_key), private=True)
        _write(ca_cert_path, _cert_pem(ca_cert), private=False)
        made.created += [ca_cert_path, ca_key_path]
    ca_pem = ca_cert_path.read_bytes()

    server = root / SERVER_DIR
    cert_path, key_path = server / SERVER_CERT, server / SERVER_KEY
    current: list[str] = []
    if cert_path.exists() and key_path.exists() and (server / CA_CERT).read_bytes() == ca_pem:
        current = _san_names(x509.load_pem_x509_certificate(cert_path.read_bytes()))
    if not set(wanted) <= set(current):
        all_names = list(dict.fromkeys([*current, *wanted]))
        key = _new_key()
        cn = next((n for n in all_names if n not in ALWAYS_SERVER_NAMES), "localhost")
        cert = _issue(cn, key, issuer=ca_cert, issuer_key=ca_key, days=days, server_names=all_names)
        _write(key_path, _key_pem(key), private=True)
        _write(cert_path, _cert_pem(cert), private=False)
        _write(server / CA_CERT, ca_pem, private=False)
        made.created += [cert_path, key_path, server / CA_CERT]
        made.server_names = all_names
    else:
        made.server_names = current

    students_dir = root / STUDENTS_DIR
    for name in names:
        bundle = students_dir / name
        made.bundles[name] = bundle
        if (bundle / f"{name}.pem").exists() and (bundle / f"{name}.key").exists():
            continue
        key = _new_key()
        cert = _issue(name, key, issuer=ca_cert, issuer_key=ca_key, days=days, client=True)
        _write(bundle / f"{name}.key", _key_pem(key), private=True)
        _write(bundle / f"{name}.pem", _cert_pem(cert), private=False)
        _write(bundle / CA_CERT, ca_pem, private=False)
        made.created += [bundle / f"{name}.pem", bundle / f"{name}.key"]
    if students_dir.is_dir():
        for other in sorted(students_dir.iterdir()):
            if other.is_dir() and (other / f"{other.name}.pem").exists():
                made.bundles.setdefault(other.name, other)
    return made


def this_machine_names() -> list[str]:
    """Names students may type for this machine: its outward IP address and its host name."""
    names = []
    for candidate in (outward_ip(), socket.gethostname()):
        with contextlib.suppress(ZChatError):  # a host name that is no DNS name: leave it out
            names.append(_check_server_name(candidate))
    return names


def describe_classroom(made: Classroom) -> str:
    """What ``zchat-nb certs`` prints: what was made, and what to hand whom."""
    root = made.directory
    host = next((n for n in made.server_names if n not in ALWAYS_SERVER_NAMES), "HOST")
    lines = [
        f"zchat-nb: classroom certificates in {root} ({len(made.created)} new files)",
        f"  CA         {root / CA_CERT}; {root / CA_KEY} signs new students: keep it private",
        f"  server     {made.server_dir}/  names: {', '.join(made.server_names)}",
        f"             serve with: zchat-nb serve --public --port 8100 --tls {root}",
        "  Hand each student their whole folder (the NAME.key in it is theirs alone):",
    ]
    width = max((len(n) for n in made.bundles), default=0)
    for name, folder in sorted(made.bundles.items()):
        lines.append(f"    {name:<{width}}  {folder}/")
    lines += [
        "  A student with the folder `alice` joins with:",
        f"    zchat-nb chat {host}:8100 --tls alice",
        f'    or in Python: zchat_nb.connect("{host}:8100", tls="alice")',
        f"  The teacher's tools take --tls {root / STUDENTS_DIR / 'teacher'} "
        f"(zchat-nb export ROOM --address {host}:8100 --tls ...).",
    ]
    return "\n".join(lines)


# -- using them ------------------------------------------------------------------------------


def server_context(directory: str | os.PathLike[str]) -> ssl.SSLContext:
    """The TLS context of a classroom server: its certificate, and client certificates required.

    ``directory`` is the classroom directory or its ``server/`` folder.
    """
    root = Path(directory)
    folder = root / SERVER_DIR if (root / SERVER_DIR / SERVER_CERT).exists() else root
    cert, key, ca = folder / SERVER_CERT, folder / SERVER_KEY, folder / CA_CERT
    missing = [p.name for p in (cert, key, ca) if not p.exists()]
    if missing:
        raise ZChatError(
            f"{root} is not a classroom directory (missing {', '.join(missing)}); "
            f"make one with `zchat-nb certs {root} --student NAME`"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    context.verify_mode = ssl.CERT_REQUIRED  # ZEO's only authentication: no certificate, no entry
    return context


@dataclass(frozen=True)
class Bundle:
    """One student's files: the classroom CA, their certificate and their key."""

    name: str
    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """Trust only the classroom CA, check the server's name, and present this certificate."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


def load_bundle(directory: str | os.PathLike[str], student: str | None = None) -> Bundle:
    """Find a student's bundle: a bundle folder, or a classroom directory and the student's name.

    In a bundle folder holding one certificate, ``student`` may be omitted (or be any display name).
    """
    root = Path(directory)
    if not root.is_dir():
        raise ZChatError(f"no certificate folder at {root}; ask your teacher for yours (`zchat-nb certs`)")
    if (root / STUDENTS_DIR).is_dir():
        available = sorted(p.name for p in (root / STUDENTS_DIR).iterdir() if p.is_dir())
        if student is None or student not in available:
            raise ZChatError(
                f"{root} is a classroom directory: name a student ({', '.join(available) or 'none yet'}), "
                f"or give that student's folder, {root / STUDENTS_DIR}/NAME"
            )
        root = root / STUDENTS_DIR / student
    certs = sorted(p for p in root.glob("*.pem") if p.name != CA_CERT and p.with_suffix(".key").exists())
    if student is not None and (root / f"{student}.pem").exists() and (root / f"{student}.key").exists():
        cert = root / f"{student}.pem"
    elif len(certs) == 1:
        cert = certs[0]
    else:
        found = ", ".join(p.stem for p in certs) or "none"
        raise ZChatError(
            f"{root} should hold ca.pem, NAME.pem and NAME.key for one student; certificates found: {found}"
        )
    if not (root / CA_CERT).exists():
        raise ZChatError(f"{root} has no {CA_CERT}: copy the whole folder your teacher gave you")
    return Bundle(cert.stem, root / CA_CERT, cert, cert.with_suffix(".key"))


def client_context(directory: str | os.PathLike[str], student: str | None = None) -> ssl.SSLContext:
    """The TLS context of ``student``'s client (see :func:`load_bundle` for ``directory``)."""
    return load_bundle(directory, student).client_context()
