"""The examples end to end: Open-Sora on two CPU processes under torchrun, FLUX in one process without a
launcher (tiny random models), and every bad argument refused by parse_args before any process group."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import av
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.run(
        [*command, str(ROOT / "examples" / "stdit_generate.py"), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_stdit_generate_writes_the_video(tmp_path) -> None:
    out = tmp_path / "tiny.mp4"
    run = _torchrun("--num-frames", "20", "--steps", "2", "--resolution", "144p", "--out", str(out))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "VAE decode" in run.stdout and "20 frames of 144×256" in run.stdout
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 20 and frames[0].shape == (144, 256, 3)


def _example(name: str, monkeypatch) -> ModuleType:
    """The example script as a module (its sibling ``example_setup`` importable), with no launch environment."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def _refused(example: ModuleType, cases: list, monkeypatch, capsys) -> None:
    """Each ``(args, message[, environment])`` exits parse_args with code 2 and one error line holding message."""
    for args, message, *env in cases:
        with monkeypatch.context() as m:
            for var, value in (env[0] if env else {}).items():
                m.setenv(var, value)
            m.setattr(sys, "argv", ["example.py", *args])
            with pytest.raises(SystemExit) as exit_info:
                example.parse_args()  # before any process group exists
        err = capsys.readouterr().err
        error_lines = [line for line in err.splitlines() if "error:" in line]
        assert exit_info.value.code == 2 and message in err and len(error_lines) == 1, (args, err)
        assert "ulysses=0" not in err and "Traceback" not in err


def _flux_folder(root: Path, *, skip: str = "", index: dict | None = None, blocks: int = 4) -> Path:
    """A folder with the layout of a diffusers FLUX folder (files without weights inside; only the layout
    is checked before loading), ``skip`` left out."""
    root.mkdir()
    components = {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    values = index or {"_class_name": "FluxPipeline", **components}
    (root / "model_index.json").write_text(json.dumps(values))
    for name in components:
        if name == skip:
            continue
        (root / name).mkdir()
        if name == "scheduler":
            (root / name / "scheduler_config.json").write_text("{}")
        elif name.startswith("tokenizer"):
            (root / name / "tokenizer_config.json").write_text("{}")
        else:
            config = {"block_out_channels": [8] * blocks} if name == "vae" else {}
            (root / name / "config.json").write_text(json.dumps(config))
            (root / name / "model.safetensors").write_bytes(b"")
    return root


def test_flux_generate_refuses_bad_arguments_before_starting(monkeypatch, capsys, tmp_path) -> None:
    example = _example("flux_generate", monkeypatch)
    monkeypatch.chdir(tmp_path)  # the default --out (flux.png) is checked here
    two, four = {"WORLD_SIZE": "2", "RANK": "0"}, {"WORLD_SIZE": "4", "RANK": "0"}
    good = _flux_folder(tmp_path / "flux")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "folder.png").mkdir()
    cases = [
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
        (["--height", "0"], "argument --height: must be an integer >= 1, got '0'"),
        (["--width", "-64"], "argument --width: must be an integer >= 1"),
        (["--height", "65"], "--height 65 must be a multiple of 4 for the tiny model"),
        (["--model-path", str(good), "--width", "1000"], "--width 1000 must be a multiple of 16 for FLUX"),
        (["--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
        (["--true-cfg", "inf", "--negative-prompt", "x"], "argument --true-cfg: must be a finite number"),
        (["--true-cfg", "2"], "--true-cfg 2.0 needs --negative-prompt"),
        (["--true-cfg", "0.5", "--negative-prompt", "x"], "--true-cfg 0.5 must be >= 1"),
        (["--negative-prompt", "blurry"], "--negative-prompt is used only with --true-cfg > 1"),
        (["--ring", "0"], "argument --ring-degree/--ring: must be an integer >= 1, got '0'"),
        (["--ulysses", "0"], "argument --ulysses-degree/--ulysses: must be an integer >= 1"),
        (["--batch", "3"], "--ring 1 × --batch 3 = 3 does not divide the world size 2", two),
        (
            ["--ulysses", "2", "--ring", "2"],
            "--ulysses 2 × --ring 2 × --batch 1 = 4 does not match the world size 2",
            two,
        ),
        (["--batch", "2"], "--batch 2 splits each step's samples over 2 ranks, but this run has 1", two),
        (
            ["--height", "4"],
            "--height 4 gives 2 latent rows, too few for the parallel VAE over 4 ranks (one row each at least): "
            "use --height >= 8",
            four,
        ),
        ([], "WORLD_SIZE='two' in the environment is not a positive integer", {"WORLD_SIZE": "two"}),
        ([], "RANK='x' in the environment is not a non-negative integer", {"WORLD_SIZE": "2", "RANK": "x"}),
        (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**63)"),
        (["--vae-tile-rows", "0"], "argument --vae-tile-rows: must be an integer >= 1"),
        (["--max-sequence-length", "200"], "--max-sequence-length 200 exceeds 128"),
        (["--model-path", str(good), "--max-sequence-length", "513"], "--max-sequence-length 513 exceeds 512"),
        (["--model-path", "/nowhere/flux"], "--model-path /nowhere/flux: folder not found"),
        (["--model-path", str(tmp_path / "a_file")], "is not a folder"),
        (
            ["--model-path", "black-forest-labs/FLUX.1-dev"],
            "`hf download black-forest-labs/FLUX.1-dev --local-dir <folder>`",
        ),
        (["--model-path", str(tmp_path)], f"{tmp_path / 'model_index.json'} not found"),
        (
            ["--model-path", str(_flux_folder(tmp_path / "no_vae", skip="vae"))],
            f"missing {tmp_path / 'no_vae' / 'vae'}/",
        ),
        (
            ["--model-path", str(_flux_folder(tmp_path / "sd", index={"_class_name": "StableDiffusionPipeline"}))],
            "describes a 'StableDiffusionPipeline', not a FluxPipeline",
        ),
        (["--out", str(tmp_path / "x.jpg")], "the file must end in .png"),
        (["--out", str(tmp_path / "nowhere" / "x.png")], f"the folder {tmp_path / 'nowhere'} does not exist"),
        (["--out", "/proc/x.png"], "cannot write in the folder /proc"),
        (["--out", str(tmp_path / "folder.png")], "is a folder"),
    ]
    if not torch.cuda.is_available():
        cases += [(["--cuda-graph"], "--cuda-graph needs CUDA GPUs"), (["--peer-exchange"], "--peer-exchange needs")]
    _refused(example, cases, monkeypatch, capsys)
    read_only = tmp_path / "read_only.png"
    read_only.write_bytes(b"")
    with monkeypatch.context() as m:  # root may write anything: the check asks os.access, so ask it to say no
        m.setattr(os, "access", lambda path, mode: Path(path) != read_only)
        _refused(example, [(["--out", str(read_only)], "exists and is not writable")], monkeypatch, capsys)
    for name, remove, message in (
        ("unlisted", "index:vae", "vae (not in model_index.json)"),
        ("no_config", "transformer/config.json", f"missing {tmp_path / 'no_config' / 'transformer' / 'config.json'}"),
        ("no_weights", "text_encoder_2/model.safetensors", "weights (*.safetensors or *.bin) in"),
        ("no_scheduler", "scheduler/scheduler_config.json", "scheduler_config.json"),
        ("no_tokenizer", "tokenizer/tokenizer_config.json", f"files in {tmp_path / 'no_tokenizer' / 'tokenizer'}"),
        ("no_blocks", "vae:blocks", "has no block_out_channels list"),
    ):
        folder = _flux_folder(tmp_path / name)
        if remove == "index:vae":
            index = json.loads((folder / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "vae"}))
        elif remove == "vae:blocks":
            (folder / "vae" / "config.json").write_text("{}")
        else:
            (folder / remove).unlink()
        _refused(example, [(["--model-path", str(folder)], message)], monkeypatch, capsys)
    (good / "model_index.json").write_text("{broken")
    _refused(
        example,
        [(["--model-path", str(good)], f"cannot read {good / 'model_index.json'} as JSON")],
        monkeypatch,
        capsys,
    )
    (good / "model_index.json").write_text("[]")
    _refused(example, [(["--model-path", str(good)], "must hold a JSON object")], monkeypatch, capsys)


def test_flux_generate_fills_in_what_was_not_given(monkeypatch, tmp_path) -> None:
    example = _example("flux_generate", monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")  # not the writer: --out is rank 0's to check
    monkeypatch.setattr(sys, "argv", ["flux_generate.py", "--ring", "2", "--out", "/nowhere/x.png"])
    args = example.parse_args()
    assert (args.ulysses, args.ring, args.batch, args.height, args.width, args.steps) == (2, 2, 1, 64, 64, 4)
    folder = _flux_folder(tmp_path / "flux")
    monkeypatch.setattr(sys, "argv", ["flux_generate.py", "--model-path", str(folder), "--height", "1008"])
    args = example.parse_args()
    assert (args.height, args.width, args.steps, args.max_sequence_length) == (1008, 1024, 28, 512)


def test_flux_generate_runs_as_one_process_without_a_launcher(tmp_path) -> None:
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "flux_generate.py"), "--steps", "1", "--out", "tmp/x.png"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "FLUX on 1 rank(s)" in run.stdout and "64×64, 1 steps" in run.stdout
    assert (tmp_path / "tmp" / "x.png").read_bytes().startswith(b"\x89PNG")


def test_stdit_generate_refuses_bad_arguments_before_starting(monkeypatch, capsys, tmp_path) -> None:
    example = _example("stdit_generate", monkeypatch)
    monkeypatch.chdir(tmp_path)  # the default --out (opensora.mp4) is checked here
    stdit, vae, t5 = tmp_path / "stdit", tmp_path / "vae", tmp_path / "t5"
    for folder in (stdit, vae, t5):
        folder.mkdir()
    (stdit / "model.safetensors").write_bytes(b"")
    (stdit / "config.json").write_text(json.dumps({"hidden_size": "1152"}))
    paths = ["--model-path", str(stdit), "--vae-path", str(vae), "--text-encoder-path", str(t5)]
    four = {"WORLD_SIZE": "4", "RANK": "0"}
    cases = [
        (["--resolution", "600p"], "invalid choice"),
        (["--num-frames", "0"], "unsupported frame count"),
        (["--aspect-ratio", "5:7"], "invalid choice"),
        (["--model-path", "/nowhere"], "pass all of --model-path"),
        (["--model-path", "/nowhere", "--vae-path", "/nowhere", "--text-encoder-path", "/nowhere"], "folder not found"),
        (
            ["--model-path", "hpcai-tech/OpenSora-STDiT-v3", "--vae-path", str(vae), "--text-encoder-path", str(t5)],
            "`hf download hpcai-tech/OpenSora-STDiT-v3 --local-dir <folder>`",
        ),
        (paths, "STDiT3Config: hidden_size must be an int >= 1, got '1152' (in " + str(stdit / "config.json")),
        (["--steps", "0"], "argument --steps: must be an integer >= 1"),
        (["--fps", "0"], "argument --fps: must be an integer >= 1, got '0'"),
        (["--cfg-scale", "nan"], "argument --cfg-scale: must be a finite number, got 'nan'"),
        (["--ring", "0"], "argument --ring-degree/--ring: must be an integer >= 1"),
        (["--ulysses", "-1"], "argument --ulysses-degree/--ulysses: must be an integer >= 1"),
        (["--batch", "3"], "--batch 3: Open-Sora's batch axis holds the CFG pair, so 1 or 2"),
        (["--ring", "3"], "--ring 3 × --batch 2 = 6 does not divide the world size 4", four),
        (["--ulysses", "3"], "--ulysses 3 × --ring 1 × --batch 2 = 6 does not match the world size 4", four),
        (["--seed", "abc"], "argument --seed: must be an integer in [0, 2**63)"),
        (["--vae-tile-rows", "0"], "argument --vae-tile-rows: must be an integer >= 1"),
        (["--out", str(tmp_path / "x.png")], "the file must end in .mp4"),
        (["--out", str(tmp_path / "nowhere" / "x.mp4")], "does not exist"),
        (["--out", "/proc/x.mp4"], "cannot write in the folder /proc"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--peer-exchange"], "--peer-exchange needs CUDA GPUs"))
    _refused(example, cases, monkeypatch, capsys)
    (stdit / "config.json").write_text("{}")  # the published defaults: a valid STDiT3 config
    _refused(example, [(paths, f"--vae-path: {vae / 'config.json'} not found")], monkeypatch, capsys)
    for name in ("config.json", "model.safetensors"):
        (vae / name).write_text((stdit / name).read_text() if name == "model.safetensors" else "{}")
    _refused(
        example,
        [(paths, f"--text-encoder-path: T5TextEncoder.from_pretrained: {t5} holds neither")],
        monkeypatch,
        capsys,
    )
    monkeypatch.setattr(av, "codecs_available", set())  # a PyAV build without libx264
    _refused(example, [([], "writing the MP4 needs PyAV's libx264 encoder")], monkeypatch, capsys)
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    _refused(example, [([], "writing the MP4 needs PyAV: `pip install av`")], monkeypatch, capsys)
