"""Open-Sora text conditioning (prompt_for_t5, the T5 encoder, encoding once per group) and video output."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import expect_value_errors, run_ranks, worker_setup

from models.stdit.text import (
    OPEN_SORA_AES,
    T5TextEncoder,
    encode_prompts_shared,
    prompt_for_t5,
)
from models.stdit.video_io import video_to_uint8, write_mp4
from models.testing import tiny_t5_text_encoder

PROMPTS = ["A cat playing piano.", "Café ünïcode 🎹", "x" * 400, ""]


@pytest.fixture(scope="module")
def encoder() -> T5TextEncoder:
    return tiny_t5_text_encoder(seed=0)


# ----------------------------------------------------------------------------- prompt_for_t5
@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("A cat playing piano.", "a cat playing piano. aesthetic score: 6.5."),
        (
            "A dog <b>running</b> on the beach, see https://example.com/dogs for more",
            "a dog running on the beach, see for more aesthetic score: 6.5.",
        ),
        ("Sunset by @photographer_1 over the SEA!", "sunset by over the sea! aesthetic score: 6.5."),
        ("  A Cat  ", "a cat aesthetic score: 6.5."),
        ("Café &amp; croissant", "café croissant aesthetic score: 6.5."),
    ],
)
def test_prompt_for_t5_cleans_after_appending_the_score(prompt: str, expected: str) -> None:
    assert OPEN_SORA_AES == 6.5
    assert prompt_for_t5(prompt) == expected


def test_prompt_for_t5_options() -> None:
    assert prompt_for_t5("  A Cat  ", clean=False) == "a cat   aesthetic score: 6.5."
    assert prompt_for_t5("<b>Hi</b> ", clean=False) == "<b>hi</b>  aesthetic score: 6.5."
    assert prompt_for_t5("A <i>Cat</i>.", aes=None) == "a cat."
    assert prompt_for_t5("A cat.", aes=7) == "a cat. aesthetic score: 7.0."
    assert prompt_for_t5("A cat. aesthetic score: 5.0.") == "a cat. aesthetic score: 5.0."  # already stated
    for bad in (dict(prompt=["a"]), dict(prompt="a", aes=float("nan")), dict(prompt="a", aes="6.5")):
        with pytest.raises(ValueError, match="prompt_for_t5"):
            prompt_for_t5(**bad)


@pytest.mark.parametrize("name, package", [("ftfy", "ftfy"), ("BeautifulSoup", "beautifulsoup4")])
def test_prompt_for_t5_without_cleaning_packages_raises(monkeypatch, name: str, package: str) -> None:
    from diffusers import PixArtAlphaPipeline

    # diffusers binds bs4/ftfy in the pipeline's module only when they are installed
    monkeypatch.delattr(sys.modules[PixArtAlphaPipeline.__module__], name)
    with pytest.raises(ValueError, match=rf"needs {package}.*pip install beautifulsoup4 ftfy.*clean=False"):
        prompt_for_t5("A cat.")
    assert prompt_for_t5("A Cat.", clean=False) == "a cat. aesthetic score: 6.5."


# ----------------------------------------------------------------------------- the T5 encoder
def test_tiny_encoder_shapes_masks_and_truncation(encoder: T5TextEncoder) -> None:
    y, mask = encoder.encode(PROMPTS)
    assert y.shape == (4, 1, 300, 32) and y.dtype == torch.float32 and encoder.hidden_size == 32
    assert mask.shape == (4, 300) and mask.dtype == torch.int64
    ids = encoder.tokenizer(PROMPTS, max_length=300, padding="max_length", truncation=True)["input_ids"]
    for i, prompt in enumerate(PROMPTS):
        n = min(len(prompt.encode("utf-8")) + 1, 300)  # the bytes and </s>, truncated at 300
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all(), (i, int(mask[i].sum()), n)
        assert ids[i][n - 1] == 1 and all(t == 0 for t in ids[i][n:])  # </s> last, <pad> after
        assert ids[i][: n - 1] == [3 + b for b in prompt.encode("utf-8")][: n - 1]
    assert torch.isfinite(y).all() and y[0, 0, 0].std() > 0.1
    # the mask reaches attention: with less padding the valid positions come out the same
    n = len(PROMPTS[0]) + 1
    y_short, mask_short = tiny_t5_text_encoder(seed=0, max_length=40).encode(PROMPTS[:1])
    assert y_short.shape == (1, 1, 40, 32) and int(mask_short.sum()) == n
    torch.testing.assert_close(y_short[0, 0, :n], y[0, 0, :n], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="non-empty list of str"):
        encoder.encode("a bare string")
    with pytest.raises(ValueError, match=r"prompts \[1\] are not str"):
        encoder.encode(["a", 3])


def test_tiny_encoder_is_deterministic_per_seed_and_leaves_the_rng_alone(encoder: T5TextEncoder) -> None:
    state = torch.get_rng_state()
    again, other = tiny_t5_text_encoder(seed=0), tiny_t5_text_encoder(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    y = encoder.encode(PROMPTS[:2])[0]
    assert torch.equal(again.encode(PROMPTS[:2])[0], y)
    assert not torch.equal(other.encode(PROMPTS[:2])[0], y)
    small = tiny_t5_text_encoder(d_model=16, max_length=8, dtype=torch.bfloat16)
    y, mask = small.encode(["abcdefghijk", "ab"])
    assert y.shape == (2, 1, 8, 16) and y.dtype == torch.bfloat16 and mask.sum(1).tolist() == [8, 3]


def test_save_and_load_round_trip_bit_identical(encoder: T5TextEncoder, tmp_path) -> None:
    y, mask = encoder.encode(PROMPTS)
    loaded = T5TextEncoder.from_pretrained(encoder.save_pretrained(tmp_path / "t5"))
    y2, mask2 = loaded.encode(PROMPTS)
    assert torch.equal(mask2, mask) and torch.equal(y2, y) and loaded.model.dtype == torch.float32
    # diffusers' layout: tokenizer/ and text_encoder/ subfolders
    encoder.tokenizer.save_pretrained(tmp_path / "pipe" / "tokenizer")
    encoder.model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    split = T5TextEncoder.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16)
    assert split.model.dtype == torch.bfloat16 and torch.equal(split.encode(PROMPTS)[1], mask)


def test_from_pretrained_refuses_what_is_not_a_local_encoder(encoder: T5TextEncoder, tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=re.escape(f"{missing} is not a folder")):
        T5TextEncoder.from_pretrained(missing)
    with pytest.raises(ValueError, match=r"neither config.json"):
        T5TextEncoder.from_pretrained(tmp_path)
    encoder.model.config.save_pretrained(tmp_path / "no_weights")
    encoder.tokenizer.save_pretrained(tmp_path / "no_weights")
    with pytest.raises(ValueError, match="no weights"):
        T5TextEncoder.from_pretrained(tmp_path / "no_weights")
    encoder.model.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match="no tokenizer files"):
        T5TextEncoder.from_pretrained(tmp_path / "no_tokenizer")


def _shared_worker() -> list[str]:
    """On 2 ranks: encode on src 0 and on src 1 equals this rank's own encode; bad calls raise on both."""
    worker_setup()
    group, rank = dist.group.WORLD, dist.get_rank()
    prompts = [prompt_for_t5(p) for p in PROMPTS]
    local = tiny_t5_text_encoder(seed=0)  # built in every process: the same weights everywhere
    expected = local.encode(prompts)
    for src in (0, 1):
        y, mask = encode_prompts_shared(local if rank == src else None, prompts, group, src=src, device="cpu")
        assert torch.equal(y, expected[0]) and torch.equal(mask, expected[1]), f"src {src} rank {rank}"
    cases = {
        "src without an encoder": lambda: encode_prompts_shared(None, prompts, group, src=1, device="cpu"),
        "src given a bare str": lambda: encode_prompts_shared(local, "a cat", group, src=0, device="cpu"),
        "src outside the group": lambda: encode_prompts_shared(local, prompts, group, src=2, device="cpu"),
    }
    return expect_value_errors(cases, group)


def test_encode_prompts_shared_equals_local_encode_on_two_ranks() -> None:
    messages = run_ranks(_shared_worker, 2, timeout_s=120)
    for fragment in ("must pass a T5TextEncoder", "non-empty list of str", "src=2 must be a group rank in [0, 2)"):
        assert all(fragment in "\n".join(m) for m in messages), (fragment, messages)
    assert "encoding the prompts failed on group rank 1" in messages[0][0]  # rank 0 heard of rank 1's failure


# ----------------------------------------------------------------------------- video output
def test_video_to_uint8_values_and_layout() -> None:
    values = torch.tensor([-1.0, 0.0, 1.0, 0.5, -3.0, 2.0, 0.999])
    video = values.view(1, 1, 1, -1).expand(3, 1, 1, -1).clone()
    video[1] = -1.0
    out = video_to_uint8(video)
    assert out.shape == (1, 1, 7, 3) and out.dtype == torch.uint8
    # -1 -> 0, 0 -> 127.5 + 0.5 = 128, 1 -> 255, 0.5 -> 191.75 -> 191, out of range clamps
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 191, 0, 255, 255]
    assert out[0, 0, :, 1].eq(0).all() and torch.equal(out[..., 2], out[..., 0])
    g = torch.Generator().manual_seed(0)
    video = torch.randn(3, 2, 4, 6, generator=g).to(torch.bfloat16)
    expected = ((video.float().clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(video_to_uint8(video), expected.permute(1, 2, 3, 0))
    for bad, match in [
        (torch.zeros(4, 1, 2, 2), r"\[3, T, H, W\]"),
        (torch.zeros(3, 2, 2), r"\[3, T, H, W\]"),
        (torch.zeros(3, 1, 2, 2, dtype=torch.uint8), "floating point"),
        (torch.full((3, 1, 2, 2), float("nan")), "12 NaN"),
    ]:
        with pytest.raises(ValueError, match=match):
            video_to_uint8(bad)


def test_write_mp4_round_trips_through_pyav(tmp_path, monkeypatch) -> None:
    import av

    t, h, w = 5, 32, 48
    ramp_h, ramp_w = torch.linspace(-0.8, 0.8, h), torch.linspace(-0.8, 0.8, w)
    video = torch.stack(
        [
            ramp_h[None, :, None].expand(t, h, w),
            ramp_w[None, None, :].expand(t, h, w),
            torch.linspace(-0.5, 0.5, t)[:, None, None].expand(t, h, w),
        ]
    )
    path = write_mp4(video, tmp_path / "clip.mp4", fps=12)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 12 and stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == t and frames[0].shape == (h, w, 3)
    decoded = torch.from_numpy(np.stack(frames)).float()
    error = (decoded - video_to_uint8(video).float()).abs().mean().item()
    assert error < 3.0, error  # lossy codec: a few levels of 255 on a smooth ramp
    assert write_mp4(video_to_uint8(video), tmp_path / "u8.mp4").stat().st_size > 0  # uint8 frames directly

    for kwargs, match in [
        (dict(video=video[:, :, :31]), "even height and width"),
        (dict(video=video[:, :, :, :47]), "even height and width"),
        (dict(video=video[:, :0]), "at least one frame"),
        (dict(video=video, fps=0), "fps"),
        (dict(video=video, crf=60), "crf"),
        (dict(video=video, path=tmp_path / "missing" / "x.mp4"), "does not exist"),
        (dict(video=torch.zeros(2, 4, 4, 3, dtype=torch.uint8)[..., :2]), r"\[T, H, W, 3\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            write_mp4(**{"path": tmp_path / "bad.mp4", **kwargs})
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(ValueError, match="pip install av"):
        write_mp4(video, tmp_path / "no_av.mp4")
