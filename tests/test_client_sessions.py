"""The reference client across drops: RESUME first, LOGIN when it must, the
IP list and the choice of server."""

from __future__ import annotations

import random
from typing import Any

from im58d.client import ClientState
from im58d.store.accounts import make_friends_txn

from .support import add_user
from .test_client import SDKTestCase


class ResumeTests(SDKTestCase):
    def setUp(self) -> None:
        super().setUp()
        db = self.h.store._db
        assert db is not None
        make_friends_txn(db, self.alice_uid, self.bob_uid, 0)
        self.presence: list[tuple[int, bool]] = []
        self.bob = self.device("bob", on_presence=lambda uid, on: self.presence.append((uid, on)))
        self.start(self.bob)
        self.alice = self.device("alice")
        self.start(self.alice)
        self.assertEqual(self.presence, [(self.alice_uid, True)])

    def test_reconnect_resumes(self) -> None:
        """After a drop the client resumes its session (no password, no new
        session) and its friends see no presence change at all."""
        token = self.h.router.session_for(self.alice_uid).token
        self.alice.link.cut()
        self.wait(2)
        self.assertTrue(self.alice.client.connected)
        self.assertEqual((self.alice.client.logins, self.alice.client.resumes), (1, 1))
        self.assertEqual(self.h.router.session_for(self.alice_uid).token, token)
        self.wait(600)
        self.assertEqual(self.presence, [(self.alice_uid, True)])

    def test_resume_refused_falls_back_to_login(self) -> None:
        """When the session is gone (the server restarted, say) RESUME gets
        409 and the client logs in on the same connection; the app sees no
        error."""
        self.alice.link.cut()
        self.h.sessions.end(self.h.router.session_for(self.alice_uid))
        self.wait(2)
        self.assertTrue(self.alice.client.connected)
        self.assertEqual((self.alice.client.logins, self.alice.client.resumes), (2, 0))
        self.assertEqual(len(self.alice.links), 2)  # one connection for both tries
        out = self.alice.client.send(self.bob_uid, "still here")
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
        """CHANGED reaches the app's on_changed with the list and its version."""
        changes: list[tuple[str, int]] = []
        self.alice.client.on_changed = lambda what, version: changes.append((what, version))
        carol_uid = add_user(self.h.store, "carol")
        db = self.h.store._db
        assert db is not None
        make_friends_txn(db, self.alice_uid, carol_uid, 0)
        self.h.presence.check_lists()
        self.settle()
        self.assertEqual(changes, [("friends", 3)])


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
