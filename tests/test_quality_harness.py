"""Smoke test of the step-cache quality harness (``benchmarks/quality/``), on the CPU.

The procedural data is a function of its seed; packing and unpacking are inverse; ``train.py`` trains a few
steps on 16² images and saves the model; ``evaluate.py`` loads it and samples two prompts in six steps
exactly and under two cache configurations, a static step mask of which must reuse steps. PSNR and SSIM
are checked only where torchmetrics is installed (CI lacks it).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from models.caching import first_block_cache, static_step_mask

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
MODULES = ("data", "model", "train", "evaluate")  # the scripts import each other by these names
STEPS, SIZE = 6, 16
STATIC_MASK = (1, 1, 0, 1, 0, 1)


@pytest.fixture(scope="module")
def harness() -> Iterator[SimpleNamespace]:
    """The harness's modules, imported from their folder (restoring ``sys.path`` and ``sys.modules`` after)."""
    path, shadowed = list(sys.path), {name: sys.modules.pop(name) for name in MODULES if name in sys.modules}
    sys.path.insert(0, str(QUALITY))
    try:
        yield SimpleNamespace(**{name: importlib.import_module(name) for name in MODULES})
    finally:
        for name in MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(shadowed)
        sys.path[:] = path


@pytest.fixture(scope="module")
def sampled(harness: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train 5 steps through the CLI, load, and sample exactly and under two cache configurations."""
    folder = tmp_path_factory.mktemp("quality") / "model"
    args = {"--out": folder, "--steps": 5, "--batch": 4, "--size": SIZE, "--device": "cpu", "--warmup": 2}
    harness.train.main([str(x) for pair in args.items() for x in pair])
    model = harness.model.load(folder, "cpu")
    prompts = harness.evaluate.prompt_set(2, model.size, seed=7)
    configs = {
        "static": static_step_mask(STATIC_MASK),
        "fbcache": first_block_cache(0.5, max_warmup_steps=1),
    }
    rows, images = harness.evaluate.evaluate(model, configs, prompts, steps=STEPS, log=lambda _: None)
    return {"folder": folder, "model": model, "prompts": prompts, "rows": rows, "images": images}


def test_data_is_a_function_of_the_seed(harness: SimpleNamespace) -> None:
    data = harness.data
    a, b, c = (data.make_batch(6, seed, size=SIZE) for seed in (3, 3, 4))
    assert a.images.shape == (6, 3, SIZE, SIZE) and a.images.dtype == torch.float32
    assert a.tokens.shape == a.mask.shape == (6, data.TOKEN_LENGTH) and a.tokens.dtype == torch.long
    assert a.images.min() >= -1 and a.images.max() <= 1
    assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert torch.equal(a.mask, a.tokens != 0) and bool(a.mask[:, 0].all())
    for row, caption in zip(a.tokens, a.captions, strict=True):
        tokens, mask = data.encode(caption)
        assert torch.equal(tokens, row) and torch.equal(mask, row != 0)
        assert len(caption.split()) in (3, 7)
    stream = torch.Generator().manual_seed(0)
    first, second = data.make_batch(4, stream, size=SIZE), data.make_batch(4, stream, size=SIZE)
    assert not torch.equal(first.images, second.images)


def test_pack_unpack_round_trip(harness: SimpleNamespace) -> None:
    model = harness.model
    images = torch.randn(2, 3, 8, 12)
    packed = model.pack(images)
    assert packed.shape == (2, 4 * 6, 12)
    assert torch.equal(packed[:, 0], images[:, :, :2, :2].reshape(2, 12))  # channel-major within a patch
    assert torch.equal(model.unpack(packed, 8, 12), images)
    ids = model.image_ids(8, 12)
    assert ids.shape == (24, 3) and ids[:, 0].eq(0).all()
    assert ids[7].tolist() == [0, 1, 1]  # patch row 1, column 1 of 6 columns


def test_train_save_load_and_cached_sampling(harness: SimpleNamespace, sampled: dict[str, Any]) -> None:
    folder = sampled["folder"]
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((folder / "train.json").read_text())["steps"] == 5
    model = sampled["model"]
    assert model.size == SIZE and not model.transformer.training

    rows, images = sampled["rows"], sampled["images"]
    ev = harness.evaluate
    assert [r["name"] for r in rows] == [ev.EXACT, "static", "fbcache"]
    by_name = {r["name"]: r for r in rows}
    assert by_name[ev.EXACT]["computed_fraction"] == 1.0
    assert by_name["static"]["computed_fraction"] == pytest.approx(sum(STATIC_MASK) / STEPS)  # Fn = Bn = 0
    assert by_name["static"]["config"].endswith("_SCM4of6S")
    for image in images.values():
        assert image.shape == (2, 3, SIZE, SIZE) and bool(torch.isfinite(image).all())
    assert not torch.equal(images["static"], images[ev.EXACT])  # reused steps change the images

    # the same prompts sampled again without a cache reproduce the exact images
    again = ev.generate(model, sampled["prompts"], None, steps=STEPS)
    assert torch.equal(again.images, images[ev.EXACT])
    assert len(ev.configurations(STEPS)) >= 10 and len(ev.configurations(28)) >= 10


def test_report_without_metrics(harness: SimpleNamespace, sampled: dict[str, Any], tmp_path: Path) -> None:
    harness.evaluate.write_report(sampled["rows"], {"steps": STEPS}, tmp_path)
    written = json.loads((tmp_path / "quality.json").read_text())
    assert [r["name"] for r in written["rows"]] == [r["name"] for r in sampled["rows"]]
    assert "static" in (tmp_path / "quality.txt").read_text()


def test_metrics(harness: SimpleNamespace, sampled: dict[str, Any]) -> None:
    pytest.importorskip("torchmetrics")
    ev = harness.evaluate
    rows = [dict(r) for r in sampled["rows"]]
    ev.add_metrics(rows, sampled["images"])
    by_name = {r["name"]: r for r in rows}
    assert by_name[ev.EXACT]["psnr"] == ev.PSNR_CAP and by_name[ev.EXACT]["ssim"] == pytest.approx(1.0)
    assert by_name["static"]["psnr"] < ev.PSNR_CAP and by_name["static"]["ssim"] <= 1.0 + 1e-6
