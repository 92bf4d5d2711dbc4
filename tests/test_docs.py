"""Every ```python block in README.md and docs/*.md runs as written, on CPU, or says why it cannot.

The first line of every ```python block is one of:

* ``# run: python`` -- one plain process (``python block.py``);
* ``# run: torchrun --nproc_per_node N`` -- N CPU processes under torchrun (gloo; the test launches
  ``python -m torch.distributed.run --standalone --nproc_per_node N block.py``), so ``init_distributed()``
  works as written;
* ``# not run: <reason>`` -- not executed, because it truly needs GPUs or real weights (say which).
  Such a block must still compile, use no name it does not define or import, and its imports are run
  (so a renamed function fails here). Keep these few: a block that can run on toy sizes should.

A block without one of these first lines fails ``test_every_python_block_runs_or_says_why``. A run
block should check its own claims (``torch.testing.assert_close(out, reference)``), finish in seconds
on 2 cores and write files only to its working directory (a fresh temporary folder). Blocks run with
``OMP_NUM_THREADS=1``, no GPU visible and the repository on ``PYTHONPATH``.

Other fences (```bash, plain ```) are not executed: the README's CPU quick-start commands are what CI
runs anyway (``.ci/run``), and the GPU commands need GPUs. The docs' relative links, their heading
anchors and the scripts they cite are checked to exist (a removed script is cited "at commit `abc1234`").
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_PYTHON = re.compile(r"# run: python\s*$")
RUN_TORCHRUN = re.compile(r"# run: torchrun --nproc_per_node (\d+)\s*$")
NOT_RUN = re.compile(r"# not run: (.{12,})$")  # a reason of a few words, not just "gpu"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def directive(self) -> str:
        return self.code.split("\n", 1)[0].strip()


def python_blocks() -> list[Block]:
    """Every ```python block of README.md and docs/*.md, in file order."""
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == "python":
                blocks.append(Block(path, text.count("\n", 0, match.start()) + 1, match.group(2)))
    return blocks


BLOCKS = python_blocks()


def _undefined_names(tree: ast.Module) -> set[str]:
    """Names loaded anywhere in ``tree`` that it never binds (assignment, import, def, argument, ...)."""
    bound = set(dir(builtins))
    loaded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded - bound


# Run under torchrun (or plain python): executes the blocks of one launch in order, each as __main__
# in its own folder; each rank records what happened after every block, and the first failure ends the
# launch at once (torchrun then stops the other ranks instead of leaving them waiting in a collective).
RUNNER = """
import json, os, runpy, sys, traceback
report, blocks = sys.argv[1], json.loads(sys.argv[2])
done = {}
for name, script in blocks:
    os.chdir(os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
        done[name] = None
    except BaseException:
        done[name] = traceback.format_exc()
    with open(report + "." + os.environ.get("RANK", "0"), "w") as f:
        json.dump(done, f)
    if done[name] is not None:
        sys.stdout.flush(); sys.stderr.flush(); os._exit(1)
"""


def _launch_of(block: Block) -> int | None:
    """The process count a run block asks for (``None``: plain python); ``pytest.fail`` for anything else."""
    first = block.directive
    torchrun = RUN_TORCHRUN.fullmatch(first)
    if torchrun:
        return int(torchrun.group(1))
    if RUN_PYTHON.fullmatch(first):
        return None
    pytest.fail(
        f"{block.name}: the first line must be '# run: python', '# run: torchrun --nproc_per_node N' or "
        f"'# not run: <why it needs GPUs or weights>', not {first!r} (see tests/test_docs.py)"
    )


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """``launch(n)``: runs every block that asks for ``n`` processes in one launch (starting processes
    costs far more than these blocks) and returns ``(per-rank reports, the launch's output)``, once."""
    results: dict[int | None, tuple[list[dict], str]] = {}

    def launch(n: int | None) -> tuple[list[dict], str]:
        if n not in results:
            folder = tmp_path_factory.mktemp(f"docs_{n or 'python'}")
            scripts = []
            for i, block in enumerate(_blocks_for(n)):
                (folder / str(i)).mkdir()
                (folder / str(i) / "block.py").write_text(block.code)
                scripts.append((block.name, str(folder / str(i) / "block.py")))
            (folder / "runner.py").write_text(RUNNER)
            torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n else []
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": "",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            }
            report = folder / "report"
            command = [sys.executable, *torchrun, str(folder / "runner.py"), str(report), json.dumps(scripts)]
            try:
                run = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=folder, env=env)
                output = _tail(run.stdout, 3000) + _tail(run.stderr, 6000)
            except subprocess.TimeoutExpired as e:
                output = f"the launch ran past {TIMEOUT_S} s (a hang?)\n{_tail(e.stdout, 3000)}{_tail(e.stderr, 6000)}"
            files = [folder / f"report.{rank}" for rank in range(n or 1)]  # a rank that died early has none
            results[n] = ([json.loads(f.read_text()) if f.exists() else {} for f in files], output)
        return results[n]

    return launch


def _tail(text: str | bytes | None, chars: int) -> str:
    text = text.decode(errors="replace") if isinstance(text, bytes) else text or ""
    return text[-chars:]


def _blocks_for(n: int | None) -> list[Block]:
    """The run blocks that ask for ``n`` processes (``None``: plain python), in file order."""
    found = []
    for block in BLOCKS:
        torchrun = RUN_TORCHRUN.fullmatch(block.directive)
        if (torchrun and n is not None and int(torchrun.group(1)) == n) or (
            n is None and RUN_PYTHON.fullmatch(block.directive)
        ):
            found.append(block)
    return found


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_every_python_block_runs_or_says_why(block: Block, launches) -> None:
    tree = ast.parse(block.code, filename=block.name)  # every block compiles
    undefined = _undefined_names(tree)
    assert not undefined, f"{block.name} uses names it never defines: {sorted(undefined)}"
    if NOT_RUN.fullmatch(block.directive):
        imports = ast.Module([n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[])
        exec(compile(imports, block.name, "exec"), {})  # the names it imports exist
        return
    reports, output = launches(_launch_of(block))
    failures = [f"rank {rank}:\n{r[block.name]}" for rank, r in enumerate(reports) if r.get(block.name)]
    assert not failures, f"{block.name} failed:\n" + "\n".join(failures)[-6000:]
    failed = sorted({name for r in reports for name, error in r.items() if error})
    assert all(block.name in r for r in reports), (
        f"{block.name} did not run on every rank (failed before it in the same launch: {failed or 'none'}):\n{output}"
    )


LINK = re.compile(r"\]\(([^)\s#]+)(#[^)\s]*)?\)")
SCRIPT = re.compile(r"(?<![\w/.])((?:benchmarks|examples|tests)/[\w./-]+\.(?:py|sh))")
AT_COMMIT = re.compile(r"at commit\s+`?[0-9a-f]{7,40}\b")


def test_relative_links_resolve() -> None:
    dead = [
        f"{path.relative_to(ROOT)}: {target}"
        for path in DOCS
        for target, _ in LINK.findall(path.read_text())
        if "://" not in target and not target.startswith("mailto:") and not (path.parent / target).exists()
    ]
    assert not dead, f"links to missing files: {dead}"


ANCHOR = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens,
    ``-1``, ``-2`` for repeats; headings inside code fences do not count."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_heading_anchors_resolve() -> None:
    dead = []
    for path in DOCS:
        for target, anchor in ANCHOR.findall(path.read_text()):
            file = path.parent / target if target else path
            if file.suffix == ".md" and file.exists() and anchor not in _anchors(file):
                dead.append(f"{path.relative_to(ROOT)}: {target}#{anchor}")
    assert not dead, f"links to headings that do not exist: {dead}"


def test_cited_scripts_exist_or_name_their_commit() -> None:
    missing = []
    for path in DOCS:
        text = path.read_text()
        for match in SCRIPT.finditer(text):
            if (ROOT / match.group(1)).exists():
                continue
            if not AT_COMMIT.search(text[match.end() : match.end() + 80]):
                missing.append(f"{path.relative_to(ROOT)}: {match.group(1)}")
    assert not missing, f"scripts cited that do not exist (restore them or say 'at commit X'): {missing}"
