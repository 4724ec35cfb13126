"""The command line of ``im58d-bench``."""

from __future__ import annotations

import argparse
import json
import resource
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, task

from . import __doc__ as _doc
from .connect import connect_mode
from .load import cluster, compare, load_mode
from .report import report_mode
from .restart import restart_mode
from .sync import sync_mode

MODES = ["all", "bytes", "full", "paced", "idle", "restart", "connect", "sync", "report",
         "cluster", "compare"]
# what ``all`` runs, in this order
ALL = ["bytes", "full", "paced", "idle", "restart", "connect", "sync", "report"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="im58d-bench", description=(_doc or "").splitlines()[0])
    p.add_argument("--mode", action="append", choices=MODES,
                   help="what to run (repeatable); all: " + ", ".join(ALL) +
                        " (cluster and compare are not part of all)")
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--window", type=int, default=16, help="messages in flight per sender")
    p.add_argument("--rate", type=float, default=2000.0, help="paced messages per second")
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--idle", type=int, default=5000, help="connections in idle mode")
    p.add_argument("--devices", type=int, default=2000, help="devices in restart mode")
    p.add_argument("--restart-timeout", type=float, default=60.0,
                   help="restart mode: seconds to wait for every device to be back")
    p.add_argument("--repeat", type=int, default=20,
                   help="logins and resumes per transport in connect mode")
    p.add_argument("--friends", type=int, default=500, help="friends of the user in sync mode")
    p.add_argument("--categories", type=int, default=5, help="their categories in sync mode")
    p.add_argument("--groups", type=int, default=50, help="the user's groups in sync mode")
    p.add_argument("--events", type=int, default=1000, help="click events in report mode")
    p.add_argument("--coalesce-acks", action="store_true",
                   help="ack once per read instead of once per MSG_N")
    p.add_argument("--no-uvloop", action="store_true",
                   help="the generator on asyncio's own loop even when uvloop is installed")
    p.add_argument("--rounds", type=int, default=3, help="compare: rounds of both daemons")
    p.add_argument("--baseline-code", help="compare: the directory of the other im58d tree")
    p.add_argument("--baseline-gen", help="compare: the generator file that speaks the "
                                          "other tree's wire (a copy of bench/loadgen.py)")
    p.add_argument("--baseline-label", default="v1", help="compare: the other tree's name")
    p.add_argument("--label", default="v2", help="compare: this tree's name")
    p.add_argument("--target", help="HOST:PORT of a running daemon whose database has the "
                                    "users bench0.. with password 'bench' (bytes, full, paced, "
                                    "idle)")
    p.add_argument("--server-pid", type=int, help="with --target: the daemon's pid, for CPU")
    p.add_argument("--keep", action="store_true", help="keep the bench daemon's directory")
    p.add_argument("--daemon-config", help="config file for the bench's own daemon "
                                           "(its database and listeners are the bench's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def modes_of(args: argparse.Namespace) -> list[str]:
    """The modes asked for, in the order of ``all``."""
    asked = args.mode or ["all"]
    modes: list[str] = []
    for mode in asked:
        for m in ALL if mode == "all" else [mode]:
            if m not in modes:
                modes.append(m)
    return modes


async def run(reactor: Any, args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: dict[str, Any] = {}
    modes = modes_of(args)

    def report(name: str, value: dict[str, Any]) -> None:
        results[name] = value
        if not args.json:
            print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in value.items()), flush=True)

    own = {"connect", "sync", "report", "cluster", "compare", "restart"}
    if args.target and own & set(modes):
        raise SystemExit(f"im58d-bench: {', '.join(sorted(own & set(modes)))} run on "
                         "daemons of the bench's own, not with --target")
    load_mode(args, report, [m for m in modes if m in ("bytes", "full", "paced", "idle")])
    failed = False
    if "restart" in modes:
        restart = restart_mode(args, report)
        failed = bool(restart["logins_needed"] or restart["not_back"])
    if "connect" in modes:
        for name, cost in connect_mode(args.repeat, args.keep, args.daemon_config).items():
            report(name, cost)
    if "sync" in modes:
        costs = await sync_mode(reactor, args.keep, args.daemon_config, args.friends,
                                args.categories, args.groups)
        for name, cost in costs.items():
            report(name, cost)
    if "report" in modes:
        for name, cost in (await report_mode(reactor, args.keep, args.daemon_config,
                                             args.events)).items():
            report(name, cost)
    if "cluster" in modes:
        cluster(args, report)
    if "compare" in modes:
        compare(args, report)
    if args.json:
        print(json.dumps(results))
    if failed:
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))
