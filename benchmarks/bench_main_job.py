"""The main job's run times: `python sample.py --prompt "a red circle on a blue background" --out out/` with an empty
compile cache (first run) and again with the cache it wrote (second run), for several models interleaved in one
run, so that a shared machine's load falls on all of them alike.

    python -m benchmarks.bench_main_job --model old=/tmp/shapes64_v1 --model new=sdjax/shapes64/model --repeats 3

Each (model, repeat) gets its own new cache folder (SDJAX_CACHE_DIR): run 1 fills it, run 2 reads it. The order
within a repeat alternates (old, new, new, old...) to cancel drifts in load. Prints a Markdown table of the median
wall time (Python's start included) and sample.py's own total per model and run, with the load average before and
after.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"


def run_sample(model: str, cache: Path, out: Path) -> tuple[float, float | None]:
    """(wall seconds, sample.py's printed total or None) of one `python sample.py` run."""
    env = {**os.environ, "SDJAX_CACHE_DIR": str(cache)}
    command = [sys.executable, "sample.py", "--prompt", PROMPT, "--out", str(out), "--model", model]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    totals = re.findall(r"= ([0-9.]+) s", done.stdout + done.stderr)
    return wall, float(totals[-1]) if totals else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH; repeat for each model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    times: dict[tuple[str, int], list[tuple[float, float | None]]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.repeats):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                cache = Path(scratch) / f"cache_{name}_{r}"
                for run in (1, 2):
                    times.setdefault((name, run), []).append(run_sample(models[name], cache, Path(scratch) / "out"))
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; {args.repeats} repeats, medians")
    print("| model | run | wall time | sample.py's total |\n|---|---|---|---|")
    for (name, run), values in times.items():
        wall = statistics.median(v[0] for v in values)
        totals = [v[1] for v in values if v[1] is not None]
        total = f"{statistics.median(totals):.1f} s" if totals else "-"
        print(f"| {name} ({models[name]}) | {'first' if run == 1 else 'second'} | {wall:.1f} s | {total} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
