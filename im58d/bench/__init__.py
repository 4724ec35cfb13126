"""``im58d-bench``: measure the daemon from outside (not a test).

It starts daemons of its own on fresh databases (or targets a running one)
and drives them, in a process of its own, with a lean load generator
(``loadgen.py``: asyncio, prebuilt frames, one write per connection per
batch) that speaks contract version 2.  Modes (``--mode``, repeatable):

- ``bytes``: the six packets of one "你好" on a fresh database, and a
  RESUME with its RESUMED; bytes and hex;
- ``full``: 100 clients in 50 pairs, every sender keeping 16 messages in
  flight through the six packets (MSG_R → MSG_A, MSG_N → ACK_R → ACK_A,
  ACK_N), 20 s measured; ``paced``: the same at 2,000 messages/s.  Each
  reports delivered messages/s, p50/p99 MSG_R → MSG_N latency, wire bytes
  per message, the daemon's CPU per delivered message (``/proc/PID/stat``)
  and the generator's own;
- ``idle``: the daemon's resident memory per signed-in idle connection;
- ``restart``: 2,000 devices connected, SIGTERM, the daemon started again on
  the same database: how many RESUMEd (none should need a LOGIN), and how
  soon after it listened again;
- ``connect``: the round trips, bytes and time of a LOGIN and a RESUME over
  TCP, TLS 1.3 and TLS 1.2;
- ``sync``, ``report``: the HTTP bytes of a contact-list sync and of client
  log reports;
- ``cluster`` (not part of ``all``: it needs ``redis-server``): the loads on
  one node against two nodes through Redis;
- ``compare`` (not part of ``all``): this daemon against the daemon of
  another tree, each under its own generator, in alternating runs.
"""

from __future__ import annotations

from .cli import main
from .connect import connect_mode
from .report import report_mode
from .sync import sync_mode

__all__ = ["connect_mode", "main", "report_mode", "sync_mode"]
