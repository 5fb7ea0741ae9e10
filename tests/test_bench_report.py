"""The benchmark's figures from recorded rounds, without running a benchmark."""

from __future__ import annotations

import pytest

from deploy.bench import report


def test_round_gaps_pair_each_round_only_with_its_own_pass():
    """With --passes every pass repeats rounds 0..3: a gap is taken from a round's
    end to the next round's end of the same pass, never across passes (sorted by
    round number, round 1 of one pass was paired with round 2 of another, and
    the table showed gaps of -130 s)."""
    rounds = []
    for start in (100.0, 200.0, 300.0):
        for number in range(4):
            rounds.append({"round": number, "seconds": 0.9, "ended_at": start + number})
    # Rounds 1-3 of each pass, the ends of the measured rounds after the warm-up.
    assert report.round_gaps(rounds) == pytest.approx([1.0] * 9)
    # The order rounds were recorded in does not matter, only their clock.
    assert report.round_gaps(list(reversed(rounds))) == pytest.approx([1.0] * 9)


def test_a_gap_needs_both_ends():
    rounds = [
        {"round": 0, "seconds": 1.0, "ended_at": 10.0},
        {"round": 1, "seconds": 1.0, "ended_at": 11.5},
        {"round": 2, "seconds": 1.0},
        {"round": 3, "seconds": 1.0, "ended_at": 14.0},
    ]
    assert report.round_gaps(rounds) == pytest.approx([1.5])
