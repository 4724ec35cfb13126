"""The TCP long connection: bytes in, calls on the logic layer out.

The protocol is a thin adapter.  Frames go through the sans-IO ``Decoder``;
each packet is dispatched by its class to the logic layer, which sees the
connection as an ``IConnection`` and hands it packets of its own
(``im58d.logic.packets``); they are encoded here, queued, and go out in one
write per connection at the end of the reactor turn (``Outbox``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..logic import packets as L
from ..logic.auth import LoginRefused
from ..logic.interfaces import IConnection
from ..logic.messages import Messenger
from ..logic.sessions import ResumeRefused, SessionManager
from ..wire import Decoder, WireError, encode, frame
from ..wire import packets as P

log = Logger()

PONG = encode(P.Pong())
CLOSE_GRACE = 2.0
# seconds a client may leave the server's writes unread (a full buffer)
STALL_LIMIT = 60.0
# packets a client may send behind LOGIN before WELCOME
MAX_HELD = 32

# logic packet class -> (type byte, number of fields that are never left out)
_WIRE: dict[Any, tuple[int, int]] = {
    cls: (code, len(cls._fields) - len(cls._field_defaults))
    for code, cls in L.BY_CODE.items()
}


def encode_packet(packet: Any) -> bytes:
    """The frame of one of the logic layer's packets; unset optional
    trailing fields are left out, as in ``im58d.wire.encode``."""
    code, required = _WIRE[type(packet)]
    if code == P.ONLINE:
        return encode(P.Online(packet.uids))
    end = len(packet)
    while end > required and packet[end - 1] is None:
        end -= 1
    return frame(code, packet if end == len(packet) else packet[:end])


class Outbox:
    """Connections with frames queued in this reactor turn.

    Coalescing a turn's frames into one ``transport.write`` per connection
    is the largest single saving on the message path.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._dirty: list[AccessProtocol] = []
        self._scheduled = False

    def mark(self, connection: AccessProtocol) -> None:
        self._dirty.append(connection)
        if not self._scheduled:
            self._scheduled = True
            self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.write_out()


@implementer(IConnection)
class AccessProtocol(Protocol):
    """One client connection.  Its device's session, once it has one,
    outlives it."""

    factory: AccessFactory

    def __init__(self, factory: AccessFactory) -> None:
        self.factory = factory
        self.decoder = Decoder(factory.max_frame)
        self.device: Any = None
        self.address = ""
        self.last_seen = 0.0
        self.connected_at = 0.0
        self._out: list[bytes] = []
        self._closing = False
        self._lost = False
        self._socket: Any = None
        # since when the client has not read what we write (None: it reads)
        self._stalled_since: float | None = None
        # packets that arrived while a LOGIN or RESUME was being checked
        self._held: list[Any] | None = None
        self._dispatch: dict[type, Callable[[Any], None]] = {
            P.Login: self._on_login,
            P.Resume: self._on_resume,
            P.Ping: self._on_ping,
        }

    # IProtocol

    def connectionMade(self) -> None:
        peer: IAddress = self.transport.getPeer()  # type: ignore[union-attr]
        self.address = getattr(peer, "host", str(peer))
        self.connected_at = self.last_seen = self.factory.clock.seconds()
        self.factory.connections.add(self)
        transport: Any = self.transport
        transport.registerProducer(self, True)
        # small frames must leave at once, not wait for the peer's delayed ACK
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        # a plain TCP transport, whose socket write_out may use directly
        if isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False):
            self._socket = transport.socket

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.last_seen = self.factory.clock.seconds()
        try:
            for packet in self.decoder.feed(data):
                if self._held is not None:
                    if len(self._held) >= MAX_HELD:
                        self.refuse(400, "too many packets before WELCOME")
                        return
                    self._held.append(packet)
                    continue
                self._dispatch.get(type(packet), self._unexpected)(packet)
                if self._closing:
                    return
        except WireError as e:
            self.refuse(e.code, str(e))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self._closing = True
        self._out = []
        self.factory.forget(self)
        device, self.device = self.device, None
        if device is not None:
            self.factory.sessions.connection_lost(device, self)

    # IPushProducer: the transport's write buffer is full, so the client is
    # not reading; stop reading from it until it catches up.

    def pauseProducing(self) -> None:
        if self._stalled_since is None:
            self._stalled_since = self.factory.clock.seconds()
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self._stalled_since = None
        if not self._closing:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        pass

    @property
    def congested(self) -> bool:
        """Whether the client leaves what the server writes unread."""
        return self._stalled_since is not None

    def stop_reading(self) -> None:
        """Read nothing more from this client (the server is stopping)."""
        self.transport.pauseProducing()  # type: ignore[union-attr]

    # IConnection

    def send(self, packet: Any) -> None:
        if self._closing:
            return
        code, required = _WIRE[type(packet)]
        # the message path's packets have no optional fields (MSG_A, ACK_A,
        # ACK_N), or all of them unset (MSG_N of a 1:1 message): framed here
        # without the general encoder
        if required != len(packet):
            if packet[-1] is None and packet[required] is None:
                packet = packet[:required]
            else:
                self._queue(encode_packet(packet))
                return
        if not self._out:
            self.factory.outbox.mark(self)
        self._out.append(frame(code, packet))

    def _queue(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._out:
            self.factory.outbox.mark(self)
        self._out.append(data)

    def error(self, code: int, message: str, ref: int | None = None) -> None:
        """Answer ERROR and keep the connection."""
        self._queue(encode(P.Error(code, message, ref)))

    def close(self) -> None:
        """Write what is queued and close.

        Closing a socket with unread input makes the kernel send RST, which
        can destroy the last packets before the client reads them; so only
        the write side is shut, what the client still sends is ignored, and
        the connection is dropped when the client closes or after a grace
        time.
        """
        if self._closing:
            return
        self.write_out()
        self._closing = True
        self.device = None
        transport: Any = self.transport
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        half_close()
        transport.resumeProducing()  # to see the client's close, even if paused
        self.factory.clock.callLater(CLOSE_GRACE, self._abort_if_open)

    def abort(self) -> None:
        """Drop a connection that went silent or stuck; its device lingers."""
        self._closing = True
        self._abort_if_open()

    def _abort_if_open(self) -> None:
        if not self._lost:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def refuse(self, code: int, message: str) -> None:
        """Answer ERROR and close."""
        self.error(code, message)
        self.close()

    def write_out(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out = []
        transport: Any = self.transport
        sock = self._socket
        if (
            sock is not None
            and transport._tempDataLen == 0
            and transport.offset == len(transport.dataBuffer)
            and transport.connected
            and not transport.disconnecting
        ):
            # Nothing is queued in Twisted's buffer, so the kernel may take
            # the bytes now; transport.write would register the socket for
            # writing and send on the next turn, two epoll_ctl calls and an
            # extra reactor turn per write.  What does not fit goes through
            # transport.write as usual.
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # transport.write below meets the error and reports it
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    # packets

    def _unexpected(self, packet: Any) -> None:
        cls = type(packet)
        if cls is P.UnknownPacket:
            self.error(501, f"unknown packet type 0x{packet.type:02x}")
        elif self.device is None:
            self.refuse(401, "log in first")
        elif cls is P.Login or cls is P.Resume:
            self.refuse(400, "already logged in")
        elif P.TYPE_OF[cls] in P.CLIENT_TYPES:
            self.error(501, f"{cls.__name__} is not supported by this server")
        else:
            self.refuse(400, f"{cls.__name__} is sent by servers, not clients")

    def _on_ping(self, packet: P.Ping) -> None:
        self._queue(PONG)

    def _hold(self) -> None:
        """Until a LOGIN or RESUME is decided, packets behind it wait, and no
        more is read (the check may take a while)."""
        self._held = []
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def _on_login(self, packet: P.Login) -> None:
        self._hold()
        d = self.factory.sessions.login(
            packet.user,
            packet.password,
            packet.device_id,
            packet.device_name or "",
            self.address,
            packet.client,
            self,
            self._open,
        )
        d.addCallbacks(self._signed_in, self._login_failed)

    def _open(self) -> bool:
        return not self._closing

    def _signed_in(self, result: tuple[Any, Any] | None) -> None:
        """WELCOME or RESUMED went out (the logic layer sends it first): the
        device is this connection's, then comes what was held behind."""
        if result is None:  # the connection went away meanwhile
            return
        self.device = result[0]
        self._dispatch = self.factory.logged_in_dispatch(self)
        self._release_held()

    def _login_failed(self, failure: Failure) -> None:
        if failure.check(LoginRefused):
            refused: LoginRefused = failure.value  # type: ignore[assignment]
            self.refuse(refused.code, refused.message)
        else:
            log.failure("login failed", failure)
            self.refuse(503, "server error, try again")

    def _release_held(self) -> None:
        held, self._held = self._held or [], None
        if not self._closing:
            self.transport.resumeProducing()  # type: ignore[union-attr]
        for packet in held:
            if self._closing:
                return
            self._dispatch.get(type(packet), self._unexpected)(packet)

    def _on_resume(self, packet: P.Resume) -> None:
        self._hold()
        d = self.factory.sessions.resume(
            packet.session_id, packet.ts, packet.nonce, packet.mac, self, self._open
        )
        d.addCallbacks(self._signed_in, self._resume_failed)

    def _resume_failed(self, failure: Failure) -> None:
        if failure.check(ResumeRefused):
            # the connection stays: the client logs in on it instead
            self.error(409, f"resume rejected: {failure.getErrorMessage()}")
            self._release_held()
        else:
            log.failure("resume failed", failure)
            self.refuse(503, "server error, try again")

    def _on_bye(self, packet: P.Bye) -> None:
        device, self.device = self.device, None
        self.factory.sessions.bye(device)
        self.close()

    def _on_msg_r(self, packet: P.MsgR) -> None:
        self.factory.messenger.on_msg_r(
            self.device, packet.cmid, packet.to, packet.body, packet.kind or 0
        )

    def _on_ack_r(self, packet: P.AckR) -> None:
        self.factory.messenger.on_ack_r(self.device, packet.seq)


class AccessFactory(Factory[AccessProtocol]):
    """Builds access connections and keeps the set of them."""

    def __init__(
        self,
        sessions: SessionManager,
        messenger: Messenger,
        clock: IReactorTime,
        max_frame: int = 65536,
        login_timeout: float = 60,
    ) -> None:
        self.sessions = sessions
        self.messenger = messenger
        self.clock = clock
        self.max_frame = max_frame
        self.login_timeout = login_timeout
        self.outbox = Outbox(clock)
        self.connections: set[AccessProtocol] = set()
        self._closed_waiters: list[Deferred[None]] = []

    @property
    def idle_timeout(self) -> float:
        """PROTOCOL.md 1.3: silent for ``2 × heartbeat + 30`` seconds."""
        return 2 * self.sessions.heartbeat + 30

    def buildProtocol(self, addr: IAddress | None) -> AccessProtocol:
        return AccessProtocol(self)

    @staticmethod
    def logged_in_dispatch(p: AccessProtocol) -> dict[type, Callable[[Any], None]]:
        return {
            P.MsgR: p._on_msg_r,
            P.AckR: p._on_ack_r,
            P.Ping: p._on_ping,
            P.Bye: p._on_bye,
        }

    def sweep(self) -> None:
        """Close connections that went silent, or that have not read what the
        server wrote for STALL_LIMIT seconds (housekeeping).  Their devices
        linger; what was not delivered is in the timeline."""
        now = self.clock.seconds()
        idle = self.idle_timeout
        for connection in list(self.connections):
            if connection.device is None:
                late = now - connection.connected_at > self.login_timeout
            else:
                late = now - connection.last_seen > idle
            stalled = connection._stalled_since
            if late or (stalled is not None and now - stalled > STALL_LIMIT):
                connection.abort()

    def kick_all(self, reason: int) -> None:
        """KICKED ``reason`` to every connection, then close (shutdown): the
        devices stay online in the store and linger after the restart."""
        kicked = encode(P.Kicked(reason))
        for connection in list(self.connections):
            connection._queue(kicked)
            connection.close()

    def forget(self, connection: AccessProtocol) -> None:
        self.connections.discard(connection)
        if not self.connections and self._closed_waiters:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def wait_closed(self, timeout: float) -> Deferred[None]:
        """Fires when every connection is gone; after ``timeout`` seconds the
        stragglers are aborted."""
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        timer = self.clock.callLater(timeout, self._abort_all)
        d.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return d

    def _abort_all(self) -> None:
        for connection in list(self.connections):
            connection.abort()
