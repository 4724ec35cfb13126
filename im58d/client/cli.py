"""``im58d-client``: log in, send and watch messages arrive from a terminal.

Type ``UID text`` to send to a user, ``#GID text`` to send to a group,
``/status`` to ask which sent messages were delivered, ``/quit`` to leave.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet import stdio, task
from twisted.internet.defer import Deferred
from twisted.protocols.basic import LineReceiver

from ..wire import packets as P
from .client import Client, LoginFailed, Message, Outgoing
from .state import FileState


class Terminal(LineReceiver):
    delimiter = os.linesep.encode()

    def __init__(self, client: Client, done: Deferred[None]) -> None:
        self.client = client
        self.done = done

    def connectionMade(self) -> None:
        self.say("type: UID text | #GID text | /status | /quit")

    def say(self, text: str) -> None:
        self.transport.write(text.encode("utf-8") + self.delimiter)  # type: ignore[union-attr]

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return
        if text == "/quit":
            self.client.stop().addBoth(lambda _: self.done.callback(None))
            return
        if text == "/status":
            d = self.client.refresh_status()
            d.addCallback(lambda done: self.say(f"{len(done)} newly delivered"))
            d.addErrback(lambda f: self.say(f"status failed: {f.getErrorMessage()}"))
            return
        target, _, body = text.partition(" ")
        kind = P.KIND_GROUP if target.startswith("#") else P.KIND_USER
        if not target.lstrip("#").isdigit() or not body:
            self.say("type: UID text | #GID text | /status | /quit")
            return
        outgoing = self.client.send(int(target.lstrip("#")), body, kind)
        self.say(f"-> {target} #{outgoing.cmid} sent")

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.client.stop().addBoth(lambda _: self.done.callback(None))


def show_message(terminal: Terminal, message: Message) -> None:
    when = time.strftime("%H:%M:%S", time.localtime(message.ts))
    where = f"#{message.group} " if message.group is not None else ""
    body = message.body if isinstance(message.body, str) else f"<{len(message.body)} bytes>"
    terminal.say(f"[{when}] {where}{message.sender}: {body}")


def show_status(terminal: Terminal, outgoing: Outgoing) -> None:
    detail = f" ({outgoing.error[0]} {outgoing.error[1]})" if outgoing.error else ""
    terminal.say(f"-> {outgoing.to} #{outgoing.cmid} {outgoing.state}{detail}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="im58d-client", description=__doc__.splitlines()[0])
    p.add_argument("--server", help="access server HOST:PORT (default: chosen from the "
                                    "IP list the HTTP server gives)")
    p.add_argument("--http", default="http://127.0.0.1:8058", help="HTTP base URL")
    p.add_argument("--ca-cert", help="PEM file of the certificate(s) to trust for TLS "
                                     "access servers (default: the system's)")
    p.add_argument("--user", required=True)
    p.add_argument("--password", help="default: $IM58D_PASSWORD, else asked")
    p.add_argument("--device", default="im58d-client")
    p.add_argument("--state", help="file keeping cmids and seqs between runs "
                                   "(default: ~/.im58d-client-USER.json)")
    return p


async def _run(reactor: Any, args: argparse.Namespace, password: str) -> None:
    host, port = None, None
    if args.server:
        host, _, number = args.server.rpartition(":")
        port = int(number)
    state = FileState(args.state or os.path.expanduser(f"~/.im58d-client-{args.user}.json"))
    done: Deferred[None] = Deferred()
    client = Client(reactor, host, port, args.http, args.user, password, args.device, state,
                    ca_cert=args.ca_cert)
    terminal = Terminal(client, done)
    client.on_message = lambda message: show_message(terminal, message)
    client.on_status = lambda outgoing: show_status(terminal, outgoing)
    client.on_presence = lambda uid, online: terminal.say(
        f"* {uid} is {'online' if online else 'offline'}")
    try:
        await client.start()
    except LoginFailed as e:
        print(f"im58d-client: login refused: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"logged in as {args.user} (uid {client.uid})")
    stdio.StandardIO(terminal)
    await done


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    password = args.password or os.environ.get("IM58D_PASSWORD") or getpass.getpass()
    task.react(lambda reactor: Deferred.fromCoroutine(_run(reactor, args, password)))


if __name__ == "__main__":  # pragma: no cover
    main()
