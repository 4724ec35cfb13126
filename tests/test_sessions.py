"""Sessions that outlive connections: RESUME, linger, presence, CHANGED."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from im58d.store.accounts import make_friends_txn, set_disabled_txn
from im58d.wire import encode
from im58d.wire import packets as P

from .support import NOW, Client, Harness, add_user


def resume_for(welcome: P.Welcome, ts: int = NOW, nonce: bytes = b"n0nce-01") -> P.Resume:
    """A RESUME with the proof of the contract (PROTOCOL.md 1.3)."""
    mac = hmac.new(
        welcome.session_key,
        welcome.session_id + ts.to_bytes(8, "big") + nonce,
        hashlib.sha256,
    ).digest()[:16]
    return P.Resume(welcome.session_id, ts, nonce, mac)


class ResumeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")
        self.first = self.h.connect()
        self.welcome = self.first.login("alice")
        self.session = self.h.router.session_for(self.alice_uid)

    def resume(self, packet: P.Resume) -> tuple[Client, list[Any]]:
        client = self.h.connect()
        client.send(packet)
        return client, client.received()

    def test_resume_after_a_drop(self) -> None:
        """After a drop, RESUME with the proof gets RESUMED and the same session
        (uid, token) back, in one round trip; the linger timer stops."""
        self.first.drop()
        client, answer = self.resume(resume_for(self.welcome))
        self.assertEqual(answer, [P.Resumed(self.alice_uid, 0, 7)])
        session = self.h.router.session_for(self.alice_uid)
        self.assertIs(session, self.session)
        self.assertIs(session.connection, client.protocol)
        self.h.reactor.advance(301)
        self.assertIs(self.h.router.session_for(self.alice_uid), session)
        client.send(P.Ping())
        self.assertEqual(client.received(), [P.Pong()])

    def test_inbox_kept_across_the_drop(self) -> None:
        """Messages that came while the session lingered count in RESUMED's
        inbox_max; later ones are pushed live."""
        self.first.drop()
        bob = self.h.connect()
        bob.login("bob")
        bob.send(P.MsgR(1, self.alice_uid, "while away"))
        client, answer = self.resume(resume_for(self.welcome))
        self.assertEqual(answer, [P.Resumed(self.alice_uid, 1, 7)])
        bob.send(P.MsgR(2, self.alice_uid, "now"))
        self.assertEqual([(p.seq, p.body) for p in client.received()], [(2, "now")])

    def test_resume_closes_a_connection_still_attached(self) -> None:
        """A RESUME while the old connection has not noticed the drop yet
        closes the old one; the session carries on over the new."""
        client, answer = self.resume(resume_for(self.welcome))
        self.assertIsInstance(answer[0], P.Resumed)
        self.assertTrue(self.first.transport.disconnected)
        self.first.drop()  # what the abort leads to: nothing changes
        self.assertIs(self.session.connection, client.protocol)
        self.assertFalse(self.session.ended)

    def test_replayed_resume(self) -> None:
        """The same RESUME (same nonce) twice: the second gets ERROR 409."""
        packet = resume_for(self.welcome)
        self.first.drop()
        first, answer = self.resume(packet)
        self.assertIsInstance(answer[0], P.Resumed)
        first.drop()
        _, answer = self.resume(packet)
        self.assertEqual([p.code for p in answer], [409])
        _, answer = self.resume(resume_for(self.welcome, nonce=b"n0nce-02"))
        self.assertIsInstance(answer[0], P.Resumed)

    def test_ts_window(self) -> None:
        """A ts more than 300 s off the server's clock gets 409; 300 s is fine."""
        self.first.drop()
        for ts, nonce in ((NOW - 301, b"a" * 8), (NOW + 301, b"b" * 8)):
            _, answer = self.resume(resume_for(self.welcome, ts=ts, nonce=nonce))
            self.assertEqual([p.code for p in answer], [409], ts)
        client, answer = self.resume(resume_for(self.welcome, ts=NOW - 300, nonce=b"c" * 8))
        self.assertIsInstance(answer[0], P.Resumed)

    def test_bad_proof_and_unknown_session(self) -> None:
        """A wrong mac, another session's id, or an ended session: 409, and
        the connection stays for a LOGIN."""
        good = resume_for(self.welcome)
        bad_mac = good._replace(mac=bytes(16))
        client, answer = self.resume(bad_mac)
        self.assertEqual([p.code for p in answer], [409])
        _, answer = self.resume(good._replace(session_id=bytes(16)))
        self.assertEqual([p.code for p in answer], [409])
        self.assertFalse(client.closed)
        welcome = client.login("alice")
        self.assertNotEqual(welcome.session_id, self.welcome.session_id)
        _, answer = self.resume(good)  # the replaced session
        self.assertEqual([p.code for p in answer], [409])

    def test_after_bye_or_expiry(self) -> None:
        """A session ended by BYE or by linger expiry cannot be resumed."""
        self.first.send(P.Bye())
        _, answer = self.resume(resume_for(self.welcome))
        self.assertEqual([p.code for p in answer], [409])
        again = self.h.connect()
        welcome = again.login("alice")
        again.drop()
        self.h.reactor.advance(300)
        _, answer = self.resume(resume_for(welcome))
        self.assertEqual([p.code for p in answer], [409])

    def test_after_a_server_restart(self) -> None:
        """A server that restarted has no session to resume: 409, then LOGIN
        works on the same connection."""
        restarted = Harness()
        add_user(restarted.store, "alice")
        client = restarted.connect()
        client.send(resume_for(self.welcome))
        self.assertEqual([p.code for p in client.received()], [409])
        client.login("alice")

    def test_packets_behind_resume_wait(self) -> None:
        """Packets pipelined behind RESUME are handled after RESUMED."""
        self.first.drop()
        client = self.h.connect()
        client.send(resume_for(self.welcome), P.Ping())
        self.assertEqual([type(p) for p in client.received()], [P.Resumed, P.Pong])

    def test_resume_bytes(self) -> None:
        """RESUME and RESUMED take at most 72 bytes together."""
        self.first.drop()
        client = self.h.connect()
        packet = resume_for(self.welcome)
        sent = len(encode(packet))
        client.send(packet)
        received = len(client.transport.value())
        self.assertLessEqual(sent + received, 72)


class PresenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.uids = {name: add_user(self.h.store, name) for name in ("alice", "bob", "carol")}
        db = self.h.store._db
        assert db is not None
        make_friends_txn(db, self.uids["alice"], self.uids["bob"], 0)
        self.alice = self.h.connect()
        self.alice.login("alice")
        self.carol = self.h.connect()
        self.carol.login("carol")
        self.bob = self.h.connect()
        self.bob_welcome = self.bob.login("bob")
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], True)])
        self.assertEqual(self.carol.received(), [])  # not bob's friend

    def test_bye(self) -> None:
        """BYE: the friends get PRESENCE false at once, once."""
        self.bob.send(P.Bye())
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], False)])
        self.h.reactor.advance(600)
        self.assertEqual(self.alice.received(), [])

    def test_drop_and_resume_flaps_nothing(self) -> None:
        """A drop followed by RESUME within the linger time: no presence packet
        at all, to anyone."""
        self.bob.drop()
        self.h.reactor.advance(299)
        again = self.h.connect()
        again.send(resume_for(self.bob_welcome))
        self.assertIsInstance(again.received()[0], P.Resumed)
        self.h.reactor.advance(600)
        self.assertEqual((self.alice.received(), self.carol.received()), ([], []))

    def test_linger_expiry(self) -> None:
        """A drop without resume: PRESENCE false when the linger runs out, not
        before."""
        self.bob.drop()
        self.h.reactor.advance(299)
        self.assertEqual(self.alice.received(), [])
        self.h.reactor.advance(1)
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], False)])

    def test_replaced_session(self) -> None:
        """A newer LOGIN of the same user changes nothing for the friends."""
        again = self.h.connect()
        again.login("bob")
        self.assertEqual(self.alice.received(), [])
        again.send(P.Bye())
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], False)])

    def test_disabled(self) -> None:
        """A disabled account: KICKED 4 to it, PRESENCE false to its friends."""
        db = self.h.store._db
        assert db is not None
        set_disabled_txn(db, "bob", True)
        self.h.sessions.end_disabled()
        self.h.turn()
        self.assertEqual(self.bob.received(), [P.Kicked(P.KICKED_DISABLED)])
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], False)])

    def test_http_login(self) -> None:
        """A session made over HTTP is a session start too."""
        self.bob.send(P.Bye())
        self.alice.received()
        status, _ = self.h.http("POST", "/v1/login", body={"user": "bob", "password": "pw"})
        self.assertEqual(status, 200)
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], True)])

    def test_lists_changed_elsewhere(self) -> None:
        """A friendship made outside the daemon (im58d-admin) reaches both
        connected users as CHANGED at the next housekeeping round; presence
        then follows the new list."""
        db = self.h.store._db
        assert db is not None
        make_friends_txn(db, self.uids["carol"], self.uids["bob"], 0)
        self.h.presence.check_lists()
        self.h.turn()
        self.assertEqual(self.carol.received(), [P.Changed("friends", 2)])
        self.assertEqual(self.bob.received(), [P.Changed("friends", 3)])
        self.assertEqual(self.alice.received(), [])
        self.h.presence.check_lists()
        self.h.turn()
        self.assertEqual(self.bob.received(), [])  # told once
        self.bob.send(P.Bye())
        self.assertEqual(self.carol.received(), [P.Presence(self.uids["bob"], False)])
