"""Routing across nodes through one Redis: node registry, which node each
online device is on, delivery to other nodes by pub/sub.

Each node keeps its online devices in the dicts of ``LocalRouter`` (the
message path looks there and nowhere else); the store, shared by every
node, holds the sessions themselves; Redis holds what the nodes need of
each other:

=====================  =========================================================
``im58d:nodes``        SET of node ids that registered
``im58d:node:ID``      the node's entry (JSON: servers, load), with a TTL that
                       the node refreshes: while it exists, the node is alive
``im58d:users``        HASH uid -> ``"SID@NODE SID@NODE ..."``: the user's
                       devices online anywhere, and where
``im58d:session:SID``  HASH: a copy of an online device's session record (uid,
                       key, token, device, device_id, name, client, nonce,
                       acked), its node and gen (how often it moved)
``im58d:held:NODE``    SET of ``"UID SID"`` a node holds (adopted when it dies)
``im58d:epoch``        set by the first node: a new one means Redis lost its data
=====================  =========================================================

SIDs are in hex.  Every change of more than one key is a Lua script, so that
two nodes racing for a device see one winner.  A node listens on the
channel ``im58d:to:NODE``; what comes there is a msgpack array whose first
item says what it is (``PACKETS``, ``LISTS``, ``MOVED``, ``ENDED``).

Messages are never in Redis: they are in the store before anything is
published, so a lost publication delays a push (the receiver's node catches
up from the store), it loses nothing.  While Redis is unreachable the node
serves its own users and retries; when it is back the node records its
devices again and catches up.
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
PACKETS, LISTS, MOVED, ENDED = range(4)
# seconds a Redis command may take before the connection counts as broken
REPLY_TIMEOUT = 5
# PRESENCE, CHANGED, ACK_N and KICKED notices for other nodes kept while
# Redis is away
FRAMES_AWAY = 10_000
# fields of a session copy, in the order the scripts take and return them
RECORD = ("uid", "key", "token", "device", "device_id", "name", "client", "nonce", "acked")

# Lua helpers shared by the scripts: a user's entry is "SID@NODE ..."
_ENTRY = """
local function parse(entry)
  local out = {}
  if entry then
    for item in string.gmatch(entry, '%S+') do
      local s, n = string.match(item, '^(%x+)@(%S+)$')
      if s then table.insert(out, {s, n}) end
    end
  end
  return out
end
local function store(uid, devices)
  if #devices == 0 then
    redis.call('HDEL', 'im58d:users', uid)
  else
    local items = {}
    for _, d in ipairs(devices) do table.insert(items, d[1] .. '@' .. d[2]) end
    redis.call('HSET', 'im58d:users', uid, table.concat(items, ' '))
  end
end
local function record(sid, me, gen)
  redis.call('HSET', 'im58d:session:' .. sid, 'uid', ARGV[3], 'key', ARGV[4],
             'token', ARGV[5], 'device', ARGV[6], 'device_id', ARGV[7], 'name', ARGV[8],
             'client', ARGV[9], 'nonce', ARGV[10], 'acked', ARGV[11], 'node', me, 'gen', gen)
end
"""

# A device online here (sign-in, RESUME, adoption).  Taken from another
# node if it was there (gen moves on; that node drops its copy).  Returns
# {was it the user's first device online anywhere, was the device itself
# offline everywhere, the other node it came from or '', gen, 1}.  ARGV: me,
# sid, RECORD..., the gen of the node's copy, restored: the device was
# online before Redis lost its data (``on_fresh``), its friends know it:
# it is neither first nor fresh, and it is not taken from a node that
# recorded it again meanwhile (then {0, 0, that node, gen, 0}).
_REGISTER = _ENTRY + """
local me, sid, uid = ARGV[1], ARGV[2], ARGV[3]
local restored = ARGV[13] == '1'
local key = 'im58d:session:' .. sid
local others, from = {}, ''
for _, d in ipairs(parse(redis.call('HGET', 'im58d:users', uid))) do
  if d[1] == sid then from = d[2] else table.insert(others, d) end
end
local gen = math.max(tonumber(redis.call('HGET', key, 'gen') or '0'), tonumber(ARGV[12]))
if restored and from ~= '' and from ~= me then return {0, 0, from, gen, 0} end
if from ~= '' and from ~= me then
  gen = gen + 1
  redis.call('SREM', 'im58d:held:' .. from, uid .. ' ' .. sid)
end
local fresh = from == '' and not restored
local first = #others == 0 and fresh
table.insert(others, {sid, me})
store(uid, others)
record(sid, me, gen)
redis.call('SADD', 'im58d:held:' .. me, uid .. ' ' .. sid)
if from == me then from = '' end
return {first and 1 or 0, fresh and 1 or 0, from, gen, 1}
"""

# A device went offline here.  Announced (its BYE came while Redis was
# away): removed even if another node adopted it meanwhile, and that node
# is named, to drop its copy.  Returns {was it here, was it the user's last
# device anywhere, the node that held it or ''}.  ARGV: me, sid, uid,
# announced.
_RELEASE = _ENTRY + """
local me, sid, uid, announced = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local others, mine, holder = {}, false, ''
for _, d in ipairs(parse(redis.call('HGET', 'im58d:users', uid))) do
  if d[1] == sid and (d[2] == me or announced) then
    mine = true
    if d[2] ~= me then holder = d[2] end
  else
    table.insert(others, d)
  end
end
if mine then
  store(uid, others)
  redis.call('DEL', 'im58d:session:' .. sid)
  if holder ~= '' then redis.call('SREM', 'im58d:held:' .. holder, uid .. ' ' .. sid) end
end
redis.call('SREM', 'im58d:held:' .. me, uid .. ' ' .. sid)
return {mine and 1 or 0, (mine and #others == 0) and 1 or 0, holder}
"""

# A device this node kept online while Redis was away, recorded again.
# Online on another node: its client resumed there (gen moved on: it stays
# there), or that node adopted it (taken back if its client is connected
# here).  Known to Redis before and gone from it now: the node that
# adopted it took it offline (and told the friends).  Returns {what, first,
# node, gen}.  ARGV: me, sid, RECORD..., connected, gen, known.
_REJOIN = _ENTRY + """
local me, sid, uid = ARGV[1], ARGV[2], ARGV[3]
local connected, lgen, known = ARGV[12] == '1', tonumber(ARGV[13]), ARGV[14] == '1'
local key = 'im58d:session:' .. sid
local others, holder = {}, nil
for _, d in ipairs(parse(redis.call('HGET', 'im58d:users', uid))) do
  if d[1] == sid then holder = d[2] else table.insert(others, d) end
end
local gen = tonumber(redis.call('HGET', key, 'gen') or '0')
local what = 'ok'
if holder and holder ~= me then
  if gen > lgen or not connected then return {'moved', 0, holder, gen} end
  gen = gen + 1
  redis.call('SREM', 'im58d:held:' .. holder, uid .. ' ' .. sid)
  what = 'taken'
elseif not holder and known and redis.call('EXISTS', key) == 0 then
  if not connected then return {'ended', 0, '', 0} end
  what = 'revived'
end
if lgen > gen then gen = lgen end
table.insert(others, {sid, me})
store(uid, others)
record(sid, me, gen)
redis.call('SADD', 'im58d:held:' .. me, uid .. ' ' .. sid)
return {what, #others == 1 and 1 or 0, holder or '', gen}
"""

# The node's entry, refreshed; the live entries; the devices of nodes whose
# entry expired move to this node (exactly one node removes a dead node
# from the set, so exactly one adopts its devices); whether this node's own
# entry was still there (else it may have been adopted).
_REFRESH = _ENTRY + """
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
    for _, held in ipairs(redis.call('SMEMBERS', 'im58d:held:' .. id)) do
      local uid, sid = string.match(held, '^(%d+) (%x+)$')
      local devices, moved = parse(redis.call('HGET', 'im58d:users', uid)), false
      for _, d in ipairs(devices) do
        if d[1] == sid and d[2] == id then d[2] = me; moved = true end
      end
      if moved then
        store(uid, devices)
        redis.call('HSET', 'im58d:session:' .. sid, 'node', me)
        redis.call('SADD', 'im58d:held:' .. me, held)
        adopted = adopted + 1
      end
    end
    redis.call('DEL', 'im58d:held:' .. id)
  end
end
return {alive, adopted, known}
"""

# The copies of the devices this node holds in Redis (stale entries dropped).
_HELD = _ENTRY + """
local me = ARGV[1]
local out = {}
for _, held in ipairs(redis.call('SMEMBERS', 'im58d:held:' .. me)) do
  local uid, sid = string.match(held, '^(%d+) (%x+)$')
  local here = false
  for _, d in ipairs(parse(redis.call('HGET', 'im58d:users', uid))) do
    if d[1] == sid and d[2] == me then here = true end
  end
  local r = redis.call('HMGET', 'im58d:session:' .. sid, 'uid', 'key', 'token', 'device',
                       'device_id', 'name', 'client', 'nonce', 'acked', 'gen')
  if here and r[1] then
    table.insert(out, {sid, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10]})
  else
    redis.call('SREM', 'im58d:held:' .. me, held)
  end
end
return out
"""

# The nodes that hold these sessions' devices ('' where none does).
_WHERE = """
local out = {}
for i, sid in ipairs(ARGV) do
  out[i] = redis.call('HGET', 'im58d:session:' .. sid, 'node') or ''
end
return out
"""

# The deployment's Redis epoch: a new one when Redis lost its data (it was
# restarted without persistence), when nothing it held can be trusted; and
# whether this node made it (the first node of a fresh Redis).
_EPOCH = """
local made = redis.call('SET', 'im58d:epoch', ARGV[1], 'NX')
return {redis.call('GET', 'im58d:epoch'), made and 1 or 0}
"""


def node_id(random: Callable[[int], bytes] = os.urandom) -> str:
    """A name for this run of the node: host, pid and a random part (a node
    that restarts is a new node; the old one's sessions are adopted)."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-.") or "node"
    return f"{host}-{os.getpid()}-{random(3).hex()}"


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_from(sid: bytes, values: list[Any]) -> dict[str, Any]:
    """A session record from a copy's fields (RECORD, then gen) as Redis
    returns them."""
    uid, key, token, device, device_id, name, client, nonce, acked, gen = values
    return {
        "session_id": sid,
        "uid": int(uid),
        "key": bytes(key),
        "token": _text(token),
        "device": int(device),
        "device_id": bytes(device_id),
        "name": _text(name),
        "client": _text(client) or None,
        "nonce": bytes(nonce),
        "acked": int(acked or 0),
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
    """``LocalRouter`` for this node's devices, Redis for the deployment's.

    The handlers (``on_*``) are set by whoever assembles the daemon:
    ``on_packets(items)`` pushes packets other nodes forwarded,
    ``on_lists(uids)`` sends CHANGED, ``on_gone(session_id, gen)`` drops a
    device whose client resumed on another node, ``on_ended(session_id,
    reason)`` ends a session another node ended, ``on_adopt(records)`` keeps
    devices of a dead node lingering here, ``on_revived(user)`` tells the
    friends on other nodes that a user whose device another node took
    offline during an outage is online, ``on_rejoined()`` catches up after
    an outage, ``on_fresh()`` (the first node of an empty Redis) keeps the
    devices the store says were online lingering here.
    """

    clustered = True

    def __init__(
        self,
        endpoint: str,
        clock: IReactorTime,
        iplist: IPList,
        servers: Callable[[], list[AccessServer]],
        codes: dict[type, int],
        node_ttl: int = 15,
        node: str | None = None,
    ) -> None:
        super().__init__()
        self.endpoint = endpoint
        # the type byte of each packet class the logic layer forwards: a
        # packet travels as (code, fields), the router knows no classes
        self.codes = codes
        self.clock = clock
        self.iplist = iplist
        self.servers = servers
        self.node_ttl = node_ttl
        self.node = node or node_id()
        self.channel = f"{PREFIX}to:{self.node}"
        self.on_packets: Callable[[list[Any]], None] = lambda items: None
        self.on_lists: Callable[[list[int]], Any] = lambda uids: None
        self.on_gone: Callable[[bytes, int | None], None] = lambda *a: None
        self.on_ended: Callable[[bytes, int], Any] = lambda *a: None
        self.on_adopt: Callable[[list[dict[str, Any]]], None] = lambda records: None
        self.on_revived: Callable[[Any], None] = lambda user: None
        self.on_rejoined: Callable[[], Any] = lambda: None
        self.on_fresh: Callable[[], Any] = lambda: None
        self.up = False
        self.started = 0.0
        self._commands = _Link(self, txredisapi.RedisProtocol, "commands")
        self._subscriber = _Link(self, _Subscriber, "subscriber")
        self._subscribed = False
        self._stopping = False
        self._refresher = LoopingCall(self._refresh_now)
        self._refresher.clock = clock
        # devices that went offline while Redis was away: released on
        # rejoin, and then, if the release waits for it, whether they were
        # their user's last
        self._ended_away: list[tuple[str, int, Deferred[tuple[bool, bool]] | None]] = []
        # until when no other node can have adopted this node's devices
        # (its registry entry lives till then); None before the first join
        self._entry_until: float | None = None
        self._epoch: bytes | None = None
        # devices that came online while Redis was away (Redis never knew
        # them here)
        self._made_away: set[bytes] = set()
        # on_fresh runs: the lingering devices it registers were online
        # before Redis lost its data
        self._restoring = False
        # notices for other nodes (not MSG_N), sent when Redis is back
        self._frames_away: list[tuple[int, int, Any, bytes | None]] = []
        self._kicks_away: list[tuple[bytes, int]] = []
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
        the deployment again.  Devices coming online from here on register
        as usual."""
        self.up = True
        ended, self._ended_away = self._ended_away, []
        try:
            epoch, made = yield self._eval(_EPOCH, os.urandom(8).hex())
            # an empty Redis knows of no other node's claim: this node's
            # view of the devices that went offline meanwhile is the answer
            lost = self._epoch is not None and epoch != self._epoch
            if lost:
                log.warn("Redis at {endpoint} lost its data: recording this node's "
                         "devices again", endpoint=self.endpoint)
            # the entry first, so that no node takes this one for dead (and
            # adopts what it records) while it records its devices
            yield self._refresh(sync=False)
            # before anything newer of the same users goes out
            frames, self._frames_away = self._frames_away, []
            self.forward(frames)
            kicks, self._kicks_away = self._kicks_away, []
            for ended_sid, reason in kicks:
                self.end_elsewhere([ended_sid], reason)
            while ended:
                sid, uid, told = ended[0]
                mine, last, holder = yield self._eval(_RELEASE, self.node, sid, uid,
                                                      "1" if told is None else "0")
                del ended[0]
                if holder:  # adopted meanwhile: that node drops its copy
                    self._publish(_text(holder), [MOVED, bytes.fromhex(sid), None])
                if told is not None:
                    told.callback((bool(int(mine)) or lost, bool(int(last)) or lost))
            for device in list(self._by_id.values()):
                if not device.ended:
                    known = not lost and device.session_id not in self._made_away
                    yield self._rejoin(device, known)
            self._epoch = epoch
            self._made_away.clear()
            yield self._sync_held()
            if int(made):
                # the first node of a fresh Redis: the devices the store says
                # were online (a restart of the deployment) linger here
                self._restoring = True
                try:
                    yield self.on_fresh()
                finally:
                    self._restoring = False
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
            "node {node} joined through Redis at {endpoint}: {n} devices here",
            node=self.node, endpoint=self.endpoint, n=len(self),
        )
        self._outage_logged = False
        try:
            yield self.on_rejoined()
        except Exception:
            log.failure("catching up after joining")

    @inlineCallbacks
    def _rejoin(self, device: Any, known: bool) -> Any:
        """``known``: Redis knew the device online before the outage (it did
        not come online meanwhile, and Redis did not lose its data)."""
        connected = "1" if device.connection is not None else "0"
        what, first, holder, gen = yield self._eval(
            _REJOIN, self.node, *_record_args(device), connected, device.gen,
            "1" if known else "0")
        what = _text(what)
        if what in ("moved", "ended"):
            # resumed on, or adopted by, another node; or taken offline there
            # (its friends were told): not this node's any more
            self.on_gone(device.session_id, None)
            return
        device.gen = int(gen)
        if what == "taken":
            self._publish(_text(holder), [MOVED, device.session_id, device.gen])
        if (what == "revived" or device.session_id in self._made_away) and int(first):
            # the friends on other nodes were told the user was offline, or
            # never told the user came online
            self.on_revived(device.user)

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
                self.on_gone(rest[0], rest[1])
            elif kind == ENDED:
                for sid in rest[0]:
                    self.on_ended(sid, rest[1])
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
            # nodes took this one for dead and may have adopted its devices
            log.warn("node {node} was taken for dead: joining again", node=self.node)
            self.up = False
            self.outages += 1
            self._check_up()

    @inlineCallbacks
    def _refresh(self, sync: bool = True) -> Any:
        """The entry, the IP list, adoption; ``sync``: keep what was adopted
        (off while joining: the join does it once its devices are recorded)."""
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
            log.info("node {node} adopted {n} devices of nodes that stopped",
                     node=self.node, n=adopted)
            if sync:
                yield self._sync_held()
        return bool(int(known))

    @inlineCallbacks
    def _sync_held(self) -> Any:
        """Devices Redis says this node holds and it does not: adopted."""
        rows = yield self._eval(_HELD, self.node)
        records = []
        for sid_hex, *values in rows:
            sid = bytes.fromhex(_text(sid_hex))
            if sid not in self._by_id:
                records.append(record_from(sid, values))
        if records:
            self.on_adopt(records)

    # IRouter, the deployment's side

    def register(self, device: Any, first: bool) -> Deferred[tuple[bool, bool]]:
        if not self.up:
            self._made_away.add(device.session_id)
            return succeed((first, True))  # recorded when Redis is back
        restored = self._restoring and device.connection is None
        d = self._eval(_REGISTER, self.node, *_record_args(device), device.gen,
                       "1" if restored else "0")
        return d.addCallbacks(self._registered, self._register_failed,
                              callbackArgs=(device,), errbackArgs=(device, first))

    def _register_failed(self, failure: Failure, device: Any, first: bool
                         ) -> tuple[bool, bool]:
        self._made_away.add(device.session_id)
        answer: tuple[bool, bool] = self._away(failure, (first, True))
        return answer

    def _registered(self, reply: list[Any], device: Any) -> tuple[bool, bool]:
        first, fresh, moved_from, gen, recorded = reply
        if not int(recorded):
            # restored, but the node that holds it recorded it again first:
            # this copy goes quietly
            self.on_gone(device.session_id, None)
            return False, False
        device.gen = int(gen)
        if moved_from:  # its client resumed here: that node drops its copy
            self._publish(_text(moved_from), [MOVED, device.session_id, device.gen])
        return bool(int(first)), bool(int(fresh))

    def release(self, device: Any, last: bool, connected: bool) -> Deferred[tuple[bool, bool]]:
        sid = device.session_id.hex()
        if not self.up:
            return self._release_later(sid, device.uid, last, connected)
        d = self._eval(_RELEASE, self.node, sid, device.uid, "0")
        return d.addCallbacks(lambda reply: (bool(int(reply[0])), bool(int(reply[1]))),
                              self._release_failed,
                              errbackArgs=(sid, device.uid, last, connected))

    def _release_failed(self, failure: Failure, sid: str, uid: int, last: bool,
                        connected: bool) -> Deferred[tuple[bool, bool]]:
        self._away(failure, None)
        return self._release_later(sid, uid, last, connected)

    def _release_later(self, sid: str, uid: int, last: bool, connected: bool
                       ) -> Deferred[tuple[bool, bool]]:
        """Released on rejoin.  The answer is known at once when no other
        node can have the device (it never joined, or its client said BYE
        here before this node's entry could expire); else only Redis knows
        whether the client resumed elsewhere or another node adopted it,
        and the answer waits for the rejoin."""
        until = self._entry_until
        if until is None or (connected and self.clock.seconds() < until):
            self._ended_away.append((sid, uid, None))
            return succeed((True, last))
        told: Deferred[tuple[bool, bool]] = Deferred()
        self._ended_away.append((sid, uid, told))
        return told.addCallback(lambda answer: (answer[0], answer[1] and last))

    def online_among(self, uids: list[int]) -> Deferred[list[int]]:
        if not uids:
            return succeed([])
        here = [uid for uid in uids if uid in self._users]
        if not self.up:
            return succeed(here)
        d = self._call("HMGET", f"{PREFIX}users", *uids)
        return d.addCallbacks(
            lambda entries: [uid for uid, e in zip(uids, entries, strict=True) if e],
            self._away, errbackArgs=(here,))

    def forward(self, items: list[tuple[int, int, Any, bytes | None]]) -> None:
        if not items:
            return
        if not self.up:
            # MSG_Ns are caught up from the store; the other notices wait
            room = FRAMES_AWAY - len(self._frames_away)
            if room > 0:
                self._frames_away.extend([i for i in items if not i[1]][:room])
            return
        uids = list({item[0] for item in items})
        d = self._call("HMGET", f"{PREFIX}users", *uids)
        d.addCallbacks(self._route, self._away, callbackArgs=(uids, PACKETS, items),
                       errbackArgs=(None,))

    def forward_lists(self, uids: list[int]) -> None:
        if not self.up or not uids:
            return
        d = self._call("HMGET", f"{PREFIX}users", *uids)
        d.addCallbacks(self._route, self._away, callbackArgs=(uids, LISTS, uids),
                       errbackArgs=(None,))

    def _route(self, entries: list[bytes | None], uids: list[int], kind: int,
               items: list[Any]) -> None:
        """One publication per other node that holds devices of ``uids``."""
        nodes_of: dict[int, set[str]] = {}
        me = self.node
        for uid, entry in zip(uids, entries, strict=True):
            if entry:
                nodes = {item.partition("@")[2] for item in _text(entry).split()}
                nodes.discard(me)
                if nodes:
                    nodes_of[uid] = nodes
        by_node: dict[str, list[Any]] = {}
        for item in items:
            if kind == PACKETS:
                uid, seq, packet, skip = item
                wire = [uid, seq, self.codes[type(packet)], list(packet), skip]
            else:
                uid = wire = item
            for node in nodes_of.get(uid, ()):
                by_node.setdefault(node, []).append(wire)
        for node, some in by_node.items():
            self._publish(node, [kind, some])

    def end_elsewhere(self, session_ids: list[bytes], reason: int) -> None:
        if not session_ids:
            return
        if not self.up:
            self._kicks_away.extend((sid, reason) for sid in session_ids)
            del self._kicks_away[:-FRAMES_AWAY]
            return
        d = self._eval(_WHERE, *[sid.hex() for sid in session_ids])
        d.addCallbacks(self._tell_ended, self._away, callbackArgs=(session_ids, reason),
                       errbackArgs=(None,))

    def _tell_ended(self, nodes: list[Any], session_ids: list[bytes], reason: int) -> None:
        by_node: dict[str, list[bytes]] = {}
        for sid, node in zip(session_ids, nodes, strict=True):
            node = _text(node)
            if node and node != self.node:
                by_node.setdefault(node, []).append(sid)
        for node, sids in by_node.items():
            self._publish(node, [ENDED, sids, reason])

    def _away(self, failure: Failure, fallback: Any) -> Any:
        """A command failed (Redis went away mid-call): the local answer."""
        log.warn("Redis command failed: {error}", error=failure.getErrorMessage())
        return fallback


def _record_args(device: Any) -> list[Any]:
    """ARGV[2:12] of the scripts that record a device: its sid, then RECORD."""
    return [
        device.session_id.hex(),
        device.uid,
        device.key,
        device.token,
        device.device,
        device.device_id,
        device.name,
        device.client or "",
        device.nonce,
        device.acked_max,
    ]


def _order(server: AccessServer) -> tuple[str, int, bool]:
    return (server.host, server.port, server.tls)


def _unreachable() -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(txredisapi.ConnectionError("Redis is unreachable"))
    return d
