"""The load generator of ``im58d-bench``: a lean client process on asyncio.

It runs in a process of its own (``im58d-bench`` starts it; it can also run
by itself against a running daemon) so that the daemon, not the client, is
what a run measures.  To stay cheaper than the daemon it:

- runs on asyncio's own event loop, or on uvloop when that is installed;
- sends prebuilt frames: a MSG_R is the sender's template (``to`` and the
  body, packed once) behind the cmid's few bytes, an ACK_R is the MSG_N's
  seq bytes copied behind a two-byte header;
- writes once per connection per batch (everything a read calls for, or
  everything a pacing tick sends from one sender);
- reads only the type byte of each frame, and of a MSG_N only its seq;
  MessagePack is decoded for WELCOME, RESUMED and ERROR alone.

It takes the frame builders, the type bytes and the RESUME proof from
im58d (``im58d.wire``, ``im58d.proof``), which import nothing heavier than
msgpack; a copy of this file with another LOGIN drives version 1 (the
frames and type bytes did not change).

It prints one JSON object per line on stdout: one per phase (``bytes``,
``full``, ``paced``, ``idle``, ``restart``), each with its ``name``.  In the
``restart`` phase it first prints ``{"event": "ready"}`` once every device
is signed in and connected, and then reads one line on stdin: the
``time.monotonic()`` at which the daemon listened again.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any

import msgpack

from im58d.proof import resume_mac
from im58d.wire import frame
from im58d.wire.packets import (
    ACK_A,
    ACK_N,
    ACK_R,
    ERROR,
    KICKED,
    LOGIN,
    MSG_A,
    MSG_N,
    MSG_R,
    PING,
    RESUME,
    RESUMED,
    WELCOME,
)

BODY = "你好"
_pack = msgpack.Packer(use_bin_type=True).pack


def login_frame(user: str, password: str, device_id: bytes) -> bytes:
    """LOGIN ``[user, password, device_id]``, the device id 16 bytes."""
    return frame(LOGIN, [user, password, device_id])


def resume_frame(session_id: bytes, key: bytes, nonce: int) -> bytes:
    """RESUME ``[session_id, ts, nonce, mac]``; ``nonce`` is the device's
    counter, sent as 8 bytes big-endian."""
    ts = int(time.time())
    nonce_bytes = nonce.to_bytes(8, "big")
    mac = resume_mac(key, session_id, ts, nonce_bytes)
    return frame(RESUME, [session_id, ts, nonce_bytes, mac])


def uint(n: int) -> bytes:
    """``n`` as a MessagePack uint in its smallest encoding."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return b"\xcc" + bytes((n,))
    if n < 0x10000:
        return b"\xcd" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


# the length of a MessagePack uint from its first byte
_UINT_LEN = [1] * 0x80 + [0] * 0x80
_UINT_LEN[0xCC], _UINT_LEN[0xCD], _UINT_LEN[0xCE], _UINT_LEN[0xCF] = 2, 3, 5, 9
# an ACK_R's header by the length of its seq: varint(n), type, fixarray of 1
_ACK_R_HEAD = {n: bytes((n + 2, ACK_R, 0x91)) for n in (1, 2, 3, 5, 9)}


def device_id_of(user: str) -> bytes:
    """A fixed 16-byte device id per bench user: a later run replaces the
    session of an earlier one instead of signing in one more device."""
    return hashlib.md5(f"im58d-bench device {user}".encode()).digest()


def head(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The length prefix of the frame at ``pos``, and where its type byte
    is; (-1, pos) while the prefix is incomplete."""
    n = data[pos]
    start = pos + 1
    if n < 0x80:
        return n, start
    n &= 0x7F
    shift = 7
    while start < end:
        b = data[start]
        start += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return n, start
    return -1, pos


def frames(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """The complete frames in ``data`` as (type, body start, end), and where
    the incomplete rest begins."""
    out = []
    pos = 0
    end = len(data)
    while pos < end:
        n, start = head(data, pos, end)
        stop = start + n
        if n < 0 or stop > end:
            break
        out.append((data[start], start + 1, stop))
        pos = stop
    return out, pos


# -- measuring ----------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class Meter:
    """Counters shared by the connections of one run."""

    def __init__(self) -> None:
        self.recording = False
        self.bytes = 0
        self.delivered = 0
        self.latencies: list[float] = []
        self.duplicates = 0
        self.errors = 0

    def reset(self) -> None:
        self.bytes = self.delivered = self.duplicates = self.errors = 0
        self.latencies = []


class BenchError(Exception):
    pass


# -- the load: pairs of a sender and a receiver -------------------------------


class Conn(asyncio.Protocol):
    """One signed-in device of a pair: the sender sends MSG_R and counts
    ACK_Ns, the receiver acks every MSG_N (or the last of a read)."""

    def __init__(self, meter: Meter, user: str, password: str) -> None:
        self.meter = meter
        self.user = user
        self.password = password
        self.transport: Any = None
        self.buf = b""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.uid = 0
        self.session_id = b""
        self.session_key = b""
        self.nonce = 0
        # as a sender
        self.peer: Conn | None = None
        self.tail = b""  # MSG_R after its cmid: ``to`` and the body
        self.cmid = 0
        self.in_flight = 0
        self.window = 0  # > 0: refill up to this many after each ACK_N
        self.acked = 0
        self.on_ack_n: Callable[[], None] | None = None
        # as a receiver
        self.sent: deque[float] = deque()  # MSG_R times of the peer's messages
        self.last_seq = 0
        self.ack_each = True
        self.log: list[bytes] | None = None  # raw bytes both ways, for the bytes phase

    # connection

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""
        if self.session_id:
            self.nonce = max(self.nonce + 1, time.time_ns() // 1000)
            self.write(resume_frame(self.session_id, self.session_key, self.nonce))
        else:
            self.write(login_frame(self.user, self.password, device_id_of(self.user)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(BenchError(f"{self.user}: connection lost"))

    def write(self, data: bytes) -> None:
        if self.meter.recording:
            self.meter.bytes += len(data)
        if self.log is not None:
            self.log.append(data)
        self.transport.write(data)

    # sending

    def pair(self, receiver: Conn) -> None:
        self.peer = receiver
        self.tail = uint(receiver.uid) + _pack(BODY)

    def send(self, count: int) -> None:
        """``count`` MSG_Rs in one write."""
        tail = self.tail
        size = len(tail) + 2
        first = self.cmid + 1
        self.cmid += count
        out = []
        for cmid in range(first, first + count):
            c = uint(cmid)
            out.append(bytes((size + len(c), MSG_R, 0x93)) + c + tail)
        self.in_flight += count
        self.peer.sent.extend(repeat(time.perf_counter(), count))  # type: ignore[union-attr]
        self.write(b"".join(out))

    # receiving

    def data_received(self, data: bytes) -> None:
        meter = self.meter
        if meter.recording:
            meter.bytes += len(data)
        if self.log is not None:
            self.log.append(data)
        if self.buf:
            data = self.buf + data
        end = len(data)
        pos = 0
        acks: list[bytes] = []
        last_ack = b""
        acked = 0
        now = 0.0
        while pos < end:
            n = data[pos]
            if n < 0x80:
                start = pos + 1
            else:
                n, start = head(data, pos, end)
                if n < 0:
                    break
            stop = start + n
            if stop > end:
                break
            t = data[start]
            if t == MSG_N:
                # body: fixarray, then seq
                b = data[start + 2]
                if b < 0x80:
                    seq = b
                    enc = data[start + 2:start + 3]
                else:
                    enc = data[start + 2:start + 2 + _UINT_LEN[b]]
                    seq = int.from_bytes(enc[1:], "big")
                if seq > self.last_seq:
                    self.last_seq = seq
                    if not now:
                        now = time.perf_counter()
                    sent = self.sent.popleft() if self.sent else now
                    if meter.recording:
                        meter.delivered += 1
                        meter.latencies.append(now - sent)
                else:  # sent again: acked again, not counted
                    meter.duplicates += 1
                if self.ack_each:
                    acks.append(_ACK_R_HEAD[len(enc)] + enc)
                else:
                    last_ack = enc
            elif t == ACK_N:
                acked += 1
            elif t != MSG_A and t != ACK_A:
                self.other(t, data[start + 1:stop])
            pos = stop
        self.buf = data[pos:] if pos < end else b""
        if last_ack:
            acks.append(_ACK_R_HEAD[len(last_ack)] + last_ack)
        if acks and self.transport is not None:
            self.write(b"".join(acks))
        if acked:
            self.in_flight -= acked
            self.acked += acked
            if self.window and self.transport is not None:
                need = self.window - self.in_flight
                if need > 0:
                    self.send(need)
            if self.on_ack_n is not None:
                self.on_ack_n()

    def other(self, t: int, body: bytes) -> None:
        """The rare packets: the answers to LOGIN and RESUME, errors."""
        if t == WELCOME:
            fields = msgpack.unpackb(body)
            self.uid, self.session_id, self.session_key = fields[0], fields[1], fields[2]
            # new cmids go above the highest the server holds from this device
            self.cmid = fields[8] if len(fields) > 8 else 0
            if not self.ready.done():
                self.ready.set_result(None)
        elif t == RESUMED:
            if not self.ready.done():
                self.ready.set_result(None)
        elif t == ERROR:
            code, message = msgpack.unpackb(body)[:2]
            error = f"{self.user}: ERROR {code} {message}"
            if not self.ready.done():
                self.ready.set_exception(BenchError(error))
            else:
                self.meter.errors += 1
                print(f"im58d-bench: {error}", file=sys.stderr)
        elif t == KICKED:
            print(f"im58d-bench: {self.user}: KICKED {msgpack.unpackb(body)}", file=sys.stderr)


class Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.meter = Meter()
        self.loop = asyncio.get_running_loop()
        self.pids: list[int] = args.pid or []

    def emit(self, name: str, value: dict[str, Any]) -> None:
        print(json.dumps({"name": name, **value}), flush=True)

    async def connect(self, conn: Conn, port: int) -> Conn:
        await self.loop.create_connection(lambda: conn, self.args.host, port)
        await conn.ready
        return conn

    async def sign_in(self, users: Sequence[str], ports: Sequence[int]) -> list[Conn]:
        """Connections signed in with LOGIN, 50 at a time (the daemon checks
        at most 64 passwords per address at once)."""
        conns: list[Conn] = []
        for first in range(0, len(users), 50):
            conns += await asyncio.gather(*(
                self.connect(Conn(self.meter, users[i], self.args.password), ports[i])
                for i in range(first, min(len(users), first + 50))))
        return conns

    async def pairs(self) -> list[Conn]:
        """The senders (bench0, bench2, ...), each paired with its receiver
        (bench1, bench3, ...).  With a second port every pair is split: the
        even pairs' senders on the first port, their receivers on the
        second, the odd pairs the other way round."""
        a = self.args
        other = a.port2 or a.port
        users, ports = [], []
        for i in range(a.pairs):
            users += [f"{a.prefix}{2 * i}", f"{a.prefix}{2 * i + 1}"]
            ports += [a.port, other] if i % 2 == 0 else [other, a.port]
        conns = await self.sign_in(users, ports)
        senders = conns[0::2]
        for sender, receiver in zip(senders, conns[1::2], strict=True):
            sender.pair(receiver)
            receiver.ack_each = not a.coalesce_acks
        await asyncio.sleep(0.2)  # ONLINE and the like, before anything is counted
        return senders

    # phases

    async def six_packets(self, senders: list[Conn]) -> None:
        """One "你好" through its six packets, and then a RESUME of the
        sender's session on a new connection: the bytes and their hex."""
        sender = senders[0]
        receiver = sender.peer
        assert receiver is not None
        sender.log, receiver.log = [], []
        done: asyncio.Future[None] = self.loop.create_future()

        def acked() -> None:
            if not done.done():
                done.set_result(None)

        sender.on_ack_n = acked
        sender.send(1)
        await asyncio.wait_for(done, 10)
        await asyncio.sleep(0.2)  # ACK_A
        sender.on_ack_n = None
        packets = b"".join(sender.log) + b"".join(receiver.log)
        sender.log = receiver.log = None
        result: dict[str, Any] = {"bytes": len(packets), "hex": packets.hex()}
        # RESUME after a drop without BYE (the session lingers)
        sender.transport.close()
        await asyncio.sleep(0.2)
        resumed = Conn(self.meter, sender.user, sender.password)
        resumed.uid, resumed.session_id = sender.uid, sender.session_id
        resumed.session_key, resumed.nonce = sender.session_key, sender.nonce
        resumed.cmid = sender.cmid
        resumed.log = []
        await self.connect(resumed, self.args.port)
        await asyncio.sleep(0.2)
        packets = b"".join(resumed.log)
        resumed.log = None
        resumed.pair(receiver)
        senders[0] = resumed
        result.update(resume_bytes=len(packets), resume_hex=packets.hex())
        self.emit("six_packets_nihao", result)

    async def load(self, senders: list[Conn], rate: float | None, name: str) -> None:
        """The flow for warmup + duration seconds, measured over the duration."""
        a = self.args
        meter = self.meter
        stop = False

        async def pace() -> None:
            tick = 0.005
            turn = 0
            due = 0.0
            last = time.perf_counter()
            assert rate is not None
            while not stop:
                await asyncio.sleep(tick)
                now = time.perf_counter()
                due += (now - last) * rate
                last = now
                while due >= 1:
                    conn = senders[turn % len(senders)]
                    turn += 1
                    due -= 1
                    if conn.in_flight < 1000 and conn.transport is not None:
                        conn.send(1)

        pacer = None
        if rate is None:
            for conn in senders:
                conn.window = a.window
                if conn.in_flight < a.window:
                    conn.send(a.window - conn.in_flight)
        else:
            pacer = asyncio.ensure_future(pace())
        await asyncio.sleep(a.warmup)
        meter.reset()
        meter.recording = True
        cpu0 = [cpu_seconds(pid) for pid in self.pids]
        redis0 = cpu_seconds(a.redis_pid) if a.redis_pid else 0.0
        own0 = own_cpu()
        t0 = time.perf_counter()
        await asyncio.sleep(a.duration)
        elapsed = time.perf_counter() - t0
        meter.recording = False
        own1 = own_cpu()
        cpu1 = [cpu_seconds(pid) for pid in self.pids]
        redis1 = cpu_seconds(a.redis_pid) if a.redis_pid else 0.0
        stop = True
        if pacer is not None:
            await pacer
        for conn in senders:
            conn.window = 0
        await asyncio.sleep(a.drain)  # let the messages in flight arrive
        delivered = meter.delivered
        per = 1e6 / delivered if delivered else float("nan")
        result: dict[str, Any] = {
            "delivered_per_s": round(delivered / elapsed),
            "p50_ms": round(percentile(meter.latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(meter.latencies, 99) * 1000, 2),
            "bytes_per_msg": round(meter.bytes / delivered, 1) if delivered else None,
        }
        if self.pids:
            used = [b - c for c, b in zip(cpu0, cpu1, strict=True)]
            result["daemon_cpu_us_per_msg"] = round(sum(used) * per, 1)
            result["daemon_cpu_cores"] = round(sum(used) / elapsed, 2)
            if len(used) > 1:
                result["node_cpu_cores"] = [round(u / elapsed, 2) for u in used]
        if a.redis_pid:
            result["redis_cpu_us_per_msg"] = round((redis1 - redis0) * per, 1)
        result["gen_cpu_us_per_msg"] = round((own1 - own0) * per, 1)
        result["gen_cpu_cores"] = round((own1 - own0) / elapsed, 2)
        result["in_flight_left"] = sum(conn.in_flight for conn in senders)
        result["msg_n_missing"] = sum(len(conn.peer.sent) for conn in senders if conn.peer)
        result["duplicate_msg_n"] = meter.duplicates
        result["errors"] = meter.errors
        result["loop"] = LOOP
        self.emit(name, result)

    async def idle(self) -> None:
        """``--idle`` signed-in connections that send one PING each and then
        wait; the daemon's resident memory per connection."""
        a = self.args
        pid = self.pids[0]
        await asyncio.sleep(1.0)
        before = rss_bytes(pid)
        users = [f"{a.prefix}{i}" for i in range(a.idle)]
        conns = await self.sign_in(users, [a.port] * len(users))
        ping = frame(PING, [])
        for conn in conns:
            conn.write(ping)
        await asyncio.sleep(a.settle)
        after = rss_bytes(pid)
        for conn in conns:
            conn.transport.close()
        self.emit("idle", {
            "connections": len(conns),
            "rss_before_mib": round(before / 2**20, 1),
            "rss_after_mib": round(after / 2**20, 1),
            "rss_per_connection_kb": round((after - before) / len(conns) / 1000, 2),
        })

    async def restart(self) -> None:
        """``--devices`` devices signed in and connected; ``ready``; then,
        when their connections drop, each reconnects after a jittered
        backoff and RESUMEs, as the SDK does, until all are back."""
        a = self.args
        fleet = Fleet(self.loop, a.host, a.port)
        devices = [Device(fleet, f"{a.prefix}{i}", a.password) for i in range(a.devices)]
        t0 = time.monotonic()
        for first in range(0, len(devices), 50):  # LOGINs, 50 at a time
            batch = devices[first:first + 50]
            for device in batch:
                device.connect()
            await asyncio.gather(*(device.signed_in for device in batch))
        signed_in = time.monotonic() - t0
        await asyncio.sleep(0.5)
        fleet.reset()
        self.emit("ready", {"event": "ready", "devices": len(devices),
                            "sign_in_s": round(signed_in, 2)})
        line = await self.loop.run_in_executor(None, sys.stdin.readline)
        listening = float(line.split()[0])
        deadline = listening + a.restart_timeout
        while fleet.up < len(devices) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        times = sorted(d.back_at - listening for d in devices if d.back_at)
        curve = [0] * (int(times[-1]) + 1 if times else 0)
        for t in times:
            curve[max(0, int(t))] += 1
        self.emit("restart", {
            "devices": len(devices),
            "resumed": sum(1 for d in devices if d.back_at and not d.logins),
            "logins_needed": sum(d.logins for d in devices),
            "not_back": len(devices) - fleet.up,
            "all_back_s": round(times[-1], 2) if len(times) == len(devices) else None,
            "p50_s": round(percentile(times, 50), 2),
            "p90_s": round(percentile(times, 90), 2),
            "resumed_per_s": curve,
            "connects": fleet.connects,
            "refused": fleet.refused,
            "dropped_before_answer": fleet.dropped,
            "kicked": fleet.kicked,
            "errors": fleet.errors,
            "loop": LOOP,
        })
        for device in devices:
            device.stop()


class Fleet:
    """What the restart's devices share, and their counters."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self.loop = loop
        self.host = host
        self.port = port
        self.up = 0
        self.reset()

    def reset(self) -> None:
        self.connects = 0
        self.refused = 0
        self.dropped = 0
        self.kicked: dict[int, int] = {}
        self.errors: dict[int, int] = {}


class Device(asyncio.Protocol):
    """A device of the restart: it signs in with LOGIN, and after every drop
    reconnects with the SDK's backoff (0.25 s doubling up to 30 s, each wait
    times a random factor in [0.5, 1.5)) and RESUMEs its session with the
    next nonce of its counter; a 409 makes it LOGIN (and is counted)."""

    MIN_BACKOFF = 0.25
    MAX_BACKOFF = 30.0

    def __init__(self, fleet: Fleet, user: str, password: str) -> None:
        self.fleet = fleet
        self.user = user
        self.password = password
        self.session_id = b""
        self.key = b""
        self.nonce = 0
        self.transport: Any = None
        self.buf = b""
        self.backoff = self.MIN_BACKOFF
        self.signed_in: asyncio.Future[None] = fleet.loop.create_future()
        self.up = False
        self.back_at = 0.0  # when it was RESUMED (or WELCOMEd) after a drop
        self.logins = 0  # LOGINs after a drop
        self.stopped = False

    def connect(self) -> None:
        if self.stopped:
            return
        self.fleet.connects += 1
        loop = self.fleet.loop
        task = loop.create_task(loop.create_connection(
            lambda: self, self.fleet.host, self.fleet.port))
        task.add_done_callback(self.connected)

    def connected(self, task: asyncio.Task[Any]) -> None:
        error = task.exception()
        if error is not None:
            if not self.signed_in.done():
                self.signed_in.set_exception(BenchError(f"{self.user}: {error}"))
                return
            self.fleet.refused += 1
            self.later()

    def later(self) -> None:
        if self.stopped:
            return
        delay = self.backoff * (0.5 + random.random())
        self.backoff = min(self.backoff * 2, self.MAX_BACKOFF)
        self.fleet.loop.call_later(delay, self.connect)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""
        if not self.session_id:
            transport.write(login_frame(self.user, self.password, device_id_of(self.user)))
            return
        self.nonce = max(self.nonce + 1, time.time_ns() // 1000)
        transport.write(resume_frame(self.session_id, self.key, self.nonce))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.signed_in.done():
            self.signed_in.set_exception(BenchError(f"{self.user}: connection lost"))
            return
        if self.up:
            self.up = False
            self.fleet.up -= 1
        else:
            self.fleet.dropped += 1
        self.later()

    def data_received(self, data: bytes) -> None:
        data = self.buf + data
        found, pos = frames(data)
        self.buf = data[pos:]
        for t, start, stop in found:
            if t == RESUMED or t == WELCOME:
                if t == WELCOME:
                    fields = msgpack.unpackb(data[start:stop])
                    self.session_id, self.key = fields[1], fields[2]
                if not self.up:
                    self.up = True
                    self.fleet.up += 1
                    self.backoff = self.MIN_BACKOFF
                    if self.signed_in.done():
                        self.back_at = time.monotonic()
                    else:
                        self.signed_in.set_result(None)
            elif t == ERROR:
                code, message = msgpack.unpackb(data[start:stop])[:2]
                if not self.signed_in.done():
                    self.signed_in.set_exception(
                        BenchError(f"{self.user}: ERROR {code} {message}"))
                    continue
                self.fleet.errors[code] = self.fleet.errors.get(code, 0) + 1
                if code == 409 and self.transport is not None:  # session gone: LOGIN
                    self.logins += 1
                    self.transport.write(
                        login_frame(self.user, self.password, device_id_of(self.user)))
            elif t == KICKED:
                reason = msgpack.unpackb(data[start:stop])[0]
                self.fleet.kicked[reason] = self.fleet.kicked.get(reason, 0) + 1

    def stop(self) -> None:
        self.stopped = True
        if self.transport is not None:
            self.transport.close()


# -- command line -------------------------------------------------------------

LOOP = "asyncio"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="im58d-bench's load generator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--port2", type=int, help="a second node: every pair split between the two")
    p.add_argument("--pid", type=int, action="append",
                   help="a daemon's pid, for its CPU and memory (repeatable)")
    p.add_argument("--redis-pid", type=int)
    p.add_argument("--phases", default="bytes,full,paced",
                   help="comma-separated: bytes, full, paced, idle, restart")
    p.add_argument("--prefix", default="bench", help="user names: PREFIX0, PREFIX1, ...")
    p.add_argument("--password", default="bench")
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--drain", type=float, default=1.0)
    p.add_argument("--coalesce-acks", action="store_true")
    p.add_argument("--idle", type=int, default=5000)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--restart-timeout", type=float, default=60.0)
    p.add_argument("--loop", choices=["auto", "asyncio"], default="auto",
                   help="auto: uvloop when it is installed")
    return p


async def run(args: argparse.Namespace) -> None:
    gen = Generator(args)
    phases = args.phases.split(",")
    if {"bytes", "full", "paced"} & set(phases):
        senders = await gen.pairs()
        if "bytes" in phases:
            await gen.six_packets(senders)
        if "full" in phases:
            await gen.load(senders, None, "full_load")
        if "paced" in phases:
            await gen.load(senders, args.rate, f"paced_{int(args.rate)}")
        for conn in senders:
            conn.transport.close()
            conn.peer.transport.close()  # type: ignore[union-attr]
    if "idle" in phases:
        await gen.idle()
    if "restart" in phases:
        await gen.restart()


def main(argv: Sequence[str] | None = None) -> None:
    global LOOP
    args = parser().parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.loop == "auto":
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            pass
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            LOOP = "uvloop"
    try:
        asyncio.run(run(args))
    except BenchError as e:
        raise SystemExit(f"im58d-bench: {e}") from None


if __name__ == "__main__":
    main()
