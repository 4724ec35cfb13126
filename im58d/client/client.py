"""The reference client: what a good mobile app does with an im58d server.

- logs in over the long connection and reconnects by itself, with backoff;
- keeps an ack-wait queue: every MSG_R is sent again until its MSG_A comes,
  also after a reconnect; cmids are never reused (``ClientState``);
- shows each received message once and in seq order, acks cumulatively,
  and pulls the inbox gap over HTTP after WELCOME and whenever a seq is
  missing;
- tells the app, per sent message, "sent", "stored" (MSG_A) and "delivered"
  (ACK_N, or ``POST /v1/status``);
- with a ``Sync``, keeps a local cache of lists and details in step after
  WELCOME, RESUMED and CHANGED (``im58d.client.sync``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
from collections.abc import Callable
from typing import Any, NamedTuple

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent
from zope.interface import implementer

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

# ERRORs with ref that mean "this message will never be stored"
FINAL_REFUSALS = frozenset((403, 404, 413, 501))


class Message(NamedTuple):
    """A received message, as the app shows it."""

    seq: int
    msg_id: int
    sender: int
    body: str | bytes
    ts: int
    group: int | None = None


class Outgoing:
    """A sent message and what is known of it."""

    def __init__(self, cmid: int, to: int, body: str | bytes, kind: int) -> None:
        self.cmid = cmid
        self.to = to
        self.body = body
        self.kind = kind
        self.msg_id: int | None = None
        self.ts: int | None = None
        self.state = SENT
        self.error: tuple[int, str] | None = None
        self.sent_at: float | None = None  # last MSG_R on the wire
        self.transmissions = 0

    def __repr__(self) -> str:
        return f"<Outgoing cmid={self.cmid} to={self.to} {self.state} msg_id={self.msg_id}>"


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
    """The server refused the credentials (ERROR 401/403/429) or kicked us out."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code


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
                self.client._dispatch(self, packet)
        except WireError as e:
            log.warn("bad frame from the server: {e}", e=e)
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.client._disconnected(self)

    def send(self, *packets: Any) -> None:
        self.transport.write(b"".join(encode(p) for p in packets))  # type: ignore[union-attr]
        self.client.last_sent = self.client.clock.seconds()


class Client:
    """One account's connection to an im58d server."""

    def __init__(
        self,
        reactor: Any,
        host: str | None,
        port: int | None,
        http_url: str,
        user: str,
        password: str,
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
        self.state = state or ClientState()
        self.on_message = on_message or (lambda message: None)
        self.on_status = on_status or (lambda outgoing: None)
        self.on_presence = on_presence or (lambda uid, online: None)
        self.on_changed = on_changed or (lambda what, version: None)
        self.resend_after = resend_after
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
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
        self.uid: int | None = None
        self.token: str | None = None
        self.heartbeat_s = 240
        self._wire: _Wire | None = None
        self._logged_in = False
        self._stopping = False
        self._backoff = min_backoff
        self._retry: Any = None
        self._tick: Any = None
        self._started: Deferred[None] | None = None
        self._avoid: Server | None = None  # the server that just failed
        self._tls: dict[Server, _ResumingTLS] = {}
        self._fetching_iplist = False
        self.last_sent = 0.0
        self.last_received = 0.0
        # sending: the ack-wait queue (cmid -> Outgoing, until MSG_A) and the
        # stored messages waiting to be delivered (msg_id -> Outgoing)
        self.waiting: dict[int, Outgoing] = {}
        self.undelivered: dict[int, Outgoing] = {}
        # MSG_Rs on the current connection without MSG_A (at most send_window)
        self._on_wire = 0
        for cmid, (to, body, kind) in self.state.unsent.items():
            self.waiting[cmid] = Outgoing(cmid, to, body, kind)
        # receiving: entries above a gap, shown once the gap is filled
        self._ahead: dict[int, Message] = {}
        self._inbox_max = 0
        self._pulling = False
        self._ack_due = False
        self._lost_waiter: Deferred[None] | None = None
        # counters
        self.retransmits = 0
        self.duplicates = 0
        self.logins = 0
        self.resumes = 0

    # the app's side

    def start(self) -> Deferred[None]:
        """Connect and log in; fires at the first WELCOME, fails on bad
        credentials.  From then on the client reconnects by itself."""
        self._started = Deferred()
        self._stopping = False
        self._tick = self.clock.callLater(1.0, self._every_second)
        self._connect()
        return self._started

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
        self.state.save()
        outgoing = Outgoing(cmid, to, body, kind)
        self.waiting[cmid] = outgoing
        self._pump()
        return outgoing

    @inlineCallbacks
    def refresh_status(self) -> Any:
        """Ask the server which stored messages were delivered (when ACK_Ns were
        missed); returns the newly delivered ones."""
        ids = list(self.undelivered)
        if not ids or self.token is None:
            return []
        answer = yield self._post("/v1/status", {"msg_ids": ids})
        delivered = []
        for msg_id in answer["delivered"]:
            outgoing = self.undelivered.pop(msg_id, None)
            if outgoing is not None:
                self._set(outgoing, DELIVERED)
                delivered.append(outgoing)
        return delivered

    def stop(self) -> Deferred[None]:
        """Say BYE and stop reconnecting (with a reporter: once it has sent
        its last batches, or given up for this run)."""
        self._stopping = True
        for call in (self._retry, self._tick):
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
        if self._logged_in:
            wire.send(P.Bye())
        wire.transport.loseConnection()  # type: ignore[union-attr]
        return lost

    @property
    def connected(self) -> bool:
        return self._logged_in

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
        log.info("cannot connect to {server}: {e}", server=server,
                 e=failure.getErrorMessage())
        self._avoid = server
        self._reconnect_later()

    def _reconnect_later(self) -> None:
        if self._stopping:
            return
        delay = self._backoff * (0.5 + random.random())
        self._backoff = min(self._backoff * 2, self.max_backoff)
        self._retry = self.clock.callLater(delay, self._connect)

    def _connected(self, wire: _Wire) -> None:
        self._wire = wire
        self.last_received = self.clock.seconds()
        session = self.state.session
        if session is None:
            wire.send(P.Login(self.user, self.password, self.device))
            return
        # prove the session key: one round trip, no password, no new session
        ts = int(self.clock.seconds())
        nonce = os.urandom(8)
        mac = hmac.new(
            session["session_key"],
            session["session_id"] + ts.to_bytes(8, "big") + nonce,
            hashlib.sha256,
        ).digest()[:16]
        wire.send(P.Resume(session["session_id"], ts, nonce, mac))

    def _disconnected(self, wire: _Wire) -> None:
        if wire is not self._wire:
            return
        self._wire = None
        self._logged_in = False
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
        self.uid = welcome.uid
        self.token = welcome.token
        self.heartbeat_s = welcome.heartbeat_s
        self.state.session = {
            "uid": welcome.uid,
            "session_id": welcome.session_id,
            "session_key": welcome.session_key,
            "token": welcome.token,
        }
        self.logins += 1
        self._logged_in_with(welcome.inbox_max, welcome.iplist_version)

    def _on_resumed(self, resumed: P.Resumed) -> None:
        session = self.state.session
        assert session is not None
        self.uid = resumed.uid
        self.token = session["token"]
        self.resumes += 1
        self._logged_in_with(resumed.inbox_max, resumed.iplist_version)

    def _logged_in_with(self, inbox_max: int, iplist_version: int) -> None:
        """WELCOME or RESUMED: the connection carries the session."""
        self._inbox_max = inbox_max
        self._logged_in = True
        self._backoff = self.min_backoff
        self._avoid = None
        wire = self._wire
        if wire is not None and wire.server is not None:
            self.state.last_server = wire.server
            self._keep_tls_session(wire)
        self.state.save()
        # what was on the old connection goes again, the oldest first
        for outgoing in self.waiting.values():
            outgoing.sent_at = None
        self._on_wire = 0
        self._pump()
        if self._inbox_max > self.state.last_seq:
            self._pull()
        elif self.state.last_seq:
            # an ACK_R may have been lost with the last connection
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
        self.state.save()

    def _on_error(self, error: P.Error) -> None:
        outgoing = self.waiting.get(error.ref) if error.ref is not None else None
        if outgoing is not None:
            if error.code in FINAL_REFUSALS:
                self._settled(outgoing)
                outgoing.error = (error.code, error.message)
                self._set(outgoing, FAILED)
            return  # 503 and the like: it is sent again
        if not self._logged_in and error.code == 409 and self._wire is not None:
            # the session is gone (a restart, an expiry): log in instead
            self.state.session = None
            self.state.save()
            self._wire.send(P.Login(self.user, self.password, self.device))
        elif not self._logged_in and error.code in (401, 403):
            self._fatal(LoginFailed(error.code, error.message))
        elif not self._logged_in and error.code == 429:
            if self._started is not None:  # the first login: the app decides
                self._fatal(LoginFailed(error.code, error.message))
            else:  # too many failed attempts (maybe not ours): wait, then again
                log.warn("login refused for now (429); trying again later")
                self._backoff = max(self._backoff, self.max_backoff)
        else:
            log.warn("server error {code}: {message}", code=error.code, message=error.message)

    def _on_kicked(self, kicked: P.Kicked) -> None:
        if kicked.reason in (P.KICKED_REPLACED, P.KICKED_DISABLED):
            self._fatal(LoginFailed(kicked.reason, "kicked"))

    def _fatal(self, error: LoginFailed) -> None:
        """Credentials refused or account taken over: stop for good."""
        self._stopping = True
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        started, self._started = self._started, None
        if started is not None:
            started.errback(error)
        else:
            log.warn("stopped: {error}", error=error)

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
        self.state.save()
        if outgoing.sent_at is not None:
            self._on_wire -= 1
        self._pump()

    def _transmit(self, outgoing: Outgoing) -> None:
        kind = outgoing.kind or None
        assert self._wire is not None
        self._wire.send(P.MsgR(outgoing.cmid, outgoing.to, outgoing.body, kind))
        if outgoing.transmissions:
            self.retransmits += 1
        outgoing.transmissions += 1
        outgoing.sent_at = self.clock.seconds()

    def _on_msg_a(self, msg_a: P.MsgA) -> None:
        outgoing = self.waiting.get(msg_a.cmid)
        if outgoing is None:
            return  # the answer to a retransmit already answered
        self._settled(outgoing)
        outgoing.msg_id = msg_a.msg_id
        outgoing.ts = msg_a.ts
        if outgoing.kind == P.KIND_USER:
            self.undelivered[msg_a.msg_id] = outgoing
        self._set(outgoing, STORED)

    def _on_ack_n(self, ack_n: P.AckN) -> None:
        outgoing = self.undelivered.pop(ack_n.msg_id, None)
        if outgoing is None:
            # its MSG_A was lost: the ACK_N says it was stored, too
            outgoing = self.waiting.get(ack_n.cmid)
            if outgoing is None:
                return
            self._settled(outgoing)
            outgoing.msg_id = ack_n.msg_id
        self._set(outgoing, DELIVERED)

    def _set(self, outgoing: Outgoing, state: str) -> None:
        outgoing.state = state
        self.on_status(outgoing)

    # receiving

    def _on_msg_n(self, msg_n: P.MsgN) -> None:
        self._receive(Message(*msg_n))
        if self._ahead and not self._pulling:
            self._pull()  # a seq is missing

    def _receive(self, message: Message) -> None:
        seq = message.seq
        last = self.state.last_seq
        if seq <= last or seq in self._ahead:
            self.duplicates += 1  # shown already: ack again, show nothing
        elif seq == last + 1:
            self._show(message)
            ahead = self._ahead
            while ahead and self.state.last_seq + 1 in ahead:
                self._show(ahead.pop(self.state.last_seq + 1))
        else:
            self._ahead[seq] = message
        self._ack_soon()

    def _show(self, message: Message) -> None:
        self.state.last_seq = message.seq
        self.on_message(message)

    def _ack_soon(self) -> None:
        if not self._ack_due:
            self._ack_due = True
            self.clock.callLater(0, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_due = False
        self.state.save()
        if self._wire is not None and self._logged_in and self.state.last_seq:
            self._wire.send(P.AckR(self.state.last_seq))

    @inlineCallbacks
    def _pull(self) -> Any:
        """Fetch the inbox over HTTP from the last shown seq up to the head."""
        if self._pulling or self.token is None:
            return
        self._pulling = True
        try:
            while True:
                after = self.state.last_seq
                page = yield self._get(f"/v1/inbox?after={after}&limit=500")
                self._inbox_max = max(self._inbox_max, page["max"])
                for entry in page["messages"]:
                    body = entry["body"]
                    if isinstance(body, dict):
                        body = _unb64(body["b64"])
                    self._receive(Message(entry["seq"], entry["msg_id"], entry["from"], body,
                                          entry["ts"], entry.get("group")))
                # a push that came meanwhile may be past a gap this page
                # did not reach: go on until nothing is held ahead
                if not page["messages"] or (
                    self.state.last_seq >= page["max"] and not self._ahead
                ):
                    break
        except Exception as e:
            # the next WELCOME (or gap) pulls again
            log.warn("pulling the inbox failed: {e}", e=e)
        finally:
            self._pulling = False

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
        if wire is None or not self._logged_in:
            return
        for outgoing in list(self.waiting.values()):
            if outgoing.sent_at is not None and now - outgoing.sent_at >= self.resend_after:
                self._transmit(outgoing)
        if now - self.last_sent >= self.heartbeat_s:
            wire.send(P.Ping())
        if now - self.last_received > 2 * self.heartbeat_s + 30:
            wire.transport.abortConnection()  # type: ignore[union-attr]

    def _on_presence(self, presence: P.Presence) -> None:
        self.on_presence(presence.uid, presence.online)

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
