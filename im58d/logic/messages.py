"""The message path: MSG_R → commit → MSG_A, MSG_N → ACK_R → ACK_A, ACK_N.

Messages and acks from every connection gather into batches (see
``Messenger._arrived``); a batch is committed in one transaction, and only
when it is committed do its MSG_A, MSG_N, ACK_A and ACK_N go out.  The
Messenger keeps, per session, the MSG_Ns sent on the live connection and not
yet acked, and sends them again when the ack is late.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..routing.interfaces import IRouter
from ..store.inbox import DUPLICATE, KIND_GROUP, KIND_USER, STORED
from ..store.interfaces import IStore
from ..wire import frame
from ..wire import packets as P

log = Logger()

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
        # the next batch: (session, cmid, to, body, kind) and session -> seq
        self._messages: list[tuple[Any, int, int, str | bytes, int]] = []
        self._acks: dict[Any, int] = {}
        self._scheduled = False
        self._gathering_since = 0.0
        self._rate = 0.0  # messages and acks per second, recently
        self._last_flush = 0.0
        self._in_flight = 0
        self._drained: list[Deferred[None]] = []
        # sessions with MSG_Ns waiting for ACK_R
        self._awaiting: set[Any] = set()
        # counters (metrics)
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.pushed = 0
        self.retransmitted = 0
        self.acks = 0
        self.acks_out = 0  # ACK_Ns sent to senders
        self.caught_up = 0  # MSG_Ns pushed from the store after a lost publication

    # packets from the access layer (handler(connection, packet))

    def on_msg_r(self, connection: Any, packet: P.MsgR) -> None:
        self.received += 1
        body = packet.body
        if len(body) > self.max_body >> 2 and body_size(body, self.max_body) > self.max_body:
            connection.error(413, f"body over {self.max_body} bytes", packet.cmid)
            return
        kind = packet.kind or KIND_USER
        if kind > KIND_GROUP:
            connection.error(501, f"message kind {kind} is not supported", packet.cmid)
            return
        self._messages.append((connection.session, packet.cmid, packet.to, body, kind))
        if not self._scheduled:
            self._arrived()

    def on_ack_r(self, connection: Any, packet: P.AckR) -> None:
        self.acks += 1
        session = connection.session
        seq = packet.seq
        unacked = session.unacked
        if unacked:
            while unacked and unacked[0][0] <= seq:
                unacked.popleft()
        if seq > self._acks.get(session, -1):
            self._acks[session] = seq
        if seq > session.acked_max:
            session.acked_max = seq
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
            [(s.uid, cmid, to, body, kind) for s, cmid, to, body, kind in messages],
            [(s.uid, seq) for s, seq in acks.items()],
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
        session_for = self.router.session_for
        # frames for users whose sessions are on other nodes: (uid, seq, frame)
        remote: list[tuple[int, int, bytes]] | None = [] if self.router.clustered else None
        for (session, cmid, to, body, kind), result in zip(messages, results, strict=True):
            status = result[0]
            connection = session.connection
            if status == STORED:
                self.stored += 1
                _, msg_id, ts, deliveries = result
                if connection is not None:
                    connection.send(frame(P.MSG_A, (cmid, msg_id, ts)))
                if kind == KIND_USER:
                    receiver, seq = deliveries[0]
                    target = session_for(receiver)
                    if target is not None:
                        if target.connection is not None:
                            msg_n = frame(P.MSG_N, (seq, msg_id, session.uid, body, ts))
                            self._push(target, seq, msg_n, now)
                    elif remote is not None:
                        msg_n = frame(P.MSG_N, (seq, msg_id, session.uid, body, ts))
                        remote.append((receiver, seq, msg_n))
                else:
                    for receiver, seq in deliveries:
                        target = session_for(receiver)
                        if target is not None:
                            if target.connection is not None:
                                msg_n = frame(P.MSG_N, (seq, msg_id, session.uid, body, ts, to))
                                self._push(target, seq, msg_n, now)
                        elif remote is not None:
                            msg_n = frame(P.MSG_N, (seq, msg_id, session.uid, body, ts, to))
                            remote.append((receiver, seq, msg_n))
            elif status == DUPLICATE:
                self.duplicates += 1
                if connection is not None:
                    connection.send(frame(P.MSG_A, (cmid, result[1], result[2])))
                    if result[3]:
                        # acked already: its ACK_N may have been lost with the
                        # connection that lost the MSG_A, so it comes again
                        connection.send(frame(P.ACK_N, (cmid, result[1])))
            elif connection is not None:
                connection.error(result[1], result[2], cmid)
        for (session, _), (_, cursor, newly) in zip(acks.items(), ack_results, strict=True):
            if session.connection is not None:
                session.connection.send(frame(P.ACK_A, (cursor,)))
            for sender, cmid, msg_id in newly:
                target = session_for(sender)
                if target is not None:
                    if target.connection is not None:
                        target.connection.send(frame(P.ACK_N, (cmid, msg_id)))
                        self.acks_out += 1
                elif remote is not None:
                    remote.append((sender, 0, frame(P.ACK_N, (cmid, msg_id))))
        if remote:
            self.router.forward(remote)

    def _failed(self, failure: Failure, messages: list[Any]) -> None:
        # Nothing of the batch is stored; the senders retransmit (no MSG_A
        # came), the receivers ack again.
        log.failure("storing a batch of {n} messages failed", failure, n=len(messages))
        for session, cmid, _, _, _ in messages:
            if session.connection is not None:
                session.connection.error(503, "not stored, send again", cmid)

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

    def _push(self, session: Any, seq: int, msg_n: bytes, now: float) -> None:
        unacked = session.unacked
        if unacked is None:
            unacked = session.unacked = deque()
        elif len(unacked) >= MAX_UNACKED:
            # A client that does not ack is dropped rather than buffered
            # without end; it pulls what it missed after its next login.
            session.connection.abort()
            return
        session.connection.send(msg_n)
        self.pushed += 1
        if not unacked:
            self._awaiting.add(session)
        unacked.append((seq, msg_n, now))

    # several nodes

    def forwarded(self, packets: list[tuple[int, int, bytes]]) -> None:
        """Frames another node stored or acked for users whose sessions are
        here: MSG_Ns (seq > 0) wait for their ACK_R as any push does."""
        now = self.clock.seconds()
        session_for = self.router.session_for
        for uid, seq, packet in packets:
            target = session_for(uid)
            if target is None or target.connection is None:
                continue  # in the inbox: pulled after the next RESUMED
            if seq:
                if seq <= target.acked_max or _pushed(target.unacked, seq):
                    continue  # a catch-up pushed it before its publication came
                self._push(target, seq, packet, now)
            else:
                target.connection.send(packet)

    @inlineCallbacks
    def catch_up(self) -> Any:
        """Push what is in the inboxes of this node's connected users and
        was neither pushed nor told at WELCOME/RESUMED: publications of
        other nodes are lost while Redis or a node is away (housekeeping,
        and after Redis comes back)."""
        connected = {s.uid: s for s in self.router.sessions() if s.connection is not None}
        if not connected:
            return
        heads = yield self.store.inbox_heads(list(connected))
        for uid, (head, acked) in heads.items():
            session = connected[uid]
            after = max(acked, session.pull_max, session.acked_max)
            if head <= after or session.connection is None:
                continue
            pending = {seq for seq, _, _ in session.unacked or ()}
            if len(pending) >= head - after and all(
                    seq in pending for seq in range(after + 1, head + 1)):
                continue  # all pushed, waiting for the ack
            entries, _ = yield self.store.inbox(uid, after, RESEND_AT_ONCE)
            if session.connection is None or session.ended:
                continue
            # pushed or acked meanwhile (a publication came during the read)
            pending = {seq for seq, _, _ in session.unacked or ()}
            acked_max = session.acked_max
            now = self.clock.seconds()
            for seq, msg_id, sender, group, body, ts in entries:
                if seq in pending or seq <= acked_max:
                    continue
                fields = (seq, msg_id, sender, body, ts) + ((group,) if group else ())
                self._push(session, seq, frame(P.MSG_N, fields), now)
                self.caught_up += 1

    # timers

    def resend_late(self) -> None:
        """Send again the MSG_Ns whose ACK_R is later than ``retransmit``
        seconds, at most RESEND_AT_ONCE per connection and round."""
        now = self.clock.seconds()
        due = now - self.retransmit
        for session in list(self._awaiting):
            unacked = session.unacked
            connection = session.connection
            if not unacked or connection is None:
                self._awaiting.discard(session)
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
