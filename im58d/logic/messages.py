"""The message path: MSG_R → commit → MSG_A, MSG_N → ACK_R → ACK_A, ACK_N.

Messages and acks from every connection gather into batches (see
``Messenger._arrived``); a batch is committed in one transaction, and only
when it is committed do its MSG_A, MSG_N, ACK_A and ACK_N go out.  A message
is an entry in the timeline of its sender and of each receiver: the
receivers' devices get MSG_N, and so do the sender's other devices (a copy,
with ``to``).  The Messenger keeps, per device, the MSG_Ns sent on the live
connection and not yet acked, and sends them again when the ack is late.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..routing.interfaces import IRouter
from ..store.interfaces import DUPLICATE, KIND_GROUP, STORED, IStore
from . import packets as P

log = Logger()

# Packets of the message path are made with tuple.__new__, which spares the
# Python-level __new__ of a NamedTuple (one call per packet, four packets a
# message); the field order is the packet's.
_new = tuple.__new__

# messages and acks that make a batch worth a commit without waiting
FULL_BATCH = 64
# batches handed to the store and not yet committed
MAX_IN_FLIGHT = 2
# MSG_Ns a connection may leave unacked before it is dropped
MAX_UNACKED = 4096
# late MSG_Ns sent again per connection and round
RESEND_AT_ONCE = 64


def body_size(body: str | bytes, limit: int) -> int:
    """The body's size in bytes, exact where it matters (near ``limit``)."""
    n = len(body)
    if type(body) is str and n <= limit < 4 * n:
        return len(body.encode("utf-8"))
    return n


class Messenger:
    """The logic layer's message flow, shared by every connection."""

    def __init__(
        self,
        store: IStore,
        router: IRouter,
        clock: IReactorTime,
        max_body: int = 4096,
        friends_only: bool = False,
        retransmit: float = 10.0,
        gather: float = 0.0,
    ) -> None:
        self.store = store
        self.router = router
        self.clock = clock
        self.max_body = max_body
        self.friends_only = friends_only
        self.retransmit = retransmit
        self.gather = gather
        # the next batch: (device, cmid, to, body, kind) and device -> seq
        self._messages: list[tuple[Any, int, int, str | bytes, int]] = []
        self._acks: dict[Any, int] = {}
        self._scheduled = False
        self._gathering_since = 0.0
        self._rate = 0.0  # messages and acks per second, recently
        self._last_flush = 0.0
        self._in_flight = 0
        self._drained: list[Deferred[None]] = []
        # devices with MSG_Ns waiting for ACK_R
        self._awaiting: set[Any] = set()
        # counters (metrics)
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.pushed = 0
        self.retransmitted = 0
        self.acks = 0
        self.acks_out = 0  # ACK_Ns sent to senders
        self.caught_up = 0  # MSG_Ns pushed from the timelines after a lost publication

    # packets from the access layer

    def on_msg_r(self, device: Any, cmid: int, to: int, body: str | bytes, kind: int) -> None:
        self.received += 1
        if len(body) > self.max_body >> 2 and body_size(body, self.max_body) > self.max_body:
            device.connection.error(413, f"body over {self.max_body} bytes", cmid)
            return
        if kind > KIND_GROUP:
            device.connection.error(501, f"message kind {kind} is not supported", cmid)
            return
        self._messages.append((device, cmid, to, body, kind))
        if not self._scheduled:
            self._arrived()

    def on_ack_r(self, device: Any, seq: int) -> None:
        self.acks += 1
        unacked = device.unacked
        if unacked:
            while unacked and unacked[0][0] <= seq:
                unacked.popleft()
        if seq > self._acks.get(device, -1):
            self._acks[device] = seq
        if seq > device.acked_max:
            device.acked_max = seq
        if not self._scheduled:
            self._arrived()

    # the batch

    def _arrived(self) -> None:
        """The first message or ack of the next batch is here.

        At most two batches are in the store: while one commits, the next
        waits in the store's queue, so the database thread goes straight on
        to it; further messages gather meanwhile.  At low rates a batch waits
        up to ``gather`` seconds from its first message, so that a commit
        carries several messages rather than one: each commit has a fixed
        cost.
        """
        self._scheduled = True
        self._gathering_since = self.clock.seconds()
        if self._in_flight < MAX_IN_FLIGHT:
            self.clock.callLater(self._window(), self.flush)

    def _window(self) -> float:
        """How long a batch waits for company: ``gather``, or less when a full
        batch gathers sooner at the recent rate (under load, next to nothing)."""
        if self._rate * self.gather > FULL_BATCH:
            return FULL_BATCH / self._rate
        return self.gather

    def flush(self) -> None:
        """Hand what has gathered to the store as one batch."""
        if self._in_flight >= MAX_IN_FLIGHT:
            return  # it goes when a batch in flight lands
        self._scheduled = False
        messages, self._messages = self._messages, []
        acks, self._acks = self._acks, {}
        if not messages and not acks:
            return
        seconds = self.clock.seconds()
        now = int(seconds)
        self._in_flight += 1
        # the recent rate of messages and acks, smoothed over a few batches
        elapsed = seconds - self._last_flush
        if self._last_flush and elapsed > 0:
            self._rate += 0.25 * ((len(messages) + len(acks)) / elapsed - self._rate)
        self._last_flush = seconds
        d = self.store.deliver(
            [(d.uid, d.device, cmid, to, body, kind) for d, cmid, to, body, kind in messages],
            [(d.uid, d.device, seq, d.cursor) for d, seq in acks.items()],
            now,
            self.friends_only,
        )
        d.addCallbacks(
            self._committed, self._failed, callbackArgs=(messages, acks), errbackArgs=(messages,)
        )
        d.addBoth(self._landed)

    def _committed(
        self,
        outcome: tuple[list[tuple[Any, ...]], list[Any]],
        messages: list[tuple[Any, int, int, str | bytes, int]],
        acks: dict[Any, int],
    ) -> None:
        results, ack_results = outcome
        now = self.clock.seconds()
        find = self.router.user
        # packets for devices that may be on other nodes
        remote: list[tuple[int, int, Any, bytes | None]] | None = (
            [] if self.router.clustered else None
        )
        for (device, cmid, to, body, kind), result in zip(messages, results, strict=True):
            status = result[0]
            connection = device.connection
            if status == STORED:
                self.stored += 1
                _, msg_id, ts, sender_seq, deliveries = result
                uid = device.uid
                if connection is not None:
                    connection.send(_new(P.MsgA, (cmid, msg_id, sender_seq)))
                group = to if kind == KIND_GROUP else None
                for receiver, seq in deliveries:
                    msg_n = _new(P.MsgN, (seq, msg_id, uid, body, ts, group, None))
                    user = find(receiver)
                    if user is not None:
                        for target in user.devices.values():
                            if target.connection is not None:
                                self._push(target, seq, msg_n, now)
                    if remote is not None:
                        remote.append((receiver, seq, msg_n, None))
                # the sender's other devices get a copy
                user = device.user or find(uid)
                if remote is not None or (user is not None and len(user.devices) > 1):
                    copy = P.MsgN(sender_seq, msg_id, uid, body, ts, group,
                                  None if group is not None else to)
                    self._deliver(uid, sender_seq, copy, now, device, remote)
            elif status == DUPLICATE:
                self.duplicates += 1
                if connection is not None:
                    connection.send(P.MsgA(cmid, result[1], result[2]))
                    if result[3]:
                        # received already: its ACK_N may have been lost with
                        # the connection that lost the MSG_A, so it comes again
                        connection.send(P.AckN(result[2]))
            elif connection is not None:
                connection.error(result[1], result[2], cmid)
        for (device, _), (cursor, newly) in zip(acks.items(), ack_results, strict=True):
            if cursor > device.cursor:
                device.cursor = cursor
            if device.connection is not None:
                device.connection.send(_new(P.AckA, (cursor,)))
            for sender, sender_seq in newly:
                ack_n = _new(P.AckN, (sender_seq,))
                user = find(sender)
                if user is not None:
                    for target in user.devices.values():
                        if target.connection is not None:
                            target.connection.send(ack_n)
                            self.acks_out += 1
                if remote is not None:
                    remote.append((sender, 0, ack_n, None))
        if remote:
            self.router.forward(remote)

    def _deliver(
        self, uid: int, seq: int, msg_n: Any, now: float, skip: Any,
        remote: list[tuple[int, int, Any, bytes | None]] | None,
    ) -> None:
        """MSG_N to every connected device of the user but ``skip`` (the
        sending device), here and, with several nodes, elsewhere."""
        user = self.router.user(uid)
        if user is not None:
            for device in user.devices.values():
                if device is not skip and device.connection is not None:
                    self._push(device, seq, msg_n, now)
        if remote is not None:
            remote.append((uid, seq, msg_n, None if skip is None else skip.session_id))

    def _failed(self, failure: Failure, messages: list[Any]) -> None:
        # Nothing of the batch is stored; the senders retransmit (no MSG_A
        # came), the receivers ack again.
        log.failure("storing a batch of {n} messages failed", failure, n=len(messages))
        for device, cmid, _, _, _ in messages:
            if device.connection is not None:
                device.connection.error(503, "not stored, send again", cmid)

    def _landed(self, _: object) -> None:
        self._in_flight -= 1
        if self._messages or self._acks:
            # under load the next batch goes at once; at low rates it waits
            # out the rest of its window
            wait = self._gathering_since + self._window() - self.clock.seconds()
            if wait > 0:
                self.clock.callLater(wait, self.flush)
            else:
                self.flush()
        elif self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def _push(self, device: Any, seq: int, msg_n: Any, now: float) -> None:
        unacked = device.unacked
        if unacked is None:
            unacked = device.unacked = deque()
        elif len(unacked) >= MAX_UNACKED:
            # A device that does not ack is dropped rather than buffered
            # without end; it pulls what it missed after its next RESUMED.
            device.connection.abort()
            return
        device.connection.send(msg_n)
        self.pushed += 1
        if not unacked:
            self._awaiting.add(device)
        unacked.append((seq, msg_n, now))

    # several nodes

    def forwarded(self, items: list[tuple[int, int, int, list[Any], bytes | None]]) -> None:
        """Packets another node stored or acked for users with devices here,
        ``(uid, seq, code, fields, skip)``: MSG_Ns (seq > 0) wait for their
        ACK_R as any push does; ``skip`` is the session of the sending
        device, which has the message already."""
        now = self.clock.seconds()
        find = self.router.user
        for uid, seq, code, fields, skip in items:
            user = find(uid)
            if user is None:
                continue  # in the timeline: pulled after the next RESUMED
            packet = P.from_fields(code, fields)
            for device in list(user.devices.values()):
                if device.connection is None or device.session_id == skip:
                    continue
                if seq:
                    if seq <= device.acked_max or _pushed(device.unacked, seq):
                        continue  # a catch-up pushed it before its publication came
                    self._push(device, seq, packet, now)
                else:
                    device.connection.send(packet)

    @inlineCallbacks
    def catch_up(self) -> Any:
        """Push what is in the timelines of this node's connected devices
        and was neither pushed nor told at WELCOME/RESUMED: publications of
        other nodes are lost while Redis or a node is away (housekeeping,
        and after Redis comes back)."""
        connected = [d for d in self.router.devices() if d.connection is not None]
        if not connected:
            return
        heads = yield self.store.inbox_heads(sorted({d.uid for d in connected}))
        for device in connected:
            head = heads.get(device.uid, (0, 0))[0]
            after = max(device.pull_max, device.acked_max)
            if head <= after or device.connection is None:
                continue
            pending = {seq for seq, _, _ in device.unacked or ()}
            if len(pending) >= head - after and all(
                    seq in pending for seq in range(after + 1, head + 1)):
                continue  # all pushed, waiting for the ack
            entries, _ = yield self.store.inbox(device.uid, after, RESEND_AT_ONCE)
            if device.connection is None or device.ended:
                continue
            # pushed or acked meanwhile (a publication came during the read)
            pending = {seq for seq, _, _ in device.unacked or ()}
            acked_max = device.acked_max
            now = self.clock.seconds()
            for seq, msg_id, sender, group, body, ts, to, _, sent_from in entries:
                if seq in pending or seq <= acked_max:
                    continue
                if sender == device.uid and sent_from == device.device:
                    continue  # this device's own message: it had the MSG_A
                msg_n = P.MsgN(seq, msg_id, sender, body, ts, group, to)
                self._push(device, seq, msg_n, now)
                self.caught_up += 1

    # timers

    def resend_late(self) -> None:
        """Send again the MSG_Ns whose ACK_R is later than ``retransmit``
        seconds, at most RESEND_AT_ONCE per connection and round."""
        now = self.clock.seconds()
        due = now - self.retransmit
        for device in list(self._awaiting):
            unacked = device.unacked
            connection = device.connection
            if not unacked or connection is None:
                self._awaiting.discard(device)
                continue
            if connection.congested:
                continue  # what was sent has not even been read yet
            resent = 0
            for i in range(len(unacked)):
                seq, msg_n, sent = unacked[i]
                if sent > due:
                    continue
                connection.send(msg_n)
                unacked[i] = (seq, msg_n, now)
                resent += 1
                if resent == RESEND_AT_ONCE:
                    break
            self.retransmitted += resent

    def drain(self) -> Deferred[None]:
        """Commit what is queued; fires when no batch is in flight (shutdown)."""
        if self._messages or self._acks:
            self.flush()
        if not self._in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d


def _pushed(unacked: Any, seq: int) -> bool:
    """Whether ``seq`` waits for its ack already (rare: only a seq at or
    below the newest one pushed is looked for)."""
    if not unacked or seq > unacked[-1][0]:
        return False
    return any(s == seq for s, _, _ in unacked)
