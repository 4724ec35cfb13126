"""``im58d-bench`` against real daemons: every cheap mode runs and prints its
figures (smoke tests: nothing here asserts a speed), and the connect
figures of a login and a resume."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from im58d.bench import connect_mode
from im58d.bench.load import LOADGEN

# short runs: the figures are printed, not judged
_SHORT = ["--pairs", "3", "--window", "4", "--rate", "200", "--warmup", "0.3",
          "--duration", "1"]


def bench(*argv: str) -> dict[str, dict[str, str]]:
    """Run ``im58d-bench`` (``python -m im58d.bench``) in a process of its
    own; the figures it printed, line by line: ``{name: {figure: value}}``."""
    done = subprocess.run(
        [sys.executable, "-m", "im58d.bench", *argv], capture_output=True, text=True,
        timeout=240, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise AssertionError(f"im58d-bench {' '.join(argv)} exited {done.returncode}:\n"
                             f"{done.stdout}\n{done.stderr}")
    printed: dict[str, dict[str, str]] = {}
    for line in done.stdout.splitlines():
        name, _, figures = line.partition(": ")
        printed[name] = dict(f.partition(" ")[::2] for f in figures.split(", "))
    return printed


class ModeTests(TestCase):
    timeout = 300

    @inlineCallbacks
    def test_cheap_modes(self) -> Any:
        """bytes, full, paced, idle, restart, sync and report, each on a
        daemon of the bench's own, print their figures; the six packets of
        "你好" are at most 48 bytes and RESUME with RESUMED at most 72; after
        the restart every device RESUMEd and none needed a LOGIN."""
        printed = yield deferToThread(
            bench, "--mode", "bytes", "--mode", "full", "--mode", "paced", "--mode", "idle",
            "--mode", "restart", "--mode", "sync", "--mode", "report", *_SHORT,
            "--idle", "30", "--devices", "40", "--friends", "10", "--groups", "2",
            "--events", "50")
        nihao = printed["six_packets_nihao"]
        self.assertLessEqual(int(nihao["bytes"]), 48)
        self.assertEqual(len(bytes.fromhex(nihao["hex"])), int(nihao["bytes"]))
        self.assertLessEqual(int(nihao["resume_bytes"]), 72)
        for run in ("full_load", "paced_200"):
            self.assertLessEqual(
                {"delivered_per_s", "p50_ms", "p99_ms", "daemon_cpu_us_per_msg",
                 "gen_cpu_us_per_msg", "bytes_per_msg"}, set(printed[run]), run)
            self.assertEqual((printed[run]["in_flight_left"], printed[run]["msg_n_missing"],
                              printed[run]["errors"]), ("0", "0", "0"), run)
        self.assertEqual(printed["idle"]["connections"], "30")
        self.assertIn("rss_per_connection_kb", printed["idle"])
        restart = printed["restart"]
        self.assertEqual((restart["resumed"], restart["logins_needed"], restart["not_back"]),
                         ("40", "0", "0"))
        self.assertIn("resumed_per_s", restart)
        self.assertIn("warm_unchanged_gzip", printed)
        self.assertIn("merged_one_batch_msgpack_gzip", printed)

    @inlineCallbacks
    def test_compare(self) -> Any:
        """compare, with this tree as its own baseline: both run in turn and
        the medians, ratios and targets are printed."""
        printed = yield deferToThread(
            bench, "--mode", "compare", "--rounds", "1", "--baseline-label", "base",
            "--baseline-code", os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "--baseline-gen", LOADGEN, *_SHORT)
        for label in ("base", "v2"):
            self.assertIn(f"{label}_round1_full_load", printed)
            self.assertIn(f"{label}_round1_paced", printed)
        self.assertEqual(set(printed["median full_load.daemon_cpu_us_per_msg"]),
                         {"base", "v2", "ratio"})
        self.assertEqual(len([name for name in printed if name.startswith("target ")]), 4)


class ConnectCostTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_login_and_resume(self) -> Any:
        """On a real daemon, over TCP, TLS 1.3 and TLS 1.2: a login and a
        resume each take one round trip once the transport is up; RESUME plus
        RESUMED is at most 72 bytes; TLS session resumption really resumes
        (the bench refuses a run where it does not), sends fewer handshake
        bytes, and saves TLS 1.2 its second round trip."""
        costs = yield deferToThread(connect_mode, 1)
        for transport in ("tcp", "tls1.3", "tls1.2"):
            login, resume = costs[f"{transport}_login"], costs[f"{transport}_resume"]
            self.assertEqual((login["session_rtt"], resume["session_rtt"]), (1, 1))
            self.assertLessEqual(resume["im_bytes"], 72)
            self.assertLess(resume["im_bytes"], login["im_bytes"])
        self.assertEqual(costs["tcp_resume"]["wire_bytes"], costs["tcp_resume"]["im_bytes"])
        for transport in ("tls1.3", "tls1.2"):
            full, fast = costs[f"{transport}_resume"], costs[f"{transport}_resume_tls_resumed"]
            self.assertEqual(fast["session_rtt"], 1)
            self.assertLess(fast["tls_handshake_bytes"], full["tls_handshake_bytes"])
        self.assertEqual(costs["tls1.3_resume"]["transport_rtt"], 2)
        self.assertEqual(costs["tls1.2_resume"]["transport_rtt"], 3)
        self.assertEqual(costs["tls1.2_resume_tls_resumed"]["transport_rtt"], 2)
