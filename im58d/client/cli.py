"""``im58d-client``: sign in, send and watch messages arrive from a terminal.

Type ``UID text`` to send to a user, ``#GID text`` to send to a group,
``/status`` to ask which sent messages were delivered, ``/quit`` to leave.
The device's session is kept in the state file (mode 0600), never the
password: the password is asked only when there is no session to resume.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import stdio, task
from twisted.internet.defer import Deferred
from twisted.protocols.basic import LineReceiver

from ..wire import packets as P
from . import client as C
from .client import Client, LoginFailed, Message, Outgoing
from .state import FileState

USAGE = "type: UID text | #GID text | /status | /quit"

# on_session_lost's reasons, as the terminal says them
LOST = {
    C.REPLACED: "another client of this device took over (the same state file "
                "in use twice?); this one stops",
    C.EXPIRED: "the session expired; run again to sign in with the password",
    C.DISABLED: "the account is disabled",
    C.SIGNED_OUT: "this device was signed out; run again to sign in with the password",
    C.UNAUTHORIZED: "wrong user or password",
    C.THROTTLED: "too many failed sign-ins; try again later",
    C.RESUME_REFUSED: "the session is gone; run again to sign in with the password",
    C.NO_CREDENTIALS: "no session and no password",
}


class Terminal(LineReceiver):
    delimiter = os.linesep.encode()

    def __init__(self, client: Client, done: Deferred[None]) -> None:
        self.client = client
        self.done = done

    def connectionMade(self) -> None:
        self.say(USAGE)

    def say(self, text: str) -> None:
        if self.transport is None:  # not on the terminal yet
            print(text, flush=True)
            return
        self.transport.write(text.encode("utf-8") + self.delimiter)

    def finish(self) -> None:
        if not self.done.called:
            self.done.callback(None)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return
        if text == "/quit":
            self.client.stop().addBoth(lambda _: self.finish())
            return
        if text == "/status":
            d = self.client.refresh_status()
            d.addCallback(lambda done: self.say(f"{len(done)} newly delivered"))
            d.addErrback(lambda f: self.say(f"status failed: {f.getErrorMessage()}"))
            return
        target, _, body = text.partition(" ")
        kind = P.KIND_GROUP if target.startswith("#") else P.KIND_USER
        if not target.lstrip("#").isdigit() or not body:
            self.say(USAGE)
            return
        outgoing = self.client.send(int(target.lstrip("#")), body, kind)
        self.say(f"-> {target} #{outgoing.cmid} sent")

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.client.stop().addBoth(lambda _: self.finish())


def show_message(terminal: Terminal, message: Message) -> None:
    """A received message, or a copy of one the user sent from another
    device: ``you → UID: text`` (``you → #GID: text`` to a group)."""
    when = time.strftime("%H:%M:%S", time.localtime(message.ts))
    body = message.body if isinstance(message.body, str) else f"<{len(message.body)} bytes>"
    if message.sender == terminal.client.uid:
        where = f"#{message.group}" if message.group is not None else f"{message.to}"
        terminal.say(f"[{when}] you → {where}: {body}")
        return
    where = f"#{message.group} " if message.group is not None else ""
    terminal.say(f"[{when}] {where}{message.sender}: {body}")


def show_status(terminal: Terminal, outgoing: Outgoing) -> None:
    detail = f" ({outgoing.error[0]} {outgoing.error[1]})" if outgoing.error else ""
    terminal.say(f"-> {outgoing.to} #{outgoing.cmid} {outgoing.state}{detail}")


def watch(terminal: Terminal) -> None:
    """Print one line for each thing the client tells the app (a lost
    session: see ``watch_session``)."""
    client = terminal.client
    client.on_message = lambda message: show_message(terminal, message)
    client.on_status = lambda outgoing: show_status(terminal, outgoing)
    client.on_presence = lambda uid, online: terminal.say(
        f"* {uid} is {'online' if online else 'offline'}")
    client.on_online = lambda uids: terminal.say(
        "* online now: " + (", ".join(map(str, uids)) or "none of your friends"))
    client.on_changed = lambda what, version: (
        terminal.say(f"* {'friend requests' if what == 'requests' else what} changed")
        if what in ("requests", "devices") else None)
    client.on_unreachable = lambda detail: terminal.say(
        f"! server unreachable ({detail}); messages wait until it is back")
    client.on_tls_refused = lambda detail: terminal.say(
        f"! TLS refused: the server's certificate is not trusted ({detail}); see --ca-cert")
    client.on_reachable = lambda: terminal.say("! connected again")


def watch_session(terminal: Terminal) -> None:
    """Once signed in: a lost session is said in one line and ends the run."""

    def lost(reason: str) -> None:
        terminal.say(f"! session lost: {LOST.get(reason, reason)}")
        terminal.finish()

    terminal.client.on_session_lost = lost


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="im58d-client", description=__doc__.splitlines()[0])
    p.add_argument("--server", help="access server HOST:PORT (default: chosen from the "
                                    "IP list the HTTP server gives)")
    p.add_argument("--http", default="http://127.0.0.1:8058", help="HTTP base URL")
    p.add_argument("--ca-cert", help="PEM file of the certificate(s) to trust for TLS "
                                     "access servers (default: the system's)")
    p.add_argument("--user", required=True)
    p.add_argument("--password", help="used only to sign the device in when the state "
                                      "has no session (default: $IM58D_PASSWORD, else asked)")
    p.add_argument("--device", "--device-name", dest="device", default="im58d-client",
                   help="the device's name, as the user's device list shows it")
    p.add_argument("--state", help="file keeping the device's id, session, cmids and seqs "
                                   "between runs (default: ~/.im58d-client-USER.json)")
    return p


def state_path(args: argparse.Namespace) -> str:
    return str(args.state or os.path.expanduser(f"~/.im58d-client-{args.user}.json"))


async def _run(reactor: Any, args: argparse.Namespace,
               ask_password: Callable[[], str]) -> None:
    host, port = None, None
    if args.server:
        host, _, number = args.server.rpartition(":")
        port = int(number)
    state = FileState(state_path(args))
    password = args.password or os.environ.get("IM58D_PASSWORD")
    if state.session is None and password is None:
        password = ask_password()
    done: Deferred[None] = Deferred()
    client = Client(reactor, host, port, args.http, args.user, password, args.device, state,
                    ca_cert=args.ca_cert)
    terminal = Terminal(client, done)
    watch(terminal)
    try:
        try:
            await client.start()
        except LoginFailed as e:
            if e.reason != C.RESUME_REFUSED or client.password is not None:
                raise
            # the stored session is gone: sign the device in again
            print("im58d-client: the session is gone; sign in again", file=sys.stderr)
            client.password = args.password or os.environ.get("IM58D_PASSWORD") or ask_password()
            await client.start()
    except LoginFailed as e:
        print(f"im58d-client: cannot sign in: {LOST.get(e.reason, e.reason)} ({e})",
              file=sys.stderr)
        raise SystemExit(1) from None
    watch_session(terminal)
    print(f"signed in as {args.user} (uid {client.uid})")
    stdio.StandardIO(terminal)
    await done
    if client.lost is not None:
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    task.react(lambda reactor: Deferred.fromCoroutine(_run(reactor, args, getpass.getpass)))


if __name__ == "__main__":  # pragma: no cover
    main()
