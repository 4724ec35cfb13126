"""The HTTP layer's shared behaviour: JSON errors, ETags, gzip; GET /v1/iplist;
signing devices in and out over HTTP (/v1/login, /v1/devices) and bearer tokens."""

from __future__ import annotations

import gzip
from typing import Any

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import readBody
from twisted.web.http_headers import Headers

from im58d.routing.iplist import IPList, parse_server
from im58d.web.root import make_site
from im58d.wire import packets as P

from .support import NOW, Client, Harness, add_user, resume_for
from .test_messages import b64, named_device


class WebTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.iplist = IPList(
            [parse_server("203.0.113.10:5858 weight=2"), parse_server("203.0.113.11:5859 tls")]
        )
        self.harness = Harness()
        self.site = make_site(self.iplist, self.harness.sessions, self.harness.store,
                              self.harness.reactor)
        self.treq: Any = StubTreq(self.site.resource)

    def get(self, path: str, **headers: str) -> Any:
        response = self.successResultOf(
            self.treq.get(
                "http://im58d.test" + path,
                headers={k.replace("_", "-"): [v] for k, v in headers.items()},
            )
        )
        body = self.successResultOf(response.content())
        return response, body

    def test_iplist(self) -> None:
        """GET /v1/iplist lists the servers with their version as ETag."""
        response, body = self.get("/v1/iplist")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(
            body,
            b'{"version":%d,"servers":[{"host":"203.0.113.10","port":5858,"tls":false,'
            b'"weight":2},{"host":"203.0.113.11","port":5859,"tls":true,"weight":1}]}'
            % self.iplist.version,
        )
        self.assertEqual(response.headers.getRawHeaders("etag"), [f'"{self.iplist.version}"'])

    def test_iplist_version_follows_content(self) -> None:
        """The same servers give the same version; any change gives another."""
        same = IPList([parse_server("203.0.113.10:5858 weight=2"),
                       parse_server("203.0.113.11:5859 tls")])
        other = IPList([parse_server("203.0.113.10:5858 weight=3"),
                        parse_server("203.0.113.11:5859 tls")])
        self.assertEqual(same.version, self.iplist.version)
        self.assertNotEqual(other.version, self.iplist.version)

    def test_not_modified(self) -> None:
        """If-None-Match with the current version gets 304 and no body; an
        old version gets the list."""
        tag = f'"{self.iplist.version}"'
        response, body = self.get("/v1/iplist", if_none_match=tag)
        self.assertEqual((response.code, body), (304, b""))
        response, body = self.get("/v1/iplist", if_none_match=f'"1", W/{tag}')
        self.assertEqual(response.code, 304)
        response, body = self.get("/v1/iplist", if_none_match='"1"')
        self.assertEqual(response.code, 200)

    def test_gzip(self) -> None:
        """Answers of 256 bytes or more are gzip-compressed when the request
        accepts it; smaller ones are not (gzip would make them bigger)."""
        agent = RequestTraversalAgent(self.site.resource)
        headers = Headers({b"accept-encoding": [b"gzip"]})
        small = self.successResultOf(
            agent.request(b"GET", b"http://im58d.test/v1/iplist", headers)
        )
        self.assertIsNone(small.headers.getRawHeaders(b"content-encoding"))
        self.assertLess(len(self.successResultOf(readBody(small))), 256)
        servers = [parse_server(f"203.0.113.{i}:5858") for i in range(1, 11)]
        site = make_site(IPList(servers), self.harness.sessions, self.harness.store,
                         self.harness.reactor)
        agent = RequestTraversalAgent(site.resource)
        response = self.successResultOf(
            agent.request(b"GET", b"http://im58d.test/v1/iplist", headers)
        )
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        body = self.successResultOf(readBody(response))
        self.assertIn(b'"203.0.113.10"', gzip.decompress(body))

    def test_unknown_path(self) -> None:
        """An unknown path is a JSON 404, not an HTML page."""
        for path in ("/", "/v1", "/v1/nothing", "/v2/iplist"):
            response, body = self.get(path)
            self.assertEqual(response.code, 404, path)
            self.assertIn(b'"code":"not_found"', body)

    def test_wrong_method(self) -> None:
        """A method the resource does not have is a JSON 405 with Allow."""
        response = self.successResultOf(self.treq.post("http://im58d.test/v1/iplist", data=b"{}"))
        body = self.successResultOf(response.content())
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
        self.assertIn(b'"code":"method_not_allowed"', body)


class BadRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def test_deep_json(self) -> None:
        """A body nested too deep for the JSON parser is a JSON 400, not a 500."""
        deep = "[" * 30000 + "]" * 30000  # under 64 KiB
        response = self.successResultOf(
            self.h.treq.post("http://im58d.test/v1/login", data=deep.encode())
        )
        body = self.successResultOf(response.json())
        self.assertEqual((response.code, body["error"]["code"]), (400, "bad_request"))

    def test_body_over_64_kib(self) -> None:
        """A body over 64 KiB is a JSON 413."""
        response = self.successResultOf(
            self.h.treq.post("http://im58d.test/v1/login", data=b" " * (64 * 1024 + 1))
        )
        self.assertEqual(response.code, 413)

    def test_body_over_a_mebibyte_drops_the_connection(self) -> None:
        """A body past 1 MiB is not read to its end: the connection is dropped."""
        channel = self.h.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST /v1/login HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n"
        )
        for _ in range(20):
            channel.dataReceived(b" " * 65536)
        self.assertTrue(transport.disconnected)
        # as a real transport would after the abort: the channel's idle
        # timer (on the global reactor) goes, and no later test inherits it
        channel.connectionLost(Failure(ConnectionAborted()))

    def test_extra_path_segments(self) -> None:
        """A path below a resource that has no children is a JSON 404, with
        or without a token (the path is checked before the token)."""
        add_user(self.h.store, "alice")
        token = self.h.connect().login("alice").token
        for path, who in (("/v1/inbox/extra", None), ("/v1/inbox/extra", token),
                          ("/v1/devices/current/x", None), ("/v1/devices/current/x", token)):
            status, body = self.h.http("GET", path, who)
            self.assertEqual((status, body["error"]["code"]), (404, "not_found"), (path, who))

    def test_wrong_method_before_the_token(self) -> None:
        """A method an authenticated resource does not have is a JSON 405
        with Allow, with or without a token."""
        for path, allowed in (("/v1/inbox", "GET, HEAD"), ("/v1/devices", "GET, HEAD")):
            response, content = self.h.request("PUT", path)
            self.assertEqual(response.code, 405, path)
            self.assertEqual(response.headers.getRawHeaders("allow"), [allowed], path)
            self.assertIn(b'"code":"method_not_allowed"', content)


def resume(h: Harness, welcome: P.Welcome, nonce: int) -> Client:
    """A new connection that RESUMEs the session of ``welcome`` now: the
    RESUMED (and the ONLINE of a device that was offline) is left unread."""
    client = h.connect()
    client.send(resume_for(welcome, int(h.reactor.seconds()), nonce.to_bytes(8, "big")))
    return client


class DevicesTestCase(SynchronousTestCase):
    """alice signed in on a phone (at NOW) and a tablet (ten seconds later),
    both connected; bob on one device."""

    settings: dict[str, Any] = {}

    def setUp(self) -> None:
        self.h = Harness(**self.settings)
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")
        self.phone = self.h.connect()
        self.phone_welcome = self.phone.login("alice", device=named_device("alice-phone"))
        self.h.reactor.advance(10)
        self.tablet = self.h.connect()
        self.tablet_welcome = self.tablet.login("alice", device=named_device("alice-tablet"))
        self.bob = self.h.connect()
        self.bob_token = self.bob.login("bob", device=named_device("bob-phone")).token
        self.phone.received()  # CHANGED "devices" for the tablet

    @property
    def phone_token(self) -> str:
        return self.phone_welcome.token

    @property
    def tablet_token(self) -> str:
        return self.tablet_welcome.token

    def devices(self, token: str) -> dict[str, Any]:
        status, body = self.h.http("GET", "/v1/devices", token)
        self.assertEqual(status, 200, body)
        answer: dict[str, Any] = body
        return answer

    def version(self) -> int:
        return int(self.devices(self.phone_token)["version"])

    def changed(self, client: Client) -> list[P.Changed]:
        return [p for p in client.received() if isinstance(p, P.Changed)]


class DeviceListTests(DevicesTestCase):
    def test_shape(self) -> None:
        """GET /v1/devices lists the user's signed-in devices, the online ones
        first, then the most recently active: id (base64url), name, current
        (the caller's own), online, last_seen (now, for a device online
        now), push (null); other users' are not listed."""
        listed = self.devices(self.phone_token)
        self.assertEqual(set(listed), {"version", "devices"})
        now = int(self.h.reactor.seconds())
        self.assertEqual(listed["devices"], [
            {"id": b64(named_device("alice-tablet")), "name": "test device", "current": False,
             "online": True, "last_seen": now, "push": None},
            {"id": b64(named_device("alice-phone")), "name": "test device", "current": True,
             "online": True, "last_seen": now, "push": None},
        ])
        from_tablet = self.devices(self.tablet_token)
        self.assertEqual([d["current"] for d in from_tablet["devices"]], [True, False])
        self.assertEqual(from_tablet["version"], listed["version"])
        self.assertEqual([d["id"] for d in self.devices(self.bob_token)["devices"]],
                         [b64(named_device("bob-phone"))])

    def test_device_name_and_offline(self) -> None:
        """A device signed in over HTTP is listed with its name and offline
        (it is online once it connects)."""
        self.h.reactor.advance(5)
        status, body = self.h.http("POST", "/v1/login", body={
            "user": "alice", "password": "pw", "device_id": b64(named_device("alice-web")),
            "device_name": "Firefox"})
        self.assertEqual(status, 200, body)
        [web] = [d for d in self.devices(self.phone_token)["devices"]
                 if d["id"] == b64(named_device("alice-web"))]
        self.assertEqual(web, {"id": b64(named_device("alice-web")), "name": "Firefox",
                               "current": False, "online": False, "last_seen": NOW + 15,
                               "push": None})
        self.assertEqual([d["id"] for d in self.devices(body["token"])["devices"]
                          if d["current"]], [b64(named_device("alice-web"))])

    def test_etag(self) -> None:
        """The list answers with the ETag of its version and honours
        If-None-Match with 304 and no body."""
        version = self.version()
        headers = {"Authorization": [f"Bearer {self.phone_token}"]}
        response, content = self.h.request("GET", "/v1/devices", headers)
        self.assertEqual(response.headers.getRawHeaders("etag"), [f'"{version}"'])
        response, content = self.h.request(
            "GET", "/v1/devices", {**headers, "If-None-Match": [f'"{version}"']})
        self.assertEqual((response.code, content), (304, b""))
        response, content = self.h.request(
            "GET", "/v1/devices", {**headers, "If-None-Match": [f'"{version - 1}"']})
        self.assertEqual(response.code, 200)

    def test_needs_a_token(self) -> None:
        """Listing and signing out need a session's bearer token: 401."""
        for method, path in (("GET", "/v1/devices"), ("DELETE", "/v1/devices/current"),
                             ("DELETE", f"/v1/devices/{b64(named_device('alice-tablet'))}")):
            self.assertEqual(self.h.http(method, path)[0], 401, path)
            self.assertEqual(self.h.http(method, path, "forged")[0], 401, path)
        self.assertEqual(len(self.devices(self.phone_token)["devices"]), 2)


class DeviceVersionTests(DevicesTestCase):
    def test_new_device_moves_the_version(self) -> None:
        """Signing in a new device (LOGIN or POST /v1/login) moves the
        device list version; the user's other connected devices get CHANGED
        "devices" with it, the new device does not, other users get nothing."""
        before = self.version()
        laptop = self.h.connect()
        laptop.login("alice", device=named_device("alice-laptop"))
        version = self.version()
        self.assertGreater(version, before)
        self.assertEqual(self.changed(self.phone), [P.Changed("devices", version)])
        self.assertEqual(self.changed(self.tablet), [P.Changed("devices", version)])
        self.assertEqual(laptop.received(), [])
        self.assertEqual(self.bob.received(), [])
        status, _ = self.h.http("POST", "/v1/login", body={
            "user": "alice", "password": "pw", "device_id": b64(named_device("alice-web"))})
        self.assertEqual(status, 200)
        again = self.version()
        self.assertGreater(again, version)
        for client in (self.phone, self.tablet, laptop):
            self.assertEqual(self.changed(client), [P.Changed("devices", again)])
        self.assertEqual(self.h.http("GET", "/v1/versions", self.phone_token)[1]["devices"],
                         again)

    def test_going_offline_and_online_keeps_the_version(self) -> None:
        """BYE, a dropped connection, a linger running out and a RESUME
        change no session: the version stays and the user's connected
        devices get no CHANGED."""
        laptop = self.h.connect()
        laptop.login("alice", device=named_device("alice-laptop"))
        self.tablet.received()
        before = self.version()
        self.tablet.send(P.Bye())
        self.phone.drop()
        self.h.reactor.advance(301)  # the phone's linger runs out
        again = resume(self.h, self.tablet_welcome, 1)
        self.assertEqual([type(p) for p in again.received()], [P.Resumed, P.Online])
        self.assertEqual(self.version(), before)
        self.assertEqual(laptop.received(), [])
        self.assertEqual(self.bob.received(), [])

    def test_sign_out_moves_the_version(self) -> None:
        """Signing a device out moves the version; the user's remaining
        connected devices get CHANGED "devices"."""
        before = self.version()
        status, _ = self.h.http("DELETE", f"/v1/devices/{b64(named_device('alice-tablet'))}",
                                self.phone_token)
        self.assertEqual(status, 204)
        version = self.version()
        self.assertGreater(version, before)
        self.assertEqual(self.changed(self.phone), [P.Changed("devices", version)])
        self.assertEqual(self.bob.received(), [])

    def test_eviction_moves_the_version(self) -> None:
        """A sign-in past max_devices ends the least recently active session
        (KICKED 5 on its connection); the version moves and the remaining
        devices get CHANGED "devices"."""
        self.h.sessions.max_devices = 2
        before = self.version()
        self.h.reactor.advance(5)
        laptop = self.h.connect()
        laptop.login("alice", device=named_device("alice-laptop"))
        self.assertEqual(self.phone.received()[-1], P.Kicked(P.KICKED_SIGNED_OUT))
        self.assertTrue(self.phone.closed)
        status, body = self.h.http("GET", "/v1/devices", self.tablet_token)
        self.assertGreater(body["version"], before)
        self.assertEqual([d["id"] for d in body["devices"]],
                         [b64(named_device("alice-laptop")), b64(named_device("alice-tablet"))])
        self.assertEqual(self.changed(self.tablet), [P.Changed("devices", body["version"])])
        self.assertEqual(self.h.http("GET", "/v1/devices", self.phone_token)[0], 401)


class SignOutTests(DevicesTestCase):
    def test_sign_out_another_device(self) -> None:
        """DELETE /v1/devices/<id> signs that device out: 204, its connection
        gets KICKED 5 and is closed, it leaves the list, its token is 401,
        and deleting it again is 404."""
        path = f"/v1/devices/{b64(named_device('alice-tablet'))}"
        self.assertEqual(self.h.http("DELETE", path, self.phone_token), (204, None))
        self.assertEqual(self.tablet.received(), [P.Kicked(P.KICKED_SIGNED_OUT)])
        self.assertTrue(self.tablet.closed)
        self.assertEqual([d["id"] for d in self.devices(self.phone_token)["devices"]],
                         [b64(named_device("alice-phone"))])
        self.assertEqual(self.h.http("GET", "/v1/inbox", self.tablet_token)[0], 401)
        status, body = self.h.http("DELETE", path, self.phone_token)
        self.assertEqual((status, body["error"]["code"]), (404, "not_found"))

    def test_sign_out_current(self) -> None:
        """DELETE /v1/devices/current signs the calling device out (204,
        KICKED 5 on its connection); its token stops working."""
        self.assertEqual(self.h.http("DELETE", "/v1/devices/current", self.tablet_token),
                         (204, None))
        self.assertEqual(self.tablet.received()[-1], P.Kicked(P.KICKED_SIGNED_OUT))
        self.assertEqual(self.h.http("GET", "/v1/devices", self.tablet_token)[0], 401)
        self.assertEqual(self.h.http("DELETE", "/v1/devices/current", self.tablet_token)[0],
                         401)
        self.assertEqual(len(self.devices(self.phone_token)["devices"]), 1)
        self.assertFalse(self.phone.closed)

    def test_sign_out_of_an_offline_device(self) -> None:
        """A device signed in over HTTP and never connected is signed out
        all the same: 204, and its token is 401 from then on."""
        status, body = self.h.http("POST", "/v1/login", body={
            "user": "alice", "password": "pw", "device_id": b64(named_device("alice-web"))})
        token = body["token"]
        self.assertEqual(self.h.http("GET", "/v1/inbox", token)[0], 200)
        path = f"/v1/devices/{b64(named_device('alice-web'))}"
        self.assertEqual(self.h.http("DELETE", path, self.phone_token), (204, None))
        self.assertEqual(self.h.http("GET", "/v1/inbox", token)[0], 401)

    def test_unknown_device(self) -> None:
        """An id of no signed-in device of the caller is 404, another
        user's device included; nothing is signed out."""
        for other in (named_device("nobody"), named_device("bob-phone")):
            status, body = self.h.http("DELETE", f"/v1/devices/{b64(other)}", self.phone_token)
            self.assertEqual((status, body["error"]["code"]), (404, "not_found"), other)
        self.assertFalse(self.bob.closed)
        self.assertEqual(len(self.devices(self.phone_token)["devices"]), 2)
        self.assertEqual(self.h.http("GET", "/v1/inbox", self.bob_token)[0], 200)

    def test_malformed_device_id(self) -> None:
        """An id that is not 16 bytes in base64url without padding is 400;
        nothing is signed out."""
        for bad in ("abc", b64(b"x" * 15), b64(b"x" * 17), b64(named_device("alice-tablet")) + "=",
                    "%2B" * 8, "Current", "é" * 22):
            status, body = self.h.http("DELETE", f"/v1/devices/{bad}", self.phone_token)
            self.assertEqual((status, body["error"]["code"]), (400, "bad_request"), bad)
        self.assertEqual(len(self.devices(self.phone_token)["devices"]), 2)
        self.assertFalse(self.tablet.closed)


class TokenTests(DevicesTestCase):
    def test_token_works_while_offline(self) -> None:
        """A device's bearer token keeps working while the device is offline
        (after BYE, and after its linger ran out), and stops after the
        device is signed out (401)."""
        self.tablet.send(P.Bye())
        self.assertTrue(self.tablet.closed)
        self.assertEqual(self.h.http("GET", "/v1/inbox", self.tablet_token)[0], 200)
        listed = self.devices(self.tablet_token)["devices"]
        self.assertEqual([(d["current"], d["online"]) for d in listed], [(False, True),
                                                                          (True, False)])
        self.phone.drop()
        self.h.reactor.advance(301)  # the linger runs out: offline
        self.assertEqual(self.h.http("GET", "/v1/inbox", self.phone_token)[0], 200)
        self.assertEqual([d["online"] for d in self.devices(self.phone_token)["devices"]],
                         [False, False])
        self.assertEqual(self.h.http("DELETE", "/v1/devices/current", self.tablet_token),
                         (204, None))
        self.assertEqual(self.h.http("GET", "/v1/inbox", self.tablet_token)[0], 401)
        self.assertEqual(self.h.http("GET", "/v1/inbox", self.phone_token)[0], 200)

    def test_token_of_a_replaced_session(self) -> None:
        """A new LOGIN of the same device replaces its session: the old
        token is 401, the new one works."""
        again = self.h.connect()
        token = again.login("alice", device=named_device("alice-tablet")).token
        self.assertNotEqual(token, self.tablet_token)
        self.assertEqual(self.h.http("GET", "/v1/inbox", self.tablet_token)[0], 401)
        self.assertEqual(self.h.http("GET", "/v1/inbox", token)[0], 200)
