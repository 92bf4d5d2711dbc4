"""Open-Sora 1.2's text conditioning: prompt preparation, the T5 encoder, and encoding once per group.

Open-Sora appends an aesthetic score to every prompt, cleans it with the DeepFloyd/PixArt caption
cleaner (twice), and encodes it with T5 (``DeepFloyd/t5-v1_1-xxl``, d_model 4096) into
``y [n, 1, 300, d_model]`` and ``mask [n, 300]``. ``models.testing.tiny_t5_text_encoder`` builds a toy
encoder of the same interface without downloads, for tests and examples.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers import PixArtAlphaPipeline
from transformers import AutoTokenizer, T5EncoderModel

from xdit_core.on_rank import compute_on_rank

OPEN_SORA_AES = 6.5  # the aesthetic score Open-Sora 1.2's inference configs append (``aes=6.5``)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _clean_caption_once(text: str) -> str:
    """One pass of the DeepFloyd/PixArt caption cleaning, as diffusers implements it."""
    module = sys.modules[PixArtAlphaPipeline.__module__]  # diffusers imports bs4/ftfy there only if installed
    missing = [
        pkg for name, pkg in (("BeautifulSoup", "beautifulsoup4"), ("ftfy", "ftfy")) if not hasattr(module, name)
    ]
    if missing:
        raise ValueError(
            f"prompt_for_t5(clean=True) needs {' and '.join(missing)} for the caption cleaning: "
            "`pip install beautifulsoup4 ftfy`, or pass clean=False (lower-case and strip only)"
        )
    # `_clean_caption` is an instance method that reads only the class attribute `bad_punct_regex`,
    # so the class itself can stand in for `self`: no pipeline (and no weights) is built.
    return PixArtAlphaPipeline._clean_caption(PixArtAlphaPipeline, text)


def prompt_for_t5(prompt: str, *, aes: float | None = OPEN_SORA_AES, clean: bool = True) -> str:
    """The text Open-Sora 1.2 gives T5: ``f"{prompt} aesthetic score: {aes:.1f}."`` (unless the prompt
    already states one), then cleaned.

    ``clean=True``: the DeepFloyd/PixArt caption cleaning applied twice (needs beautifulsoup4 and
    ftfy); ``clean=False``: lower-case and strip. ``aes=None`` appends no score.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt_for_t5: prompt must be a str, got {type(prompt).__name__}")
    if aes is not None:
        if isinstance(aes, bool) or not isinstance(aes, (int, float)) or not math.isfinite(aes):
            raise ValueError(f"prompt_for_t5: aes must be a finite number or None, got {aes!r}")
        if "aesthetic score:" not in prompt:
            prompt = f"{prompt} aesthetic score: {aes:.1f}."
    if not clean:
        return prompt.lower().strip()
    return _clean_caption_once(_clean_caption_once(prompt))


def encoder_folders(path: Path) -> tuple[Path, Path]:
    """``(tokenizer folder, model folder)`` of a local encoder folder, or a ``ValueError`` naming the path."""
    if not path.is_dir():
        raise ValueError(f"T5TextEncoder.from_pretrained: {path} is not a folder")
    if (path / "config.json").is_file():
        tok_dir, model_dir = path, path
    elif (path / "text_encoder" / "config.json").is_file() and (path / "tokenizer").is_dir():
        tok_dir, model_dir = path / "tokenizer", path / "text_encoder"
    else:
        raise ValueError(
            f"T5TextEncoder.from_pretrained: {path} holds neither config.json (tokenizer and model in one "
            "folder, as save_pretrained writes) nor tokenizer/ and text_encoder/config.json subfolders"
        )
    if not any((tok_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(
            f"T5TextEncoder.from_pretrained: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {tok_dir}"
        )
    if not any((model_dir / f).is_file() for f in _WEIGHT_FILES):
        raise ValueError(f"T5TextEncoder.from_pretrained: no weights ({', '.join(_WEIGHT_FILES)}) in {model_dir}")
    return tok_dir, model_dir


class T5TextEncoder:
    """A T5 tokenizer and ``T5EncoderModel``: prompts -> ``y [n, 1, max_length, d_model]``, ``mask [n, max_length]``."""

    def __init__(self, tokenizer: Any, model: T5EncoderModel, *, max_length: int = 300) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"T5TextEncoder: max_length must be an int >= 2 (a token and </s>), got {max_length!r}")
        if not isinstance(model, T5EncoderModel):
            raise ValueError(f"T5TextEncoder: model must be a transformers T5EncoderModel, got {type(model).__name__}")
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = max_length

    @property
    def hidden_size(self) -> int:
        """T5's ``d_model`` (4096 for T5-XXL): the last dim of ``y``."""
        return int(self.model.config.d_model)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        max_length: int = 300,
    ) -> T5TextEncoder:
        """Load from a local folder; never downloads.

        Layouts: tokenizer files, ``config.json`` and weights in ``path`` itself (what ``save_pretrained``
        writes, and the layout of ``DeepFloyd/t5-v1_1-xxl``), or, when ``path/config.json`` is absent,
        diffusers' ``path/tokenizer/`` and ``path/text_encoder/`` subfolders. ``dtype=None`` keeps the
        dtype the weights are stored in (Open-Sora runs T5 in float32).
        """
        from safetensors import SafetensorError

        tok_dir, model_dir = encoder_folders(Path(path))
        what = "T5TextEncoder.from_pretrained"
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except (OSError, ValueError) as e:  # a corrupt tokenizer.json is a bare JSONDecodeError
            files = [str(tok_dir / f) for f in _TOKENIZER_FILES if (tok_dir / f).is_file()]
            raise ValueError(f"{what}: cannot load the tokenizer from {', '.join(files)}: {e}") from e
        try:
            model = T5EncoderModel.from_pretrained(
                model_dir, dtype="auto" if dtype is None else dtype, local_files_only=True
            )
        except (SafetensorError, OSError, ValueError) as e:  # a truncated file's error does not name it
            files = [str(model_dir / f) for f in ("config.json", *_WEIGHT_FILES) if (model_dir / f).is_file()]
            raise ValueError(f"{what}: cannot load the T5 encoder from {', '.join(files)}: {e}") from e
        return cls(tokenizer, model.to(device), max_length=max_length)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write tokenizer and model into one folder (created if needed); ``from_pretrained`` reads it back."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.model.save_pretrained(path)
        return path

    def encode(
        self, prompts: Sequence[str], *, device: str | torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared prompts (see ``prompt_for_t5``) -> ``y [n, 1, L, d_model]`` (model dtype), ``mask [n, L]`` int64.

        ``L = max_length``: padded to and truncated at ``L`` tokens (``</s>`` included); mask 1 = valid.
        ``device``: where the tokens go (default: the model's; pass the compute device when it is offloaded).
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("T5TextEncoder.encode: prompts must be a non-empty list of str (not a bare str)")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ValueError(f"T5TextEncoder.encode: prompts {bad} are not str")
        tokens = self.tokenizer(
            list(prompts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        device = self.model.device if device is None else device
        input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        with torch.no_grad():
            y = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return y[:, None], mask


def encode_prompts_shared(
    encoder: T5TextEncoder | None,
    prompts: Sequence[str],
    group: dist.ProcessGroup,
    *,
    src: int = 0,
    device: str | torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 runs once, on group rank ``src``; every rank of ``group`` returns ``(y, mask)`` on ``device``.

    Contract: every rank calls with the same ``group`` and ``src``; ``src`` passes an encoder and the
    prompts, the others may pass ``None`` (their ``encoder`` and ``prompts`` are not read). If ``src``
    cannot encode (no encoder, bad prompts, an error while encoding) it tells the others first, so every
    rank raises instead of some blocking: ``src`` re-raises its error, the others raise ``ValueError``
    (``RuntimeError`` if ``src``'s error was not a ``ValueError``) naming it.
    """

    def encode() -> dict[str, torch.Tensor]:
        if encoder is None:
            raise ValueError(f"encode_prompts_shared: group rank {src} (src) must pass a T5TextEncoder, got None")
        y, mask = encoder.encode(prompts, device=device)
        return {"y": y, "mask": mask}

    what = "encode_prompts_shared: encoding the prompts"
    got = compute_on_rank(encode, group, src=src, device=device, what=what)
    return got["y"], got["mask"]
