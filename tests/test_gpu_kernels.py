"""The one-GPU speed work's kernels on a CUDA device, against the unfused math (run on a GPU machine:
``python -m pytest tests/test_gpu_kernels.py -q``; skipped elsewhere).

* ``GeluLinear``'s cuBLASLt epilogue computes the tanh GELU: in float32 it equals ``F.gelu(approximate="tanh")``
  of the float32 GEMM far closer than the exact (erf) GELU differs from it, and in bf16 it is no further from the
  float64 result than the two ops are.
* ``backend="auto"`` picks cuDNN on short key sequences and FlashAttention-3 (when installed) on long ones.
* STDiT3 with its blocks compiled by inductor (custom-op attention, the GELU epilogue as an extern kernel) equals
  the eager model by the flash-attention rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_stdit import stdit_inputs, tiny_model

from attention import AttentionCall, available_backends, select_backend
from models.stdit.layers import GeluLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _gelu_case(dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    layer = GeluLinear(256, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(512, 256, generator=g, device="cuda") / 16)
        layer.bias.copy_(torch.randn(512, generator=g, device="cuda"))
    x = torch.randn(1000, 256, generator=g, device="cuda").to(dtype)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    return layer, x, exact


def test_gelu_epilogue_is_the_tanh_gelu_in_float32():
    torch.backends.cuda.matmul.allow_tf32 = False
    layer, x, exact = _gelu_case(torch.float32)
    with torch.no_grad():
        got = layer(x).double()
    tanh, erf = F.gelu(exact, approximate="tanh"), F.gelu(exact)
    gap = (tanh - erf).abs().max().item()
    assert gap > 2e-4, "the inputs do not separate the two GELUs"
    err = (got - tanh).abs().max().item()
    assert err < gap / 10, f"GeluLinear is {err:.2e} from the tanh GELU (the erf one is {gap:.2e} away)"


def test_gelu_epilogue_in_bf16_is_no_worse_than_two_ops():
    layer, x, exact = _gelu_case(torch.bfloat16)
    want = F.gelu(exact, approximate="tanh")
    with torch.no_grad():
        fused = (layer(x).double() - want).abs().max().item()
        two_ops = (F.gelu(F.linear(x, layer.weight, layer.bias), approximate="tanh").double() - want).abs().max()
    assert fused <= two_ops.item() * 1.01, f"fused {fused:.3g} against two ops {two_ops.item():.3g}"


def test_auto_backend_by_key_length():
    device = torch.device("cuda")
    short = AttentionCall(device, torch.bfloat16, 72, False, keys=120)
    long = AttentionCall(device, torch.bfloat16, 72, False, keys=3600)
    if "cudnn" in available_backends(short):
        assert select_backend("auto", short).name == "cudnn"
    assert select_backend("auto", long).name == available_backends(long)[0]
    if "fa3" in available_backends(long):
        assert select_backend("auto", long).name == "fa3"


def test_compiled_stdit_equals_eager():
    model = tiny_model().cuda().to(torch.bfloat16)
    inputs = {
        k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda()) if torch.is_tensor(v) else v
        for k, v in stdit_inputs(2, 3, 6, 8, seed=4).items()
    }
    up = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        fp32 = tiny_model().cuda().to(torch.bfloat16).float()(**up)  # the same bf16-valued weights, in float32
        eager = model(**inputs)
        model.compile_repeated_blocks(dynamic=False)
        compiled = model(**inputs)
    ref_err = (eager.float() - fp32).abs().max().item()
    err = (compiled.float() - fp32).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, f"compiled {err:.3g} against eager bf16 {ref_err:.3g}"
