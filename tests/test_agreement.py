"""Ranks that disagree get the same clear ``ValueError`` on every rank: no abort, no hang, no reinterpreted bytes.

Before this check, such calls killed a rank with gloo's ``EnforceNotMet`` (SIGABRT), hung until the
process-group timeout (heads 4 vs 6), or returned garbage (float16 against bfloat16). Each case
below makes the ranks disagree in one way; every rank must raise, all with the same message naming
what differs, and afterwards the group must still work (a barrier and a correct call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_utils import excess, expect_value_errors, reference_attention, run_ranks, worker_setup

from attention import ring_attention, ulysses_attention, usp_attention
from models import tiny_flux_pipeline
from models.flux import parallelize_flux
from parallel_vae import parallelize_vae
from xdit_core import ParallelMesh, all_gather, all_to_all, gather_sequence, shard_sequence
from xdit_core import agreement as agreement_module
from xdit_core.agreement import describe_disagreement
from xdit_core.collectives import gather_to

Tensor = torch.Tensor


def _qkv(rank_shape: Callable[[int], tuple[int, ...]], dtype: Callable[[int], torch.dtype] = lambda r: torch.float32):
    r = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    return [torch.randn(rank_shape(r), generator=g).to(dtype(r)) for _ in range(3)]


def _cases(mesh: ParallelMesh) -> dict[str, tuple[Callable[[], Any], list[str]]]:
    """name -> (the call, words the message must hold). Rank 1 differs from rank 0 in each."""
    rank = dist.get_rank()
    group = mesh.sp_group
    other = rank == 1

    def half(r: int) -> torch.dtype:
        return torch.bfloat16 if r == 1 else torch.float16

    masks = [torch.ones(1, 8, dtype=torch.bool), torch.ones(1, 8, dtype=torch.bool)]
    masks[1][0, 3] = False
    x = torch.randn(2, 4, 6)
    return {
        "dtype float16 vs bfloat16": (
            lambda: ulysses_attention(*_qkv(lambda r: (1, 4, 2, 8), half), group, seq_len=8),
            ["dtype", "rank 0 torch.float16", "rank 1 torch.bfloat16"],
        ),
        "heads 4 vs 6 (hung before)": (
            lambda: ulysses_attention(*_qkv(lambda r: (1, 4, 6 if r else 4, 8)), group),
            ["batch, heads, head_dim", "(1, 4, 8)", "(1, 6, 8)"],
        ),
        "heads and head_dim swapped": (
            lambda: ring_attention(*_qkv(lambda r: (1, 4, 8 if r else 4, 4 if r else 8)), group),
            ["batch, heads, head_dim"],
        ),
        "key_mask differs": (
            lambda: usp_attention(*_qkv(lambda r: (1, 4, 2, 8)), mesh, seq_len=8, key_mask=masks[rank]),
            ["key_mask"],
        ),
        "seq_len differs": (
            lambda: usp_attention(*_qkv(lambda r: (1, 4, 2, 8)), mesh, seq_len=8 if not other else 7),
            ["rank 1 refused"],  # 7 tokens give rank 1 three, but it holds four: its own check refuses
        ),
        "seq_len=None with uneven chunks": (
            lambda: ring_attention(*_qkv(lambda r: (1, 4 - r, 2, 8)), group),
            ["every rank's tokens", "(4, 4)", "(3, 3)"],
        ),
        "batch differs": (
            lambda: usp_attention(*_qkv(lambda r: (1 + r, 4, 2, 8)), mesh),
            ["batch, heads, head_dim"],
        ),
        "joint length differs": (
            lambda: ulysses_attention(
                *_qkv(lambda r: (1, 4, 2, 8)), group, joint=tuple(_qkv(lambda r: (1, 2 + r, 2, 8)))
            ),
            ["joint tokens"],
        ),
        "gradients on one rank only": (
            lambda: ring_attention(*[t.requires_grad_(other) for t in _qkv(lambda r: (1, 4, 2, 8))], group),
            ["gradients"],
        ),
        "one rank passes a 3-D tensor": (
            lambda: usp_attention(*_qkv(lambda r: (4, 2, 8) if r else (1, 4, 2, 8)), mesh),
            ["rank 1 refused the call", "4-D"],
        ),
        "all_to_all scatter_sizes differ": (
            lambda: all_to_all((x,), group, scatter_dim=2, gather_dim=1, scatter_sizes=[2, 4] if other else [3, 3]),
            ["scatter_sizes", "(3, 3)", "(2, 4)"],
        ),
        "all_to_all dtype differs": (
            lambda: all_to_all((x.to(half(rank)),), group, scatter_dim=2, gather_dim=1),
            ["dtype"],
        ),
        "all_gather shapes differ": (
            lambda: all_gather(torch.zeros(2, 3 + rank), group, dim=0),
            ["shape"],
        ),
        "all_gather sizes differ": (
            lambda: all_gather(torch.zeros(2 + rank, 3), group, dim=0, sizes=[2, 3] if other else [2, 2]),
            ["sizes: rank 0 (2, 2), rank 1 (2, 3)"],
        ),
        "gather_sequence uneven chunks without seq_len": (
            lambda: gather_sequence(torch.zeros(1, 2 + rank, 3), mesh),
            ["gather_sequence", "sizes: rank 0 (2, 2), rank 1 (3, 3)"],
        ),
        "gather_to dst differs": (
            lambda: gather_to(torch.zeros(2, 3), group, dim=0, sizes=[2, 2], dst=rank),
            ["dst"],
        ),
    }


def _adapter_cases(mesh: ParallelMesh) -> dict[str, tuple[Callable[[], Any], list[str]]]:
    """The model adapters: inputs of different sizes on the two ranks."""
    rank = dist.get_rank()
    pipe = tiny_flux_pipeline(seed=0)
    transformer = parallelize_flux(pipe.transformer, mesh)
    side = 4 + 2 * rank  # image tokens per side: 16 vs 36
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, side * side, transformer.config.in_channels, generator=g)
    context = torch.randn(1, 8, transformer.config.joint_attention_dim, generator=g)
    img_ids = torch.zeros(side * side, 3)
    flux_call = dict(
        hidden_states=hidden,
        encoder_hidden_states=context,
        pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]) if transformer.config.guidance_embeds else None,
        img_ids=img_ids,
        txt_ids=torch.zeros(8, 3),
    )
    vae = parallelize_vae(pipe.vae, mesh)
    latents = torch.randn(1, pipe.vae.config.latent_channels, 4 + rank, 4, generator=g)
    return {
        "FLUX image size differs": (lambda: transformer(**flux_call), ["parallel FLUX", "hidden_states"]),
        "VAE latents differ": (lambda: vae.decode(latents), ["parallel VAE decode", "latents"]),
    }


def _check_group_still_works(mesh: ParallelMesh) -> float:
    dist.barrier()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 9, 3, 8, generator=g) for _ in range(3))
    local = [shard_sequence(t, mesh) for t in (q, k, v)]
    out = gather_sequence(usp_attention(*local, mesh, seq_len=9), mesh, seq_len=9)
    return excess(out, reference_attention(q, k, v, None))


def _count_exchanges(fn: Callable[[], Any]) -> int:
    """How many agreement exchanges ``fn`` makes (the agreement's digests travel by ``dist.all_gather``)."""
    calls = 0
    real = agreement_module.dist.all_gather

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    agreement_module.dist.all_gather = counting
    try:
        fn()
    finally:
        agreement_module.dist.all_gather = real
    return calls


def _worker() -> dict:
    worker_setup()
    mesh = ParallelMesh.build(ulysses=2)
    report: dict[str, Any] = {"messages": {}, "missing": {}, "after": []}
    for table in (_cases(mesh), _adapter_cases(mesh)):
        for name, (call, words) in table.items():
            try:
                call()
            except ValueError as e:
                report["messages"][name] = str(e)
                report["missing"][name] = [w for w in words if w not in str(e)]
            else:
                report["messages"][name] = None
            report["after"].append(_check_group_still_works(mesh))

    # The same bad call on every rank: the same refusal everywhere (no wrapped dims, no TypeErrors).
    x2d, q4 = torch.zeros(4, 6), torch.zeros(1, 4, 2, 8)
    report["alike"] = expect_value_errors(
        {
            "shard_sequence dim 5 of a 2-D tensor": lambda: shard_sequence(x2d, mesh, dim=5),
            "gather_sequence dim -3": lambda: gather_sequence(x2d, mesh, dim=-3),
            "all_gather dim 2": lambda: all_gather(x2d, mesh.sp_group, dim=2),
            "seq_len 8.0": lambda: usp_attention(q4, q4, q4, mesh, seq_len=8.0),
            "seq_len [4.5, 4.5]": lambda: ring_attention(q4, q4, q4, mesh.sp_group, seq_len=[4.5, 4.5]),
            "scatter_sizes [1.0, 1.0]": lambda: all_to_all(
                (q4,), mesh.sp_group, scatter_dim=2, gather_dim=1, scatter_sizes=[1.0, 1.0]
            ),
        }
    )

    # Once agreed, a signature costs no exchange; check_ranks=False never exchanges.
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=g) for _ in range(3))
    report["exchanges"] = [
        _count_exchanges(lambda: ulysses_attention(q, k, v, mesh.sp_group, seq_len=10)),
        _count_exchanges(lambda: ulysses_attention(q, k, v, mesh.sp_group, seq_len=10)),
        _count_exchanges(lambda: ulysses_attention(q, k, v, mesh.sp_group, seq_len=10, scale=0.2)),
        _count_exchanges(lambda: ulysses_attention(q, k, v, mesh.sp_group, scale=0.3, check_ranks=False)),
    ]
    unchecked = ParallelMesh.build(ulysses=2, check_ranks=False)
    report["exchanges"].append(_count_exchanges(lambda: usp_attention(q, k, v, unchecked, seq_len=10)))
    return report


def test_disagreeing_ranks_raise_the_same_clear_error_on_every_rank():
    reports = run_ranks(_worker, 2)
    for name, message in reports[0]["messages"].items():
        assert message is not None, f"{name}: no ValueError on rank 0"
        for r, report in enumerate(reports):
            assert report["messages"][name] == message, f"{name}: rank {r} raised another message"
            assert not report["missing"][name], f"{name}: the message lacks {report['missing'][name]}: {message}"
    assert all(err <= 0 for report in reports for err in report["after"]), "the group works after each error"
    # first call: one exchange; the same call again: none; a new scale: one; check_ranks=False (call or mesh): none
    assert reports[0]["exchanges"] == [1, 0, 1, 0, 0]
    alike = reports[0]["alike"]
    assert all(r["alike"] == alike for r in reports)
    assert sum("out of range" in m for m in alike) == 3, alike
    assert sum("seq_len must be None, an int" in m for m in alike) == 2, alike
    assert "non-negative ints" in alike[-1], alike


def test_disagreement_message_names_fields_and_ranks():
    message = describe_disagreement(
        "ulysses_attention",
        [
            {"call": "ulysses_attention", "dtype": "float16", "heads": 4},
            {"call": "ulysses_attention", "dtype": "bfloat16", "heads": 4},
            {"call": "ulysses_attention", "dtype": "float16", "heads": 4},
            {"refused": "q must be 4-D"},
        ],
    )
    assert message.startswith("ulysses_attention: the ranks of the group (size 4) did not make the same call")
    assert "rank 3 refused the call: q must be 4-D" in message
    assert "dtype: ranks 0, 2 'float16', rank 1 'bfloat16'" in message
    assert "heads" not in message


def test_agree_needs_values_or_a_refusal():
    with pytest.raises(ValueError, match="pass the call's values or this rank's refusal"):
        agreement_module.agree(None, "x", (), None)  # type: ignore[arg-type]
