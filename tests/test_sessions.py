"""Sessions that outlive connections and the daemon: RESUME, linger,
presence, ONLINE, CHANGED, signing devices in and out over HTTP, restarts
(PROTOCOL.md 1.3, 1.5, 2)."""

from __future__ import annotations

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from im58d.store.accounts import make_friends_txn, set_disabled_txn
from im58d.web.resource import b64
from im58d.wire import packets as P

from .support import DEVICE, NOW, Client, Harness, add_user, device_id, resume_for

__all__ = ["resume_for"]  # other test modules import it from here


def nonce(n: int) -> bytes:
    """A RESUME nonce: the counter ``n`` as 8 bytes big-endian."""
    return n.to_bytes(8, "big")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class HTTPWelcome:
    """The session fields of a ``POST /v1/login`` answer, as a WELCOME has them."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.uid = answer["uid"]
        self.session_id = unb64(answer["session_id"])
        self.session_key = unb64(answer["session_key"])
        self.token = answer["token"]


def http_login(h: Harness, user: str, device: bytes, name: str | None = None,
               password: str = "pw") -> HTTPWelcome:
    body = {"user": user, "password": password, "device_id": b64(device)}
    if name is not None:
        body["device_name"] = name
    status, answer = h.http("POST", "/v1/login", body=body)
    assert status == 200, (status, answer)
    return HTTPWelcome(answer)


def online_in_store(h: Harness, session_id: bytes) -> bool | None:
    row = h.db.execute("SELECT online FROM sessions WHERE id = ?", (session_id,)).fetchone()
    return None if row is None else bool(row[0])


class ResumeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.alice_uid = add_user(self.h.store, "alice")
        self.bob_uid = add_user(self.h.store, "bob")
        self.first = self.h.connect()
        self.welcome = self.first.login("alice")
        self.device = self.h.device_of(self.alice_uid)

    def resume(self, packet: P.Resume) -> tuple[Client, list[Any]]:
        client = self.h.connect()
        client.send(packet)
        return client, client.received()

    def test_resume_after_a_drop(self) -> None:
        """After a drop, RESUME with the proof gets RESUMED (uid, inbox_max,
        iplist version, the device's cursor) and the same device and session
        (token) back, in one round trip, with no ONLINE (the device lingered);
        the linger timer stops."""
        self.first.drop()
        client, answer = self.resume(resume_for(self.welcome))
        self.assertEqual(answer, [P.Resumed(self.alice_uid, 0, 7, 0)])
        device = self.h.router.device_by_id(self.welcome.session_id)
        self.assertIs(device, self.device)
        self.assertEqual(device.token, self.welcome.token)
        self.assertIs(device.connection, client.protocol)
        self.h.reactor.advance(301)
        self.assertIs(self.h.device_of(self.alice_uid), device)
        client.send(P.Ping())
        self.assertEqual(client.received(), [P.Pong()])

    def test_timeline_kept_across_the_drop(self) -> None:
        """Messages that came while the device lingered count in RESUMED's
        inbox_max; later ones are pushed live; RESUMED's acked is the device's
        cursor."""
        self.first.drop()
        bob = self.h.connect()
        bob.login("bob")
        bob.send(P.MsgR(1, self.alice_uid, "while away"))
        client, answer = self.resume(resume_for(self.welcome))
        self.assertEqual(answer, [P.Resumed(self.alice_uid, 1, 7, 0)])
        bob.send(P.MsgR(2, self.alice_uid, "now"))
        self.assertEqual([(p.seq, p.body) for p in client.received()], [(2, "now")])
        client.send(P.AckR(2))
        self.assertEqual(client.received(), [P.AckA(2)])
        client.drop()
        _, answer = self.resume(resume_for(self.welcome, nonce=b"n0nce-02"))
        self.assertEqual(answer, [P.Resumed(self.alice_uid, 2, 7, 2)])

    def test_resume_kicks_a_connection_still_attached(self) -> None:
        """A RESUME while the old connection is still attached (the server has
        not noticed the drop, or a second client uses the same session): the
        old one gets KICKED 1 and is closed; the session carries on over the
        new one."""
        client, answer = self.resume(resume_for(self.welcome))
        self.assertEqual(answer, [P.Resumed(self.alice_uid, 0, 7, 0)])
        self.assertEqual(self.first.received(), [P.Kicked(P.KICKED_REPLACED)])
        self.assertTrue(self.first.closed)
        self.first.drop()  # what the close leads to: nothing changes
        self.assertIs(self.device.connection, client.protocol)
        self.assertFalse(self.device.ended)

    def test_replayed_resume(self) -> None:
        """The same RESUME (same nonce) twice: the second gets ERROR 409, and so
        does a smaller nonce; a greater one is accepted."""
        packet = resume_for(self.welcome, nonce=nonce(10))
        self.first.drop()
        first, answer = self.resume(packet)
        self.assertIsInstance(answer[0], P.Resumed)
        first.drop()
        _, answer = self.resume(packet)
        self.assertEqual([p.code for p in answer], [409])
        _, answer = self.resume(resume_for(self.welcome, nonce=nonce(9)))
        self.assertEqual([p.code for p in answer], [409])
        _, answer = self.resume(resume_for(self.welcome, nonce=nonce(11)))
        self.assertIsInstance(answer[0], P.Resumed)

    def test_nonce_is_a_big_endian_counter(self) -> None:
        """Nonces compare as 8-byte big-endian numbers: 0x0100 follows 0x00ff;
        the zero nonce is never greater than the last one."""
        self.first.drop()
        _, answer = self.resume(resume_for(self.welcome, nonce=bytes(8)))
        self.assertEqual([p.code for p in answer], [409])
        for n in (0xFF, 0x100, 0x1_0000_0000):
            client, answer = self.resume(resume_for(self.welcome, nonce=nonce(n)))
            self.assertIsInstance(answer[0], P.Resumed, n)
            client.drop()
        _, answer = self.resume(resume_for(self.welcome, nonce=nonce(0xFFFF_FFFF)))
        self.assertEqual([p.code for p in answer], [409])

    def test_ts_window(self) -> None:
        """A ts more than 300 s off the server's clock gets 409; 300 s is fine."""
        self.first.drop()
        for ts, n in ((NOW - 301, 1), (NOW + 301, 2)):
            _, answer = self.resume(resume_for(self.welcome, ts=ts, nonce=nonce(n)))
            self.assertEqual([p.code for p in answer], [409], ts)
        client, answer = self.resume(resume_for(self.welcome, ts=NOW - 300, nonce=nonce(3)))
        self.assertIsInstance(answer[0], P.Resumed)

    def test_bad_proof_and_unknown_session(self) -> None:
        """A wrong mac, another session's id, or a session replaced by a new
        LOGIN of the device: 409, and the connection stays for a LOGIN."""
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

    def test_a_bad_proof_records_nothing(self) -> None:
        """A RESUME with a wrong mac does not use up its nonce: the right proof
        with the same nonce is accepted afterwards."""
        self.first.drop()
        packet = resume_for(self.welcome, nonce=nonce(5))
        _, answer = self.resume(packet._replace(mac=bytes(16)))
        self.assertEqual([p.code for p in answer], [409])
        _, answer = self.resume(packet)
        self.assertIsInstance(answer[0], P.Resumed)

    def test_after_bye_or_linger_expiry(self) -> None:
        """BYE and linger expiry take the device offline but keep its session:
        RESUME later gets RESUMED, then ONLINE (the device came back from
        offline)."""
        self.first.send(P.Bye())
        client, answer = self.resume(resume_for(self.welcome, nonce=nonce(1)))
        self.assertEqual(answer, [P.Resumed(self.alice_uid, 0, 7, 0), P.Online(())])
        self.assertIs(self.h.device_of(self.alice_uid).connection, client.protocol)
        client.drop()
        self.h.reactor.advance(300)
        self.assertIsNone(self.h.device_of(self.alice_uid))
        _, answer = self.resume(resume_for(self.welcome, ts=NOW + 300, nonce=nonce(2)))
        self.assertEqual(answer, [P.Resumed(self.alice_uid, 0, 7, 0), P.Online(())])

    def test_unknown_to_another_daemon(self) -> None:
        """A daemon with another database has no such session: 409, then LOGIN
        works on the same connection."""
        other = Harness()
        add_user(other.store, "alice")
        client = other.connect()
        client.send(resume_for(self.welcome))
        self.assertEqual([p.code for p in client.received()], [409])
        client.login("alice")

    def test_packets_behind_resume_wait(self) -> None:
        """Packets pipelined behind RESUME are handled after RESUMED."""
        self.first.drop()
        client = self.h.connect()
        client.send(resume_for(self.welcome), P.Ping())
        self.assertEqual([type(p) for p in client.received()], [P.Resumed, P.Pong])

    def test_resume_of_a_session_made_over_http(self) -> None:
        """A session made by ``POST /v1/login`` is resumed like one made by
        LOGIN: its device comes online with RESUMED then ONLINE; WELCOME's
        fields came in the HTTP answer."""
        session = http_login(self.h, "bob", DEVICE)
        self.assertIsNone(self.h.router.user(self.bob_uid))
        client = self.h.connect()
        answer = client.resume(session)
        self.assertEqual(answer, [P.Resumed(self.bob_uid, 0, 7, 0), P.Online(())])
        self.assertIs(self.h.device_of(self.bob_uid).connection, client.protocol)
        self.assertTrue(online_in_store(self.h, session.session_id))


class PresenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.uids = {name: add_user(self.h.store, name) for name in ("alice", "bob", "carol")}
        make_friends_txn(self.h.db, self.uids["alice"], self.uids["bob"], 0)
        self.alice = self.h.connect()
        self.alice.login("alice")
        self.carol = self.h.connect()
        self.carol.login("carol")
        self.bob = self.h.connect()
        self.bob_welcome = self.bob.login("bob")
        self.assertEqual(self.alice.received(), [P.Presence(self.uids["bob"], True)])
        self.assertEqual(self.carol.received(), [])  # not bob's friend
        self.online = P.Presence(self.uids["bob"], True)
        self.offline = P.Presence(self.uids["bob"], False)

    def test_bye(self) -> None:
        """BYE of the user's only device: the friends get PRESENCE false at
        once, once."""
        self.bob.send(P.Bye())
        self.assertEqual(self.alice.received(), [self.offline])
        self.h.reactor.advance(600)
        self.assertEqual(self.alice.received(), [])

    def test_drop_and_resume_flaps_nothing(self) -> None:
        """A drop followed by RESUME within the linger time: no presence packet
        at all, to anyone."""
        self.bob.drop()
        self.h.reactor.advance(299)
        again = self.h.connect()
        again.send(resume_for(self.bob_welcome, ts=NOW + 299))
        self.assertEqual([type(p) for p in again.received()], [P.Resumed])
        self.h.reactor.advance(600)
        self.assertEqual((self.alice.received(), self.carol.received()), ([], []))

    def test_linger_expiry(self) -> None:
        """A drop without resume: PRESENCE false when the linger runs out, not
        before."""
        self.bob.drop()
        self.h.reactor.advance(299)
        self.assertEqual(self.alice.received(), [])
        self.h.reactor.advance(1)
        self.assertEqual(self.alice.received(), [self.offline])

    def test_resume_after_offline(self) -> None:
        """A RESUME that brings the user's only device back from offline
        (after BYE, after linger expiry) is the user coming online: PRESENCE
        true to the friends."""
        self.bob.send(P.Bye())
        self.assertEqual(self.alice.received(), [self.offline])
        again = self.h.connect()
        self.assertIsInstance(again.resume(self.bob_welcome, nonce=nonce(1))[0], P.Resumed)
        self.assertEqual(self.alice.received(), [self.online])
        again.drop()
        self.h.reactor.advance(300)
        self.assertEqual(self.alice.received(), [self.offline])
        self.assertIsInstance(
            self.h.connect().resume(self.bob_welcome, nonce=nonce(2))[0], P.Resumed)
        self.assertEqual(self.alice.received(), [self.online])

    def test_replaced_session(self) -> None:
        """A newer LOGIN of the same device changes nothing for the friends."""
        again = self.h.connect()
        again.login("bob")
        self.assertEqual(self.alice.received(), [])
        again.send(P.Bye())
        self.assertEqual(self.alice.received(), [self.offline])

    def test_second_device(self) -> None:
        """The user's second device coming online or going offline tells the
        friends nothing; the last one going offline does."""
        tablet = self.h.connect()
        tablet.login("bob", device=device_id(2))
        self.assertEqual(self.alice.received(), [])
        self.bob.send(P.Bye())
        self.assertEqual(self.alice.received(), [])
        phone = self.h.connect()
        phone.resume(self.bob_welcome)  # back from offline, but tablet is online
        self.assertEqual(self.alice.received(), [])
        phone.drop()
        tablet.drop()
        self.h.reactor.advance(299)
        self.assertEqual(self.alice.received(), [])
        self.h.reactor.advance(1)
        self.assertEqual(self.alice.received(), [self.offline])

    def test_disabled(self) -> None:
        """A disabled account: KICKED 4 to it, PRESENCE false to its friends."""
        set_disabled_txn(self.h.db, "bob", True)
        self.h.sessions.end_disabled()
        self.h.turn()
        self.assertEqual(self.bob.received(), [P.Kicked(P.KICKED_DISABLED)])
        self.assertEqual(self.alice.received(), [self.offline])

    def test_http_login_leaves_the_device_offline(self) -> None:
        """A session made over HTTP leaves its device offline: no PRESENCE;
        the RESUME that brings it online is the user coming online."""
        self.bob.send(P.Bye())
        self.alice.received()
        session = http_login(self.h, "bob", device_id(2), "web")
        self.assertEqual(self.alice.received(), [])
        self.assertIsNone(self.h.router.user(self.uids["bob"]))
        self.assertFalse(online_in_store(self.h, session.session_id))
        self.h.connect().resume(session)
        self.assertEqual(self.alice.received(), [self.online])

    def test_sign_out_of_the_last_device(self) -> None:
        """Signing the user's last online device out over HTTP: KICKED 5 to
        it, PRESENCE false to the friends."""
        status, _ = self.h.http("DELETE", "/v1/devices/current", token=self.bob_welcome.token)
        self.assertEqual(status, 204)
        self.assertEqual(self.bob.received(), [P.Kicked(P.KICKED_SIGNED_OUT)])
        self.assertEqual(self.alice.received(), [self.offline])

    def test_lists_changed_elsewhere(self) -> None:
        """A friendship made outside the daemon (im58d-admin) reaches both
        connected users as CHANGED at the next housekeeping round; presence
        then follows the new list."""
        make_friends_txn(self.h.db, self.uids["carol"], self.uids["bob"], 0)
        self.h.presence.check_lists()
        self.h.turn()
        self.assertEqual(self.carol.received(), [P.Changed("friends", 2)])
        self.assertEqual(self.bob.received(), [P.Changed("friends", 3)])
        self.assertEqual(self.alice.received(), [])
        self.h.presence.check_lists()
        self.h.turn()
        self.assertEqual(self.bob.received(), [])  # told once
        self.bob.send(P.Bye())
        self.assertEqual(self.carol.received(), [self.offline])


class OnlineTests(SynchronousTestCase):
    """ONLINE: after WELCOME, and after a RESUMED that brought the device back
    from offline; not after a RESUME of a lingering device."""

    def setUp(self) -> None:
        self.h = Harness()
        self.alice = add_user(self.h.store, "alice")
        self.bob = add_user(self.h.store, "bob")
        self.carol = add_user(self.h.store, "carol")
        for friend in (self.bob, self.carol):
            make_friends_txn(self.h.db, self.alice, friend, 0)
        self.h.connect().login("bob")

    def test_after_welcome(self) -> None:
        """WELCOME then ONLINE with the friends online now, for every new
        session (a second device too)."""
        client = self.h.connect()
        client.send(P.Login("alice", "pw", DEVICE))
        self.assertEqual([type(p) for p in client.received()], [P.Welcome, P.Online])
        carol = self.h.connect()
        carol.login("carol")
        tablet = self.h.connect()
        tablet.send(P.Login("alice", "pw", device_id(2)))
        welcome, online = tablet.received()
        self.assertIsInstance(welcome, P.Welcome)
        self.assertEqual(online, P.Online((self.bob, self.carol)))

    def test_after_resumed_from_offline_only(self) -> None:
        """RESUME of a lingering device: RESUMED alone; of a device that went
        offline (BYE, linger expiry): RESUMED then ONLINE, even while the
        user's other device stayed online."""
        phone = self.h.connect()
        welcome = phone.login("alice")
        self.h.connect().login("alice", device=device_id(2))
        phone.drop()
        again = self.h.connect()
        self.assertEqual([type(p) for p in again.resume(welcome, nonce=nonce(1))], [P.Resumed])
        again.send(P.Bye())
        answer = self.h.connect().resume(welcome, nonce=nonce(2))
        self.assertEqual(answer[1:], [P.Online((self.bob,))])

    def test_online_follows_the_friends(self) -> None:
        """ONLINE says who is online at the time: a friend that went offline
        is not in it."""
        bob = self.h.device_of(self.bob)
        self.h.sessions.bye(bob)
        client = self.h.connect()
        client.send(P.Login("alice", "pw", DEVICE))
        self.assertEqual(client.received()[1], P.Online(()))


class HTTPDeviceTests(SynchronousTestCase):
    """``POST /v1/login``, ``GET /v1/devices``, ``DELETE /v1/devices/...``."""

    def setUp(self) -> None:
        self.h = Harness()
        self.alice = add_user(self.h.store, "alice")
        self.phone = self.h.connect()
        self.phone_welcome = self.phone.login("alice", device=device_id(1))

    def test_http_login_answer(self) -> None:
        """``POST /v1/login`` answers the session's fields with the device's
        last_cmid and cursor; a device id that is not 16 bytes in base64url
        is 400; the device stays offline."""
        self.phone.send(P.MsgR(5, self.alice, "note"))
        status, answer = self.h.http("POST", "/v1/login", body={
            "user": "alice", "password": "pw", "device_id": b64(device_id(1))})
        self.assertEqual(status, 200)
        self.assertEqual(
            {k: answer[k] for k in ("uid", "inbox_max", "heartbeat_s", "linger_s",
                                    "last_cmid", "acked")},
            {"uid": self.alice, "inbox_max": 1, "heartbeat_s": 240, "linger_s": 300,
             "last_cmid": 5, "acked": 0},
        )
        self.assertEqual((len(unb64(answer["session_id"])), len(unb64(answer["session_key"]))),
                         (16, 32))
        for bad in ("phone", b64(bytes(15)), b64(bytes(17)), b64(DEVICE) + "=="):
            status, _ = self.h.http("POST", "/v1/login", body={
                "user": "alice", "password": "pw", "device_id": bad})
            self.assertEqual(status, 400, bad)
        status, _ = self.h.http("POST", "/v1/login", body={"user": "alice", "password": "pw"})
        self.assertEqual(status, 400)

    def test_http_login_replaces_the_same_device(self) -> None:
        """``POST /v1/login`` for a device that is connected replaces its
        session: KICKED 1 on its connection; the new session is offline, and
        the old one cannot be resumed."""
        session = http_login(self.h, "alice", device_id(1))
        self.assertEqual(self.phone.received()[-1], P.Kicked(P.KICKED_REPLACED))
        self.assertTrue(self.phone.closed)
        self.assertIsNone(self.h.router.user(self.alice))
        self.assertFalse(online_in_store(self.h, session.session_id))
        self.assertIsNone(online_in_store(self.h, self.phone_welcome.session_id))
        self.assertEqual([p.code for p in self.h.connect().resume(self.phone_welcome)], [409])

    def test_http_login_of_another_device_kicks_nobody(self) -> None:
        """``POST /v1/login`` for another device leaves the connected one
        alone; it hears the device list moved."""
        http_login(self.h, "alice", device_id(2))
        self.assertEqual([type(p) for p in self.phone.received()], [P.Changed])
        self.assertFalse(self.phone.closed)

    def test_devices_listing(self) -> None:
        """``GET /v1/devices``: the version and the signed-in devices, those
        online first (seen now), then the most recently active; the caller's
        marked current."""
        self.h.reactor.advance(10)
        session = http_login(self.h, "alice", device_id(2), "web")
        self.h.reactor.advance(10)
        status, answer = self.h.http("GET", "/v1/devices", token=session.token)
        self.assertEqual(status, 200)
        self.assertEqual(answer["devices"], [
            {"id": b64(device_id(1)), "name": "test device", "current": False,
             "online": True, "last_seen": NOW + 20, "push": None},
            {"id": b64(device_id(2)), "name": "web", "current": True, "online": False,
             "last_seen": NOW + 10, "push": None},
        ])
        response, _ = self.h.request("GET", "/v1/devices", {
            "Authorization": [f"Bearer {session.token}"],
            "If-None-Match": [f'"{answer["version"]}"'],
        })
        self.assertEqual(response.code, 304)

    def test_sign_out_another_device(self) -> None:
        """``DELETE /v1/devices/<id>``: KICKED 5 on that device's connection,
        which closes; its RESUME answers 409 from then on; the caller's other
        devices get CHANGED "devices"; a second DELETE is 404."""
        tablet = self.h.connect()
        tablet.login("alice", device=device_id(2))
        self.phone.received()
        web = http_login(self.h, "alice", device_id(3))
        tablet.received()
        self.phone.received()
        status, _ = self.h.http("DELETE", f"/v1/devices/{b64(device_id(1))}", token=web.token)
        self.assertEqual(status, 204)
        self.assertEqual(self.phone.received(), [P.Kicked(P.KICKED_SIGNED_OUT)])
        self.assertTrue(self.phone.closed)
        self.assertEqual([type(p) for p in tablet.received()], [P.Changed])
        self.assertIsNone(self.h.router.device_by_id(self.phone_welcome.session_id))
        self.assertIsNone(online_in_store(self.h, self.phone_welcome.session_id))
        self.phone.drop()
        self.assertEqual([p.code for p in self.h.connect().resume(self.phone_welcome)], [409])
        status, _ = self.h.http("DELETE", f"/v1/devices/{b64(device_id(1))}", token=web.token)
        self.assertEqual(status, 404)
        status, _ = self.h.http("DELETE", f"/v1/devices/{b64(device_id(9))}", token=web.token)
        self.assertEqual(status, 404)

    def test_sign_out_a_lingering_device(self) -> None:
        """Signing out a device that lingers ends it here at once: it is no
        longer online, its RESUME is refused."""
        web = http_login(self.h, "alice", device_id(3))
        self.phone.drop()
        status, _ = self.h.http("DELETE", f"/v1/devices/{b64(device_id(1))}", token=web.token)
        self.assertEqual(status, 204)
        self.assertIsNone(self.h.router.user(self.alice))
        self.assertEqual([p.code for p in self.h.connect().resume(self.phone_welcome)], [409])

    def test_sign_out_current(self) -> None:
        """``DELETE /v1/devices/current`` signs the calling device out: its
        token is refused afterwards."""
        token = self.phone_welcome.token
        status, _ = self.h.http("DELETE", "/v1/devices/current", token=token)
        self.assertEqual(status, 204)
        self.assertEqual(self.phone.received(), [P.Kicked(P.KICKED_SIGNED_OUT)])
        status, _ = self.h.http("GET", "/v1/devices", token=token)
        self.assertEqual(status, 401)

    def test_tokens_of_a_disabled_account_refused_at_once(self) -> None:
        """An account disabled behind the daemon's back (im58d-admin): the
        bearer tokens of its sessions are refused at once (401), those of
        devices online here too, before a housekeeping round ends them."""
        web = http_login(self.h, "alice", device_id(3))
        for token in (self.phone_welcome.token, web.token):
            self.assertEqual(self.h.http("GET", "/v1/devices", token=token)[0], 200)
        set_disabled_txn(self.h.db, "alice", True)
        for token in (self.phone_welcome.token, web.token):
            self.assertEqual(self.h.http("GET", "/v1/devices", token=token)[0], 401)

    def test_other_users_devices_are_not_touched(self) -> None:
        """A user cannot sign out another user's device, even knowing its id."""
        add_user(self.h.store, "mallory")
        mallory = http_login(self.h, "mallory", device_id(7))
        status, _ = self.h.http("DELETE", f"/v1/devices/{b64(device_id(1))}",
                                token=mallory.token)
        self.assertEqual(status, 404)
        self.assertFalse(self.phone.closed)


class DurableSessionTests(SynchronousTestCase):
    """Sessions survive the daemon: a second Harness on the same database file
    after the first one stopped (PROTOCOL.md 1.3)."""

    def setUp(self) -> None:
        self.h = Harness(path=self.mktemp())
        self.alice = add_user(self.h.store, "alice")
        self.bob = add_user(self.h.store, "bob")
        make_friends_txn(self.h.db, self.alice, self.bob, 0)
        self.phone = self.h.connect()
        self.phone_welcome = self.phone.login("alice", device=device_id(1))
        tablet = self.h.connect()
        self.tablet_welcome = tablet.login("alice", device=device_id(2))
        tablet.send(P.Bye())  # offline when the daemon stops
        bob = self.h.connect()
        self.bob_welcome = bob.login("bob")
        self.phone.drop()
        self.phone_resume = resume_for(self.phone_welcome, nonce=nonce(1))
        self.phone = self.h.connect()
        self.phone.send(self.phone_resume)
        self.assertIsInstance(self.phone.received()[0], P.Resumed)
        self.h.reactor.advance(100)

    def restart(self) -> Harness:
        h = self.h.restarted()
        h.sessions.restore()
        h.turn()
        return h

    def test_resume_after_a_restart(self) -> None:
        """A session made by the first daemon is resumed on the second: RESUMED
        with the same uid; the device is back without a password."""
        h = self.restart()
        self.assertEqual(self.phone.received(), [P.Kicked(P.KICKED_SHUTDOWN)])
        client = h.connect()
        answer = client.resume(self.phone_welcome, nonce=nonce(2))
        self.assertEqual(answer, [P.Resumed(self.alice, 0, 7, 0)])
        device = h.router.device_by_id(self.phone_welcome.session_id)
        self.assertIs(device.connection, client.protocol)
        self.assertEqual(device.token, self.phone_welcome.token)

    def test_online_devices_linger_again_from_the_start(self) -> None:
        """The devices that were online when the daemon stopped linger again
        from its start, for linger seconds: no PRESENCE meanwhile, and they
        go offline (PRESENCE false to connected friends) when it runs out.
        The device that was offline is not brought back."""
        h = self.restart()
        self.assertEqual(
            {d.session_id for d in h.router.devices()},
            {self.phone_welcome.session_id, self.bob_welcome.session_id},
        )
        self.assertTrue(all(d.connection is None for d in h.router.devices()))
        bob = h.connect()
        answer = bob.resume(self.bob_welcome, nonce=nonce(1))
        self.assertEqual([type(p) for p in answer], [P.Resumed])  # bob lingered
        h.reactor.advance(299)
        self.assertIsNotNone(h.device_of(self.alice, device_id(1)))
        self.assertEqual(bob.received(), [])
        h.reactor.advance(1)
        self.assertIsNone(h.router.user(self.alice))
        self.assertEqual(bob.received(), [P.Presence(self.alice, False)])
        self.assertFalse(online_in_store(h, self.phone_welcome.session_id))

    def test_sessions_survive_a_crash(self) -> None:
        """The daemon dies (no shutdown, no KICKED): the next one on the same
        file resumes its sessions, and the devices that were online, attached
        or lingering, linger again from its start."""
        self.phone.drop()  # lingering when the daemon dies
        h = self.h.restarted(stop=False)
        h.sessions.restore()
        h.turn()
        self.assertEqual(
            {d.session_id for d in h.router.devices()},
            {self.phone_welcome.session_id, self.bob_welcome.session_id},
        )
        h.reactor.advance(299)
        answer = h.connect().resume(self.phone_welcome, nonce=nonce(2))
        self.assertEqual(answer, [P.Resumed(self.alice, 0, 7, 0)])
        h.reactor.advance(1)
        self.assertIsNone(h.router.user(self.bob))
        self.assertIsNotNone(h.router.user(self.alice))

    def test_online_list_after_a_restart(self) -> None:
        """A friend whose device lingers after the restart is online: the
        ONLINE after WELCOME names it."""
        h = self.restart()
        bob = h.connect()
        bob.send(P.Login("bob", "pw", DEVICE))
        self.assertEqual(bob.received()[1], P.Online((self.alice,)))

    def test_replayed_nonce_refused_after_a_restart(self) -> None:
        """A RESUME nonce accepted before the restart is refused after it (it
        was recorded durably); a greater one is accepted."""
        h = self.restart()
        client = h.connect()
        client.send(self.phone_resume)  # the same packet, replayed
        self.assertEqual([p.code for p in client.received()], [409])
        stale = resume_for(self.phone_welcome, ts=NOW + 100, nonce=nonce(1))
        client.send(stale)
        self.assertEqual([p.code for p in client.received()], [409])
        self.assertIsInstance(client.resume(self.phone_welcome, nonce=nonce(2))[0], P.Resumed)

    def test_offline_device_resumes_after_a_restart(self) -> None:
        """A device that was offline (BYE) when the daemon stopped resumes on
        the new one: RESUMED then ONLINE."""
        h = self.restart()
        answer = h.connect().resume(self.tablet_welcome, nonce=nonce(1))
        self.assertEqual(answer, [P.Resumed(self.alice, 0, 7, 0), P.Online((self.bob,))])

    def test_tokens_survive_a_restart(self) -> None:
        """A bearer token of a session made before the restart is accepted
        after it, for a device online or not."""
        h = self.restart()
        for welcome in (self.phone_welcome, self.tablet_welcome):
            status, _ = h.http("GET", "/v1/devices", token=welcome.token)
            self.assertEqual(status, 200)

    def test_disabled_account_after_a_restart(self) -> None:
        """An account disabled (im58d-admin) before the daemon stopped, and
        before a housekeeping round noticed: its devices do not linger after
        the start (friends do not see it online) and RESUME is refused."""
        set_disabled_txn(self.h.db, "alice", True)
        h = self.restart()
        self.assertIsNone(h.router.user(self.alice))
        self.assertIsNotNone(h.router.user(self.bob))
        bob = h.connect()
        bob.send(P.Login("bob", "pw", DEVICE))
        self.assertEqual(bob.received()[1], P.Online(()))
        self.assertEqual([p.code for p in h.connect().resume(self.phone_welcome, nonce=nonce(5))],
                         [409])
