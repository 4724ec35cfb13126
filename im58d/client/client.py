"""The reference client: what a good mobile app does with an im58d server
(contract version 2, ``PROTOCOL.md``).

- signs its device in once (LOGIN with the device id of its installation
  and, that one time, the password), then only RESUMEs the session: the
  password is forgotten after WELCOME and never written down.  A session
  that ends (KICKED 1, 2, 4, 5, RESUME refused, credentials refused) stops
  the client and is told to the app (``on_session_lost``); KICKED 3 (the
  server stops) is followed by a jittered reconnect and RESUME;
- reconnects by itself with jittered backoff, the last server first, and
  tells the app when the server stays unreachable (``on_unreachable``) or
  its TLS certificate is refused (``on_tls_refused``), and when it is back
  (``on_reachable``);
- keeps an ack-wait queue: every MSG_R is sent again until its MSG_A comes,
  also after a reconnect; cmids go on above WELCOME's ``last_cmid``, and a
  cmid the server holds for another message (ERROR 409) is replaced by a new
  one, the message sent again (``ClientState``);
- keeps its place in the user's timeline: shows each entry once and in seq
  order, counts the seq of its own MSG_A as received, acks cumulatively the
  highest seq held without a gap, pulls the gap over HTTP after
  WELCOME/RESUMED and whenever a seq is missing; the user's messages sent
  from other devices are shown as copies (``Message.to`` / ``group`` with
  ``sender`` = the user);
- tells the app, per sent message, "sent", "stored" (MSG_A) and "delivered"
  (ACK_N naming the message's seq, the pulled timeline, or
  ``POST /v1/status``);
- with a ``Sync``, keeps a local cache of lists and details in step after
  WELCOME, RESUMED and CHANGED (``im58d.client.sync``).
"""

from __future__ import annotations

import base64
import random
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent
from zope.interface import implementer

from .. import __version__
from ..proof import resume_mac
from ..wire import Decoder, WireError, encode
from ..wire import packets as P
from .report import Reporter
from .state import ClientState
from .sync import Sync

log = Logger()

SENT = "sent"
STORED = "stored"
DELIVERED = "delivered"
FAILED = "failed"

# on_session_lost's reasons: the client has stopped for good
REPLACED = "replaced"  # KICKED 1: another client of this device signed in or resumed
EXPIRED = "expired"  # KICKED 2: the session was unused too long
DISABLED = "disabled"  # KICKED 4, or ERROR 403 to LOGIN: the account is disabled
SIGNED_OUT = "signed out"  # KICKED 5: signed out from another device, or evicted
UNAUTHORIZED = "unauthorized"  # ERROR 401 to LOGIN: bad credentials
THROTTLED = "throttled"  # ERROR 429 to LOGIN: too many failed attempts for now
RESUME_REFUSED = "resume refused"  # ERROR 409 to RESUME, and no password to LOGIN with
NO_CREDENTIALS = "no credentials"  # neither a session nor a password

_KICKED = {
    P.KICKED_REPLACED: REPLACED,
    P.KICKED_EXPIRED: EXPIRED,
    P.KICKED_DISABLED: DISABLED,
    P.KICKED_SIGNED_OUT: SIGNED_OUT,
}

# ERRORs with ref that mean "this message will never be stored"
FINAL_REFUSALS = frozenset((403, 404, 413, 501))
# the growth of the cmid jump after repeated ERROR 409s (a counter far behind)
MAX_CMID_SKIP = 1 << 16
# ACK_Ns kept for seqs whose MSG_A has not come yet
EARLY_ACK_NS = 1024
# seconds a connection may go without WELCOME or RESUMED before the client
# gives it up and tries again
SIGN_IN_TIMEOUT = 30.0
# seconds an ACK_R that would only cover this device's own sent messages
# waits: the next ACK_R for a received message covers them at no cost (the
# six packets of a message stay six), and BYE sends it at once
OWN_ACK_DELAY = 30.0
# seconds between KICKED 3 (server shutdown) and the reconnect, at most:
# clients spread over them rather than all coming back at once
SHUTDOWN_SPREAD = 5.0

CLIENT = f"im58d-client/{__version__}"


class Message(NamedTuple):
    """A timeline entry, as the app shows it: a message received, or a copy
    of one the user sent from another device (``sender`` is the user, and
    ``to`` names the receiver, or ``group`` the group)."""

    seq: int
    msg_id: int
    sender: int
    body: str | bytes
    ts: int
    group: int | None = None
    to: int | None = None


class Outgoing:
    """A message sent from this device and what is known of it.  Its cmid
    may change (ERROR 409: the server holds that cmid for another message);
    the object stays the same."""

    def __init__(self, cmid: int, to: int, body: str | bytes, kind: int) -> None:
        self.cmid = cmid
        self.to = to
        self.body = body
        self.kind = kind
        self.msg_id: int | None = None
        self.seq: int | None = None  # its entry in the user's timeline (MSG_A)
        self.state = SENT
        self.error: tuple[int, str] | None = None
        self.sent_at: float | None = None  # last MSG_R on the wire
        self.transmissions = 0

    def __repr__(self) -> str:
        return (f"<Outgoing cmid={self.cmid} to={self.to} {self.state} "
                f"msg_id={self.msg_id} seq={self.seq}>")


# (host, port, tls) of an access server
Server = tuple[str, int, bool]


@implementer(IOpenSSLClientConnectionCreator)
class _ResumingTLS:
    """Client TLS options that offer the last TLS session of the server again,
    so that a reconnect resumes it instead of a full handshake."""

    def __init__(self, options: Any) -> None:
        self._options = options
        self.session: Any = None

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        connection = self._options.clientConnectionForTLS(tls_protocol)
        if self.session is not None:
            connection.set_session(self.session)
        return connection


class LoginFailed(Exception):
    """``start()`` failed: the client could not sign in and has stopped
    (``reason`` is the one ``on_session_lost`` gets; ``code`` the ERROR or
    KICKED code, 0 when there was none)."""

    def __init__(self, code: int, message: str, reason: str = UNAUTHORIZED) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.reason = reason


def _tls_refusal(reason: Failure | None) -> bool:
    """Whether a connection was lost because its TLS handshake failed (the
    certificate was not trusted, or not the server's)."""
    if reason is None:
        return False
    return reason.check(SSL.Error) is not None or getattr(reason.type, "__name__", "") in (
        "VerificationError", "CertificateError")


class _Wire(Protocol):
    """The connection: frames to packets, packets to the Client."""

    def __init__(self, client: Client, server: Server | None = None) -> None:
        self.client = client
        self.server = server
        self.decoder = Decoder()

    def connectionMade(self) -> None:
        self.client._connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.last_received = self.client.clock.seconds()
        try:
            for packet in self.decoder.feed(data):
                if self.client._wire is not self:
                    return  # the client let go of this connection
                self.client._dispatch(self, packet)
        except WireError as e:
            log.warn("bad frame from the server: {e}", e=e)
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.client._disconnected(self, reason)

    def send(self, *packets: Any) -> None:
        self.transport.write(b"".join(encode(p) for p in packets))  # type: ignore[union-attr]
        self.client.last_sent = self.client.clock.seconds()


class Client:
    """One device's connection to an im58d server, for one account.

    ``password`` is needed only while the state holds no session: the first
    LOGIN uses it, WELCOME makes the client forget it.  ``device`` is the
    device's name (LOGIN's ``device_name``); its id is the state's.
    """

    def __init__(
        self,
        reactor: Any,
        host: str | None,
        port: int | None,
        http_url: str,
        user: str,
        password: str | None = None,
        device: str = "im58d-client",
        state: ClientState | None = None,
        on_message: Callable[[Message], None] | None = None,
        on_status: Callable[[Outgoing], None] | None = None,
        on_presence: Callable[[int, bool], None] | None = None,
        on_changed: Callable[[str, int], None] | None = None,
        resend_after: float = 5.0,
        min_backoff: float = 0.25,
        max_backoff: float = 30.0,
        http: Any = None,
        max_body: int = 4096,
        ca_cert: str | None = None,
        send_window: int = 32,
        sync: Sync | None = None,
        reporter: Reporter | None = None,
        on_online: Callable[[tuple[int, ...]], None] | None = None,
        on_session_lost: Callable[[str], None] | None = None,
        on_unreachable: Callable[[str], None] | None = None,
        on_tls_refused: Callable[[str], None] | None = None,
        on_reachable: Callable[[], None] | None = None,
        unreachable_after: float = 30.0,
        client_name: str = CLIENT,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor
        # an access server to use until the IP list is known (optional)
        self.first_server: Server | None = (host, port, False) if host and port else None
        self.ca_cert = ca_cert
        self.send_window = send_window
        self.http_url = http_url.rstrip("/")
        self.user = user
        self.password = password
        self.device = device
        self.client_name = client_name
        self.state = state or ClientState()
        self.on_message = on_message or (lambda message: None)
        self.on_status = on_status or (lambda outgoing: None)
        self.on_presence = on_presence or (lambda uid, online: None)
        self.on_changed = on_changed or (lambda what, version: None)
        self.on_online = on_online or (lambda uids: None)
        self.on_session_lost = on_session_lost or (lambda reason: None)
        self.on_unreachable = on_unreachable or (lambda detail: None)
        self.on_tls_refused = on_tls_refused or (lambda detail: None)
        self.on_reachable = on_reachable or (lambda: None)
        self.resend_after = resend_after
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.unreachable_after = unreachable_after
        self.max_body = max_body
        self.http = http or HTTPClient(Agent(reactor))
        # the cache of lists and details, synced after WELCOME, RESUMED, CHANGED
        self.sync = sync
        if sync is not None:
            sync.attach(self)
        # the log-report recorder: sends at the first login and before BYE
        self.reporter = reporter
        if reporter is not None:
            reporter.attach(self)
        # session
        session = self.state.session
        self.uid: int | None = session["uid"] if session else None
        self.token: str | None = session["token"] if session else None
        self.heartbeat_s = 240
        self.lost: str | None = None  # why the session was lost, once it was
        self._wire: _Wire | None = None
        self._logged_in = False
        self._stopping = False
        # after KICKED 1 another client owns this device and its state file
        self._frozen = False
        self._backoff = min_backoff
        self._reconnect_after = 0.0  # the least wait before the next attempt
        self._retry: Any = None
        self._tick: Any = None
        self._started: Deferred[None] | None = None
        self._avoid: Server | None = None  # the server that just failed
        self._tls: dict[Server, _ResumingTLS] = {}
        self._fetching_iplist = False
        # since when there is no session on a connection; what went wrong
        self._down_since: float | None = None
        self._problem = ""
        self._told_unreachable = False
        self._told_tls = False
        self.last_sent = 0.0
        self.last_received = 0.0
        self._wire_since = 0.0  # when the current connection was made
        # sending: the ack-wait queue (cmid -> Outgoing, until MSG_A) and the
        # stored messages waiting to be delivered (seq -> Outgoing)
        self.waiting: dict[int, Outgoing] = {}
        self.undelivered: dict[int, Outgoing] = {}
        # ACK_Ns that came before the MSG_A of their seq
        self._early_acks: deque[int] = deque(maxlen=EARLY_ACK_NS)
        self._cmid_skip = 1
        # MSG_Rs on the current connection without MSG_A (at most send_window)
        self._on_wire = 0
        for cmid, (to, body, kind) in self.state.unsent.items():
            self.waiting[cmid] = Outgoing(cmid, to, body, kind)
        # receiving: entries above a gap, shown once the gap is filled
        self._ahead: dict[int, Message] = {}
        # the user's own messages, maybe sent from here with the MSG_A still
        # to come: shown as copies once no waiting message can be them
        self._unsure: dict[int, Message] = {}
        self._gap_since: float | None = None
        self._inbox_max = 0
        self._server_acked = 0
        self._pulling = False
        self._ack_due = False
        self._own_ack: Any = None  # the delayed ACK_R for own messages only
        self._acked = 0  # the last seq sent in an ACK_R on this connection
        self._lost_waiter: Deferred[None] | None = None
        # counters
        self.retransmits = 0
        self.renumbered = 0
        self.duplicates = 0
        self.logins = 0
        self.resumes = 0

    # the app's side

    def start(self) -> Deferred[None]:
        """Connect and sign in (RESUME the state's session, else LOGIN with
        the password); fires at the first WELCOME or RESUMED, fails with
        ``LoginFailed`` when the client cannot sign in.  From then on the
        client reconnects by itself until ``stop()`` or a lost session."""
        self._started = Deferred()
        started = self._started
        self._stopping = False
        self._frozen = False
        self.lost = None
        if self.state.session is None and self.password is None:
            self._lose(NO_CREDENTIALS, 0, "no session to resume and no password")
            return started
        self._down_since = self.clock.seconds()
        self._tick = self.clock.callLater(1.0, self._every_second)
        self._connect()
        return started

    def send(self, to: int, body: str | bytes, kind: int = P.KIND_USER) -> Outgoing:
        """Send a message; it is queued until the server has stored it.

        A body over ``max_body`` bytes (the server's limit) fails at once,
        without a cmid: the server would refuse it.
        """
        size = len(body.encode("utf-8")) if isinstance(body, str) else len(body)
        if size > self.max_body:
            outgoing = Outgoing(0, to, body, kind)
            outgoing.error = (413, f"body over {self.max_body} bytes")
            self._set(outgoing, FAILED)
            return outgoing
        cmid = self.state.take_cmid()
        self.state.unsent[cmid] = (to, body, kind)
        self._save()
        outgoing = Outgoing(cmid, to, body, kind)
        self.waiting[cmid] = outgoing
        self._pump()
        return outgoing

    @inlineCallbacks
    def refresh_status(self) -> Any:
        """Ask the server which stored messages were delivered (when ACK_Ns were
        missed); returns the newly delivered ones."""
        by_id = {o.msg_id: seq for seq, o in self.undelivered.items()}
        if not by_id or self.token is None:
            return []
        answer = yield self._post("/v1/status", {"msg_ids": list(by_id)})
        delivered = []
        for msg_id in answer["delivered"]:
            outgoing = self.undelivered.pop(by_id.get(msg_id, -1), None)
            if outgoing is not None:
                self._set(outgoing, DELIVERED)
                delivered.append(outgoing)
        return delivered

    def devices(self) -> Deferred[list[dict[str, Any]]]:
        """The user's signed-in devices (``GET /v1/devices``), each
        ``{"id", "name", "current", "online", "last_seen", "push"}``, the
        id as base64url."""
        if self.token is None:
            return fail(RuntimeError("not signed in"))
        return self._get("/v1/devices").addCallback(lambda body: body["devices"])

    @inlineCallbacks
    def sign_out(self, device_id: str | None = None) -> Any:
        """Sign a device out (``DELETE /v1/devices/<id>``; None: this one,
        whose session then ends: KICKED 5 and ``on_session_lost``)."""
        if self.token is None:
            raise RuntimeError("not signed in")
        url = f"{self.http_url}/v1/devices/{device_id or 'current'}"
        response = yield self.http.delete(url, headers=self._headers())
        yield response.content()
        if response.code != 204:
            raise RuntimeError(f"HTTP {response.code}")

    def stop(self) -> Deferred[None]:
        """Say BYE and stop reconnecting (with a reporter: once it has sent
        its last batches, or given up for this run)."""
        self._stopping = True
        for call in (self._retry, self._tick, self._own_ack):
            if call is not None and call.active():
                call.cancel()
        if self.reporter is not None:
            return self.reporter.exited().addCallback(lambda _: self._bye())
        return self._bye()

    def _bye(self) -> Deferred[None]:
        wire = self._wire
        if wire is None:
            return succeed(None)
        lost: Deferred[None] = Deferred()
        self._lost_waiter = lost
        if self._own_ack is not None and self._own_ack.active():
            self._own_ack.cancel()
        if self._logged_in:
            last = self.state.last_seq or 0
            if last > self._acked:  # own messages not acked yet
                wire.send(P.AckR(last))
            wire.send(P.Bye())
        wire.transport.loseConnection()  # type: ignore[union-attr]
        return lost

    @property
    def connected(self) -> bool:
        return self._logged_in

    def _save(self) -> None:
        if not self._frozen:
            self.state.save()

    # connection

    def _servers(self) -> list[Server]:
        servers = [(s["host"], s["port"], s["tls"]) for s in self.state.servers]
        if not servers and self.first_server is not None:
            servers = [self.first_server]
        return servers

    def _weights(self) -> dict[Server, int]:
        weights = {(s["host"], s["port"], s["tls"]): s["weight"] for s in self.state.servers}
        return weights

    def choose(self) -> Server | None:
        """The server to connect to: the last one used, unless it just failed
        or left the list; else one at random by weight."""
        servers = self._servers()
        if not servers:
            return None
        last = self.state.last_server
        if last in servers and last != self._avoid:
            return last
        others = [s for s in servers if s != self._avoid] or servers
        weights = self._weights()
        return random.choices(others, [weights.get(s, 1) for s in others])[0]

    def _connect(self) -> None:
        self._retry = None
        if self._stopping:
            return
        server = self.choose()
        if server is None:  # no address yet: ask for the IP list first
            d = self._fetch_iplist()
            d.addCallbacks(lambda _: self._connect(), self._connect_failed)
            return
        host, port, tls = server
        endpoint: Any
        if tls:
            endpoint = SSL4ClientEndpoint(self.reactor, host, port, self._tls_options(server),
                                          timeout=10)
        else:
            endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=10)
        d = connectProtocol(endpoint, _Wire(self, server))
        d.addErrback(self._connect_failed, server)

    def _tls_options(self, server: Server) -> _ResumingTLS:
        options = self._tls.get(server)
        if options is None:
            trust = None
            if self.ca_cert is not None:
                with open(self.ca_cert, "rb") as f:
                    trust = Certificate.loadPEM(f.read())
            # verifies the certificate for the address with service-identity
            options = self._tls[server] = _ResumingTLS(
                optionsForClientTLS(server[0], trustRoot=trust)
            )
        return options

    def _connect_failed(self, failure: Failure, server: Server | None = None) -> None:
        self._problem = failure.getErrorMessage()
        log.info("cannot connect to {server}: {e}", server=server, e=self._problem)
        self._avoid = server
        self._reconnect_later()

    def _reconnect_later(self) -> None:
        if self._stopping:
            return
        if self._retry is not None and self._retry.active():
            return
        # jittered: clients that lost the server together do not come back
        # together
        delay = max(self._backoff * (0.5 + random.random()), self._reconnect_after)
        self._reconnect_after = 0.0
        self._backoff = min(self._backoff * 2, self.max_backoff)
        self._retry = self.clock.callLater(delay, self._connect)

    def _connected(self, wire: _Wire) -> None:
        if self._stopping:
            wire.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._wire = wire
        self.last_received = self._wire_since = self.clock.seconds()
        session = self.state.session
        if session is None:
            if self.password is None:
                self._lose(NO_CREDENTIALS, 0, "no session to resume and no password")
                return
            self._save()  # the device id is the installation's from now on
            wire.send(P.Login(self.user, self.password, self.state.device_id, self.device,
                              self.client_name))
            return
        # prove the session key: one round trip, no password, no new session
        ts = int(self.clock.seconds())
        nonce = self.state.take_nonce(self.clock.seconds())
        self._save()  # a nonce is never used twice, even after a crash
        mac = resume_mac(session["session_key"], session["session_id"], ts, nonce)
        wire.send(P.Resume(session["session_id"], ts, nonce, mac))

    def _disconnected(self, wire: _Wire, reason: Failure | None = None) -> None:
        if wire is not self._wire:
            return
        self._wire = None
        signed_in = self._logged_in
        self._logged_in = False
        now = self.clock.seconds()
        if self._down_since is None:
            self._down_since = now
        if not signed_in and _tls_refusal(reason):
            assert reason is not None
            self._avoid = wire.server
            self._problem = f"TLS refused: {reason.getErrorMessage()}"
            log.warn("{server}: {problem}", server=wire.server, problem=self._problem)
            if not self._told_tls:
                self._told_tls = True
                self.on_tls_refused(reason.getErrorMessage())
        elif not signed_in and reason is not None:
            self._problem = reason.getErrorMessage()
        waiter = self._lost_waiter
        if waiter is not None:
            self._lost_waiter = None
            waiter.callback(None)
        self._reconnect_later()

    def _dispatch(self, wire: _Wire, packet: Any) -> None:
        handler = self._handlers.get(type(packet))
        if handler is not None:
            handler(self, packet)

    def _on_welcome(self, welcome: P.Welcome) -> None:
        state = self.state
        if state.uid != welcome.uid:
            # no place in this account's timeline yet: the device's cursor
            state.uid = welcome.uid
            state.last_seq = None
            state.mine = set()
            self._ahead.clear()
        if state.last_seq is None:
            state.last_seq = welcome.acked
        # the device's cmids go on above the highest the server holds
        state.next_cmid = max(state.next_cmid, welcome.last_cmid + 1)
        self.password = None  # a session from now on, never the password
        self.uid = welcome.uid
        self.token = welcome.token
        self.heartbeat_s = welcome.heartbeat_s
        state.session = {
            "uid": welcome.uid,
            "session_id": welcome.session_id,
            "session_key": welcome.session_key,
            "token": welcome.token,
            "nonce": 0,
        }
        self.logins += 1
        self._logged_in_with(welcome.inbox_max, welcome.iplist_version, welcome.acked)

    def _on_resumed(self, resumed: P.Resumed) -> None:
        session = self.state.session
        assert session is not None
        state = self.state
        if state.uid != resumed.uid:
            state.uid = resumed.uid
            state.last_seq = None
            state.mine = set()
            self._ahead.clear()
        if state.last_seq is None:
            state.last_seq = resumed.acked
        self.uid = resumed.uid
        self.token = session["token"]
        self.resumes += 1
        self._logged_in_with(resumed.inbox_max, resumed.iplist_version, resumed.acked)

    def _logged_in_with(self, inbox_max: int, iplist_version: int, acked: int) -> None:
        """WELCOME or RESUMED: the connection carries the session."""
        self._inbox_max = inbox_max
        self._server_acked = self._acked = acked
        self._logged_in = True
        self._backoff = self.min_backoff
        self._avoid = None
        self._down_since = None
        if self._told_unreachable or self._told_tls:
            self._told_unreachable = self._told_tls = False
            self.on_reachable()
        wire = self._wire
        if wire is not None and wire.server is not None:
            self.state.last_server = wire.server
            self._keep_tls_session(wire)
        self._save()
        # what was on the old connection goes again, the oldest first
        for outgoing in self.waiting.values():
            outgoing.sent_at = None
        self._on_wire = 0
        self._pump()
        last = self.state.last_seq or 0
        if self._inbox_max > last:
            self._pull()
        elif last > acked:
            # an ACK_R was lost with the last connection
            self._ack_soon()
        if self.undelivered:
            # ACK_Ns sent while we were away are lost: ask
            self.refresh_status().addErrback(
                lambda f: log.warn("status refresh failed: {e}", e=f.getErrorMessage())
            )
        if iplist_version != self.state.iplist_version and self.state.servers != []:
            self._fetch_iplist().addErrback(
                lambda f: log.warn("IP list refresh failed: {e}", e=f.getErrorMessage())
            )
        if self.sync is not None:
            self._synced(self.sync.run())
        if self.reporter is not None:  # the first login of start(): the app opened
            self.reporter.logged_in(first=self._started is not None)
        started, self._started = self._started, None
        if started is not None:
            started.callback(None)

    def _keep_tls_session(self, wire: _Wire) -> None:
        options = self._tls.get(wire.server) if wire.server else None
        handle: Any = getattr(wire.transport, "getHandle", lambda: None)()
        if options is not None and hasattr(handle, "get_session"):
            options.session = handle.get_session()

    @inlineCallbacks
    def _fetch_iplist(self) -> Any:
        """GET /v1/iplist: the access servers, to connect to by address."""
        if self._fetching_iplist:
            return
        self._fetching_iplist = True
        try:
            response = yield self.http.get(self.http_url + "/v1/iplist")
            iplist = yield self._json(response)
        finally:
            self._fetching_iplist = False
        self.state.iplist_version = iplist["version"]
        self.state.servers = [
            {"host": s["host"], "port": s["port"], "tls": s["tls"], "weight": s["weight"]}
            for s in iplist["servers"]
        ]
        self._save()

    def _on_error(self, error: P.Error) -> None:
        outgoing = self.waiting.get(error.ref) if error.ref is not None else None
        if outgoing is not None:
            if error.code == 409:
                # the server holds this cmid for another message
                self._renumber(outgoing)
            elif error.code in FINAL_REFUSALS:
                self._settled(outgoing)
                outgoing.error = (error.code, error.message)
                self._set(outgoing, FAILED)
                self._recheck_unsure()
            return  # 503 and the like: it is sent again
        if self._logged_in:
            log.warn("server error {code}: {message}", code=error.code, message=error.message)
            return
        wire = self._wire
        if error.code == 409:
            # the session is gone (signed out, expired, or a replay): only the
            # password can sign the device in again
            self.state.session = None
            self.token = None
            self._save()
            if self.password is not None and wire is not None:
                wire.send(P.Login(self.user, self.password, self.state.device_id, self.device,
                                  self.client_name))
            else:
                self._lose(RESUME_REFUSED, error.code, error.message)
        elif error.code == 401:
            self._forget_session()
            self._lose(UNAUTHORIZED, error.code, error.message)
        elif error.code == 403:
            self._forget_session()
            self._lose(DISABLED, error.code, error.message)
        elif error.code == 429:
            self._lose(THROTTLED, error.code, error.message)
        else:
            # 503: the server is stopping or too busy; it closes, we come back
            self._problem = f"{error.code} {error.message}"
            log.warn("sign-in refused for now ({code} {message}); trying again later",
                     code=error.code, message=error.message)
            self._backoff = max(self._backoff, 1.0)

    def _on_kicked(self, kicked: P.Kicked) -> None:
        reason = _KICKED.get(kicked.reason)
        if kicked.reason == P.KICKED_SHUTDOWN or reason is None:
            # the server stops and closes: come back when it may be up again,
            # not all clients at once, and RESUME
            log.info("the server is shutting down; reconnecting")
            self._reconnect_after = random.uniform(0.5, SHUTDOWN_SPREAD)
            wire = self._wire
            if wire is not None:
                wire.transport.loseConnection()  # type: ignore[union-attr]
            return
        if reason == REPLACED:
            # another client uses this device (its state file) now: leave
            # the session and the file to it
            self._frozen = True
        else:
            self._forget_session()
        self._lose(reason, kicked.reason, f"kicked ({reason})")

    def _forget_session(self) -> None:
        self.state.session = None
        self.token = None
        self._save()

    def _lose(self, reason: str, code: int, detail: str) -> None:
        """The client cannot go on (no session, or another client took the
        device): it stops for good and tells the app."""
        self.lost = reason
        self._stopping = True
        for call in (self._retry, self._tick):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._tick = None
        wire = self._wire
        self._wire = None  # nothing more of it is read
        self._logged_in = False
        if wire is not None:
            wire.transport.loseConnection()  # type: ignore[union-attr]
        log.warn("stopped: session lost ({reason}: {detail})", reason=reason, detail=detail)
        started, self._started = self._started, None
        if started is not None:
            started.errback(LoginFailed(code, detail, reason))
        self.on_session_lost(reason)

    # sending

    def _pump(self) -> None:
        """Send waiting messages not yet on this connection, while fewer than
        ``send_window`` wait for their MSG_A: a reconnect with a long queue
        does not pour it all into a connection that may break again."""
        if not self._logged_in:
            return
        for outgoing in self.waiting.values():
            if self._on_wire >= self.send_window:
                return
            if outgoing.sent_at is None:
                self._transmit(outgoing)
                self._on_wire += 1

    def _settled(self, outgoing: Outgoing) -> None:
        """The server has the message (or refused it for good): it leaves the
        ack-wait queue, and the next one may go."""
        del self.waiting[outgoing.cmid]
        self.state.unsent.pop(outgoing.cmid, None)
        self._save()
        if outgoing.sent_at is not None:
            self._on_wire -= 1
        self._pump()

    def _transmit(self, outgoing: Outgoing, again: bool = True) -> None:
        kind = outgoing.kind or None
        assert self._wire is not None
        self._wire.send(P.MsgR(outgoing.cmid, outgoing.to, outgoing.body, kind))
        if outgoing.transmissions and again:
            self.retransmits += 1
        outgoing.transmissions += 1
        outgoing.sent_at = self.clock.seconds()

    def _renumber(self, outgoing: Outgoing) -> None:
        """ERROR 409: the cmid is the server's for another message of this
        device (the counter went back: a restored backup, a copied state).
        The message takes a cmid above every one known, and goes again;
        after repeated 409s the jump grows, so a counter far behind
        catches up in a few round trips."""
        old = outgoing.cmid
        state = self.state
        base = max(state.next_cmid, old + 1, max(self.waiting) + 1)
        new = base + self._cmid_skip - 1
        self._cmid_skip = min(self._cmid_skip * 2, MAX_CMID_SKIP)
        state.next_cmid = new + 1
        outgoing.cmid = new
        self.waiting = {(new if c == old else c): o for c, o in self.waiting.items()}
        state.unsent = {(new if c == old else c): v for c, v in state.unsent.items()}
        self.renumbered += 1
        self._save()
        log.info("cmid {old} is taken on the server: the message goes again as {new}",
                 old=old, new=new)
        if self._logged_in and outgoing.sent_at is not None:
            self._transmit(outgoing, again=False)

    def _on_msg_a(self, msg_a: P.MsgA) -> None:
        outgoing = self.waiting.get(msg_a.cmid)
        if outgoing is None:
            return  # the answer to a retransmit already answered
        self._cmid_skip = 1
        outgoing.msg_id = msg_a.msg_id
        outgoing.seq = msg_a.seq
        # its entry in the timeline counts as received: the next ACK_R
        # covers it (the server never pushes it to this device)
        self._hold_mine(msg_a.seq, msg_a.msg_id)
        self._settled(outgoing)  # saves the state, last_seq included
        if outgoing.kind == P.KIND_USER:
            self.undelivered[msg_a.seq] = outgoing
        self._set(outgoing, STORED)
        if msg_a.seq in self._early_acks and outgoing.kind == P.KIND_USER:
            self._early_acks.remove(msg_a.seq)
            del self.undelivered[msg_a.seq]
            self._set(outgoing, DELIVERED)
        self._unsure.pop(msg_a.msg_id, None)  # pulled before its MSG_A came
        self._recheck_unsure()

    def _on_ack_n(self, ack_n: P.AckN) -> None:
        outgoing = self.undelivered.pop(ack_n.seq, None)
        if outgoing is None:
            # its MSG_A was lost (it comes with the retransmit), or another
            # device of the user sent it
            if ack_n.seq not in self._early_acks:
                self._early_acks.append(ack_n.seq)
            return
        self._set(outgoing, DELIVERED)

    def _set(self, outgoing: Outgoing, state: str) -> None:
        outgoing.state = state
        self.on_status(outgoing)

    # receiving

    def _on_msg_n(self, msg_n: P.MsgN) -> None:
        self._receive(Message(*msg_n))
        if self._ahead and not self._pulling:
            self._pull()  # a seq is missing

    def _hold_mine(self, seq: int, msg_id: int) -> None:
        """This device's own message has ``seq``: received, never shown."""
        if seq <= (self.state.last_seq or 0):
            return
        held = self._ahead.get(seq)
        if held is not None:
            if held.msg_id != msg_id:
                return  # not this message's entry: the server says otherwise
            del self._ahead[seq]  # pulled above a gap before its MSG_A came
        self.state.mine.add(seq)
        self._advance()
        if self._own_ack is None or not self._own_ack.active():
            self._own_ack = self.clock.callLater(OWN_ACK_DELAY, self._send_ack)

    def _receive(self, message: Message) -> None:
        seq = message.seq
        last = self.state.last_seq or 0
        if seq in self.state.mine:
            pass  # this device's own message
        elif seq <= last or seq in self._ahead:
            self.duplicates += 1  # shown already: ack again, show nothing
        else:
            self._ahead[seq] = message
            self._advance()
        self._ack_soon()

    def _advance(self) -> None:
        """Move last_seq over the entries held without a gap, showing them."""
        ahead, mine = self._ahead, self.state.mine
        last = self.state.last_seq or 0
        while True:
            nxt = last + 1
            if nxt in ahead:
                last = self.state.last_seq = nxt
                self._show(ahead.pop(nxt))
            elif nxt in mine:
                mine.discard(nxt)
                last = self.state.last_seq = nxt
            else:
                break
        if mine and min(mine) <= last:
            self.state.mine = {seq for seq in mine if seq > last}

    def _show(self, message: Message) -> None:
        if message.sender == self.uid and self._maybe_mine(message):
            # maybe this device's own, its MSG_A not here yet: wait for it
            self._unsure[message.msg_id] = message
            return
        self.on_message(message)

    def _maybe_mine(self, message: Message) -> bool:
        """Whether a waiting message of this device may be ``message`` (its
        MSG_R stored, the MSG_A lost or still on its way)."""
        for outgoing in self.waiting.values():
            if outgoing.kind == P.KIND_GROUP:
                same = message.group is not None and message.group == outgoing.to
            else:
                same = message.group is None and message.to == outgoing.to
            if same and outgoing.body == message.body:
                return True
        return False

    def _recheck_unsure(self) -> None:
        """Entries held by ``_show`` that no waiting message can be any more
        were sent from another device of the user: shown now."""
        for msg_id, message in list(self._unsure.items()):
            if not self._maybe_mine(message):
                del self._unsure[msg_id]
                self.on_message(message)

    def _ack_soon(self) -> None:
        if not self._ack_due:
            self._ack_due = True
            self.clock.callLater(0, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_due = False
        if self._own_ack is not None and self._own_ack.active():
            self._own_ack.cancel()  # this ACK_R covers the own messages too
        self._save()
        last = self.state.last_seq or 0
        if self._wire is not None and self._logged_in and last:
            self._wire.send(P.AckR(last))
            self._acked = last

    @inlineCallbacks
    def _pull(self) -> Any:
        """Fetch the timeline over HTTP from the last seq held without a gap
        up to the head."""
        if self._pulling or self.token is None:
            return
        self._pulling = True
        self._gap_since = None
        try:
            while True:
                after = self.state.last_seq or 0
                page = yield self._get(f"/v1/inbox?after={after}&limit=500")
                self._inbox_max = max(self._inbox_max, page["max"])
                for entry in page["messages"]:
                    self._pulled(entry)
                # a push that came meanwhile may be past a gap this page
                # did not reach: go on until nothing is held ahead
                if not page["messages"] or (
                    (self.state.last_seq or 0) >= page["max"]
                    and not self._ahead and not self.state.mine
                ):
                    break
        except Exception as e:
            # the next WELCOME (or gap) pulls again
            log.warn("pulling the inbox failed: {e}", e=e)
        finally:
            self._pulling = False

    def _pulled(self, entry: dict[str, Any]) -> None:
        body = entry["body"]
        if isinstance(body, dict):
            body = _unb64(body["b64"])
        message = Message(entry["seq"], entry["msg_id"], entry["from"], body, entry["ts"],
                          entry.get("group"), entry.get("to"))
        if message.sender == self.uid and entry.get("delivered"):
            outgoing = self.undelivered.get(message.seq)
            if outgoing is not None and outgoing.msg_id == message.msg_id:
                del self.undelivered[message.seq]
                self._set(outgoing, DELIVERED)
        self._receive(message)

    # HTTP

    def _headers(self) -> dict[bytes | str, bytes | str]:
        return {"Authorization": f"Bearer {self.token}"}

    @inlineCallbacks
    def _get(self, path: str) -> Any:
        response = yield self.http.get(self.http_url + path, headers=self._headers())
        return (yield self._json(response))

    @inlineCallbacks
    def _post(self, path: str, body: Any) -> Any:
        response = yield self.http.post(self.http_url + path, json=body, headers=self._headers())
        return (yield self._json(response))

    @inlineCallbacks
    def _json(self, response: Any) -> Any:
        data = yield response.json()
        if response.code != 200:
            raise RuntimeError(f"HTTP {response.code}: {data}")
        return data

    # timers

    def _every_second(self) -> None:
        self._tick = self.clock.callLater(1.0, self._every_second)
        now = self.clock.seconds()
        wire = self._wire
        if not self._logged_in:
            down = self._down_since
            if (down is not None and not self._told_unreachable
                    and now - down >= self.unreachable_after):
                self._told_unreachable = True
                detail = self._problem or "no answer"
                log.warn("no connection to the server for {s:.0f} s: {detail}",
                         s=now - down, detail=detail)
                self.on_unreachable(detail)
            if wire is not None and now - self._wire_since >= SIGN_IN_TIMEOUT:
                # connected, but the server does not answer LOGIN or RESUME
                self._problem = "no answer to sign-in"
                wire.transport.abortConnection()  # type: ignore[union-attr]
            return
        assert wire is not None
        for outgoing in list(self.waiting.values()):
            if outgoing.sent_at is not None and now - outgoing.sent_at >= self.resend_after:
                self._transmit(outgoing)
        # a gap that no push filled: pull it
        if (self._ahead or self.state.mine) and not self._pulling:
            if self._gap_since is None:
                self._gap_since = now
            elif now - self._gap_since >= self.resend_after:
                self._pull()
        else:
            self._gap_since = None
        if now - self.last_sent >= self.heartbeat_s:
            wire.send(P.Ping())
        if now - self.last_received > 2 * self.heartbeat_s + 30:
            wire.transport.abortConnection()  # type: ignore[union-attr]

    def _on_presence(self, presence: P.Presence) -> None:
        self.on_presence(presence.uid, presence.online)

    def _on_online(self, online: P.Online) -> None:
        self.on_online(tuple(online.uids))

    def _on_changed(self, changed: P.Changed) -> None:
        self.on_changed(changed.what, changed.version)
        if self.sync is not None:
            self._synced(self.sync.changed(changed.what, changed.version))

    @staticmethod
    def _synced(d: Deferred[set[str]]) -> None:
        # a failed sync left the cache as it was: the next one asks again
        d.addErrback(lambda f: log.warn("sync failed: {e}", e=f.getErrorMessage()))

    _handlers: dict[type, Callable[[Client, Any], None]] = {
        P.Presence: _on_presence,
        P.Online: _on_online,
        P.Changed: _on_changed,
        P.Welcome: _on_welcome,
        P.Resumed: _on_resumed,
        P.Error: _on_error,
        P.Kicked: _on_kicked,
        P.MsgA: _on_msg_a,
        P.AckN: _on_ack_n,
        P.MsgN: _on_msg_n,
    }


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
