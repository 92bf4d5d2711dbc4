"""STDiT3's building blocks other than attention: embedders, norms, the rotary and sin-cos embeddings.

Parameter names and shapes follow the published checkpoint (see ``models/stdit/model.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

Tensor = torch.Tensor


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t·f), sin(t·f)]`` (cos first) of ``t`` ``[N]``, float32 ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoid (256) → Linear → SiLU → Linear; also the fps embedder (``SizeEmbedder``)."""

    def __init__(self, hidden: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor, batch: int | None = None) -> Tensor:
        """``t`` ``[N]`` (or ``[1]``, repeated to ``batch``) → ``[N, hidden]`` in the weights' dtype."""
        if batch is not None and t.shape[0] != batch:
            t = t.repeat(batch // t.shape[0])
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class GeluLinear(nn.Linear):
    """``gelu_tanh(x @ weight.T + bias)``: an ``nn.Linear`` (same parameters, same hooks) whose output goes
    through GELU with the tanh approximation.

    On CUDA, for inference, one ``torch._addmm_activation``: a cuBLASLt GEMM with the bias and the GELU
    (tanh approximation) in its epilogue, applied to the float32 accumulator before the one rounding to
    the output dtype. The separate GELU would write the ``[N, hidden]`` product and read it back (4 GB per
    STDiT3-XL block at 720p 4 s, the largest activation of a block). Everywhere else the linear and
    ``F.gelu(approximate="tanh")`` as two ops: on the CPU (where that op's GELU is the exact, erf one), when
    gradients are needed (the op has no derivative), and for weights sharded by tensor parallelism
    (``DTensor`` has no rule for it).
    """

    # Tensor parallelism may split it as a torch.nn.Linear (models.tensor_parallel): it then computes with DTensor
    # weights, as the linear and the GELU, and an elementwise GELU commutes with a split of the output features.
    splits_like_linear = True

    def forward(self, x: Tensor) -> Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not x.is_cuda or grad or isinstance(self.weight, DTensor) or self.bias is None:
            return F.gelu(super().forward(x), approximate="tanh")
        out = torch._addmm_activation(self.bias, x.reshape(-1, x.shape[-1]), self.weight.t(), use_gelu=True)
        return out.unflatten(0, x.shape[:-1])


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` with GELU (tanh approximation), as timm's ``Mlp``; ``fc1`` applies the GELU
    itself (:class:`GeluLinear`)."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = GeluLinear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x))


class CaptionEmbedder(nn.Module):
    """T5 features ``[B, 1, L, caption_channels]`` → ``[B, 1, L, hidden]``; ``y_embedding`` is the learned
    null caption (a persistent buffer) used for the unconditional branch of CFG."""

    def __init__(self, caption_channels: int, hidden: int, max_length: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden, hidden)
        self.register_buffer("y_embedding", torch.randn(max_length, caption_channels) / caption_channels**0.5)

    def forward(self, y: Tensor) -> Tensor:
        return self.y_proj(y)


class RMSNorm(nn.Module):
    """``weight * (x * rsqrt(mean(x²) + eps))`` with the normalisation in float32, cast back first."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm normalises in float32 and rounds once to x's dtype: the same values as the
        # reference's upcast / normalise / cast-back, in one fused kernel instead of six.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


@dataclass(frozen=True)
class Rotation:
    """The rotary embedding of one sequence length: its ``cos`` and ``sin``, ``[L, d]`` each, computed once
    (per forward pass, not per block) and applied by calling it."""

    cos: Tensor
    sin: Tensor

    def __call__(self, x: Tensor, dim: int = -2) -> Tensor:
        """``x`` (last dim ``d``) rotated by position along ``dim`` (of length ``L``): interleaved pairs
        ``(x0, x1)`` → ``(x0 cos - x1 sin, x1 cos + x0 sin)``, in any layout (no transposes)."""
        shape = [1] * x.dim()
        shape[dim], shape[-1] = self.cos.shape
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (x * self.cos.view(shape) + rotated * self.sin.view(shape)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Interleaved-pair rotary embedding over the sequence (temporal attention only): ``rope(length, device,
    dtype)`` is the :class:`Rotation` to apply (``rotation(x, dim)``).

    ``freqs`` (a non-trainable parameter, saved as ``rope.freqs``) = ``1/10000^(2i/dim)``. Angles are
    ``position × freqs`` computed in the dtype of ``freqs``, as the reference does (so a bf16 model
    rotates with bf16 angles); pairs ``(x0, x1)`` rotate to ``(x0 cos - x1 sin, x1 cos + x0 sin)``.
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def forward(self, length: int, device: torch.device, dtype: torch.dtype) -> Rotation:
        """The :class:`Rotation` of positions ``0 … length-1`` for inputs of ``dtype`` (positions are made in
        it, then cast to the dtype of ``freqs``, as the reference does). Its ``forward``, so that offload hooks
        bring ``freqs`` to the device first."""
        positions = torch.arange(length, device=device, dtype=dtype).to(self.freqs.dtype)
        angles = (positions[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)  # [L, d]
        return Rotation(angles.cos(), angles.sin())


def sincos_pos_embed_2d(
    hidden: int, height: int, width: int, scale: float, base_size: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """PixArt's fixed 2-D embedding ``[1, height·width, hidden]`` (row-major tokens): the first half of
    the channels encodes the column coordinate, the second half the row; computed in ``dtype``."""
    quarter = hidden // 4
    inv_freq = (1.0 / 10000 ** (torch.arange(0, hidden // 2, 2, device=device).float() / (hidden // 2))).to(dtype)
    gh = torch.arange(height, device=device, dtype=dtype) / scale * (base_size / height)
    gw = torch.arange(width, device=device, dtype=dtype) / scale * (base_size / width)
    rows, cols = torch.meshgrid(gh, gw, indexing="ij")

    def sin_cos(coord: Tensor) -> Tensor:
        angles = coord.reshape(-1)[:, None] * inv_freq[None]  # [S, quarter]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    assert inv_freq.shape[0] == quarter
    return torch.cat([sin_cos(cols), sin_cos(rows)], dim=-1)[None]


class PatchEmbed3D(nn.Module):
    """``[B, C, T, H, W]`` → tokens ``[B, T'·H'·W', hidden]`` in ``(t, h, w)`` order; the input is
    zero-padded at the end of each dim to a multiple of the patch size first."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        x = F.pad(x, (0, -w % pw, 0, -h % ph, 0, -t % pt))
        # contiguous tokens: the transposed view would make every later elementwise op of the residual
        # stream strided (slow kernels) and every LayerNorm copy it first
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


def t2i_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x·(1 + scale) + shift`` as one fused multiply-add (one rounding instead of two)."""
    return torch.addcmul(shift, x, 1 + scale)
