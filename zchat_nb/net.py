"""Addresses and sockets: parse and print ``host:port``, probe a server, tell why TLS to it fails.

An address is ``(host, port)`` for TCP, or a path (a ``str``) for a Unix socket: ZEO serves and
connects to both. The local default listens on a Unix socket in its ``0700`` data directory, where
only its user can connect; written, a socket address is ``unix:PATH``.

Everything here works on plain sockets, below ZEO: :func:`probe` and :func:`check_tls` connect once,
read the server's greeting (ZEO's first, length-prefixed message) and close, so that a client can
say in words what is wrong before ZEO's ``ClientStorage`` starts retrying in the background.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl

from .exceptions import ZChatConnectionError

__all__ = [
    "Address",
    "check_tls",
    "format_address",
    "open_socket",
    "outward_ip",
    "parse_address",
    "probe",
    "read_greeting",
    "speaks_tls",
]

Address = tuple[str, int] | str
UNIX_PREFIX = "unix:"
#: Longest greeting read whole; ZEO's is its protocol version, a few bytes.
_MAX_GREETING = 64


def parse_address(address: object) -> Address:
    """Turn ``(host, port)``, ``"host:port"`` or ``"port"`` into ``(host, port)``; ``"unix:PATH"``
    (or an absolute path) into the path of a Unix socket."""
    how = 'give ("127.0.0.1", 8100), "127.0.0.1:8100" or "unix:/path/to/socket"'
    if isinstance(address, os.PathLike):
        address = os.fspath(address)
    if isinstance(address, str) and (address.startswith(UNIX_PREFIX) or address.startswith("/")):
        path = address[len(UNIX_PREFIX) :] if address.startswith(UNIX_PREFIX) else address
        if not path.startswith("/"):
            raise ZChatConnectionError(f"bad socket address {address!r}: give an absolute path")
        return path
    if isinstance(address, str):
        host, sep, port_text = address.strip().rpartition(":")
        if not sep:
            host = "127.0.0.1"
        host = host.strip("[]") or "127.0.0.1"
        try:
            port = int(port_text)
        except ValueError:
            raise ZChatConnectionError(f"bad server address {address!r}: {how}") from None
    elif isinstance(address, (tuple, list)) and len(address) == 2:
        host, port = address
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
            raise ZChatConnectionError(f"bad server address {address!r}: {how}")
    else:
        raise ZChatConnectionError(f"bad server address {address!r}: {how}")
    if not 0 < port < 65536:
        raise ZChatConnectionError(f"bad port {port} in server address {address!r}: {how}")
    return host, port


def format_address(address: Address) -> str:
    """``host:port``, with an IPv6 host in brackets; ``unix:PATH`` for a Unix socket."""
    if isinstance(address, str):
        return UNIX_PREFIX + address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_greeting(sock: socket.socket) -> bytes:
    """Read ZEO's first message (length-prefixed) whole, or what came of it.

    Closing a connection with the greeting unread sends a RST, which ZEO logs as an error
    ("Disconnected ConnectionResetError") in the server's process.
    """
    header = _read_exactly(sock, 4)
    size = int.from_bytes(header, "big") if len(header) == 4 else 0
    return header + (_read_exactly(sock, size) if size <= _MAX_GREETING else b"")


def open_socket(address: Address, timeout: float) -> socket.socket:
    """A connected socket to ``address`` (TCP or Unix)."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection(address, timeout=timeout)


def probe(address: Address, timeout: float = 2.0) -> bool:
    """Whether something accepts connections at ``address``."""
    try:
        with open_socket(address, timeout) as sock:
            sock.settimeout(min(timeout, 0.5))  # a TLS server says nothing first: do not wait long
            with contextlib.suppress(OSError):
                read_greeting(sock)
            return True
    except OSError:
        return False


def outward_ip() -> str:
    """This machine's address on its network, as students should type it; sends no packet."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # Connecting a UDP socket only picks the route (to a documentation address, RFC 5737).
        sock.connect(("192.0.2.1", 9))
        ip = str(sock.getsockname()[0])
        if not ip.startswith(("127.", "0.")):
            return ip
    with contextlib.suppress(OSError):
        for ip in socket.gethostbyname_ex(socket.gethostname())[2]:
            if not ip.startswith("127."):
                return str(ip)
    return "127.0.0.1"


# -- telling what is wrong with TLS -----------------------------------------------------------

_REFUSED_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate and none was given",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused this client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the server refused this client certificate: another CA issued it",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server refused this client certificate: it has expired",
    "TLSV1_ALERT_DECRYPT_ERROR": "the server refused this client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the server refused the TLS handshake (no or wrong client certificate?)",
}


def check_tls(
    address: Address,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    timeout: float = 5.0,
) -> None:
    """Open one TLS connection as a client with ``context`` would; raise what is wrong in words.

    Raises :class:`ZChatConnectionError` if nothing listens, the server does not speak TLS, its
    certificate is not trusted, or it refuses ours (TLS 1.3 tells a client that only after the
    handshake, so this waits for the server's first ZEO message).
    """
    host = "localhost" if isinstance(address, str) else address[0]
    where = format_address(address)
    try:
        raw = open_socket(address, timeout)
    except OSError as exc:
        raise ZChatConnectionError(
            f"no ZEO server answers at {where}; check the address and that the teacher's "
            "`zchat-nb serve --tls DIR` runs"
        ) from exc
    try:
        with context.wrap_socket(raw, server_hostname=server_hostname or host) as tls:
            tls.settimeout(timeout)
            greeting = read_greeting(tls)
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            why = (
                f"the server's certificate does not name {host!r}; connect with a name it has, or remake "
                f"the certificates with `zchat-nb certs DIR --server-name {host}`"
            )
        else:
            why = (
                f"the server's certificate is not signed by your ca.pem ({exc.verify_message}); "
                "use the folder your teacher made for this server"
            )
        raise ZChatConnectionError(f"TLS to {where} failed: {why}") from exc
    except ssl.SSLError as exc:
        reason = exc.reason or ""
        if reason in _REFUSED_REASONS:
            why = _REFUSED_REASONS[reason]
        elif reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            why = "the server does not speak TLS; connect without tls"
        else:
            why = f"{reason or exc}"
        raise ZChatConnectionError(f"TLS to {where} failed: {why}") from exc
    except TimeoutError as exc:
        raise ZChatConnectionError(
            f"TLS to {where} failed: no answer within {timeout:g} s (is it a zchat_nb server?)"
        ) from exc
    except OSError as exc:  # reset or closed mid-handshake
        raise ZChatConnectionError(
            f"TLS to {where} failed: the server closed the connection ({exc}); "
            "it refused this client certificate, or does not speak TLS"
        ) from exc
    finally:
        raw.close()
    if not greeting:
        raise ZChatConnectionError(
            f"TLS to {where} failed: the server closed the connection after the handshake; "
            "it refused this client certificate"
        )


def speaks_tls(address: Address, timeout: float = 2.0) -> bool:
    """Whether the server at ``address`` answers a TLS handshake (checks no certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            open_socket(address, timeout) as raw,
            context.wrap_socket(raw, server_hostname="localhost" if isinstance(address, str) else address[0]),
        ):
            return True
    except ssl.SSLError as exc:
        return "ALERT" in (exc.reason or "")  # it speaks TLS, and refused us in it
    except OSError:
        return False
