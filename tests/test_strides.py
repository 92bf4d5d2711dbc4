"""Every attention backend on inputs of any strides: strided, offset, transposed and broadcast views.

The kernels read the head dim as one dense run; ``attention.backends.kernel_layout`` copies views
that break that (``x[..., ::2]`` once gave errors of 2.7 on ``cpu_flash``) and passes the rest
through. Values, the lse and the gradients are compared with the same call on contiguous copies.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from dist_utils import excess

from attention import AttentionCall, attention_with_lse, available_backends
from attention.backends import BACKEND_NAMES, kernel_layout

Tensor = torch.Tensor
SHAPE = (2, 9, 3, 16)  # B, S, H, D of the views below

VIEWS: dict[str, Callable[[Tensor], Tensor]] = {
    # each takes a generator-drawn base tensor and returns a [2, 9, 3, 16] view of it
    "head_dim_step_2": lambda x: x.reshape(2, 9, 3, 32)[..., ::2],
    "head_dim_offset": lambda x: x.reshape(2, 9, 3, 32)[..., 3:19],
    "seq_head_transposed": lambda x: x.reshape(2, 3, 9, 32)[..., :16].transpose(1, 2),
    "batch_broadcast": lambda x: x.reshape(2, 9, 3, 32)[:1, ..., :16].expand(SHAPE),
    "seq_step_2": lambda x: x.reshape(2, 18, 3, 16)[:, ::2],
}


def _views(view: str, dtype: torch.dtype, device: torch.device, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [VIEWS[view](torch.randn(2 * 18 * 3 * 16, generator=g).to(device, dtype)) for _ in range(3)]


def _run(q: Tensor, k: Tensor, v: Tensor, backend: str, grad: bool) -> list[Tensor]:
    leaves = [x.detach().requires_grad_(grad) for x in (q, k, v)]  # keep the views' strides
    out, lse = attention_with_lse(*leaves, backend=backend)
    if not grad:
        return [out, lse]
    dout = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)
    loss = (out.float() * dout.float()).sum() + (lse * 0.5).sum()
    return [out, lse, *torch.autograd.grad(loss, leaves)]


def check_any_strides(backend: str, view: str, dtype: torch.dtype, device: torch.device, grad: bool) -> None:
    call = AttentionCall(device, dtype, SHAPE[-1], grad)
    if backend not in available_backends(call):
        pytest.skip(f"{backend} cannot run {dtype} on {device.type}{' with grad' if grad else ''}")
    q, k, v = _views(view, dtype, device, seed=0)
    assert not q.is_contiguous(), view
    got = _run(q, k, v, backend, grad)
    want = _run(q.contiguous(), k.contiguous(), v.contiguous(), backend, grad)
    # The same kernel on the same values: equal up to the order of its sums (GPU backward kernels
    # accumulate with atomics, so bf16 results may differ in the last bit; a misread layout is off by O(1)).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=False):
        assert excess(a.float(), e.float(), atol=tol, rtol=tol) <= 0, f"{backend} {view} {name}"


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
def test_cpu_backends_accept_any_strides(backend: str, view: str, grad: bool):
    check_any_strides(backend, view, torch.float32, torch.device("cpu"), grad)


def test_strided_head_dim_equals_sdpa_on_the_cpu_default():
    """The probe's case: ``randn(2, 8, 4, 16)[..., ::2]`` through ``backend="auto"`` (``cpu_flash`` on a CPU)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 8, 4, 16, generator=g)[..., ::2] for _ in range(3))
    out, _ = attention_with_lse(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert excess(out, ref) <= 0


def test_kernel_layout_copies_only_what_the_kernels_cannot_read():
    x = torch.randn(2, 5, 3, 8)
    assert kernel_layout(x) is x
    assert kernel_layout(x.transpose(1, 2)) is not None and kernel_layout(x.transpose(1, 2)).data_ptr() == x.data_ptr()
    strided = torch.randn(2, 5, 3, 16)[..., ::2]
    fixed = kernel_layout(strided)
    assert fixed.stride(-1) == 1 and torch.equal(fixed, strided)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("backend", [n for n in BACKEND_NAMES if n != "cpu_flash"])
def test_gpu_backends_accept_any_strides(backend: str, view: str, grad: bool):
    check_any_strides(backend, view, torch.bfloat16, torch.device("cuda", torch.cuda.current_device()), grad)
