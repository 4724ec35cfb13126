"""What a client keeps on the device between runs (PROTOCOL.md v2, 1.2-1.4).

- the device id: 16 random bytes made once per installation (a reinstall, a
  new state file, is a new device);
- the cmid counter: a cmid is never taken twice for two messages of this
  device (the server would answer the second with ERROR 409); the counter
  goes on above WELCOME's ``last_cmid``;
- the timeline position: ``last_seq``, every entry up to it was received
  (shown, or this device's own message), and the seqs of this device's own
  messages above it (``mine``: their MSG_A came, an entry below is missing);
- the messages not yet stored by the server (no MSG_A), to send again;
- the session (uid, session_id, session_key, token and the RESUME nonce
  counter), to RESUME it without the password;
- the access servers it knows (``GET /v1/iplist``) and the one it used last.

Never the password.  ``ClientState`` holds that in memory; ``FileState``
also writes it to a JSON file, private to the user (mode 0600: the session
key is a secret), after every change that matters.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

DEVICE_ID_BYTES = 16


class ClientState:
    """The client's durable facts, kept in memory."""

    def __init__(self, next_cmid: int | None = None, device_id: bytes | None = None) -> None:
        # the installation's device id (LOGIN's device_id)
        self.device_id = device_id if device_id is not None else os.urandom(DEVICE_ID_BYTES)
        # Without a stored counter, start from the clock (in milliseconds):
        # WELCOME's last_cmid lifts it further when the server knows more.
        self.next_cmid = next_cmid if next_cmid is not None else int(time.time() * 1000)
        # the account whose timeline last_seq and mine are positions in
        self.uid: int | None = None
        # every timeline entry up to here was received; None: not known yet
        # (then the pull starts at the device's cursor, WELCOME's acked)
        self.last_seq: int | None = None
        # seqs above last_seq of this device's own messages (MSG_A came)
        self.mine: set[int] = set()
        # messages not yet stored by the server (no MSG_A): cmid -> (to, body, kind)
        self.unsent: dict[int, tuple[int, str | bytes, int]] = {}
        # the session, to RESUME it: uid, session_id, session_key, token and
        # nonce (the greatest RESUME nonce used, as an int)
        self.session: dict[str, Any] | None = None
        # the access servers (GET /v1/iplist) and the one used last
        self.iplist_version: int | None = None
        self.servers: list[dict[str, Any]] = []
        self.last_server: tuple[str, int, bool] | None = None

    def take_cmid(self) -> int:
        cmid = self.next_cmid
        self.next_cmid += 1
        return cmid

    def take_nonce(self, now: float) -> bytes:
        """The next RESUME nonce: greater than every one used before, even
        when this state was restored from an older backup (the clock in
        microseconds moves on meanwhile).  Call ``save`` before sending it."""
        assert self.session is not None
        nonce = max(int(self.session.get("nonce", 0)) + 1, int(now * 1_000_000))
        self.session["nonce"] = nonce
        return nonce.to_bytes(8, "big")

    def save(self) -> None:
        """Make the state durable (nothing to do in memory)."""


def write_json(path: str, data: Any) -> None:
    """Replace the JSON file at ``path`` atomically: a crash leaves the old
    file or the new one, never half of one.  The file is readable by its
    owner only (mode 0600): client state holds session keys."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover .tmp may have had another mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            json.dump(data, f, ensure_ascii=False)
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)


def _body_to_json(body: str | bytes) -> Any:
    return body if isinstance(body, str) else {"hex": body.hex()}


def _body_from_json(body: Any) -> str | bytes:
    return bytes.fromhex(body["hex"]) if isinstance(body, dict) else str(body)


class FileState(ClientState):
    """``ClientState`` in a JSON file (mode 0600), rewritten atomically on
    ``save``.  A file without a device id (written by a version-1 client)
    gets a new device id, and its session, which belonged to no device, is
    dropped: the next start logs in with the password."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                data: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            return
        self.next_cmid = int(data["next_cmid"])
        last_seq = data.get("last_seq")
        self.last_seq = None if last_seq is None else int(last_seq)
        self.uid = data.get("uid")
        self.mine = {int(seq) for seq in data.get("mine", [])}
        for cmid, (to, body, kind) in data.get("unsent", {}).items():
            self.unsent[int(cmid)] = (int(to), _body_from_json(body), int(kind))
        device_id = data.get("device_id")
        session = data.get("session")
        if device_id:
            self.device_id = bytes.fromhex(device_id)
            if session:
                self.session = {
                    "uid": int(session["uid"]),
                    "session_id": bytes.fromhex(session["session_id"]),
                    "session_key": bytes.fromhex(session["session_key"]),
                    "token": session["token"],
                    "nonce": int(session.get("nonce", 0)),
                }
        if self.uid is None and session:
            self.uid = int(session["uid"])
        self.iplist_version = data.get("iplist_version")
        self.servers = data.get("servers", [])
        last = data.get("last_server")
        self.last_server = (last[0], last[1], last[2]) if last else None

    def save(self) -> None:
        unsent = {
            str(cmid): [to, _body_to_json(body), kind]
            for cmid, (to, body, kind) in self.unsent.items()
        }
        session = self.session and {
            "uid": self.session["uid"],
            "session_id": self.session["session_id"].hex(),
            "session_key": self.session["session_key"].hex(),
            "token": self.session["token"],
            "nonce": int(self.session.get("nonce", 0)),
        }
        data = {
            "device_id": self.device_id.hex(),
            "next_cmid": self.next_cmid,
            "uid": self.uid,
            "last_seq": self.last_seq,
            "mine": sorted(self.mine),
            "unsent": unsent,
            "session": session,
            "iplist_version": self.iplist_version,
            "servers": self.servers,
            "last_server": self.last_server,
        }
        write_json(self.path, data)
