"""Group messages (MSG_R kind 1) as section 1.4 of contract version 2 has them.

A group message is stored once with an entry in the timeline of every
member, its sender's included; MSG_A carries the sender's seq; each other
member's connected devices get MSG_N with ``group`` set and ack it (ACK_R →
ACK_A) like a one-to-one message, and so do the sender's other devices;
offline devices pull it with ``GET /v1/inbox``; nobody gets ACK_N for it.
Only members may send (403, ``ref`` = cmid, the connection stays), an
unknown group is 404, and a retransmitted MSG_R is de-duplicated by
(sender, device, cmid).

The server side runs on ``tests.support.Harness``; the SDK side on the
devices of ``tests.test_client.SDKTestCase``.  Nothing sleeps.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from im58d.client import STORED, Message
from im58d.wire import encode
from im58d.wire import packets as P

from . import test_client
from .support import NOW, Client, Harness, add_user
from .test_messages import count, named_device, pull, timeline


def create_group(harness: Harness, owner: int, members: list[int]) -> int:
    """A group made through the store's queue, as the web layer makes one."""
    d = harness.store.create_group("group", owner, members, NOW)
    harness.turn()
    gid: list[int] = []
    d.addCallback(gid.append)
    assert gid, "the group was not created"
    return gid[0]


def leave_group(harness: Harness, gid: int, uid: int) -> None:
    """Take ``uid`` out of the group's member rows (all the message path reads)."""
    db = harness.store._db
    assert db is not None
    with db.conn:
        db.execute("DELETE FROM group_members WHERE gid = ? AND uid = ?", (gid, uid))


class FiftyMembers(SynchronousTestCase):
    """A 50-member group: member 0 sends; of the other 49, every third is
    connected, every third lingers (its TCP connection dropped without BYE)
    and the rest never logged in."""

    MESSAGES = 5

    def setUp(self) -> None:
        self.h = Harness()
        self.names = [f"user{i:02}" for i in range(50)]
        self.uids = [add_user(self.h.store, name) for name in self.names]
        self.sender_uid = self.uids[0]
        self.gid = create_group(self.h, self.sender_uid, self.uids[1:])
        self.sender = self.h.connect()
        self.sender_token = self.sender.login(self.names[0]).token
        self.connected: dict[int, Client] = {}
        self.offline: list[int] = []
        for i in range(1, 50):
            if i % 3 == 0:
                self.offline.append(i)
                continue
            client = self.h.connect()
            client.login(self.names[i])
            if i % 3 == 1:
                self.connected[i] = client
            else:
                client.drop()  # the device lingers
                self.offline.append(i)

    def send_all(self) -> list[P.MsgA]:
        """Member 0 sends MESSAGES group messages, one MSG_R at a time."""
        for cmid in range(1, self.MESSAGES + 1):
            self.sender.send(P.MsgR(cmid, self.gid, f"hello group {cmid}", P.KIND_GROUP))
        packets = self.sender.received()
        self.assertTrue(all(isinstance(p, P.MsgA) for p in packets), packets)
        return packets

    def expected_msg_ns(self, msg_as: list[P.MsgA]) -> list[P.MsgN]:
        return [
            P.MsgN(seq, a.msg_id, self.sender_uid, f"hello group {a.cmid}", NOW, self.gid)
            for seq, a in enumerate(msg_as, 1)
        ]

    def pull(self, token: str) -> dict[str, Any]:
        status, page = self.h.http("GET", "/v1/inbox?after=0&limit=500", token)
        self.assertEqual(status, 200)
        return page  # type: ignore[no-any-return]

    def resend(self, seconds: float) -> None:
        self.h.reactor.advance(seconds)
        self.h.messenger.resend_late()
        self.h.turn()

    def test_stored_once_one_entry_per_member(self) -> None:
        """Each group message is one stored message with one timeline entry
        for each of the 50 members, the sender included, in send order; MSG_A
        carries the sender's own seq."""
        msg_as = self.send_all()
        self.assertEqual([(a.cmid, a.seq) for a in msg_as],
                         [(cmid, cmid) for cmid in range(1, self.MESSAGES + 1)])
        self.assertEqual(len({a.msg_id for a in msg_as}), self.MESSAGES)
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), self.MESSAGES)
        for a in msg_as:
            self.assertEqual(
                count(self.h, "SELECT count(*) FROM inbox WHERE msg_id = ?", a.msg_id), 50
            )
        for uid in self.uids:
            self.assertEqual(timeline(self.h, uid),
                             [(seq, a.msg_id) for seq, a in enumerate(msg_as, 1)])

    def test_connected_members_get_each_msg_n_once(self) -> None:
        """Every connected member gets one MSG_N per message, with its own
        seq, the sender and ``group`` set; its cumulative ACK_R gets ACK_A,
        and once acked nothing comes again, however long it waits."""
        msg_as = self.send_all()
        expected = self.expected_msg_ns(msg_as)
        for client in self.connected.values():
            self.assertEqual(client.received(), expected)
        for client in self.connected.values():
            client.send(P.AckR(self.MESSAGES))
            self.assertEqual(client.received(), [P.AckA(self.MESSAGES)])
        for uid in (self.uids[i] for i in self.connected):
            self.assertEqual(
                count(self.h, "SELECT acked_seq FROM inboxes WHERE uid = ?", uid), self.MESSAGES
            )
        for _ in range(3):
            self.resend(30)
        for client in self.connected.values():
            self.assertEqual(client.received(), [])
        self.assertEqual(self.h.messenger.retransmitted, 0)

    def test_sender_gets_msg_a_and_no_ack_n(self) -> None:
        """The sender's device gets its MSG_As and nothing else: no MSG_N of
        its own message and no ACK_N, even when every member has acked; its
        timeline holds the messages with ``group`` and without ``to`` or
        ``delivered``."""
        msg_as = self.send_all()
        for client in self.connected.values():
            client.send(P.AckR(self.MESSAGES))
        for i in self.offline:
            late = self.h.connect()
            late.login(self.names[i])
            late.send(P.AckR(self.MESSAGES))
            self.assertEqual(late.received(), [P.AckA(self.MESSAGES)])
        self.assertEqual(self.sender.received(), [])
        self.assertEqual(self.h.messenger.acks_out, 0)
        self.assertEqual(self.pull(self.sender_token), {"messages": [
            {"seq": a.seq, "msg_id": a.msg_id, "from": self.sender_uid, "group": self.gid,
             "body": f"hello group {a.cmid}", "ts": NOW}
            for a in msg_as
        ], "max": self.MESSAGES})

    def test_senders_other_device_gets_the_copy(self) -> None:
        """The sender's other connected device gets each message as MSG_N
        [seqA, msg_id, sender, body, ts, gid] (no ``to``) and acks it like
        any other; the sending device gets none."""
        tablet = self.h.connect()
        tablet.login(self.names[0], device=named_device("sender-tablet"))
        self.assertEqual([p.what for p in self.sender.received()], ["devices"])
        msg_as = self.send_all()
        expected = [P.MsgN(a.seq, a.msg_id, self.sender_uid, f"hello group {a.cmid}", NOW,
                           self.gid) for a in msg_as]
        self.assertEqual(tablet.received(), expected)
        tablet.send(P.AckR(self.MESSAGES))
        self.assertEqual(tablet.received(), [P.AckA(self.MESSAGES)])
        self.resend(30)
        self.assertEqual((tablet.received(), self.sender.received()), ([], []))

    def test_offline_members_pull_each_once(self) -> None:
        """Members that were offline or lingering got nothing pushed; after
        logging in, WELCOME's inbox_max says how many wait and one pull
        returns each message once, with ``group`` set, nothing pushed besides."""
        msg_as = self.send_all()
        expected = [
            {"seq": seq, "msg_id": a.msg_id, "from": self.sender_uid, "group": self.gid,
             "body": f"hello group {a.cmid}", "ts": NOW}
            for seq, a in enumerate(msg_as, 1)
        ]
        self.assertEqual((len(self.connected), len(self.offline)), (17, 32))
        for i in self.offline:
            client = self.h.connect()
            welcome = client.login(self.names[i])
            self.assertEqual(welcome.inbox_max, self.MESSAGES)
            self.assertEqual(self.pull(welcome.token),
                             {"messages": expected, "max": self.MESSAGES})
            client.send(P.AckR(self.MESSAGES))
            self.assertEqual(client.received(), [P.AckA(self.MESSAGES)])
            self.resend(30)
            self.assertEqual(client.received(), [])

    def test_unacked_msg_n_sent_again_with_group(self) -> None:
        """A connected member that does not ack gets the same MSG_Ns again,
        ``group`` included, after the retransmit timeout; its ack stops them."""
        msg_as = self.send_all()
        expected = self.expected_msg_ns(msg_as)
        slow = self.connected[1]
        for client in self.connected.values():
            client.received()
            if client is not slow:
                client.send(P.AckR(self.MESSAGES))
        self.resend(10)
        self.assertEqual(slow.received(), expected)
        for client in self.connected.values():
            if client is not slow:
                self.assertEqual(client.received(), [P.AckA(self.MESSAGES)])
        slow.send(P.AckR(self.MESSAGES))
        self.assertEqual(slow.received(), [P.AckA(self.MESSAGES)])
        self.resend(10)
        self.assertEqual(slow.received(), [])
        self.assertEqual(self.sender.received(), [])

    def test_retransmit_per_device(self) -> None:
        """A member on two devices: the device that acked gets nothing more,
        the one that did not gets the MSG_Ns again."""
        other = self.h.connect()
        other.login(self.names[1], device=named_device("member-tablet"))
        phone = self.connected[1]
        self.assertEqual([p.what for p in phone.received()], ["devices"])
        msg_as = self.send_all()
        expected = self.expected_msg_ns(msg_as)
        self.assertEqual((phone.received(), other.received()), (expected, expected))
        phone.send(P.AckR(self.MESSAGES))
        phone.received()
        self.resend(10)
        self.assertEqual((phone.received(), other.received()), ([], expected))


class SmallGroup(SynchronousTestCase):
    """alice (owner), bob and carol in a group, all connected; dave outside it."""

    def setUp(self) -> None:
        self.h = Harness()
        names = ("alice", "bob", "carol", "dave")
        self.uid = {name: add_user(self.h.store, name) for name in names}
        self.gid = create_group(self.h, self.uid["alice"], [self.uid["bob"], self.uid["carol"]])
        self.clients = {}
        self.tokens = {}
        for name in names:
            self.clients[name] = self.h.connect()
            self.tokens[name] = self.clients[name].login(name).token
        self.alice, self.bob, self.carol, self.dave = (self.clients[n] for n in names)


class RefusalTests(SmallGroup):
    def assert_nothing_stored_or_pushed(self) -> None:
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 0)
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox"), 0)
        for name in ("alice", "bob", "carol"):
            self.assertEqual(self.clients[name].received(), [])

    def assert_connection_stays(self, client: Client) -> None:
        self.assertFalse(client.closed)
        client.send(P.Ping())
        self.assertEqual(client.received(), [P.Pong()])

    def test_non_member_refused(self) -> None:
        """A user outside the group gets ERROR 403 with ref = cmid; nothing is
        stored or pushed, and the connection stays open for other messages."""
        self.dave.send(P.MsgR(7, self.gid, "let me in", P.KIND_GROUP))
        self.assertEqual(self.dave.received(),
                         [P.Error(403, f"you are not a member of group {self.gid}", 7)])
        self.assert_nothing_stored_or_pushed()
        self.assert_connection_stays(self.dave)
        self.dave.send(P.MsgR(8, self.uid["bob"], "hi bob"))
        self.assertIsInstance(self.dave.received()[0], P.MsgA)

    def test_unknown_group(self) -> None:
        """A group id that does not exist gets ERROR 404 with ref = cmid, for a
        member of other groups too; the connection stays."""
        self.alice.send(P.MsgR(3, 999, "anyone?", P.KIND_GROUP))
        self.assertEqual(self.alice.received(), [P.Error(404, "no such group 999", 3)])
        self.assert_nothing_stored_or_pushed()
        self.assert_connection_stays(self.alice)

    def test_member_who_left_refused(self) -> None:
        """Membership is checked per message: once out of the group a former
        member gets 403 and the remaining members get nothing."""
        leave_group(self.h, self.gid, self.uid["carol"])
        self.carol.send(P.MsgR(1, self.gid, "still here?", P.KIND_GROUP))
        self.assertEqual([(p.code, p.ref) for p in self.carol.received()], [(403, 1)])
        self.assert_nothing_stored_or_pushed()

    def test_refusals_in_a_batch_with_a_stored_message(self) -> None:
        """In one batch, the refused messages get their errors and the member's
        message is delivered as usual."""
        self.dave.protocol.dataReceived(
            encode(P.MsgR(1, self.gid, "no", P.KIND_GROUP))
            + encode(P.MsgR(2, 999, "no", P.KIND_GROUP)))
        self.bob.send(P.MsgR(1, self.gid, "yes", P.KIND_GROUP))
        self.assertEqual([(p.code, p.ref) for p in self.dave.received()], [(403, 1), (404, 2)])
        [msg_a] = self.bob.received()
        self.assertIsInstance(msg_a, P.MsgA)
        for name in ("alice", "carol"):
            self.assertEqual(self.clients[name].received(),
                             [P.MsgN(1, msg_a.msg_id, self.uid["bob"], "yes", NOW, self.gid)])

    def test_cmid_reused_for_another_message(self) -> None:
        """A stored group message's cmid sent again with another body or to
        another group gets ERROR 409 with ref = cmid; nothing new is stored
        or pushed."""
        other = create_group(self.h, self.uid["alice"], [self.uid["dave"]])
        self.alice.send(P.MsgR(6, self.gid, "first", P.KIND_GROUP))
        [msg_a] = self.alice.received()
        for name in ("bob", "carol", "dave"):
            self.clients[name].received()
        self.alice.send(P.MsgR(6, self.gid, "second", P.KIND_GROUP))
        self.alice.send(P.MsgR(6, other, "first", P.KIND_GROUP))
        self.assertEqual([(p.code, p.ref) for p in self.alice.received()], [(409, 6), (409, 6)])
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 1)
        for name in ("bob", "carol", "dave"):
            self.assertEqual(self.clients[name].received(), [])
        self.alice.send(P.MsgR(6, self.gid, "first", P.KIND_GROUP))
        self.assertEqual(self.alice.received(), [msg_a])


class DeduplicationTests(SmallGroup):
    def assert_one_entry_each(self, msg_id: int) -> None:
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 1)
        for name in ("alice", "bob", "carol"):
            self.assertEqual(
                count(self.h, "SELECT count(*) FROM inbox WHERE uid = ? AND msg_id = ?",
                      self.uid[name], msg_id), 1)
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox"), 3)

    def test_retransmitted_msg_r(self) -> None:
        """A repeated MSG_R (same device and cmid) gets the same MSG_A (same
        msg_id and seq) and creates no second message, timeline entry or
        MSG_N."""
        self.alice.send(P.MsgR(5, self.gid, "once", P.KIND_GROUP))
        [msg_a] = self.alice.received()
        self.assertIsInstance(msg_a, P.MsgA)
        self.alice.send(P.MsgR(5, self.gid, "once", P.KIND_GROUP))
        self.assertEqual(self.alice.received(), [msg_a])
        self.assert_one_entry_each(msg_a.msg_id)
        for name in ("bob", "carol"):
            self.assertEqual(self.clients[name].received(),
                             [P.MsgN(1, msg_a.msg_id, self.uid["alice"], "once", NOW, self.gid)])
        self.assertEqual(self.h.messenger.duplicates, 1)

    def test_retransmit_in_the_same_batch(self) -> None:
        """Two copies in one batch are one message: both MSG_As carry its
        msg_id and each member gets one MSG_N."""
        copy = P.MsgR(5, self.gid, "once", P.KIND_GROUP)
        self.alice.send(copy, copy)
        first, second = self.alice.received()
        self.assertEqual(first, second)
        self.assert_one_entry_each(first.msg_id)
        for name in ("bob", "carol"):
            self.assertEqual(len(self.clients[name].received()), 1)

    def test_same_cmid_from_another_device(self) -> None:
        """The same cmid from another device of the sender is a new group
        message."""
        tablet = self.h.connect()
        tablet.login("alice", device=named_device("alice-tablet"))
        self.alice.received()
        self.alice.send(P.MsgR(5, self.gid, "once", P.KIND_GROUP))
        [phone_a] = self.alice.received()
        tablet.received()
        tablet.send(P.MsgR(5, self.gid, "once", P.KIND_GROUP))
        [tablet_a] = tablet.received()
        self.assertNotEqual(tablet_a.msg_id, phone_a.msg_id)
        self.assertEqual(count(self.h, "SELECT count(*) FROM messages"), 2)
        self.assertEqual(len(self.bob.received()), 2)

    def test_retransmit_after_every_member_acked(self) -> None:
        """Unlike a one-to-one message, a group message acked by every member
        answers a retransmit with MSG_A alone: group messages get no ACK_N."""
        self.alice.send(P.MsgR(5, self.gid, "once", P.KIND_GROUP))
        [msg_a] = self.alice.received()
        for name in ("bob", "carol"):
            self.clients[name].received()
            self.clients[name].send(P.AckR(1))
            self.assertEqual(self.clients[name].received(), [P.AckA(1)])
        self.assertEqual(self.alice.received(), [])
        self.alice.send(P.MsgR(5, self.gid, "once", P.KIND_GROUP))
        self.assertEqual(self.alice.received(), [msg_a])
        self.assert_one_entry_each(msg_a.msg_id)

    def test_retransmit_after_leaving(self) -> None:
        """A retransmit of a message stored while the sender was a member gets
        its MSG_A back after the sender left (de-duplication comes first), and
        the members get nothing new."""
        self.carol.send(P.MsgR(2, self.gid, "bye", P.KIND_GROUP))
        [msg_a] = self.carol.received()
        self.assertIsInstance(msg_a, P.MsgA)
        self.alice.received()
        self.bob.received()
        leave_group(self.h, self.gid, self.uid["carol"])
        self.carol.send(P.MsgR(2, self.gid, "bye", P.KIND_GROUP))
        self.assertEqual(self.carol.received(), [msg_a])
        self.assertEqual((self.alice.received(), self.bob.received()), ([], []))
        self.assertEqual(count(self.h, "SELECT count(*) FROM inbox"), 3)


class MixedInboxTests(SmallGroup):
    def test_group_and_direct_messages_interleave(self) -> None:
        """A member's timeline holds group and one-to-one messages, sent and
        received, in one seq order; acking past a group message sends ACK_N
        only for the one-to-one ones, naming the sender's seq."""
        self.alice.send(P.MsgR(1, self.gid, "to all", P.KIND_GROUP))
        self.carol.send(P.MsgR(1, self.uid["bob"], "to bob"))
        [group_a] = self.alice.received()
        group_n = P.MsgN(1, group_a.msg_id, self.uid["alice"], "to all", NOW, self.gid)
        carol_got = self.carol.received()
        self.assertEqual(carol_got[0], group_n)
        [direct_a] = carol_got[1:]
        self.assertIsInstance(direct_a, P.MsgA)
        self.assertEqual(direct_a.seq, 2)
        self.assertEqual(self.bob.received(), [
            group_n, P.MsgN(2, direct_a.msg_id, self.uid["carol"], "to bob", NOW)])
        self.bob.send(P.AckR(2))
        self.assertEqual(self.bob.received(), [P.AckA(2)])
        self.assertEqual(self.alice.received(), [])
        self.assertEqual(self.carol.received(), [P.AckN(2)])
        self.assertEqual(pull(self.h, self.tokens["carol"]), [
            {"seq": 1, "msg_id": group_a.msg_id, "from": self.uid["alice"], "group": self.gid,
             "body": "to all", "ts": NOW},
            {"seq": 2, "msg_id": direct_a.msg_id, "from": self.uid["carol"],
             "to": self.uid["bob"], "body": "to bob", "ts": NOW, "delivered": True},
        ])

    def test_one_batch_of_group_and_direct_messages(self) -> None:
        """Messages to two groups and to a user committed in one batch give a
        member consecutive seqs, each message once, ``group`` set only on the
        group messages."""
        second = create_group(self.h, self.uid["carol"], [self.uid["bob"]])
        self.alice.protocol.dataReceived(encode(P.MsgR(1, self.gid, "g1", P.KIND_GROUP)))
        self.carol.protocol.dataReceived(encode(P.MsgR(1, second, "g2", P.KIND_GROUP)))
        self.dave.protocol.dataReceived(encode(P.MsgR(1, self.uid["bob"], "direct")))
        batches = self.h.store.batches
        self.h.turn()
        self.assertEqual(self.h.store.batches, batches + 1)
        ids = {}
        for name in ("alice", "carol", "dave"):
            [msg_a] = [p for p in self.clients[name].received() if isinstance(p, P.MsgA)]
            ids[name] = msg_a.msg_id
        self.assertEqual(self.bob.received(), [
            P.MsgN(1, ids["alice"], self.uid["alice"], "g1", NOW, self.gid),
            P.MsgN(2, ids["carol"], self.uid["carol"], "g2", NOW, second),
            P.MsgN(3, ids["dave"], self.uid["dave"], "direct", NOW),
        ])
        self.assertEqual([(m["seq"], m.get("group")) for m in pull(self.h, self.tokens["bob"])],
                         [(1, self.gid), (2, second), (3, None)])


class LargestGroupTests(SynchronousTestCase):
    def test_five_hundred_members(self) -> None:
        """A group of 500 members (the default ``max_members``) delivers to
        all 500 timelines, the sender's included: one stored message, one
        entry each, and a retransmit adds nothing."""
        h = Harness()
        uids = [add_user(h.store, f"m{i}") for i in range(500)]
        gid = create_group(h, uids[0], uids[1:])
        message = (uids[0], 1, 1, gid, "to everyone", P.KIND_GROUP)
        for _ in range(2):
            d = h.store.deliver([message], [], NOW)
            h.turn()
            [result], _ = self.successResultOf(d)
        self.assertEqual(count(h, "SELECT count(*) FROM messages"), 1)
        self.assertEqual(count(h, "SELECT count(*) FROM inbox WHERE msg_id = ?", result[1]), 500)
        self.assertEqual(count(h, "SELECT count(DISTINCT uid) FROM inbox"), 500)
        self.assertEqual(count(h, "SELECT count(*) FROM inbox WHERE uid = ?", uids[0]), 1)
        self.assertEqual(count(h, "SELECT min(max_seq) FROM inboxes"), 1)
        self.assertEqual(count(h, "SELECT max(max_seq) FROM inboxes"), 1)


class SDKGroupTests(test_client.SDKTestCase):
    """The reference SDK on both ends: alice sends with ``kind=KIND_GROUP``;
    bob and carol are online, dave comes online later."""

    def setUp(self) -> None:
        super().setUp()
        self.carol_uid = add_user(self.h.store, "carol")
        self.dave_uid = add_user(self.h.store, "dave")
        self.gid = create_group(self.h, self.alice_uid,
                                [self.bob_uid, self.carol_uid, self.dave_uid])
        self.alice = self.device("alice")
        self.bob = self.device("bob")
        self.carol = self.device("carol")
        for device in (self.alice, self.bob, self.carol):
            self.start(device)

    def test_group_send_shown_once_with_group(self) -> None:
        """send(gid, body, kind=KIND_GROUP) ends "stored" and stays so (no
        ACK_N ever makes it "delivered"); every other member's on_message
        shows each message once, in order, with ``group`` set, whether pushed
        live or pulled after a later login; the sending device is shown
        nothing (its own messages are in the sender's timeline, not shown
        again)."""
        outs = [self.alice.client.send(self.gid, f"g{i}", kind=P.KIND_GROUP) for i in (1, 2, 3)]
        self.settle()
        msg_ids = [self.msg_id_of(self.alice_uid, out.cmid) for out in outs]
        self.assertEqual([(o.state, o.msg_id, o.kind) for o in outs],
                         [(STORED, m, P.KIND_GROUP) for m in msg_ids])
        expected = [Message(seq, msg_id, self.alice_uid, f"g{seq}", NOW, self.gid)
                    for seq, msg_id in enumerate(msg_ids, 1)]
        for device, uid in ((self.bob, self.bob_uid), (self.carol, self.carol_uid)):
            self.assertEqual(device.shown, expected)
            self.assertEqual(self.acked_seq(uid), 3)
            self.assertEqual(device.http.requests, [])
        dave = self.device("dave")
        self.start(dave)
        self.assertEqual(dave.shown, expected)
        self.assertEqual(dave.http.requests, [("GET", "/v1/inbox?after=0&limit=500")])
        self.assertEqual(self.acked_seq(self.dave_uid), 3)
        self.server_resend(30)
        self.wait(10)
        for device in (self.bob, self.carol, dave):
            self.assertEqual(device.shown, expected)
        self.assertEqual(self.alice.shown, [])
        self.assertEqual(self.inbox_size(self.alice_uid), 3)  # the sender's own entries
        self.assertEqual(self.alice.statuses, [(o.cmid, STORED, o.msg_id) for o in outs])
        self.assertEqual({o.state for o in outs}, {STORED})
        self.assertEqual(self.alice.client.waiting, {})
        self.assertEqual(self.alice.client.undelivered, {})
        self.assertEqual((self.alice.client.retransmits, self.h.messenger.duplicates), (0, 0))

    def test_lost_msg_a_retransmit_shown_once(self) -> None:
        """When the MSG_A of a group message is lost with the connection, the
        SDK sends the MSG_R again after reconnecting; the server answers with
        the same msg_id and the members are shown the message once."""
        out = self.alice.client.send(self.gid, "once", kind=P.KIND_GROUP)
        self.to_server(self.alice)
        self.alice.link.lose_to_client(P.MsgA)
        self.alice.link.cut()
        self.wait(5)
        self.assertEqual(len(self.alice.links), 2)
        msg_id = self.msg_id_of(self.alice_uid, out.cmid)
        self.assertEqual((out.state, out.msg_id, out.transmissions), (STORED, msg_id, 2))
        self.assertEqual(self.h.messenger.duplicates, 1)
        self.assertEqual(self.count("SELECT count(*) FROM messages"), 1)
        for device in (self.bob, self.carol):
            self.assertEqual(device.shown,
                             [Message(1, msg_id, self.alice_uid, "once", NOW, self.gid)])
