"""Real PostgreSQL and mosquitto servers for the test session, on 127.0.0.1 and free ports.

The test command (``scripts/test.sh``) installs the Debian packages when they are
missing; this module starts private instances in temporary directories and stops them
at the end of the session. As root, PostgreSQL runs as the ``postgres`` user (initdb
refuses root). A missing binary fails the test that needs it, with the reason; it never
skips.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _pg_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if not candidates:
        raise RuntimeError(
            "PostgreSQL server binaries not found (apt-get install -y postgresql); "
            "run the suite with scripts/test.sh, which installs them"
        )
    return Path(candidates[0]).parent


@dataclass
class Postgres:
    port: int
    datadir: Path
    bindir: Path
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.datadir / "data"), *args],
                       check=check, capture_output=True, timeout=90)

    def start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.datadir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._ctl("-l", str(self.datadir / "pg.log"), "-w", "-t", "60", "-o", opts, "start")
        wait_for_port(self.port)

    def pause(self) -> None:
        """Stop the server but keep its data: a database outage. ``fast`` shuts down
        with a checkpoint: with synchronous_commit=off an immediate stop may lose the
        last commits, which a test would misread as ctid losing data."""
        self._ctl("-m", "fast", "-w", "stop")

    def stop(self) -> None:
        self._ctl("-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.datadir, ignore_errors=True)


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    bindir = _pg_bindir()
    tmp = Path(tempfile.mkdtemp(prefix="ctid-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(tmp / "data"), "-U", "postgres",
         "-A", "trust", "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True, timeout=120,
    )
    server = Postgres(port, tmp, bindir, as_user)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass
class Mosquitto:
    port: int
    proc: subprocess.Popen[bytes]
    confdir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.confdir, ignore_errors=True)


def start_mosquitto(port: int | None = None) -> Mosquitto:
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if binary is None:
        raise RuntimeError("mosquitto not found (apt-get install -y mosquitto); run scripts/test.sh")
    port = port or free_port()
    tmp = Path(tempfile.mkdtemp(prefix="ctid-mqtt-", dir="/tmp"))
    tmp.chmod(0o755)
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    broker = Mosquitto(port, proc, tmp)
    try:
        wait_for_port(port)
    except Exception:
        broker.stop()
        raise
    return broker
