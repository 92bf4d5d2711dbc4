"""Train the small FLUX-architecture model (``model.py``) on procedural captioned shapes (``data.py``).

Rectified flow: x_t = (1 − t)·x0 + t·ε, the transformer gets ``timestep=t`` in [0, 1] (as diffusers' FLUX
pipeline passes timestep / 1000) and predicts v = ε − x0; MSE loss. AdamW with a linear warm-up, then a
cosine decay over the run (its progress: the larger of steps done / ``--steps`` and time used /
``--time-limit-s``); bf16 autocast on CUDA, float32 on the CPU. A tenth of the captions are dropped (only
``<bos>``) so guidance can be used when sampling. The saved weights are an exponential moving average.

    python benchmarks/quality/train.py --out results/quality/model                 # on a GPU, ~7 minutes
    python benchmarks/quality/train.py --out /tmp/q --steps 5 --batch 4 --size 16  # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import BOS, TOKEN, make_batch  # beside this script
from model import SmallFlux, build, pack, save

Tensor = torch.Tensor


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample_t(batch: int, kind: str, device: torch.device) -> Tensor:
    """Training times [B] in (0, 1): ``logit-normal`` (sigmoid of a standard normal) or ``uniform``."""
    if kind == "uniform":
        return torch.rand(batch, device=device)
    return torch.sigmoid(torch.randn(batch, device=device))


def learning_rate(base: float, step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` to ``base / 10`` as ``progress`` goes 0 → 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(
    out: str | Path,
    steps: int = 100000,
    batch: int = 256,
    size: int = 32,
    time_limit_s: float = 420.0,
    seed: int = 0,
    device: str = "auto",
    lr: float = 3e-4,
    warmup: int = 300,
    ema: float = 0.999,
    drop_caption: float = 0.1,
    timesteps: str = "logit-normal",
    log_every: int = 100,
    model_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a fresh model and save its EMA weights to ``out``; returns the run's summary (also in ``train.json``)."""
    dev = pick_device(device)
    torch.manual_seed(seed)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN's SDPA backward failed for some training shapes
    model: SmallFlux = build(size=size, **(model_overrides or {})).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    shadow = [p.detach().clone().float() for p in params]  # the EMA weights
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=cuda)
    n_params = sum(p.numel() for p in params)
    print(f"training on {dev}: {n_params / 1e6:.2f} M parameters, {size}² images, batch {batch}, "
          f"up to {steps} steps or {time_limit_s:.0f} s", flush=True)  # fmt: skip

    data = torch.Generator().manual_seed(seed)  # the stream of batches (drawn on the CPU)
    start = time.perf_counter()
    losses: list[Tensor] = []
    history: list[dict[str, float]] = []
    done, rate = 0, lr
    for step in range(steps):
        elapsed = time.perf_counter() - start
        if elapsed >= time_limit_s:
            print(f"time limit reached after {step} steps ({elapsed:.0f} s)", flush=True)
            break
        rate = learning_rate(lr, step, warmup, max(step / steps, elapsed / time_limit_s))
        for group in optimizer.param_groups:
            group["lr"] = rate

        b = make_batch(batch, data, size=size, device=dev, captions=False)
        drop = torch.rand(batch, device=dev) < drop_caption
        tokens = torch.where(drop[:, None], 0, b.tokens)
        tokens[:, 0] = TOKEN[BOS]
        mask = tokens != 0
        x0 = pack(b.images)  # [B, S, 12]
        noise = torch.randn_like(x0)
        t = sample_t(batch, timesteps, dev)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            v = model.velocity(xt, t, model.encode(tokens, mask))
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(shadow, [p.detach().float() for p in params], 1 - decay)
        losses.append(loss.detach())
        done = step + 1
        if done % log_every == 0 or done == steps:
            mean = torch.stack(losses).mean().item()
            losses.clear()
            history.append({"step": done, "loss": mean, "seconds": time.perf_counter() - start, "lr": rate})
            print(f"step {done:6d}  loss {mean:.4f}  lr {rate:.2e}  {time.perf_counter() - start:6.1f} s", flush=True)
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    if losses:
        history.append({"step": done, "loss": torch.stack(losses).mean().item(), "seconds": seconds, "lr": rate})

    with torch.no_grad():
        for p, s in zip(params, shadow, strict=True):
            p.copy_(s)
    summary = {
        "steps": done,
        "seconds": seconds,
        "batch": batch,
        "size": size,
        "seed": seed,
        "device": str(dev),
        "parameters": n_params,
        "final_loss": history[-1]["loss"] if history else None,
        "ema": ema,
        "history": history,
    }
    out = Path(out)
    save(model.eval(), out, meta={"train": {k: v for k, v in summary.items() if k != "history"}})
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved to {out} after {done} steps in {seconds:.0f} s (final loss {summary['final_loss']})", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the weights (created)")
    parser.add_argument("--steps", type=int, default=100000, help="at most this many optimizer steps")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (even)")
    parser.add_argument("--time-limit-s", type=float, default=420.0, help="stop when the training loop used this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=300, help="warm-up steps")
    parser.add_argument("--ema", type=float, default=0.999, help="decay of the saved moving average")
    parser.add_argument("--timesteps", choices=("logit-normal", "uniform"), default="logit-normal")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--layers", type=int, default=None, help="dual-stream blocks (default: model.SMALL_FLUX's 2)")
    parser.add_argument("--single-layers", type=int, default=None, help="single-stream blocks (default 4)")
    args = parser.parse_args(argv)
    if args.size < 2 or args.size % 2:
        parser.error(f"--size must be even and ≥ 2, got {args.size}")
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be ≥ 1")
    train(
        args.out,
        steps=args.steps,
        batch=args.batch,
        size=args.size,
        time_limit_s=args.time_limit_s,
        seed=args.seed,
        device=args.device,
        lr=args.lr,
        warmup=args.warmup,
        ema=args.ema,
        timesteps=args.timesteps,
        log_every=args.log_every,
        model_overrides={
            name: value
            for name, value in (("num_layers", args.layers), ("num_single_layers", args.single_layers))
            if value is not None
        },
    )


if __name__ == "__main__":
    main()
