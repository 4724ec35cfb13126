"""``im58d-bench``: measure the daemon on the message path (not a test).

It starts a daemon of its own on a fresh database (or targets a running one),
logs in client pairs and makes every sender keep ``--window`` messages in
flight through the full six-packet flow (MSG_R → MSG_A, MSG_N → ACK_R →
ACK_A, ACK_N), then prints:

- delivered messages per second, p50/p99 latency from MSG_R to MSG_N;
- application-layer wire bytes per delivered message (both directions);
- server CPU microseconds per delivered message (from /proc/PID/stat);

at full load and paced (``--rate`` messages per second), the bytes of the
six packets of "你好" on a fresh database, in idle mode the server's
resident memory per logged-in connection that only heartbeats, and, in
connect mode, the round trips, bytes and time of a LOGIN and of a RESUME over
TCP, TLS 1.3 and TLS 1.2 (with and without TLS session resumption).

Cluster mode (not part of ``all``: it needs ``redis-server``) runs the full
and paced loads on two nodes behind a Redis of its own, every message from a
sender on one node to a receiver on the other, and the same pairs on one
node for comparison.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import hashlib
import hmac
import json
import os
import random
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from .admin import make_certificate
from .client.cache import Cache
from .client.report import Reporter, ReportState
from .client.sync import Sync
from .logic.passwords import hash_password
from .store.accounts import add_user_txn, create_group_txn, make_friends_txn, uid_for_name_txn
from .store.lists import add_category_txn
from .store.sqlite import open_database
from .wire import Decoder, encode, frame
from .wire import packets as P

# the directory holding this im58d, so the daemon runs the same code
_CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "bench"
BODY = "你好"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def listening(process: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> bool:
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
            time.sleep(0.05)
    return False


class Daemon:
    """A daemon of the bench's own, on a fresh database in a temporary directory
    (or, with ``database``, on another node's database: no users are added)."""

    def __init__(
        self, users: int, keep: bool = False, config: str | None = None, tls: bool = False,
        database: str | None = None,
    ) -> None:
        self.directory = tempfile.mkdtemp(prefix="im58d-bench-")
        self.keep = keep
        if database is not None:
            self.database = database
        else:
            self.database = os.path.join(self.directory, "im58d.sqlite")
            db = open_database(self.database)
            # Bench accounts get a cheap scrypt cost: thousands of logins would
            # otherwise measure scrypt, not the message path.
            cheap = hash_password(PASSWORD, n=16)
            db.conn.execute("BEGIN")
            for i in range(users):
                add_user_txn(db, f"bench{i}", cheap, 0)
            db.conn.execute("COMMIT")
            db.conn.close()
        self.port = free_port()
        self.http_port = free_port()
        access = ["--access", f"tcp:{self.port}:interface=127.0.0.1"]
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
            access += ["--access", f"ssl:{self.tls_port}:interface=127.0.0.1"
                                   f":privateKey={key}:certKey={self.ca_cert}"]
        self.log = open(os.path.join(self.directory, "daemon.log"), "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile", "", "im58d", *(["--config", config] if config else []),
             "--database", self.database,
             *access,
             "--http", f"tcp:{self.http_port}:interface=127.0.0.1"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.directory,
            env=dict(os.environ, PYTHONPATH=_CODE + os.pathsep + os.environ.get("PYTHONPATH", "")),
        )
        self.pid = self.process.pid
        if not listening(self.process, self.port):
            raise SystemExit(f"im58d-bench: the daemon did not start; see {self.log.name}")

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
        self.process.terminate()
        self.process.wait(30)
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


class Meter:
    """Counters shared by every bench connection."""

    def __init__(self) -> None:
        self.bytes = 0
        self.delivered = 0
        self.latencies: list[float] = []
        self.recording = False
        self.duplicates = 0  # MSG_Ns of a seq the receiver had already seen

    def reset(self) -> None:
        self.bytes = 0
        self.delivered = 0
        self.latencies = []
        self.duplicates = 0


class Conn(Protocol):
    """A lean bench client: prebuilt frames, only the packets it needs."""

    def __init__(self, meter: Meter, user: str, logged_in: defer.Deferred[Conn]) -> None:
        self.meter = meter
        self.user = user
        self.logged_in = logged_in
        self.decoder = Decoder()
        self.uid = 0
        self.peer: Conn | None = None
        self.sent_at: deque[float] = deque()  # MSG_R times, for the receiver's latency
        self.last_seq = 0  # the highest MSG_N seq received
        self.next_cmid = 1
        self.in_flight = 0
        self.window = 0
        self.ack_each = True
        self.on_ack_n: Callable[[Conn], None] | None = None
        self.log: list[bytes] | None = None  # raw frames, for the bytes report

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.setTcpNoDelay(True)
        transport.write(encode(P.Login(self.user, PASSWORD, "bench")))

    def write(self, data: bytes) -> None:
        if self.meter.recording:
            self.meter.bytes += len(data)
        if self.log is not None:
            self.log.append(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def send_message(self) -> None:
        peer = self.peer
        assert peer is not None
        cmid = self.next_cmid
        self.next_cmid += 1
        self.in_flight += 1
        peer.sent_at.append(time.perf_counter())
        self.write(frame(P.MSG_R, (cmid, peer.uid, BODY)))

    def dataReceived(self, data: bytes) -> None:
        meter = self.meter
        if meter.recording:
            meter.bytes += len(data)
        if self.log is not None:
            self.log.append(data)
        ack = 0
        packet: Any
        for packet in self.decoder.feed(data):
            kind = type(packet)
            if kind is P.MsgN:
                if packet.seq > self.last_seq:
                    self.last_seq = packet.seq
                    now = time.perf_counter()
                    sent = self.sent_at.popleft() if self.sent_at else now
                    if meter.recording:
                        meter.delivered += 1
                        meter.latencies.append(now - sent)
                else:  # sent again: acked again, not counted
                    meter.duplicates += 1
                if self.ack_each:
                    self.write(frame(P.ACK_R, (packet.seq,)))
                else:
                    ack = packet.seq
            elif kind is P.AckN:
                self.in_flight -= 1
                if self.on_ack_n is not None:
                    self.on_ack_n(self)
            elif kind is P.Welcome:
                self.uid = packet.uid
                self.logged_in.callback(self)
            elif kind is P.Error:
                error = f"{self.user}: ERROR {packet.code} {packet.message}"
                if not self.logged_in.called:
                    self.logged_in.errback(RuntimeError(error))
                else:
                    print(f"im58d-bench: {error}", file=sys.stderr)
        if ack:
            self.write(frame(P.ACK_R, (ack,)))


async def connect(reactor: Any, meter: Meter, port: int, user: str) -> Conn:
    logged_in: defer.Deferred[Conn] = defer.Deferred()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await connectProtocol(endpoint, Conn(meter, user, logged_in))
    return await logged_in


async def pairs_of(reactor: Any, meter: Meter, port: int, count: int,
                   other_port: int | None = None) -> list[Conn]:
    """``count`` senders (bench0, bench2, ...) logged in with their receivers
    (bench1, bench3, ...).  With ``other_port`` every pair is split between
    the two ports: the even pairs' senders on ``port`` and receivers on
    ``other_port``, the odd pairs the other way round."""
    senders = []
    for i in range(count):
        to = port if other_port is None else other_port
        sender_port, receiver_port = (port, to) if i % 2 == 0 else (to, port)
        sender, receiver = await defer.gatherResults([
            defer.Deferred.fromCoroutine(
                connect(reactor, meter, sender_port, f"bench{2 * i}")),
            defer.Deferred.fromCoroutine(
                connect(reactor, meter, receiver_port, f"bench{2 * i + 1}")),
        ])
        sender.peer = receiver
        senders.append(sender)
    return senders


async def six_packets(reactor: Any, meter: Meter, sender: Conn) -> dict[str, Any]:
    """The bytes of one "你好" through all six packets (the first message of a
    fresh database)."""
    receiver = sender.peer
    assert receiver is not None
    sender.log, receiver.log = [], []
    done: defer.Deferred[None] = defer.Deferred()
    sender.on_ack_n = lambda conn: done.callback(None)
    sender.send_message()
    await done
    await task.deferLater(reactor, 0.2)  # let ACK_A arrive
    sender.on_ack_n = None
    frames = b"".join(sender.log) + b"".join(receiver.log)
    sender.log = receiver.log = None
    return {"bytes": len(frames), "hex": frames.hex()}


def _cpu(pids: Sequence[int]) -> list[float]:
    return [cpu_seconds(pid) for pid in pids]


async def load(
    reactor: Any, meter: Meter, senders: list[Conn], daemon_pid: int | Sequence[int] | None,
    window: int, rate: float | None, warmup: float, duration: float, ack_each: bool,
    redis_pid: int | None = None,
) -> dict[str, Any]:
    """Run the flow for warmup + duration seconds; measure over the duration.

    The server's CPU is summed over ``daemon_pid`` (several pids: the nodes
    of a cluster, each one's share in ``node_cpu_cores``); Redis's CPU, with
    ``redis_pid``, is reported apart."""
    if daemon_pid is None:
        pids: list[int] = []
    elif isinstance(daemon_pid, int):
        pids = [daemon_pid]
    else:
        pids = list(daemon_pid)

    def refill(conn: Conn) -> None:
        while conn.in_flight < conn.window:
            conn.send_message()

    pacer = None
    for conn in senders:
        conn.window = window
        conn.ack_each = ack_each
        assert conn.peer is not None
        conn.peer.ack_each = ack_each
    if rate is None:
        for conn in senders:
            conn.on_ack_n = refill
            refill(conn)
    else:
        tick = 0.005
        due = [0.0]
        turn = iter(range(1 << 62))

        def pace() -> None:
            due[0] += rate * tick
            while due[0] >= 1:
                conn = senders[next(turn) % len(senders)]
                if conn.in_flight < 1000:
                    conn.send_message()
                due[0] -= 1

        pacer = task.LoopingCall(pace)
        pacer.clock = reactor
        pacer.start(tick)
    await task.deferLater(reactor, warmup)
    meter.reset()
    meter.recording = True
    cpu0 = _cpu(pids)
    redis0 = cpu_seconds(redis_pid) if redis_pid else 0.0
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await task.deferLater(reactor, duration)
    elapsed = time.perf_counter() - t0
    meter.recording = False
    cpu1 = _cpu(pids)
    redis1 = cpu_seconds(redis_pid) if redis_pid else 0.0
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    if pacer is not None:
        pacer.stop()
    for conn in senders:
        conn.on_ack_n = None
        conn.window = 0
    await task.deferLater(reactor, 1.0)  # let in-flight messages finish
    delivered = meter.delivered
    result: dict[str, Any] = {
        "delivered_per_s": round(delivered / elapsed),
        "p50_ms": round(percentile(meter.latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(meter.latencies, 99) * 1000, 2),
        "bytes_per_msg": round(meter.bytes / delivered, 1) if delivered else None,
        "bench_cpu_us_per_msg": round(
            ((own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime))
            / delivered * 1e6, 1) if delivered else None,
    }
    if pids and delivered:
        used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
        result["server_cpu_us_per_msg"] = round(sum(used) / delivered * 1e6, 1)
        result["server_cpu_cores"] = round(sum(used) / elapsed, 2)
        if len(pids) > 1:
            result["node_cpu_cores"] = [round(u / elapsed, 2) for u in used]
    if redis_pid and delivered:
        result["redis_cpu_us_per_msg"] = round((redis1 - redis0) / delivered * 1e6, 1)
        result["redis_cpu_cores"] = round((redis1 - redis0) / elapsed, 2)
    return result


async def idle(reactor: Any, port: int, daemon_pid: int, count: int, settle: float
               ) -> dict[str, Any]:
    """Open ``count`` logged-in connections that only heartbeat; the server's
    resident memory per connection."""
    meter = Meter()
    await task.deferLater(reactor, 1.0)
    before = rss_bytes(daemon_pid)
    conns: list[Conn] = []
    batch = 50  # the daemon allows 64 logins being checked per address
    for start in range(0, count, batch):
        conns += await defer.gatherResults([
            defer.Deferred.fromCoroutine(connect(reactor, meter, port, f"bench{i}"))
            for i in range(start, min(count, start + batch))
        ])
    for conn in conns:  # one heartbeat each
        conn.write(encode(P.Ping()))
    await task.deferLater(reactor, settle)
    after = rss_bytes(daemon_pid)
    for conn in conns:
        conn.transport.loseConnection()  # type: ignore[union-attr]
    return {
        "connections": len(conns),
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "rss_per_connection_kb": round((after - before) / len(conns) / 1000, 2),
    }


class Probe:
    """One blocking client connection (TCP, or TLS through memory BIOs) that
    counts the bytes crossing its socket and the round trips it waits for: a
    round trip is a wait for the server after the client has sent."""

    def __init__(self, port: int, tls: ssl.SSLContext | None, session: Any = None) -> None:
        self.started = time.perf_counter()
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent = self.received = 0
        self.round_trips = 0
        self._waiting = False
        self.decoder = Decoder()
        self.tls: ssl.SSLObject | None = None
        self.handshake_bytes = 0
        self.handshake_round_trips = 0
        if tls is not None:
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = tls.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1",
                                    session=session)
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    self._fill()
            # the client's Finished leaves with the first packet, in the same flight
            self.handshake_bytes = self.sent + self.received + self.outgoing.pending
            self.handshake_round_trips = self.round_trips

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)
        self._waiting = True

    def _flush(self) -> None:
        if self.outgoing.pending:
            self._send(self.outgoing.read())

    def _recv(self) -> bytes:
        if self._waiting:
            self.round_trips += 1
            self._waiting = False
        data = self.sock.recv(65536)
        if not data:
            raise SystemExit("im58d-bench: the daemon closed a connect probe")
        self.received += len(data)
        return data

    def _fill(self) -> None:
        self.incoming.write(self._recv())

    def send(self, packet: Any) -> None:
        if self.tls is None:
            self._send(encode(packet))
        else:
            self.tls.write(encode(packet))
            self._flush()

    def receive(self) -> Any:
        """The next packet from the server."""
        while True:
            if self.tls is None:
                data = self._recv()
            else:
                try:
                    data = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    self._fill()
                    continue
            for packet in self.decoder.feed(data):
                if isinstance(packet, P.Error):
                    raise SystemExit(f"im58d-bench: ERROR {packet.code} {packet.message}")
                return packet

    def drop(self) -> float:
        """Close without BYE (the session lingers); the milliseconds it took."""
        elapsed = (time.perf_counter() - self.started) * 1000
        self.sock.close()
        return elapsed


def connect_costs(port: int, tls_port: int, ca_cert: str, user: str, repeat: int
                  ) -> dict[str, dict[str, Any]]:
    """A fresh LOGIN and a RESUME of its session, over TCP, TLS 1.3 and 1.2,
    each TLS one with a full handshake and with TLS session resumption."""
    variants: list[tuple[str, ssl.SSLContext | None]] = [("tcp", None)]
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        verified = ssl.create_default_context(cafile=ca_cert)
        verified.minimum_version = verified.maximum_version = version
        variants.append((version.name.replace("v1_", "1.").lower(), verified))
    costs: dict[str, dict[str, Any]] = {}

    def record(name: str, probe: Probe, im_bytes: int, times: list[float]) -> None:
        costs[name] = {
            "transport_rtt": 1 + probe.handshake_round_trips,
            "session_rtt": probe.round_trips - probe.handshake_round_trips,
            "im_bytes": im_bytes,
            "tls_handshake_bytes": probe.handshake_bytes,
            "wire_bytes": probe.sent + probe.received,
            "ms_p50": round(percentile(times, 50), 2),
        }

    for name, context in variants:
        times: dict[str, list[float]] = {}
        last: dict[str, tuple[Probe, int]] = {}
        for _ in range(repeat):
            probe = Probe(tls_port if context is not None else port, context)
            login = P.Login(user, PASSWORD, "bench")
            probe.send(login)
            welcome = probe.receive()
            assert isinstance(welcome, P.Welcome), welcome
            times.setdefault(f"{name}_login", []).append(probe.drop())
            last[f"{name}_login"] = (probe, len(encode(login)) + len(encode(welcome)))
            tls_session = probe.tls.session if probe.tls is not None else None
            # the same session resumed on a full TLS handshake, then on TLS resumption
            for reuse in (False, True) if context else (False,):
                resume = Probe(tls_port if context else port, context,
                               tls_session if reuse else None)
                ts = int(time.time())
                nonce = os.urandom(8)
                mac = hmac.new(welcome.session_key,
                               welcome.session_id + ts.to_bytes(8, "big") + nonce,
                               hashlib.sha256).digest()[:16]
                packet = P.Resume(welcome.session_id, ts, nonce, mac)
                resume.send(packet)
                resumed = resume.receive()
                assert isinstance(resumed, P.Resumed), resumed
                if resume.tls is not None and resume.tls.session_reused != reuse:
                    raise SystemExit(f"im58d-bench: {name}: TLS session reused "
                                     f"{resume.tls.session_reused}, expected {reuse}")
                key = f"{name}_resume" + ("_tls_resumed" if reuse else "")
                times.setdefault(key, []).append(resume.drop())
                last[key] = (resume, len(encode(packet)) + len(encode(resumed)))
        for key, (probe, im_bytes) in last.items():
            record(key, probe, im_bytes, times[key])
    return costs


def connect_mode(repeat: int, keep: bool = False, config: str | None = None
                 ) -> dict[str, dict[str, Any]]:
    """``connect_costs`` on a daemon of the bench's own with a TLS listener."""
    daemon = Daemon(0, keep, config, tls=True)
    try:
        # an account with the real password cost: a login's time is mostly scrypt
        db = open_database(daemon.database)
        with db.conn:
            add_user_txn(db, "connect", hash_password(PASSWORD), 0)
        db.conn.close()
        return connect_costs(daemon.port, daemon.tls_port, daemon.ca_cert, "connect", repeat)
    finally:
        daemon.close()


# -- sync mode: the bytes of keeping a contact list in step -----------------


class WireMeter:
    """Bytes through the bench's HTTP sockets, both ways, and requests made."""

    def __init__(self) -> None:
        self.up = 0
        self.down = 0
        self.requests = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.requests, self.up, self.down


class _CountingWrapper(ProtocolWrapper):
    """Counts every byte written to and read from the socket: the raw HTTP
    messages, request and status lines, headers and (chunked, gzipped or
    not) bodies."""

    factory: _CountingFactory

    def write(self, data: bytes) -> None:
        self.factory.meter.up += len(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        data = list(data)
        self.factory.meter.up += sum(len(chunk) for chunk in data)
        super().writeSequence(data)

    def dataReceived(self, data: bytes) -> None:
        self.factory.meter.down += len(data)
        super().dataReceived(data)


class _CountingFactory(WrappingFactory):
    protocol = _CountingWrapper

    def __init__(self, wrapped: Any, meter: WireMeter) -> None:
        super().__init__(wrapped)
        self.meter = meter


@implementer(IStreamClientEndpoint)
class _CountingEndpoint:
    def __init__(self, endpoint: Any, meter: WireMeter) -> None:
        self.endpoint = endpoint
        self.meter = meter

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self.endpoint.connect(_CountingFactory(factory, self.meter))
        return d.addCallback(lambda wrapper: wrapper.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class _CountingEndpoints:
    def __init__(self, reactor: Any, meter: WireMeter) -> None:
        self.reactor = reactor
        self.meter = meter

    def endpointForURI(self, uri: Any) -> _CountingEndpoint:
        endpoint = TCP4ClientEndpoint(self.reactor, uri.host.decode("ascii"), uri.port)
        return _CountingEndpoint(endpoint, self.meter)


@implementer(IAgent)
class _MeteredAgent:
    """Counts requests; without gzip, drops the ``Accept-Encoding`` that treq
    always adds, so that the server answers uncompressed."""

    def __init__(self, agent: Any, meter: WireMeter, gzip: bool) -> None:
        self.agent = agent
        self.meter = meter
        self.gzip = gzip

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> defer.Deferred[Any]:
        self.meter.requests += 1
        if not self.gzip and headers is not None:
            headers.removeHeader(b"accept-encoding")
        d: defer.Deferred[Any] = self.agent.request(method, uri, headers, bodyProducer)
        return d


class _Session:
    """What ``Sync`` needs of a logged-in client."""

    def __init__(self, http: Any, http_url: str, token: str, uid: int) -> None:
        self.http = http
        self.http_url = http_url
        self.token = token
        self.uid = uid


_NICK = "明华晓丽建国伟芳静强军磊洋艳勇杰娟涛超秀英霞平刚桂兰"
_WORDS = "今天天气很好我们一起去吃饭周末爬山读书摄影旅行跑步篮球交流群欢迎新朋友"


def populate_sync_world(database: str, friends: int, categories: int, groups: int,
                        group_size: int) -> None:
    """bench0 with ``friends`` friends (bench1..) spread over ``categories``
    categories and ``groups`` groups it owns of ``group_size`` friends each;
    Chinese nicks, genders and birthdays, group names and intros; the same
    every run (a fixed seed)."""
    rng = random.Random(58)
    db = open_database(database)
    db.conn.execute("BEGIN")
    me = uid_for_name_txn(db, "bench0")
    assert me is not None
    cids = [add_category_txn(db, me, f"分组{i}")[0] for i in range(categories)]
    uids = []
    for i in range(1, friends + 1):
        uid = uid_for_name_txn(db, f"bench{i}")
        assert uid is not None
        uids.append(uid)
        nick = "".join(rng.choice(_NICK) for _ in range(rng.randint(2, 3)))
        birthday = (f"{rng.randint(1960, 2005)}-{rng.randint(1, 12):02}-{rng.randint(1, 28):02}"
                    if rng.random() < 0.7 else None)
        db.execute("UPDATE users SET nick = ?, gender = ?, birthday = ? WHERE id = ?",
                   (nick, rng.randint(0, 2), birthday, uid))
        make_friends_txn(db, me, uid, 0)
        db.execute("UPDATE friends SET category = ? WHERE uid = ? AND friend = ?",
                   (cids[i % len(cids)] if cids else 0, me, uid))
    for _ in range(groups):
        name = "".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8)))
        intro = "".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 40)))
        create_group_txn(db, name, me, rng.sample(uids, min(group_size, len(uids))), 0, intro)
    db.conn.execute("COMMIT")
    db.conn.close()


async def sync_costs(reactor: Any, http_port: int, screen: int = 20
                     ) -> dict[str, dict[str, Any]]:
    """The requests and bytes on the wire (both ways, HTTP headers included)
    of the SDK's ``Sync`` for bench0, with and without gzip: a cold sync, a
    first screen of ``screen`` friends, a warm sync with nothing changed, a
    sync after one friend on screen changed their nick (with the screen's
    refresh), everything pulled through the sync (a cold cache, then every
    detail and member list) and the naive pull of an app without versions
    (every list and every detail; then also every group's members)."""
    costs: dict[str, dict[str, Any]] = {}
    for gzip in (True, False):
        costs.update(await _sync_costs(reactor, f"http://127.0.0.1:{http_port}", gzip, screen))
    return costs


async def _sync_costs(reactor: Any, url: str, gzip: bool, screen: int
                      ) -> dict[str, dict[str, Any]]:
    costs: dict[str, dict[str, Any]] = {}
    meter = WireMeter()
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent.usingEndpointFactory(reactor, _CountingEndpoints(reactor, meter), pool)
    http = HTTPClient(_MeteredAgent(agent, meter, gzip))

    async def call(method: str, path: str, token: str, body: Any = None) -> Any:
        headers: dict[bytes | str, bytes | str] = {"Authorization": f"Bearer {token}"}
        if body is None:
            response = await http.request(method, url + path, headers=headers)
        else:
            response = await http.request(method, url + path, headers=headers, json=body)
        content = await response.content()
        if response.code != 200:
            raise SystemExit(f"im58d-bench: {method} {path}: {response.code} {content!r}")
        return json.loads(content)

    async def login(user: str) -> dict[str, Any]:
        response = await http.post(url + "/v1/login", json={
            "user": user, "password": PASSWORD, "device": "bench"})
        answer: dict[str, Any] = json.loads(await response.content())
        return answer

    async def measure(name: str, *steps: Callable[[], Any]) -> None:
        before = meter.snapshot()
        t0 = time.perf_counter()
        for step in steps:
            await defer.ensureDeferred(step())
        elapsed = time.perf_counter() - t0
        requests, up, down = (b - a for a, b in zip(before, meter.snapshot(), strict=True))
        costs[f"{name}_{'gzip' if gzip else 'plain'}"] = {
            "requests": requests, "bytes_up": up, "bytes_down": down,
            "bytes": up + down, "ms": round(elapsed * 1000, 1)}

    me = await login("bench0")
    token = me["token"]
    session = _Session(http, url, token, me["uid"])
    sync = Sync(Cache(), session)
    friend_ids = [u for u, _ in (await call("GET", "/v1/friends", token))["friends"]]
    shown = friend_ids[:screen]
    await measure("cold_sync", sync.run)
    await measure("first_screen", lambda: sync.show(shown))
    await measure("warm_unchanged", sync.run)
    other = await login(f"bench{shown[0] - me['uid']}")
    await call("PATCH", "/v1/me", other["token"], {"nick": f"改名{'甲' if gzip else '乙'}"})
    await measure("one_nick_changed", sync.run, lambda: sync.show(shown))
    everything = Sync(Cache(), session)

    async def all_members() -> None:
        for gid in everything.cache.groups():
            await everything.members(gid)

    await measure("cold_everything", everything.run,
                  lambda: everything.show(friend_ids),
                  lambda: everything.show_groups(everything.cache.groups()),
                  all_members)
    lists: dict[str, Any] = {}

    async def naive_lists() -> None:
        for name in ("friends", "categories", "groups"):
            lists[name] = await call("GET", f"/v1/{name}", token)

    async def naive_details() -> None:
        have = {str(u): 0 for u, _ in lists["friends"]["friends"]}
        await call("POST", "/v1/users/sync", token, {"have": have})
        have = {str(g): 0 for g in lists["groups"]["groups"]}
        await call("POST", "/v1/groups/sync", token, {"have": have})

    async def naive_members() -> None:
        for gid in lists["groups"]["groups"]:
            await call("GET", f"/v1/groups/{gid}/members", token)

    await measure("naive_lists_details", naive_lists, naive_details)
    await measure("naive_with_members", naive_lists, naive_details, naive_members)
    await pool.closeCachedConnections()
    return costs


async def sync_mode(reactor: Any, keep: bool = False, config: str | None = None,
                    friends: int = 500, categories: int = 5, groups: int = 50,
                    group_size: int = 20) -> dict[str, dict[str, Any]]:
    """``sync_costs`` on a daemon of the bench's own with the world built
    straight in its database."""
    daemon = Daemon(friends + 1, keep, config)
    try:
        populate_sync_world(daemon.database, friends, categories, groups, group_size)
        return await sync_costs(reactor, daemon.http_port)
    finally:
        daemon.close()


# -- report mode: the bytes of client log reports -----------------------------

_PAGES = ("home_page", "message_list", "chat_window", "friend_profile")
_BUTTONS = ("button_A", "button_send", "button_back", "button_search", "button_more")


def click_events(count: int) -> list[tuple[str, str]]:
    """``count`` clicks as (page, button), the same every run (a fixed seed):
    20 distinct kinds, some far more frequent than others."""
    rng = random.Random(58)
    kinds = [(page, button) for page in _PAGES for button in _BUTTONS]
    weights = [1 / (n + 1) for n in range(len(kinds))]
    return rng.choices(kinds, weights, k=count)


async def report_costs(reactor: Any, http_port: int, events: int = 1000, database: str = ""
                       ) -> dict[str, dict[str, Any]]:
    """The requests and bytes on the wire (both ways, HTTP headers included,
    over a real loopback socket) of ``events`` click events reported the
    naive way of the talk (one ``GET /report/up?uid=..&action=click&...``
    per event; the daemon answers 404, the bytes count all the same) and
    merged by the SDK's ``Reporter``: in batches of Y = 100 events and in
    one batch, as JSON and MessagePack, plain and gzipped.  With
    ``database``, checks that the daemon counted every merged click."""
    url = f"http://127.0.0.1:{http_port}"
    meter = WireMeter()
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent.usingEndpointFactory(reactor, _CountingEndpoints(reactor, meter), pool)
    # no Accept-Encoding: the answers are 204s and 404s, and curl sends none
    http = HTTPClient(_MeteredAgent(agent, meter, gzip=False))
    response = await http.post(url + "/v1/login", json={
        "user": "bench0", "password": PASSWORD, "device": "bench"})
    me = json.loads(await response.content())
    clicks = click_events(events)
    costs: dict[str, dict[str, Any]] = {}

    async def measure(name: str, step: Callable[[], Any]) -> None:
        before = meter.snapshot()
        t0 = time.perf_counter()
        await step()
        elapsed = time.perf_counter() - t0
        requests, up, down = (b - a for a, b in zip(before, meter.snapshot(), strict=True))
        costs[name] = {"requests": requests, "bytes_up": up, "bytes_down": down,
                       "bytes": up + down, "bytes_per_event": round((up + down) / events, 1),
                       "ms": round(elapsed * 1000, 1)}

    async def naive() -> None:
        for n, (page, button) in enumerate(clicks):
            response = await http.get(
                f"{url}/report/up?uid={me['uid']}&action=click&page={page}"
                f"&button={button}&ts={int(time.time()) + n // 10}")
            await response.content()

    session = _Session(http, url, me["token"], me["uid"])

    def merged(every: int, encoding: str, gzip_from: int | None) -> Callable[[], Any]:
        async def step() -> None:
            reporter = Reporter(reactor, ReportState(), every_minutes=60, every_events=every,
                                encoding=encoding, gzip_from=gzip_from, session=session)
            for page, button in clicks:
                reporter.record(f"click.{page}.{button}")
            await reporter.flush()
            if reporter.pending or reporter.dropped:
                raise SystemExit(f"im58d-bench: reports not taken: {reporter.pending}")
        return step

    await measure("naive_get_per_event", naive)
    runs = 0
    for every, label in ((100, "y100"), (events, "one_batch")):
        for encoding in ("json", "msgpack"):
            for gzip_from, packing in ((None, "plain"), (1, "gzip")):
                await measure(f"merged_{label}_{encoding}_{packing}",
                              merged(every, encoding, gzip_from))
                runs += 1
    await pool.closeCachedConnections()
    if database:
        db = open_database(database)
        try:
            (total,) = db.execute("SELECT coalesce(sum(count), 0) FROM report_counts").fetchone()
        finally:
            db.conn.close()
        if total != runs * events:
            raise SystemExit(f"im58d-bench: the daemon counted {total} clicks, "
                             f"not {runs * events}")
    return costs


async def report_mode(reactor: Any, keep: bool = False, config: str | None = None,
                      events: int = 1000) -> dict[str, dict[str, Any]]:
    """``report_costs`` on a daemon of the bench's own."""
    daemon = Daemon(1, keep, config)
    try:
        return await report_costs(reactor, daemon.http_port, events, daemon.database)
    finally:
        daemon.close()


# -- cluster mode: two nodes through Redis -------------------------------------

# what in a node's output means something went wrong inside it
_TROUBLE = (b"Traceback", b"Unhandled", b"Error", b"failed", b"unreachable")
# counters of a node, for the check after a cluster run
_COUNTERS = {
    "stored": "im58d_messages_stored_total",
    "pushed": "im58d_messages_out_total",
    "commits": "im58d_commits_total",
    "retransmits": "im58d_retransmits_total",
    "dedup_hits": "im58d_dedup_hits_total",
    "caught_up": "im58d_caught_up_total",
    "published": "im58d_redis_published_total",
    "received": "im58d_redis_received_total",
    "outages": "im58d_redis_outages_total",
}


def wait_joined(nodes: Sequence[Daemon], timeout: float = 30.0) -> None:
    """Until every node has joined through Redis (``im58d_redis_up 1``)."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            try:
                if node.metrics().get("im58d_redis_up") == 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"im58d-bench: a node did not join through Redis; "
                                 f"see {node.log.name}")
            time.sleep(0.05)


Report = Callable[[str, dict[str, Any]], None]


async def _runs(reactor: Any, args: argparse.Namespace, report: Report, name: str,
                port: int, other_port: int | None, pids: Sequence[int],
                redis_pid: int | None) -> list[Conn]:
    """Log the pairs in, then the full and the paced load; the senders."""
    meter = Meter()
    senders = await pairs_of(reactor, meter, port, args.pairs, other_port)
    for label, rate in (("full", None), (f"paced_{int(args.rate)}", args.rate)):
        result = await load(reactor, meter, senders, pids, args.window, rate, args.warmup,
                            args.duration, not args.coalesce_acks, redis_pid)
        result["duplicate_msg_n"] = meter.duplicates
        report(f"{name}_{label}", result)
    return senders


async def _check(reactor: Any, nodes: Sequence[Daemon], senders: list[Conn]
                 ) -> dict[str, Any]:
    """After the runs: messages still without their ACK_N, MSG_Ns never
    received, and the nodes' counters (one value per node); then the
    connections close.  Suspect lines in a node's output are told, and its
    directory is kept."""
    await task.deferLater(reactor, 2.0)  # a late MSG_N or ACK_N
    check: dict[str, Any] = {
        "in_flight_left": sum(conn.in_flight for conn in senders),
        "msg_n_missing": sum(len(conn.peer.sent_at) for conn in senders if conn.peer),
    }
    counters = [node.metrics() for node in nodes]
    for key, metric in _COUNTERS.items():
        if metric in counters[0]:
            check[key] = [int(c[metric]) for c in counters]
    for conn in senders:
        conn.transport.loseConnection()  # type: ignore[union-attr]
        conn.peer.transport.loseConnection()  # type: ignore[union-attr]
    for node in nodes:
        trouble = [line for line in node.output().splitlines()
                   if any(word in line for word in _TROUBLE)]
        if trouble:
            print(f"im58d-bench: {len(trouble)} suspect lines in {node.log.name} "
                  f"(kept), the first: {trouble[0].decode(errors='replace')}",
                  file=sys.stderr)
            node.keep = True
    return check


async def cluster(reactor: Any, args: argparse.Namespace, report: Report) -> None:
    """The full and paced loads on one node (local routing), then on two
    nodes behind a ``redis-server`` of the bench's own, sharing one
    database, each pair split between the nodes (half the senders on each)
    so that every MSG_N and every ACK_N crosses through Redis.  After each,
    what is left in flight and the nodes' counters."""
    users = 2 * args.pairs
    with contextlib.ExitStack() as stack:
        redis = Redis(args.keep)
        stack.callback(redis.close)
        daemon = Daemon(users, args.keep, args.daemon_config)
        try:
            senders = await _runs(reactor, args, report, "cluster_one_node", daemon.port,
                                  None, [daemon.pid], None)
            report("cluster_one_node_check", await _check(reactor, [daemon], senders))
        finally:
            daemon.close()
        config = redis.node_config(args.daemon_config)
        first = Daemon(users, args.keep, config)
        stack.callback(first.close)
        second = Daemon(0, args.keep, config, database=first.database)
        stack.callback(second.close)  # closed first: the database is first's
        nodes = (first, second)
        wait_joined(nodes)
        senders = await _runs(reactor, args, report, "cluster_two_nodes", first.port,
                              second.port, [first.pid, second.pid], redis.pid)
        report("cluster_two_nodes_check", await _check(reactor, nodes, senders))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="im58d-bench", description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="all",
                   choices=["all", "full", "paced", "bytes", "idle", "connect", "sync", "report",
                            "cluster"],
                   help="cluster (not part of all): one node against two through Redis")
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--window", type=int, default=16, help="messages in flight per sender")
    p.add_argument("--rate", type=float, default=2000.0, help="paced messages per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--idle", type=int, default=5000, help="connections in idle mode")
    p.add_argument("--repeat", type=int, default=20,
                   help="logins and resumes per transport in connect mode")
    p.add_argument("--friends", type=int, default=500, help="friends of the user in sync mode")
    p.add_argument("--categories", type=int, default=5, help="their categories in sync mode")
    p.add_argument("--groups", type=int, default=50, help="the user's groups in sync mode")
    p.add_argument("--events", type=int, default=1000, help="click events in report mode")
    p.add_argument("--coalesce-acks", action="store_true",
                   help="ack once per read instead of once per MSG_N")
    p.add_argument("--target", help="HOST:PORT of a running daemon whose database has the "
                                    "users bench0.. with password 'bench' (see --database)")
    p.add_argument("--server-pid", type=int, help="with --target: the daemon's pid, for CPU")
    p.add_argument("--keep", action="store_true", help="keep the bench daemon's directory")
    p.add_argument("--daemon-config", help="config file for the bench's own daemon "
                                           "(its database and listeners are the bench's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


async def run(reactor: Any, args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: dict[str, Any] = {}
    users = max(2 * args.pairs, args.idle if args.mode in ("all", "idle") else 0)

    def report(name: str, value: dict[str, Any]) -> None:
        results[name] = value
        if not args.json:
            print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in value.items()), flush=True)

    def start() -> tuple[int, int | None, Daemon | None]:
        if args.target:
            return int(args.target.rpartition(":")[2]), args.server_pid, None
        daemon = Daemon(users, args.keep, args.daemon_config)
        return daemon.port, daemon.pid, daemon

    if args.mode in ("all", "bytes", "full", "paced"):
        port, pid, daemon = start()
        try:
            meter = Meter()
            senders = await pairs_of(reactor, meter, port, args.pairs)
            if args.mode in ("all", "bytes"):
                report("six_packets_nihao", await six_packets(reactor, meter, senders[0]))
            if args.mode in ("all", "full"):
                report("full_load", await load(reactor, meter, senders, pid, args.window,
                                               None, args.warmup, args.duration,
                                               not args.coalesce_acks))
            if args.mode in ("all", "paced"):
                report(f"paced_{int(args.rate)}", await load(
                    reactor, meter, senders, pid, args.window, args.rate, args.warmup,
                    args.duration, not args.coalesce_acks))
            for conn in senders:
                conn.transport.loseConnection()  # type: ignore[union-attr]
                conn.peer.transport.loseConnection()  # type: ignore[union-attr]
        finally:
            if daemon is not None:
                daemon.close()
    if args.mode in ("all", "idle"):
        port, pid, daemon = start()
        try:
            if pid is None:
                raise SystemExit("im58d-bench: idle mode needs --server-pid with --target")
            report("idle", await idle(reactor, port, pid, args.idle, settle=3.0))
        finally:
            if daemon is not None:
                daemon.close()
    if args.mode in ("all", "connect"):
        if args.target:
            raise SystemExit("im58d-bench: connect mode runs on the bench's own daemon")
        for name, cost in connect_mode(args.repeat, args.keep, args.daemon_config).items():
            report(name, cost)
    if args.mode in ("all", "sync"):
        if args.target:
            raise SystemExit("im58d-bench: sync mode runs on the bench's own daemon")
        costs = await sync_mode(reactor, args.keep, args.daemon_config, args.friends,
                                args.categories, args.groups)
        for name, cost in costs.items():
            report(name, cost)
    if args.mode in ("all", "report"):
        if args.target:
            raise SystemExit("im58d-bench: report mode runs on the bench's own daemon")
        for name, cost in (await report_mode(reactor, args.keep, args.daemon_config,
                                             args.events)).items():
            report(name, cost)
    if args.mode == "cluster":
        if args.target:
            raise SystemExit("im58d-bench: cluster mode runs daemons of the bench's own")
        await cluster(reactor, args, report)
    if args.json:
        print(json.dumps(results))


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":  # pragma: no cover
    main()
