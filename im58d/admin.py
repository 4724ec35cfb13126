"""``im58d-admin``: set up accounts, friendships and groups in the database.

It reads the daemon's config file for the database path and works on the
database directly (it may run beside the daemon: SQLite serialises the
writers).  Every error is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sqlite3
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import sqlite_utils
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .config import Config, ConfigError, load_config
from .logic.auth import MAX_NAME_CHARS
from .logic.passwords import PasswordError, check_password, hash_password
from .store.accounts import (
    add_user_txn,
    create_group_txn,
    list_users_txn,
    make_friends_txn,
    set_disabled_txn,
    set_password_txn,
    uid_for_name_txn,
)
from .store.interfaces import NotFound, StoreError
from .store.sqlite import open_database


class AdminError(Exception):
    """What went wrong, in one line."""


def check_name(name: str) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise AdminError("names and passwords must be valid UTF-8") from None
    if not 0 < len(name) <= MAX_NAME_CHARS:
        raise AdminError(f"a user name has 1 to {MAX_NAME_CHARS} characters")
    if any(ch.isspace() or unicodedata.category(ch)[0] == "C" for ch in name):
        raise AdminError(f"user name {name!r} has spaces or control characters")
    return name


def _hash(password: str) -> str:
    try:
        check_password(password)
    except PasswordError as e:
        raise AdminError(str(e)) from None
    return hash_password(password)


def _uid(db: sqlite_utils.Database, name: str) -> int:
    uid = uid_for_name_txn(db, name)
    if uid is None:
        raise NotFound(f"no such user {name!r}")
    return uid


def user_add(db: sqlite_utils.Database, args: argparse.Namespace) -> str:
    return str(add_user_txn(db, check_name(args.name), args.password_hash, int(time.time())))


def user_passwd(db: sqlite_utils.Database, args: argparse.Namespace) -> str:
    set_password_txn(db, args.name, args.password_hash)
    return ""


def user_disable(db: sqlite_utils.Database, args: argparse.Namespace) -> str:
    set_disabled_txn(db, args.name, True)
    return ""


def user_enable(db: sqlite_utils.Database, args: argparse.Namespace) -> str:
    set_disabled_txn(db, args.name, False)
    return ""


def user_list(db: sqlite_utils.Database, args: argparse.Namespace) -> str:
    return "\n".join(
        f"{user['id']}\t{user['name']}" + ("\tdisabled" if user["disabled"] else "")
        for user in list_users_txn(db)
    )


def friend_add(db: sqlite_utils.Database, args: argparse.Namespace) -> str:
    make_friends_txn(db, _uid(db, args.name1), _uid(db, args.name2), int(time.time()))
    return ""


def group_create(db: sqlite_utils.Database, args: argparse.Namespace) -> str:
    if not args.name.strip():
        raise AdminError("a group name must not be empty")
    owner = _uid(db, args.owner)
    members = [_uid(db, name) for name in args.member]
    return str(
        create_group_txn(db, args.name, owner, members, int(time.time()), limit=args.max_members)
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Usage errors in one line too."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def make_certificate(hosts: list[str], days: int) -> tuple[bytes, bytes]:
    """A self-signed certificate for ``hosts`` (names or addresses) and its
    key, both PEM.  It is its own CA, so a client can trust it directly."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def cert(args: argparse.Namespace) -> str:
    if args.days < 1:
        raise AdminError("--days must be at least 1")
    key_pem, cert_pem = make_certificate(args.host, args.days)
    os.makedirs(args.out, exist_ok=True)
    key_path = os.path.join(args.out, "key.pem")
    cert_path = os.path.join(args.out, "cert.pem")
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
    except OSError as e:
        raise AdminError(f"cannot write the certificate: {e}") from None
    return (
        f"wrote {key_path} and {cert_path}; listen with\n"
        f"  ssl:5859:privateKey={key_path}:certKey={cert_path}"
    )


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="im58d-admin", description="Manage the users and groups of an im58d server."
    )
    top.add_argument("--config", "-c", help="the daemon's INI config file")
    top.add_argument("--database", "-d", help="SQLite database (replaces [store] database)")
    objects = top.add_subparsers(
        dest="object", required=True, metavar="{user,friend,group,cert}", parser_class=_Parser
    )

    user = objects.add_parser("user", help="add, change, disable, enable and list users")
    verbs = user.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    add = verbs.add_parser("add", help="add a user; prints the new uid")
    add.add_argument("name")
    add.add_argument("--password", required=True)
    add.set_defaults(run=user_add)
    passwd = verbs.add_parser("passwd", help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password", required=True)
    passwd.set_defaults(run=user_passwd)
    for verb, run in (("disable", user_disable), ("enable", user_enable)):
        command = verbs.add_parser(verb, help=f"{verb} a user's logins")
        command.add_argument("name")
        command.set_defaults(run=run)
    verbs.add_parser("list", help="list users: uid, name, disabled").set_defaults(run=user_list)

    friend = objects.add_parser("friend", help="make two users friends")
    verbs = friend.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    add = verbs.add_parser("add", help="make NAME1 and NAME2 friends")
    add.add_argument("name1")
    add.add_argument("name2")
    add.set_defaults(run=friend_add)

    group = objects.add_parser("group", help="create groups")
    verbs = group.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    create = verbs.add_parser("create", help="create a group; prints the new gid")
    create.add_argument("name")
    create.add_argument("--owner", required=True)
    create.add_argument("--member", action="append", default=[])
    create.set_defaults(run=group_create)

    tls = objects.add_parser("cert", help="make a self-signed TLS certificate for trials")
    tls.add_argument("--host", action="append", required=True,
                     help="a name or address clients connect to (repeatable)")
    tls.add_argument("--out", default=".", help="folder for key.pem and cert.pem")
    tls.add_argument("--days", type=int, default=365)
    tls.set_defaults(run=None, offline=cert)
    return top


def run_in_transaction(
    db: sqlite_utils.Database, command: Callable[[sqlite_utils.Database, Any], str], args: Any
) -> str:
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        output = command(db, args)
    except BaseException:
        db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.run is None:  # needs no database
        try:
            print(args.offline(args))
        except AdminError as e:
            print(f"im58d-admin: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        config = load_config(args.config) if args.config else Config()
        path = args.database or config.database
        args.max_members = config.max_members
        if getattr(args, "password", None) is not None:
            # scrypt takes ~80 ms: not while holding the write lock that the
            # daemon's message commits wait for
            args.password_hash = _hash(args.password)
        db = open_database(path, config.synchronous)
        try:
            output = run_in_transaction(db, args.run, args)
        finally:
            db.conn.close()
    except (AdminError, ConfigError, StoreError) as e:
        print(f"im58d-admin: {e}", file=sys.stderr)
        return 1
    except sqlite3.Error as e:
        print(f"im58d-admin: database {path}: {e}", file=sys.stderr)
        return 1
    except UnicodeError:
        print("im58d-admin: names and passwords must be valid UTF-8", file=sys.stderr)
        return 1
    if output:
        print(output)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
