"""Riding out outages (issue 24), the parts that need no worker process: the
plaintext warning said once, stopping the probes without waiting on them, the
probe back-off after a rejoin, and what a retried round is called."""

from __future__ import annotations

import logging

from coordinator.executor_client import connection


def test_the_plaintext_warning_is_said_once_per_worker(caplog):
    caplog.set_level(logging.WARNING, logger="fedcompose.coordinator")
    # Every probe of a down worker opens a channel of its own.
    channels = [
        connection.open_channel(address, None, [])
        for address in ("10.250.1.2:7001", "10.250.1.2:7001", "10.250.1.3:7001", "10.250.1.2:7001")
    ]
    for channel in channels:
        channel.close()
    said = [r.getMessage() for r in caplog.records if "in plaintext" in r.getMessage()]
    assert len(said) == 2, said
    assert "10.250.1.2:7001" in said[0] and "10.250.1.3:7001" in said[1]
