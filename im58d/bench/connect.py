"""Connect mode: the round trips, bytes and time of a LOGIN and of a RESUME,
over TCP, TLS 1.3 and TLS 1.2 (with and without TLS session resumption)."""

from __future__ import annotations

import socket
import ssl
import time
from collections import deque
from typing import Any

from ..logic.passwords import hash_password
from ..proof import resume_mac
from ..store.accounts import add_user_txn
from ..store.sqlite import open_database
from ..wire import Decoder, encode
from ..wire import packets as P
from .common import PASSWORD, Daemon, device_id_of, percentile


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
        self.pending: deque[Any] = deque()  # packets decoded, not yet taken
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
        while not self.pending:
            if self.tls is None:
                data = self._recv()
            else:
                try:
                    data = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    self._fill()
                    continue
            self.pending.extend(self.decoder.feed(data))
        packet = self.pending.popleft()
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
    counter = 0

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
            login = P.Login(user, PASSWORD, device_id_of(user))
            probe.send(login)
            welcome = probe.receive()
            assert isinstance(welcome, P.Welcome), welcome
            online = probe.receive()  # right after WELCOME: the friends online now
            assert isinstance(online, P.Online), online
            times.setdefault(f"{name}_login", []).append(probe.drop())
            last[f"{name}_login"] = (probe, len(encode(login)) + len(encode(welcome))
                                       + len(encode(online)))
            tls_session = probe.tls.session if probe.tls is not None else None
            # the same session resumed on a full TLS handshake, then on TLS resumption
            for reuse in (False, True) if context else (False,):
                resume = Probe(tls_port if context else port, context,
                               tls_session if reuse else None)
                ts = int(time.time())
                # the nonce is a counter that only grows
                counter = max(counter + 1, time.time_ns() // 1000)
                nonce = counter.to_bytes(8, "big")
                mac = resume_mac(welcome.session_key, welcome.session_id, ts, nonce)
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
