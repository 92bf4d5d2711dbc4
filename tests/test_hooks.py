"""The per-instance hook chain: order, idempotence, bit-identical undo, named methods, diffusers' HookRegistry
and accelerate's hooks."""

from __future__ import annotations

import accelerate.hooks
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from xdit_core.graphs import apply_cuda_graph, remove_cuda_graph
from xdit_core.hooks import Hook, get_hook, hook_names, install_hook, remove_hook


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.lin(x) * scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.flip(-1)


class Record(Hook):
    """Adds ``add`` to the output and logs its steps."""

    def __init__(self, tag: str, log: list[str], add: float = 0.0) -> None:
        self.tag, self.log, self.add = tag, log, add

    def pre(self, module, args, kwargs):
        self.log.append(f"{self.tag}.pre")
        return args, kwargs

    def post(self, module, out):
        self.log.append(f"{self.tag}.post")
        return out + self.add


class Skip(Hook):
    """Replaces the call: returns zeros without running the module."""

    def call(self, module, inner, args, kwargs):
        return torch.zeros_like(args[0])


class Times(ModelHook):
    """A diffusers hook: multiplies the output."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def post_forward(self, module, output):
        return output * self.factor


class Around(ModelHook):
    """A diffusers hook with ``new_forward`` (how its caches replace a call)."""

    def new_forward(self, module, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs) - 100


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


def test_order_outermost_last_and_kwargs_pass_through():
    m, log = Affine(), []
    base = m(X, scale=2.0)
    install_hook(m, "a", Record("a", log, add=1.0))
    install_hook(m, "b", Record("b", log, add=10.0))
    out = m(X, scale=2.0)
    assert log == ["b.pre", "a.pre", "a.post", "b.post"]
    assert torch.equal(out, base + 11.0)
    assert hook_names(m) == ["a", "b"] and isinstance(get_hook(m, "a"), Record)


def test_idempotent_install_and_remove():
    m, log = Affine(), []
    hook = Record("a", log, add=1.0)
    install_hook(m, "a", hook)
    install_hook(m, "a", hook)  # the same hook again: nothing
    assert torch.equal(m(X), Affine()(X) + 1.0)
    with pytest.raises(ValueError, match="already has a hook named 'a'"):
        install_hook(m, "a", Record("other", log))
    remove_hook(m, "a")
    remove_hook(m, "a")  # already gone: nothing
    remove_hook(m, "never there")
    with pytest.raises(ValueError, match=r"needs an xdit_core\.hooks\.Hook"):
        install_hook(m, "x", lambda *a: a)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no method 'encode'"):
        install_hook(m, "x", Hook(), method="encode")


def test_undo_is_bit_identical_and_other_instances_and_the_class_are_untouched():
    m, other = Affine(), Affine()
    class_forward = Affine.forward
    before = m(X)
    install_hook(m, "skip", Skip())
    assert torch.equal(m(X), torch.zeros_like(X))
    assert torch.equal(other(X), before) and "forward" not in other.__dict__
    assert Affine.forward is class_forward
    remove_hook(m, "skip")
    assert torch.equal(m(X), before)
    assert "forward" not in m.__dict__ and "_xdit_hook_chains" not in m.__dict__


def test_a_named_method_such_as_decode():
    m, log = Affine(), []
    z = torch.arange(6.0).reshape(2, 3)
    install_hook(m, "r", Record("r", log, add=0.5), method="decode")
    assert torch.equal(m.decode(z), z.flip(-1) + 0.5) and torch.equal(m(X), Affine()(X))
    remove_hook(m, "r", method="decode")
    assert torch.equal(m.decode(z), z.flip(-1)) and "decode" not in m.__dict__


def test_an_instance_forward_installed_earlier_comes_back():
    m = Affine()

    def earlier(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    m.forward = earlier
    install_hook(m, "a", Record("a", [], add=1.0))
    assert torch.equal(m(X), X * 3 + 1)
    remove_hook(m, "a")
    assert m.forward is earlier


@pytest.mark.parametrize("ours_first", [True, False])
@pytest.mark.parametrize("remove_ours_first", [True, False])
@pytest.mark.parametrize("diffusers_hook", ["post_forward", "new_forward"])
def test_composes_with_diffusers_hook_registry(ours_first, remove_ours_first, diffusers_hook):
    m = Affine()
    plain = m(X)
    registry = HookRegistry.check_if_exists_or_initialize(m)
    theirs = Times(2.0) if diffusers_hook == "post_forward" else Around()

    def with_theirs(y: torch.Tensor) -> torch.Tensor:
        return y * 2.0 if diffusers_hook == "post_forward" else y - 100

    steps = [
        lambda: install_hook(m, "ours", Record("ours", [], add=1.0)),
        lambda: registry.register_hook(theirs, "theirs"),
    ]
    for step in steps if ours_first else steps[::-1]:
        step()
    # ours always sits below diffusers' hooks, whatever the order of installation
    assert torch.equal(m(X), with_theirs(plain + 1.0))
    if remove_ours_first:
        remove_hook(m, "ours")
        assert torch.equal(m(X), with_theirs(plain))
        registry.remove_hook("theirs")
    else:
        registry.remove_hook("theirs")
        assert torch.equal(m(X), plain + 1.0)  # diffusers' removal left our hook working
        remove_hook(m, "ours")
    assert torch.equal(m(X), plain)
    # and ours can come back
    install_hook(m, "again", Record("again", [], add=5.0))
    assert torch.equal(m(X), plain + 5.0)
    remove_hook(m, "again")
    assert torch.equal(m(X), plain)


class Double(accelerate.hooks.ModelHook):
    """An accelerate hook (the kind diffusers' CPU offload installs) that doubles the output."""

    def post_forward(self, module, output):
        return output * 2.0


@pytest.mark.parametrize("ours_first", [True, False])
@pytest.mark.parametrize("remove_ours_first", [True, False])
def test_composes_with_accelerate_hooks(ours_first, remove_ours_first):
    m = Affine()
    plain = m(X)
    steps = [
        lambda: install_hook(m, "ours", Record("ours", [], add=1.0)),
        lambda: accelerate.hooks.add_hook_to_module(m, Double()),
    ]
    for step in steps if ours_first else steps[::-1]:
        step()
    assert torch.equal(m(X), (plain + 1.0) * 2.0)  # ours below accelerate's, whatever the order
    # diffusers' maybe_free_model_hooks removes and re-adds its hooks after every pipeline call
    accelerate.hooks.remove_hook_from_module(m)
    assert torch.equal(m(X), plain + 1.0)  # accelerate's removal left our hook working
    accelerate.hooks.add_hook_to_module(m, Double())
    assert torch.equal(m(X), (plain + 1.0) * 2.0)
    if remove_ours_first:
        remove_hook(m, "ours")
        assert torch.equal(m(X), plain * 2.0)
        accelerate.hooks.remove_hook_from_module(m)
    else:
        accelerate.hooks.remove_hook_from_module(m)
        remove_hook(m, "ours")
    assert torch.equal(m(X), plain)
    # nothing of ours left behind (accelerate's removal may leave the class's bound forward in the instance)
    assert m.forward == Affine.forward.__get__(m) and "_old_forward" not in m.__dict__ and not hook_names(m)


def test_apply_cuda_graph_runs_cpu_calls_eagerly_and_comes_off():
    m = Affine()
    plain = m(X, scale=3.0)
    apply_cuda_graph(m)
    assert hook_names(m) == ["xdit.cuda_graph"] and torch.equal(m(X, scale=3.0), plain)
    remove_cuda_graph(m)
    assert hook_names(m) == [] and "forward" not in m.__dict__


def _graph_worker() -> list[float]:
    """One NCCL rank: parallel FLUX (bf16) replayed from CUDA graphs equals its eager calls."""
    from models import parallelize_flux, tiny_flux_transformer, unparallelize_flux
    from xdit_core import ParallelMesh

    device = torch.device("cuda", 0)
    model = tiny_flux_transformer(0).to(device, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 20, model.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 7, model.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(20, 3),
        txt_ids=torch.zeros(7, 3),
    )
    inputs = {k: v.to(device, v.dtype if k.endswith("ids") else torch.bfloat16) for k, v in inputs.items()}
    if model.config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5], device=device, dtype=torch.bfloat16)
    mesh = ParallelMesh.build(ulysses=1)
    with torch.no_grad():
        parallelize_flux(model, mesh)
        eager = model(**inputs).sample
        unparallelize_flux(model)
        parallelize_flux(model, mesh, cuda_graph=True)
        replays = [model(**inputs).sample for _ in range(4)]  # capture, then replays
        unparallelize_flux(model)
    return [(r.float() - eager.float()).abs().max().item() for r in replays]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_hook_replays_the_parallel_flux_call():
    from xdit_core import spawn

    errors = spawn(_graph_worker, 1, backend="nccl", timeout_s=300)[0]
    assert max(errors) == 0.0, errors  # the same kernels on the same inputs
