"""Loading Open-Sora's models: config fields type- and range-checked, one dtype per checkpoint, and every
loading error (missing, truncated or corrupt file, bad JSON, a bad field) naming the file."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.stdit import STDiT3, STDiT3Config
from models.stdit.config import _BOOLS, _INTS
from models.stdit.temporal_vae import TemporalVAEConfig
from models.stdit.text import T5TextEncoder
from models.stdit.video_vae import SDXL_VAE, OpenSoraVAE, OpenSoraVAEConfig
from models.testing import tiny_t5_text_encoder

TINY = dict(depth=1, hidden_size=16, num_heads=2, caption_channels=8, model_max_length=4)
TINY_VAE = OpenSoraVAEConfig(
    spatial=dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[4, 4], layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=2,
    ),
    temporal=TemporalVAEConfig(filters=4, num_res_blocks=1, num_groups=2),
)  # fmt: skip


# ---------------------------------------------------------------------------------- STDiT3Config
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", "1152", "hidden_size must be an int >= 1, got '1152'"),
        ("num_heads", 0, "num_heads must be an int >= 1, got 0"),
        ("qk_norm", "yes", "qk_norm must be a bool (true or false), got 'yes'"),
        ("depth", True, "depth must be an int >= 1, got True"),
        ("in_channels", 4.0, "in_channels must be an int >= 1, got 4.0"),
        ("mlp_ratio", float("nan"), "mlp_ratio must be a finite number"),
        ("mlp_ratio", "4", "mlp_ratio must be a finite number"),
        ("mlp_ratio", 0.01, "mlp_ratio 0.01 gives an MLP of int(16 × 0.01) = 0 channels"),
        ("class_dropout_prob", 1.5, "class_dropout_prob must be a finite number in [0.0, 1.0]"),
        ("drop_path", 1.0, r"drop_path must be a finite number in [0.0, 1.0)"),
        ("patch_size", (2, 2, 2), "patch_size must be [1, p_h, p_w]"),
        ("patch_size", (1, 2), "patch_size must be a list of 3 entries"),
        ("patch_size", (1, 0, 2), "patch_size must be a non-empty list of ints >= 1"),
        ("input_size", 5, "input_size must be a list of 3 entries"),
        ("input_size", (None, 0, None), "input_size must be a non-empty list of ints >= 1 or null"),
        ("num_heads", 3, "hidden_size 16 is not divisible by num_heads 3"),
        ("num_heads", 16, "the head dim hidden_size / num_heads = 1 must be even"),
    ],
)
def test_stdit_config_refuses_a_bad_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"STDiT3Config: {message}")):
        STDiT3Config(**{**TINY, field: value})


def test_stdit_config_checks_every_int_and_bool_field() -> None:
    assert set(_INTS) | set(_BOOLS) | {"input_size", "patch_size", "mlp_ratio", "class_dropout_prob", "drop_path"} == {
        f.name for f in dataclasses.fields(STDiT3Config)
    }
    for name in _INTS:
        for value in (0, "8", True, 8.0, None):
            with pytest.raises(ValueError, match=re.escape(f"{name} must be an int >= 1, got {value!r}")):
                STDiT3Config(**{**TINY, name: value})
    for name in _BOOLS:
        for value in ("yes", 1, None):
            with pytest.raises(ValueError, match=re.escape(f"{name} must be a bool (true or false), got {value!r}")):
                STDiT3Config(**{**TINY, name: value})
    with pytest.raises(ValueError, match="hidden_size 18 must be divisible by 4"):
        STDiT3Config(**{**TINY, "hidden_size": 18, "num_heads": 1})
    assert STDiT3Config.from_dict(json.loads(json.dumps(STDiT3Config(**TINY).to_dict()))) == STDiT3Config(**TINY)


def test_stdit_config_file_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "config.json"
    for text, message in (
        ("{not json", "cannot read"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({**TINY, "num_heads": 0}), "num_heads must be an int >= 1"),
        (json.dumps({**TINY, "unknown_field": 1}), "unknown fields"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            STDiT3Config.from_json(path)
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=f"cannot read {re.escape(str(tmp_path / 'nowhere.json'))}"):
        STDiT3Config.from_json(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="the config must be an object"):
        STDiT3Config.from_dict([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- the video VAE's configs
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"filters": "128"}, "TemporalVAEConfig: filters must be an int >= 1, got '128'"),
        ({"num_groups": 0}, "TemporalVAEConfig: num_groups must be an int >= 1, got 0"),
        ({"num_res_blocks": False}, "TemporalVAEConfig: num_res_blocks must be an int >= 1, got False"),
        ({"channel_multipliers": 4}, "TemporalVAEConfig: channel_multipliers must be a list, got 4"),
        ({"channel_multipliers": [1, 0, 2, 4]}, "TemporalVAEConfig: channel_multipliers must be a non-empty list"),
        ({"temporal_downsample": [0, 1, 1]}, "TemporalVAEConfig: temporal_downsample[0] must be a bool"),
        ({"temporal_downsample": "yes"}, "TemporalVAEConfig: temporal_downsample must be a list"),
    ],
)
def test_temporal_vae_config_refuses_a_bad_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TemporalVAEConfig(**change)
    assert TemporalVAEConfig(channel_multipliers=[1, 2, 2, 4]).channel_multipliers == (1, 2, 2, 4)  # JSON lists


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"micro_frame_size": 0}, "micro_frame_size must be an int >= 1, got 0"),
        ({"micro_batch_size": "4"}, "micro_batch_size must be an int >= 1, got '4'"),
        ({"scale": (1.0, float("nan"), 1.0, 1.0)}, "scale[1] must be a finite number"),
        ({"scale": (1.0, 0.0, 1.0, 1.0)}, "scale (1.0, 0.0, 1.0, 1.0) must have no zero entry"),
        ({"shift": "abcd"}, "shift must be a list"),
        ({"shift": (0.0, True, 0.0, 0.0)}, "shift[1] must be a finite number"),
        ({"spatial": "sdxl"}, "spatial (vae_2d.config) must be an object"),
        ({"spatial": {**SDXL_VAE, "latent_channels": "4"}}, "vae_2d.config.latent_channels must be an int >= 1"),
        ({"spatial": {**SDXL_VAE, "block_out_channels": []}}, "vae_2d.config.block_out_channels must be a non-empty"),
        ({"spatial": {**SDXL_VAE, "scaling_factor": float("inf")}}, "vae_2d.config.scaling_factor must be a finite"),
        ({"spatial": {**SDXL_VAE, "_class_name": "AutoencoderKL"}}, "vae_2d.config has keys ['_class_name'] that"),
        ({"spatial": {"in_channels": 3}}, "vae_2d.config needs 'block_out_channels'"),
        ({"temporal": {"filters": 8}}, "temporal must be a TemporalVAEConfig, got dict"),
        ({"spatial_source": 5}, "spatial_source (vae_2d.from_pretrained) must be a str or null, got 5"),
    ],
)
def test_video_vae_config_refuses_a_bad_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"OpenSoraVAEConfig: {message}")):
        OpenSoraVAEConfig(**change)


def test_video_vae_config_file_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "config.json"
    good = TINY_VAE.to_dict()
    assert OpenSoraVAEConfig.from_dict(json.loads(json.dumps(good))) == TINY_VAE
    for text, message in (
        ("{not json", "cannot read"),
        ("[]", "must hold a JSON object"),
        (json.dumps({**good, "vae_2d": "sdxl"}), "vae_2d must be an object"),
        (json.dumps({**good, "vae_temporal": [4]}), "vae_temporal must be an object"),
        (json.dumps({**good, "vae_temporal": {**good["vae_temporal"], "filters": "4"}}), "filters must be an int"),
        (json.dumps({**good, "vae_temporal": {**good["vae_temporal"], "channel_multipliers": 2}}), "must be a list"),
        (json.dumps({**good, "micro_frame_size": 1.5}), "micro_frame_size must be an int"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            OpenSoraVAEConfig.from_json(path)
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="OpenSoraVAEConfig: the config must be an object"):
        OpenSoraVAEConfig.from_dict("config")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def stdit_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("stdit") / "ok"
    STDiT3(STDiT3Config(**TINY)).save_pretrained(folder)
    return folder


def _copy(source, folder, tensors: dict | None = None, weights: bytes | None = None):
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    else:
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_checkpoint_of_mixed_dtypes_is_refused_naming_the_tensor_and_file(stdit_folder, tmp_path) -> None:
    state = load_file(str(stdit_folder / "model.safetensors"))
    key = "spatial_blocks.0.attn.qkv.weight"
    mixed = _copy(stdit_folder, tmp_path / "mixed", {**state, key: state[key].half()})
    with pytest.raises(ValueError, match=re.escape(f"{key}: torch.float16 (model torch.float32)")) as info:
        STDiT3.from_pretrained(mixed)
    message = str(info.value)
    assert str(mixed / "model.safetensors") in message and "mixes dtypes" in message and "are torch.float32" in message
    ints = _copy(stdit_folder, tmp_path / "ints", {**state, key: state[key].to(torch.int32)})
    with pytest.raises(ValueError, match=re.escape(f"{key}: torch.int32")):
        STDiT3.from_pretrained(ints)
    # one floating dtype throughout is a checkpoint in that dtype: it loads as it is
    bf16 = _copy(stdit_folder, tmp_path / "bf16", {k: v.bfloat16() for k, v in state.items()})
    assert {p.dtype for p in STDiT3.from_pretrained(bf16).parameters()} == {torch.bfloat16}


def test_video_vae_checkpoint_of_mixed_dtypes_is_refused(tmp_path) -> None:
    OpenSoraVAE(TINY_VAE).save_pretrained(tmp_path / "vae")
    state = load_file(str(tmp_path / "vae" / "model.safetensors"))
    mixed = _copy(tmp_path / "vae", tmp_path / "mixed", {**state, "scale": state["scale"].double()})
    with pytest.raises(ValueError, match=re.escape("scale: torch.float64")) as info:
        OpenSoraVAE.from_pretrained(mixed)
    assert str(mixed / "model.safetensors") in str(info.value)
    broken = _copy(tmp_path / "vae", tmp_path / "broken", weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match=re.escape(f"cannot read {broken / 'model.safetensors'} as safetensors")):
        OpenSoraVAE.from_pretrained(broken)


def test_truncated_or_corrupt_files_are_named(stdit_folder, tmp_path) -> None:
    weights = (stdit_folder / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("header", weights[:20]), ("empty", b"")):
        folder = _copy(stdit_folder, tmp_path / name, weights=data)
        with pytest.raises(ValueError, match=re.escape(f"cannot read {folder / 'model.safetensors'} as safetensors")):
            STDiT3.from_pretrained(folder)
    folder = _copy(stdit_folder, tmp_path / "bad_config", weights=weights)
    (folder / "config.json").write_text('{"depth": 1,')
    with pytest.raises(ValueError, match=re.escape(f"cannot read {folder / 'config.json'} as JSON")):
        STDiT3.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**TINY, "qk_norm": "yes"}))
    with pytest.raises(ValueError, match=re.escape(f"qk_norm must be a bool (true or false), got 'yes' (in {folder}")):
        STDiT3.from_pretrained(folder)


def test_t5_loading_errors_name_the_file(tmp_path) -> None:
    folder = tiny_t5_text_encoder(d_model=8).save_pretrained(tmp_path / "t5")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        T5TextEncoder.from_pretrained(folder)
    weights.write_bytes(data)
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:100])
    with pytest.raises(ValueError, match=re.escape(f"cannot load the tokenizer from {tokenizer}")):
        T5TextEncoder.from_pretrained(folder)
