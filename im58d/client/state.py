"""What a client keeps on the device between runs: cmids, seqs, unsent messages.

A mobile app must never reuse a cmid (the server would take the new message
for a retransmit of the old one) and must remember which seqs it has shown;
it keeps its session (to RESUME it after a restart of the app) and the
access servers it knows, with the one it used last.
``ClientState`` holds that in memory; ``FileState`` also writes it to a JSON
file after every change that matters.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


class ClientState:
    """The client's durable facts, kept in memory."""

    def __init__(self, next_cmid: int | None = None) -> None:
        # Without a stored counter, start from the clock (in milliseconds) so
        # that a restarted client does not reuse the cmids of its last run.
        self.next_cmid = next_cmid if next_cmid is not None else int(time.time() * 1000)
        self.last_seq = 0  # every inbox entry up to here was shown
        # messages not yet stored by the server (no MSG_A): cmid -> (to, body, kind)
        self.unsent: dict[int, tuple[int, str | bytes, int]] = {}
        # the last session, to RESUME it: uid, session_id, session_key, token
        self.session: dict[str, Any] | None = None
        # the access servers (GET /v1/iplist) and the one used last
        self.iplist_version: int | None = None
        self.servers: list[dict[str, Any]] = []
        self.last_server: tuple[str, int, bool] | None = None

    def take_cmid(self) -> int:
        cmid = self.next_cmid
        self.next_cmid += 1
        return cmid

    def save(self) -> None:
        """Make the state durable (nothing to do in memory)."""


def write_json(path: str, data: Any) -> None:
    """Replace the JSON file at ``path`` atomically: a crash leaves the old
    file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    os.replace(tmp, path)


class FileState(ClientState):
    """``ClientState`` in a JSON file, rewritten atomically on ``save``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                data: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            return
        self.next_cmid = int(data["next_cmid"])
        self.last_seq = int(data["last_seq"])
        for cmid, (to, body, kind) in data.get("unsent", {}).items():
            if isinstance(body, dict):
                body = bytes.fromhex(body["hex"])
            self.unsent[int(cmid)] = (to, body, kind)
        session = data.get("session")
        if session:
            self.session = {
                "uid": session["uid"],
                "session_id": bytes.fromhex(session["session_id"]),
                "session_key": bytes.fromhex(session["session_key"]),
                "token": session["token"],
            }
        self.iplist_version = data.get("iplist_version")
        self.servers = data.get("servers", [])
        last = data.get("last_server")
        self.last_server = (last[0], last[1], last[2]) if last else None

    def save(self) -> None:
        unsent = {
            str(cmid): [to, body if isinstance(body, str) else {"hex": body.hex()}, kind]
            for cmid, (to, body, kind) in self.unsent.items()
        }
        session = self.session and {
            "uid": self.session["uid"],
            "session_id": self.session["session_id"].hex(),
            "session_key": self.session["session_key"].hex(),
            "token": self.session["token"],
        }
        data = {
            "next_cmid": self.next_cmid,
            "last_seq": self.last_seq,
            "unsent": unsent,
            "session": session,
            "iplist_version": self.iplist_version,
            "servers": self.servers,
            "last_server": self.last_server,
        }
        write_json(self.path, data)
