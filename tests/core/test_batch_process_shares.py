"""How a batch is shared out among processes: ``processes="auto"`` and each process's part of the calls in
flight (pure functions; the processes themselves run in tests/reliability/test_batch_processes.py)."""

from __future__ import annotations

import pytest

from governed_ai.core.batch.processes import (
    MIN_CALLS_IN_FLIGHT_PER_PROCESS,
    MIN_ITEMS_PER_PROCESS,
    auto_processes,
    concurrency_share,
)

MANY_ITEMS = 100 * MIN_ITEMS_PER_PROCESS
HIGH = 8 * MIN_CALLS_IN_FLIGHT_PER_PROCESS  # calls in flight enough for 8 processes


@pytest.mark.parametrize(
    ("items", "concurrency", "cores", "expected"),
    [
        (MIN_ITEMS_PER_PROCESS - 1, HIGH, 4, 1),
        (2 * MIN_ITEMS_PER_PROCESS, HIGH, 4, 2),
        (MANY_ITEMS, HIGH, 4, 4),
        (MANY_ITEMS, 3 * MIN_CALLS_IN_FLIGHT_PER_PROCESS, 4, 3),
        (MANY_ITEMS, MIN_CALLS_IN_FLIGHT_PER_PROCESS - 1, 4, 1),  # latency-bound: one process
        (MANY_ITEMS, HIGH, 1, 1),
        (0, HIGH, 4, 1),
    ],
)
def test_auto_is_one_per_core_as_far_as_items_and_concurrency_go(items, concurrency, cores, expected):
    assert auto_processes(items, concurrency, cores) == expected


@pytest.mark.parametrize(("concurrency", "processes"), [(8, 2), (9, 2), (32, 3), (5, 5), (64, 7)])
def test_the_shares_of_concurrency_add_up_and_are_even(concurrency, processes):
    shares = [concurrency_share(concurrency, processes, shard) for shard in range(processes)]
    assert sum(shares) == concurrency
    assert max(shares) - min(shares) <= 1
    assert min(shares) >= 1
