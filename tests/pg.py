"""A throwaway PostgreSQL cluster for tests and benchmarks: ``initdb`` + ``pg_ctl`` in a temp dir.

PostgreSQL refuses to run as root, so when we are root the binaries run as the ``postgres``
user (``setpriv``) and the data directory is handed to that user. The binaries are found in
``$ZCHAT_PG_BIN``, else the newest ``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql``
package), else on ``$PATH``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PostgresCluster", "find_pg_bin"]

PASSWORD = "s3cr3t-p@ss:w/rd"  # has the characters a URI must percent-encode


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None if PostgreSQL is not installed."""
    env = os.environ.get("ZCHAT_PG_BIN")
    candidates = [Path(env)] if env else []
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    candidates += debian
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """One PostgreSQL server on 127.0.0.1 and a Unix socket, data in a temp dir; ``stop()`` removes it."""

    def __init__(self, bin_dir: Path, user: str = "zchat", password: str = PASSWORD) -> None:
        self.bin = bin_dir
        self.user = user
        self.password = password
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="zchat-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "postgres.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups"]
        self._run("mkdir", "-p", str(self.data), str(self.socket_dir))
        pwfile = self.root / "pwfile"
        self._run("sh", "-c", f"umask 077; cat > {pwfile}", input=password)
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", user, "--pwfile", str(pwfile),
            "-A", "scram-sha-256", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        self.start()

    def _run(self, *cmd: str, input: str | None = None) -> str:
        env = {**os.environ, "PGPASSWORD": self.password}
        done = subprocess.run(
            [*self._as, *cmd], input=input, capture_output=True, text=True, timeout=120, check=False, env=env
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout

    def start(self) -> None:
        # fsync=off only risks data on an OS crash; synchronous_commit stays on, because a crash of
        # PostgreSQL itself (the restart tests) must not lose commits it acknowledged.
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} "
            "-c fsync=off -c full_page_writes=off -c max_connections=300"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash: no checkpoint, clients cut off)."""
        with contextlib.suppress(RuntimeError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its ``postgresql://`` URI (TCP, with the password)."""
        where = ["-h", str(self.socket_dir), "-p", str(self.port), "-U", self.user]
        self._run(str(self.bin / "createdb"), *where, name)
        return self.uri(name)

    def uri(self, dbname: str) -> str:
        from urllib.parse import quote

        return f"postgresql://{self.user}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{dbname}"

    def socket_uri(self, dbname: str) -> str:
        from urllib.parse import quote

        return (
            f"postgresql://{self.user}:{quote(self.password, safe='')}@/{dbname}"
            f"?host={quote(str(self.socket_dir), safe='')}&port={self.port}"
        )

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
