"""The connect figures of ``im58d-bench``: what a login and a resume cost."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from im58d.bench import connect_mode


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
