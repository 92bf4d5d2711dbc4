"""How far displaced (stale-KV) patch parallelism moves FLUX's images from the exact ones, measured on one device.

``parallelize_flux_displaced`` (``docs/displaced.md``) is inexact by design: after its warm-up steps each
rank attends to the other ranks' keys/values of the previous step. What it computes does not depend on
how the ranks talk, only on the number of patches ``P``, the warm-up and the text mode, so one device can
compute it: :class:`DisplacedSimulation` runs the plain transformer patch by patch, each patch's attention
over its own fresh k/v and the other patches' k/v of the previous step (``tests/test_displaced.py``
checks that the parallel mode on 2–4 ranks equals it within 1e-5).

The quality harness's small FLUX-architecture model (``train.py`` in this folder; ``--random``: the
same architecture untrained) samples its prompt set with an Euler sampler (``--steps`` strictly
decreasing timesteps: one run per image), first exactly, then for every ``--patches`` × ``--warmup`` ×
``--text``. Per configuration: PSNR and SSIM against the exact images (the harness's
``image_metrics``, torchmetrics) and the relative L2 distance. One JSON object per line in ``--out``: the
settings first, then one row per configuration (the exact row first, then a control row with warm-up =
steps, which must equal it).

    python benchmarks/quality/displaced.py --model /tmp/quality_model --out results/displaced_quality.jsonl
    python benchmarks/quality/displaced.py --tiny --out /tmp/displaced.jsonl       # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import data  # the quality harness's scripts (this folder)
import evaluate
import model as quality_model
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.modeling_outputs import Transformer2DModelOutput

Tensor = torch.Tensor
TEXT_MODES = ("replicate", "shard")


class DisplacedSimulation:
    """``transformer`` computing FLUX's displaced patch parallelism over ``patches`` patches, on one device.

    Call it like the transformer (any batch; ``img_ids`` / ``txt_ids`` ``[tokens, 3]``). A run starts
    when the timestep does not decrease (or the shapes change): its first ``warmup_steps`` calls run
    the plain model on the whole sequence. Every later call runs the plain model once per patch on that
    patch's image tokens (``tensor_split`` chunks) with the text (all of it with ``text="replicate"``,
    chunk ``p`` with ``"shard"``); each attention attends to the patch's own k/v and to the other
    patches' k/v of the previous call. The k/v a patch passes on: its image tokens' (and its text
    chunk's with ``"shard"``). Installs its own attention processors; :meth:`close` restores the
    transformer's. Not differentiable (inference).
    """

    def __init__(
        self, transformer: FluxTransformer2DModel, patches: int, warmup_steps: int, text: str = "replicate"
    ) -> None:
        if patches < 1 or warmup_steps < 1 or text not in TEXT_MODES:
            raise ValueError(f"DisplacedSimulation: patches {patches}, warm-up {warmup_steps}, text {text!r}")
        self.transformer, self.patches, self.warmup_steps, self.text = transformer, patches, warmup_steps, text
        self.originals = transformer.attn_processors
        transformer.set_attn_processor({name: _SimulatedAttention(self, name) for name in self.originals})
        self.step, self.timestep, self.key = 0, None, None
        self.previous: dict[str, list[tuple[Tensor, Tensor]]] = {}  # per layer, per patch: k/v passed on
        self.current: dict[str, list[Any]] = {}  # the same, being filled by this call
        self.patch: int | None = None  # the patch being computed (None: the whole sequence)
        self.text_len = 0  # text tokens of the sequence being computed

    def close(self) -> None:
        self.transformer.set_attn_processor(self.originals)

    def __call__(self, **call: Any) -> Any:
        return_dict = call.pop("return_dict", True)
        for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
            if call.get(name) is not None:
                raise ValueError(f"DisplacedSimulation: {name} is not supported")
        t = float(call["timestep"].reshape(-1)[0])
        key = (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))
        if self.timestep is None or t >= self.timestep or key != self.key:
            self.step, self.previous = 0, {}
        self.timestep, self.key = t, key
        self.current = {}
        if self.step < self.warmup_steps:
            self.patch, self.text_len = None, call["encoder_hidden_states"].shape[1]
            out = self.transformer(**call, return_dict=False)[0]
        else:
            parts = []
            for p in range(self.patches):
                local = self._patch_call(call, p)
                self.patch, self.text_len = p, local["encoder_hidden_states"].shape[1]
                parts.append(self.transformer(**local, return_dict=False)[0])
            out = torch.cat(parts, dim=1)
        self.previous, self.current, self.patch = self.current, {}, None
        self.step += 1
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _patch_call(self, call: dict[str, Any], p: int) -> dict[str, Any]:
        def chunk(x: Tensor, dim: int) -> Tensor:
            return x.tensor_split(self.patches, dim=dim)[p]

        local = dict(call, hidden_states=chunk(call["hidden_states"], 1), img_ids=chunk(_ids(call["img_ids"]), 0))
        if self.text == "shard":
            local.update(
                encoder_hidden_states=chunk(call["encoder_hidden_states"], 1), txt_ids=chunk(_ids(call["txt_ids"]), 0)
            )
        return local

    def keys(self, layer: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The keys/values ``[B, S, H, D]`` the current sequence (``[text; image]``) attends to in ``layer``;
        records what each patch passes on: its image tokens' k/v (and its text chunk's with ``"shard"``)."""
        t = self.text_len
        if self.patch is None:  # the whole sequence: exact; every patch's share is passed on
            chunks = [x.tensor_split(self.patches, dim=1) for x in (k[:, :t], k[:, t:], v[:, :t], v[:, t:])]
            parts = zip(*chunks, strict=True)
            if self.text == "shard":
                self.current[layer] = [(torch.cat((kt, ki), 1), torch.cat((vt, vi), 1)) for kt, ki, vt, vi in parts]
            else:
                self.current[layer] = [(ki, vi) for _, ki, _, vi in parts]
            return k, v
        passed = (k, v) if self.text == "shard" else (k[:, t:], v[:, t:])
        self.current.setdefault(layer, [None] * self.patches)[self.patch] = passed
        others = [kv for q, kv in enumerate(self.previous[layer]) if q != self.patch]
        return torch.cat([k, *(o[0] for o in others)], 1), torch.cat([v, *(o[1] for o in others)], 1)


def _ids(ids: Tensor) -> Tensor:
    if ids.dim() != 2:
        raise ValueError(f"DisplacedSimulation: ids must be [tokens, 3], got {tuple(ids.shape)}")
    return ids


class _SimulatedAttention:
    """diffusers' ``FluxAttnProcessor`` computation (unfused projections), with the simulation's keys."""

    def __init__(self, simulation: DisplacedSimulation, layer: str) -> None:
        self.simulation, self.layer = simulation, layer

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if attention_mask is not None or attn.fused_projections:
            raise ValueError("DisplacedSimulation: no attention mask, no fused projections")

        def heads(x: Tensor) -> Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat((eq, q), 1), torch.cat((ek, k), 1), torch.cat((ev, v), 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        k, v = self.simulation.keys(self.layer, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, out = out.split((encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]), 1)
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(text_out.contiguous())


# ------------------------------------------------------------------------------------------ the benchmark
def generate(model: Any, prompts: Any, sampler: Any, args: argparse.Namespace) -> Tensor:
    """Every prompt's image [N, 3, H, W] (CPU float32), one sampling run per prompt, through ``sampler``."""
    device = prompts.noise.device
    dtype = next(model.transformer.parameters()).dtype
    uncond = None
    with torch.no_grad():
        if args.guidance != 1.0:
            tokens, mask = data.encode("", prompts.batch.tokens.shape[1])
            uncond = model.encode(tokens.to(device)[None], mask.to(device)[None])
        images = []
        for i in range(len(prompts)):
            text = model.encode(prompts.batch.tokens[i : i + 1], prompts.batch.mask[i : i + 1])
            noise = prompts.noise[i : i + 1].to(dtype)
            images.append(evaluate.sample(sampler, text, noise, args.steps, args.shift, args.guidance, uncond))
    return torch.cat(images).float().cpu()


def row(images: Tensor, exact: Tensor, args: argparse.Namespace, **config: Any) -> dict[str, Any]:
    rel = ((images - exact).norm() / exact.norm()).item()
    out = {**config, "rel_l2_vs_exact": rel, "max_abs_vs_exact": (images - exact).abs().max().item()}
    if not args.no_metrics:
        out.update(evaluate.image_metrics(images, exact))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the folder benchmarks/quality/train.py wrote")
    p.add_argument("--random", action="store_true", help="the harness's model untrained (random weights)")
    p.add_argument("--tiny", action="store_true", help="a CPU smoke run: --random, 16² images, 4 steps, 2 prompts")
    p.add_argument("--out", required=True, help="the JSON-lines file to write")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234, help="of the prompt set")
    p.add_argument("--patches", type=int, nargs="+", default=[2, 4])
    p.add_argument("--warmup", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--text", nargs="+", choices=TEXT_MODES, default=list(TEXT_MODES))
    evaluate.add_sampling_options(p)
    args = p.parse_args(argv)
    if args.tiny:
        args.random, args.steps, args.prompts = True, min(args.steps, 4), min(args.prompts, 2)
    if (args.model is None) == (not args.random):
        p.error("pass --model FOLDER or --random (or --tiny)")
    if args.steps < 1 or args.prompts < 1 or min(args.patches) < 2 or min(args.warmup) < 1:
        p.error("--steps, --prompts and --warmup must be ≥ 1, --patches ≥ 2")
    if not args.no_metrics:
        evaluate._torchmetrics()  # fail before sampling, not after
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.random:
        torch.manual_seed(0)
        model = (
            quality_model.build(16 if args.tiny else 32).to(device, None if dtype == torch.float32 else dtype).eval()
        )
    else:
        model = quality_model.load(args.model, device, dtype)
    prompts = evaluate.prompt_set(args.prompts, model.size, args.seed, device)
    settings = {
        "settings": True, "model": args.model or "random", "size": model.size, "steps": args.steps,
        "prompts": args.prompts, "seed": args.seed, "shift": args.shift, "guidance": args.guidance,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
        "tokens": (model.size // 2) ** 2, "torch": torch.__version__,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:

        def write(record: dict[str, Any]) -> None:
            f.write(json.dumps(record) + "\n")
            f.flush()
            print(json.dumps(record), flush=True)

        write(settings)
        exact = generate(model, prompts, model.transformer, args)
        write(row(exact, exact, args, name="exact", patches=1, warmup_steps=args.steps, text=None))
        configs = [(2, args.steps, "replicate", "control: warm-up = steps")]
        configs += [(n, w, t, "displaced") for n in args.patches for w in args.warmup for t in args.text]
        for patches, warmup, text, name in configs:
            simulation = DisplacedSimulation(model.transformer, patches, warmup, text)
            try:
                images = generate(model, prompts, simulation, args)
            finally:
                simulation.close()
            write(row(images, exact, args, name=name, patches=patches, warmup_steps=warmup, text=text))


if __name__ == "__main__":
    main()
