"""The message path under load: ``im58d-bench`` starts the daemon(s) and
runs the lean load generator (``loadgen.py``) in a process of its own.

- ``generate``: one run of a generator file against a daemon, its JSON lines;
- ``load_mode``: the bytes of "你好", full load and paced (and idle memory);
- ``cluster``: one node against two nodes through Redis;
- ``compare``: this daemon against the daemon of another tree, each under
  its own copy of the generator, in alternating runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .common import CODE, Daemon, Redis

LOADGEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loadgen.py")

Report = Callable[[str, dict[str, Any]], None]


def generator_args(args: argparse.Namespace, port: int, pids: Sequence[int],
                   phases: str, *more: str) -> list[str]:
    """The generator's command line for ``phases`` from the bench's options."""
    argv = ["--port", str(port), "--phases", phases,
            "--pairs", str(args.pairs), "--window", str(args.window),
            "--rate", str(args.rate), "--warmup", str(args.warmup),
            "--duration", str(args.duration), "--idle", str(args.idle),
            "--devices", str(args.devices)]
    for pid in pids:
        argv += ["--pid", str(pid)]
    if args.coalesce_acks:
        argv.append("--coalesce-acks")
    if args.no_uvloop:
        argv += ["--loop", "asyncio"]
    return argv + list(more)


@contextlib.contextmanager
def spawn(argv: Sequence[str], gen: str = LOADGEN, stdin: bool = False
          ) -> Iterator[subprocess.Popen[str]]:
    """The generator ``gen`` (a copy of ``loadgen.py``) running with
    ``argv``, its stdout a pipe of JSON lines."""
    # -P: the generator's own directory is not put on sys.path
    process = subprocess.Popen(
        [sys.executable, "-P", gen, *argv], stdout=subprocess.PIPE, text=True,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()
        if process.stdin is not None:
            process.stdin.close()


def read_line(process: subprocess.Popen[str]) -> dict[str, Any] | None:
    """The generator's next JSON object; None when it has ended (an error
    ends the bench)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        if process.wait() != 0:
            raise SystemExit(f"im58d-bench: the load generator failed ({process.returncode})")
        return None
    result: dict[str, Any] = json.loads(line)
    return result


def generate(argv: Sequence[str], gen: str = LOADGEN) -> dict[str, dict[str, Any]]:
    """Run the generator to its end: its results by name."""
    results = {}
    with spawn(argv, gen) as process:
        while (result := read_line(process)) is not None:
            results[result.pop("name")] = result
    return results


def load_mode(args: argparse.Namespace, report: Report, phases: Sequence[str]) -> None:
    """``phases`` of bytes, full, paced on one daemon (or ``--target``), in
    the generator's process; then idle on a daemon of its own."""
    pair_phases = [p for p in ("bytes", "full", "paced") if p in phases]
    if pair_phases:
        with _daemon(args, 2 * args.pairs) as (port, pids):
            for name, result in generate(
                    generator_args(args, port, pids, ",".join(pair_phases))).items():
                report(name, result)
    if "idle" in phases:
        with _daemon(args, args.idle) as (port, pids):
            if not pids:
                raise SystemExit("im58d-bench: idle mode needs --server-pid with --target")
            for name, result in generate(generator_args(args, port, pids, "idle")).items():
                report(name, result)


@contextlib.contextmanager
def _daemon(args: argparse.Namespace, users: int) -> Iterator[tuple[int, list[int]]]:
    """The port and pid of ``--target`` or of a daemon of the bench's own."""
    if args.target:
        yield int(args.target.rpartition(":")[2]), [args.server_pid] if args.server_pid else []
        return
    daemon = Daemon(users, args.keep, args.daemon_config)
    try:
        yield daemon.port, [daemon.pid]
    finally:
        daemon.close()


# -- cluster mode: two nodes through Redis -------------------------------------

# what in a node's output means something went wrong inside it
_TROUBLE = (b"Traceback", b"Unhandled", b"Error", b"failed", b"unreachable")
# counters of a node, for the check after a cluster run
_COUNTERS = {
    "stored": "im58d_messages_stored_total",
    "pushed": "im58d_messages_out_total",
    "commits": "im58d_commits_total",
    "retransmits": "im58d_retransmits_total",
    "dedup_hits": "im58d_dedup_hits_total",
    "caught_up": "im58d_caught_up_total",
    "published": "im58d_redis_published_total",
    "received": "im58d_redis_received_total",
    "outages": "im58d_redis_outages_total",
}


def wait_joined(nodes: Sequence[Daemon], timeout: float = 30.0) -> None:
    """Until every node has joined through Redis (``im58d_redis_up 1``)."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            try:
                if node.metrics().get("im58d_redis_up") == 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"im58d-bench: a node did not join through Redis; "
                                 f"see {node.log.name}")
            time.sleep(0.05)


def _cluster_runs(args: argparse.Namespace, report: Report, name: str,
                  nodes: Sequence[Daemon], redis_pid: int | None) -> None:
    """The full and the paced load, then what is left in flight and the
    nodes' counters.  Suspect lines in a node's output are told, and its
    directory is kept."""
    more = ["--drain", "2"]
    if len(nodes) > 1:
        more += ["--port2", str(nodes[1].port)]
    if redis_pid:
        more += ["--redis-pid", str(redis_pid)]
    results = generate(generator_args(args, nodes[0].port, [n.pid for n in nodes],
                                      "full,paced", *more))
    check: dict[str, Any] = {}
    for label, result in results.items():
        report(f"{name}_{label.replace('_load', '')}", result)
        check["in_flight_left"] = check.get("in_flight_left", 0) + result["in_flight_left"]
        check["msg_n_missing"] = result["msg_n_missing"]
    counters = [node.metrics() for node in nodes]
    for key, metric in _COUNTERS.items():
        if metric in counters[0]:
            check[key] = [int(c[metric]) for c in counters]
    report(f"{name}_check", check)
    for node in nodes:
        trouble = [line for line in node.output().splitlines()
                   if any(word in line for word in _TROUBLE)]
        if trouble:
            print(f"im58d-bench: {len(trouble)} suspect lines in {node.log.name} "
                  f"(kept), the first: {trouble[0].decode(errors='replace')}",
                  file=sys.stderr)
            node.keep = True


def cluster(args: argparse.Namespace, report: Report) -> None:
    """The full and paced loads on one node (local routing), then on two
    nodes behind a ``redis-server`` of the bench's own, sharing one
    database, each pair split between the nodes (half the senders on each)
    so that every MSG_N and every ACK_N crosses through Redis."""
    users = 2 * args.pairs
    with contextlib.ExitStack() as stack:
        redis = Redis(args.keep)
        stack.callback(redis.close)
        daemon = Daemon(users, args.keep, args.daemon_config)
        try:
            _cluster_runs(args, report, "cluster_one_node", [daemon], None)
        finally:
            daemon.close()
        config = redis.node_config(args.daemon_config)
        first = Daemon(users, args.keep, config)
        stack.callback(first.close)
        second = Daemon(0, args.keep, config, database=first.database)
        stack.callback(second.close)  # closed first: the database is first's
        wait_joined((first, second))
        _cluster_runs(args, report, "cluster_two_nodes", [first, second], redis.pid)


# -- compare: this daemon against another tree's -------------------------------

# (phase, figure) pairs summed up by compare, and how each is judged
_FIGURES = [
    ("full_load", "delivered_per_s"),
    ("full_load", "daemon_cpu_us_per_msg"),
    ("full_load", "p99_ms"),
    ("full_load", "gen_cpu_us_per_msg"),
    ("full_load", "bytes_per_msg"),
    ("paced", "daemon_cpu_us_per_msg"),
    ("paced", "p99_ms"),
    ("paced", "gen_cpu_us_per_msg"),
    ("six_packets_nihao", "bytes"),
]


def compare(args: argparse.Namespace, report: Report) -> None:
    """``--rounds`` rounds; in each, the baseline (the daemon of
    ``--baseline-code`` under the generator ``--baseline-gen``) and this
    daemon under this generator, each on a fresh database of its own code:
    the bytes of "你好", full load, paced.  The order alternates (ABBA) so
    that a drift of the machine falls on both.  Then the medians, this
    daemon's over the baseline's, and the targets."""
    if not args.baseline_code or not args.baseline_gen:
        raise SystemExit("im58d-bench: compare needs --baseline-code and --baseline-gen")
    versions = {
        args.baseline_label: (os.path.abspath(args.baseline_code),
                              os.path.abspath(args.baseline_gen)),
        args.label: (CODE, LOADGEN),
    }
    labels = list(versions)
    runs: dict[str, list[dict[str, dict[str, Any]]]] = {label: [] for label in labels}
    for n in range(args.rounds):
        for label in labels if n % 2 == 0 else labels[::-1]:
            code, gen = versions[label]
            daemon = Daemon(2 * args.pairs, args.keep, args.daemon_config, code=code)
            try:
                results = generate(generator_args(args, daemon.port, [daemon.pid],
                                                  "bytes,full,paced"), gen)
            finally:
                daemon.close()
            results["paced"] = results.pop(f"paced_{int(args.rate)}")
            runs[label].append(results)
            for phase, result in results.items():
                if phase == "six_packets_nihao":
                    result = {k: v for k, v in result.items() if not k.endswith("hex")}
                report(f"{label}_round{n + 1}_{phase}", result)
    summary: dict[str, Any] = {}
    for phase, figure in _FIGURES:
        medians = [statistics.median(r[phase][figure] for r in runs[label]) for label in labels]
        summary[f"{phase}.{figure}"] = {
            **dict(zip(labels, medians, strict=True)),
            "ratio": round(medians[1] / medians[0], 3) if medians[0] else None}
    for key, value in summary.items():
        report(f"median {key}", value)
    this = labels[1]
    targets = [
        ("daemon CPU/msg at full load, ratio <= 1.15",
         summary["full_load.daemon_cpu_us_per_msg"]["ratio"], lambda v: v <= 1.15),
        ("daemon CPU/msg paced, ratio <= 1.15",
         summary["paced.daemon_cpu_us_per_msg"]["ratio"], lambda v: v <= 1.15),
        ("delivered/s at full load, ratio >= 0.85",
         summary["full_load.delivered_per_s"]["ratio"], lambda v: v >= 0.85),
        ("p99 MSG_R->MSG_N at full load, ms <= 30",
         summary["full_load.p99_ms"][this], lambda v: v <= 30),
    ]
    for name, value, met in targets:
        report(f"target {name}", {"value": value, "met": value is not None and met(value)})
