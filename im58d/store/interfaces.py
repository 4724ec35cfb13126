"""The storage layer's interface and errors.

Every method returns a Deferred that fires on the reactor thread with plain
data; results are delivered in the order the calls were made.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

# the lists of a user whose versions sessions watch, in the order of the
# store's version tuples; each is a ``what`` of CHANGED
LISTS = ("friends", "groups", "categories", "requests", "devices")

# message kinds (MSG_R's kind)
KIND_USER = 0
KIND_GROUP = 1

# outcome of one message of a batch (``IStore.deliver``):
#   (STORED, msg_id, ts, sender_seq, ((uid, seq), ...))  stored: the sender's
#                                  entry, and the entries of the others
#   (DUPLICATE, msg_id, sender_seq, delivered)   stored before under this
#                                  cmid; delivered: the receiver acked it
#   (REFUSED, code, message)       ERROR code for the sender
STORED = 0
DUPLICATE = 1
REFUSED = 2


class StoreError(Exception):
    """The store cannot do what was asked (the message says why)."""


class Conflict(StoreError):
    """The thing to create exists already (a user name, a friendship, ...)."""


class NotFound(StoreError):
    """No such user or group."""


class Forbidden(StoreError):
    """The user may not do this (not a member, not the owner, ...)."""


class Invalid(StoreError):
    """A request that makes no sense (befriending oneself, ...)."""


class IStore(Interface):
    path = Attribute("Where the data lives, for logs and errors.")

    def start() -> Deferred[None]:
        """Open the store; the Deferred fires when it is ready."""

    def stop() -> Deferred[None]:
        """Finish every queued operation, then close."""

    # accounts
    def add_user(name: str, password_hash: str, now: int) -> Deferred[int]:
        """Create a user; fires with its uid, or fails with Conflict."""

    def set_password(name: str, password_hash: str) -> Deferred[int]:
        """Replace a user's password hash; fires with the uid; NotFound."""

    def set_disabled(name: str, disabled: bool) -> Deferred[int]:
        """Disable or enable a user; fires with the uid; NotFound."""

    def list_users() -> Deferred[list[dict[str, Any]]]:
        """Every user as ``{"id", "name", "disabled"}``, by id."""

    def disabled_users() -> Deferred[list[int]]:
        """The uids of every disabled user."""

    def login_record(name: str) -> Deferred[tuple[int, str, bool] | None]:
        """``(uid, password_hash, disabled)`` of a user, or None."""

    def uid_for_name(name: str) -> Deferred[int | None]:
        """The uid of a user name, or None."""

    # lists
    def make_friends(uid1: int, uid2: int, now: int) -> Deferred[None]:
        """Make two users friends both ways; Conflict when they are already."""

    def create_group(
        name: str, owner: int, members: list[int], now: int, intro: str = "",
        limit: int | None = None,
    ) -> Deferred[int]:
        """Create a group owned by ``owner`` with ``members``; fires with its gid."""

    def versions(uid: int) -> Deferred[dict[str, int]]:
        """``{"friends", "groups", "categories", "requests", "devices", "me",
        "friend_rows", "group_rows"}``: see ``im58d.store.lists.versions_txn``."""

    def friends(uid: int) -> Deferred[tuple[int, list[list[int]]]]:
        """The friend list version and ``[[uid, category], ...]``."""

    def categories(uid: int) -> Deferred[tuple[int, list[list[Any]]]]:
        """The category list version and ``[[id, name], ...]``."""

    def groups(uid: int) -> Deferred[tuple[int, list[int]]]:
        """The group list version and the gids."""

    def users_sync(uid: int, have: dict[int, int]) -> Deferred[list[dict[str, Any]]]:
        """Details of the visible users in ``have`` newer than its versions."""

    def groups_sync(uid: int, have: dict[int, int]) -> Deferred[list[dict[str, Any]]]:
        """Details of the user's groups in ``have`` newer than its versions."""

    def members(uid: int, gid: int) -> Deferred[tuple[int, list[int]]]:
        """A group's members version and uids; NotFound, Forbidden."""

    def friend_requests(uid: int) -> Deferred[tuple[int, list[dict[str, int]]]]:
        """The request list version and the pending requests to the user:
        ``[{"uid", "ts"}]``."""

    def update_profile(uid: int, changes: dict[str, Any]) -> Deferred[int]:
        """Change nick, gender or birthday; fires with the row's new version."""

    def request_friend(
        uid: int, other: int, category: int, now: int
    ) -> Deferred[tuple[bool, list[int]]]:
        """Ask ``other`` (or accept their request): ``(friends now, uids moved)``."""

    def remove_friend(uid: int, other: int) -> Deferred[list[int]]:
        """End a friendship both ways; the uids whose lists moved."""

    def add_category(uid: int, name: str) -> Deferred[tuple[int, int]]:
        """A new category: ``(id, category list version)``."""

    def set_category(uid: int, friend: int, category: int) -> Deferred[int]:
        """File a friend under a category; the friend list version."""

    def new_group(
        uid: int, name: str, intro: str, members: list[int], limit: int, now: int
    ) -> Deferred[tuple[int, int, list[int]]]:
        """A group the user makes: ``(gid, version, uids whose lists moved)``."""

    def add_member(
        uid: int, gid: int, new: int, limit: int, now: int
    ) -> Deferred[tuple[list[int], int, int]]:
        """A member adds a user: ``(uids moved, members_version, version)``."""

    def remove_member(uid: int, gid: int, target: int) -> Deferred[tuple[list[int], int, int]]:
        """Leave, or (owner) remove a member: ``(uids moved, members_version,
        version)``."""

    # timelines
    def friends_of(uid: int) -> Deferred[list[int]]:
        """The uids of the user's friends."""

    def list_versions(uids: list[int]) -> Deferred[dict[int, tuple[int, ...]]]:
        """Each user's list versions, in the order of ``LISTS``."""

    def user_states(uids: list[int]) -> Deferred[dict[int, dict[str, Any]]]:
        """``{uid: {"friends", "versions"}}``: what users coming online need."""

    def deliver(
        messages: list[tuple[int, int, int, int, str | bytes, int]],
        acks: list[tuple[int, int, int, int]],
        now: int,
        friends_only: bool,
    ) -> Deferred[tuple[list[tuple[Any, ...]], list[Any]]]:
        """Store a batch of messages ``(sender, device, cmid, to, body,
        kind)`` and record a batch of acks ``(uid, device, seq, cursor)``
        (``cursor``: the device's as the store last said it), in one
        transaction: see ``im58d.store.inbox.deliver_txn`` for the results."""

    def inbox_heads(uids: list[int]) -> Deferred[dict[int, tuple[int, int]]]:
        """``{uid: (timeline head, highest device cursor)}``."""

    def inbox(uid: int, after: int, limit: int) -> Deferred[tuple[list[Any], int]]:
        """Timeline entries after a seq, oldest first, and the head (see
        ``im58d.store.inbox.Entry``)."""

    def status(uid: int, msg_ids: list[int]) -> Deferred[list[int]]:
        """The user's sent messages among ``msg_ids`` that were delivered."""

    # devices and sessions (see ``im58d.store.sessions``)
    def sign_in(
        uid: int, device_id: bytes, name: str, client: str | None, session_id: bytes,
        key: bytes, token: str, now: int, max_devices: int, online: bool,
    ) -> Deferred[dict[str, Any]]:
        """A new session for a device; the one it replaced and those evicted."""

    def session(session_id: bytes) -> Deferred[dict[str, Any] | None]:
        """A session's record, or None."""

    def session_by_token(token: str) -> Deferred[dict[str, Any] | None]:
        """The record of the session with this bearer token, or None."""

    def resume(session_id: bytes, nonce: bytes, now: int) -> Deferred[dict[str, Any] | None]:
        """Record a RESUME nonce greater than every earlier one and mark the
        device online: the session's state, or None when refused."""

    def set_offline(session_ids: list[bytes], now: int) -> Deferred[None]:
        """These devices went offline."""

    def online_sessions() -> Deferred[list[dict[str, Any]]]:
        """The records of the sessions whose devices are online, each with
        its user's ``friends`` and ``versions``."""

    def sign_out(
        uid: int, device_id: bytes | None, session_id: bytes | None
    ) -> Deferred[bytes | None]:
        """End a device's session; its id, or None when there is none."""

    def end_sessions(session_ids: list[bytes]) -> Deferred[list[int]]:
        """End these sessions; the uids whose device lists moved."""

    def stale_sessions(unused_since: int) -> Deferred[list[tuple[int, bytes]]]:
        """``(uid, session_id)`` of the sessions of disabled accounts and of
        offline devices unused since then."""

    def devices(uid: int) -> Deferred[tuple[int, list[dict[str, Any]]]]:
        """The device list version and the user's signed-in devices."""

    # client log reports
    report_batches = Attribute("Report batches counted since the store started (an int).")
    report_repeats = Attribute("Report batches refused as repeats since the start (an int).")

    def record_report(
        uid: int, batch_id: str, counts: dict[str, int], now: int
    ) -> Deferred[bool]:
        """Add a batch's ``{key: count}`` to the counters of the UTC day of
        ``now`` and record ``uid`` as a user of each key that day, in one
        transaction; False (nothing counted) for a batch id the user sent
        before."""

    def stats(key: str, days: int, now: int) -> Deferred[list[dict[str, Any]]]:
        """``[{"day", "count", "users"}]`` of a key for each of the last
        ``days`` UTC days up to today, oldest first, zeros where nothing came."""

    def top_keys(days: int, limit: int, now: int) -> Deferred[list[dict[str, Any]]]:
        """``[{"key", "count", "users"}]`` over the last ``days`` days, the
        biggest count first; ``users`` counts each user once in the window."""
