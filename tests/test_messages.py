"""The six-packet message flow, de-duplication, acks, retransmission, offline pull."""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from im58d.logic import messages as messages_module
from im58d.store.interfaces import StoreError
from im58d.wire import encode
from im58d.wire import packets as P

from .support import NOW, Client, Harness, add_user


def count(harness: Harness, sql: str, *args: Any) -> int:
    db = harness.store._db
    assert db is not None
    return int(db.execute(sql, args).fetchone()[0])


class TwoUsers(SynchronousTestCase):
    settings: dict[str, Any] = {}

    def setUp(self) -> None:
        self.h = Harness(**self.settings)
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")
        self.alice = self.h.connect("10.0.0.1")
        self.alice.login("alice")
        self.bob = self.h.connect("10.0.0.2")
        self.bob.login("bob")


class HeldCommit:
    """The store keeps the first batch it gets uncommitted until release()."""

    def __init__(self, test: SynchronousTestCase, harness: Harness) -> None:
        self.commit: Deferred[Any] = Deferred()
        self.real = harness.store.deliver
        self.calls: list[Any] = []
        test.patch(harness.store, "deliver", self._deliver)

    def _deliver(self, *args: Any) -> Deferred[Any]:
        self.calls.append(args)
        return self.commit if len(self.calls) == 1 else self.real(*args)

    def release(self) -> None:
        self.real(*self.calls[0]).chainDeferred(self.commit)


class SixPacketTests(TwoUsers):
    def test_the_six_packets(self) -> None:
        """MSG_R → MSG_A to the sender, MSG_N to the receiver; ACK_R → ACK_A to
        the receiver, ACK_N to the sender; byte for byte as the contract says."""
        self.alice.send(P.MsgR(1, self.bob_uid, "你好"))
        sent = self.alice.transport.value()
        self.assertEqual(self.alice.received(), [P.MsgA(1, 1, NOW)])
        self.assertEqual(sent, encode(P.MsgA(1, 1, NOW)))
        msg_n = self.bob.transport.value()
        self.assertEqual(self.bob.received(), [P.MsgN(1, 1, self.alice_uid, "你好", NOW)])
        self.assertEqual(msg_n, b"\x11\x12\x95\x01\x01\x01\xa6" + "你好".encode() + b"\xce" +
                         NOW.to_bytes(4, "big"))
        self.bob.send(P.AckR(1))
        self.assertEqual(self.bob.received(), [P.AckA(1)])
        self.assertEqual(self.alice.received(), [P.AckN(1, 1)])
        self.assertEqual(
            count(self.h, "SELECT acked_seq FROM inboxes WHERE uid = ?", self.bob_uid), 1
        )

    def test_msg_a_only_after_commit(self) -> None:
        """MSG_A and MSG_N wait for the commit that holds the message."""
        held = HeldCommit(self, self.h)
        self.alice.send(P.MsgR(7, self.bob_uid, "hi"))
        self.assertEqual((self.alice.received(), self.bob.received()), ([], []))
        held.release()
        self.h.turn()
        self.assertEqual([type(p) for p in self.alice.received()], [P.MsgA])
        self.assertEqual([type(p) for p in self.bob.received()], [P.MsgN])

    def test_batch_in_one_commit(self) -> None:
        """Messages that arrive in one turn are stored in one transaction, and
        each sender's answers leave in one write."""
        batches = self.h.store.batches
        self.alice.protocol.dataReceived(
            b"".join(encode(P.MsgR(i, self.bob_uid, f"m{i}")) for i in range(1, 6))
        )
        self.bob.protocol.dataReceived(encode(P.MsgR(1, self.alice_uid, "back")))
        self.h.turn()
        self.assertEqual(self.h.store.batches, batches + 1)
        self.assertEqual([p.cmid for p in self.alice.received()[:5]], [1, 2, 3, 4, 5])
        self.assertEqual([p.seq for p in self.bob.received() if isinstance(p, P.MsgN)],
                         [1, 2, 3, 4, 5])

    def test_binary_body(self) -> None:
        """A bin body arrives as bin."""
        self.alice.send(P.MsgR(1, self.bob_uid, b"\x00\xff"))
        [msg_n] = self.bob.received()
        self.assertEqual(msg_n.body, b"\x00\xff")

    def test_message_to_self(self) -> None:
        """A user may send to themselves; the message comes back as MSG_N."""
        self.alice.send(P.MsgR(1, self.alice_uid, "note"))
        packets = self.alice.received()
        self.assertEqual([type(p) for p in packets], [P.MsgA, P.MsgN])


class DeduplicationTests(TwoUsers):
    def test_retransmitted_msg_r(self) -> None:
        """A repeated MSG_R gets the same msg_id and creates no second inbox entry."""
        self.alice.send(P.MsgR(5, self.bob_uid, "once"))
        [first] = self.alice.received()
        self.alice.send(P.MsgR(5, self.bob_uid, "once"))
        self.assertEqual(self.alice.received(), [first])
        self.assertEqual(len(self.bob.received()), 1)
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox WHERE uid = ?", self.bob_uid), 1)
        self.assertEqual(self.h.messenger.duplicates, 1)

    def test_retransmit_of_a_delivered_message(self) -> None:
        """A repeated MSG_R of a message the receiver has acked gets its MSG_A
        and its ACK_N again: the first ACK_N may have been lost with the MSG_A."""
        self.alice.send(P.MsgR(5, self.bob_uid, "once"))
        [msg_a] = self.alice.received()
        self.bob.received()
        self.bob.send(P.AckR(1))
        self.assertEqual(self.alice.received(), [P.AckN(5, msg_a.msg_id)])
        self.alice.send(P.MsgR(5, self.bob_uid, "once"))
        self.assertEqual(self.alice.received(), [msg_a, P.AckN(5, msg_a.msg_id)])

    def test_retransmit_in_the_same_batch(self) -> None:
        """Two copies in one batch are one message with one msg_id."""
        self.alice.send(P.MsgR(5, self.bob_uid, "once"), P.MsgR(5, self.bob_uid, "once"))
        a1, a2 = self.alice.received()
        self.assertEqual(a1, a2)
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox WHERE uid = ?", self.bob_uid), 1)

    def test_cmid_is_per_sender(self) -> None:
        """The same cmid from two senders is two messages."""
        self.alice.send(P.MsgR(1, self.bob_uid, "a"))
        self.bob.send(P.MsgR(1, self.alice_uid, "b"))
        [a] = [p for p in self.alice.received() if isinstance(p, P.MsgA)]
        [b] = [p for p in self.bob.received() if isinstance(p, P.MsgA)]
        self.assertNotEqual(a.msg_id, b.msg_id)

    def test_dedup_survives_a_restart(self) -> None:
        """De-duplication by (sender, cmid) holds after the server restarts."""
        path = self.mktemp()
        first = Harness(path=path)
        add_user(first.store, "alice")
        bob = add_user(first.store, "bob")
        client = first.connect()
        client.login("alice")
        client.send(P.MsgR(9, bob, "durable"))
        [msg_a] = client.received()
        first.store._close_in_thread()
        second = Harness(path=path)
        client = second.connect()
        client.login("alice")
        client.send(P.MsgR(9, bob, "durable"))
        self.assertEqual(client.received(), [msg_a])
        self.assertEqual(count(second, "SELECT count(*) FROM messages"), 1)


class AckTests(TwoUsers):
    def test_cumulative_ack(self) -> None:
        """One ACK_R acks every entry up to its seq; the sender gets an ACK_N each."""
        for cmid in (1, 2, 3):
            self.alice.send(P.MsgR(cmid, self.bob_uid, f"m{cmid}"))
        msg_as = self.alice.received()
        self.assertEqual(len(self.bob.received()), 3)
        self.bob.send(P.AckR(3))
        self.assertEqual(self.bob.received(), [P.AckA(3)])
        self.assertEqual(self.alice.received(), [P.AckN(a.cmid, a.msg_id) for a in msg_as])

    def test_repeated_ack(self) -> None:
        """Acking again what is acked changes nothing and sends no ACK_N."""
        self.alice.send(P.MsgR(1, self.bob_uid, "m"))
        self.alice.received()
        self.bob.send(P.AckR(1))
        self.alice.received()
        self.bob.received()
        self.bob.send(P.AckR(1))
        self.assertEqual(self.bob.received(), [P.AckA(1)])
        self.assertEqual(self.alice.received(), [])

    def test_ack_beyond_inbox(self) -> None:
        """An ACK_R past the inbox head records the head, not more."""
        self.alice.send(P.MsgR(1, self.bob_uid, "m"))
        self.bob.received()
        self.bob.send(P.AckR(99))
        self.assertEqual(self.bob.received(), [P.AckA(1)])

    def test_ack_past_the_head_does_not_cover_the_same_batch(self) -> None:
        """An ACK_R past the inbox head covers only what was committed before
        it: a message stored in the same batch stays unacked, and its sender
        gets no ACK_N."""
        self.alice.send(P.MsgR(1, self.bob_uid, "seen"))
        self.bob.received()
        self.alice.received()
        self.alice.protocol.dataReceived(encode(P.MsgR(2, self.bob_uid, "not yet seen")))
        self.bob.protocol.dataReceived(encode(P.AckR(99)))
        self.h.turn()
        self.assertEqual([p for p in self.bob.received() if isinstance(p, P.AckA)], [P.AckA(1)])
        self.assertEqual([type(p) for p in self.alice.received()], [P.MsgA, P.AckN])
        self.assertEqual(
            count(self.h, "SELECT acked_seq FROM inboxes WHERE uid = ?", self.bob_uid), 1
        )

    def test_ack_n_to_a_reconnected_sender(self) -> None:
        """ACK_N goes to the sender's current connection."""
        self.alice.send(P.MsgR(1, self.bob_uid, "m"))
        [msg_a] = self.alice.received()
        self.alice.drop()
        again = self.h.connect()
        again.login("alice")
        self.bob.send(P.AckR(1))
        self.assertEqual(again.received(), [P.AckN(1, msg_a.msg_id)])


class RetransmitTests(TwoUsers):
    def test_msg_n_sent_again(self) -> None:
        """Without ACK_R within the timeout, the same MSG_N is sent again; after
        the ack it is not."""
        self.alice.send(P.MsgR(1, self.bob_uid, "m"))
        [msg_n] = self.bob.received()
        self.h.reactor.advance(9)
        self.h.messenger.resend_late()
        self.h.turn()
        self.assertEqual(self.bob.received(), [])
        self.h.reactor.advance(1)
        self.h.messenger.resend_late()
        self.h.turn()
        self.assertEqual(self.bob.received(), [msg_n])
        self.bob.send(P.AckR(msg_n.seq))
        self.bob.received()
        self.h.reactor.advance(20)
        self.h.messenger.resend_late()
        self.h.turn()
        self.assertEqual(self.bob.received(), [])
        self.assertEqual(self.h.messenger.retransmitted, 1)

    def test_partial_ack(self) -> None:
        """Only the entries above the ack are sent again."""
        for cmid in (1, 2, 3):
            self.alice.send(P.MsgR(cmid, self.bob_uid, f"m{cmid}"))
        msg_ns = self.bob.received()
        self.bob.send(P.AckR(2))
        self.bob.received()
        self.h.reactor.advance(10)
        self.h.messenger.resend_late()
        self.h.turn()
        self.assertEqual(self.bob.received(), msg_ns[2:])

    def test_retransmit_in_rounds(self) -> None:
        """Late MSG_Ns are sent again at most 64 per connection and round."""
        self.alice.send(*[P.MsgR(i, self.bob_uid, f"m{i}") for i in range(1, 101)])
        self.assertEqual(len(self.bob.received()), 100)
        self.h.reactor.advance(10)
        self.h.messenger.resend_late()
        self.h.turn()
        self.assertEqual([p.seq for p in self.bob.received()], list(range(1, 65)))
        self.h.reactor.advance(1)
        self.h.messenger.resend_late()
        self.h.turn()
        self.assertEqual([p.seq for p in self.bob.received()], list(range(65, 101)))

    def test_client_that_never_acks_is_dropped(self) -> None:
        """A connection that leaves 4,096 MSG_Ns unacked is dropped instead of
        buffering more; the messages wait in the inbox."""
        self.patch(messages_module, "MAX_UNACKED", 3)
        self.alice.send(*[P.MsgR(i, self.bob_uid, f"m{i}") for i in range(1, 5)])
        self.assertEqual([p.seq for p in self.bob.received()], [1, 2, 3])
        self.assertTrue(self.bob.transport.disconnected)
        self.assertEqual(
            count(self.h, "SELECT max_seq FROM inboxes WHERE uid = ?", self.bob_uid), 4
        )

    def test_no_retransmit_after_drop(self) -> None:
        """A dropped connection's unacked entries stay in the inbox for the
        pull; nothing is sent on the next connection."""
        self.alice.send(P.MsgR(1, self.bob_uid, "m"))
        self.bob.received()
        self.bob.drop()
        again = self.h.connect()
        welcome = again.login("bob")
        self.assertEqual(welcome.inbox_max, 1)
        self.h.reactor.advance(30)
        self.h.messenger.resend_late()
        self.h.turn()
        self.assertEqual(again.received(), [])


class RefusalTests(TwoUsers):
    def test_no_such_user(self) -> None:
        """A message to an unknown uid gets ERROR 404 with ref = cmid; the
        connection stays."""
        self.alice.send(P.MsgR(3, 999, "hello?"))
        self.assertEqual(self.alice.received(), [P.Error(404, "no such user 999", 3)])
        self.assertFalse(self.alice.closed)
        self.alice.send(P.Ping())
        self.assertEqual(self.alice.received(), [P.Pong()])

    def test_body_too_large(self) -> None:
        """A body over max_body bytes gets ERROR 413 with ref; nothing is stored."""
        self.alice.send(P.MsgR(4, self.bob_uid, "é" * 2049))  # 4,098 bytes
        [error] = self.alice.received()
        self.assertEqual((error.code, error.ref), (413, 4))
        self.assertFalse(self.alice.closed)
        self.alice.send(P.MsgR(5, self.bob_uid, "é" * 2048))  # exactly 4,096
        self.assertIsInstance(self.alice.received()[0], P.MsgA)
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 1)

    def test_unknown_kind(self) -> None:
        """A message kind this server does not know gets 501 with ref."""
        self.alice.send(P.MsgR(6, self.bob_uid, "x", 7))
        self.assertEqual([(p.code, p.ref) for p in self.alice.received()], [(501, 6)])

    def test_store_failure(self) -> None:
        """When the batch cannot be stored, the senders get ERROR 503 with ref
        (no MSG_A), so their clients send again."""
        self.patch(self.h.store, "deliver", lambda *a: fail(StoreError("disk full")))
        self.alice.send(P.MsgR(8, self.bob_uid, "x"))
        self.assertEqual([(p.code, p.ref) for p in self.alice.received()], [(503, 8)])
        self.flushLoggedErrors(StoreError)


class FriendsOnlyTests(TwoUsers):
    settings = {"friends_only": True}

    def test_strangers_refused(self) -> None:
        """With friends_only, a message to a non-friend gets ERROR 403 with ref."""
        self.alice.send(P.MsgR(1, self.bob_uid, "hi"))
        self.assertEqual([(p.code, p.ref) for p in self.alice.received()], [(403, 1)])

    def test_friends_pass(self) -> None:
        """With friends_only, friends message each other."""
        db = self.h.store._db
        assert db is not None
        from im58d.store.accounts import make_friends_txn

        make_friends_txn(db, self.alice_uid, self.bob_uid, 0)
        self.alice.send(P.MsgR(1, self.bob_uid, "hi"))
        self.assertIsInstance(self.alice.received()[0], P.MsgA)


class OfflineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")
        self.alice = self.h.connect()
        self.alice.login("alice")

    def test_offline_receiver(self) -> None:
        """B offline, A sends 50 messages; B logs in, WELCOME says 50, B pulls
        them over HTTP in order and acks; A gets the 50 ACK_Ns."""
        for cmid in range(1, 51):
            self.alice.send(P.MsgR(cmid, self.bob_uid, f"message {cmid}"))
        msg_as = self.alice.received()
        self.assertEqual(len(msg_as), 50)
        bob = self.h.connect()
        welcome = bob.login("bob")
        self.assertEqual(welcome.inbox_max, 50)
        self.assertEqual(bob.received(), [])
        pulled: list[dict[str, Any]] = []
        after = 0
        while True:
            status, page = self.h.http(
                "GET", f"/v1/inbox?after={after}&limit=20", welcome.token
            )
            self.assertEqual(status, 200)
            self.assertEqual(page["max"], 50)
            if not page["messages"]:
                break
            pulled += page["messages"]
            after = page["messages"][-1]["seq"]
        self.assertEqual([m["seq"] for m in pulled], list(range(1, 51)))
        self.assertEqual([m["body"] for m in pulled], [f"message {i}" for i in range(1, 51)])
        self.assertEqual(pulled[0], {"seq": 1, "msg_id": msg_as[0].msg_id,
                                     "from": self.alice_uid, "body": "message 1", "ts": NOW})
        bob.send(P.AckR(50))
        self.assertEqual(bob.received(), [P.AckA(50)])
        self.assertEqual(self.alice.received(), [P.AckN(a.cmid, a.msg_id) for a in msg_as])

    def test_live_push_above_inbox_max(self) -> None:
        """Entries above WELCOME's inbox_max are pushed live as MSG_N."""
        self.alice.send(P.MsgR(1, self.bob_uid, "before"))
        bob = self.h.connect()
        self.assertEqual(bob.login("bob").inbox_max, 1)
        self.alice.send(P.MsgR(2, self.bob_uid, "after"))
        [msg_n] = bob.received()
        self.assertEqual((msg_n.seq, msg_n.body), (2, "after"))

    def test_lingering_session_stores(self) -> None:
        """While B's session lingers without a connection, messages land in the
        inbox and nothing is pushed."""
        bob = self.h.connect()
        bob.login("bob")
        bob.drop()
        self.alice.send(P.MsgR(1, self.bob_uid, "while away"))
        self.assertIsInstance(self.alice.received()[0], P.MsgA)
        self.assertEqual(count(self.h, "SELECT max_seq FROM inboxes WHERE uid = ?",
                               self.bob_uid), 1)

    def test_binary_body_in_pull(self) -> None:
        """A binary body is pulled as {"b64": base64url without padding}."""
        self.alice.send(P.MsgR(1, self.bob_uid, b"\xfb\xff"))
        bob = self.h.connect()
        token = bob.login("bob").token
        status, page = self.h.http("GET", "/v1/inbox", token)
        self.assertEqual(page["messages"][0]["body"], {"b64": "-_8"})
        self.assertEqual(base64.urlsafe_b64decode("-_8="), b"\xfb\xff")


class GroupMessageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.uids = [add_user(self.h.store, name) for name in ("alice", "bob", "carol", "dave")]
        db = self.h.store._db
        assert db is not None
        from im58d.store.accounts import create_group_txn

        self.gid = create_group_txn(db, "team", self.uids[0], self.uids[1:3], 0)
        self.clients = {}
        for name in ("alice", "bob", "dave"):
            self.clients[name] = self.h.connect()
            self.clients[name].login(name)

    def test_group_message(self) -> None:
        """A member's group message is stored once, pushed with `group` to the
        connected members, kept for the offline one; no ACK_N."""
        alice: Client = self.clients["alice"]
        alice.send(P.MsgR(1, self.gid, "team!", P.KIND_GROUP))
        [msg_a] = alice.received()
        self.assertIsInstance(msg_a, P.MsgA)
        [msg_n] = self.clients["bob"].received()
        self.assertEqual(msg_n, P.MsgN(1, msg_a.msg_id, self.uids[0], "team!", NOW, self.gid))
        self.assertEqual(self.clients["dave"].received(), [])
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 1)
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox WHERE msg_id = ?",
                               msg_a.msg_id), 2)
        self.clients["bob"].send(P.AckR(1))
        self.assertEqual(alice.received(), [])

    def test_non_member(self) -> None:
        """A non-member gets ERROR 403; an unknown group 404."""
        dave: Client = self.clients["dave"]
        dave.send(P.MsgR(1, self.gid, "let me in", P.KIND_GROUP))
        dave.send(P.MsgR(2, 999, "anyone?", P.KIND_GROUP))
        self.assertEqual([(p.code, p.ref) for p in dave.received()], [(403, 1), (404, 2)])


class HTTPTests(TwoUsers):
    def test_login_over_http(self) -> None:
        """POST /v1/login makes a session as LOGIN would, binary fields in
        base64url without padding."""
        status, body = self.h.http(
            "POST", "/v1/login", body={"user": "alice", "password": "pw", "device": "web"}
        )
        self.assertEqual(status, 200)
        self.assertEqual(len(base64.urlsafe_b64decode(body["session_id"] + "==")), 16)
        self.assertEqual(len(base64.urlsafe_b64decode(body["session_key"] + "=")), 32)
        self.assertNotIn("=", body["session_id"] + body["session_key"])
        self.assertEqual(body["iplist"], self.h.iplist.as_json())
        self.assertEqual((body["uid"], body["heartbeat_s"], body["linger_s"]),
                         (self.alice_uid, 240, 300))
        status, _ = self.h.http("GET", "/v1/inbox", body["token"])
        self.assertEqual(status, 200)

    def test_login_refused_over_http(self) -> None:
        """Bad credentials are a JSON 401, then 429 past the attempt limit;
        a bad body is a 400 naming the field."""
        for _ in range(5):
            status, body = self.h.http("POST", "/v1/login",
                                       body={"user": "alice", "password": "no"})
            self.assertEqual((status, body["error"]["code"]), (401, "unauthorized"))
        status, body = self.h.http("POST", "/v1/login", body={"user": "alice", "password": "pw"})
        self.assertEqual((status, body["error"]["code"]), (429, "too_many_attempts"))
        status, body = self.h.http("POST", "/v1/login", body={"user": "alice", "password": 5})
        self.assertEqual(status, 400)
        self.assertIn("'password'", body["error"]["message"])

    def test_inbox_is_private(self) -> None:
        """A token gives its own user's inbox only; no or a wrong token is 401."""
        self.alice.send(P.MsgR(1, self.bob_uid, "for bob"))
        self.bob.received()
        alice_token = self.h.router.session_for(self.alice_uid).token
        status, page = self.h.http("GET", "/v1/inbox", alice_token)
        self.assertEqual((status, page["messages"], page["max"]), (200, [], 0))
        self.assertEqual(self.h.http("GET", "/v1/inbox")[0], 401)
        self.assertEqual(self.h.http("GET", "/v1/inbox", "forged")[0], 401)

    def test_bad_inbox_arguments(self) -> None:
        """after and limit must be whole numbers in range: 400 otherwise."""
        token = self.h.router.session_for(self.bob_uid).token
        for query in ("after=-1", "after=x", "limit=0", "limit=501"):
            status, body = self.h.http("GET", f"/v1/inbox?{query}", token)
            self.assertEqual(status, 400, query)

    def test_status(self) -> None:
        """POST /v1/status tells the sender which of its messages were delivered,
        and nothing about other users' messages."""
        self.alice.send(P.MsgR(1, self.bob_uid, "one"), P.MsgR(2, self.bob_uid, "two"))
        first, second = self.alice.received()
        self.bob.send(P.AckR(1))
        alice_token = self.h.router.session_for(self.alice_uid).token
        bob_token = self.h.router.session_for(self.bob_uid).token
        ids = [first.msg_id, second.msg_id]
        status, body = self.h.http("POST", "/v1/status", alice_token, {"msg_ids": ids})
        self.assertEqual((status, body), (200, {"delivered": [first.msg_id]}))
        status, body = self.h.http("POST", "/v1/status", bob_token, {"msg_ids": ids})
        self.assertEqual(body, {"delivered": []})
        self.assertEqual(self.h.http("POST", "/v1/status", body={"msg_ids": ids})[0], 401)
        status, body = self.h.http("POST", "/v1/status", alice_token, {"msg_ids": ["x"]})
        self.assertEqual(status, 400)


class ShutdownTests(TwoUsers):
    def test_drain_commits_queued_messages(self) -> None:
        """On shutdown, messages received but not yet committed are committed
        and their MSG_A sent before the clients are kicked."""
        self.alice.protocol.dataReceived(encode(P.MsgR(1, self.bob_uid, "last")))
        drained = self.h.messenger.drain()
        self.h.turn()
        self.successResultOf(drained)
        self.h.factory.kick_all(P.KICKED_SHUTDOWN)
        self.assertEqual([type(p) for p in self.alice.received()], [P.MsgA, P.Kicked])


class BatchWindowTests(TwoUsers):
    settings = {"gather": 0.01}

    def test_idle_batch_waits_its_window(self) -> None:
        """With the store idle, a message waits batch_window before it is
        committed, so that others can share the commit."""
        batches = self.h.store.batches
        self.alice.send(P.MsgR(1, self.bob_uid, "one"))
        self.h.reactor.advance(0.005)
        self.bob.send(P.MsgR(1, self.alice_uid, "two"))
        self.assertEqual((self.alice.received(), self.bob.received()), ([], []))
        self.h.reactor.advance(0.005)
        self.h.turn()
        self.assertEqual(self.h.store.batches, batches + 1)
        self.assertEqual([type(p) for p in self.alice.received()], [P.MsgA, P.MsgN])
        self.assertEqual([type(p) for p in self.bob.received()], [P.MsgN, P.MsgA])

    def test_next_batch_after_a_small_one_waits(self) -> None:
        """What arrives while a small batch is stored waits out its own window."""
        held = HeldCommit(self, self.h)
        self.alice.send(P.MsgR(1, self.bob_uid, "first"))
        self.h.reactor.advance(0.01)
        self.assertEqual(len(held.calls), 1)
        self.alice.send(P.MsgR(2, self.bob_uid, "second"))
        held.release()
        self.h.turn()
        self.assertEqual(len(held.calls), 1)  # waiting for its window
        self.h.reactor.advance(0.01)
        self.h.turn()
        self.assertEqual(len(held.calls), 2)

    def test_window_shrinks_under_load(self) -> None:
        """When messages come fast, a batch waits only as long as a full batch
        takes to gather at that rate, not the whole window."""
        cmid = 0
        for _ in range(8):  # 10,000 messages a second for a while
            self.alice.send(*[P.MsgR(cmid + i, self.bob_uid, "m") for i in range(1, 101)])
            cmid += 100
            self.h.reactor.advance(0.01)
            self.h.turn()
        self.alice.received()
        self.alice.send(P.MsgR(cmid + 1, self.bob_uid, "soon"))
        self.assertEqual(self.alice.received(), [])
        self.h.reactor.advance(0.008)  # 64 messages at ~9,000/s: ~7 ms
        self.h.turn()
        self.assertEqual([p.cmid for p in self.alice.received()], [cmid + 1])
