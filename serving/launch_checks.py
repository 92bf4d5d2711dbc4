"""What the command line's jobs share: argument checks that run before any process group or model load,
and the process group itself (torchrun's, or one process of its own without a launcher).

The checks raise a one-line ``ValueError``; the jobs turn it into argparse's error (exit code 2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xdit_core import DistributedContext, init_distributed

_LAUNCH_VARS = ("RANK", "WORLD_SIZE")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# The components a diffusers FLUX folder holds (model_index.json lists them) and what each must contain.
_FLUX_MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2")
_FLUX_OTHERS = ("scheduler", "tokenizer", "tokenizer_2")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


# ---------------------------------------------------------------------------------- argparse types
def _int_in(text: str, low: int, high: int | None, what: str) -> int:
    """``text`` as an int in ``[low, high)``, else argparse's one-line error saying ``what`` it must be."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low or (high is not None and value >= high):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_in(text, 1, None, "an integer >= 1")


def seed_int(text: str) -> int:
    """argparse type: an int in [0, 2**63) (what a torch generator accepts in every process)."""
    return _int_in(text, 0, 2**63, "an integer in [0, 2**63)")


def finite_float(text: str) -> float:
    """argparse type: a finite float (no nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# ---------------------------------------------------------------------------------- the launch
def launched() -> bool:
    """Whether a launcher (torchrun) started this process: ``RANK`` or ``WORLD_SIZE`` is set."""
    return any(name in os.environ for name in _LAUNCH_VARS)


def launch_world_size() -> int:
    """The world size torchrun set (``WORLD_SIZE``), or 1 for a process started without a launcher."""
    if not launched():
        return 1
    text = os.environ.get("WORLD_SIZE", "")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"WORLD_SIZE={text!r} in the environment is not a positive integer (launch with torchrun)")
    return int(text)


def launch_rank() -> int:
    """This process's rank as torchrun set it (``RANK``), 0 without a launcher."""
    text = os.environ.get("RANK", "0")
    if not text.isdigit():
        raise ValueError(f"RANK={text!r} in the environment is not a non-negative integer (launch with torchrun)")
    return int(text)


def add_mesh_arguments(p: argparse.ArgumentParser, *, batch_help: str, batch_default: int | None = 1) -> None:
    """The mesh's degrees in the field's spelling (``--ulysses-degree``, ``--ring-degree``, ``--cfg-parallel``,
    ``--tp-degree``; the short ``--ulysses``, ``--ring``, ``--batch`` too); :func:`mesh_degrees` checks them."""
    p.add_argument(
        "--ulysses-degree", "--ulysses", dest="ulysses", type=positive_int, default=None,
        help="ulysses degree (default: all ranks / (ring × batch × tp))",
    )  # fmt: skip
    p.add_argument("--ring-degree", "--ring", dest="ring", type=positive_int, default=1, help="ring degree")
    p.add_argument("--batch", type=positive_int, default=batch_default, help=batch_help)
    p.add_argument("--cfg-parallel", dest="batch", action="store_const", const=2, help="the same as --batch 2")
    p.add_argument("--tp-degree", dest="tp", type=positive_int, default=1, help="tensor-parallel degree")


def mesh_degrees(world: int, ulysses: int | None, ring: int, batch: int, tp: int = 1) -> int:
    """The ulysses degree: ``ulysses``, or ``world / (ring × batch × tp)`` when ``None``; a ``ValueError``
    names the product that does not match ``world``."""
    fixed = f"--ring {ring} × --batch {batch}" + (f" × --tp-degree {tp}" if tp > 1 else "")
    if ulysses is None:
        if world % (ring * batch * tp):
            raise ValueError(
                f"{fixed} = {ring * batch * tp} does not divide the world size {world}; "
                f"choose degrees whose product divides {world} (the ulysses degree takes the rest)"
            )
        return world // (ring * batch * tp)
    if ulysses * ring * batch * tp != world:
        raise ValueError(
            f"--ulysses {ulysses} × {fixed} = {ulysses * ring * batch * tp} does not match "
            f"the world size {world}; choose degrees whose product is {world}"
        )
    return ulysses


def least_height(world: int, multiple: int) -> int:
    """The least image height FLUX's parallel VAE takes on ``world`` ranks: one latent row (``multiple // 2``
    pixels) per rank, rounded up to a multiple of ``multiple``."""
    return -(-world * multiple // 2 // multiple) * multiple


@contextmanager
def process_group(timeout_s: float = 600.0) -> Iterator[DistributedContext]:
    """The default process group for the body: torchrun's (``init_distributed``), or, in a process started
    without a launcher, a group of one (NCCL on the first GPU, gloo on the CPU) whose rendezvous is a file
    in a temporary folder. ``timeout_s`` bounds every collective's wait for a peer. On a normal exit the
    ranks meet at a barrier, then the group is destroyed."""
    folder = None if launched() else tempfile.TemporaryDirectory(prefix="xdit_")
    try:
        if folder is None:
            yield init_distributed(timeout_s=timeout_s)
        else:
            yield _one_process(Path(folder.name) / "rendezvous", timeout_s)
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    finally:
        if folder is not None:
            folder.cleanup()


def _one_process(init_file: Path, timeout_s: float) -> DistributedContext:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"device_id": device} if cuda else {}
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=0, world_size=1,
        timeout=timedelta(seconds=timeout_s), **kwargs,
    )  # fmt: skip
    return DistributedContext(rank=0, world_size=1, local_rank=0, device=device)


# ---------------------------------------------------------------------------------- files and folders
def check_output(path: str, suffix: str) -> Path:
    """``path`` if it names a ``suffix`` file (case-insensitive) that can be written: its folder exists and
    a file can be created there, and it is not a folder."""
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise ValueError(f"--out {path}: the file must end in {suffix}")
    if out.is_dir():
        raise ValueError(f"--out {path} is a folder; name a {suffix} file")
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"--out {path}: the folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"--out {path}: cannot write in the folder {folder} ({e.strerror})") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"--out {path} exists and is not writable")
    return out


def check_pyav() -> None:
    """PyAV importable, with the libx264 encoder the MP4 writer uses."""
    try:
        av = importlib.import_module("av")
    except ImportError as e:
        raise ValueError(f"writing the MP4 needs PyAV: `pip install av` ({e})") from None
    if "libx264" not in av.codecs_available:
        raise ValueError("writing the MP4 needs PyAV's libx264 encoder; install the PyPI wheel (`pip install av`)")


def local_folder(path: str, option: str) -> Path:
    """``path`` as an existing local folder; a hub id is refused with how to download it."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ValueError(f"{option} {path} is not a folder")
    if _HUB_ID.fullmatch(path):
        raise ValueError(
            f"{option} {path}: no such local folder (nothing here downloads; a hub id must be fetched first): "
            f"`hf download {path} --local-dir <folder>`, then pass {option} <folder>"
        )
    raise ValueError(f"{option} {path}: folder not found")


def check_flux_folder(folder: Path) -> int:
    """Check a diffusers FLUX folder before ``FluxPipeline.from_pretrained`` reads it: ``model_index.json``
    (a ``FluxPipeline``), and per component its subfolder with its config (and weights for the models).
    Returns the pixel multiple height and width must be: 2× the VAE's downscaling (FLUX packs 2×2 latents)."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"--model-path {folder} is not a diffusers pipeline folder: {index} not found")
    values = _read_json(index, "--model-path")
    if values.get("_class_name") != "FluxPipeline":
        raise ValueError(f"--model-path: {index} describes a {values.get('_class_name')!r}, not a FluxPipeline")
    missing = []
    for name in (*_FLUX_MODELS, *_FLUX_OTHERS):
        sub = folder / name
        if name not in values:
            missing.append(f"{name} (not in model_index.json)")
        elif not sub.is_dir():
            missing.append(f"{sub}/")
        elif name in _FLUX_MODELS and not (sub / "config.json").is_file():
            missing.append(str(sub / "config.json"))
        elif name in _FLUX_MODELS and not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in sub.iterdir()):
            missing.append(f"weights (*.safetensors or *.bin) in {sub}")
        elif name == "scheduler" and not (sub / "scheduler_config.json").is_file():
            missing.append(str(sub / "scheduler_config.json"))
        elif not any(sub.iterdir()):
            missing.append(f"files in {sub}")
    if missing:
        raise ValueError(f"--model-path {folder} is not a complete diffusers FLUX folder: missing {', '.join(missing)}")
    vae = _read_json(folder / "vae" / "config.json", "--model-path")
    blocks = vae.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"--model-path: {folder / 'vae' / 'config.json'} has no block_out_channels list")
    return 2 * 2 ** (len(blocks) - 1)


def _read_json(path: Path, option: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{option}: {path} not found")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{option}: cannot read {path} as JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{option}: {path} must hold a JSON object")
    return values
