"""``xdit_core.spawn``: results in rank order, a failing rank's traceback, hangs become timeouts."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from dist_utils import worker_setup

from xdit_core import spawn

MARKER = "marker-3f9c: rank 1 gave up"
HANG_TIMEOUT_S = 4.0
# Slack for process start-up, polling (0.5 s) and terminating the ranks.
TEARDOWN_SLACK_S = 12.0


def _identify(offset: int) -> tuple[int, int, int, int]:
    worker_setup()
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)  # a real collective: the ranks formed one group
    time.sleep(0.3 * (dist.get_world_size() - dist.get_rank()))  # results arrive in reverse rank order
    return dist.get_rank(), dist.get_world_size(), offset + dist.get_rank(), int(t.item())


def _raise_on_rank_1() -> int:
    worker_setup()
    if dist.get_rank() == 1:
        _deep_failure()
    return dist.get_rank()


def _deep_failure() -> None:
    raise ValueError(MARKER)


def _sleep_on_rank_1() -> int:
    worker_setup()
    if dist.get_rank() == 1:
        time.sleep(300)
    return dist.get_rank()


def _barrier_without_rank_1() -> int:
    worker_setup()
    if dist.get_rank() == 1:
        time.sleep(300)  # never enters the barrier (and never exits, which would wake rank 0)
    else:
        dist.barrier()
    return dist.get_rank()


def _exit_without_report() -> int:
    worker_setup()
    if dist.get_rank() == 1:
        os._exit(3)
    time.sleep(300)
    return dist.get_rank()


def test_spawn_returns_values_in_rank_order():
    values = spawn(_identify, 3, 100, backend="gloo", timeout_s=120)
    assert values == [(r, 3, 100 + r, 1 + 2 + 3) for r in range(3)]


def test_failing_rank_traceback_reaches_the_parent():
    with pytest.raises(RuntimeError) as info:
        spawn(_raise_on_rank_1, 2, backend="gloo", timeout_s=120)
    message = str(info.value)
    assert "rank 1 of 2 failed" in message
    assert "Traceback (most recent call last)" in message
    assert f"ValueError: {MARKER}" in message
    assert "_deep_failure" in message and "_raise_on_rank_1" in message  # the frames, not just the message


def test_rank_exiting_without_report_is_named():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 exited with code 3 without a report"):
        spawn(_exit_without_report, 2, backend="gloo", timeout_s=60)
    assert time.monotonic() - start < 60, "a dead rank must not wait for the timeout"


@pytest.mark.parametrize("worker", [_sleep_on_rank_1, _barrier_without_rank_1], ids=["sleep", "barrier"])
def test_hanging_rank_times_out(worker):
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        spawn(worker, 2, backend="gloo", timeout_s=HANG_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert elapsed >= HANG_TIMEOUT_S
    assert elapsed < HANG_TIMEOUT_S + TEARDOWN_SLACK_S, f"took {elapsed:.1f} s"
    message = str(info.value)
    assert f"within {HANG_TIMEOUT_S:.0f} s" in message
    silent = message.split("ranks ")[1].split(" gave")[0]
    assert "1" in silent  # rank 1 is named (rank 0 too, if it was still starting or stuck)


@pytest.mark.parametrize("world", [0, -1])
def test_world_size_below_one_is_refused(world: int):
    with pytest.raises(ValueError, match=f"world_size must be at least 1, got {world}"):
        spawn(_identify, world, 0)
