"""benchmarks/sweep.py: bad arguments stop argparse with one line (exit 2, before any process); the
report sorts shapes numerically and labels CPU rows as a smoke test; --check compares with the regression
baselines (no sweep is run here)."""

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


# ------------------------------------------------------------------ regression baselines (benchmarks/baselines.py)
def _baselines_file(tmp_path: Path, **changes) -> Path:
    entry = {
        "machine": "NVIDIA H200", "workload": "attention", "shape": "S4608", "world": 2, "variant": "ulysses",
        "mesh": "u2r1", "metric": "median_ms", "value": 1.0, "tolerance": 0.05, "measured": "test",
    }  # fmt: skip
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps({"baselines": [{**entry, **changes}]}))
    return path


def _gpu_rows(ms: float, ok: bool = True, gpu: str = "NVIDIA H200") -> list[dict]:
    rows = [_row("S4608", 1, 2.0, "cuda"), _row("S4608", 2, ms, "cuda")]
    for row in rows:
        row["gpu"] = gpu
    rows[1]["ok"] = ok
    return rows


def test_the_committed_baselines_load(sweep) -> None:
    from baselines import DEFAULT, load  # benchmarks/ is on the path once sweep.py is loaded

    baselines = load(DEFAULT)
    assert baselines and all(b.machine == "NVIDIA H200" for b in baselines)
    assert {b.workload for b in baselines} == {"flux", "stdit"}


@pytest.mark.parametrize(
    ("ms", "ok", "gpu", "verdict"),
    [
        (1.04, True, "NVIDIA H200", "ok "),
        (0.80, True, "NVIDIA H200", "faster (update the baseline)"),
        (1.06, True, "NVIDIA H200", "REGRESSION"),
        (1.00, False, "NVIDIA H200", "PARITY FAILED"),
    ],
)
def test_check_against_baselines(sweep, tmp_path, ms, ok, gpu, verdict) -> None:
    from baselines import check, load

    failures, notes = check(_gpu_rows(ms, ok, gpu), load(_baselines_file(tmp_path)))
    lines = failures + notes
    assert len(lines) == 1 and lines[0].startswith(verdict), lines
    assert bool(failures) == (verdict in ("REGRESSION", "PARITY FAILED"))


def test_a_run_with_no_baseline_of_its_machine_checked_nothing(sweep, tmp_path) -> None:
    from baselines import check, load

    failures, notes = check(_gpu_rows(9.0, gpu="NVIDIA H100"), load(_baselines_file(tmp_path)))
    assert notes[0].startswith("skipped (not measured on this machine)"), notes
    assert len(failures) == 1 and failures[0].startswith("NOTHING CHECKED"), failures


def test_a_listed_figure_not_measured_fails(sweep, tmp_path) -> None:
    from baselines import check, load

    failures, _ = check(_gpu_rows(1.0), load(_baselines_file(tmp_path, shape="S16896")))
    assert len(failures) == 1 and failures[0].startswith("NOT MEASURED"), failures


def test_report_check_exits_1_on_a_regression(sweep, tmp_path, capsys) -> None:
    results = tmp_path / "results"
    results.mkdir()
    baselines = _baselines_file(tmp_path)
    (results / "world_1.json").write_text(json.dumps(_gpu_rows(1.0)[:1]))
    (results / "world_2.json").write_text(json.dumps(_gpu_rows(1.0)[1:]))
    sweep.main(["--report", str(results), "--check", str(baselines)])  # within tolerance: returns
    assert "ok NVIDIA H200: attention S4608 world 2 ulysses u2r1" in capsys.readouterr().out
    (results / "world_2.json").write_text(json.dumps(_gpu_rows(1.2)[1:]))
    with pytest.raises(SystemExit, match="1 of the baselines failed"):
        sweep.main(["--report", str(results), "--check", str(baselines)])
    assert "REGRESSION" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tolerance": 0}, "0 < tolerance < 1"),
        ({"metric": "p99"}, "metric must be one of"),
        ({"value": -1}, "value > 0"),
    ],
)
def test_bad_baselines_file_stops_with_one_line(sweep, tmp_path, capsys, changes, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--check", str(_baselines_file(tmp_path, **changes))])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "argument --check:" in err and message in err, err
