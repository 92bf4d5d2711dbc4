"""``xdit_core.spawn``: results in rank order (tensors too), a failing rank's traceback, a rank that died
named with its signal ahead of its peers' errors, unpicklable results refused at once, hangs become timeouts."""

from __future__ import annotations

import os
import resource
import signal
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from dist_utils import worker_setup

from xdit_core import spawn

MARKER = "marker-3f9c: rank 1 gave up"
HANG_TIMEOUT_S = 4.0
# Slack for process start-up, polling (0.5 s) and terminating the ranks.
TEARDOWN_SLACK_S = 12.0
# Failures must come back well before this timeout (start-up plus spawn's two-second grace), even on a
# loaded machine; the old spawn waited it out for an unpicklable result.
FAIL_TIMEOUT_S = 120.0
BIG_NUMEL = 2 * 1024 * 1024  # 8 MB of float32


@dataclass
class Record:
    rank: int
    values: torch.Tensor


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


def _tensors(rank: int) -> dict[str, object]:
    """The same tensors in a rank and in the parent; views of one larger storage, nested containers."""
    g = torch.Generator().manual_seed(rank)
    big = torch.randn(BIG_NUMEL, generator=g)
    small = torch.randn(5, 3, generator=g)
    return {
        "plain": small,
        "big": big,
        "view": big.view(1024, 2048)[3:7, 1::2],  # strided, offset into an 8 MB storage
        "nested": [small[1], {"ints": torch.arange(rank, rank + 4), "record": Record(rank, small.t())}],
    }


def _return_tensors() -> dict[str, object]:
    worker_setup()
    return _tensors(dist.get_rank())


def _return_unpicklable() -> object:
    worker_setup()
    if dist.get_rank() == 1:
        return {"ok": torch.ones(2), "stats": [1.0, lambda: 2.0]}
    return open(os.devnull)  # the value under test: an open file


def _die_in_a_barrier(how: str) -> int:
    worker_setup()
    if dist.get_rank() == 1:
        time.sleep(0.5)  # rank 0 is blocked in the barrier by now
        if how == "abort":
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
            os.abort()
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    return dist.get_rank()


def _raise_while_peer_waits() -> int:
    worker_setup()
    if dist.get_rank() == 1:
        time.sleep(0.5)
        _deep_failure()
    dist.barrier()  # rank 0 fails here too, in consequence
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


def test_tensor_results_come_back():
    values = spawn(_return_tensors, 2, backend="gloo", timeout_s=FAIL_TIMEOUT_S)
    for rank, got in enumerate(values):
        want = _tensors(rank)
        for key in ("plain", "big", "view"):
            assert torch.equal(got[key], want[key]), key
        assert got["view"].shape == (4, 1024)
        assert got["view"].untyped_storage().data_ptr() == got["big"].untyped_storage().data_ptr()  # still a view
        assert torch.equal(got["nested"][0], want["nested"][0])
        assert torch.equal(got["nested"][1]["ints"], want["nested"][1]["ints"])
        record = got["nested"][1]["record"]
        assert isinstance(record, Record) and record.rank == rank
        assert torch.equal(record.values, want["nested"][1]["record"].values)


def test_unpicklable_result_fails_at_once():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        spawn(_return_unpicklable, 2, backend="gloo", timeout_s=FAIL_TIMEOUT_S)
    assert time.monotonic() - start < FAIL_TIMEOUT_S / 2, "an unpicklable result must not wait for the timeout"
    message = str(info.value)
    assert "rank 1 of 2 returned a value that cannot be sent back: result['stats'][1] is a function: " in message
    assert "rank 0 of 2 returned a value that cannot be sent back: result is a TextIOWrapper: " in message


@pytest.mark.parametrize(("how", "code"), [("abort", "-6 (SIGABRT)"), ("kill", "-9 (SIGKILL)")])
def test_rank_killed_in_a_collective_is_named_before_its_peer(how: str, code: str):
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        spawn(_die_in_a_barrier, 2, how, backend="gloo", timeout_s=FAIL_TIMEOUT_S)
    assert time.monotonic() - start < FAIL_TIMEOUT_S / 2
    message = str(info.value)
    assert message.startswith(f"rank 1 exited with code {code} without a report"), message
    if "rank 0" in message:  # rank 0's error (connection closed), if it came in time, is listed as a consequence
        assert message.index("in consequence") < message.index("rank 0 of 2 failed")


def test_first_failure_leads_and_peers_follow():
    with pytest.raises(RuntimeError) as info:
        spawn(_raise_while_peer_waits, 2, backend="gloo", timeout_s=FAIL_TIMEOUT_S)
    message = str(info.value)
    assert message.startswith("rank 1 of 2 failed:\nTraceback (most recent call last)"), message
    assert f"ValueError: {MARKER}" in message
    lead, _, rest = message.partition("then, probably in consequence:")
    assert "_deep_failure" in lead and "rank 0" not in lead
    if rest:  # rank 0's error (connection closed), if it came within the grace, in one line
        assert rest.strip().startswith("rank 0 of 2 failed: RuntimeError: "), message
