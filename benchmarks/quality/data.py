"""Procedural captioned images: one or two coloured shapes on a dark background, with a caption of word tokens.

Every batch is a function of its seed (or of a ``torch.Generator``'s state): the layout is drawn on the CPU,
so the same seed gives the same images on any device. A caption reads e.g. ``"red circle top-left and blue
square center"``; its token ids start with ``<bos>`` (never masked, so an empty caption still has a token)
and are padded with ``<pad>`` (id 0) to a fixed length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

COLOURS: dict[str, tuple[float, float, float]] = {  # RGB in [0, 1]
    "red": (0.95, 0.15, 0.12),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "white": (0.95, 0.95, 0.95),
    "cyan": (0.1, 0.9, 0.9),
    "magenta": (0.9, 0.2, 0.9),
    "orange": (1.0, 0.55, 0.1),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) of the shape's centre, as fractions of the side
    "top-left": (0.27, 0.27),
    "top-right": (0.73, 0.27),
    "bottom-left": (0.27, 0.73),
    "bottom-right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
PAD, BOS, AND = "<pad>", "<bos>", "and"
VOCAB: tuple[str, ...] = (PAD, BOS, AND, *COLOURS, *SHAPES, *POSITIONS)
TOKEN = {word: i for i, word in enumerate(VOCAB)}
TOKEN_LENGTH = 12  # <bos> + 2 × (colour, shape, position) + "and" = 8 tokens at most
BACKGROUND = (0.08, 0.08, 0.1)  # dark, in [0, 1]
RADIUS = (0.11, 0.15)  # a shape's half-extent, as a fraction of the side
JITTER = 0.03  # of the centre, as a fraction of the side

_COLOUR_TABLE = torch.tensor(list(COLOURS.values()))  # [colours, 3]
_POSITION_TABLE = torch.tensor(list(POSITIONS.values()))  # [positions, 2]
_FIRST_COLOUR, _FIRST_SHAPE, _FIRST_POSITION = TOKEN["red"], TOKEN["circle"], TOKEN["top-left"]


@dataclass
class Batch:
    """Images [B, 3, H, W] in [-1, 1], token ids [B, L] (int64, 0 = padding), mask [B, L] (bool), captions."""

    images: Tensor
    tokens: Tensor
    mask: Tensor
    captions: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


def encode(caption: str, length: int = TOKEN_LENGTH) -> tuple[Tensor, Tensor]:
    """Token ids [L] and mask [L] of a caption of vocabulary words (``<bos>`` is added)."""
    words = [BOS, *caption.split()]
    unknown = [w for w in words if w not in TOKEN]
    if unknown:
        raise ValueError(f"encode: words not in the vocabulary: {unknown} (vocabulary: {' '.join(VOCAB[2:])})")
    if len(words) > length:
        raise ValueError(f"encode: {len(words)} tokens with <bos> do not fit the length {length}")
    tokens = torch.zeros(length, dtype=torch.long)
    tokens[: len(words)] = torch.tensor([TOKEN[w] for w in words])
    return tokens, tokens != TOKEN[PAD]


def decode(tokens: Tensor) -> str:
    """The caption of token ids [L] (without ``<bos>`` and padding)."""
    return " ".join(VOCAB[i] for i in tokens.tolist() if i not in (TOKEN[PAD], TOKEN[BOS]))


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def make_batch(
    batch: int,
    seed: int | torch.Generator,
    size: int = 32,
    length: int = TOKEN_LENGTH,
    device: torch.device | str = "cpu",
    two_shapes: float = 0.5,
    captions: bool = True,
) -> Batch:
    """``batch`` captioned images of ``size``² pixels; ``two_shapes``: the chance that an image has a second shape.

    ``seed``: an int, or a CPU ``torch.Generator`` whose state advances (a training stream of batches).
    ``captions=False`` leaves the caption strings empty (training needs only the token ids).
    """
    if length < 8:
        raise ValueError(f"make_batch: captions need 8 tokens, got length {length}")
    g = _generator(seed)
    colour = torch.randint(len(COLOURS), (batch, 2), generator=g)
    shape = torch.randint(len(SHAPES), (batch, 2), generator=g)
    first = torch.randint(len(POSITIONS), (batch,), generator=g)
    second = (first + torch.randint(1, len(POSITIONS), (batch,), generator=g)) % len(POSITIONS)  # a different place
    position = torch.stack((first, second), dim=1)  # [B, 2]
    present = torch.stack((torch.ones(batch, dtype=torch.bool), torch.rand(batch, generator=g) < two_shapes), 1)
    centre = _POSITION_TABLE[position] + (torch.rand(batch, 2, 2, generator=g) * 2 - 1) * JITTER  # [B, 2, 2]
    radius = RADIUS[0] + torch.rand(batch, 2, generator=g) * (RADIUS[1] - RADIUS[0])  # [B, 2]

    # tokens: <bos> c0 s0 p0 [and c1 s1 p1], padded
    words = torch.stack(
        (
            torch.full((batch,), TOKEN[BOS]),
            colour[:, 0] + _FIRST_COLOUR,
            shape[:, 0] + _FIRST_SHAPE,
            position[:, 0] + _FIRST_POSITION,
            torch.full((batch,), TOKEN[AND]),
            colour[:, 1] + _FIRST_COLOUR,
            shape[:, 1] + _FIRST_SHAPE,
            position[:, 1] + _FIRST_POSITION,
        ),
        dim=1,
    )  # [B, 8]
    words[:, 4:] *= present[:, 1:2]
    tokens = torch.zeros(batch, length, dtype=torch.long)
    tokens[:, :8] = words
    texts = [decode(row) for row in words] if captions else []

    images = render(
        colour=_COLOUR_TABLE[colour].to(device),
        shape=shape.to(device),
        centre=centre.to(device),
        radius=radius.to(device),
        present=present.to(device),
        size=size,
    )
    tokens = tokens.to(device)
    return Batch(images, tokens, tokens != TOKEN[PAD], texts)


def render(colour: Tensor, shape: Tensor, centre: Tensor, radius: Tensor, present: Tensor, size: int) -> Tensor:
    """Images [B, 3, size, size] in [-1, 1] of K shapes per image, drawn in order (later ones on top).

    colour [B, K, 3] in [0, 1]; shape [B, K] (index into ``SHAPES``); centre [B, K, 2] (x, y) and radius [B, K]
    as fractions of the side; present [B, K] bool. Edges are anti-aliased by a one-pixel ramp of the signed
    distance to the shape.
    """
    batch, device = colour.shape[0], colour.device
    axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(axis, axis, indexing="ij")  # [H, W]
    image = torch.tensor(BACKGROUND, device=device).view(1, 3, 1, 1).expand(batch, 3, size, size)
    for k in range(colour.shape[1]):
        dx = x - centre[:, k, 0].view(-1, 1, 1)  # [B, H, W]
        dy = y - centre[:, k, 1].view(-1, 1, 1)
        r = radius[:, k].view(-1, 1, 1)
        circle = torch.sqrt(dx**2 + dy**2) - r
        square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
        # upward triangle: apex at (0, -r), base from (-r, r) to (r, r); image y grows downwards
        triangle = torch.maximum(dy - r, (dx.abs() - (dy + r) / 2) / math.sqrt(1.25))
        distance = torch.stack((circle, square, triangle), dim=1)  # [B, 3, H, W], in fractions of the side
        distance = distance.gather(1, shape[:, k].view(-1, 1, 1, 1).expand(-1, 1, size, size))  # [B, 1, H, W]
        cover = (0.5 - distance * size).clamp(0, 1) * present[:, k].view(-1, 1, 1, 1)
        image = image * (1 - cover) + colour[:, k].view(-1, 3, 1, 1) * cover
    return image * 2 - 1
