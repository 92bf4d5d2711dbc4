"""The published checkpoint layout Open-Sora's models share: a folder with ``config.json`` and one
``model.safetensors``; loading checks every tensor's name and shape against the model first."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def checkpoint_files(path: str | Path, what: str) -> tuple[Path, Path]:
    """``(config.json, model.safetensors)`` of folder ``path``; ``ValueError`` if either is missing."""
    folder = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise ValueError(f"{what}: {folder / name} not found")
    return folder / CONFIG, folder / WEIGHTS


def save_checkpoint(model: nn.Module, config: dict[str, Any], path: str | Path) -> None:
    """Write ``config`` as ``config.json`` and ``model``'s state dict as ``model.safetensors`` in ``path``."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})


def load_checked(
    model: nn.Module, weights: Path, what: str, *, device: str | torch.device, optional: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """The tensors of ``weights`` on ``device``, after checking them against ``model``'s state dict
    (built on the meta device): one ``ValueError`` names the missing (``optional`` ones excepted),
    unexpected and misshapen tensors; another the tensors whose dtype differs from the rest (every
    floating tensor of a checkpoint has one floating dtype, any other tensor the model's dtype). A file
    that is not readable safetensors (truncated, corrupt) is a ``ValueError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    expected = model.state_dict()
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:  # safetensors' own message does not name the file
        raise ValueError(f"{what}: cannot read {weights} as safetensors (truncated or corrupt?): {e}") from e
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{k}: {list(state[k].shape)} (model {list(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshapen:
        raise ValueError(
            f"{what}: {weights} does not match the config: missing {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''} ({len(missing)}), unexpected {unexpected[:10]} "
            f"({len(unexpected)}), misshapen {misshapen[:10]} ({len(misshapen)})"
        )
    _check_dtypes(state, expected, weights, what)
    return state


def _check_dtypes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], weights: Path, what: str) -> None:
    """``ValueError`` naming the tensors of ``state`` whose dtype is not the checkpoint's one floating dtype
    (the most common one) where the model holds a floating tensor, or not the model's dtype elsewhere."""
    counts = Counter(t.dtype for k, t in state.items() if expected[k].is_floating_point() and t.is_floating_point())
    common = counts.most_common(1)[0][0] if counts else None

    def fits(key: str) -> bool:
        if expected[key].is_floating_point():
            return state[key].dtype == common
        return state[key].dtype == expected[key].dtype

    odd = sorted(f"{k}: {state[k].dtype} (model {expected[k].dtype})" for k in state if not fits(k))
    if odd:
        raise ValueError(
            f"{what}: {weights} mixes dtypes: {counts.get(common, 0)} floating tensors are {common}, but "
            f"{odd[:10]}{' …' if len(odd) > 10 else ''} ({len(odd)}) are not; a checkpoint must hold one "
            "floating dtype (cast every tensor to one and save it again)"
        )
