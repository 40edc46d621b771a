"""The GPU paths, checked and timed in one short run (CI has no GPU; run this where one is).

    python benchmarks/gpu_check.py [--steps 20] [--json FILE]
    python benchmarks/gpu_check.py --cpu-smoke --preset tiny --seq 128 --batch 2 --steps 2

Checks (each prints PASS or FAIL; the exit status is 1 if any failed):
1. cached greedy generation with retrieval equals re-running the whole sequence per token, on
   the GPU in fp32, for the paper's CCA and with `cca_match`;
2. a bf16-autocast training step gives a finite loss within 2% of fp32 and finite gradients;
3. the decoder's causal self-attention runs with PyTorch's flash SDPA kernel alone (so the
   kernel that `F.scaled_dot_product_attention` picks for it on the GPU is flash).
4. the database index on the GPU (`--device cuda` of `db build`): an IVF's cells found by torch
   on the GPU (`CellFinder`) equal those found on the CPU for >= 99.9% of vectors (fp32 rounding
   may break near-ties), the codes and search results likewise, and the IVF k-means on the GPU
   reaches the CPU's objective within 0.5%.
Times, side by side in this run (CUDA-synchronised, after warm-up steps):
5. training tokens/s (forward + backward + AdamW) of the `small` preset at sequence 1024, batch 8,
   fp32 against bf16 autocast, with retrieval (k = 2) and without (the baseline);
6. generation tokens/s with the KV cache against re-running the sequence per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from retrolm.config import RetroConfig
from retrolm.model import RETRO

RESULTS: dict = {"checks": {}, "timings": {}}


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS["checks"][name] = {"ok": bool(ok), "detail": detail}
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def table_retrieve(cfg: RetroConfig, device: torch.device, k: int = 2):
    g = torch.Generator().manual_seed(5)
    table = torch.randint(1, cfg.vocab_size, (97, k, cfg.neighbour_len), generator=g).to(device)

    def retrieve(chunk: torch.Tensor) -> torch.Tensor:
        weights = torch.arange(1, chunk.shape[1] + 1, device=chunk.device)
        return table[(chunk * weights).sum(-1) % 97]

    return retrieve


def recompute_greedy(model: RETRO, prompt: torch.Tensor, new: int, retrieve) -> torch.Tensor:
    m, out = model.cfg.chunk_size, prompt
    for _ in range(new):
        n = out.shape[1]
        chunks = [retrieve(out[:, u * m : (u + 1) * m]) for u in range(n // m)]
        nb = torch.stack(chunks, 1) if chunks else None
        if nb is None:
            nb = torch.zeros(out.shape[0], 0, 2, model.cfg.neighbour_len, dtype=torch.long,
                             device=out.device)  # fmt: skip
        with torch.no_grad():
            logits = model(out, nb)[:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
    return out


def check_generation(device: torch.device) -> None:  # tiny models: the check is exactness
    for match in (0, 2):
        cfg = RetroConfig.preset("tiny", vocab_size=16 if match else 512, cca_match=match)
        torch.manual_seed(0)
        model = RETRO(cfg).to(device).eval()
        prompt = torch.randint(1, cfg.vocab_size, (3, 11), device=device)
        new = 3 * cfg.chunk_size + 5
        ref = recompute_greedy(model, prompt, new, table_retrieve(cfg, device))
        out = model.generate(prompt, max_new_tokens=new, retrieve=table_retrieve(cfg, device))
        same = float((out == ref).float().mean())
        check(f"cached generation == recomputation ({device.type} fp32, cca_match={match})",
              torch.equal(out, ref), f"tokens equal: {same:.4f}")  # fmt: skip


def batch(cfg: RetroConfig, b: int, n: int, k: int, device: torch.device):
    tokens = torch.randint(1, cfg.vocab_size, (b, n + 1), device=device)
    nb = None
    if k:
        nb = torch.randint(1, cfg.vocab_size, (b, n // cfg.chunk_size, k, cfg.neighbour_len),
                           device=device)  # fmt: skip
    return tokens[:, :-1], tokens[:, 1:], nb


def check_bf16(device: torch.device, args: argparse.Namespace) -> None:
    cfg = RetroConfig.preset(args.preset, max_seq_len=args.seq)
    torch.manual_seed(0)
    model = RETRO(cfg).to(device)
    x, y, nb = batch(cfg, 4, args.seq, 2, device)
    losses = {}
    for bf16 in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(x, y, nb)
        loss.backward()
        finite = all(
            bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None
        )
        losses[bf16] = (loss.item(), finite)
    rel = abs(losses[True][0] - losses[False][0]) / losses[False][0]
    check("bf16 autocast loss within 2% of fp32, finite gradients",
          rel < 0.02 and losses[True][1] and losses[False][1],
          f"fp32 {losses[False][0]:.4f}, bf16 {losses[True][0]:.4f}, rel {rel:.2e}")  # fmt: skip


def check_flash(device: torch.device, args: argparse.Namespace) -> None:
    cfg = RetroConfig.preset(args.preset, max_seq_len=args.seq, cca_layers=())
    model = RETRO(cfg).to(device)
    x, y, _ = batch(cfg, 2, args.seq, 0, device)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast(device.type, torch.bfloat16):
            loss = model.loss(x, y)
            loss.backward()
        check("decoder self-attention runs on the flash SDPA kernel (bf16)", True)
    except RuntimeError as e:
        check("decoder self-attention runs on the flash SDPA kernel (bf16)", False, str(e)[:200])


def check_index(device: torch.device) -> None:
    import numpy as np

    from retrolm.database import index as ix

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((512, 384)).astype(np.float32)
    x = centres[rng.integers(0, 512, 60_000)] + rng.standard_normal((60_000, 384), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dev = str(device)
    cpu_c = ix.kmeans(x[:40_000], 1024, seed=0, spherical=True)
    dev_c = ix.kmeans(x[:40_000], 1024, seed=0, spherical=True, device=dev)

    def objective(c: np.ndarray) -> float:
        return float((x @ c.T).max(1).mean())

    a, b = objective(cpu_c), objective(dev_c)
    check("IVF k-means on the device reaches the CPU's objective (0.5%)",
          abs(a - b) <= 0.005 * abs(a), f"mean best inner product cpu {a:.5f}, {dev} {b:.5f}")
    index = ix.build_index("IVF1024,SQ8", 384, "ip", x[:40_000], seed=0)
    cpu_codes, dev_codes = ix.encode_block(index, x), ix.encode_block(index, x, dev)
    same = float(np.mean((cpu_codes == dev_codes).all(1)))
    check("IVF codes with cells found on the device == on the CPU (99.9%)", same >= 0.999,
          f"{same:.5f} of rows")
    ix.add_encoded(index, cpu_codes, np.arange(len(x)))
    ix.apply_search_params(index, {"nprobe": 8})
    q = x[:2000] + 0.01
    cpu_ids = ix.search(ix.searchable(index), q, 10)[1]
    dev_ids = ix.search(ix.searchable(index, dev), q, 10)[1]
    same = float(np.mean(cpu_ids == dev_ids))
    check("IVF search with cells found on the device == on the CPU (99.9%)", same >= 0.999,
          f"{same:.5f} of ids")
    finder = ix.CellFinder(index, dev)
    finder.cells(x[:1000], 8)
    sync()
    start = time.perf_counter()
    finder.cells(x, 8)
    sync()
    RESULTS["timings"]["cells_us_per_vector_1024"] = 1e6 * (time.perf_counter() - start) / len(x)


def time_training(device: torch.device, args: argparse.Namespace) -> None:
    steps = args.steps
    for name, k in (("RETRO k=2", 2), ("baseline", 0)):
        overrides = {} if k else {"cca_layers": ()}
        cfg = RetroConfig.preset(args.preset, max_seq_len=args.seq, **overrides)
        for bf16 in (False, True):
            torch.manual_seed(0)
            model = RETRO(cfg).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            x, y, nb = batch(cfg, args.batch, args.seq, k, device)
            times = []
            for i in range(steps + 3):
                sync()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model.loss(x, y, nb)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            rate = x.numel() / statistics.median(times)
            precision = "bf16" if bf16 else "fp32"
            key = f"train tokens/s, {args.preset}, seq {args.seq}, batch {args.batch}, {name}, {precision}"
            RESULTS["timings"][key] = round(rate)
            print(f"{key}: {rate:,.0f}", flush=True)
        fp32 = RESULTS["timings"][key.replace("bf16", "fp32")]
        print(f"  bf16 / fp32 ({name}): {rate / fp32:.2f}x", flush=True)


def time_generation(device: torch.device, args: argparse.Namespace) -> None:
    cfg = RetroConfig.preset(args.preset, max_seq_len=1024)
    torch.manual_seed(0)
    model = RETRO(cfg).to(device).eval()
    prompt = torch.randint(1, cfg.vocab_size, (1, 64), device=device)
    new = 256
    retrieve = table_retrieve(cfg, device)
    model.generate(prompt, max_new_tokens=8, retrieve=retrieve)  # warm-up
    sync()
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new, retrieve=retrieve)
    sync()
    cached = new / (time.perf_counter() - t0)
    sync()
    t0 = time.perf_counter()
    recompute_greedy(model, prompt, new, retrieve)
    sync()
    full = new / (time.perf_counter() - t0)
    for key, value in (("cached", cached), ("recompute", full)):
        name = f"generate tokens/s, {args.preset}, 64+256 tokens, batch 1, {key}"
        RESULTS["timings"][name] = round(value, 1)
    print(f"generation tokens/s: cached {cached:.1f}, recomputation {full:.1f}, "
          f"ratio {cached / full:.1f}x", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    ap.add_argument("--preset", default="small", help="model size of the bf16 check and timings")
    ap.add_argument("--seq", type=int, default=1024, help="training sequence length")
    ap.add_argument("--batch", type=int, default=8, help="training batch size")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--cpu-smoke", action="store_true", help="run on the CPU: a smoke test only")
    args = ap.parse_args()
    if args.cpu_smoke:
        device = torch.device("cpu")
        RESULTS["machine"] = f"CPU smoke run (not a measurement), torch {torch.__version__}"
    elif not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU is visible; this script checks the GPU paths")
    else:
        device = torch.device("cuda")
        RESULTS["machine"] = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"machine: {RESULTS['machine']}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the checks
    check_generation(device)
    check_bf16(device, args)
    check_flash(device, args)
    check_index(device)
    time_training(device, args)
    time_generation(device, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)
    sys.exit(0 if all(c["ok"] for c in RESULTS["checks"].values()) else 1)


if __name__ == "__main__":
    main()
