"""``twistd im58d``: the options and ``makeService``, which assembles the daemon."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.python import usage

from . import __version__
from .access.protocol import AccessFactory
from .config import Config, ConfigError, check, load_config
from .endpoints import inherited_socket, plaintext_exposed, server_endpoint
from .logging import use_for_twistd
from .logic import packets
from .logic.auth import Authenticator, LoginThrottle, ThreadedVerifier
from .logic.messages import Messenger
from .logic.presence import Presence
from .logic.sessions import SessionManager
from .metrics import SAMPLE_INTERVAL, Metrics
from .routing.iplist import AccessServer, IPList, server_from_endpoint
from .routing.local import LocalRouter
from .routing.redis import RedisRouter
from .store.interfaces import StoreError
from .store.sqlite import SQLiteStore, open_database
from .systemd import NotifyService
from .web.root import make_site
from .wire import packets as P

log = Logger()

HOUSEKEEPING_INTERVAL = 10.0
# seconds between looks for sessions to end (unused too long, disabled)
EXPIRY_INTERVAL = 3600.0
RESEND_INTERVAL = 1.0
SHUTDOWN_GRACE = 5.0


class Options(usage.Options):
    synopsis = (
        "[--config FILE] [--database PATH] [--access ENDPOINT]... [--http ENDPOINT]..."
    )
    longdesc = (
        "Runs the im58d instant-messaging server.  Without options it uses its "
        "embedded defaults: im58d.sqlite in the working directory, the access "
        "listener on tcp:5858 and HTTP on tcp:8058, both on 127.0.0.1."
    )
    optParameters = [
        ["config", "c", None, "INI configuration file (see etc/im58d.ini)."],
        ["database", "d", None, "SQLite database file; replaces [store] database."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["access"] = []
        self["http"] = []
        self.config = Config()

    def opt_access(self, endpoint: str) -> None:
        """Access (TCP long connection) listener, a Twisted endpoint string;
        repeatable; replaces [listen] access."""
        self["access"].append(endpoint)

    def opt_http(self, endpoint: str) -> None:
        """HTTP listener, a Twisted endpoint string; repeatable; replaces
        [listen] http."""
        self["http"].append(endpoint)

    def opt_version(self) -> None:
        print(f"im58d {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            config = load_config(self["config"]) if self["config"] else Config()
        except ConfigError as e:
            raise SystemExit(f"im58d: {e}") from None
        overrides: dict[str, Any] = {}
        if self["database"]:
            overrides["database"] = self["database"]
        if self["access"]:
            overrides["access"] = tuple(self["access"])
        if self["http"]:
            overrides["http"] = tuple(self["http"])
        self.config = config.replace(**overrides)
        try:
            check(self.config)
        except ConfigError as e:
            raise SystemExit(f"im58d: {e}") from None
        if self.config.routing_backend == "redis":
            try:
                clientFromString(None, self.config.redis)  # checked, not used
            except Exception as e:
                raise SystemExit(
                    f"im58d: {self.config.source}: [routing] redis: {e}"
                ) from None
        # run by twistd: its log observer writes our lines ([log] format)
        use_for_twistd(self.parent, self.config.log_format)


class OrderedService(MultiService):
    """Stops its children in reverse order, each after the one before is done,
    so listeners close before sessions end and sessions before the store."""

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for service in reversed(list(self)):
            try:
                yield maybeDeferred(service.stopService)
            except Exception:
                log.failure("stopping {service}", service=service)


class CallbackService(Service):
    """Runs ``start`` once the reactor runs, and ``stop`` (which may return a
    Deferred) on stop.  Starting late keeps threads from being started when
    a listener fails to start and the daemon exits before running."""

    def __init__(
        self, name: str, reactor: Any, start: Callable[[], Any], stop: Callable[[], Any]
    ) -> None:
        self.setName(name)
        self._reactor = reactor
        self._start = start
        self._stop = stop
        self._started = False

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._begin)

    def _begin(self) -> None:
        if not self.running:
            return
        self._started = True
        d = maybeDeferred(self._start)
        d.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        log.failure("{name} failed to start", failure, name=self.name)
        self._reactor.stop()

    def stopService(self) -> Any:
        super().stopService()
        if not self._started:
            return None
        return maybeDeferred(self._stop)


class ListenerService(StreamServerEndpointService):
    """A listener whose failure to listen stops the start with one line."""

    def __init__(self, endpoint: Any, factory: Any, key: str, description: str) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self._what = f"[listen] {key}: cannot listen on {description!r}"
        self.description = description
        self.bound_port = 0  # the port it listens on, once it does

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            raise _fail(f"{self._what}: {e}") from None
        waiting: Any = self._waitingForPort
        waiting.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        self.bound_port = getattr(port.getHost(), "port", 0)
        return port


def _fail(message: str) -> SystemExit:
    return SystemExit(f"im58d: {message}")


def _listeners(
    reactor: Any, config: Config, key: str, factory: Any
) -> list[ListenerService]:
    services: list[ListenerService] = []
    for description in getattr(config, key):
        try:
            endpoint = server_endpoint(reactor, description)
            inherited = inherited_socket(endpoint)
        except Exception as e:
            raise _fail(f"[listen] {key}: {description!r}: {e}") from None
        if plaintext_exposed(description, inherited) and not config.allow_plaintext:
            raise _fail(
                f"[listen] {key}: {description!r} would take unencrypted connections "
                "from other machines; listen with ssl:, on 127.0.0.1, or set "
                "[listen] allow_plaintext = yes"
            )
        services.append(ListenerService(endpoint, factory, key, description))
    return services


def _access_service(factory: AccessFactory, messenger: Messenger, reactor: Any) -> Service:
    """On stop: stop reading from clients, let pending commits finish (their
    MSG_As go out), then KICKED 3 to every client and wait (briefly) for the
    connections to close."""

    @inlineCallbacks
    def stop() -> Any:
        for connection in list(factory.connections):
            connection.stop_reading()
        yield messenger.drain()
        factory.kick_all(P.KICKED_SHUTDOWN)
        yield factory.wait_closed(SHUTDOWN_GRACE)

    return CallbackService("access", reactor, lambda: None, stop)


def _own_servers(config: Config, access: list[ListenerService]) -> list[AccessServer]:
    """This node's entry in the IP list: ``[iplist] servers``, or its access
    listeners that have a concrete address (on the port they got)."""
    if config.iplist:
        return list(config.iplist)
    servers = []
    for listener in access:
        server = server_from_endpoint(listener.description)
        if server is None:
            continue
        port = server.port or listener.bound_port
        if port:
            servers.append(dataclasses.replace(server, port=port, weight=config.weight))
    return servers


def join_cluster(
    router: Any, sessions: SessionManager, presence: Presence, messenger: Messenger
) -> None:
    """What comes from other nodes goes to this node's logic layer."""
    router.on_packets = messenger.forwarded
    router.on_lists = lambda uids: presence.lists_moved(uids, forward=False)
    router.on_gone = sessions.gone
    router.on_ended = sessions.end_here
    router.on_adopt = sessions.adopt
    router.on_revived = lambda user: presence.online(user, elsewhere_only=True)
    router.on_rejoined = messenger.catch_up
    router.on_fresh = sessions.restore


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config = options.config
    top = OrderedService()
    store = SQLiteStore(config.database, reactor, config.synchronous)
    verifier = ThreadedVerifier(reactor)
    servers = config.iplist or tuple(
        s for s in map(server_from_endpoint, config.access) if s is not None
    )
    iplist = IPList(list(servers))
    throttle = LoginThrottle(
        reactor, config.user_attempts, config.address_attempts, config.attempt_window
    )
    router: LocalRouter
    if config.routing_backend == "redis":
        router = RedisRouter(
            config.redis, reactor, iplist, lambda: _own_servers(config, access), packets.CODE,
            config.node_ttl,
        )
    else:
        router = LocalRouter()
    presence = Presence(router, store)
    sessions = SessionManager(
        router,
        store,
        Authenticator(store, throttle, verifier),
        reactor,
        presence,
        heartbeat=config.heartbeat,
        linger=config.linger,
        max_devices=config.max_devices,
        expire_days=config.expire_days,
        iplist_version=lambda: iplist.version,
    )
    messenger = Messenger(
        store,
        router,
        reactor,
        config.max_body,
        config.friends_only,
        config.retransmit,
        gather=config.batch_window / 1000,
    )
    factory = AccessFactory(sessions, messenger, reactor, config.max_frame, config.login_timeout)
    metrics = Metrics(reactor, factory, router, messenger, store)
    site = make_site(
        iplist, sessions, store, reactor, config.max_members, config.admin_token,
        metrics=metrics,
    )
    access = _listeners(reactor, config, "access", factory)
    listeners = _listeners(reactor, config, "http", site) + access
    try:
        open_database(config.database, config.synchronous).conn.close()
    except StoreError as e:
        raise _fail(f"[store] database: {e}") from None

    def housekeeping() -> None:
        try:
            factory.sweep()
            throttle.prune()
            sessions.end_disabled().addErrback(
                lambda f: log.failure("checking disabled users", f)
            )
            presence.check_lists().addErrback(lambda f: log.failure("checking lists", f))
            if router.clustered:
                messenger.catch_up().addErrback(lambda f: log.failure("catching up", f))
        except Exception:
            log.failure("housekeeping")

    timer = TimerService(HOUSEKEEPING_INTERVAL, housekeeping)
    timer.clock = reactor
    expiry = TimerService(EXPIRY_INTERVAL, lambda: sessions.expire().addErrback(
        lambda f: log.failure("ending stale sessions", f)))
    expiry.clock = reactor
    resend = TimerService(RESEND_INTERVAL, messenger.resend_late)
    resend.clock = reactor
    sampler = TimerService(SAMPLE_INTERVAL, metrics.sample)
    sampler.clock = reactor

    routing: list[Service] = []
    if isinstance(router, RedisRouter):
        join_cluster(router, sessions, presence, messenger)
        redis_router = router
        routing.append(CallbackService(
            "routing", reactor, lambda: redis_router.start(reactor), redis_router.stop
        ))
    else:
        # one node: the devices that were online when it stopped linger again
        routing.append(CallbackService("sessions", reactor, sessions.restore, lambda: None))

    # Started in this order, stopped in reverse: listeners first, the store last.
    for service in [
        CallbackService("store", reactor, store.start, store.stop),
        CallbackService("auth", reactor, verifier.start, verifier.stop),
        *routing,
        timer,
        expiry,
        resend,
        sampler,
        _access_service(factory, messenger, reactor),
        *listeners,
        NotifyService(reactor),  # READY=1 once all the above run, STOPPING=1 first
    ]:
        service.setServiceParent(top)
    return top
