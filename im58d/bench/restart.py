"""Restart mode: signed-in devices through a restart of the daemon.

``--devices`` devices (2,000 by default) sign in and stay connected to a
daemon of the bench's own; the bench SIGTERMs the daemon, starts it again
on the same database and ports, and tells the load generator when it
listens again.  The devices reconnect with the SDK's jittered backoff and
RESUME; the generator reports how many got RESUMED (none should need a
LOGIN), how long after the daemon listened again they were all back, and
how many came back in each second.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .common import Daemon, cpu_seconds
from .load import Report, generator_args, read_line, spawn


def restart_mode(args: argparse.Namespace, report: Report) -> dict[str, Any]:
    daemon = Daemon(args.devices, args.keep, args.daemon_config)
    try:
        argv = generator_args(args, daemon.port, [daemon.pid], "restart",
                              "--restart-timeout", str(args.restart_timeout))
        with spawn(argv, stdin=True) as gen:
            ready = read_line(gen)
            if ready is None or ready.get("event") != "ready":
                raise SystemExit(f"im58d-bench: the devices did not sign in: {ready}")
            terminated = time.monotonic()
            daemon.stop()
            stopped = time.monotonic()
            daemon.start()
            listening = time.monotonic()
            assert gen.stdin is not None
            gen.stdin.write(f"{listening!r}\n")
            gen.stdin.flush()
            result = read_line(gen)
            if result is None:
                raise SystemExit("im58d-bench: the restart's generator ended without a result")
            result.pop("name")
            cpu = cpu_seconds(daemon.pid)
    finally:
        daemon.close()
    figures = {
        "devices": result.pop("devices"),
        "resumed": result.pop("resumed"),
        "logins_needed": result.pop("logins_needed"),
        "all_back_s": result.pop("all_back_s"),
        "sign_in_s": ready["sign_in_s"],
        "shutdown_s": round(stopped - terminated, 2),
        "start_s": round(listening - stopped, 2),
        "daemon_cpu_s": round(cpu, 2),
        **result,
    }
    report("restart", figures)
    if figures["logins_needed"] or figures["not_back"]:
        print(f"im58d-bench: restart: {figures['logins_needed']} devices needed a LOGIN, "
              f"{figures['not_back']} did not come back", file=sys.stderr)
    return figures
