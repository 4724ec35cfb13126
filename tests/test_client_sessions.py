"""The reference client across drops (contract version 2): RESUME first,
one round trip; the nonce counter; a session that is gone is told to the
app instead of a LOGIN with a kept password; change notices; the IP list and
the choice of server."""

from __future__ import annotations

import base64
import os
import random
from typing import Any

from im58d.client import RESUME_REFUSED, ClientState, FileState
from im58d.wire import packets as P

from .support import NOW, add_user
from .test_client import SDKTestCase


class ResumeTests(SDKTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.befriend(self.alice_uid, self.bob_uid)
        self.presence: list[tuple[int, bool]] = []
        self.bob = self.device("bob", on_presence=lambda uid, on: self.presence.append((uid, on)))
        self.start(self.bob)
        self.alice = self.device("alice")
        self.start(self.alice)
        self.assertEqual(self.presence, [(self.alice_uid, True)])

    def test_reconnect_resumes(self) -> None:
        """After a drop the client resumes its session (no password, no new
        session) in one round trip, and its friends see no presence change
        at all."""
        token = self.server_device(self.alice).token
        self.alice.link.cut()
        self.h.reactor.advance(2)  # the backoff: a new connection
        self.assertEqual(len(self.alice.links), 2)
        [resume] = self.alice.link.written()
        self.assertIsInstance(resume, P.Resume)
        self.settle(2)  # RESUME there, RESUMED back
        self.assertTrue(self.alice.client.connected)
        self.assertEqual((self.alice.client.logins, self.alice.client.resumes), (1, 1))
        self.assertEqual(self.server_device(self.alice).token, token)
        self.wait(600)
        self.assertEqual(self.presence, [(self.alice_uid, True)])
        self.assertEqual(self.alice.lost, [])

    def test_nonce_grows_and_is_saved_first(self) -> None:
        """Each RESUME's nonce is 8 bytes big-endian, greater than the one
        before, at least the time in microseconds, and is in the state file
        before it goes out."""
        path = self.mktemp()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        carol_uid = add_user(self.h.store, "carol")
        carol = self.device("carol", state=FileState(path))
        self.start(carol)
        nonces = []
        for _ in range(3):
            carol.link.cut()
            self.h.reactor.advance(2)
            [resume] = carol.link.written()
            nonce = int.from_bytes(resume.nonce, "big")
            self.assertEqual(len(resume.nonce), 8)
            saved = FileState(path).session
            assert saved is not None
            self.assertEqual(saved["nonce"], nonce)
            self.assertGreaterEqual(nonce, int(self.h.reactor.seconds() * 1_000_000))
            nonces.append(nonce)
            self.settle()
            self.assertTrue(carol.client.connected)
        self.assertEqual(nonces, sorted(set(nonces)))
        self.assertEqual(carol.client.resumes, 3)
        self.assertEqual(carol.client.uid, carol_uid)

    def test_nonce_counter_ahead_of_the_clock(self) -> None:
        """With a stored counter ahead of the clock (a clock set back), the
        nonce is the counter plus one."""
        session = self.alice.client.state.session
        assert session is not None
        session["nonce"] = (NOW + 10_000) * 1_000_000
        self.alice.link.cut()
        self.h.reactor.advance(2)
        [resume] = self.alice.link.written()
        self.assertEqual(int.from_bytes(resume.nonce, "big"), (NOW + 10_000) * 1_000_000 + 1)
        self.settle()
        self.assertTrue(self.alice.client.connected)

    def test_resume_refused_without_password(self) -> None:
        """When the session is gone (signed out from another device while
        this one was away) RESUME gets 409; without a password the client
        does not log in: it forgets the session, tells the app ("resume
        refused") and stops reconnecting."""
        tablet = self.device("alice", device="tablet")
        self.start(tablet)
        self.alice.link.cut()
        device_id = base64.urlsafe_b64encode(self.alice.client.state.device_id).rstrip(b"=")
        d = tablet.client.sign_out(device_id.decode())
        self.settle()
        self.successResultOf(d)
        self.wait(2)
        self.assertEqual(self.alice.lost, [RESUME_REFUSED])
        self.assertIsNone(self.alice.client.state.session)
        self.assertFalse(self.alice.client.connected)
        self.wait(120)
        self.assertEqual(len(self.alice.links), 2)
        self.assertEqual((self.alice.client.logins, self.alice.client.resumes), (1, 0))
        self.assertEqual(tablet.lost, [])

    def test_resume_refused_with_a_password_logs_in(self) -> None:
        """A client given a password on a state whose session is gone logs in
        on the same connection after the 409 (one connection for both
        tries), forgets the password and works on; the app sees no error."""
        state = self.alice.client.state
        stopped = self.alice.client.stop()
        self.settle()
        self.successResultOf(stopped)
        session = state.session
        assert session is not None
        # signed out while the app was closed
        self.assertEqual(self.h.http("DELETE", "/v1/devices/current", session["token"]),
                         (204, None))
        again = self.device("alice", password="pw", state=state)
        self.start(again)
        self.assertEqual((again.client.logins, again.client.resumes), (1, 0))
        self.assertEqual(len(again.links), 1)
        self.assertIsNone(again.client.password)
        self.assertEqual(again.lost, [])
        out = again.client.send(self.bob_uid, "still here")
        self.settle()
        self.assertEqual([m.body for m in self.bob.shown], ["still here"])
        self.assertEqual(out.state, "delivered")

    def test_what_came_meanwhile_is_pulled(self) -> None:
        """Messages that came while the client was away are pulled after
        RESUMED; what it sent meanwhile goes out then."""
        self.alice.link.cut()
        self.bob.client.send(self.alice_uid, "while you were away")
        queued = self.alice.client.send(self.bob_uid, "written offline")
        self.settle()
        self.wait(2)
        self.assertEqual(self.alice.client.resumes, 1)
        self.assertEqual([m.body for m in self.alice.shown], ["while you were away"])
        self.assertEqual(queued.state, "delivered")

    def test_changes_reach_the_app(self) -> None:
        """CHANGED reaches the app's on_changed with the list and its version:
        friends, pending friend requests and devices too."""
        changes: list[tuple[str, int]] = []
        self.alice.client.on_changed = lambda what, version: changes.append((what, version))
        carol_uid = add_user(self.h.store, "carol")
        self.befriend(self.alice_uid, carol_uid)
        self.h.presence.check_lists()
        self.settle()
        add_user(self.h.store, "dave")
        dave = self.device("dave")
        self.start(dave)
        code, _ = self.h.http("POST", "/v1/friends", dave.client.token, {"uid": self.alice_uid})
        self.assertEqual(code, 202)
        self.settle()
        tablet = self.device("alice", device="tablet")
        self.start(tablet)
        code, versions = self.h.http("GET", "/v1/versions", self.alice.client.token)
        self.assertEqual(code, 200)
        self.assertEqual(changes, [("friends", versions["friends"]),
                                   ("requests", versions["requests"]),
                                   ("devices", versions["devices"])])

    def test_online_again_after_a_long_absence(self) -> None:
        """A RESUME after the linger time brings the device back online:
        ONLINE tells the app the friends online now."""
        self.assertEqual(self.alice.online, [(self.bob_uid,)])
        self.alice.refuse = True  # away longer than the linger
        self.alice.link.cut()
        self.wait(400)
        self.assertEqual(self.presence, [(self.alice_uid, True), (self.alice_uid, False)])
        self.alice.refuse = False
        self.wait(40)
        self.assertEqual(self.alice.client.resumes, 1)
        self.assertEqual(self.alice.online, [(self.bob_uid,), (self.bob_uid,)])


class ServerChoiceTests(SDKTestCase):
    def client_with(self, servers: list[dict[str, Any]], last: Any = None) -> Any:
        state = ClientState(next_cmid=1)
        state.servers = servers
        state.last_server = last
        return self.device("alice", state=state).client

    def test_last_server_first(self) -> None:
        """The server used last is tried first; when it fails, another."""
        a = {"host": "10.0.0.1", "port": 5858, "tls": False, "weight": 1}
        b = {"host": "10.0.0.2", "port": 5858, "tls": True, "weight": 1}
        client = self.client_with([a, b], last=("10.0.0.2", 5858, True))
        self.assertEqual(client.choose(), ("10.0.0.2", 5858, True))
        client._avoid = ("10.0.0.2", 5858, True)
        self.assertEqual(client.choose(), ("10.0.0.1", 5858, False))

    def test_weights(self) -> None:
        """Without a last server, servers are chosen in proportion to their
        weights."""
        a = {"host": "10.0.0.1", "port": 5858, "tls": False, "weight": 1}
        b = {"host": "10.0.0.2", "port": 5858, "tls": False, "weight": 3}
        client = self.client_with([a, b])
        random.seed(58)
        picks = [client.choose()[0] for _ in range(4000)]
        share = picks.count("10.0.0.2") / len(picks)
        self.assertTrue(0.72 < share < 0.78, share)

    def test_backoff_is_jittered_and_grows(self) -> None:
        """Reconnect delays grow (doubling up to max_backoff) and are jittered
        (between half and one and a half times the backoff)."""
        client = self.device("alice", min_backoff=1.0, max_backoff=8.0).client
        client._stopping = False
        delays = []
        random.seed(5)
        for _ in range(6):
            client._reconnect_later()
            delays.append(client._retry.getTime() - self.h.reactor.seconds())
            client._retry.cancel()
            client._retry = None
        for delay, backoff in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
            self.assertTrue(0.5 * backoff <= delay <= 1.5 * backoff, (delay, backoff))
        self.assertGreater(len(set(delays)), 4)

    def test_iplist_fetched_and_refetched_on_a_new_version(self) -> None:
        """The client learns the servers from GET /v1/iplist, connects by
        address, and fetches the list again only when WELCOME or RESUMED
        carries another version."""
        device = self.device("alice")
        client = device.client
        self.successResultOf(client._fetch_iplist())
        self.assertEqual(client.state.iplist_version, self.h.iplist.version)
        self.assertEqual(client.choose(), ("127.0.0.1", 5858, False))
        self.start(device)  # WELCOME says 7: another version
        self.settle()
        fetches = [r for r in device.http.requests if r[1] == "/v1/iplist"]
        self.assertEqual(len(fetches), 2)
        client.state.iplist_version = 7  # now the one WELCOME announces
        device.link.cut()
        self.wait(2)
        fetches = [r for r in device.http.requests if r[1] == "/v1/iplist"]
        self.assertEqual(len(fetches), 2)
        self.assertEqual(client.resumes, 1)
