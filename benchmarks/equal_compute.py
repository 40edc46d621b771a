"""The baseline at RETRO's compute: does a finished quickstart's RETRO beat a baseline trained
for as long as the quickstart trained both?

A quickstart trains the baseline for N steps, then RETRO-fits it (encoder + CCA) for R steps;
RETRO[ON] has cost both. This script trains one more baseline, with the quickstart's own
settings, database and seed, for N x (baseline seconds + retrofit seconds) / baseline seconds
steps (from the quickstart's `report.json` stage seconds; `--steps` overrides), then scores it
on the quickstart's held-out tokens with the quickstart's evaluation settings, and prints it
beside the quickstart's baseline and RETRO[ON].

    python benchmarks/equal_compute.py QUICKSTART_DIR [--out DIR] [--steps S]

The run goes to DIR (default QUICKSTART_DIR/baseline-equal-compute) and resumes if killed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from retrolm.errors import UserError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("quickstart", type=Path, help="a finished `retrolm quickstart --out` folder")
    p.add_argument("--out", type=Path, help="run folder of the equal-compute baseline")
    p.add_argument("--steps", type=int, help="its steps (default: from the stage seconds)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    from retrolm.database import Database
    from retrolm.evaluate import EvalConfig, evaluate_run
    from retrolm.train import TrainConfig, train

    qs = args.quickstart
    missing = [n for n in ("report.json", "plan.json", "database") if not (qs / n).exists()]
    if missing:
        p.error(f"{qs}: no {', '.join(missing)}; pass the --out folder of a finished quickstart")
    if args.steps is not None and args.steps <= 0:
        p.error(f"--steps must be a positive number of steps, got {args.steps}")
    try:  # a quickstart of an older retrolm, or unfinished: one line, not a KeyError
        report = json.loads((qs / "report.json").read_text())
        plan = json.loads((qs / "plan.json").read_text())
        stages = report["stage_seconds"]
        base_steps = plan["train"]["max_steps"]
        both = stages["train baseline"] + stages["train retro"]
        report["filtered"]["0.125"], report["eval"]["tokens"], report["retrofit_steps"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        p.error(f"{qs}: report.json or plan.json lacks {e}; rerun that quickstart with this retrolm")
    steps = args.steps or round(base_steps * both / stages["train baseline"])
    out = args.out or qs / "baseline-equal-compute"

    settings = dict(plan["train"], max_steps=steps, checkpoint_every=max(1, steps // 4))
    settings["eval_every"] = max(1, steps // 8)
    tcfg = TrainConfig(model=dict(plan["model"]), no_retrieval=True, **settings)
    start = time.perf_counter()
    try:  # bad folders, another run in --out (e.g. other --steps): one line, exit 2
        db = Database.open(qs / "database")
        resume = (out / "train_config.json").is_file()
        train(tcfg, db, out, resume=resume, show_progress=not args.no_progress)
        seconds = time.perf_counter() - start
        cfg = EvalConfig(**plan["eval"])
        eq = evaluate_run(out, db, config=cfg, show_progress=not args.no_progress)
    except UserError as e:
        hint = " (this script: pass another --out)" if "--overwrite" in str(e) else ""
        print(f"equal_compute.py: {e}{hint}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    d = eq.to_dict()

    def pct(x: float) -> str:
        return f"{(x / report['baseline_bpb'] - 1) * 100:+.1f}%"

    bucket = report["filtered"]["0.125"]
    eq_bucket = d["filtered"]["0.125"]
    print(
        f"\n{qs}: baseline {base_steps} steps ({stages['train baseline']:.0f} s) + retrofit "
        f"{report['retrofit_steps']} steps ({stages['train retro']:.0f} s); the equal-compute "
        f"baseline: {steps} steps ({seconds:.0f} s this run, resumed runs count only the rest)"
    )
    print("| model | steps | bpb | vs the quickstart's baseline | r(C) <= 0.125 |")
    print("|---|---|---|---|---|")
    print(
        f"| baseline | {base_steps} | {report['baseline_bpb']:.4f} | - | {bucket['baseline_bpb']:.4f} |"
    )
    print(
        f"| baseline, equal compute | {steps} | {d['baseline_bpb']:.4f} | "
        f"{pct(d['baseline_bpb'])} | {eq_bucket['baseline_bpb']:.4f} |"
    )
    print(
        f"| RETRO[ON] (retrofit) | {base_steps} + {report['retrofit_steps']} | "
        f"{report['retro_bpb']:.4f} | {pct(report['retro_bpb'])} | {bucket['retro_bpb']:.4f} |"
    )
    if eq.tokens != report["eval"]["tokens"]:  # the same held-out tokens, or say so
        print(f"warning: scored {eq.tokens} tokens, the quickstart {report['eval']['tokens']}")


if __name__ == "__main__":
    main()
