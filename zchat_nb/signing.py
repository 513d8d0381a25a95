"""Names that cannot be forged: signing what a classroom client writes, and checking what others wrote.

A TLS certificate proves to the server that its holder belongs to the class; the server does not tie
a record to the connection that wrote it, and any client may write any author name. So a client
connected with its certificate folder (``connect(..., tls=FOLDER)``) signs every record it writes
(messages, edits, deletes, reactions) with the certificate's key, over
:func:`zchat_nb.amend.canonical` bytes (room, stream, fields). The certificate itself is stored once
per room (``Room.certs``, keyed by the SHA-256 of its PEM text), so a record carries only that
fingerprint and the signature.

Every reader holding the class CA checks a record: the stored certificate hashes to the fingerprint,
the CA issued it (signature and issuer name), it is a client certificate and not a CA, and the
record's signature verifies with its key. The record is *verified* when all of that holds and its
author is the certificate's common name. ``zchat-nb certs`` marks the teacher's certificate with
the organisational unit :data:`TEACHER_ROLE`; only the CA key can issue such a certificate.

What this does not do: revoke a certificate (a class hands out new ones), or stop a client from
removing records from the store (ZEO has no per-record rights): signatures make forgeries visible,
not writes impossible.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .amend import Identity
from .certs import TEACHER_ROLE

if TYPE_CHECKING:
    from .certs import Bundle

__all__ = ["MAX_CERT_CHARS", "Signer", "Verifier", "fingerprint"]

#: Longest certificate PEM a reader parses (ours are about 700 characters).
MAX_CERT_CHARS = 8192
_CACHE = 4096


def fingerprint(pem: str) -> str:
    """The key of a certificate in ``Room.certs``: SHA-256 of its PEM text, in hex."""
    return hashlib.sha256(pem.encode("ascii")).hexdigest()


def _identity(cert: Any) -> Identity | None:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return Identity(names[0].value, any(unit.value == TEACHER_ROLE for unit in units))


class Signer:
    """Signs records with a student's (or the teacher's) certificate key."""

    def __init__(self, bundle: Bundle) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        pem = bundle.cert.read_text(encoding="ascii")
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        key = serialization.load_pem_private_key(bundle.key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{bundle.key} is not an EC key; make the bundle with `zchat-nb certs`")
        identity = _identity(cert)
        if identity is None:
            raise ValueError(f"{bundle.cert} has no single common name")
        self.name, self.teacher = identity.name, identity.teacher
        self.cert_pem = pem
        self.fingerprint = fingerprint(pem)
        self._key = key

    def sign(self, data: bytes) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return base64.b64encode(self._key.sign(data, ec.ECDSA(hashes.SHA256()))).decode("ascii")

    def __repr__(self) -> str:
        return f"<Signer {self.name!r}{' (teacher)' if self.teacher else ''}>"


class Verifier:
    """Checks records against the class CA; caches certificates and recent results (thread-safe)."""

    def __init__(self, ca_pem: bytes) -> None:
        from cryptography import x509

        self._ca = x509.load_pem_x509_certificate(ca_pem)
        self._lock = threading.Lock()
        #: ``fingerprint -> (identity, public key)`` of certificates that checked out, or None.
        self._certs: dict[str, tuple[Identity, Any] | None] = {}
        self._results: OrderedDict[tuple[str, str, bytes], Identity | None] = OrderedDict()

    def identify(self, fingerprint: str, pem: object, data: bytes, signature: str) -> Identity | None:
        """Who signed ``data``, or None if the signature or the certificate does not check out."""
        checked = self._certificate(fingerprint, pem)
        if checked is None:
            return None
        identity, public_key = checked
        cache_key = (fingerprint, signature, hashlib.sha256(data).digest())
        with self._lock:
            if cache_key in self._results:
                self._results.move_to_end(cache_key)
                return self._results[cache_key]
        result = identity if _signature_ok(public_key, data, signature) else None
        with self._lock:
            self._results[cache_key] = result
            while len(self._results) > _CACHE:
                self._results.popitem(last=False)
        return result

    def _certificate(self, fp: str, pem: object) -> tuple[Identity, Any] | None:
        with self._lock:
            if fp in self._certs:
                return self._certs[fp]
        if not (isinstance(pem, str) and len(pem) <= MAX_CERT_CHARS and pem.isascii()):
            return None  # missing or not a certificate: not cached, the real one may come later
        if fingerprint(pem) != fp:
            return None
        checked = self._check_certificate(pem)
        with self._lock:
            self._certs[fp] = checked  # the fingerprint pins the PEM: the answer cannot change
        return checked

    def _check_certificate(self, pem: str) -> tuple[Identity, Any] | None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID

        try:
            cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
            cert.verify_directly_issued_by(self._ca)  # issuer name and the CA's signature
            if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                return None
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
                return None
            public_key = cert.public_key()
        except Exception:  # malformed, not ours, missing extensions: not verified
            return None
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            return None
        identity = _identity(cert)
        return None if identity is None else (identity, public_key)


def _signature_ok(public_key: Any, data: bytes, signature: str) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        raw = base64.b64decode(signature, validate=True)
        public_key.verify(raw, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
