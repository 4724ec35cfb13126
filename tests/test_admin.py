"""``im58d-admin`` (PROTOCOL.md section 4): users, friendships and groups
written straight into the database, every error one line and exit 1."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import sysconfig
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from im58d import admin
from im58d.logic.passwords import SCRYPT_N, hash_password, verify_password

# scrypt at a tiny cost where a test is about the database, not the hash
CHEAP_N = 16

TABLES = ("users", "inboxes", "list_versions", "friends", "groups", "group_members")


def cheap_hash(password: str) -> str:
    return hash_password(password, n=CHEAP_N)


class AdminTestCase(SynchronousTestCase):
    """Runs ``admin.main`` in-process on a fresh database file."""

    def setUp(self) -> None:
        self.database = self.mktemp()
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        self.patch(admin, "hash_password", cheap_hash)

    def run_admin(self, *argv: str, database: str | None = None) -> tuple[int, str, str]:
        """Exit code, stdout and stderr of ``im58d-admin --database DB argv``."""
        self.stdout.seek(0)
        self.stdout.truncate()
        self.stderr.seek(0)
        self.stderr.truncate()
        prefix = [] if database == "" else ["--database", database or self.database]
        code = admin.main([*prefix, *argv])
        return code, self.stdout.getvalue(), self.stderr.getvalue()

    def ok(self, *argv: str) -> str:
        """Run a command that must succeed silently on stderr; its stdout."""
        code, out, err = self.run_admin(*argv)
        self.assertEqual((code, err), (0, ""), f"{argv}: {err}")
        return out

    def fails(self, *argv: str, database: str | None = None) -> str:
        """Run a command that must fail with exit 1, nothing on stdout and
        one line ``im58d-admin: ...`` on stderr; that line."""
        code, out, err = self.run_admin(*argv, database=database)
        self.assertEqual(code, 1, f"{argv}: {out!r} {err!r}")
        self.assertEqual(out, "")
        self.assertTrue(err.startswith("im58d-admin: "), err)
        self.assertTrue(err.endswith("\n"), err)
        self.assertEqual(err.count("\n"), 1, err)
        return err

    def add_users(self, *names: str) -> list[int]:
        return [int(self.ok("user", "add", name, "--password", "pw")) for name in names]

    def query(self, sql: str, *params: Any, path: str | None = None) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(path or self.database)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the tables the admin commands write."""
        return {t: self.query(f"SELECT * FROM {t} ORDER BY 1, 2") for t in TABLES}

    def list_versions(self, uid: int) -> tuple[int, int]:
        """``(friend_list, group_list)`` of a user."""
        [row] = self.query(
            "SELECT friend_list, group_list FROM list_versions WHERE uid = ?", uid
        )
        return int(row[0]), int(row[1])

    def password_of(self, name: str) -> str:
        [(stored,)] = self.query("SELECT password FROM users WHERE name = ?", name)
        return str(stored)


class UserTests(AdminTestCase):
    def test_add_prints_the_new_uid(self) -> None:
        """``user add`` prints the new uid alone on a line: 1, then 2."""
        self.assertEqual(self.ok("user", "add", "alice", "--password", "pw1"), "1\n")
        self.assertEqual(self.ok("user", "add", "bob", "--password", "pw2"), "2\n")
        self.assertEqual(
            self.query("SELECT id, name, disabled FROM users ORDER BY id"),
            [(1, "alice", 0), (2, "bob", 0)],
        )

    def test_add_creates_inbox_and_list_versions(self) -> None:
        """A new user gets an empty inbox and list versions, like the daemon's."""
        [uid] = self.add_users("alice")
        self.assertEqual(self.query("SELECT max_seq FROM inboxes WHERE uid = ?", uid), [(0,)])
        self.assertEqual(self.list_versions(uid), (1, 1))

    def test_add_existing_name_fails_and_changes_nothing(self) -> None:
        """Adding a name that exists exits 1 with one line naming it, and the
        existing account (its password included) is untouched."""
        self.ok("user", "add", "alice", "--password", "first")
        before = self.dump()
        line = self.fails("user", "add", "alice", "--password", "second")
        self.assertIn("alice", line)
        self.assertEqual(self.dump(), before)
        self.assertTrue(verify_password("first", self.password_of("alice")))

    def test_passwd_changes_the_stored_hash(self) -> None:
        """``user passwd`` replaces the hash: the new password verifies, the
        old one does not; nothing is printed."""
        self.ok("user", "add", "alice", "--password", "old-pw")
        old = self.password_of("alice")
        self.assertEqual(self.ok("user", "passwd", "alice", "--password", "new-pw"), "")
        new = self.password_of("alice")
        self.assertNotEqual(new, old)
        self.assertTrue(verify_password("new-pw", new))
        self.assertFalse(verify_password("old-pw", new))

    def test_passwd_unknown_user(self) -> None:
        """``user passwd`` of a name that does not exist fails with one line
        naming it and creates no user."""
        self.add_users("alice")
        before = self.dump()
        line = self.fails("user", "passwd", "nobody", "--password", "pw")
        self.assertIn("nobody", line)
        self.assertEqual(self.dump(), before)

    def test_disable_enable_and_list(self) -> None:
        """``user list`` prints ``uid<TAB>name`` by uid, with ``<TAB>disabled``
        for disabled users; ``disable``/``enable`` toggle it silently."""
        self.add_users("alice", "bob", "carol")
        self.assertEqual(self.ok("user", "list"), "1\talice\n2\tbob\n3\tcarol\n")
        self.assertEqual(self.ok("user", "disable", "bob"), "")
        self.assertEqual(self.ok("user", "list"), "1\talice\n2\tbob\tdisabled\n3\tcarol\n")
        self.assertEqual(self.query("SELECT disabled FROM users WHERE name = 'bob'"), [(1,)])
        self.assertEqual(self.ok("user", "enable", "bob"), "")
        self.assertEqual(self.ok("user", "list"), "1\talice\n2\tbob\n3\tcarol\n")
        self.assertEqual(self.query("SELECT disabled FROM users WHERE name = 'bob'"), [(0,)])

    def test_disable_twice_is_harmless(self) -> None:
        """Disabling a disabled user (or enabling an enabled one) succeeds."""
        self.add_users("alice")
        self.ok("user", "disable", "alice")
        self.ok("user", "disable", "alice")
        self.ok("user", "enable", "alice")
        self.ok("user", "enable", "alice")
        self.assertEqual(self.ok("user", "list"), "1\talice\n")

    def test_disable_or_enable_unknown_user(self) -> None:
        """``user disable``/``enable`` of an unknown name fail with one line naming it."""
        self.assertIn("ghost", self.fails("user", "disable", "ghost"))
        self.assertIn("ghost", self.fails("user", "enable", "ghost"))

    def test_list_of_no_users(self) -> None:
        """``user list`` on a new database prints nothing and succeeds."""
        self.assertEqual(self.ok("user", "list"), "")

    def test_name_with_spaces_or_control_characters_refused(self) -> None:
        """A user name with whitespace or control characters, an empty name
        or one longer than 64 characters is refused and nothing is written."""
        for name in ["al ice", "tab\there", "bell\x07", "", "x" * 65]:
            self.fails("user", "add", name, "--password", "pw")
        self.assertEqual(self.query("SELECT count(*) FROM users"), [(0,)])
        self.assertEqual(self.ok("user", "add", "x" * 64, "--password", "pw"), "1\n")

    def test_empty_password_refused(self) -> None:
        """An empty password is refused, for ``add`` and for ``passwd``,
        before the database is touched."""
        self.fails("user", "add", "alice", "--password", "")
        self.assertFalse(os.path.exists(self.database))
        self.add_users("bob")
        stored = self.password_of("bob")
        self.fails("user", "passwd", "bob", "--password", "")
        self.assertEqual(self.password_of("bob"), stored)


class RealHashTests(AdminTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.patch(admin, "hash_password", hash_password)

    def test_arguments_that_are_not_utf8(self) -> None:
        """A password or name that is not valid UTF-8 (as a shell passes bytes)
        is one line, not a traceback."""
        line = self.fails("user", "add", "bob", "--password", "\udcff")
        self.assertIn("UTF-8", line)
        line = self.fails("user", "add", "b\udcffb", "--password", "pw")
        self.assertIn("UTF-8", line)

    def test_stored_password_is_never_plain(self) -> None:
        """The password column holds a full-cost scrypt hash, never the
        password itself, and the password verifies against it."""
        password = "correct horse battery staple"
        self.ok("user", "add", "alice", "--password", password)
        stored = self.password_of("alice")
        self.assertTrue(stored.startswith(f"scrypt${SCRYPT_N}$"), stored)
        self.assertNotIn(password, stored)
        self.assertTrue(verify_password(password, stored))


class FriendTests(AdminTestCase):
    def test_friend_add_both_ways_and_bumps_versions(self) -> None:
        """``friend add A B`` stores the friendship both ways and bumps both
        users' friend-list version by one (and no one else's)."""
        alice, bob, carol = self.add_users("alice", "bob", "carol")
        before = {uid: self.list_versions(uid) for uid in (alice, bob, carol)}
        self.assertEqual(self.ok("friend", "add", "alice", "bob"), "")
        self.assertEqual(
            self.query("SELECT uid, friend FROM friends ORDER BY uid"),
            [(alice, bob), (bob, alice)],
        )
        for uid in (alice, bob):
            friend_list, group_list = before[uid]
            self.assertEqual(self.list_versions(uid), (friend_list + 1, group_list))
        self.assertEqual(self.list_versions(carol), before[carol])

    def test_friend_add_twice_fails_cleanly(self) -> None:
        """Making the same pair friends again, in either order, fails with one
        line and changes nothing (versions included)."""
        self.add_users("alice", "bob")
        self.ok("friend", "add", "alice", "bob")
        before = self.dump()
        self.fails("friend", "add", "alice", "bob")
        self.fails("friend", "add", "bob", "alice")
        self.assertEqual(self.dump(), before)

    def test_friend_add_unknown_user(self) -> None:
        """A friendship with an unknown user fails naming it, writing nothing."""
        self.add_users("alice")
        before = self.dump()
        self.assertIn("ghost", self.fails("friend", "add", "alice", "ghost"))
        self.assertIn("ghost", self.fails("friend", "add", "ghost", "alice"))
        self.assertEqual(self.dump(), before)

    def test_friend_with_oneself(self) -> None:
        """A user cannot befriend themselves."""
        self.add_users("alice")
        before = self.dump()
        self.fails("friend", "add", "alice", "alice")
        self.assertEqual(self.dump(), before)


class GroupTests(AdminTestCase):
    def test_group_create(self) -> None:
        """``group create`` prints the new gid; the owner and each distinct
        member become members once; each member's group-list version grows
        by one, a non-member's does not."""
        alice, bob, carol, dave = self.add_users("alice", "bob", "carol", "dave")
        before = {uid: self.list_versions(uid) for uid in (alice, bob, carol, dave)}
        out = self.ok(
            "group", "create", "team", "--owner", "alice",
            "--member", "bob", "--member", "carol", "--member", "bob", "--member", "alice",
        )
        self.assertEqual(out, "1\n")
        self.assertEqual(self.query("SELECT id, name, owner FROM groups"), [(1, "team", alice)])
        self.assertEqual(
            self.query("SELECT gid, uid FROM group_members ORDER BY uid"),
            [(1, alice), (1, bob), (1, carol)],
        )
        for uid in (alice, bob, carol):
            friend_list, group_list = before[uid]
            self.assertEqual(self.list_versions(uid), (friend_list, group_list + 1))
        self.assertEqual(self.list_versions(dave), before[dave])

    def test_second_group_and_owner_only(self) -> None:
        """Group ids count up; a group may have its owner alone."""
        [alice] = self.add_users("alice")
        self.assertEqual(self.ok("group", "create", "one", "--owner", "alice"), "1\n")
        self.assertEqual(self.ok("group", "create", "two", "--owner", "alice"), "2\n")
        self.assertEqual(
            self.query("SELECT gid, uid FROM group_members ORDER BY gid"),
            [(1, alice), (2, alice)],
        )

    def test_unknown_owner(self) -> None:
        """An unknown owner fails with one line naming it; nothing is written."""
        self.add_users("alice")
        before = self.dump()
        line = self.fails("group", "create", "team", "--owner", "ghost", "--member", "alice")
        self.assertIn("ghost", line)
        self.assertEqual(self.dump(), before)

    def test_unknown_member(self) -> None:
        """An unknown member (even after valid ones) fails naming it; no
        group, membership or version change is written."""
        self.add_users("alice", "bob")
        before = self.dump()
        line = self.fails(
            "group", "create", "team", "--owner", "alice", "--member", "bob", "--member", "ghost"
        )
        self.assertIn("ghost", line)
        self.assertEqual(self.dump(), before)

    def test_group_size_limit(self) -> None:
        """A group over ``[groups] max_members`` (owner included) is refused
        with one line; nothing is written."""
        self.add_users("alice", "bob", "carol")
        config = str(self.mktemp()) + ".ini"
        with open(config, "w") as f:
            f.write("[groups]\nmax_members = 2\n")
        before = self.dump()
        line = self.fails("--config", config, "group", "create", "team", "--owner", "alice",
                          "--member", "bob", "--member", "carol")
        self.assertIn("at most 2 members", line)
        self.assertEqual(self.dump(), before)
        self.assertEqual(self.ok("--config", config, "group", "create", "pair", "--owner",
                                 "alice", "--member", "bob"), "1\n")

    def test_empty_group_name(self) -> None:
        """A blank group name is refused."""
        self.add_users("alice")
        before = self.dump()
        self.fails("group", "create", "  ", "--owner", "alice")
        self.assertEqual(self.dump(), before)


class ConfigAndDatabaseTests(AdminTestCase):
    def write_config(self, text: str) -> str:
        path = str(self.mktemp()) + ".ini"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_config_database_is_used(self) -> None:
        """With ``--config`` and no ``--database`` the file's ``[store]
        database`` is the database written."""
        database = os.path.abspath(self.mktemp())
        config = self.write_config(f"[store]\ndatabase = {database}\n")
        code, out, err = self.run_admin(
            "--config", config, "user", "add", "alice", "--password", "pw", database=""
        )
        self.assertEqual((code, out, err), (0, "1\n", ""))
        self.assertEqual(self.query("SELECT name FROM users", path=database), [("alice",)])

    def test_database_option_replaces_config_database(self) -> None:
        """``--database`` wins over the config file's ``[store] database``."""
        from_config = os.path.abspath(self.mktemp())
        config = self.write_config(f"[store]\ndatabase = {from_config}\n")
        self.assertEqual(
            self.ok("--config", config, "user", "add", "alice", "--password", "pw"), "1\n"
        )
        self.assertEqual(self.query("SELECT name FROM users"), [("alice",)])
        self.assertFalse(os.path.exists(from_config))

    def test_bad_config_file(self) -> None:
        """A config file with a bad key exits 1 with one line naming the key
        and the file, before touching any database."""
        config = self.write_config("[store]\ndatabase = x.sqlite\ncolour = blue\n")
        line = self.fails("--config", config, "user", "list", database="")
        self.assertIn("[store] colour", line)
        self.assertIn(config, line)
        self.assertFalse(os.path.exists(self.database))

    def test_missing_config_file(self) -> None:
        """A config file that cannot be read exits 1 with one line naming it."""
        config = self.mktemp()
        self.assertIn(config, self.fails("--config", config, "user", "list"))

    def test_unusable_database(self) -> None:
        """A database in a directory that does not exist exits 1 with one line."""
        path = os.path.join(self.mktemp(), "im58d.sqlite")
        self.assertIn(path, self.fails("user", "list", database=path))

    def test_newer_schema_refused(self) -> None:
        """A database from a newer im58d is refused with one line, untouched."""
        conn = sqlite3.connect(self.database)
        conn.execute("PRAGMA user_version = 999")
        conn.close()
        os.chmod(self.database, 0o600)
        self.assertIn("999", self.fails("user", "list"))
        self.assertEqual(self.query("PRAGMA user_version"), [(999,)])

    def test_new_database_is_private(self) -> None:
        """The database file im58d-admin creates can be read and written by
        its owner only (it holds session keys)."""
        self.add_users("alice")
        self.assertEqual(stat.S_IMODE(os.stat(self.database).st_mode), 0o600)

    def test_readable_database_refused(self) -> None:
        """A database file that group or others may read or write is refused
        with one line naming the file and the remedy, and left as it is."""
        self.add_users("alice")
        before = self.dump()
        for mode in (0o644, 0o660, 0o602):
            os.chmod(self.database, mode)
            line = self.fails("user", "add", "bob", "--password", "pw")
            self.assertIn(self.database, line)
            self.assertIn(f"chmod 600 {self.database}", line)
            self.assertEqual(stat.S_IMODE(os.stat(self.database).st_mode), mode)
        os.chmod(self.database, 0o600)
        self.assertEqual(self.dump(), before)
        self.add_users("bob")


def installed_script() -> str | None:
    """The ``im58d-admin`` console script beside this Python, or on PATH."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "im58d-admin")
    if os.path.exists(candidate):
        return candidate
    return shutil.which("im58d-admin")


class ConsoleScriptTests(SynchronousTestCase):
    def test_console_script(self) -> None:
        """The installed ``im58d-admin`` entry point runs: it prints the new
        uid and exits 0, then refuses the same name with exit 1 and one line."""
        script = installed_script()
        self.assertIsNotNone(script, "im58d-admin is not installed")
        assert script is not None
        database = os.path.abspath(self.mktemp())
        argv = [script, "--database", database, "user", "add", "alice", "--password", "pw"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "1\n", ""))
        again = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        self.assertEqual(again.returncode, 1)
        self.assertEqual(again.stdout, "")
        self.assertTrue(again.stderr.startswith("im58d-admin: "), again.stderr)
        self.assertEqual(again.stderr.count("\n"), 1, again.stderr)
