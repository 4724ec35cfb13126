"""A database of contract version 1 carried over to version 2.

``tests/data/v1.sqlite`` was made by the version-1 code of this repository
(``tests/data/make_v1_database.py``, run against commit 1d7df45): alice (1),
bob (2) and carol (3); alice sent bob three messages, bob acked two; bob
sent alice one; carol wrote to their group; alice wrote a note to herself
and acked everything; carol asked alice to be friends.
"""

from __future__ import annotations

import os
import shutil
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from im58d.store.sqlite import open_database, schema_version
from im58d.wire import packets as P

from .support import Harness

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "v1.sqlite")
ALICE, BOB, CAROL = 1, 2, 3
TEAM = 1


class MigrationTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "im58d.sqlite")
        shutil.copyfile(FIXTURE, self.path)
        os.chmod(self.path, 0o600)
        self.h = Harness(path=self.path)

    def inbox(self, token: str, after: int) -> list[tuple[int, str]]:
        status, body = self.h.http("GET", f"/v1/inbox?after={after}", token)
        self.assertEqual(status, 200, body)
        return [(m["seq"], m["body"]) for m in body["messages"]]

    def test_schema_upgraded_once(self) -> None:
        """The file is at schema version 4 after the daemon opened it, and
        opening it again changes nothing."""
        with sqlite3.connect(self.path) as conn:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 4)
        db = open_database(self.path)
        self.assertEqual(schema_version(db), 4)
        db.conn.close()

    def test_first_device_starts_at_the_version_1_cursor(self) -> None:
        """bob's first device after the upgrade starts where his version-1
        client had acked (2): WELCOME says acked 2 and the timeline head 4;
        it pulls the two entries it never acked, not the two it had."""
        client = self.h.connect()
        welcome = client.login("bob")
        self.assertEqual((welcome.acked, welcome.inbox_max, welcome.last_cmid), (2, 4, 0))
        self.assertEqual(self.inbox(welcome.token, welcome.acked),
                         [(3, "three"), (4, "hello team")])
        # a second device starts there too
        second = self.h.connect()
        self.assertEqual(second.login("bob", device=b"second-device-01").acked, 2)

    def test_timelines_go_on_after_the_upgrade(self) -> None:
        """New messages take the next seqs of each timeline: bob's reply is
        entry 5 of his timeline and entry 4 of alice's; the version-1
        messages stay where they were (old sent messages are not
        back-filled into their senders' timelines)."""
        alice = self.h.connect()
        alice_welcome = alice.login("alice")
        self.assertEqual((alice_welcome.acked, alice_welcome.inbox_max), (3, 3))
        bob = self.h.connect()
        bob.login("bob")
        alice.received()
        bob.send(P.MsgR(1, ALICE, "after the upgrade"))
        [msg_a] = bob.received()
        self.assertEqual((msg_a.cmid, msg_a.seq), (1, 5))
        [msg_n] = alice.received()
        self.assertEqual((msg_n.seq, msg_n.sender, msg_n.body), (4, BOB, "after the upgrade"))
        self.assertEqual(self.inbox(alice_welcome.token, 0), [
            (1, "hello alice"), (2, "hello team"), (3, "note to self"), (4, "after the upgrade"),
        ])

    def test_version_1_cmids_are_not_this_devices(self) -> None:
        """A version-1 message and a new device's message with the same cmid
        are two messages: the old de-dup key had no device."""
        alice = self.h.connect()
        welcome = alice.login("alice")
        self.assertEqual(welcome.last_cmid, 0)
        alice.send(P.MsgR(1, BOB, "a new one"))
        [msg_a] = alice.received()
        self.assertIsInstance(msg_a, P.MsgA)
        self.assertEqual(msg_a.msg_id, 7)

    def test_delivery_state_carried_over(self) -> None:
        """POST /v1/status answers for version-1 messages from the receivers'
        cursors: two of alice's three to bob, and her note; when bob acks the
        third it is delivered too (no ACK_N: a version-1 message has no entry
        in its sender's timeline to name)."""
        alice = self.h.connect()
        token = alice.login("alice").token
        bob = self.h.connect()
        bob.login("bob")
        alice.received()
        status, body = self.h.http("POST", "/v1/status", token, {"msg_ids": [1, 2, 3, 6]})
        self.assertEqual((status, body), (200, {"delivered": [1, 2, 6]}))
        bob.send(P.AckR(3))
        self.assertEqual(bob.received(), [P.AckA(3)])
        self.assertEqual(alice.received(), [])
        status, body = self.h.http("POST", "/v1/status", token, {"msg_ids": [1, 2, 3, 6]})
        self.assertEqual(body, {"delivered": [1, 2, 3, 6]})

    def test_lists_carried_over(self) -> None:
        """Friends, the group and its members, carol's pending request (now
        with a version) and the report counters survive the upgrade."""
        alice = self.h.connect()
        token = alice.login("alice").token
        status, body = self.h.http("GET", "/v1/friends", token)
        self.assertEqual(body["friends"], [[BOB, 0]])
        status, body = self.h.http("GET", f"/v1/groups/{TEAM}/members", token)
        self.assertEqual(body["members"], [ALICE, BOB, CAROL])
        status, body = self.h.http("GET", "/v1/friends/requests", token)
        self.assertEqual((status, [r["uid"] for r in body["requests"]]), (200, [CAROL]))
        self.assertGreaterEqual(body["version"], 1)
        status, versions = self.h.http("GET", "/v1/versions", token)
        self.assertEqual(versions["requests"], body["version"])
        self.assertGreaterEqual(versions["devices"], 1)
        d = self.h.store.stats("click.send", 1, 1_700_000_030)
        self.h.turn()
        self.assertEqual(self.successResultOf(d)[0]["count"], 3)
