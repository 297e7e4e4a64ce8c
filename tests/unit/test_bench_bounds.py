"""The benchmarks' bound on what any client could do with a run's jobs, beside the ideal."""

from __future__ import annotations

import pytest

from bench.throughput import best_possible


def test_a_batch_just_over_the_cap_needs_a_second_round_of_jobs_whatever_the_client() -> None:
    # issue 15's cold row: 19 jobs of 3 s on 16 slots; the ideal (19 x 3 / 16 = 3.56 s)
    # spreads the work over the slots, but the last three jobs cannot start before one ends.
    assert best_possible([3.0] * 19, cap=16, rps=10.0) == pytest.approx(6.0)


def test_submits_beyond_the_burst_go_out_at_the_account_s_rate() -> None:
    assert best_possible([1.0] * 20, cap=None, rps=10.0) == pytest.approx(2.0)


def test_a_freed_slot_goes_to_the_next_job_at_once() -> None:
    assert best_possible([1.0, 4.0, 1.0, 1.0], cap=2, rps=None) == pytest.approx(4.0)
    assert best_possible([4.0, 4.0, 1.0], cap=2, rps=None) == pytest.approx(5.0)
