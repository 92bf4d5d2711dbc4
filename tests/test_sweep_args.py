"""benchmarks/sweep.py: bad arguments stop argparse with one line (exit 2, before any process); the
report sorts shapes numerically and labels CPU rows as a smoke test (no sweep is run here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_under_test", ROOT / "benchmarks" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    sys.modules[spec.name] = module  # its dataclass looks the module up
    try:
        spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for its own imports
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path[:] = path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seq", "abc"], "argument --seq: 'abc' is not an integer"),
        (["--seq", "512,0"], "argument --seq: 0 is below the minimum 1"),
        (["--worlds", "0"], "argument --worlds: 0 is below the minimum 1"),
        (["--worlds", "1,two"], "argument --worlds: 'two' is not an integer"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["--heads", "0"], "argument --heads: 0 is below the minimum 1"),
        (["--head-dim", "x"], "argument --head-dim: 'x' is not an integer"),
        (["--backend", "nope"], "argument --backend: invalid choice: 'nope'"),
        (["--workloads", "attention,video"], "argument --workloads: unknown ['video']"),
        (["--workloads", ","], "expected at least one workload"),
        (["--variants", "ulysses,tree"], "argument --variants: unknown ['tree']"),
        (["--ulysses-backends", "fa9"], "argument --ulysses-backends: unknown ['fa9']"),
        (["--flux-sizes", "1000"], "argument --flux-sizes: [1000] are not multiples of 16"),
        (["--vae-sizes", "100"], "argument --vae-sizes: [100] are not multiples of 8"),
        (["--stdit-latent", "4,9"], "argument --stdit-latent: expected 3 comma-separated integers, got 2"),
        (["--flux-config", "pro"], "argument --flux-config: invalid choice: 'pro'"),
        (["--reps", "0"], "argument --reps: 0 is below the minimum 1"),
        (["--warmup", "-1"], "argument --warmup: -1 is below the minimum 0"),
    ],
)
def test_bad_arguments_stop_with_one_line(sweep, capsys, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("sweep.py: error: ") and message in err, err


def test_good_arguments_parse_to_values(sweep) -> None:
    args = sweep.parse_args(["--seq", "4481, 16896", "--worlds", "1,3", "--workloads", "attention,flux"])
    assert args.seq == [4481, 16896] and args.worlds == [1, 3] and args.workloads == ["attention", "flux"]
    sweep._apply_defaults(args, gpu=False)
    assert args.seq == [4481, 16896] and args.vae_sizes == [64, 96] and args.stdit_latent == [4, 9, 7]
    defaults = sweep.parse_args([])
    sweep._apply_defaults(defaults, gpu=True)
    assert defaults.seq == [4481, 4608, 16896] and defaults.dtype == "bfloat16" and defaults.variants[0] == "ulysses"


def _row(shape: str, world: int, ms: float, device: str | None, variant: str = "ulysses") -> dict:
    row = {
        "workload": "attention", "shape": shape, "world": world, "variant": "single" if world == 1 else variant,
        "mesh": "1" if world == 1 else f"u{world}r1", "backend": "cpu_flash", "median_ms": ms, "graph_ms": None,
        "max_err": 1e-7, "ref_err": 1e-7, "ok": True,
    }  # fmt: skip
    if device is not None:  # results written before rows carried their device have none
        row.update(device=device, **({"cpu_cores": 2} if device == "cpu" else {}))
    return row


SHAPES = ["B1 S2048 H8 D64", "B1 S509 H8 D64", "B1 S512 H8 D64", "B2 S64 H8 D64", "B1 S512 H16 D64"]


def test_report_sorts_shapes_numerically_and_labels_cpu_as_smoke_test(sweep, tmp_path) -> None:
    rows = [_row(shape, world, 10.0 / world, "cpu") for shape in SHAPES for world in (4, 1, 2)]
    table = sweep.write_report(rows, tmp_path)
    order = ["B1 S509 H8 D64", "B1 S512 H8 D64", "B1 S512 H16 D64", "B1 S2048 H8 D64", "B2 S64 H8 D64"]
    table_shapes = [s for line in table.splitlines() for s in SHAPES if line.startswith(f"attention  {s} ")]
    assert list(dict.fromkeys(table_shapes)) == order
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["shape"], r["world"]) for r in saved] == [(s, w) for s in order for w in (1, 2, 4)]
    first = table.splitlines()[0]
    assert first.startswith("CPU smoke test:") and "4 processes sharing 2 CPU cores are not speed measurements" in first
    assert (tmp_path / "sweep.txt").read_text().startswith("CPU smoke test:")


def test_report_of_gpu_rows_has_no_smoke_label(sweep, tmp_path) -> None:
    for device in ("cuda", None):
        rows = [_row(shape, world, 10.0 / world, device) for shape in SHAPES[:2] for world in (1, 2)]
        table = sweep.write_report(rows, tmp_path)
        assert "smoke" not in table and table.startswith("workload")
        assert [r["speedup"] for r in rows] == [1.0, 2.0, 1.0, 2.0]  # sorted: S509 first, then S2048


def test_shape_key_orders_numbers_as_numbers(sweep) -> None:
    shapes = ["2048x2048 (16384+512 tok)", "1024x1024 (4096+512 tok)", "112x112 (49+8 tok)"]
    assert sorted(shapes, key=sweep.shape_key) == [shapes[2], shapes[1], shapes[0]]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
