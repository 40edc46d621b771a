"""Tokens/s on a real pretrained base: its forward pass, a RETRO-fit step, a full fine-tuning step.

Side by side in one process, on the same base, batch and sequence length (k neighbours of 2m
tokens for each m-token chunk, random ids; speed does not depend on them):

1. forward: the base's forward pass (no gradient), float32 and bfloat16 weights.
2. retrofit: a training step of the base frozen plus retrolm's encoder, CCA and copy head
   (`loss` + backward + AdamW), for each `--cca` placement and base dtype.
3. full: a plain language-model training step of every base weight (float32, AdamW).
4. score: evaluation of RETRO[ON] and of the base (no gradient), each in its own pass and both
   from one pass below the first CCA layer (`RetroFitted.base_and_retro`), per placement.

Each figure is the median of `--steps` timed steps after one warm-up step. Run it alone
(`OMP_NUM_THREADS` = the cores), nothing else on the machine.

    python benchmarks/real_base_speed.py [--base smollm2] [--batch-size 2] [--seq-len 512]
        [--cca 15,18,21,24,27,30 --cca 22,26,30] [--set enc_dim=384] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from retrolm.database.embed import cpu_model
    from retrolm.hf import retrofit_hf
    from retrolm.hf.base import load_base
    from retrolm.hf.resolve import resolve_base

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--neighbours", type=int, default=2)
    ap.add_argument("--cca", action="append", help="comma-separated CCA layers (repeatable)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--set", action="append", default=[], help="retrofit FIELD=VALUE (int)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-full", action="store_true", help="skip the full fine-tuning step")
    args = ap.parse_args()
    folder = resolve_base(args.base)
    B, n, k, m = args.batch_size, args.seq_len, args.neighbours, 64
    g = torch.Generator().manual_seed(0)
    print(
        f"# {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load {os.getloadavg()[0]:.2f}; base {args.base}, batch {B} x {n} tokens, k={k}"
    )
    rows: list[tuple[str, float]] = []
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        base = load_base(folder, dtype)
        V = base.config.vocab_size
        x = torch.randint(3, V, (B, n), generator=g)
        with torch.inference_mode():
            sec = timed(lambda base=base, x=x: base(input_ids=x), args.steps)
        rows.append((f"forward {dtype}", B * n / sec))
        del base
    placements = args.cca or ["default"]
    for dtype in dtypes:
        for cca in placements:
            settings = {"dtype": dtype, "num_neighbours": k}
            settings.update({f: int(v) for f, v in (kv.split("=", 1) for kv in args.set)})
            if cca != "default":
                settings["cca_layers"] = tuple(int(i) for i in cca.split(","))
            model = retrofit_hf(folder, **settings).train()
            V = model.cfg.vocab_size
            x = torch.randint(3, V, (B, n), generator=g)
            y = torch.randint(3, V, (B, n), generator=g)
            nb = torch.randint(3, V, (B, n // m, k, 2 * m), generator=g)
            params = [p for _, p in model.retrieval_parameters()]
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step(model=model, opt=opt, x=x, y=y, nb=nb) -> None:
                opt.zero_grad(set_to_none=True)
                model.loss(x, y, nb).backward()
                opt.step()

            sec = timed(step, args.steps)
            rows.append((f"retrofit {dtype} cca={list(model.cfg.cca_layers)}", B * n / sec))
            model.eval()

            def apart(model=model, x=x, nb=nb) -> None:
                model.lm_head(model.hidden_states(x)), model(x, nb)

            def together(model=model, x=x, nb=nb) -> None:
                model.base_and_retro(x, nb)

            with torch.inference_mode():
                for name, fn in (("apart", apart), ("one lower pass", together)):
                    sec = timed(fn, args.steps)
                    rows.append((f"score base + RETRO[ON] {dtype}, {name}", B * n / sec))
            del model, opt
    if not args.no_full:
        base = load_base(folder, "float32").train().requires_grad_(True)
        V = base.config.vocab_size
        x = torch.randint(3, V, (B, n), generator=g)
        opt = torch.optim.AdamW(base.parameters(), lr=1e-5)

        def full() -> None:
            opt.zero_grad(set_to_none=True)
            base(input_ids=x, labels=x).loss.backward()
            opt.step()

        rows.append(("full fine-tune float32", B * n / timed(full, args.steps)))
    first = rows[0][1]
    for name, tps in rows:
        print(f"{name:55s} {tps:9.0f} tokens/s  ({tps / first:.2f}x forward float32)")


if __name__ == "__main__":
    main()
