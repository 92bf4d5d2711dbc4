"""STDiT3: the model's numerics and checkpoints, and parallelize_stdit / the sampler against one process.

One spawn per world size; in it a tiny random STDiT3 (depth 2, hidden 64, 4 heads, float32) runs
each case plain, then parallel on every mesh and spatial mode, then plain again after
``unparallelize_stdit``: odd positions per frame, one-frame images, several frames, text masks of
different lengths per sample, and the timestep-0 ``x_mask`` path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_utils import agreed_max, excess, expect_value_errors, run_ranks, worker_setup

from models.stdit import STDiT3, STDiT3Config, parallelize_stdit, rflow_sample, rflow_timesteps, unparallelize_stdit
from models.stdit.layers import GeluLinear, RotaryEmbedding, sincos_pos_embed_2d, timestep_embedding
from xdit_core import ParallelMesh

TINY = STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=10)

# world size -> meshes (ulysses, ring, batch)
MESHES = {
    2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
    3: [(3, 1, 1), (1, 3, 1)],
    4: [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2)],
}
# (batch, latent frames, latent height, latent width): 5×4 = 20 positions with H and W padded, a
# one-frame image of 3×5, 5 frames of 3×3 (9 positions: uneven on 2 and 4 ranks), 6×2 over 2 frames
SHAPES = [(2, 3, 9, 7), (2, 1, 6, 10), (2, 5, 5, 5), (3, 2, 11, 3)]


def tiny_model(seed: int = 0, config: STDiT3Config = TINY) -> STDiT3:
    torch.manual_seed(seed)
    model = STDiT3(config).eval()
    with torch.no_grad():  # the zero-initialised-looking parts random too, so every path matters
        for p in model.parameters():
            if p is not model.rope.freqs:  # fixed frequencies, not a weight
                p.add_(torch.randn_like(p) * 0.02)
    return model


def stdit_inputs(batch: int, frames: int, h: int, w: int, seed: int, x_mask: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, TINY.model_max_length, dtype=torch.bool)
    for b in range(batch):  # a different number of valid text tokens per sample
        mask[b, : 2 + (3 * b + seed) % (TINY.model_max_length - 1)] = True
    inputs = dict(
        x=torch.randn(batch, TINY.in_channels, frames, h, w, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        y=torch.randn(batch, 1, TINY.model_max_length, TINY.caption_channels, generator=g),
        mask=mask,
        fps=torch.tensor([24.0]),
        height=torch.tensor([h * 8.0]),
        width=torch.tensor([w * 8.0]),
    )
    if x_mask:
        inputs["x_mask"] = torch.rand(batch, frames, generator=g) > 0.5
    return inputs


def _stdit_worker(meshes: list[tuple[int, int, int]]) -> list[str]:
    worker_setup()
    model = tiny_model()
    report = []
    with torch.no_grad():
        for u, r, b in meshes:
            mesh = ParallelMesh.build(ulysses=u, ring=r, batch=b)
            for index, (batch, frames, h, w) in enumerate(SHAPES):
                inputs = stdit_inputs(batch, frames, h, w, seed=index, x_mask=index == 0)
                expected = model(**inputs)
                modes = ["usp"] + (["dsp"] if frames >= mesh.sp_size else [])
                for spatial in modes:
                    parallelize_stdit(model, mesh, spatial=spatial)
                    got = model(**inputs)
                    unparallelize_stdit(model)
                    worst = agreed_max(excess(got, expected))
                    assert worst <= 0, f"mesh {mesh.describe()} shape {(batch, frames, h, w)} {spatial}: {worst:.2e}"
                    report.append(f"{mesh.describe()} {batch}x{frames}x{h}x{w} {spatial}")
                assert torch.equal(model(**inputs), expected), "unparallelize_stdit must restore the plain model"
    return report


def _sampler_and_errors_worker() -> list[str]:
    """On 4 ranks: the sampler on b2×u2 and u4 equals the single-process sampler; bad calls raise."""
    worker_setup()
    model = tiny_model()
    inputs = stdit_inputs(2, 3, 9, 7, seed=5)
    noise = inputs["x"]
    args = dict(num_frames=51, height=72, width=56, steps=3, cfg_scale=7.0, fps=24.0)
    expected = rflow_sample(model, noise, inputs["y"], inputs["mask"], **args)
    for mesh in (ParallelMesh.build(ulysses=2, batch=2), ParallelMesh.build(ulysses=4)):
        parallelize_stdit(model, mesh)
        got = rflow_sample(model, noise, inputs["y"], inputs["mask"], **args)
        unparallelize_stdit(model)
        assert agreed_max(excess(got, expected)) <= 0, mesh.describe()
    mesh = ParallelMesh.build(ulysses=4)
    parallelize_stdit(model, mesh, spatial="dsp")
    one = stdit_inputs(1, 3, 9, 7, seed=6)
    cases = {
        "4-D latents": lambda: model(one["x"][:, :, 0], one["timestep"], one["y"]),
        "wrong latent channels": lambda: model(one["x"][:, :2], one["timestep"], one["y"]),
        "text of another length": lambda: model(one["x"], one["timestep"], one["y"][:, :, :5]),
        "mask of another length": lambda: model(one["x"], one["timestep"], one["y"], one["mask"][:, :5]),
        "a sample without text": lambda: model(one["x"], one["timestep"], one["y"], torch.zeros_like(one["mask"])),
        "dsp with fewer frames than ranks": lambda: model(one["x"][:, :, :2], one["timestep"], one["y"]),
        "fewer positions than ranks": lambda: model(one["x"][:, :, :, :2, :2], one["timestep"], one["y"]),
    }
    messages = expect_value_errors(cases)
    unparallelize_stdit(model)
    b2 = ParallelMesh.build(ulysses=2, batch=2)
    parallelize_stdit(model, b2)
    messages += expect_value_errors({"batch smaller than the batch axis": lambda: model(**one)})
    unparallelize_stdit(model)
    return messages


@pytest.mark.parametrize("world", [2, 3, 4])
def test_parallel_stdit_equals_plain_model(world: int) -> None:
    report = run_ranks(_stdit_worker, world, MESHES[world], timeout_s=600)[0]
    assert len(report) >= len(MESHES[world]) * len(SHAPES)


def test_parallel_sampler_equals_single_process_and_bad_input_raises() -> None:
    messages = run_ranks(_sampler_and_errors_worker, 4, timeout_s=600)
    assert all(m == messages[0] for m in messages), "every rank must raise the same errors"
    text = "\n".join(messages[0])
    for fragment in ("x must be [B, 4, T, H, W]", "y must be", "mask must be", "at least one valid text token",
                     "use spatial='usp'", "spatial positions per frame", "batch axis"):  # fmt: skip
        assert fragment in text, f"{fragment!r} not in:\n{text}"


# ----------------------------------------------------------------------------- one process
def test_full_size_state_dict_matches_the_published_inventory() -> None:
    with torch.device("meta"):
        model = STDiT3(STDiT3Config())
    state = model.state_dict()
    assert len(state) == 973
    assert sum(t.numel() for t in state.values()) == 1_208_872_772
    shapes = {
        "x_embedder.proj.weight": [1152, 4, 1, 2, 2], "t_embedder.mlp.0.weight": [1152, 256],
        "fps_embedder.mlp.2.weight": [1152, 1152], "t_block.1.weight": [6912, 1152],
        "y_embedder.y_embedding": [300, 4096], "y_embedder.y_proj.fc1.weight": [1152, 4096], "rope.freqs": [36],
        "final_layer.linear.weight": [32, 1152], "final_layer.scale_shift_table": [2, 1152],
        "spatial_blocks.0.attn.qkv.weight": [3456, 1152], "spatial_blocks.0.attn.q_norm.weight": [72],
        "temporal_blocks.27.cross_attn.kv_linear.weight": [2304, 1152],
        "temporal_blocks.27.mlp.fc1.weight": [4608, 1152],
        "spatial_blocks.13.scale_shift_table": [6, 1152], "temporal_blocks.0.attn.proj.bias": [1152],
    }  # fmt: skip
    for key, shape in shapes.items():
        assert list(state[key].shape) == shape, key
    assert all(k.split(".")[0] in {"x_embedder", "t_embedder", "fps_embedder", "t_block", "y_embedder", "rope",
                                   "final_layer", "spatial_blocks", "temporal_blocks"} for k in state)  # fmt: skip


def test_checkpoint_round_trip_and_clear_errors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.save_pretrained(tmp_path / "ok")
    loaded = STDiT3.from_pretrained(tmp_path / "ok")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = stdit_inputs(2, 3, 9, 7, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))
    state = load_file(tmp_path / "ok" / "model.safetensors")
    config = (tmp_path / "ok" / "config.json").read_text()

    def folder(name: str, tensors: dict) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        save_file(tensors, tmp_path / name / "model.safetensors")
        return str(tmp_path / name)

    no_rope = STDiT3.from_pretrained(folder("no_rope", {k: v for k, v in state.items() if k != "rope.freqs"}))
    assert torch.equal(no_rope.rope.freqs, model.rope.freqs)
    missing = folder("missing", {k: v for k, v in state.items() if k != "spatial_blocks.1.mlp.fc2.bias"})
    with pytest.raises(ValueError, match=r"missing \['spatial_blocks.1.mlp.fc2.bias'\]"):
        STDiT3.from_pretrained(missing)
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        STDiT3.from_pretrained(folder("extra", {**state, "extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="misshapen"):
        STDiT3.from_pretrained(folder("shape", {**state, "t_block.1.bias": torch.zeros(5)}))
    with pytest.raises(ValueError, match="not found"):
        STDiT3.from_pretrained(tmp_path / "nowhere")


def test_rotary_embedding_rotates_interleaved_pairs() -> None:
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 5, 8)
    out = rope(5, x.device, x.dtype)(x)
    for pos in range(5):
        for i in range(4):
            angle = pos * rope.freqs[i]
            a, b = x[:, pos, 2 * i], x[:, pos, 2 * i + 1]
            torch.testing.assert_close(out[:, pos, 2 * i], a * torch.cos(angle) - b * torch.sin(angle))
            torch.testing.assert_close(out[:, pos, 2 * i + 1], b * torch.cos(angle) + a * torch.sin(angle))
    torch.testing.assert_close(rope.freqs, 1 / 10000 ** (torch.arange(0, 8, 2) / 8))


def test_rotation_applies_along_any_dim() -> None:
    rope = RotaryEmbedding(8)
    x = torch.randn(3, 5, 2, 8)  # [B', L, H, d]: the layout the temporal attention rotates in
    rotation = rope(5, x.device, x.dtype)
    assert torch.equal(rotation(x, dim=1), rotation(x.transpose(1, 2)).transpose(1, 2))


def test_gelu_linear_is_the_linear_then_the_tanh_gelu() -> None:
    """The CPU path (and the path with gradients) is the two ops; the CUDA epilogue is checked on a GPU
    (tests/test_gpu_kernels.py)."""
    torch.manual_seed(0)
    layer = GeluLinear(16, 32)
    x = torch.randn(3, 5, 16, requires_grad=True)
    want = F.gelu(F.linear(x, layer.weight, layer.bias), approximate="tanh")
    got = layer(x)
    assert torch.equal(got, want)
    (gx,) = torch.autograd.grad(got.square().sum(), x)
    (wx,) = torch.autograd.grad(want.square().sum(), x)
    assert torch.equal(gx, wx)
    with torch.no_grad():
        assert torch.equal(layer(x), want)


def test_position_embedding_puts_the_column_first_and_timestep_cos_first() -> None:
    pos = sincos_pos_embed_2d(16, 3, 4, 1.0, 3, torch.device("cpu"), torch.float32)[0].view(3, 4, 16)
    assert torch.equal(pos[0, :, :8], pos[2, :, :8])  # first half: same in every row (column coordinate)
    assert torch.equal(pos[:, 0, 8:], pos[:, 3, 8:])  # second half: same in every column (row coordinate)
    assert torch.equal(pos[0, 0], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1] * 2))  # sin(0) then cos(0)
    emb = timestep_embedding(torch.tensor([0.0]), 8)
    assert torch.equal(emb, torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]))


def test_cross_attention_sees_only_its_samples_valid_text() -> None:
    model = tiny_model()
    attn = model.spatial_blocks[0].cross_attn
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 6, 64, generator=g), torch.randn(2, 10, 64, generator=g)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :3], mask[1, :7] = True, True
    with torch.no_grad():
        got = attn(x, y, mask)
        for b, n in ((0, 3), (1, 7)):
            q = attn.q_linear(x[b]).view(6, 4, 16).transpose(0, 1)
            k, v = attn.kv_linear(y[b, :n]).view(n, 2, 4, 16).permute(1, 2, 0, 3)
            ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(6, 64))
            torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=1e-5)


def test_x_mask_all_true_is_no_mask_and_false_frames_use_timestep_zero() -> None:
    model = tiny_model()
    inputs = stdit_inputs(1, 3, 4, 4, seed=2)
    with torch.no_grad():
        plain = model(**inputs)
        assert torch.equal(model(**inputs, x_mask=torch.ones(1, 3, dtype=torch.bool)), plain)
        all_zero = model(**{**inputs, "timestep": torch.zeros(1)}, x_mask=torch.ones(1, 3, dtype=torch.bool))
        assert torch.allclose(model(**inputs, x_mask=torch.zeros(1, 3, dtype=torch.bool)), all_zero, atol=1e-6)


def test_rflow_timesteps_follow_the_transform() -> None:
    plain = rflow_timesteps(30, num_frames=102, height=720, width=1280, transform=False)
    assert plain[0] == 1000 and math.isclose(plain[-1], 1000 / 30)
    ts = rflow_timesteps(30, num_frames=102, height=720, width=1280)
    ratio = math.sqrt(720 * 1280 / 512**2) * math.sqrt(30)
    for t, u in zip(ts, plain, strict=True):
        assert math.isclose(t, ratio * (u / 1000) / (1 + (ratio - 1) * (u / 1000)) * 1000)
    assert rflow_timesteps(4, num_frames=1, height=512, width=512) == [1000, 750, 500, 250]
