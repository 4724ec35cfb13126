"""What every mode of ``im58d-bench`` shares: free ports, a daemon of the
bench's own (of this code or of another tree), a ``redis-server``, and
readings of a process's CPU time and memory."""

from __future__ import annotations

import base64
import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from ..admin import make_certificate
from .loadgen import cpu_seconds, device_id_of, percentile, rss_bytes

__all__ = [
    "CODE", "PASSWORD", "Daemon", "Redis", "cpu_seconds", "device_id_b64", "device_id_of",
    "free_port", "listening", "make_database", "percentile", "rss_bytes",
]

# the directory holding this im58d, so the daemon runs the same code
CODE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PASSWORD = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def device_id_b64(user: str) -> str:
    """The bench device id of ``user`` as the HTTP API takes it."""
    return base64.urlsafe_b64encode(device_id_of(user)).rstrip(b"=").decode("ascii")


def listening(process: subprocess.Popen[bytes], port: int, timeout: float = 60.0,
              every: float = 0.01) -> bool:
    """Whether ``process`` came to accept connections on loopback ``port``
    (False: it exited, or the time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            if process.poll() is not None:
                return False
            time.sleep(every)
    return False


# Run by the Python of the bench with the daemon's code first on the path, so
# that a daemon of another tree gets a database made by its own functions.
_MAKE_USERS = """\
import sys
from im58d.logic.passwords import hash_password
from im58d.store.accounts import add_user_txn
from im58d.store.sqlite import open_database
path, count, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]
db = open_database(path)
cheap = hash_password(password, n=16)
db.conn.execute("BEGIN")
for i in range(count):
    add_user_txn(db, f"bench{i}", cheap, 0)
db.conn.execute("COMMIT")
db.conn.close()
"""


def _env(code: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=code + os.pathsep + os.environ.get("PYTHONPATH", ""))


def make_database(path: str, users: int, code: str = CODE) -> None:
    """A fresh database at ``path`` with the users bench0, bench1, ... and the
    password ``bench``, made by the store functions of the im58d in ``code``.
    The bench accounts get a cheap scrypt cost: thousands of logins would
    otherwise measure scrypt, not the message path."""
    subprocess.run([sys.executable, "-c", _MAKE_USERS, path, str(users), PASSWORD],
                   env=_env(code), check=True)


class Daemon:
    """A daemon of the bench's own, ``twistd -n im58d`` of the im58d in
    ``code`` (this one by default), on a fresh database in a temporary
    directory (or, with ``database``, on another node's database: no users
    are added)."""

    def __init__(
        self, users: int, keep: bool = False, config: str | None = None, tls: bool = False,
        database: str | None = None, code: str = CODE,
    ) -> None:
        self.directory = tempfile.mkdtemp(prefix="im58d-bench-")
        self.keep = keep
        self.code = code
        if database is not None:
            self.database = database
        else:
            self.database = os.path.join(self.directory, "im58d.sqlite")
            make_database(self.database, users, code)
        self.port = free_port()
        self.http_port = free_port()
        self.access = ["--access", f"tcp:{self.port}:interface=127.0.0.1"]
        # with tls: a second access listener, ssl:, with a fresh self-signed cert
        self.tls_port = 0
        self.ca_cert = os.path.join(self.directory, "cert.pem")
        if tls:
            self.tls_port = free_port()
            key_pem, cert_pem = make_certificate(["127.0.0.1"], 1)
            key = os.path.join(self.directory, "key.pem")
            with open(key, "wb") as f:
                f.write(key_pem)
            with open(self.ca_cert, "wb") as f:
                f.write(cert_pem)
            self.access += ["--access", f"ssl:{self.tls_port}:interface=127.0.0.1"
                                        f":privateKey={key}:certKey={self.ca_cert}"]
        self.config = config
        self.log = open(os.path.join(self.directory, "daemon.log"), "ab")
        self.process: subprocess.Popen[bytes]
        self.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> None:
        """Start the daemon (again) on its database and ports; returns once
        it accepts connections."""
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile", "", "im58d",
             *(["--config", self.config] if self.config else []),
             "--database", self.database, *self.access,
             "--http", f"tcp:{self.http_port}:interface=127.0.0.1"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.directory, env=_env(self.code),
        )
        if not listening(self.process, self.port):
            self.keep = True
            raise SystemExit(f"im58d-bench: the daemon did not start; see {self.log.name}")

    def stop(self) -> None:
        """SIGTERM, and wait until the daemon has exited."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)

    def metrics(self) -> dict[str, float]:
        """The daemon's ``GET /metrics`` (loopback needs no token), sample by
        sample: ``{'im58d_redis_up': 1.0, ...}``."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode("utf-8")
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def output(self) -> bytes:
        """What the daemon wrote so far."""
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read()

    def close(self) -> None:
        self.stop()
        self.log.close()
        if not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)


class Redis:
    """A ``redis-server`` of the bench's own: a free loopback port, no
    persistence, its directory a temporary one."""

    def __init__(self, keep: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("im58d-bench: cluster mode needs redis-server on PATH "
                             "(apt-get install redis-server)")
        self.directory = tempfile.mkdtemp(prefix="im58d-bench-redis-")
        self.keep = keep
        self.port = free_port()
        self.log = open(os.path.join(self.directory, "redis.log"), "wb")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.directory],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.directory,
        )
        self.pid = self.process.pid
        if listening(self.process, self.port):
            return
        self.close()
        raise SystemExit(f"im58d-bench: redis-server did not start; see {self.log.name}")

    def node_config(self, base: str | None) -> str:
        """A node's config file: ``base`` (or the defaults) with ``[routing]
        backend = redis`` on this server; written to this directory."""
        config = configparser.ConfigParser(
            interpolation=None, inline_comment_prefixes=(";",), default_section="\0none")
        config.optionxform = str  # type: ignore[assignment,method-assign]
        if base is not None:
            with open(base, encoding="utf-8") as f:
                config.read_file(f, base)
        if not config.has_section("routing"):
            config.add_section("routing")
        config["routing"]["backend"] = "redis"
        config["routing"]["redis"] = f"tcp:127.0.0.1:{self.port}"
        path = os.path.join(self.directory, "node.ini")
        with open(path, "w", encoding="utf-8") as f:
            config.write(f)
        return path

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.log.close()
        if not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)
