"""The Open-Sora example end to end: two CPU processes under torchrun, tiny random models, an MP4 out."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

ROOT = Path(__file__).resolve().parents[1]


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


def test_stdit_generate_refuses_bad_arguments_before_starting(monkeypatch, capsys) -> None:
    spec = importlib.util.spec_from_file_location("stdit_generate", ROOT / "examples" / "stdit_generate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for args, message in (
        (["--resolution", "600p"], "invalid choice"),
        (["--num-frames", "0"], "unsupported frame count"),
        (["--aspect-ratio", "5:7"], "invalid choice"),
        (["--model-path", "/nowhere"], "pass all of --model-path"),
        (["--model-path", "/nowhere", "--vae-path", "/nowhere", "--text-encoder-path", "/nowhere"], "not a folder"),
    ):
        monkeypatch.setattr(sys, "argv", ["stdit_generate.py", *args])
        with pytest.raises(SystemExit) as exit_info:
            example.parse_args()  # before any process group exists
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
