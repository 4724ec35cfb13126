"""Routing across nodes through one Redis: node registry, shared sessions,
delivery to other nodes by pub/sub.

Each node keeps its own sessions in the dicts of ``LocalRouter`` (the message
path looks there and nowhere else); Redis holds what the other nodes need:

====================  ==========================================================
``im58d:nodes``       SET of node ids that registered
``im58d:node:ID``     the node's entry (JSON: servers, load), with a TTL that
                      the node refreshes: while it exists, the node is alive
``im58d:users``       HASH uid -> ``"NODE SID"``: the user's session and its node
``im58d:session:SID`` HASH uid, key, token, device, client, started, node, gen
``im58d:token:TOKEN`` the SID of the session with this bearer token
``im58d:held:NODE``   SET of the SIDs a node holds (adopted when it dies)
``im58d:nonce:SID:N`` a RESUME nonce seen, kept for twice the RESUME window
``im58d:epoch``       set by the first node: a new one means Redis lost its data
====================  ==========================================================

SIDs are in hex.  Every change of more than one key is a Lua script, so that
two nodes racing for a session see one winner.  A node listens on the
channel ``im58d:to:NODE``; what comes there is a msgpack array whose first
item says what it is (``PACKETS``, ``LISTS``, ``MOVED``, ``REPLACED``).

Messages are never in Redis: they are in the store before anything is
published, so a lost publication delays a push (the receiver's node catches
up from the store), it loses nothing.  While Redis is unreachable the node
serves its own users and retries; when it is back the node records its
sessions again and catches up.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import msgpack
import txredisapi
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .interfaces import IRouter
from .iplist import AccessServer, IPList
from .local import LocalRouter

log = Logger()

PREFIX = "im58d:"
# what comes on a node's channel
PACKETS, LISTS, MOVED, REPLACED = range(4)
# seconds a Redis command may take before the connection counts as broken
REPLY_TIMEOUT = 5
# seconds a RESUME nonce is remembered (twice the RESUME window)
NONCE_TTL = 600
# PRESENCE and ACK_N frames for other nodes kept while Redis is away
FRAMES_AWAY = 10_000
# fields of a session record, in the order the scripts return them
RECORD = ("uid", "key", "token", "device", "client", "started", "gen")

_REGISTER = """
local me, sid, uid = ARGV[1], ARGV[2], ARGV[3]
local old = redis.call('HGET', 'im58d:users', uid)
if old then
  local onode, osid = string.match(old, '^(%S+) (%S+)$')
  local otoken = redis.call('HGET', 'im58d:session:' .. osid, 'token')
  if otoken then redis.call('DEL', 'im58d:token:' .. otoken) end
  redis.call('DEL', 'im58d:session:' .. osid)
  redis.call('SREM', 'im58d:held:' .. onode, osid)
end
redis.call('HSET', 'im58d:session:' .. sid, 'uid', uid, 'key', ARGV[4], 'token', ARGV[5],
           'device', ARGV[6], 'client', ARGV[7], 'started', ARGV[8], 'node', me, 'gen', 0)
redis.call('SET', 'im58d:token:' .. ARGV[5], sid)
redis.call('HSET', 'im58d:users', uid, me .. ' ' .. sid)
redis.call('SADD', 'im58d:held:' .. me, sid)
return old
"""

_TAKE = """
local me, sid, uid = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('HGET', 'im58d:users', uid)
if not current then return false end
local onode, osid = string.match(current, '^(%S+) (%S+)$')
if osid ~= sid then return false end
redis.call('HSET', 'im58d:users', uid, me .. ' ' .. sid)
redis.call('HSET', 'im58d:session:' .. sid, 'node', me)
local gen = redis.call('HINCRBY', 'im58d:session:' .. sid, 'gen', 1)
redis.call('SMOVE', 'im58d:held:' .. onode, 'im58d:held:' .. me, sid)
return {onode, gen}
"""

# A session ended here.  Announced (the friends were told while Redis was
# away, a BYE): removed even if another node adopted it meanwhile, and that
# node is named, to drop its copy.  Returns {was it the user's session,
# the node that holds it now or ''}.
_RELEASE = """
local me, sid, uid, announced = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local key = 'im58d:session:' .. sid
local current = redis.call('HGET', 'im58d:users', uid)
local mine = current == me .. ' ' .. sid
local holder = ''
if current and not mine and announced then
  local onode, osid = string.match(current, '^(%S+) (%S+)$')
  if osid == sid then
    holder, mine = onode, true
    redis.call('SREM', 'im58d:held:' .. onode, sid)
  end
end
if mine then redis.call('HDEL', 'im58d:users', uid) end
local node = redis.call('HGET', key, 'node')
if node == me or (holder ~= '' and node == holder) then
  local token = redis.call('HGET', key, 'token')
  if token then redis.call('DEL', 'im58d:token:' .. token) end
  redis.call('DEL', key)
end
redis.call('SREM', 'im58d:held:' .. me, sid)
if mine then return {1, holder} end
return {0, holder}
"""

# A session this node kept while Redis was away, recorded again.  Held by
# another node: that node adopted it (taken back if its client is connected
# here) or its client resumed there (a take moved gen on: it stays there).
# Of two sessions of one user (two logins on two nodes during the outage)
# the one that started later stays.  Known to Redis before and gone from it
# now: the node that adopted it ended it (and told the friends).
# ARGV: me, sid, uid, key, token, device, client, started, connected, gen,
# known.
_REJOIN = """
local me, sid, uid = ARGV[1], ARGV[2], ARGV[3]
local connected, lgen, known = ARGV[9] == '1', tonumber(ARGV[10]), ARGV[11] == '1'
local key = 'im58d:session:' .. sid
local current = redis.call('HGET', 'im58d:users', uid)
local replaced, revived = false, false
if current then
  local onode, osid = string.match(current, '^(%S+) (%S+)$')
  if osid ~= sid then
    local started = redis.call('HGET', 'im58d:session:' .. osid, 'started')
    if started and tonumber(started) >= tonumber(ARGV[8]) then return {'replaced'} end
    local otoken = redis.call('HGET', 'im58d:session:' .. osid, 'token')
    if otoken then redis.call('DEL', 'im58d:token:' .. otoken) end
    redis.call('DEL', 'im58d:session:' .. osid)
    redis.call('SREM', 'im58d:held:' .. onode, osid)
    if onode ~= me then replaced = {'displaced', onode, osid} end
  elseif onode ~= me then
    local gen = tonumber(redis.call('HGET', key, 'gen') or '0')
    if gen > lgen or not connected then return {'moved', gen} end
    redis.call('HSET', 'im58d:users', uid, me .. ' ' .. sid)
    redis.call('HSET', key, 'node', me)
    gen = redis.call('HINCRBY', key, 'gen', 1)
    redis.call('SMOVE', 'im58d:held:' .. onode, 'im58d:held:' .. me, sid)
    return {'taken', onode, gen}
  end
elseif known and redis.call('EXISTS', key) == 0 then
  if not connected then return {'ended'} end
  revived = true
end
local gen = tonumber(redis.call('HGET', key, 'gen') or '0')
if lgen > gen then gen = lgen end
redis.call('HSET', key, 'uid', uid, 'key', ARGV[4], 'token', ARGV[5], 'device', ARGV[6],
           'client', ARGV[7], 'started', ARGV[8], 'node', me, 'gen', gen)
redis.call('SET', 'im58d:token:' .. ARGV[5], sid)
redis.call('HSET', 'im58d:users', uid, me .. ' ' .. sid)
redis.call('SADD', 'im58d:held:' .. me, sid)
if replaced then return replaced end
if revived then return {'revived'} end
return {'ok'}
"""

# The node's entry, refreshed; the live entries; the sessions of nodes
# whose entry expired move to this node (exactly one node removes a dead
# node from the set, so exactly one adopts its sessions); whether this
# node's own entry was still there (else it may have been adopted).
_REFRESH = """
local me, entry, ttl = ARGV[1], ARGV[2], ARGV[3]
local known = redis.call('EXISTS', 'im58d:node:' .. me)
redis.call('SET', 'im58d:node:' .. me, entry, 'EX', ttl)
redis.call('SADD', 'im58d:nodes', me)
local alive, adopted = {}, 0
for _, id in ipairs(redis.call('SMEMBERS', 'im58d:nodes')) do
  local e = redis.call('GET', 'im58d:node:' .. id)
  if e then
    table.insert(alive, e)
  else
    redis.call('SREM', 'im58d:nodes', id)
    for _, sid in ipairs(redis.call('SMEMBERS', 'im58d:held:' .. id)) do
      local uid = redis.call('HGET', 'im58d:session:' .. sid, 'uid')
      if uid and redis.call('HGET', 'im58d:users', uid) == id .. ' ' .. sid then
        redis.call('HSET', 'im58d:users', uid, me .. ' ' .. sid)
        redis.call('HSET', 'im58d:session:' .. sid, 'node', me)
        redis.call('SADD', 'im58d:held:' .. me, sid)
        adopted = adopted + 1
      end
    end
    redis.call('DEL', 'im58d:held:' .. id)
  end
end
return {alive, adopted, known}
"""

# The records of the sessions this node holds in Redis (stale SIDs dropped).
_HELD = """
local me = ARGV[1]
local out = {}
for _, sid in ipairs(redis.call('SMEMBERS', 'im58d:held:' .. me)) do
  local r = redis.call('HMGET', 'im58d:session:' .. sid,
                       'uid', 'key', 'token', 'device', 'client', 'started', 'gen')
  if r[1] and redis.call('HGET', 'im58d:users', r[1]) == me .. ' ' .. sid then
    table.insert(out, {sid, r[1], r[2], r[3], r[4], r[5], r[6], r[7]})
  else
    redis.call('SREM', 'im58d:held:' .. me, sid)
  end
end
return out
"""

# The deployment's Redis epoch: a new one when Redis lost its data (it was
# restarted without persistence), when nothing it held can be trusted.
_EPOCH = """
redis.call('SET', 'im58d:epoch', ARGV[1], 'NX')
return redis.call('GET', 'im58d:epoch')
"""

_TOKEN = """
local sid = redis.call('GET', 'im58d:token:' .. ARGV[1])
if not sid then return false end
return redis.call('HGET', 'im58d:session:' .. sid, 'uid')
"""


def node_id(random: Callable[[int], bytes] = os.urandom) -> str:
    """A name for this run of the node: host, pid and a random part (a node
    that restarts is a new node; the old one's sessions are adopted)."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-.") or "node"
    return f"{host}-{os.getpid()}-{random(3).hex()}"


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_from(values: list[Any]) -> dict[str, Any]:
    """A session record from the fields of RECORD as Redis returns them."""
    uid, key, token, device, client, started, gen = values
    return {
        "uid": int(uid),
        "key": bytes(key),
        "token": _text(token),
        "device": _text(device),
        "client": _text(client) or None,
        "started": float(started),
        "gen": int(gen or 0),
    }


class _Link(txredisapi.RedisFactory):  # type: ignore[misc]
    """One connection to Redis, reconnecting with backoff; tells the router
    when it is ready and when it is lost."""

    maxDelay = 5
    noisy = False

    def __init__(self, router: RedisRouter, protocol: type, name: str) -> None:
        super().__init__(None, None, 1, isLazy=True, charset=None,
                         replyTimeout=REPLY_TIMEOUT, convertNumbers=False)
        self.protocol = protocol
        self.router = router
        self.name = name
        self.connection: Any = None

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.connection = conn
            self.router._link_ready(self)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        if conn is self.connection:
            self.connection = None
            self.router._link_lost(self)


class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    def messageReceived(self, pattern: Any, channel: Any, message: bytes) -> None:
        self.factory.router._received(message)


@implementer(IRouter)
class RedisRouter(LocalRouter):
    """``LocalRouter`` for this node's sessions, Redis for the deployment's.

    The handlers (``on_*``) are set by whoever assembles the daemon:
    ``on_packets(items)`` pushes forwarded frames, ``on_lists(uids)`` sends
    CHANGED, ``on_gone(session_id, gen, replaced)`` drops a session another
    node took, ``on_adopt(records)`` keeps sessions of a dead node lingering
    here, ``on_revived(session)`` tells the friends of a connected user whose
    session another node ended during an outage that the user is online,
    ``on_rejoined()`` catches up after an outage.
    """

    clustered = True

    def __init__(
        self,
        endpoint: str,
        clock: IReactorTime,
        iplist: IPList,
        servers: Callable[[], list[AccessServer]],
        node_ttl: int = 15,
        node: str | None = None,
    ) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.clock = clock
        self.iplist = iplist
        self.servers = servers
        self.node_ttl = node_ttl
        self.node = node or node_id()
        self.channel = f"{PREFIX}to:{self.node}"
        self.on_packets: Callable[[list[Any]], None] = lambda items: None
        self.on_lists: Callable[[list[int]], Any] = lambda uids: None
        self.on_gone: Callable[[bytes, int | None, bool], None] = lambda *a: None
        self.on_adopt: Callable[[list[dict[str, Any]]], None] = lambda records: None
        self.on_revived: Callable[[Any], None] = lambda session: None
        self.on_rejoined: Callable[[], Any] = lambda: None
        self.up = False
        self.started = 0.0
        self._commands = _Link(self, txredisapi.RedisProtocol, "commands")
        self._subscriber = _Link(self, _Subscriber, "subscriber")
        self._subscribed = False
        self._stopping = False
        self._refresher = LoopingCall(self._refresh_now)
        self._refresher.clock = clock
        # sessions that ended while Redis was away: released on rejoin, and
        # then, if the ending waits for it, whether to tell the friends
        self._ended_away: list[tuple[str, int, Deferred[bool] | None]] = []
        # until when no other node can have adopted this node's sessions
        # (its registry entry lives till then); None before the first join
        self._entry_until: float | None = None
        self._epoch: bytes | None = None
        # sessions made while Redis was away (Redis never knew them)
        self._made_away: set[bytes] = set()
        # PRESENCE and ACK_N frames for other nodes, sent when Redis is back
        self._frames_away: list[tuple[int, int, bytes]] = []
        self._outage_logged = False
        self._joining: Deferred[None] | None = None
        # counters (metrics)
        self.published = 0
        self.received = 0
        self.outages = 0
        self.live_nodes = 0

    # lifecycle

    def start(self, reactor: Any) -> None:
        self.started = self.clock.seconds()
        self.iplist.update(sorted(self.servers(), key=_order))
        for link in (self._commands, self._subscriber):
            link.startConnecting(clientFromString(reactor, self.endpoint))
        self._refresher.start(max(1.0, self.node_ttl / 3), now=False)
        # told once if Redis is not there at start; the node serves anyway
        self.clock.callLater(REPLY_TIMEOUT, self._warn_if_down)

    @inlineCallbacks
    def stop(self) -> Any:
        """Leave the registry (the version of the IP list moves at once on the
        other nodes' next refresh) and close.  The sessions stay in Redis:
        the other nodes adopt them, and their clients resume there."""
        self._stopping = True
        self.up = False
        if self._refresher.running:
            self._refresher.stop()
        if self._commands.connection is not None and self._entry_until is not None:
            try:
                yield self._call("DEL", f"{PREFIX}node:{self.node}")
            except Exception as e:
                log.warn("leaving the node registry: {error}", error=e)
        for link in (self._commands, self._subscriber):
            yield link.disconnect()

    def _warn_if_down(self) -> None:
        if not self.up and not self._stopping:
            self._outage()

    def _link_ready(self, link: _Link) -> None:
        if link is self._subscriber:
            d = link.connection.subscribe([self.channel])
            d.addCallbacks(self._subscribed_now, self._subscribe_failed)
        self._check_up()

    def _subscribed_now(self, _: Any) -> None:
        self._subscribed = True
        self._check_up()

    def _subscribe_failed(self, failure: Failure) -> None:
        log.warn("subscribing to {channel} failed: {error}", channel=self.channel,
                 error=failure.getErrorMessage())
        if self._subscriber.connection is not None:
            self._subscriber.connection.transport.loseConnection()

    def _check_up(self) -> None:
        if self.up or self._joining is not None:
            return
        if self._commands.connection is None or not self._subscribed:
            return
        d = self._join()
        if not d.called:
            self._joining = d

    def _link_lost(self, link: _Link) -> None:
        if link is self._subscriber:
            self._subscribed = False
        if self._stopping:
            return
        if self.up:
            self.up = False
            self.outages += 1
            self._outage()

    def _outage(self) -> None:
        if self._outage_logged:
            return
        self._outage_logged = True
        log.warn(
            "Redis at {endpoint} is unreachable: node {node} serves its own users "
            "and retries",
            endpoint=self.endpoint, node=self.node,
        )

    @inlineCallbacks
    def _join(self) -> Any:
        """Redis is (back) here: record what happened meanwhile, then serve
        the deployment again.  Logins from here on register as usual."""
        self.up = True
        ended, self._ended_away = self._ended_away, []
        try:
            epoch = yield self._eval(_EPOCH, os.urandom(8).hex())
            # an empty Redis knows of no other node's claim: this node's
            # view of the sessions that ended meanwhile is the answer
            lost = self._epoch is not None and epoch != self._epoch
            if lost:
                log.warn("Redis at {endpoint} lost its data: recording this node's "
                         "sessions again", endpoint=self.endpoint)
            # the entry first, so that no node takes this one for dead (and
            # adopts what it records) while it records its sessions
            yield self._refresh(sync=False)
            # before anything newer of the same users goes out
            frames, self._frames_away = self._frames_away, []
            self.forward(frames)
            while ended:
                sid, uid, told = ended[0]
                mine, holder = yield self._eval(_RELEASE, self.node, sid, uid,
                                                "1" if told is None else "0")
                del ended[0]
                if holder:  # adopted meanwhile: that node drops its copy
                    self._publish(_text(holder), [REPLACED, bytes.fromhex(sid)])
                if told is not None:
                    told.callback(bool(mine) or lost)
            for session in list(self._by_uid.values()):
                if not session.ended:
                    known = not lost and session.session_id not in self._made_away
                    yield self._rejoin(session, known)
            self._epoch = epoch
            self._made_away.clear()
            yield self._sync_held()
        except Exception as e:
            self._ended_away[:0] = ended
            self.up = False
            log.warn("joining through Redis failed, retrying: {error}", error=e)
            conn = self._commands.connection
            if conn is not None:
                conn.transport.loseConnection()
            return
        finally:
            self._joining = None
        log.info(
            "node {node} joined through Redis at {endpoint}: {n} sessions here",
            node=self.node, endpoint=self.endpoint, n=len(self),
        )
        self._outage_logged = False
        try:
            yield self.on_rejoined()
        except Exception:
            log.failure("catching up after joining")

    @inlineCallbacks
    def _rejoin(self, session: Any, known: bool) -> Any:
        """``known``: Redis knew the session before the outage (it was not
        made meanwhile, and Redis did not lose its data)."""
        connected = "1" if session.connection is not None else "0"
        reply = yield self._eval(_REJOIN, self.node, *_register_args(session), connected,
                                 session.gen, "1" if known else "0")
        what = _text(reply[0])
        if what == "replaced":
            self.on_gone(session.session_id, None, True)
        elif what in ("moved", "ended"):
            # resumed on, or adopted by, another node; or ended there (its
            # friends were told): not this node's any more
            self.on_gone(session.session_id, None, False)
        elif what == "revived":  # ended elsewhere, its client is here: online
            self.on_revived(session)
        elif what == "taken":
            session.gen = int(reply[2])
            self._publish(_text(reply[1]), [MOVED, session.session_id, session.gen])
        elif what == "displaced":  # an older session of the user, on another node
            self._publish(_text(reply[1]), [REPLACED, bytes.fromhex(_text(reply[2]))])

    # Redis calls

    def _call(self, *args: Any) -> Deferred[Any]:
        conn = self._commands.connection
        if conn is None:
            return _unreachable()
        d: Deferred[Any] = conn.execute_command(*args)
        return d

    def _eval(self, script: str, *args: Any) -> Deferred[Any]:
        conn = self._commands.connection
        if conn is None:
            return _unreachable()
        d: Deferred[Any] = conn.eval(script, [], list(args))
        return d

    def _publish(self, node: str, message: list[Any]) -> None:
        conn = self._commands.connection
        if conn is None:
            return
        self.published += 1
        d = conn.execute_command("PUBLISH", f"{PREFIX}to:{node}", msgpack.packb(message))
        d.addErrback(lambda f: None)  # the store has it; the node catches up

    def _received(self, message: bytes) -> None:
        self.received += 1
        try:
            kind, *rest = msgpack.unpackb(message)
            if kind == PACKETS:
                self.on_packets(rest[0])
            elif kind == LISTS:
                self.on_lists(rest[0])
            elif kind == MOVED:
                self.on_gone(rest[0], rest[1], False)
            elif kind == REPLACED:
                self.on_gone(rest[0], None, True)
        except Exception:
            log.failure("handling a message from another node")

    # the registry

    @inlineCallbacks
    def _refresh_now(self) -> Any:
        """The timer's round: errors are logged, the timer goes on."""
        if not self.up or self._joining is not None:
            return
        try:
            known = yield self._refresh()
            # a subscription Redis dropped (client-output-buffer limit, a
            # failover) would leave the connection open and silent
            _, listeners = yield self._call("PUBSUB", "NUMSUB", self.channel)
        except Exception as e:
            log.warn("refreshing the node registry failed: {error}", error=e)
            return
        if not int(listeners) and self._subscriber.connection is not None:
            log.warn("Redis dropped the subscription to {channel}: subscribing again",
                     channel=self.channel)
            self._subscriber.connection.transport.abortConnection()
        elif not known and self.up:
            # the entry expired (a stall longer than node_ttl): the other
            # nodes took this one for dead and may have adopted its sessions
            log.warn("node {node} was taken for dead: joining again", node=self.node)
            self.up = False
            self.outages += 1
            self._check_up()

    @inlineCallbacks
    def _refresh(self, sync: bool = True) -> Any:
        """The entry, the IP list, adoption; ``sync``: keep what was adopted
        (off while joining: the join does it once its sessions are recorded)."""
        servers = sorted(self.servers(), key=_order)
        entry = json.dumps({
            "id": self.node,
            "servers": [asdict(s) for s in servers],
            "load": len(self),
            "started": int(self.started),
        })
        sent = self.clock.seconds()
        alive, adopted, known = yield self._eval(_REFRESH, self.node, entry, self.node_ttl)
        self._entry_until = sent + self.node_ttl
        self.live_nodes = len(alive)
        live: set[AccessServer] = set()
        for raw in alive:
            for s in json.loads(raw)["servers"]:
                live.add(AccessServer(s["host"], s["port"], s["tls"], s["weight"]))
        live.update(servers)  # this node is alive whatever the reply says
        listed = sorted(live, key=_order)
        if tuple(listed) != self.iplist.servers:
            self.iplist.update(listed)
            log.info("the IP list is now version {version}: {n} servers",
                     version=self.iplist.version, n=len(listed))
        if adopted:
            log.info("node {node} adopted {n} sessions of nodes that stopped",
                     node=self.node, n=adopted)
            if sync:
                yield self._sync_held()
        return bool(int(known))

    @inlineCallbacks
    def _sync_held(self) -> Any:
        """Sessions Redis says this node holds and it does not: adopted."""
        rows = yield self._eval(_HELD, self.node)
        records = []
        for sid_hex, *values in rows:
            sid = bytes.fromhex(_text(sid_hex))
            if sid in self._by_id:
                continue
            record = record_from(values)
            record["session_id"] = sid
            records.append(record)
        if records:
            self.on_adopt(records)

    # IRouter, the deployment's side

    def register(self, session: Any) -> Deferred[bool]:
        if not self.up:
            self._made_away.add(session.session_id)
            return succeed(False)  # recorded when Redis is back
        d = self._eval(_REGISTER, self.node, *_register_args(session))
        return d.addCallbacks(self._registered, self._register_failed,
                              errbackArgs=(session,))

    def _register_failed(self, failure: Failure, session: Any) -> bool:
        self._made_away.add(session.session_id)
        return bool(self._away(failure, False))

    def _registered(self, old: bytes | None) -> bool:
        if old is None:
            return False
        node, sid = _text(old).split(" ")
        if node != self.node:
            self._publish(node, [REPLACED, bytes.fromhex(sid)])
        return True

    def fetch(self, session_id: bytes) -> Deferred[dict[str, Any] | None]:
        if not self.up:
            return succeed(None)
        d = self._call("HMGET", f"{PREFIX}session:{session_id.hex()}", *RECORD)
        return d.addCallbacks(
            lambda values: None if values[0] is None else record_from(values),
            self._away, errbackArgs=(None,),
        )

    def take(self, session: Any) -> Deferred[bool]:
        if not self.up:
            return succeed(False)
        d = self._eval(_TAKE, self.node, session.session_id.hex(), session.uid)
        return d.addCallbacks(self._taken, self._away, callbackArgs=(session,),
                              errbackArgs=(False,))

    def _taken(self, reply: list[Any] | None, session: Any) -> bool:
        if not reply:
            return False
        node, gen = _text(reply[0]), int(reply[1])
        session.gen = gen
        if node != self.node:
            self._publish(node, [MOVED, session.session_id, gen])
        return True

    def use_nonce(self, session_id: bytes, nonce: bytes) -> Deferred[bool]:
        if not self.up:
            return succeed(True)  # this node's own check still applies
        key = f"{PREFIX}nonce:{session_id.hex()}:{nonce.hex()}"
        d = self._call("SET", key, 1, "NX", "EX", NONCE_TTL)
        return d.addCallbacks(lambda reply: reply is not None, self._away, errbackArgs=(True,))

    def release(self, session: Any, was_current: bool, connected: bool = False) -> Deferred[bool]:
        sid = session.session_id.hex()
        if not self.up:
            return self._release_later(sid, session.uid, was_current, connected)
        d = self._eval(_RELEASE, self.node, sid, session.uid, "0")
        return d.addCallbacks(lambda reply: bool(reply[0]) and was_current, self._release_failed,
                              errbackArgs=(sid, session.uid, was_current, connected))

    def _release_failed(self, failure: Failure, sid: str, uid: int, was_current: bool,
                        connected: bool) -> Deferred[bool]:
        self._away(failure, None)
        return self._release_later(sid, uid, was_current, connected)

    def _release_later(self, sid: str, uid: int, was_current: bool,
                       connected: bool) -> Deferred[bool]:
        """Released on rejoin.  Whether the friends are told is known at
        once when no other node can have the session (it never joined, or
        the client said BYE here before this node's entry could expire);
        else only Redis knows whether the client resumed elsewhere or
        another node adopted it, and the answer waits for the rejoin."""
        until = self._entry_until
        if until is None or (connected and self.clock.seconds() < until):
            self._ended_away.append((sid, uid, None))
            return succeed(was_current)
        told: Deferred[bool] = Deferred()
        self._ended_away.append((sid, uid, told))
        return told.addCallback(lambda mine: mine and was_current)

    def token_uid(self, token: str) -> Deferred[int | None]:
        if not self.up:
            return succeed(None)
        d = self._eval(_TOKEN, token)
        return d.addCallbacks(lambda uid: None if uid is None else int(uid), self._away,
                              errbackArgs=(None,))

    def forward(self, packets: list[tuple[int, int, bytes]]) -> None:
        if not packets:
            return
        if not self.up:
            # MSG_Ns are caught up from the store; PRESENCE and ACK_N wait
            room = FRAMES_AWAY - len(self._frames_away)
            if room > 0:
                self._frames_away.extend([p for p in packets if not p[1]][:room])
            return
        uids = list({uid for uid, _, _ in packets})
        d = self._call("HMGET", f"{PREFIX}users", *uids)
        d.addCallbacks(self._route, self._away, callbackArgs=(uids, PACKETS, packets),
                       errbackArgs=(None,))

    def forward_lists(self, uids: list[int]) -> None:
        if not self.up or not uids:
            return
        d = self._call("HMGET", f"{PREFIX}users", *uids)
        d.addCallbacks(self._route, self._away, callbackArgs=(uids, LISTS, uids),
                       errbackArgs=(None,))

    def _route(self, where: list[bytes | None], uids: list[int], kind: int,
               items: list[Any]) -> None:
        """One publication per node that holds some of ``uids``."""
        node_of: dict[int, str] = {}
        for uid, value in zip(uids, where, strict=True):
            if value is not None:
                node = value[: value.index(b" ")].decode()
                if node != self.node:
                    node_of[uid] = node
        by_node: dict[str, list[Any]] = {}
        for item in items:
            target = node_of.get(item[0] if kind == PACKETS else item)
            if target is not None:
                by_node.setdefault(target, []).append(item)
        for node, some in by_node.items():
            self._publish(node, [kind, some])

    def _away(self, failure: Failure, fallback: Any) -> Any:
        """A command failed (Redis went away mid-call): the local answer."""
        log.warn("Redis command failed: {error}", error=failure.getErrorMessage())
        return fallback


def _register_args(session: Any) -> list[Any]:
    return [
        session.session_id.hex(),
        session.uid,
        session.session_key,
        session.token,
        session.device,
        session.client or "",
        repr(session.started),
    ]


def _order(server: AccessServer) -> tuple[str, int, bool]:
    return (server.host, server.port, server.tls)


def _unreachable() -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(txredisapi.ConnectionError("Redis is unreachable"))
    return d
