"""The package rules of docs/design.md, read from the code: every import of every module, against the table.

Each package may import the standard library, its own modules, the first-party packages below it and the
third-party packages its row allows (a row allows what the rows below it allow, plus its own). Nothing
imports ``benchmarks``, ``examples`` or ``tests`` (nor their script modules, such as ``checks`` or
``example_setup``). Imports are read with ``ast`` from every ``.py`` file: at module level or inside a
function, ``if TYPE_CHECKING:`` included, relative imports resolved, and ``importlib.import_module("name")``
with a literal name counted too. A violation is reported as ``file:line: the import -- the rule``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Layer:
    name: str
    third_party: frozenset[str]  # what this row adds to the rows below it
    leaf: bool = False  # scripts: nothing may import them


# Bottom to top: a package may import the packages before it in this list, never one after it.
LAYERS = [
    Layer("xdit_core", frozenset({"torch"})),
    # the optional flash-attention kernels are imported by name at run time (attention/backends.py)
    Layer("attention", frozenset({"einops", "flash_attn", "flash_attn_interface", "fa3_fwd_interface"})),
    Layer("parallel_vae", frozenset()),
    # accelerate: diffusers' own CPU-offload hooks need it (models/offload.py)
    Layer("models", frozenset({"diffusers", "transformers", "tokenizers", "safetensors", "av", "accelerate"})),
    Layer(
        "serving", frozenset({"fastapi", "starlette", "uvicorn", "prometheus_client", "httpx", "tqdm", "matplotlib"})
    ),
    Layer("benchmarks", frozenset({"matplotlib", "torchmetrics"}), leaf=True),
    Layer("examples", frozenset({"tqdm"}), leaf=True),
]
# Modules allowed more than their package: the diffusers-specific part of parallel_vae.
MODULE_EXTRAS = {
    "parallel_vae/decoder.py": frozenset({"diffusers"}),
    "parallel_vae/vae.py": frozenset({"diffusers"}),
}
NEVER_IMPORTED = ("benchmarks", "examples", "tests")  # top-level folders of scripts, not libraries
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


def _allowed() -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Each package's (first-party packages below it, third-party packages it may import)."""
    table, below, third = {}, [], set()
    for layer in LAYERS:
        third |= layer.third_party
        table[layer.name] = (frozenset(below), frozenset(third))
        if not layer.leaf:
            below.append(layer.name)
    return table


ALLOWED = _allowed()
PACKAGES = [layer.name for layer in LAYERS if (ROOT / layer.name).is_dir()]
# Script folders import their siblings by bare name (benchmarks/checks.py is ``import checks``,
# benchmarks/quality/train.py ``import data``): each script's name -> the folders that hold one.
SCRIPTS: dict[str, set[Path]] = {}
for _folder in NEVER_IMPORTED:
    for _path in (ROOT / _folder).rglob("*.py"):
        SCRIPTS.setdefault(_path.stem, set()).add(_path.parent)


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    text: str  # as written
    target: str  # the dotted module it names, relative imports resolved


def _literal_import_module(node: ast.AST) -> str | None:
    """The name in ``importlib.import_module("name")`` (any spelling of the callee ending in it), else None."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    callee = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    arg = node.args[0]
    if callee == "import_module" and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def imports_of(path: Path) -> list[Import]:
    """Every import in ``path``."""
    source = path.read_text()
    package = path.relative_to(ROOT).parts[:-1]  # of a module or an __init__.py alike
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: the package, up level - 1
            targets = [".".join([*package[: len(package) - node.level + 1], *filter(None, [node.module])])]
        elif isinstance(node, ast.ImportFrom):
            targets = [node.module]
        else:
            targets = list(filter(None, [_literal_import_module(node)]))
        text = " ".join(ast.get_source_segment(source, node).split()) if targets else ""
        found += [Import(path, node.lineno, text, target) for target in targets]
    return found


def violation(package: str, imp: Import) -> str | None:
    """Why ``imp`` (in ``package``) breaks the table, or ``None``."""
    top = imp.target.split(".")[0]
    below, third = ALLOWED[package]
    third = third | MODULE_EXTRAS.get(imp.path.relative_to(ROOT).as_posix(), frozenset())
    if top in STDLIB or top == package:
        return None
    if package in NEVER_IMPORTED and imp.path.parent in SCRIPTS.get(top, ()):
        return None  # a script importing its sibling
    if top in NEVER_IMPORTED or top in SCRIPTS:
        folder = top if top in NEVER_IMPORTED else sorted(p.relative_to(ROOT).as_posix() for p in SCRIPTS[top])[0]
        return f"nothing imports {folder}/ (scripts and tests sit on top of the packages)"
    if top in ALLOWED:
        if top in below:
            return None
        allowed = f"only {sorted(below)}" if below else "no other first-party package"
        return f"{package} may import {allowed}: {top} is not below it in the table"
    if top in third:
        return None
    extras = [m for m, allowed in MODULE_EXTRAS.items() if top in allowed and m.startswith(f"{package}/")]
    where = f" (only in {', '.join(extras)})" if extras else ""
    return f"{package} may import the standard library, torch and {sorted(third - {'torch'})}: not {top}{where}"


def violations() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for imp in imports_of(path):
                why = violation(package, imp)
                if why:
                    found.append(f"{path.relative_to(ROOT)}:{imp.line}: {imp.text} -- {why}")
    return found


def test_every_import_follows_the_package_table() -> None:
    found = violations()
    for line in found:
        print(line)
    assert not found, f"{len(found)} imports break docs/design.md's package table:\n" + "\n".join(found)


def test_the_check_sees_imports() -> None:
    """The parser finds the imports it must judge (a check that finds nothing passes for nothing)."""
    flux = imports_of(ROOT / "models" / "flux" / "adapter.py")
    assert {"diffusers", "models.flux.processor", "xdit_core.mesh"} <= {i.target for i in flux}
    assert violation("attention", Import(ROOT / "attention" / "ring.py", 1, "import diffusers", "diffusers"))
    assert violation("xdit_core", Import(ROOT / "xdit_core" / "mesh.py", 1, "import attention", "attention"))
    assert violation("models", Import(ROOT / "models" / "x.py", 1, "from checks import x", "checks"))
    assert not violation("parallel_vae", Import(ROOT / "parallel_vae" / "vae.py", 1, "import diffusers", "diffusers"))
    assert violation("parallel_vae", Import(ROOT / "parallel_vae" / "conv.py", 1, "import diffusers", "diffusers"))


def test_design_md_lists_what_the_check_allows() -> None:
    """docs/design.md's table names every package and each third-party package its row adds."""
    text = (ROOT / "docs" / "design.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|.*\| (.*) \|$", text, re.M)}
    for layer in LAYERS:
        assert layer.name in rows, f"docs/design.md's package table has no row for {layer.name}"
        missing = [name for name in layer.third_party if f"`{name}`" not in rows[layer.name]]
        assert not missing, f"docs/design.md: the {layer.name} row does not name {missing}"
    for module, extras in MODULE_EXTRAS.items():
        assert f"`{module.split('/')[-1]}`" in rows[module.split("/")[0]], f"docs/design.md: name {module}"
        assert all(f"`{name}`" in rows[module.split("/")[0]] for name in extras)


def test_core_packages_import_without_diffusers() -> None:
    """xdit_core, attention and parallel_vae's model-agnostic parts import with diffusers and transformers absent."""
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        sys.modules["diffusers"] = None  # any import of it now raises ImportError
        sys.modules["transformers"] = None
        import attention, parallel_vae, xdit_core
        for package in (xdit_core, attention):
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{package.__name__}.{module.name}")
        import parallel_vae.bands, parallel_vae.conv, parallel_vae.halo, parallel_vae.norm
        from parallel_vae import Band, distributed_group_norm, exchange_halos, slab_ranges
        from attention import ring_attention, ulysses_attention, usp_attention
        try:
            from parallel_vae import parallelize_vae
        except ImportError:
            pass
        else:
            raise AssertionError("parallelize_vae imported without diffusers")
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-2000:] + run.stderr[-4000:]
