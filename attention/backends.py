"""Local attention kernels that return ``(out, lse)``, behind a small registry.

Every backend works in the ``[B, S, H, D]`` layout and returns ``out [B, S_q, H, D]`` (input dtype)
and ``lse [B, H, S_q]`` in float32 (natural log of each query row's softmax normaliser). A backend
with a backward kernel also computes gradients from a given ``(out, lse)``: this is what ring
attention needs, with the *merged* out and lse. Backends that cannot return a real LSE are not
registered at all, so none can ever feed a merge.

Order of the registry = preference of ``backend="auto"`` (fastest first), except on short key sequences
(fewer than ``SHORT_KEYS``), where cuDNN goes before FlashAttention-3 (:func:`_auto_order`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

Tensor = torch.Tensor
_HALF = (torch.float16, torch.bfloat16)


SHORT_KEYS = 512  # below this many keys "auto" prefers cuDNN to FlashAttention-3 (see _auto_order)


@dataclass(frozen=True)
class AttentionCall:
    """What a kernel is asked to do: enough to decide whether it can, and which is fastest."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    needs_grad: bool
    keys: int = SHORT_KEYS  # how many keys a query attends (only whether it is below SHORT_KEYS matters)

    @property
    def short_keys(self) -> bool:
        return self.keys < SHORT_KEYS


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    backward: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor, Tensor]] | None
    reject: Callable[[AttentionCall], str | None]

    def why_not(self, call: AttentionCall) -> str | None:
        """Why this backend cannot run ``call`` (None if it can)."""
        if call.needs_grad and self.backward is None:
            return "forward only (no backward kernel that accepts a given out and lse)"
        return self.reject(call)


@functools.cache
def _import(name: str) -> ModuleType | str:
    """The module, or why it could not be imported."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken CUDA extension
        return f"{name} not importable ({type(e).__name__})"


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _gpu_half(call: AttentionCall, *, min_cc: tuple[int, int], max_dim: int, dtypes=_HALF) -> str | None:
    if call.device.type != "cuda":
        return f"needs a CUDA tensor, got {call.device.type}"
    if call.dtype not in dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"needs {names}, got {str(call.dtype).removeprefix('torch.')}"
    if call.head_dim % 8 or call.head_dim > max_dim:
        return f"needs head_dim a multiple of 8 and at most {max_dim}, got {call.head_dim}"
    if _capability(call.device) < min_cc:
        return f"needs compute capability >= {min_cc[0]}.{min_cc[1]}, got {_capability(call.device)}"
    return None


def _bhsd(*xs: Tensor) -> list[Tensor]:
    return [x.transpose(1, 2) for x in xs]


_ALIGN_BYTES = 16  # GPU kernels load 16-byte vectors: row starts must be aligned to them


def kernel_layout(x: Tensor) -> Tensor:
    """``x`` as the kernels can read it: unchanged when it already fits, else a contiguous copy.

    Every kernel reads the head dim as one dense run (stride 1); the GPU kernels also load every
    row (and the start) in aligned 16-byte vectors and take no broadcast (stride 0) dims. Views that
    break this (``x[..., ::2]``, an offset slice of the head dim, ``expand``) are copied; layouts
    such as ``transpose(1, 2)`` of a contiguous tensor pass through with no copy.
    """
    if x.dim() == 0 or x.shape[-1] <= 1:
        return x
    if x.stride(-1) != 1:
        return x.contiguous()
    if x.device.type == "cuda":
        unit = _ALIGN_BYTES // x.element_size()
        if x.data_ptr() % _ALIGN_BYTES or any(
            (st % unit or st == 0) for st, n in zip(x.stride()[:-1], x.shape[:-1], strict=True) if n > 1
        ):
            return x.contiguous()
    return x


def _any_layout(kernel: Callable[..., tuple[Tensor, ...]]) -> Callable[..., tuple[Tensor, ...]]:
    """``kernel`` accepting any strides: tensor arguments pass through :func:`kernel_layout` first."""

    @functools.wraps(kernel)
    def run(*args: object) -> tuple[Tensor, ...]:
        return kernel(*(kernel_layout(a) if isinstance(a, Tensor) else a for a in args))

    return run


# ----------------------------------------------------------------------------------------- math
def _math_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (x.to(acc) for x in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), vf)
    return out.to(q.dtype), lse.float()


def _math_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, of, df = (x.to(acc) for x in (q, k, v, out, dout))
    p = torch.exp(torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale - lse.to(acc)[..., None])
    dv = torch.einsum("bhqk,bqhd->bkhd", p, df)
    dp = torch.einsum("bqhd,bkhd->bhqk", df, vf)
    delta = (df * of).sum(-1).transpose(1, 2)  # [B, H, S_q]
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, qf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------ torch CPU
def _cpu_flash_forward(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_bhsd(q, k, v), scale=scale)
    return out.transpose(1, 2), lse.float()  # the kernel's lse is float64 for float64 inputs


def _cpu_flash_backward(dout, q, k, v, out, lse, scale):
    kernel_lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_bhsd(dout.contiguous(), q, k, v, out), kernel_lse, 0.0, False, scale=scale
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _cpu_flash_reject(call: AttentionCall) -> str | None:
    if call.device.type != "cpu":
        return f"needs a CPU tensor, got {call.device.type}"
    if call.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"unsupported dtype {call.dtype}"
    return None


# ----------------------------------------------------------------------------------- torch CUDA
def _empty_like_rng(x: Tensor) -> Tensor:
    return torch.empty((), dtype=torch.int64, device=x.device)


def _cudnn_forward(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        *_bhsd(q, k, v), None, True, 0.0, False, False, scale=scale
    )
    return res[0].transpose(1, 2), res[1].reshape(q.shape[0], q.shape[2], q.shape[1]).float()


def _cudnn_backward(dout, q, k, v, out, lse, scale):
    b, sq, h, _ = q.shape
    rng = _empty_like_rng(q)
    # cum_seq_q / cum_seq_k undefined (None): dense, not nested, inputs
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        *_bhsd(dout.contiguous(), q, k, v, out.contiguous()), lse.contiguous().view(b, h, sq, 1), rng, rng,
        None, None, None, sq, k.shape[1], 0.0, False, scale=scale,
    )  # fmt: skip
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _torch_flash_forward(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(*_bhsd(q, k, v), 0.0, False, False, scale=scale)
    return res[0].transpose(1, 2), res[1]


def _torch_flash_backward(dout, q, k, v, out, lse, scale):
    sq, sk = q.shape[1], k.shape[1]
    rng = torch.empty(2, dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        *_bhsd(dout.contiguous(), q, k, v, out.contiguous()), lse.contiguous(), None, None, sq, sk, 0.0, False,
        rng, rng, scale=scale,
    )  # fmt: skip
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _efficient_forward(q, k, v, scale):
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        *_bhsd(q, k, v), None, True, 0.0, False, scale=scale
    )
    return out.transpose(1, 2), lse[..., : q.shape[1]]


def _efficient_backward(dout, q, k, v, out, lse, scale):
    rng = _empty_like_rng(q)
    lse = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32))  # the kernel reads lse padded to 32 rows
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        *_bhsd(dout.contiguous(), q, k, v), None, out.contiguous().transpose(1, 2), lse, rng, rng,
        0.0, [True, True, True, False], False, scale=scale,
    )  # fmt: skip
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _cudnn_reject(call: AttentionCall) -> str | None:
    if not torch.backends.cudnn.is_available():
        return "cuDNN not available"
    return _gpu_half(call, min_cc=(9, 0), max_dim=128)


def _torch_flash_reject(call: AttentionCall) -> str | None:
    return _gpu_half(call, min_cc=(8, 0), max_dim=256)


def _efficient_reject(call: AttentionCall) -> str | None:
    # Its forward kernel takes head dims past 256 (the VAE's one head of 512); backward is held to 256.
    max_dim = 256 if call.needs_grad else 512
    return _gpu_half(call, min_cc=(5, 0), max_dim=max_dim, dtypes=(*_HALF, torch.float32))


# ------------------------------------------------------------------- flash-attn packages (forward)
_FA3_MODULES = ("flash_attn_interface", "fa3_fwd_interface")


def _fa3_module() -> ModuleType | str:
    reasons = []
    for name in _FA3_MODULES:
        mod = _import(name)
        if isinstance(mod, ModuleType):
            return mod
        reasons.append(mod)
    return "; ".join(reasons)


def _fa_forward(mod: ModuleType, q, k, v, scale):
    res = mod.flash_attn_func(q, k, v, softmax_scale=scale, causal=False, return_attn_probs=True)
    return res[0], res[1]


def _fa3_forward(q, k, v, scale):
    mod = _fa3_module()
    assert isinstance(mod, ModuleType)
    if mod.__name__ == "fa3_fwd_interface":
        # The kernel op itself, without the autograd wrapper (about 0.1 ms less CPU per call).
        out, lse, *_ = mod._flash_attn_forward(q, k, v, softmax_scale=scale)
        return out, lse
    return _fa_forward(mod, q, k, v, scale)


def _fa2_forward(q, k, v, scale):
    mod = _import("flash_attn")
    assert isinstance(mod, ModuleType)
    return _fa_forward(mod, q, k, v, scale)


def _fa3_reject(call: AttentionCall) -> str | None:
    mod = _fa3_module()
    if isinstance(mod, str):
        return mod
    dtypes = (torch.bfloat16,) if mod.__name__ == "fa3_fwd_interface" else _HALF  # fa3-fwd builds bf16 only
    return _gpu_half(call, min_cc=(9, 0), max_dim=256, dtypes=dtypes)


def _fa2_reject(call: AttentionCall) -> str | None:
    mod = _import("flash_attn")
    return mod if isinstance(mod, str) else _gpu_half(call, min_cc=(8, 0), max_dim=256)


# Every kernel is wrapped by ``_any_layout``: inputs of any strides are made readable (or passed as they are).
BACKENDS: tuple[Backend, ...] = tuple(
    Backend(name, _any_layout(fwd), None if bwd is None else _any_layout(bwd), reject)
    for name, fwd, bwd, reject in (
        ("fa3", _fa3_forward, None, _fa3_reject),
        ("cudnn", _cudnn_forward, _cudnn_backward, _cudnn_reject),
        ("fa2", _fa2_forward, None, _fa2_reject),
        ("flash", _torch_flash_forward, _torch_flash_backward, _torch_flash_reject),
        ("efficient", _efficient_forward, _efficient_backward, _efficient_reject),
        ("cpu_flash", _cpu_flash_forward, _cpu_flash_backward, _cpu_flash_reject),
        ("math", _math_forward, _math_backward, lambda call: None),
    )
)
BACKEND_NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)


def select_backend(name: str, call: AttentionCall) -> Backend:
    """The named backend (or, for ``"auto"``, the first that fits), else one ``ValueError`` with every reason."""
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto' or one of {', '.join(BACKEND_NAMES)}")
    chosen = _first_fit(name, call)
    if chosen is not None:
        return chosen
    shown = (
        _auto_order(call)
        if name == "auto"
        else (*(b for b in BACKENDS if b.name == name), *(b for b in BACKENDS if b.name != name))
    )
    reasons = [f"  {b.name}: {b.why_not(call) or 'would run'}" for b in shown]
    raise ValueError(
        f"attention backend {name!r} cannot run {call.dtype} head_dim={call.head_dim} on {call.device}"
        f"{' with gradients' if call.needs_grad else ''}:\n" + "\n".join(reasons)
    )


def _auto_order(call: AttentionCall) -> tuple[Backend, ...]:
    """``BACKENDS``, except that on short key sequences cuDNN comes before FlashAttention-3.

    Measured on one H200 (bf16, 16 heads of 72, ``benchmarks/kernel_probe.py``): FA3 is fastest on long
    sequences (3600 keys: 8.3 ms against cuDNN's 11.8), but its 128-row tiles are mostly idle on short
    ones: STDiT3's temporal attention (30 keys) 3.5 ms against 2.6, its cross-attention (120 text keys)
    0.65 ms against 0.46."""
    if not call.short_keys:
        return BACKENDS
    names = [b.name for b in BACKENDS]
    order = list(BACKENDS)
    order.insert(names.index("fa3"), order.pop(names.index("cudnn")))
    return tuple(order)


def _first_fit(name: str, call: AttentionCall) -> Backend | None:
    # Memoised by its key (what decides the choice), since it runs on every attention call.
    return _first_fit_cached(name, dataclasses.replace(call, keys=min(call.keys, SHORT_KEYS)))


@functools.lru_cache(maxsize=256)
def _first_fit_cached(name: str, call: AttentionCall) -> Backend | None:
    # A pure function of the call and of what is installed.
    for backend in _auto_order(call) if name == "auto" else (b for b in BACKENDS if b.name == name):
        if backend.why_not(call) is None:
            return backend
    return None


def available_backends(call: AttentionCall) -> list[str]:
    """Names of the backends that can run ``call``, fastest first (the order ``"auto"`` tries them in)."""
    return [b.name for b in _auto_order(call) if b.why_not(call) is None]
