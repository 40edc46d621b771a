"""How steady are the quickstart planner's step timings on this machine?

`retrolm quickstart` sizes its run from a few timed training steps (`measure_train_step`, the
median of STEP_SAMPLES steps after one warm-up). This script repeats those measurements, in
fresh processes, in two orders, and prints every reading and their spread:

- `alone`: a baseline step, then a retrofit step;
- `plan`: what `make_plan` runs first (a BM25 measurement, a full RETRO step in fp32 and in bf16),
  then the same two.

If one order reads consistently slower, something the plan does before the measurement slows
it; if the readings of one order scatter as widely as the two orders differ, the machine's own
speed varies and no fixed number of samples pins it.

    OMP_NUM_THREADS=2 python benchmarks/plan_timing.py [--rounds 2] [--fp32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from retrolm import quickstart as Q
from retrolm.config import RetroConfig
order, bf16 = sys.argv[1], sys.argv[2] == "1"
retro = RetroConfig.preset("quickstart", vocab_size=8192)
base = RetroConfig.preset("quickstart", vocab_size=8192, cca_layers=())
out = {}
if order == "plan":
    Q.measure_bm25(Q.sample_chunks(Q.stdlib_files())[:4096])  # as make_plan, on the stdlib
    out["retro_fp32"] = Q.measure_train_step(retro, 8, 256, 2, bf16=False)
    out["retro_bf16"] = Q.measure_train_step(retro, 8, 256, 2, bf16=True)
out["baseline"] = Q.measure_train_step(base, 8, 256, 2, bf16=bf16)
out["retrofit"] = Q.measure_train_step(retro, 8, 256, 2, bf16=bf16, retrofit=True)
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="processes per order (alternated)")
    p.add_argument(
        "--fp32",
        action="store_true",
        help="baseline and retrofit in fp32 (default: bf16, as "
        "the plan chooses where bf16 matmuls are fast)",
    )
    args = p.parse_args()

    readings: dict[str, dict[str, list[float]]] = {"alone": {}, "plan": {}}
    for r in range(args.rounds):
        for order in ("alone", "plan"):
            start = time.perf_counter()
            cmd = [sys.executable, "-c", CHILD, order, "0" if args.fp32 else "1"]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            got = json.loads(res.stdout.strip().splitlines()[-1])
            for key, sec in got.items():
                readings[order].setdefault(key, []).append(sec)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in got.items())
            print(
                f"round {r} {order:5s} ({time.perf_counter() - start:.0f} s): {shown}", flush=True
            )

    print("\n| order | step | readings (s) | min / median / max | max / min |")
    print("|---|---|---|---|---|")
    for order, steps in readings.items():
        for key, xs in steps.items():
            lo, mid, hi = min(xs), statistics.median(xs), max(xs)
            shown = " ".join(f"{x:.3f}" for x in xs)
            print(
                f"| {order} | {key} | {shown} | {lo:.3f} / {mid:.3f} / {hi:.3f} | {hi / lo:.2f} |"
            )


if __name__ == "__main__":
    main()
