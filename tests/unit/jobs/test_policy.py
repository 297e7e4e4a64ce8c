"""``jobs.policy``: when to try again and when to look again, as pure functions."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from jobs import policy


class Highest(random.Random):
    """Draws the top of every range: the bound a jittered delay may reach."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Lowest(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


@pytest.fixture(autouse=True)
def _restore_testing_mode() -> Iterator[None]:
    before = policy.testing()
    yield
    policy.set_testing(before)


@pytest.fixture
def no_waits() -> None:
    policy.set_testing(True)


# -- backoff ------------------------------------------------------------------------------------


def test_backoff_ceiling_doubles_with_each_try_until_the_cap() -> None:
    ceilings = [policy.backoff(tries, 1.0, 60.0, Highest()) for tries in range(1, 9)]

    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_backoff_before_the_first_try_is_at_most_the_base() -> None:
    assert policy.backoff(0, 0.5, 60.0, Highest()) == 0.5


def test_backoff_has_full_jitter_down_to_zero() -> None:
    assert policy.backoff(5, 1.0, 60.0, Lowest()) == 0.0


def test_backoff_draws_stay_within_zero_and_the_ceiling() -> None:
    rng = random.Random(7)
    draws = [policy.backoff(4, 0.5, 3.0, rng) for _ in range(500)]

    assert all(0.0 <= d <= 3.0 for d in draws)  # ceiling min(3, 0.5 * 2**3) = 3
    assert max(draws) > 2.5 and min(draws) < 0.5  # full jitter: the whole range is used


def test_backoff_is_off_with_a_zero_base_or_cap() -> None:
    assert policy.backoff(3, 0.0, 60.0, Highest()) == 0.0
    assert policy.backoff(3, 1.0, 0.0, Highest()) == 0.0


# -- retry_wait -----------------------------------------------------------------------------------


def test_retry_wait_is_exactly_the_retry_after_the_provider_asked_for() -> None:
    assert policy.retry_wait(1, 1.0, 60.0, 7.0) == 7.0
    assert policy.retry_wait(6, 1.0, 2.0, 30.0) == 30.0  # longer than our own cap: honoured


def test_retry_wait_caps_an_absurd_retry_after() -> None:
    assert policy.retry_wait(1, 1.0, 60.0, 1e9) == policy.MAX_RETRY_AFTER_S == 900.0


def test_retry_wait_treats_a_negative_retry_after_as_now() -> None:
    assert policy.retry_wait(1, 1.0, 60.0, -5.0) == 0.0


def test_retry_wait_without_retry_after_is_backoff() -> None:
    rng_state = random.getstate()
    try:
        random.seed(3)
        waits = [policy.retry_wait(3, 1.0, 60.0, None) for _ in range(200)]
    finally:
        random.setstate(rng_state)

    assert all(0.0 <= w <= 4.0 for w in waits) and max(waits) > 3.0


# -- polls ----------------------------------------------------------------------------------------


def test_first_poll_of_a_cold_model_is_the_initial_delay() -> None:
    assert policy.first_poll(None, 2.0, None) == 2.0


def test_first_poll_with_a_learned_latency_comes_while_the_job_still_runs() -> None:
    # Early enough that most jobs still report progress, which tells when they will end.
    assert policy.first_poll(10.0, 2.0, None) == pytest.approx(6.0)
    assert policy.first_poll(100.0, 2.0, None) == pytest.approx(60.0)


def test_two_looks_at_a_job_s_progress_put_the_next_poll_just_after_its_end() -> None:
    # 40 % at 4 s, 60 % at 5 s: 20 points a second, 2 s left
    assert policy.after_progress(5.0, 60, (4.0, 40), 30.0) == pytest.approx(2.0 + 0.03)


def test_one_look_at_a_job_s_progress_puts_the_next_a_quarter_of_the_way_to_its_latest_end() -> (
    None
):
    # 25 % after 3 s: at most 9 s more if it rose evenly from the start
    assert policy.after_progress(3.0, 25, None, 30.0) == pytest.approx(9.0 / 4)


def test_a_poll_placed_from_one_look_and_the_learned_queue_share_comes_just_after_the_end() -> None:
    """Jobs of 2.1-3.9 s, queued for a fifth of their time, reporting their progress cut down
    to a whole percent (as the simulator and APIFrame do), each looked at once after 1.8 s
    (our clock starting 5 ms before the job's). The queue share is learned from a dozen of
    them as ``apply.lua`` averages it; read as the middle of its percent, progress places the
    next poll after the end in nearly every job (read as its floor, 9 of 61 came early, each
    then a second poll and an idle slot)."""

    def progress(duration: float, age: float) -> int:
        return max(0, min(99, int((age - 0.2 * duration) / (0.8 * duration) * 100)))

    durations = [2.1 + 1.8 * k / 60 for k in range(61)]
    t, late_clock = 1.8, 0.005
    queue = 0.0
    for n, duration in enumerate(durations[::7] + durations[3::7]):
        share = policy.queue_share(t, progress(duration, t - late_clock), duration)
        assert share is not None
        queue = share if n == 0 else queue + max(0.05, 1 / (n + 1)) * (share - queue)
    after_end = []
    for duration in durations:
        wait = policy.after_progress(t, progress(duration, t - late_clock), None, 30.0, queue)
        assert wait is not None
        after_end.append(t + wait - late_clock - duration)

    assert queue == pytest.approx(0.2, abs=0.01)
    assert sum(gap < 0 for gap in after_end) <= 1
    assert max(after_end) <= policy.END_MARGIN_S + 0.03


@pytest.mark.parametrize(
    ("t", "progress", "before"),
    [(3.0, 0, None), (5.0, 40, (4.0, 40)), (5.0, 30, (4.0, 40))],
    ids=["queued", "no-change", "went-back"],
)
def test_progress_that_tells_nothing_leaves_the_next_poll_to_the_usual_steps(
    t: float, progress: int, before: tuple[float, int] | None
) -> None:
    assert policy.after_progress(t, progress, before, 30.0) is None


def test_a_job_about_to_end_is_looked_at_again_soon_and_never_past_the_longest_gap() -> None:
    assert policy.after_progress(5.0, 99, (4.9, 98), 30.0) == pytest.approx(policy.SOON_S, abs=0.05)
    assert policy.after_progress(5.0, 1, None, 2.0) == 2.0


def test_first_poll_with_webhooks_waits_for_the_webhook() -> None:
    assert policy.first_poll(None, 2.0, 60.0) == 60.0
    # A model slower than the fallback interval: three times its latency.
    assert policy.first_poll(30.0, 2.0, 60.0) == 90.0


def test_next_poll_of_a_cold_model_grows_by_half_from_the_initial_delay() -> None:
    delays = [policy.next_poll(polls, None, 2.0, 100.0, Lowest()) for polls in range(1, 5)]

    assert delays == pytest.approx([1.6, 2.4, 3.6, 5.4])  # 2 * 1.5**k, jitter at -20 %


def test_next_poll_of_a_learned_model_steps_by_a_fraction_of_its_latency() -> None:
    slow = policy.next_poll(1, 100.0, 2.0, 1000.0, Highest())
    slower = policy.next_poll(1, 200.0, 2.0, 1000.0, Highest())

    assert 0 < slow <= 0.2 * 100.0  # a small step, not a second wait as long as the job
    assert slower == pytest.approx(2 * slow)  # in proportion to the latency
    # A very fast model still waits a moment between polls: never a tight loop.
    assert policy.next_poll(1, 0.001, 2.0, 100.0, Lowest()) >= 0.1


def test_next_poll_is_capped_at_poll_max_with_its_jitter() -> None:
    assert policy.next_poll(30, None, 2.0, 10.0, Highest()) == pytest.approx(12.0)
    assert policy.next_poll(30, None, 2.0, 10.0, Lowest()) == pytest.approx(8.0)


def test_next_poll_jitter_spreads_polls_of_jobs_submitted_together() -> None:
    rng = random.Random(11)
    delays = {round(policy.next_poll(2, None, 2.0, 10.0, rng), 6) for _ in range(50)}

    assert len(delays) > 40
    assert all(2.4 <= d <= 3.6 for d in delays)


# -- testing mode ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_waits")
def test_testing_mode_removes_every_wait() -> None:
    assert policy.testing()
    assert policy.backoff(8, 1.0, 60.0, Highest()) == 0.0
    assert policy.retry_wait(2, 1.0, 60.0, 30.0) == 0.0
    assert policy.retry_wait(2, 1.0, 60.0, None) == 0.0
    assert policy.first_poll(10.0, 2.0, 60.0) == 0.0
    assert policy.first_poll(None, 2.0, None) == 0.0
    assert policy.next_poll(5, None, 2.0, 10.0, Highest()) == 0.0


def test_testing_mode_is_off_by_default_and_can_be_turned_off() -> None:
    assert not policy.testing()
    policy.set_testing(True)
    policy.set_testing(False)
    assert policy.backoff(1, 1.0, 60.0, Highest()) == 1.0
