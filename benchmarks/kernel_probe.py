"""The kernel choices behind the one-GPU step, timed alone on the GPU.

    python benchmarks/kernel_probe.py --out DIR

* Attention at STDiT3-XL's shapes (720p 4 s, the CFG pair; 16 heads of 72): spatial (60 frames of
  3600 positions), temporal (7200 positions of 30 frames) and cross-attention (108 000 queries of one
  sample, 120 text keys), by every backend that can run them (``attention.available_backends``) and by
  ``F.scaled_dot_product_attention`` (torch's own choice, what the plain STDiT3 attention called before).
* STDiT3's MLP up-projection at 720p (216 000 × 1152 → 4608): linear then GELU (tanh) as two ops against
  ``GeluLinear``'s one GEMM with the GELU in the epilogue; each one's error against the float32 GEMM and
  the tanh GELU, and the fused one's against the exact (erf) GELU (the two GELUs differ by less than bf16's
  rounding here; ``tests/test_gpu_kernels.py`` tells them apart in float32).
* FLUX.1-dev's GEMMs at 1024² and 2048² (4608 / 16896 tokens): ``F.linear`` (addmm, bias in the
  epilogue) against ``mm`` then the bias added, and ``mm`` alone (what a compiled graph may run).

Median of CUDA-event timings; writes ``DIR/kernel_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attention.backends import AttentionCall, available_backends, select_backend
from models.stdit.layers import GeluLinear


def time_ms(fn: Callable[..., Any], *args: Any, iters: int = 10, warmup: int = 3) -> float:
    """Median ms of ``fn(*args)``."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_rows(device: torch.device) -> list[dict]:
    rows = []
    shapes = {"spatial": (60, 3600, 3600), "temporal": (7200, 30, 30), "cross": (1, 108000, 120)}
    for name, (batch, s_q, s_k) in shapes.items():
        q = torch.randn(batch, s_q, 16, 72, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(batch, s_k, 16, 72, device=device, dtype=torch.bfloat16) for _ in range(2))
        flops = 4 * batch * s_q * s_k * 16 * 72
        call = AttentionCall(device, torch.bfloat16, 72, False)
        for backend in available_backends(call):
            if backend in ("math", "efficient") and name == "spatial":
                continue  # minutes, and never the choice
            run = select_backend(backend, call).forward
            ms = time_ms(run, q, k, v, 72**-0.5)
            rows.append({"probe": "attention", "shape": name, "kernel": backend, "ms": ms, "tflops": flops / ms / 1e9})
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        ms = time_ms(F.scaled_dot_product_attention, qt, kt, vt)
        rows.append({"probe": "attention", "shape": name, "kernel": "F.sdpa", "ms": ms, "tflops": flops / ms / 1e9})
    return rows


def gelu_rows(device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    layer = GeluLinear(1152, 4608, device=device, dtype=torch.bfloat16)
    x = torch.randn(216000, 1152, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        fused = layer(x[:4096])
        lin = F.linear(x[:4096].float(), layer.weight.float(), layer.bias.float())
        tanh_ref, erf_ref = F.gelu(lin, approximate="tanh"), F.gelu(lin)
        two_ops = F.gelu(F.linear(x[:4096], layer.weight, layer.bias), approximate="tanh")
        compared = (
            ("fused vs fp32 tanh", fused, tanh_ref),
            ("two ops vs fp32 tanh", two_ops, tanh_ref),
            ("fused vs fp32 erf", fused, erf_ref),
        )
        rows = [
            {"probe": "gelu", "what": what, "max_err": (out.float() - ref).abs().max().item()}
            for what, out, ref in compared
        ]
        ms_two = time_ms(lambda: F.gelu(F.linear(x, layer.weight, layer.bias), approximate="tanh"))
        ms_lin = time_ms(F.linear, x, layer.weight, layer.bias)
        ms_fused = time_ms(layer, x)
    rows += [
        {"probe": "gelu", "what": "linear + gelu (two ops)", "ms": ms_two},
        {"probe": "gelu", "what": "linear alone", "ms": ms_lin},
        {"probe": "gelu", "what": "GeluLinear (epilogue)", "ms": ms_fused},
    ]
    return rows


def mm_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, w.t()) + b


def mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, w.t())


def gemm_rows(device: torch.device) -> list[dict]:
    rows = []
    for tokens in (4608, 16896):
        for k_dim, n_dim in ((3072, 3072), (3072, 9216), (3072, 12288), (15360, 3072), (12288, 3072)):
            x = torch.randn(tokens, k_dim, device=device, dtype=torch.bfloat16)
            w = torch.randn(n_dim, k_dim, device=device, dtype=torch.bfloat16) * 0.02
            b = torch.randn(n_dim, device=device, dtype=torch.bfloat16)
            flops = 2 * tokens * k_dim * n_dim
            for what, fn in (("F.linear", F.linear), ("mm + bias", mm_bias), ("mm", mm)):
                ms = time_ms(fn, x, w, b, iters=20)
                rows.append({"probe": "gemm", "shape": f"{tokens}x{k_dim}->{n_dim}", "what": what, "ms": ms,
                             "tflops": flops / ms / 1e9})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/probe")
    args = p.parse_args()
    device = torch.device("cuda")
    import torch._inductor.config as inductor

    env = {
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "cudnn": torch.backends.cudnn.version(),
        "keep_addmm_fused_for_half_dtypes": getattr(inductor, "keep_addmm_fused_for_half_dtypes", "absent"),
    }  # fmt: skip
    print(env, flush=True)
    rows = []
    for part in (attention_rows, gelu_rows, gemm_rows):
        for row in part(device):
            print(row, flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_probe.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
