"""``compute_on_rank``: the source rank's named tensors reach every rank, and so does its failure."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks, worker_setup

from xdit_core.on_rank import compute_on_rank


def _record() -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "embeds": torch.randn(2, 5, 3, generator=g),
        "ids": torch.arange(6).reshape(3, 2),
        "half": torch.randn(4, generator=g).to(torch.bfloat16),
        "negative": None,
        "strided": torch.randn(4, 6, generator=g)[:, ::2],
    }


def _fails_with(error: Exception):
    def fn() -> dict:
        raise error

    return fn


def _worker() -> dict:
    worker_setup()
    group, rank = dist.group.WORLD, dist.get_rank()
    got = compute_on_rank(_record if rank == 1 else _fails_with(AssertionError("not called")), group, src=1,
                          device="cpu", what="test")  # fmt: skip
    want = _record()
    report = {"equal": all(
        (got[k] is None and want[k] is None) or (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))
        for k in want
    ), "names": list(got)}  # fmt: skip
    failures = {}
    for name, error in (("value", ValueError("bad prompt")), ("runtime", RuntimeError("out of memory"))):
        try:
            compute_on_rank(_fails_with(error), group, src=0, device="cpu", what="encode")
        except Exception as e:
            failures[name] = (type(e).__name__, str(e), e is error)
    try:
        compute_on_rank(lambda: {"x": [1, 2]}, group, src=2, device="cpu", what="draw")
    except ValueError as e:
        failures["not a tensor"] = (type(e).__name__, str(e), False)
    report["failures"] = failures
    dist.barrier()  # nobody was left inside a collective
    return report


def test_compute_on_rank_shares_results_and_failures():
    reports = run_ranks(_worker, 3)
    assert all(r["equal"] and r["names"] == list(_record()) for r in reports)
    src = reports[0]["failures"]
    assert src["value"] == ("ValueError", "bad prompt", True)  # the source re-raises its own error
    assert src["runtime"] == ("RuntimeError", "out of memory", True)
    for other in reports[1:]:
        assert other["failures"]["value"] == (
            "ValueError",
            "encode failed on group rank 0: ValueError: bad prompt",
            False,
        )
        assert other["failures"]["runtime"][0] == "RuntimeError" and "out of memory" in other["failures"]["runtime"][1]
    for r in reports:
        assert (
            r["failures"]["not a tensor"][0] == "ValueError"
            and "'x' must be a tensor" in r["failures"]["not a tensor"][1]
        )


def test_bad_source_rank_is_refused():
    class One:
        def size(self) -> int:
            return 2

    with pytest.raises(ValueError, match=r"src=5 must be a group rank in \[0, 2\)"):
        compute_on_rank(dict, One(), src=5, device="cpu", what="x")  # type: ignore[arg-type]
