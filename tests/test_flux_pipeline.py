"""A stock FluxPipeline in parallel: the image of 2 and 4 processes equals the single-process image.

The tiny random pipeline is saved once (safetensors) and every rank loads it with
``FluxPipeline.from_pretrained``: the real loading path.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from diffusers import FluxPipeline
from dist_utils import agreed_max, run_ranks, worker_setup

from models import load_flux_pipeline, parallelize_flux_pipeline, unparallelize_flux_pipeline
from models.flux.pipeline import TEXT_COMPONENTS
from models.testing import tiny_flux_pipeline
from xdit_core import ParallelMesh

# world size -> (ulysses, ring, batch, text mode, prompts, negative prompt or None)
CASES = {
    2: [
        (2, 1, 1, "shard", ["a red cat"], None),
        (1, 2, 1, "replicate", ["a photo of a dog", "blue sky"], None),
        (1, 1, 2, "shard", ["a photo of a dog", "blue sky"], None),
        (1, 1, 2, "shard", ["a red cat"], "blurry"),  # true CFG: cond and uncond on the batch axis
    ],
    4: [
        (2, 2, 1, "shard", ["a small house on a river"], "dark"),
        (2, 1, 2, "replicate", ["a red cat"], "blurry"),
        (4, 1, 1, "shard", ["old city street at night"], None),
    ],
}
STEPS, SIZE = 3, (40, 24)  # 40×24 pixels: 20×12 latents, 10×6 = 60 image tokens


def generate(pipe, prompts: list[str], negative: str | None) -> np.ndarray:
    extra = {} if negative is None else dict(negative_prompt=[negative] * len(prompts), true_cfg_scale=4.0)
    out = pipe(
        prompts,
        height=SIZE[0],
        width=SIZE[1],
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(7),
        max_sequence_length=24,
        output_type="np",
        **extra,
    )
    return out.images


def _pipeline_worker(folder: str, cases: list) -> list[float]:
    worker_setup()
    pipe = load_flux_pipeline(folder, ParallelMesh.build(ulysses=dist.get_world_size()))
    pipe.set_progress_bar_config(disable=True)
    # only rank 0 encodes text: the others load no text encoders or tokenizers
    assert all((getattr(pipe, name) is None) == (dist.get_rank() != 0) for name in TEXT_COMPONENTS)
    reference_pipe = FluxPipeline.from_pretrained(folder)  # stays plain
    reference_pipe.set_progress_bar_config(disable=True)
    errors = []
    for u, r, b, text, prompts, negative in cases:
        expected = generate(reference_pipe, prompts, negative)
        parallel = parallelize_flux_pipeline(pipe, ParallelMesh.build(ulysses=u, ring=r, batch=b), text=text)
        got = generate(parallel, prompts, negative)
        unparallelize_flux_pipeline(parallel)
        err = agreed_max(float(np.abs(got - expected).max()))
        assert got.shape == expected.shape and err <= 1e-4, f"u{u}r{r}b{b} {text} {prompts} {negative}: {err:.2e}"
        errors.append(err)
    # rank 0 failing to encode (no text encoder there either) fails every rank, none waits forever
    parallel = parallelize_flux_pipeline(pipe, ParallelMesh.build(ulysses=dist.get_world_size()))
    pipe.text_encoder = pipe.text_encoder_2 = None
    try:
        generate(parallel, ["a red cat"], None)
    except Exception as e:  # rank 0: the encoder's own error; the others: rank 0's, re-raised
        assert dist.get_rank() == 0 or "encoding the prompt and drawing the latents failed on group rank 0" in str(e), e
    else:
        raise AssertionError("a failed prompt encoding on rank 0 must fail every rank")
    dist.barrier()
    return errors


def test_parallel_pipeline_equals_single_process(tmp_path) -> None:
    tiny_flux_pipeline(seed=3).save_pretrained(tmp_path, safe_serialization=True)
    for world, cases in CASES.items():
        errors = run_ranks(_pipeline_worker, world, str(tmp_path), cases, timeout_s=600)
        assert all(e == errors[0] for e in errors)


def test_example_script_runs_tiny_pipeline(tmp_path) -> None:
    """examples/flux_generate.py under torchrun (2 CPU ranks, true CFG on the batch axis) writes the image."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "flux_generate.py"
    out = tmp_path / "tiny.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--batch", "2", "--true-cfg", "3", "--negative-prompt", "blurry", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh b2×u1×r1" in result.stdout and "ms per step" in result.stdout, result.stdout
    assert out.stat().st_size > 0
