"""Join GPU clock samples with the benchmark rows that ran while they were taken.

    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,power.limit,clocks_event_reasons.active \
        --format=csv,noheader,nounits -lms 50 > clocks.csv &
    torchrun --nproc_per_node 1 benchmarks/step_bench.py ... --out DIR
    python benchmarks/clocks_report.py clocks.csv DIR/step_bench.jsonl

For every row of ``step_bench.jsonl`` (each carries the wall-clock ``window`` of its timed steps): the
median SM clock (MHz) and power draw (W) of the samples inside it, and how many of them had an active
clock-event reason (power or thermal capping: any bit other than idle, 0x1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics


def samples(path: str) -> list[tuple[float, float, float, float, int]]:
    out = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5 or not parts[1].replace(".", "").isdigit():
            continue
        when = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc).timestamp()
        out.append((when, float(parts[1]), float(parts[2]), float(parts[3]), int(parts[4], 16)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clocks")
    p.add_argument("rows")
    args = p.parse_args()
    got = samples(args.clocks)
    for line in open(args.rows):
        row = json.loads(line)
        if "window" not in row:
            continue
        start, end = row["window"]
        inside = [s for s in got if start <= s[0] <= end]
        if not inside:
            print(f"{row['label']:<5} {row['model']} {row['size']} {row['row']:<22} no samples")
            continue
        capped = sum(1 for s in inside if s[4] & ~0x1)
        sm, watts = statistics.median(s[1] for s in inside), statistics.median(s[2] for s in inside)
        print(
            f"{row['label']:<5} {row['model']} {row['size']} {row['row']:<22} {row['ms']:8.1f} ms  SM {sm:6.0f} MHz  "
            f"power {watts:5.0f} / {inside[0][3]:.0f} W  capped {capped}/{len(inside)} samples"
        )


if __name__ == "__main__":
    main()
