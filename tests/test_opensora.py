"""Open-Sora 1.2 end to end: the video VAE against the reference's formulas, its checkpoint layout, the
parallel video decode and the parallel pipeline against one process.

The tiny VAE has the published structure at toy widths (SDXL-layout spatial VAE with 4 levels, so 8×
spatial compression; the temporal VAE with filters 8 and one res block, 4× temporal compression).
Multi-rank cases run in one spawn per world size: the parallel decode for many (batch, frames, size,
frame-group, gather, slab) settings and, on 2 and 4 ranks, the whole tiny pipeline on several
meshes; float32, equal to one process within 1e-4 (the VAE tests' bound; seen ≈1e-6).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import agreed_max, excess, expect_value_errors, run_ranks, worker_setup
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from models.stdit.pipeline import image_size, parallelize_opensora, parse_num_frames
from models.stdit.temporal_vae import CausalConv3d, depth_to_time
from models.stdit.video_vae import SPATIAL_SCALE, OpenSoraVAE, OpenSoraVAEConfig
from models.testing import tiny_opensora_pipeline
from parallel_vae import parallelize_vae, unparallelize_vae
from parallel_vae.video import choose_ranks_per_frame
from xdit_core import ParallelMesh

ATOL = RTOL = 1e-4
PUBLISHED_CONFIG = {  # hpcai-tech/OpenSora-VAE-v1.2 config.json, field for field
    "architectures": ["VideoAutoencoderPipeline"],
    "cal_loss": False,
    "freeze_vae_2d": False,
    "from_pretrained": None,
    "micro_frame_size": 17,
    "model_type": "VideoAutoencoderPipeline",
    "scale": [3.85, 2.32, 2.33, 3.06],
    "shift": [-0.1, 0.34, 0.27, 0.98],
    "torch_dtype": "float32",
    "transformers_version": "4.36.2",
    "vae_2d": {
        "from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
        "local_files_only": False,
        "micro_batch_size": 4,
        "subfolder": "vae",
        "type": "VideoAutoencoderKL",
    },
    "vae_temporal": {"from_pretrained": None, "type": "VAE_Temporal_SD"},
}


def tiny_vae(micro_batch_size: int = 3) -> OpenSoraVAE:
    vae = tiny_opensora_pipeline(seed=0).vae
    vae.config = dataclasses.replace(vae.config, micro_batch_size=micro_batch_size)
    return vae


TINY_VAE = tiny_vae()


def latent_frames_formula(t: int) -> int:
    return 5 * (t // 17) + math.ceil((t % 17) / 4)


# ---------------------------------------------------------------------------------------- single device
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 1000))
def test_latent_frames_and_chunks_follow_the_reference_formula(frames: int) -> None:
    vae = TINY_VAE
    assert vae.latent_frames(frames) == latent_frames_formula(frames)
    chunks = vae.temporal_chunks(frames)
    assert sum(c.frames for c in chunks) == frames and all(c.frames == 17 for c in chunks[:-1])
    assert [c.latent_start for c in chunks] == [5 * k for k in range(len(chunks))]


def test_latent_frames_of_the_published_durations() -> None:
    expected = {1: 1, 16: 4, 17: 5, 32: 9, 34: 10, 51: 15, 68: 20, 102: 30, 204: 60, 408: 120, 816: 240}
    assert {t: TINY_VAE.latent_frames(t) for t in expected} == expected


def test_decode_is_chunked_and_cropped_like_the_reference() -> None:
    """decode == per 5-latent chunk: temporal decoder, drop (4 − n mod 4) mod 4 front frames; then
    each frame through the spatial VAE at z / 0.18215 — recomposed here from the submodules."""
    vae, g = TINY_VAE, torch.Generator().manual_seed(0)
    for frames in (1, 4, 16, 17, 18, 40, 51):
        z = torch.randn(2, 4, latent_frames_formula(frames), 3, 5, generator=g)
        with torch.no_grad():
            got = vae.decode(z, num_frames=frames)
            x = z * vae.scale + vae.shift
            parts, left = [], frames
            for start in range(0, x.shape[2], 5):
                n = min(17, left)
                left -= 17
                decoded = vae.temporal_vae.decoder(vae.temporal_vae.post_quant_conv(x[:, :, start : start + 5]))
                parts.append(decoded[:, :, (4 - n % 4) % 4 :])
            x2d = torch.cat(parts, 2)
            module = vae.spatial_vae.module
            images = [module.decode(x2d[b, :, t][None] / SPATIAL_SCALE).sample for b in range(2) for t in range(frames)]
            expected = torch.stack(images).view(2, frames, 3, 24, 40).transpose(1, 2)
        assert got.shape == (2, 3, frames, 24, 40)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decode_refuses_latents_of_the_wrong_length() -> None:
    z = torch.randn(1, 4, 16, 3, 5)  # 51 frames need 15 latent frames (the reference would give 55 frames)
    with pytest.raises(ValueError, match=r"\[B, 4, 15, h, w\]"):
        TINY_VAE.decode(z, num_frames=51)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_frames"):
            TINY_VAE.decode(z, num_frames=bad)


def test_encode_shapes_front_padding_and_sampling() -> None:
    vae, g = TINY_VAE, torch.Generator().manual_seed(1)
    for frames in (1, 5, 17, 20, 34):
        x = torch.rand(1, 3, frames, 16, 24, generator=g) * 2 - 1
        with torch.no_grad():
            mean = vae.encode(x, sample=False)
            a = vae.encode(x, generator=torch.Generator().manual_seed(7))
            b = vae.encode(x, generator=torch.Generator().manual_seed(7))
        assert mean.shape == (1, 4, latent_frames_formula(frames), 2, 3)
        assert torch.equal(a, b) and not torch.equal(a, mean)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 4, 12, 16))


def test_temporal_convolutions_are_causal_with_zero_padding() -> None:
    conv = CausalConv3d(3, 5, 3)
    x = torch.randn(2, 3, 6, 4, 5)
    expected = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), conv.conv.weight, conv.conv.bias)
    torch.testing.assert_close(conv(x), expected)
    strided = CausalConv3d(3, 3, 3, stride_t=2)
    assert strided(x).shape[2] == 3  # one zero frame in front: 6 → 3
    # output frame t depends on input frames ≤ t only (GroupNorm statistics, by contrast, span the
    # whole chunk: chunks are independent, frames within a chunk are not)
    x2 = x.clone()
    x2[:, :, 4:] += 1
    with torch.no_grad():
        a, b = conv(x), conv(x2)
    assert torch.equal(a[:, :, :4], b[:, :, :4]) and not torch.equal(a[:, :, 4:], b[:, :, 4:])


def test_depth_to_time_interleaves_channel_pairs() -> None:
    x = torch.randn(2, 6, 4, 3, 2)
    out = depth_to_time(x)
    for c in range(3):
        for t in range(4):
            for j in range(2):
                assert torch.equal(out[:, c, 2 * t + j], x[:, 2 * c + j, t])


# ------------------------------------------------------------------------------------------ checkpoints
def test_full_size_state_dict_matches_the_published_inventory() -> None:
    with torch.device("meta"):
        vae = OpenSoraVAE()
    state = vae.state_dict()
    assert len(state) == 517
    prefixes = {"spatial_vae.module.": 248, "temporal_vae.encoder.": 131, "temporal_vae.decoder.": 132}
    for prefix, count in prefixes.items():
        assert sum(k.startswith(prefix) for k in state) == count, prefix
    numel = lambda prefix: sum(v.numel() for k, v in state.items() if k.startswith(prefix))  # noqa: E731
    assert numel("spatial_vae.") == 83_653_863
    assert numel("temporal_vae.encoder.") == 144_421_128 and numel("temporal_vae.decoder.") == 165_265_924
    shapes = {
        "scale": (1, 4, 1, 1, 1),
        "shift": (1, 4, 1, 1, 1),
        "temporal_vae.encoder.conv_in.conv.weight": (128, 4, 3, 3, 3),
        "temporal_vae.encoder.conv_blocks.1.conv.bias": (256,),
        "temporal_vae.encoder.block_res_blocks.3.0.conv3.conv.weight": (512, 256, 1, 1, 1),
        "temporal_vae.encoder.conv2.conv.weight": (8, 512, 1, 1, 1),
        "temporal_vae.quant_conv.conv.weight": (8, 8, 1, 1, 1),
        "temporal_vae.post_quant_conv.conv.bias": (4,),
        "temporal_vae.decoder.conv1.conv.weight": (512, 4, 3, 3, 3),
        "temporal_vae.decoder.conv_blocks.2.conv.weight": (1024, 512, 3, 3, 3),
        "temporal_vae.decoder.conv_blocks.1.conv.weight": (512, 256, 3, 3, 3),
        "temporal_vae.decoder.block_res_blocks.0.0.conv3.conv.weight": (128, 256, 1, 1, 1),
        "temporal_vae.decoder.conv_out.conv.weight": (4, 128, 3, 3, 3),
        "spatial_vae.module.decoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "spatial_vae.module.post_quant_conv.weight": (4, 4, 1, 1),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    absent = ("temporal_vae.encoder.conv_blocks.0.", "temporal_vae.decoder.conv_blocks.0.", "conv_in.conv.bias")
    assert not [k for k in state if any(a in k for a in absent[:2]) or k.endswith("encoder." + absent[2])]
    # The published model.safetensors is 1,573,430,548 bytes: an 8-byte length, the JSON header
    # (space-padded to 8 bytes) and the float32 data. Rebuilding that header from our names and
    # shapes gives the same size only if every key and shape matches.
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in sorted(state):
        size = state[key].numel() * 4
        header[key] = {"dtype": "F32", "shape": list(state[key].shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")).encode())
    assert 8 + text + (-text) % 8 + offset == 1_573_430_548


def test_published_config_gives_the_default_config() -> None:
    assert OpenSoraVAEConfig.from_dict(PUBLISHED_CONFIG) == OpenSoraVAEConfig()
    for change, message in (
        ({"cal_loss": True}, "cal_loss"),
        ({"extra_field": 1}, "unknown fields"),
        ({"vae_temporal": {"type": "VAE_Temporal"}}, "VAE_Temporal_SD"),
        ({"scale": [1.0, 2.0]}, "must agree"),
    ):
        with pytest.raises(ValueError, match=message):
            OpenSoraVAEConfig.from_dict({**PUBLISHED_CONFIG, **change})


def test_checkpoint_round_trip_and_clear_errors(tmp_path) -> None:
    vae = TINY_VAE
    vae.save_pretrained(tmp_path / "vae")
    loaded = OpenSoraVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config == vae.config
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values(), strict=True))
    z = torch.randn(1, 4, 6, 3, 4)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z, num_frames=18), vae.decode(z, num_frames=18))
    assert OpenSoraVAE.from_pretrained(tmp_path / "vae", dtype=torch.bfloat16).scale.dtype == torch.bfloat16
    state = load_file(str(tmp_path / "vae" / "model.safetensors"))
    broken = {
        "missing": {k: v for k, v in state.items() if k != "scale"},
        "unexpected": {**state, "temporal_vae.extra": torch.zeros(1)},
        "misshapen": {**state, "shift": torch.zeros(4)},
    }
    for name, tensors in broken.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "vae" / "config.json").read_text())
        save_file(tensors, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=name):
            OpenSoraVAE.from_pretrained(folder)
    with pytest.raises(ValueError, match="not found"):
        OpenSoraVAE.from_pretrained(tmp_path / "nowhere")


# -------------------------------------------------------------------------------------- pipeline pieces
def test_image_sizes_and_frame_counts_of_the_published_table() -> None:
    assert image_size("720p", "9:16") == (720, 1280) and image_size("720p", "1:1") == (960, 960)
    assert image_size("720p", "3:4") == (832, 1110) and image_size("720p", "16:9") == (1280, 720)
    assert image_size("480p", "9:16") == (480, 854) and image_size("480p", "1:1") == (640, 640)
    assert image_size("240p", "9:16") == (240, 426) and image_size("144p", "9:16") == (144, 256)
    assert image_size("360p", "9:16") == (360, 640) and image_size("1080p", "9:16") == (1080, 1920)
    assert [parse_num_frames(v) for v in ("image", "2s", "4s", "16s", "17", 33)] == [1, 51, 102, 408, 17, 33]
    for bad in (lambda: image_size("600p"), lambda: image_size("720p", "5:7")):
        with pytest.raises(ValueError, match="unsupported"):
            bad()
    for frames in (0, "3s", -1, "x"):
        with pytest.raises(ValueError, match="unsupported frame count"):
            parse_num_frames(frames)


def test_frame_groups_keep_every_rank_busy() -> None:
    assert choose_ranks_per_frame(frames=102, rows=90, size=4, requested=None) == 1
    assert choose_ranks_per_frame(frames=1, rows=90, size=4, requested=None) == 4
    assert choose_ranks_per_frame(frames=2, rows=90, size=4, requested=None) == 2
    assert choose_ranks_per_frame(frames=1, rows=2, size=4, requested=None) == 2  # rows cap it
    assert choose_ranks_per_frame(frames=3, rows=90, size=6, requested=None) == 2
    with pytest.raises(ValueError, match="latent rows"):
        choose_ranks_per_frame(frames=1, rows=3, size=4, requested=4)


def test_pipeline_needs_a_prompt_or_embeddings() -> None:
    pipe = tiny_opensora_pipeline()
    for kwargs in ({}, {"prompt": "a", "prompt_embeds": (torch.zeros(1), torch.zeros(1))}):
        with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
            pipe(**kwargs, height=64, width=64, num_frames=1, steps=1)
    with pytest.raises(ValueError, match="no text encoder"):
        dataclasses.replace(pipe, text_encoder=None)("a cat", height=64, width=64, num_frames=1, steps=1)


# -------------------------------------------------------------------------------------------- parallel
# (batch, frames, latent h, latent w, ranks_per_frame, gather_to, tile_rows)
DECODES = [
    (1, 17, 5, 7, None, None, None),  # one chunk
    (2, 40, 5, 7, None, None, None),  # 3 chunks (5, 5, 2 latent frames) per sample, 2 samples
    (1, 1, 6, 7, None, None, None),  # an image: one frame row-sharded over all ranks
    (1, 3, 4, 6, None, 0, 2),  # fewer frames than ranks, to rank 0 only, slabs of 2 rows
    (2, 51, 4, 4, 2, None, 1),  # frame groups of 2 ranks
    (1, 9, 3, 5, None, 1, None),  # to rank 1 only
    (1, 1, 2, 5, None, None, None),  # an image with fewer latent rows than ranks on 3 and 4
]
MESHES = {2: [(1, 1, 2), (2, 1, 1)], 4: [(2, 1, 2), (4, 1, 1), (1, 2, 2)]}  # (ulysses, ring, batch)


def _decode_cases(vae: OpenSoraVAE, world: int) -> None:
    group = dist.group.WORLD
    for index, (batch, frames, h, w, per_frame, to, tile) in enumerate(DECODES):
        if per_frame is not None and world % per_frame:
            continue
        z = torch.randn(batch, 4, vae.latent_frames(frames), h, w, generator=torch.Generator().manual_seed(index))
        with torch.no_grad():
            expected = vae.decode(z, num_frames=frames)
            parallelize_vae(vae, group, ranks_per_frame=per_frame, gather_to=to, tile_rows=tile)
            got = vae.decode(z, num_frames=frames)
            unparallelize_vae(vae)
            assert torch.equal(vae.decode(z, num_frames=frames), expected)  # unparallelize restores it
        if to is None or dist.get_rank() == to:
            worst = agreed_max(excess(got, expected, ATOL, RTOL))
        else:  # the other ranks keep the frames they contributed
            b, c, t, height, width = expected.shape
            assert got.dim() == 4 and tuple(got.shape[1:]) == (c, height, width) and got.shape[0] <= b * t
            worst = agreed_max(-1.0)
        assert worst <= 0, f"case {index} on {world} ranks: {worst:.2e}"


def _decode_errors(vae: OpenSoraVAE, world: int) -> list[str]:
    group = dist.group.WORLD
    z = torch.randn(1, 4, 5, 3, 4)
    cases = {
        "ranks_per_frame not a divisor": lambda: parallelize_vae(vae, group, ranks_per_frame=world + 1),
        "ranks_per_frame on an image VAE": lambda: parallelize_vae(vae.spatial_vae.module, group, ranks_per_frame=1),
    }
    parallelize_vae(vae, group, ranks_per_frame=world)
    cases |= {
        "latents of the wrong length": lambda: vae.decode(z, num_frames=18),
        "more ranks per frame than rows": lambda: vae.decode(torch.randn(1, 4, 1, world - 1, 4), num_frames=1),
        "latents that need grad": lambda: vae.decode(z.clone().requires_grad_(), num_frames=17),
        "already parallel": lambda: parallelize_vae(vae, group),
    }
    messages = expect_value_errors(cases)
    unparallelize_vae(vae)
    return messages


def _pipeline_cases(world: int) -> None:
    pipe = tiny_opensora_pipeline(seed=0)
    call = dict(height=64, width=96, num_frames=20, steps=3)  # 2 chunks: 17 + 3 frames, 6 latent frames
    expected = pipe("A cat playing piano.", **call)
    for u, r, b in MESHES[world]:
        mesh = ParallelMesh.build(ulysses=u, ring=r, batch=b)
        for video_rank in (None, world - 1):
            local = tiny_opensora_pipeline(seed=0)
            if dist.get_rank() != 0:  # only the text rank needs T5
                local = dataclasses.replace(local, text_encoder=None)
            parallel = parallelize_opensora(local, mesh, video_rank=video_rank)
            out = parallel("A cat playing piano.", **call)
            assert agreed_max(excess(out.latents, expected.latents, ATOL, RTOL)) <= 0, mesh.describe()
            receives = video_rank is None or dist.get_rank() == video_rank
            assert (out.video is not None) == receives
            worst = agreed_max(excess(out.video, expected.video, ATOL, RTOL) if receives else -1.0)
            assert worst <= 0, f"video on {mesh.describe()}: {worst:.2e}"


def _opensora_worker(world: int) -> list[str]:
    worker_setup()
    vae = tiny_vae()
    _decode_cases(vae, world)
    messages = _decode_errors(vae, world)
    if world in MESHES:
        _pipeline_cases(world)
    return messages


@pytest.mark.parametrize("world", [2, 3, 4])
def test_parallel_video_decode_and_pipeline_equal_one_process(world: int) -> None:
    messages = run_ranks(_opensora_worker, world, world, timeout_s=600)
    assert messages[0] == messages[-1]  # the same errors, in the same order, on every rank
