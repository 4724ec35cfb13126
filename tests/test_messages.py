"""The six-packet message flow of contract version 2 (PROTOCOL.md 1.4): one
timeline per user, fan-out to every device, de-duplication by (sender,
device, cmid), per-device acks, retransmission, the offline pull."""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from im58d.logic import messages as messages_module
from im58d.store.interfaces import StoreError
from im58d.wire import encode
from im58d.wire import packets as P

from .support import DEVICE, NOW, Client, Harness, add_user


def count(harness: Harness, sql: str, *args: Any) -> int:
    db = harness.store._db
    assert db is not None
    return int(db.execute(sql, args).fetchone()[0])


def named_device(name: str) -> bytes:
    """A 16-byte device id made from a short name."""
    return name.encode().ljust(16, b".")[:16]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def timeline(harness: Harness, uid: int) -> list[tuple[int, int]]:
    """The user's timeline entries as stored: (seq, msg_id), in seq order."""
    db = harness.store._db
    assert db is not None
    rows = db.execute("SELECT seq, msg_id FROM inbox WHERE uid = ? ORDER BY seq", (uid,))
    return [(int(seq), int(msg_id)) for seq, msg_id in rows]


def pull(harness: Harness, token: str, after: int = 0) -> list[dict[str, Any]]:
    """``GET /v1/inbox`` from ``after``: the entries."""
    status, page = harness.http("GET", f"/v1/inbox?after={after}&limit=500", token)
    assert status == 200, page
    messages: list[dict[str, Any]] = page["messages"]
    return messages


class TwoUsers(SynchronousTestCase):
    """alice and bob, each connected on one device (support.DEVICE)."""

    settings: dict[str, Any] = {}

    def setUp(self) -> None:
        self.h = Harness(**self.settings)
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")
        self.alice = self.h.connect("10.0.0.1")
        self.alice_token = self.alice.login("alice").token
        self.bob = self.h.connect("10.0.0.2")
        self.bob_token = self.bob.login("bob").token


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
        """MSG_R → MSG_A [cmid, msg_id, seqA] to the sender, MSG_N [seqB, ...]
        to the receiver; ACK_R → ACK_A to the receiver, ACK_N [seqA] to the
        sender; byte for byte as the contract says: 48 bytes for "你好" on a
        fresh database."""
        msg_r = encode(P.MsgR(1, self.bob_uid, "你好"))
        self.alice.send(P.MsgR(1, self.bob_uid, "你好"))
        msg_a = self.alice.transport.value()
        self.assertEqual(self.alice.received(), [P.MsgA(1, 1, 1)])
        self.assertEqual(msg_a, b"\x05\x11\x93\x01\x01\x01")
        msg_n = self.bob.transport.value()
        self.assertEqual(self.bob.received(), [P.MsgN(1, 1, self.alice_uid, "你好", NOW)])
        self.assertEqual(msg_n, b"\x11\x12\x95\x01\x01\x01\xa6" + "你好".encode() + b"\xce" +
                         NOW.to_bytes(4, "big"))
        ack_r = encode(P.AckR(1))
        self.bob.send(P.AckR(1))
        ack_a = self.bob.transport.value()
        self.assertEqual(self.bob.received(), [P.AckA(1)])
        ack_n = self.alice.transport.value()
        self.assertEqual(self.alice.received(), [P.AckN(1)])
        self.assertEqual(ack_n, b"\x03\x15\x91\x01")
        self.assertEqual(len(msg_r + msg_a + msg_n + ack_r + ack_a + ack_n), 48)
        self.assertEqual(
            count(self.h, "SELECT acked_seq FROM inboxes WHERE uid = ?", self.bob_uid), 1
        )
        self.assertEqual(
            count(self.h, "SELECT acked FROM device_cursors WHERE uid = ?", self.bob_uid), 1
        )

    def test_msg_a_carries_the_senders_seq(self) -> None:
        """MSG_A's seq is the message's entry in the sender's own timeline,
        not the receiver's; ACK_N names that same seq."""
        carol_uid = add_user(self.h.store, "carol")
        carol = self.h.connect()
        carol.login("carol")
        carol.send(P.MsgR(1, self.alice_uid, "one"), P.MsgR(2, self.alice_uid, "two"))
        self.assertEqual([p.seq for p in self.alice.received()], [1, 2])
        self.alice.send(P.MsgR(1, self.bob_uid, "hi bob"))
        [msg_a] = self.alice.received()
        self.assertEqual((msg_a.cmid, msg_a.seq), (1, 3))
        self.assertEqual(self.bob.received(),
                         [P.MsgN(1, msg_a.msg_id, self.alice_uid, "hi bob", NOW)])
        self.assertEqual(timeline(self.h, self.alice_uid)[-1], (3, msg_a.msg_id))
        self.assertEqual(timeline(self.h, self.bob_uid), [(1, msg_a.msg_id)])
        self.bob.send(P.AckR(1))
        self.assertEqual(self.alice.received(), [P.AckN(3)])
        self.assertEqual([type(p) for p in carol.received()], [P.MsgA, P.MsgA])
        self.assertEqual([seq for seq, _ in timeline(self.h, carol_uid)], [1, 2])

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
        """A note to oneself is one timeline entry: the sending device gets
        MSG_A with that seq and no MSG_N of it."""
        self.alice.send(P.MsgR(1, self.alice_uid, "note"))
        [msg_a] = self.alice.received()
        self.assertEqual((msg_a.cmid, msg_a.seq), (1, 1))
        self.assertEqual(timeline(self.h, self.alice_uid), [(1, msg_a.msg_id)])
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox"), 1)
        self.assertEqual(self.bob.received(), [])


class DeduplicationTests(TwoUsers):
    def test_retransmitted_msg_r(self) -> None:
        """A repeated MSG_R (same device, cmid, to, kind, body) gets the same
        MSG_A and creates no message and no timeline entry."""
        self.alice.send(P.MsgR(5, self.bob_uid, "once"))
        [first] = self.alice.received()
        self.alice.send(P.MsgR(5, self.bob_uid, "once", P.KIND_USER))
        self.assertEqual(self.alice.received(), [first])
        self.assertEqual(len(self.bob.received()), 1)
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 1)
        self.assertEqual(len(timeline(self.h, self.bob_uid)), 1)
        self.assertEqual(len(timeline(self.h, self.alice_uid)), 1)
        self.assertEqual(self.h.messenger.duplicates, 1)

    def test_retransmit_of_a_delivered_message(self) -> None:
        """A repeated MSG_R of a message the receiver has acked gets its MSG_A
        and its ACK_N [seqA] again: the first ACK_N may have been lost with
        the MSG_A."""
        self.alice.send(P.MsgR(5, self.bob_uid, "once"))
        [msg_a] = self.alice.received()
        self.bob.received()
        self.bob.send(P.AckR(1))
        self.assertEqual(self.alice.received(), [P.AckN(msg_a.seq)])
        self.alice.send(P.MsgR(5, self.bob_uid, "once"))
        self.assertEqual(self.alice.received(), [msg_a, P.AckN(msg_a.seq)])

    def test_retransmit_in_the_same_batch(self) -> None:
        """Two copies in one batch are one message with one msg_id."""
        self.alice.send(P.MsgR(5, self.bob_uid, "once"), P.MsgR(5, self.bob_uid, "once"))
        a1, a2 = self.alice.received()
        self.assertEqual(a1, a2)
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 1)
        self.assertEqual(len(timeline(self.h, self.bob_uid)), 1)

    def test_cmid_is_per_sender(self) -> None:
        """The same cmid from two senders is two messages."""
        self.alice.send(P.MsgR(1, self.bob_uid, "a"))
        self.bob.send(P.MsgR(1, self.alice_uid, "b"))
        [a] = [p for p in self.alice.received() if isinstance(p, P.MsgA)]
        [b] = [p for p in self.bob.received() if isinstance(p, P.MsgA)]
        self.assertNotEqual(a.msg_id, b.msg_id)

    def test_cmid_is_per_device(self) -> None:
        """The same cmid, to, body from another device of the same user is a
        new message (a reinstalled app starts its cmids again): a second
        msg_id, a second MSG_N to the receiver."""
        tablet = self.h.connect()
        tablet.login("alice", device=named_device("alice-tablet"))
        self.alice.received()
        self.alice.send(P.MsgR(1, self.bob_uid, "same"))
        tablet.send(P.MsgR(1, self.bob_uid, "same"))
        [phone_a] = [p for p in self.alice.received() if isinstance(p, P.MsgA)]
        [tablet_a] = [p for p in tablet.received() if isinstance(p, P.MsgA)]
        self.assertNotEqual(phone_a.msg_id, tablet_a.msg_id)
        self.assertEqual((phone_a.seq, tablet_a.seq), (1, 2))
        self.assertEqual([(p.seq, p.msg_id) for p in self.bob.received()],
                         [(1, phone_a.msg_id), (2, tablet_a.msg_id)])
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 2)
        self.assertEqual(self.h.messenger.duplicates, 0)

    def test_cmid_reused_for_another_message(self) -> None:
        """A stored cmid sent again with another body, another receiver or
        another kind gets ERROR 409 with ref = cmid; nothing is stored or
        pushed, the connection stays, and the first message is untouched."""
        carol_uid = add_user(self.h.store, "carol")
        self.alice.send(P.MsgR(4, self.bob_uid, "first"))
        [msg_a] = self.alice.received()
        self.bob.received()
        for reuse in (P.MsgR(4, self.bob_uid, "second"),
                      P.MsgR(4, self.bob_uid, b"first"),
                      P.MsgR(4, carol_uid, "first"),
                      P.MsgR(4, self.bob_uid, "first", P.KIND_GROUP)):
            self.alice.send(reuse)
            [error] = self.alice.received()
            self.assertIsInstance(error, P.Error, reuse)
            self.assertEqual((error.code, error.ref), (409, 4), reuse)
        self.assertFalse(self.alice.closed)
        self.assertEqual(self.bob.received(), [])
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 1)
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox"), 2)
        self.assertEqual(self.h.messenger.duplicates, 0)
        self.alice.send(P.MsgR(4, self.bob_uid, "first"))
        self.assertEqual(self.alice.received(), [msg_a])
        self.alice.send(P.MsgR(5, self.bob_uid, "second"))
        [again] = self.alice.received()
        self.assertEqual((again.cmid, again.seq), (5, 2))

    def test_cmid_reused_within_one_batch(self) -> None:
        """Two MSG_Rs with one cmid and different bodies in one batch: the
        first is stored and answered, the second gets ERROR 409 with ref =
        cmid and stores nothing."""
        batches = self.h.store.batches
        self.alice.send(P.MsgR(3, self.bob_uid, "this"), P.MsgR(3, self.bob_uid, "that"))
        self.assertEqual(self.h.store.batches, batches + 1)
        msg_a, error = self.alice.received()
        self.assertIsInstance(msg_a, P.MsgA)
        self.assertEqual((error.code, error.ref), (409, 3))
        self.assertEqual([p.body for p in self.bob.received()], ["this"])
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 1)

    def test_dedup_survives_a_restart(self) -> None:
        """De-duplication by (sender, device, cmid) holds after the server
        restarts, and the device's WELCOME says the cmid is taken."""
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
        self.assertEqual(client.login("alice").last_cmid, 9)
        client.send(P.MsgR(9, bob, "durable"))
        self.assertEqual(client.received(), [msg_a])
        self.assertEqual(count(second, "SELECT count(*) FROM messages"), 1)


class LastCmidTests(TwoUsers):
    def test_welcome_last_cmid(self) -> None:
        """WELCOME's last_cmid is the highest cmid stored from that device:
        0 for a new device; cmids refused (404, 409) do not count; another
        device of the same user has its own."""
        for cmid in (3, 7, 5):
            self.alice.send(P.MsgR(cmid, self.bob_uid, f"m{cmid}"))
        self.alice.send(P.MsgR(9, 999, "nobody"))
        self.alice.send(P.MsgR(7, self.bob_uid, "reused"))
        self.assertEqual([type(p) for p in self.alice.received()],
                         [P.MsgA, P.MsgA, P.MsgA, P.Error, P.Error])
        again = self.h.connect()
        welcome = again.login("alice")
        self.assertEqual(welcome.last_cmid, 7)
        tablet = self.h.connect()
        self.assertEqual(tablet.login("alice", device=named_device("alice-tablet")).last_cmid, 0)
        self.assertEqual(self.h.connect().login("bob", device=named_device("bob-2")).last_cmid, 0)

    def test_login_over_http_answers_last_cmid_and_acked(self) -> None:
        """POST /v1/login answers the device's last_cmid and ack cursor, as
        WELCOME does."""
        self.alice.send(P.MsgR(12, self.bob_uid, "one"))
        self.bob.received()
        self.bob.send(P.AckR(1))
        self.bob.received()
        for user, last_cmid, acked in (("alice", 12, 0), ("bob", 0, 1)):
            status, body = self.h.http("POST", "/v1/login", body={
                "user": user, "password": "pw", "device_id": b64(DEVICE)})
            self.assertEqual(status, 200, body)
            self.assertEqual((body["last_cmid"], body["acked"]), (last_cmid, acked), user)


class MultiDevice(SynchronousTestCase):
    """alice on a phone and a tablet, bob on a phone and a tablet, all
    connected; carol on one device."""

    def setUp(self) -> None:
        self.h = Harness()
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")
        self.carol_uid = add_user(self.h.store, "carol")
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, str] = {}
        for user in ("alice", "bob"):
            for kind in ("phone", "tablet"):
                name = f"{user}-{kind}"
                client = self.h.connect()
                self.tokens[name] = client.login(user, device=named_device(name)).token
                self.clients[name] = client
        self.carol = self.h.connect()
        self.carol.login("carol")
        self.drain()
        self.alice_phone, self.alice_tablet, self.bob_phone, self.bob_tablet = (
            self.clients[n] for n in ("alice-phone", "alice-tablet", "bob-phone", "bob-tablet")
        )

    def drain(self) -> None:
        for client in (*self.clients.values(), self.carol):
            client.received()

    def resend(self, seconds: float) -> None:
        self.h.reactor.advance(seconds)
        self.h.messenger.resend_late()
        self.h.turn()


class FanOutTests(MultiDevice):
    def test_every_device_gets_the_message(self) -> None:
        """A message from alice's phone to bob: the phone gets MSG_A [cmid,
        msg_id, seqA] and no MSG_N; alice's tablet gets the copy MSG_N
        [seqA, msg_id, alice, body, ts, nil, bob]; both of bob's devices get
        MSG_N [seqB, msg_id, alice, body, ts]."""
        self.carol.send(P.MsgR(1, self.bob_uid, "first, so that seqs differ"))
        self.drain()
        self.alice_phone.send(P.MsgR(1, self.bob_uid, "hi"))
        [msg_a] = self.alice_phone.received()
        self.assertEqual((msg_a.cmid, msg_a.seq), (1, 1))
        self.assertEqual(self.alice_tablet.received(), [
            P.MsgN(1, msg_a.msg_id, self.alice_uid, "hi", NOW, None, self.bob_uid)])
        for client in (self.bob_phone, self.bob_tablet):
            self.assertEqual(client.received(),
                             [P.MsgN(2, msg_a.msg_id, self.alice_uid, "hi", NOW)])
        self.assertEqual(self.carol.received(), [])
        self.assertEqual(self.alice_tablet.transport.value(), b"")

    def test_copy_on_the_wire(self) -> None:
        """The copy to the sender's other device carries nil for group and
        the receiver as its seventh field."""
        self.alice_phone.send(P.MsgR(1, self.bob_uid, "x"))
        wire = self.alice_tablet.transport.value()
        self.assertEqual(wire, encode(P.MsgN(1, 1, self.alice_uid, "x", NOW, None, self.bob_uid)))
        self.assertEqual(wire[2:3], b"\x97")  # seven fields
        self.assertIn(b"\xc0" + bytes([self.bob_uid]), wire)

    def test_ack_n_once_to_every_sender_device(self) -> None:
        """When the first of bob's devices acks, every connected device of
        alice (the sending one too) gets ACK_N [seqA]; when the second acks,
        nobody gets it again; each of bob's devices gets its ACK_A."""
        self.bob_phone.send(P.MsgR(1, self.carol_uid, "so that bob's seqs differ"))
        self.drain()
        self.alice_phone.send(P.MsgR(1, self.bob_uid, "hi"))
        [msg_a] = self.alice_phone.received()
        self.drain()
        self.bob_phone.send(P.AckR(2))
        self.assertEqual(self.bob_phone.received(), [P.AckA(2)])
        self.assertEqual(self.alice_phone.received(), [P.AckN(msg_a.seq)])
        self.assertEqual(self.alice_tablet.received(), [P.AckN(msg_a.seq)])
        self.assertEqual(self.bob_tablet.received(), [])
        self.bob_tablet.send(P.AckR(2))
        self.assertEqual(self.bob_tablet.received(), [P.AckA(2)])
        self.assertEqual(self.alice_phone.received(), [])
        self.assertEqual(self.alice_tablet.received(), [])
        self.assertEqual(self.h.messenger.acks_out, 2)

    def test_senders_other_device_acking_the_copy_is_no_receipt(self) -> None:
        """Alice's tablet acking the copy of alice's message moves only the
        tablet's cursor: no ACK_N, the message stays undelivered."""
        self.alice_phone.send(P.MsgR(1, self.bob_uid, "hi"))
        [msg_a] = self.alice_phone.received()
        self.alice_tablet.received()
        self.alice_tablet.send(P.AckR(msg_a.seq))
        self.assertEqual(self.alice_tablet.received(), [P.AckA(msg_a.seq)])
        self.assertEqual(self.alice_phone.received(), [])
        status, body = self.h.http("POST", "/v1/status", self.tokens["alice-phone"],
                                   {"msg_ids": [msg_a.msg_id]})
        self.assertEqual(body, {"delivered": []})

    def test_note_to_self(self) -> None:
        """A note to oneself is one entry; the sending device gets MSG_A,
        the user's other devices get the copy with ``to`` = the user."""
        self.alice_phone.send(P.MsgR(1, self.alice_uid, "remember"))
        [msg_a] = self.alice_phone.received()
        self.assertEqual(self.alice_tablet.received(), [
            P.MsgN(msg_a.seq, msg_a.msg_id, self.alice_uid, "remember", NOW, None,
                   self.alice_uid)])
        self.assertEqual(timeline(self.h, self.alice_uid), [(msg_a.seq, msg_a.msg_id)])
        self.assertEqual(self.bob_phone.received() + self.bob_tablet.received(), [])

    def test_retransmit_per_device(self) -> None:
        """A device that does not ack gets its MSG_N again after the timeout;
        a device of the same user that acked does not; nor does the sending
        device, which never got a MSG_N."""
        self.alice_phone.send(P.MsgR(1, self.bob_uid, "hi"))
        self.alice_phone.received()
        [copy] = self.alice_tablet.received()
        [msg_n] = self.bob_phone.received()
        self.assertEqual(self.bob_tablet.received(), [msg_n])
        self.bob_phone.send(P.AckR(msg_n.seq))
        self.bob_phone.received()
        self.alice_phone.received()
        self.alice_tablet.received()
        self.resend(9)
        self.assertEqual(self.bob_tablet.received(), [])
        self.resend(1)
        self.assertEqual(self.bob_tablet.received(), [msg_n])
        self.assertEqual(self.alice_tablet.received(), [copy])
        self.assertEqual(self.bob_phone.received(), [])
        self.assertEqual(self.alice_phone.received(), [])
        self.bob_tablet.send(P.AckR(msg_n.seq))
        self.alice_tablet.send(P.AckR(copy.seq))
        self.resend(20)
        self.assertEqual([c.received() for c in self.clients.values()],
                         [[], [P.AckA(copy.seq)], [], [P.AckA(msg_n.seq)]])
        self.assertEqual(self.h.messenger.retransmitted, 2)

    def test_cursors_are_per_device(self) -> None:
        """Each device has its own ack cursor: a new LOGIN of a device
        answers its own ``acked``, not the other device's."""
        for cmid in (1, 2, 3):
            self.carol.send(P.MsgR(cmid, self.bob_uid, f"m{cmid}"))
        self.drain()
        self.bob_phone.send(P.AckR(3))
        self.bob_tablet.send(P.AckR(1))
        self.assertEqual(self.h.connect().login("bob", device=named_device("bob-phone")).acked, 3)
        self.assertEqual(self.h.connect().login("bob", device=named_device("bob-tablet")).acked, 1)
        self.assertEqual(
            count(self.h, "SELECT acked_seq FROM inboxes WHERE uid = ?", self.bob_uid), 3
        )

    def test_new_device_pulls_the_whole_timeline(self) -> None:
        """A device that signs in for the first time starts at 0: its
        WELCOME says acked 0 and inbox_max the head, and it pulls every
        entry, sent and received, in seq order; nothing is pushed."""
        self.alice_phone.send(P.MsgR(1, self.bob_uid, "to bob"))
        [msg_a] = self.alice_phone.received()
        self.carol.send(P.MsgR(1, self.alice_uid, "to alice"))
        [carol_a] = self.carol.received()
        self.drain()
        for client in self.clients.values():
            client.send(P.AckR(2))
        self.drain()
        laptop = self.h.connect()
        welcome = laptop.login("alice", device=named_device("alice-laptop"))
        self.assertEqual((welcome.acked, welcome.inbox_max, welcome.last_cmid), (0, 2, 0))
        self.assertEqual(laptop.received(), [])
        self.assertEqual(pull(self.h, welcome.token), [
            {"seq": 1, "msg_id": msg_a.msg_id, "from": self.alice_uid, "to": self.bob_uid,
             "body": "to bob", "ts": NOW, "delivered": True},
            {"seq": 2, "msg_id": carol_a.msg_id, "from": self.carol_uid, "body": "to alice",
             "ts": NOW},
        ])

    def test_duplicate_from_one_device_reaches_nobody(self) -> None:
        """A retransmitted MSG_R gets MSG_A again and pushes nothing to the
        receiver's devices or to the sender's other devices."""
        self.alice_phone.send(P.MsgR(1, self.bob_uid, "hi"))
        [msg_a] = self.alice_phone.received()
        self.drain()
        self.alice_phone.send(P.MsgR(1, self.bob_uid, "hi"))
        self.assertEqual(self.alice_phone.received(), [msg_a])
        self.assertEqual([c.received() for c in self.clients.values()], [[]] * 4)


class AckTests(TwoUsers):
    def test_cumulative_ack(self) -> None:
        """One ACK_R acks every entry up to its seq; the sender gets an
        ACK_N [seqA] for each of its messages covered."""
        for cmid in (1, 2, 3):
            self.alice.send(P.MsgR(cmid, self.bob_uid, f"m{cmid}"))
        msg_as = self.alice.received()
        self.assertEqual(len(self.bob.received()), 3)
        self.bob.send(P.AckR(3))
        self.assertEqual(self.bob.received(), [P.AckA(3)])
        self.assertEqual(self.alice.received(), [P.AckN(a.seq) for a in msg_as])

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
        """An ACK_R past the timeline head records the head, not more."""
        self.alice.send(P.MsgR(1, self.bob_uid, "m"))
        self.bob.received()
        self.bob.send(P.AckR(99))
        self.assertEqual(self.bob.received(), [P.AckA(1)])

    def test_ack_past_the_head_does_not_cover_the_same_batch(self) -> None:
        """An ACK_R past the timeline head covers only what was committed
        before it: a message stored in the same batch stays unacked, and its
        sender gets no ACK_N for it."""
        self.alice.send(P.MsgR(1, self.bob_uid, "seen"))
        self.bob.received()
        self.alice.received()
        self.alice.protocol.dataReceived(encode(P.MsgR(2, self.bob_uid, "not yet seen")))
        self.bob.protocol.dataReceived(encode(P.AckR(99)))
        self.h.turn()
        self.assertEqual([p for p in self.bob.received() if isinstance(p, P.AckA)], [P.AckA(1)])
        self.assertEqual(self.alice.received()[1:], [P.AckN(1)])
        self.assertEqual(
            count(self.h, "SELECT acked_seq FROM inboxes WHERE uid = ?", self.bob_uid), 1
        )

    def test_acking_ones_own_entries_is_no_receipt(self) -> None:
        """The sender acking its own timeline (its MSG_A's seq) moves its
        cursor and sends no ACK_N: the message is not delivered."""
        self.alice.send(P.MsgR(1, self.bob_uid, "m"))
        [msg_a] = self.alice.received()
        self.alice.send(P.AckR(msg_a.seq))
        self.assertEqual(self.alice.received(), [P.AckA(msg_a.seq)])
        self.assertEqual(self.bob.received()[1:], [])
        status, body = self.h.http("POST", "/v1/status", self.alice_token,
                                   {"msg_ids": [msg_a.msg_id]})
        self.assertEqual(body, {"delivered": []})

    def test_ack_n_to_a_reconnected_sender(self) -> None:
        """ACK_N goes to the sender's current connection."""
        self.alice.send(P.MsgR(1, self.bob_uid, "m"))
        [msg_a] = self.alice.received()
        self.alice.drop()
        again = self.h.connect()
        again.login("alice")
        self.bob.send(P.AckR(1))
        self.assertEqual(again.received(), [P.AckN(msg_a.seq)])


class RetransmitTests(TwoUsers):
    def resend(self, seconds: float) -> None:
        self.h.reactor.advance(seconds)
        self.h.messenger.resend_late()
        self.h.turn()

    def test_msg_n_sent_again(self) -> None:
        """Without ACK_R within the timeout, the same MSG_N is sent again; after
        the ack it is not."""
        self.alice.send(P.MsgR(1, self.bob_uid, "m"))
        [msg_n] = self.bob.received()
        self.resend(9)
        self.assertEqual(self.bob.received(), [])
        self.resend(1)
        self.assertEqual(self.bob.received(), [msg_n])
        self.bob.send(P.AckR(msg_n.seq))
        self.bob.received()
        self.resend(20)
        self.assertEqual(self.bob.received(), [])
        self.assertEqual(self.h.messenger.retransmitted, 1)

    def test_partial_ack(self) -> None:
        """Only the entries above the ack are sent again."""
        for cmid in (1, 2, 3):
            self.alice.send(P.MsgR(cmid, self.bob_uid, f"m{cmid}"))
        msg_ns = self.bob.received()
        self.bob.send(P.AckR(2))
        self.bob.received()
        self.resend(10)
        self.assertEqual(self.bob.received(), msg_ns[2:])

    def test_retransmit_in_rounds(self) -> None:
        """Late MSG_Ns are sent again at most 64 per connection and round."""
        self.alice.send(*[P.MsgR(i, self.bob_uid, f"m{i}") for i in range(1, 101)])
        self.assertEqual(len(self.bob.received()), 100)
        self.resend(10)
        self.assertEqual([p.seq for p in self.bob.received()], list(range(1, 65)))
        self.resend(1)
        self.assertEqual([p.seq for p in self.bob.received()], list(range(65, 101)))

    def test_client_that_never_acks_is_dropped(self) -> None:
        """A connection that leaves 4,096 MSG_Ns unacked is dropped instead of
        buffering more; the messages wait in the timeline."""
        self.patch(messages_module, "MAX_UNACKED", 3)
        self.alice.send(*[P.MsgR(i, self.bob_uid, f"m{i}") for i in range(1, 5)])
        self.assertEqual([p.seq for p in self.bob.received()], [1, 2, 3])
        self.assertTrue(self.bob.transport.disconnected)
        self.assertEqual(
            count(self.h, "SELECT max_seq FROM inboxes WHERE uid = ?", self.bob_uid), 4
        )

    def test_no_retransmit_after_drop(self) -> None:
        """A dropped connection's unacked entries stay in the timeline for
        the pull; nothing is sent on the next connection."""
        self.alice.send(P.MsgR(1, self.bob_uid, "m"))
        self.bob.received()
        self.bob.drop()
        again = self.h.connect()
        welcome = again.login("bob")
        self.assertEqual((welcome.inbox_max, welcome.acked), (1, 0))
        self.resend(30)
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
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox"), 0)

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
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox"), 0)

    def test_friends_pass(self) -> None:
        """With friends_only, friends message each other."""
        db = self.h.store._db
        assert db is not None
        from im58d.store.accounts import make_friends_txn

        make_friends_txn(db, self.alice_uid, self.bob_uid, 0)
        self.alice.send(P.MsgR(1, self.bob_uid, "hi"))
        self.assertIsInstance(self.alice.received()[0], P.MsgA)

    def test_note_to_self_needs_no_friend(self) -> None:
        """With friends_only, a note to oneself is still taken."""
        self.alice.send(P.MsgR(1, self.alice_uid, "note"))
        self.assertIsInstance(self.alice.received()[0], P.MsgA)


class OfflineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")
        self.alice = self.h.connect()
        self.alice_token = self.alice.login("alice").token

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
        self.assertEqual(self.alice.received(), [P.AckN(a.seq) for a in msg_as])

    def test_live_push_above_inbox_max(self) -> None:
        """Entries above WELCOME's inbox_max are pushed live as MSG_N."""
        self.alice.send(P.MsgR(1, self.bob_uid, "before"))
        bob = self.h.connect()
        self.assertEqual(bob.login("bob").inbox_max, 1)
        self.alice.send(P.MsgR(2, self.bob_uid, "after"))
        [msg_n] = bob.received()
        self.assertEqual((msg_n.seq, msg_n.body), (2, "after"))

    def test_lingering_session_stores(self) -> None:
        """While B's device lingers without a connection, messages land in
        the timeline and nothing is pushed."""
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
        self.assertEqual(pull(self.h, token)[0]["body"], {"b64": "-_8"})
        self.assertEqual(base64.urlsafe_b64decode("-_8="), b"\xfb\xff")

    def test_own_messages_in_the_pull(self) -> None:
        """The sender's own 1:1 messages are in its pull with ``to`` and
        ``delivered``, which flips to true once the receiver acks; the
        receiver's entries have neither."""
        self.alice.send(P.MsgR(1, self.bob_uid, "one"), P.MsgR(2, self.bob_uid, "two"))
        first, second = self.alice.received()
        mine = [{"seq": a.seq, "msg_id": a.msg_id, "from": self.alice_uid, "to": self.bob_uid,
                 "body": body, "ts": NOW, "delivered": False}
                for a, body in ((first, "one"), (second, "two"))]
        self.assertEqual(pull(self.h, self.alice_token), mine)
        bob = self.h.connect()
        bob_token = bob.login("bob").token
        self.assertEqual([set(m) for m in pull(self.h, bob_token)],
                         [{"seq", "msg_id", "from", "body", "ts"}] * 2)
        bob.send(P.AckR(1))
        mine[0]["delivered"] = True
        self.assertEqual(pull(self.h, self.alice_token), mine)
        self.assertEqual(pull(self.h, self.alice_token, after=first.seq), mine[1:])
        status, body = self.h.http("POST", "/v1/status", self.alice_token,
                                   {"msg_ids": [first.msg_id, second.msg_id]})
        self.assertEqual((status, body), (200, {"delivered": [first.msg_id]}))


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
        """A member's group message is stored once with an entry in every
        member's timeline (the sender's too); MSG_A carries the sender's
        seq; MSG_N with ``group`` goes to the connected members; no ACK_N."""
        alice: Client = self.clients["alice"]
        alice.send(P.MsgR(1, self.gid, "team!", P.KIND_GROUP))
        [msg_a] = alice.received()
        self.assertEqual((msg_a.cmid, msg_a.seq), (1, 1))
        [msg_n] = self.clients["bob"].received()
        self.assertEqual(msg_n, P.MsgN(1, msg_a.msg_id, self.uids[0], "team!", NOW, self.gid))
        self.assertEqual(self.clients["dave"].received(), [])
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 1)
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox WHERE msg_id = ?",
                               msg_a.msg_id), 3)
        self.clients["bob"].send(P.AckR(1))
        self.assertEqual(alice.received(), [])

    def test_non_member(self) -> None:
        """A non-member gets ERROR 403; an unknown group 404."""
        dave: Client = self.clients["dave"]
        dave.send(P.MsgR(1, self.gid, "let me in", P.KIND_GROUP))
        dave.send(P.MsgR(2, 999, "anyone?", P.KIND_GROUP))
        self.assertEqual([(p.code, p.ref) for p in dave.received()], [(403, 1), (404, 2)])


class HTTPTests(TwoUsers):
    def login_body(self, **fields: Any) -> dict[str, Any]:
        body = {"user": "alice", "password": "pw", "device_id": b64(named_device("web"))}
        body.update(fields)
        return {k: v for k, v in body.items() if v is not None}

    def test_login_over_http(self) -> None:
        """POST /v1/login makes a session as LOGIN would, binary fields in
        base64url without padding, with last_cmid and acked."""
        status, body = self.h.http("POST", "/v1/login", body=self.login_body(device_name="web"))
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"uid", "session_id", "session_key", "token", "inbox_max",
                                     "heartbeat_s", "linger_s", "last_cmid", "acked", "iplist"})
        self.assertEqual(len(base64.urlsafe_b64decode(body["session_id"] + "==")), 16)
        self.assertEqual(len(base64.urlsafe_b64decode(body["session_key"] + "=")), 32)
        self.assertNotIn("=", body["session_id"] + body["session_key"])
        self.assertEqual(body["iplist"], self.h.iplist.as_json())
        self.assertEqual((body["uid"], body["heartbeat_s"], body["linger_s"]),
                         (self.alice_uid, 240, 300))
        self.assertEqual((body["last_cmid"], body["acked"], body["inbox_max"]), (0, 0, 0))
        status, _ = self.h.http("GET", "/v1/inbox", body["token"])
        self.assertEqual(status, 200)

    def test_login_needs_a_device_id(self) -> None:
        """POST /v1/login without a device_id, or with one that is not 16
        bytes in base64url without padding, is a 400 naming the field."""
        for device in (None, 16, "", "abc", b64(b"x" * 15), b64(b"x" * 17),
                       b64(named_device("web")) + "=", base64.b64encode(b"\xff" * 16).decode()):
            status, body = self.h.http("POST", "/v1/login", body=self.login_body(device_id=device))
            self.assertEqual(status, 400, device)
            self.assertIn("'device_id'", body["error"]["message"], device)
        self.assertEqual(count(self.h, "SELECT count(*) FROM sessions"), 2)

    def test_login_refused_over_http(self) -> None:
        """Bad credentials are a JSON 401, then 429 past the attempt limit;
        a bad body is a 400 naming the field."""
        for _ in range(5):
            status, body = self.h.http("POST", "/v1/login", body=self.login_body(password="no"))
            self.assertEqual((status, body["error"]["code"]), (401, "unauthorized"))
        status, body = self.h.http("POST", "/v1/login", body=self.login_body())
        self.assertEqual((status, body["error"]["code"]), (429, "too_many_attempts"))
        status, body = self.h.http("POST", "/v1/login", body=self.login_body(password=5))
        self.assertEqual(status, 400)
        self.assertIn("'password'", body["error"]["message"])

    def test_inbox_is_private(self) -> None:
        """A token gives its own user's timeline only; no or a wrong token
        is 401."""
        self.alice.send(P.MsgR(1, self.bob_uid, "for bob"))
        self.bob.received()
        add_user(self.h.store, "carol")
        carol_token = self.h.connect().login("carol").token
        status, page = self.h.http("GET", "/v1/inbox", carol_token)
        self.assertEqual((status, page["messages"], page["max"]), (200, [], 0))
        self.assertEqual([m["from"] for m in pull(self.h, self.bob_token)], [self.alice_uid])
        self.assertEqual([m.get("to") for m in pull(self.h, self.alice_token)], [self.bob_uid])
        self.assertEqual(self.h.http("GET", "/v1/inbox")[0], 401)
        self.assertEqual(self.h.http("GET", "/v1/inbox", "forged")[0], 401)

    def test_bad_inbox_arguments(self) -> None:
        """after and limit must be whole numbers in range: 400 otherwise."""
        for query in ("after=-1", "after=x", "limit=0", "limit=501"):
            status, body = self.h.http("GET", f"/v1/inbox?{query}", self.bob_token)
            self.assertEqual(status, 400, query)

    def test_status(self) -> None:
        """POST /v1/status tells the sender which of its messages were delivered,
        and nothing about other users' messages."""
        self.alice.send(P.MsgR(1, self.bob_uid, "one"), P.MsgR(2, self.bob_uid, "two"))
        first, second = self.alice.received()
        self.bob.send(P.AckR(1))
        ids = [first.msg_id, second.msg_id]
        status, body = self.h.http("POST", "/v1/status", self.alice_token, {"msg_ids": ids})
        self.assertEqual((status, body), (200, {"delivered": [first.msg_id]}))
        status, body = self.h.http("POST", "/v1/status", self.bob_token, {"msg_ids": ids})
        self.assertEqual(body, {"delivered": []})
        self.assertEqual(self.h.http("POST", "/v1/status", body={"msg_ids": ids})[0], 401)
        status, body = self.h.http("POST", "/v1/status", self.alice_token, {"msg_ids": ["x"]})
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
