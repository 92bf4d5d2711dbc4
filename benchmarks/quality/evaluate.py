"""How much each lossy step-cache configuration changes the images of a trained model, and what it saves.

Loads the model ``train.py`` wrote, draws a fixed prompt set (``--prompts`` captions from ``--seed``, one
noise seed each) and samples it with an Euler sampler from t = 1 to t = 0 (``--steps`` transformer calls with
strictly decreasing timesteps, so the cache sees each image as one run): first without a cache (the exact
images), then under each configuration of :func:`configurations` (``enable_cache``). Per configuration: wall
time, PSNR and SSIM against the exact images (torchmetrics, on [0, 1]) and the fraction of block evaluations
computed (``cache_summary``). Writes ``quality.json``, ``quality.txt``, and with matplotlib ``quality.png``
(speed-up against PSNR) and ``samples.png`` (drawn targets, exact and cached images).

    python benchmarks/quality/evaluate.py --model results/quality/model --out results/quality
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import Batch, encode, make_batch  # beside this script
from model import SmallFlux, TextCondition, load, pack, unpack, velocity

from models.caching import (
    DBCacheConfig,
    cache_summary,
    disable_cache,
    enable_cache,
    first_block_cache,
    static_step_mask,
    steps_mask,
)

Tensor = torch.Tensor
EXACT = "exact (no cache)"
PSNR_CAP = 100.0  # dB, reported for images equal to the exact ones (PSNR is infinite there)
# 12 of 28 steps computed: the first 4, every third from step 6 to step 21, step 25 and the last
MASK_12_OF_28 = (1, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1)


def mask_12_of_28(steps: int) -> list[int]:
    """:data:`MASK_12_OF_28` cut (or extended with computed steps) to ``steps``, the last step computed."""
    mask = (list(MASK_12_OF_28) + [1] * steps)[:steps]
    mask[-1] = 1
    return mask


def configurations(steps: int = 28) -> dict[str, DBCacheConfig]:
    """The lossy configurations measured, by name, for a run of ``steps`` steps (warm-up: 4 of 28 steps)."""
    warmup = max(1, round(steps * 4 / 28))
    configs: dict[str, DBCacheConfig] = {}
    for r in (0.05, 0.1, 0.2, 0.3):
        configs[f"FBCache R{r:g}"] = first_block_cache(r, max_warmup_steps=warmup)
    for r in (0.1, 0.2, 0.3):
        configs[f"DBCache F1B1 R{r:g}"] = DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=r, max_warmup_steps=warmup
        )
    for order in (1, 2):
        configs[f"TaylorSeer o{order} F1B0 R0.2"] = DBCacheConfig(
            Fn_compute_blocks=1,
            residual_diff_threshold=0.2,
            max_warmup_steps=warmup,
            enable_taylorseer=True,
            taylorseer_order=order,
        )
    for name in ("medium", "fast", "ultra"):
        configs[f"static '{name}'"] = static_step_mask(steps_mask(name, steps))
    twelve = static_step_mask(mask_12_of_28(steps))
    computed = f"{sum(twelve.steps_computation_mask)} of {steps}"
    configs[f"static {computed}"] = twelve
    configs[f"static {computed} + TaylorSeer o2"] = twelve.replace(enable_taylorseer=True, taylorseer_order=2)
    return configs


@dataclass
class Prompts:
    """A fixed prompt set: the drawn batch (targets [N, 3, H, W], tokens [N, L], captions) and noise [N, 3, H, W]."""

    batch: Batch
    noise: Tensor

    def __len__(self) -> int:
        return len(self.batch)

    def head(self, n: int) -> Prompts:
        """The first ``n`` prompts."""
        b = self.batch
        return Prompts(Batch(b.images[:n], b.tokens[:n], b.mask[:n], b.captions[:n]), self.noise[:n])


def prompt_set(count: int, size: int, seed: int = 1234, device: torch.device | str = "cpu") -> Prompts:
    """``count`` captions drawn from ``seed`` and noise [count, 3, size, size], prompt i from seed + 1 + i."""
    batch = make_batch(count, seed, size=size, device=device)
    noise = torch.stack(
        [torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed + 1 + i)) for i in range(count)]
    )
    return Prompts(batch, noise.to(device))


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """[steps + 1] times from 1 down to 0, strictly decreasing; ``shift`` > 1 spends more steps at high noise
    (FLUX's time shift t' = s·t / (1 + (s − 1)·t))."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t.float()


@torch.no_grad()
def sample(
    transformer: torch.nn.Module,
    text: TextCondition,
    noise: Tensor,
    steps: int = 28,
    shift: float = 1.0,
    guidance: float = 1.0,
    uncond: TextCondition | None = None,
) -> Tensor:
    """Euler sampling of images [B, 3, H, W] from noise [B, 3, H, W] (t = 1) to t = 0, one transformer call a step.

    With ``guidance`` ≠ 1 and ``uncond`` (the empty caption's condition, batch B), the conditional and
    unconditional predictions come from one call on a batch of 2B (one cache run, not two).
    """
    h, w = noise.shape[-2:]
    x = pack(noise)
    grid = time_grid(steps, shift, noise.device)
    paired = guidance != 1.0 and uncond is not None
    if paired:
        text = TextCondition(
            torch.cat((text.hidden, uncond.hidden)), torch.cat((text.pooled, uncond.pooled)), text.txt_ids
        )
    for i in range(steps):
        t = grid[i].expand(text.hidden.shape[0]).to(x.dtype)
        v = velocity(transformer, torch.cat((x, x)) if paired else x, t, text)
        if paired:
            cond, free = v.chunk(2)
            v = free + guidance * (cond - free)
        x = x + (grid[i + 1] - grid[i]).to(x.dtype) * v
    return unpack(x, h, w)


@dataclass
class Generated:
    """One configuration's images [N, 3, H, W] (CPU, float32, in [-1, 1]), wall seconds and computed fraction."""

    images: Tensor
    seconds: float
    computed_fraction: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(
    model: SmallFlux,
    prompts: Prompts,
    config: DBCacheConfig | None,
    steps: int = 28,
    batch: int = 1,
    shift: float = 1.0,
    guidance: float = 1.0,
) -> Generated:
    """Sample every prompt, ``batch`` prompts per run, under ``config`` (``None``: no cache)."""
    device = prompts.noise.device
    dtype = next(model.transformer.parameters()).dtype
    texts, uncond = [], None
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            texts.append(model.encode(prompts.batch.tokens[i : i + batch], prompts.batch.mask[i : i + batch]))
        if guidance != 1.0:
            tokens, mask = encode("", prompts.batch.tokens.shape[1])
            uncond = model.encode(tokens.to(device)[None], mask.to(device)[None])
    transformer = model.transformer
    if config is not None:
        enable_cache(transformer, config)
    try:
        images = []
        _sync(device)
        start = time.perf_counter()
        for j, text in enumerate(texts):
            noise = prompts.noise[j * batch : (j + 1) * batch].to(dtype)
            empty = None
            if uncond is not None:
                n = noise.shape[0]
                empty = TextCondition(uncond.hidden.expand(n, -1, -1), uncond.pooled.expand(n, -1), uncond.txt_ids)
            images.append(sample(transformer, text, noise, steps, shift, guidance, empty))
        _sync(device)
        seconds = time.perf_counter() - start
        fraction = 1.0
        if config is not None:
            summary = cache_summary(transformer)
            fraction = summary["computed_units"] / max(summary["total_units"], 1)
    finally:
        if config is not None:
            disable_cache(transformer)
    return Generated(torch.cat(images).float().cpu(), seconds, fraction)


def evaluate(
    model: SmallFlux,
    configs: dict[str, DBCacheConfig],
    prompts: Prompts,
    steps: int = 28,
    batch: int = 1,
    shift: float = 1.0,
    guidance: float = 1.0,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Rows (name, config, computed_fraction, seconds, speed-ups; psnr and ssim ``None`` until
    :func:`add_metrics`) and the images by name, the exact ones first (under :data:`EXACT`)."""
    generate(model, prompts.head(1), None, steps, 1, shift, guidance)  # warm-up
    exact = generate(model, prompts, None, steps, batch, shift, guidance)
    log(f"{EXACT}: {exact.seconds:.2f} s")
    rows = [_row(EXACT, "none", exact, exact.seconds)]
    images = {EXACT: exact.images}
    for name, config in configs.items():
        result = generate(model, prompts, config, steps, batch, shift, guidance)
        rows.append(_row(name, config.label(), result, exact.seconds))
        images[name] = result.images
        log(f"{name}: {result.seconds:.2f} s, computed {result.computed_fraction:.3f}")
    return rows, images


def _row(name: str, label: str, result: Generated, exact_seconds: float) -> dict[str, Any]:
    return {
        "name": name,
        "config": label,
        "psnr": None,
        "ssim": None,
        "computed_fraction": result.computed_fraction,
        "seconds": result.seconds,
        "speedup": exact_seconds / result.seconds,
        "ideal_speedup": 1.0 / result.computed_fraction,
    }


def _torchmetrics() -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError as error:
        raise ImportError(
            "evaluate: PSNR and SSIM need torchmetrics, which is not installed (pip install torchmetrics; on the GPU "
            "machine carry its wheels: ../shared/gpu/fetch_wheels.sh torchmetrics lightning-utilities), or pass "
            "--no-metrics"
        ) from error
    return peak_signal_noise_ratio, structural_similarity_index_measure


def image_metrics(images: Tensor, reference: Tensor) -> dict[str, float]:
    """PSNR (dB, the mean over images, each at most :data:`PSNR_CAP`) and SSIM of images [N, 3, H, W] in [-1, 1]
    against reference [N, 3, H, W], both mapped to [0, 1] (data_range 1)."""
    psnr_fn, ssim_fn = _torchmetrics()
    p = (images.float().clamp(-1, 1) + 1) / 2
    t = (reference.float().clamp(-1, 1) + 1) / 2
    psnr = psnr_fn(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))  # [N]
    psnr = psnr.nan_to_num(nan=PSNR_CAP, posinf=PSNR_CAP).clamp(max=PSNR_CAP).mean()
    kernel = min(11, p.shape[-1] - (1 - p.shape[-1] % 2))  # odd, at most the image side
    ssim = ssim_fn(p, t, data_range=1.0, kernel_size=kernel)
    return {"psnr": float(psnr), "ssim": float(ssim)}


def add_metrics(rows: list[dict[str, Any]], images: dict[str, Tensor]) -> None:
    """Fill each row's ``psnr`` and ``ssim`` against the exact images (the exact row: against itself)."""
    reference = images[EXACT]
    for row in rows:
        row.update(image_metrics(images[row["name"]], reference))


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table."""

    def number(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    width = max(len(r["name"]) for r in rows)
    label_width = max(len(r["config"]) for r in rows)
    head = (
        f"{'configuration':<{width}}  {'label':<{label_width}}  {'PSNR dB':>8}  {'SSIM':>6}  {'computed':>8}  "
        f"{'seconds':>8}  {'speed-up':>8}  {'ideal':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<{width}}  {r['config']:<{label_width}}  {number(r['psnr'], '8.2f'):>8}  "
            f"{number(r['ssim'], '6.4f'):>6}  {r['computed_fraction']:>8.3f}  {r['seconds']:>8.2f}  "
            f"{r['speedup']:>8.2f}  {r['ideal_speedup']:>6.2f}"
        )
    return "\n".join(lines)


def write_report(
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
    out: str | Path,
    images: dict[str, Tensor] | None = None,
    targets: Tensor | None = None,
) -> Path:
    """``quality.json`` and ``quality.txt`` in ``out``; with matplotlib also ``quality.png`` and ``samples.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    text = table(rows)
    (out / "quality.txt").write_text(text + "\n")
    print(text, flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no quality.png / samples.png", flush=True)
        return out
    _plot_quality(plt, rows, out / "quality.png")
    if images is not None:
        _plot_samples(plt, images, targets, out / "samples.png")
    return out


def _plot_quality(plt: Any, rows: list[dict[str, Any]], path: Path) -> None:
    scored = [r for r in rows if r["psnr"] is not None and r["name"] != EXACT]
    if not scored:
        print("no PSNR measured: no quality.png", flush=True)
        return
    fig, ax = plt.subplots(figsize=(9, 6))
    psnr = [r["psnr"] for r in scored]
    ax.scatter(psnr, [r["speedup"] for r in scored], marker="o", label="wall clock: exact s / config s")
    ax.scatter(psnr, [r["ideal_speedup"] for r in scored], marker="x", label="blocks: 1 / computed fraction")
    for r in scored:
        ax.plot([r["psnr"]] * 2, [r["speedup"], r["ideal_speedup"]], color="grey", linewidth=0.6, alpha=0.6)
        ax.annotate(r["name"], (r["psnr"], r["speedup"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("PSNR against the exact images (dB)")
    ax.set_ylabel("speed-up")
    ax.set_title("Step caching: speed-up against image change")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_samples(plt: Any, images: dict[str, Tensor], targets: Tensor | None, path: Path, columns: int = 8) -> None:
    named = ([("drawn target", targets)] if targets is not None else []) + list(images.items())
    n = min(columns, named[0][1].shape[0])
    fig, axes = plt.subplots(len(named), 1, figsize=(n * 1.2 + 2.5, len(named) * 1.25), squeeze=False)
    for ax, (name, batch) in zip(axes[:, 0], named, strict=True):
        pictures = (batch[:n].float().cpu().clamp(-1, 1) + 1) / 2  # [n, 3, H, W]
        gap = torch.ones(3, pictures.shape[2], 1)
        strip = torch.cat([part for picture in pictures for part in (picture, gap)][:-1], dim=2)  # [3, H, n·(W+1)−1]
        ax.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The sampling and metric options this harness's scripts share (here and ``displaced.py``)."""
    parser.add_argument("--shift", type=float, default=1.0, help="FLUX time shift (1: none)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, ...")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no-metrics", action="store_true", help="skip PSNR and SSIM (no torchmetrics needed)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the folder train.py wrote")
    parser.add_argument("--out", required=True, help="folder for quality.json, quality.txt and the plots")
    parser.add_argument("--steps", type=int, default=28, help="sampling steps")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234, help="of the prompt set (prompt i's noise: seed + 1 + i)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per sampling run (the cache decides per run)")
    add_sampling_options(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.prompts < 1 or args.batch < 1:
        parser.error("--steps, --prompts and --batch must be ≥ 1")
    if not args.no_metrics:
        _torchmetrics()  # fail before sampling, not after
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else None
    device = device or torch.device(args.device)
    model = load(args.model, device, getattr(torch, args.dtype))
    prompts = prompt_set(args.prompts, model.size, args.seed, device)
    configs = configurations(args.steps)
    print(f"{len(configs)} configurations, {args.prompts} prompts, {args.steps} steps, {model.size}² on {device}")
    rows, images = evaluate(model, configs, prompts, args.steps, args.batch, args.shift, args.guidance)
    settings = {
        "model": str(args.model),
        "train": model.meta.get("train"),
        "size": model.size,
        "steps": args.steps,
        "prompts": args.prompts,
        "seed": args.seed,
        "batch": args.batch,
        "shift": args.shift,
        "guidance": args.guidance,
        "device": str(device),
        "dtype": args.dtype,
        "captions": prompts.batch.captions,
    }
    if not args.no_metrics:
        add_metrics(rows, images)
        settings["exact_vs_drawn"] = image_metrics(images[EXACT], prompts.batch.images.cpu())
        print(f"exact images against the drawn targets (how well the model learnt): {settings['exact_vs_drawn']}")
    write_report(rows, settings, args.out, images, prompts.batch.images.cpu())


if __name__ == "__main__":
    main()
