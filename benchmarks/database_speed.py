"""Database build speed and memory, per stage, on the standard library of the running Python.

Each stage runs as its own `retrolm db ...` process, so its wall time and peak RSS (from
`os.wait4`) are its own. Then `retrolm db build` runs on two corpus sizes to show that its peak
RSS does not grow with the corpus (the stages stream fixed-size blocks). If
`benchmarks/embedding_speed.py` is present, its embedding-vs-FLOP-bound and vs-BERT-base
figures are appended.

    python benchmarks/database_speed.py --out /tmp/database_speed.md  # ~10 minutes, 2 cores
    python benchmarks/database_speed.py --files 20 --small 30 --repeats 1 2   # quicker

Prints a Markdown report (stdout); `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stdlib_files(limit: int | None = None) -> list[Path]:
    """Python files of the standard library (no site-packages, no test suites), sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
    return files[:limit] if limit else files


def write_jsonl(files: list[Path], path: Path) -> int:
    """One JSON record {"text": ...} per readable UTF-8 file. Returns bytes of text."""
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                f.write(json.dumps({"text": text, "source": str(p)}) + "\n")
                total += len(text.encode("utf-8"))
    return total


# Linux keeps a process's peak RSS across execve, so a child started directly from this
# process (which has imported torch) would report at least this process's RSS. A small launcher
# process starts the measured command and reports the peak RSS of that grandchild alone.
LAUNCHER = """
import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}))
"""


def run(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in MiB of that process alone)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - start
    result = (
        json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {"code": -1}
    )
    if result["code"] != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    return wall, result["maxrss_kib"] / 1024  # ru_maxrss is in KiB on Linux


def retrolm(*args: str) -> list[str]:
    return [sys.executable, "-m", "retrolm", "-q", "db", *args, "--no-progress"]


def counts(db: Path) -> dict:
    return json.loads((db / "manifest.json").read_text())["counts"]


def stage_table(corpus: Path, work: Path, embedder: str, block_rows: int) -> list[str]:
    db = work / "stages-db"
    flags = ["--embedder", embedder, "--block-rows", str(block_rows)]
    rows = []
    for stage, command in (
        (
            "chunk (corpus + tokenizer + chunks)",
            retrolm("chunk", str(corpus), "--out", str(db), *flags),
        ),
        ("embed", retrolm("embed", str(db))),
        ("index", retrolm("index", str(db))),
        ("neighbours", retrolm("neighbours", str(db))),
    ):
        wall, rss = run(command)
        c = counts(db)
        rows.append(
            f"| {stage} | {c['documents']} | {c['chunks']} | {wall:.1f} | "
            f"{c['documents'] / wall:.1f} | {c['chunks'] / wall:.0f} | {rss:.0f} |"
        )
    manifest = json.loads((db / "manifest.json").read_text())
    index = manifest["index"]
    return [
        f"Embedder `{embedder}`, block_rows {block_rows}, index `{index['factory']}` "
        f"({index['metric']}, {index['ntotal']} train vectors, search {index['search_params']}).",
        "",
        "| stage | documents | chunks | wall s | documents/s | chunks/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def rss_table(
    files: list[Path], small: int, repeats: list[int], work: Path, embedder: str, block_rows: int
) -> list[str]:
    """`db build` on the same documents repeated r times: the corpus grows, its documents do not
    (peak memory legitimately depends on the largest document and batch, not on their number).
    Run twice: training the tokenizer (its trainer's memory grows with the training text, up to
    `tokenizer_train_bytes`), and with the tokenizer given (every other stage)."""
    base = work / "rss-base.jsonl"
    write_jsonl(files[:small], base)
    records = base.read_text(encoding="utf-8")
    rows = []
    given: Path | None = None
    for tokenizer in ("trained", "given"):
        for r in repeats:
            corpus = work / f"corpus-x{r}.jsonl"
            corpus.write_text(records * r, encoding="utf-8")
            db = work / f"build-{tokenizer}-x{r}"
            flags = ["--embedder", embedder, "--block-rows", str(block_rows)]
            if given is not None:
                flags += ["--tokenizer", str(given)]
            wall, rss = run(
                retrolm("build", str(corpus), "--out", str(db), *flags),
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            c = counts(db)
            rows.append(
                f"| {small} x {r} | {tokenizer} | {c['documents']} | {c['bytes'] / 2**20:.1f} | "
                f"{c['chunks']} | {wall:.1f} | {c['chunks'] / wall:.0f} | {rss:.0f} |"
            )
            given = given or db / "tokenizer.json"
    return [
        f"`retrolm db build` with a tiny BERT (`bert-mean`), block_rows {block_rows}, one torch "
        "thread (OMP_NUM_THREADS=1), on the first stdlib files repeated r times:",
        "",
        "| files x r | tokenizer | documents | text MiB | chunks | wall s | chunks/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def embedding_figures(chunks: int, baseline_chunks: int) -> list[str]:
    """Embedding chunks/s against the FLOP bound and against RETRO-pytorch's BERT-base, measured
    by `benchmarks/embedding_speed.py` (`run()`), if it is there."""
    path = ROOT / "benchmarks" / "embedding_speed.py"
    if not path.is_file():
        return ["(benchmarks/embedding_speed.py not present: no FLOP-bound / BERT-base comparison)"]
    sys.path.insert(0, str(path.parent))
    import embedding_speed

    result = embedding_speed.run(chunks, baseline_chunks)
    lines = [
        f"From `benchmarks/embedding_speed.py` ({result['chunks']['count']} stdlib chunks): fp32 "
        f"matmul peak {result['matmul_peak_fp32_gflops']:.1f} GFLOP/s.",
        "",
        "| embedder | dtype | batch | sorted | GFLOP/chunk | chunks/s | % of fp32 peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"] + [result["retro_pytorch"]]:
        lines.append(
            f"| {r['embedder']} | {r['dtype']} | {r['batch_size']} | {r['sorted_by_length']} | "
            f"{r['gflop_per_chunk']:.2f} | {r['chunks_per_s']:.1f} | {r['percent_of_fp32_peak']:.0f}% |"
        )
    lines += [
        "",
        f"FLOP-bound limit (fp32, MiniLM): {result['flop_bound_chunks_per_s']:.1f} chunks/s; the "
        f"best fp32 run reaches {result['best_fp32']['percent_of_fp32_peak']:.0f}% of it. "
        f"retrolm / RETRO-pytorch (BERT-base, batch 16): {result['ratio_ours_over_theirs']:.1f}x.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--files",
        type=int,
        default=120,
        help="stdlib files for the per-stage table (default MiniLM)",
    )
    parser.add_argument(
        "--small", type=int, default=75, help="files of the small corpus for the RSS comparison"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        nargs="+",
        default=[1, 4, 8],
        help="corpus repetitions for the RSS comparison",
    )
    parser.add_argument("--block-rows", type=int, default=2048, help="chunks per block file")
    parser.add_argument("--embedder", default="default", help="embedder of the per-stage table")
    parser.add_argument(
        "--embed-chunks", type=int, default=256, help="chunks for embedding_speed.run"
    )
    parser.add_argument(
        "--baseline-chunks", type=int, default=64, help="chunks for the BERT-base baseline"
    )
    parser.add_argument("--skip-stages", action="store_true", help="skip the per-stage table")
    parser.add_argument("--no-embedding-speed", action="store_true", help="skip embedding_speed.py")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()

    files = stdlib_files()
    load = os.getloadavg()
    lines = [
        "## Database build (benchmarks/database_speed.py)",
        "",
        f"Corpus: the standard library of Python {platform.python_version()} "
        f"({sysconfig.get_paths()['stdlib']}, {len(files)} .py files without tests), as JSONL. "
        f"Machine: {os.cpu_count()} CPU cores, load average at start {load[0]:.2f}.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from retrolm.database.embed import make_tiny_bert

        tiny = f"bert-mean:{make_tiny_bert(work / 'tiny-bert')}"
        corpus = work / "stages.jsonl"
        write_jsonl(files[: args.files], corpus)
        if not args.skip_stages:
            lines += [
                "### Per stage",
                "",
                *stage_table(corpus, work, args.embedder, args.block_rows),
                "",
            ]
        lines += [
            "### Peak RSS against corpus size",
            "",
            "A tiny BERT embedder (2 layers, width 32) keeps the model's own memory small, so any",
            "growth with the corpus would show.",
            "",
            *rss_table(files, args.small, args.repeats, work, tiny, args.block_rows),
            "",
        ]
    if not args.no_embedding_speed:
        lines += [
            "### Embedding speed",
            "",
            *embedding_figures(args.embed_chunks, args.baseline_chunks),
            "",
        ]
    load = os.getloadavg()
    lines.append(f"Load average at the end: {load[0]:.2f}.")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
