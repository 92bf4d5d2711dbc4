"""Parallel decoding of a chunked video VAE (Open-Sora 1.2's): chunks, then frames, dealt across ranks.

Two stages, each exact without halos because its units are independent in the single-device decode:

1. **Time.** The latent video is decoded in temporal chunks (17 frames ← 5 latent frames), each on its
   own (fresh causal padding, its own GroupNorm statistics). The ``(sample, chunk)`` pairs are dealt
   to the ranks in contiguous runs (``tensor_split`` sizes); each rank decodes its chunks with the
   temporal VAE, and one all-gather gives every rank all spatial latents (small: 4 channels at
   latent resolution).
2. **Space.** The spatial VAE decodes every frame alone. The ``B·T`` frames are dealt in contiguous
   runs to *frame groups* of ``r`` consecutive ranks; a group decodes each of its frames row-banded
   over its ``r`` ranks (halo convolutions, global GroupNorm, ring attention: the image decoder of
   :mod:`parallel_vae.decoder`). ``r = 1`` (each rank decodes whole frames) is chosen whenever there
   are at least as many frames as ranks; fewer frames (an image, a short clip) or an explicit
   ``ranks_per_frame`` shard each frame's rows as well.

The group's members then all-gather the rows of their frames, and every rank contributes a distinct
run of frames to one all-gather (or a gather to one rank) of the whole video ``[B, 3, T, H, W]``.

::

    ranks            0        1        2        3
    time stage     c0 c1    c2 c3     c4       c5        (6 chunks of one 102-frame video)
                   └──────── all-gather spatial latents ───────┘
    space, r = 1   f0–25    f26–51   f52–76   f77–101
    space, r = 2   f0–50, rows ½ + ½     f51–101, rows ½ + ½
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from parallel_vae.decoder import decode_rows, row_plan, upsampling
from xdit_core.collectives import all_gather, gather_to, split_sizes
from xdit_core.plan import gather

Tensor = torch.Tensor


class VideoVAE(Protocol):
    """What the parallel decode needs of a video VAE (``models.stdit.OpenSoraVAE`` has it): chunks
    ``c`` with ``latent_start``, ``latent_frames`` and ``frames``; ``spatial_vae.module`` an
    ``AutoencoderKL`` applied per frame to ``spatial_input(x)``."""

    spatial_vae: nn.Module
    micro_batch_size: int  # frames per spatial decode call

    def check_latents(self, z: Tensor, num_frames: int) -> None: ...
    def temporal_chunks(self, num_frames: int) -> list[Any]: ...
    def denormalize(self, z: Tensor) -> Tensor: ...
    def decode_chunk(self, z: Tensor, chunk: Any) -> Tensor: ...
    def spatial_input(self, x: Tensor) -> Tensor: ...


# the protocol's attributes and methods, read off the class so the two cannot drift apart
VIDEO_VAE_MEMBERS = tuple(VideoVAE.__annotations__) + tuple(
    name for name, value in vars(VideoVAE).items() if callable(value) and not name.startswith("_")
)


def is_video_vae(vae: Any) -> bool:
    """Whether ``vae`` has every member of :class:`VideoVAE` (a duck-typed check: ``nn.Module``
    submodules are invisible to ``isinstance`` on runtime protocols in Python ≥ 3.12)."""
    return all(hasattr(vae, name) for name in VIDEO_VAE_MEMBERS)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def frame_groups(group: dist.ProcessGroup) -> dict[int, dist.ProcessGroup]:
    """For every divisor ``r`` of the group size, the process group of this rank's ``r`` consecutive
    group ranks. Each rank creates only its own groups (local synchronisation), so calling this on
    every rank of ``group`` (not the whole world) is enough."""
    size, rank = group.size(), group.rank()
    ranks = dist.get_process_group_ranks(group)
    out = {}
    for r in divisors(size):
        if r == size:
            out[r] = group
        else:
            first = rank - rank % r
            out[r] = dist.new_group(ranks[first : first + r], use_local_synchronization=True)
    return out


def choose_ranks_per_frame(frames: int, rows: int, size: int, requested: int | None) -> int:
    """Ranks sharing one frame's rows: ``requested``, or the fewest that keep every rank busy (at
    least one frame per group) with at least one latent row per rank."""
    if requested is not None:
        if rows < requested:
            raise ValueError(
                f"parallel video decode: {rows} latent rows cannot be split over ranks_per_frame={requested} "
                f"ranks (each needs at least one row)"
            )
        return requested
    fitting = [r for r in divisors(size) if r <= rows]
    busy = [r for r in fitting if size // r <= frames]
    return busy[0] if busy else fitting[-1]


def check_ranks_per_frame(ranks_per_frame: int | None, size: int) -> None:
    if ranks_per_frame is not None and (
        not isinstance(ranks_per_frame, int) or ranks_per_frame < 1 or size % ranks_per_frame
    ):
        raise ValueError(
            f"parallelize_vae: ranks_per_frame must divide the {size} ranks (one of {divisors(size)}) or be None, "
            f"got {ranks_per_frame!r}"
        )


@torch.no_grad()
def decode_video(
    vae: VideoVAE,
    z: Tensor,
    num_frames: int,
    *,
    group: dist.ProcessGroup,
    groups: dict[int, dist.ProcessGroup],
    ranks_per_frame: int | None,
    tile_rows: int | None,
    gather_to_rank: int | None,
    backend: str,
) -> Tensor:
    """``vae.decode(z, num_frames)`` across ``group``: ``[B, 3, num_frames, H, W]`` on every rank (or,
    with ``gather_to_rank``, on that rank; the others get the frames they contributed,
    ``[n, 3, H, W]`` in ``(sample, frame)`` order). Every rank passes the same ``z``."""
    size, rank = group.size(), group.rank()
    batch, rows = z.shape[0], z.shape[3]
    r = choose_ranks_per_frame(batch * num_frames, rows, size, ranks_per_frame)
    z = vae.denormalize(z)

    # 1. time: (sample, chunk) pairs dealt in contiguous runs; all-gather the spatial latents.
    chunks = vae.temporal_chunks(num_frames)
    items = [(b, c) for b in range(batch) for c in chunks]
    counts = split_sizes(len(items), size)
    first = sum(counts[:rank])
    frames_of = [sum(c.frames for _, c in items[sum(counts[:p]) : sum(counts[: p + 1])]) for p in range(size)]
    mine = [
        vae.decode_chunk(z[b : b + 1, :, c.latent_start : c.latent_start + c.latent_frames], c)[0].transpose(0, 1)
        for b, c in items[first : first + counts[rank]]
    ]
    local = torch.cat(mine) if mine else z.new_empty((0, z.shape[1], rows, z.shape[4]))
    latents = all_gather(local, group, dim=0, sizes=frames_of) if size > 1 else local  # [B·T, C, h, w]

    # 2. space: frames dealt to groups of r consecutive ranks, each frame row-banded over its group.
    frame_group, groups_n = groups[r], size // r
    per_group = split_sizes(latents.shape[0], groups_n)
    g, member = divmod(rank, r)
    start = sum(per_group[:g])
    own = latents[start : start + per_group[g]]
    bands, placement = [], None
    module = vae.spatial_vae.module
    for xs in own.split(vae.micro_batch_size) if own.shape[0] else ():
        band, placement = decode_rows(module, vae.spatial_input(xs), frame_group, tile_rows=tile_rows, backend=backend)
        bands.append(band)
    frames = torch.cat(bands) if bands else None
    if frames is not None and r > 1:  # the rows of the group's frames (every frame split alike)
        frames = gather(row_plan(upsampling(module)), {"rows": frame_group}, {"image": frames}, placement)["image"]
    if frames is None:  # a group without frames (more groups than frames): still takes part below
        frames = _empty_frames(vae, latents)
    # every member contributes a distinct run of its group's frames, so the gather is in frame order
    shares = [n for count in per_group for n in split_sizes(count, r)]
    run = sum(split_sizes(per_group[g], r)[:member])
    contribution = frames[run : run + shares[rank]]
    if size == 1:
        video = contribution
    elif gather_to_rank is None:
        video = all_gather(contribution, group, dim=0, sizes=shares)
    else:
        video = gather_to(contribution, group, dim=0, sizes=shares, dst=gather_to_rank)
        if video is None:
            return contribution
    return video.unflatten(0, (batch, num_frames)).transpose(1, 2)


def _empty_frames(vae: VideoVAE, latents: Tensor) -> Tensor:
    """``[0, 3, H, W]`` of the decoded frames' shape (decoded from one latent frame: shapes only)."""
    module = vae.spatial_vae.module
    factor = 2 ** (len(module.config.block_out_channels) - 1)
    h, w = latents.shape[2] * factor, latents.shape[3] * factor
    return latents.new_empty((0, module.config.out_channels, h, w))
