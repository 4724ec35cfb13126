"""The storage layer's interface and errors.

Every method returns a Deferred that fires on the reactor thread with plain
data; results are delivered in the order the calls were made.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class StoreError(Exception):
    """The store cannot do what was asked (the message says why)."""


class Conflict(StoreError):
    """The thing to create exists already (a user name, a friendship, ...)."""


class NotFound(StoreError):
    """No such user or group."""


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
        name: str, owner: int, members: list[int], now: int
    ) -> Deferred[int]:
        """Create a group owned by ``owner`` with ``members``; fires with its gid."""

    # inbox
    def inbox_max(uid: int) -> Deferred[int]:
        """The highest seq given out in the user's inbox (0 for none)."""

    def session_state(uid: int) -> Deferred[dict[str, Any]]:
        """``{"inbox_max", "friends", "versions"}`` for a session that starts."""

    def friends_of(uid: int) -> Deferred[list[int]]:
        """The uids of the user's friends."""

    def list_versions(uids: list[int]) -> Deferred[dict[int, tuple[int, ...]]]:
        """Each user's (friends, groups, categories) list versions."""

    def deliver(
        messages: list[tuple[int, int, int, str | bytes, int]],
        acks: list[tuple[int, int]],
        now: int,
        friends_only: bool,
    ) -> Deferred[tuple[list[tuple[Any, ...]], list[Any]]]:
        """Store a batch of messages ``(sender, cmid, to, body, kind)`` and
        record a batch of acks ``(uid, seq)``, in one transaction: see
        ``im58d.store.inbox.deliver_txn`` for the results."""

    def inbox(uid: int, after: int, limit: int) -> Deferred[tuple[list[Any], int]]:
        """Inbox entries after a seq, oldest first, and the inbox head."""

    def status(uid: int, msg_ids: list[int]) -> Deferred[list[int]]:
        """The user's sent messages among ``msg_ids`` that were delivered."""
