"""Regression baselines: figures the project has measured, and the check that a new run has not lost them.

``benchmarks/baselines.json`` lists each figure as the sweep reports it: the machine (the GPU's name, or
``"cpu"``), the row that measures it (workload, shape, world, variant, mesh, as in ``sweep.json``), the
metric (``median_ms`` or ``graph_ms``), its value, a relative tolerance, and where it was measured.
:func:`check` compares a sweep's rows with the baselines of the machines the rows were measured on:

* a row slower than ``value × (1 + tolerance)`` is a **regression**;
* a baseline whose row is missing (the run did not measure it) or failed its parity check is a **failure**
  too: a check that skips what it cannot see would pass anything;
* a row faster than ``value × (1 − tolerance)`` passes, with a note to update the baseline;
* baselines of other machines are skipped (and listed); a run none of whose machines has a baseline
  fails (it checked nothing).

``python benchmarks/sweep.py --report DIR --check benchmarks/baselines.json`` runs it on merged results
and exits with status 1 on any failure; ``benchmarks/gpu_check.sh`` reruns the one-GPU workloads listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

KEYS = ("workload", "shape", "world", "variant", "mesh")
METRICS = ("median_ms", "graph_ms")
DEFAULT = Path(__file__).resolve().parent / "baselines.json"


@dataclass(frozen=True)
class Baseline:
    machine: str
    workload: str
    shape: str
    world: int
    variant: str
    mesh: str
    metric: str
    value: float
    tolerance: float
    measured: str

    def label(self) -> str:
        row = f"{self.workload} {self.shape} world {self.world} {self.variant} {self.mesh}"
        return f"{self.machine}: {row} {self.metric}"


def load(path: str | Path = DEFAULT) -> list[Baseline]:
    """The baselines in ``path``; a malformed entry raises a ``ValueError`` naming it."""
    entries = json.loads(Path(path).read_text())["baselines"]
    out = []
    for i, entry in enumerate(entries):
        fields = set(Baseline.__dataclass_fields__)
        if set(entry) != fields:
            raise ValueError(f"{path}: baseline {i} must have exactly the fields {sorted(fields)}, got {sorted(entry)}")
        baseline = Baseline(**entry)
        if baseline.metric not in METRICS:
            raise ValueError(f"{path}: baseline {i}: metric must be one of {METRICS}, got {baseline.metric!r}")
        if not (baseline.value > 0 and 0 < baseline.tolerance < 1) or not isinstance(baseline.world, int):
            raise ValueError(f"{path}: baseline {i}: value > 0, 0 < tolerance < 1 and an int world, got {entry}")
        out.append(baseline)
    keys = [(b.machine, *(getattr(b, k) for k in KEYS), b.metric) for b in out]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: a figure is listed twice")
    return out


def machine_of(row: dict) -> str:
    """The machine a sweep row was measured on: its GPU's name, or ``"cpu"``."""
    return row.get("gpu") or row.get("device", "cpu")


def check(rows: list[dict], baselines: list[Baseline]) -> tuple[list[str], list[str]]:
    """``(failures, notes)``: one line per baseline of the rows' machines (see the module docstring)."""
    machines = {machine_of(r) for r in rows}
    failures, notes = [], []
    for b in baselines:
        if b.machine not in machines:
            notes.append(f"skipped (not measured on this machine) {b.label()}")
            continue
        found = [r for r in rows if machine_of(r) == b.machine and all(r.get(k) == getattr(b, k) for k in KEYS)]
        figure = found[0].get(b.metric) if found else None
        if figure is None:
            failures.append(f"NOT MEASURED {b.label()}: the run has no such row (baseline {b.value} ms)")
            continue
        limit = b.value * (1 + b.tolerance)
        line = f"{b.label()}: {figure:.2f} ms against {b.value} ms ± {b.tolerance:.0%} ({b.measured})"
        if not found[0].get("ok", False):
            failures.append(f"PARITY FAILED {line}")
        elif figure > limit:
            failures.append(f"REGRESSION {line}: {figure / b.value - 1:+.1%}")
        elif figure < b.value * (1 - b.tolerance):
            notes.append(f"faster (update the baseline) {line}: {figure / b.value - 1:+.1%}")
        else:
            notes.append(f"ok {line}")
    if not any(b.machine in machines for b in baselines):
        failures.append(f"NOTHING CHECKED: no baseline is of the machine(s) measured, {sorted(machines)}")
    return failures, notes
