"""The HTTP layer's shared behaviour: JSON errors, ETags, gzip; GET /v1/iplist."""

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

from .support import Harness


class WebTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.iplist = IPList(
            [parse_server("203.0.113.10:5858 weight=2"), parse_server("203.0.113.11:5859 tls")]
        )
        self.harness = Harness()
        self.site = make_site(self.iplist, self.harness.sessions, self.harness.store)
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
        site = make_site(IPList(servers), self.harness.sessions, self.harness.store)
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
        """A path below a resource that has no children is a JSON 404."""
        response = self.successResultOf(self.h.treq.get("http://im58d.test/v1/inbox/extra"))
        body = self.successResultOf(response.json())
        self.assertEqual((response.code, body["error"]["code"]), (404, "not_found"))
