"""Key masks as per-sample lists of the keys to attend.

Masked keys are left out rather than given ``-inf`` scores, so every kernel (FA3 has no mask input)
computes masked attention exactly: per sample, the kept keys' rows are selected and attended. A
sample with no kept key in a block contributes ``(out 0, lse -inf)``, which merges to nothing; a
query with no kept key at all gets output 0. The mask is replicated on every rank, so every rank
derives the same lists (one copy of the ``[B, L]`` mask to the host per call).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
Keep = list[Tensor]  # per sample: ascending positions (int64, on the host) of the keys to attend


def check_key_mask(mask: object, batch: int, length: int, what: str, name: str = "key_mask") -> Tensor:
    """A ``[batch, length]`` bool tensor (True = attend), as given."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{what}: {name} must be a bool tensor [B, L] (True = attend), got {mask!r:.60}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{what}: {name} must have shape [B, L] = {(batch, length)}, got {tuple(mask.shape)}")
    return mask


def check_masks(
    key_mask: object, joint_key_mask: object, joint: tuple[Tensor, ...] | None, batch: int, length: int, what: str
) -> None:
    """``key_mask`` ``[B, L]`` over the sequence, ``joint_key_mask`` ``[B, J]`` over the joint tokens."""
    if key_mask is not None:
        check_key_mask(key_mask, batch, length, what)
    if joint_key_mask is not None:
        if joint is None:
            raise ValueError(f"{what}: joint_key_mask given without joint tokens")
        check_key_mask(joint_key_mask, batch, joint[0].shape[1], what, "joint_key_mask")


def keep_lists(mask: Tensor) -> Keep:
    """Per sample, the positions of the kept keys."""
    host = mask.detach().to("cpu")
    return [torch.nonzero(row).flatten() for row in host]


def block_keep(keep: Keep | None, start: int, stop: int, device: torch.device) -> Keep | None:
    """The kept keys among positions ``[start, stop)``, relative to ``start``, on ``device``.

    ``None`` when nothing in the block is masked (the unmasked fast path).
    """
    if keep is None:
        return None
    block = [idx[(idx >= start) & (idx < stop)] - start for idx in keep]
    if all(len(idx) == stop - start for idx in block):
        return None
    return [idx.to(device) for idx in block]
