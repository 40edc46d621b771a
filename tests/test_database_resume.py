"""Killing `retrolm db build` (SIGKILL) at several moments, then rerunning it, gives the same
database, bit for bit, as one uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retrolm.database import build_database
from retrolm.database.embed import make_tiny_bert
from tests.test_database import arrays, make_corpus, tiny_config

# a kill point: a description and a condition on the manifest that the run must have reached
KILL_POINTS = [
    ("right after it started", lambda m: True),
    ("after 3 chunk blocks", lambda m: len(m["chunks"]["blocks"]) >= 3),
    ("after 5 embedding blocks", lambda m: len(m["embeddings"]["blocks"]) >= 5),
    ("after 3 neighbour blocks", lambda m: len(m["neighbours"]["blocks"]) >= 3),
]


def build_command(corpus: Path, out: Path, bert: Path) -> list[str]:
    return [
        sys.executable, "-m", "retrolm", "-q", "db", "build", str(corpus), "--out", str(out),
        "--vocab-size", "300", "--chunk-size", "16", "--block-rows", "25", "--neighbours", "4",
        "--valid-fraction", "0.2", "--embed-batch-size", "64", "--embedder", f"bert-mean:{bert}", "--no-progress",
    ]  # fmt: skip


def environment() -> dict[str, str]:
    # one thread: the same float reductions in every run, and no spinning on a shared machine
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "true",
    }


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_until(
    command: list[str], folder: Path, reached, timeout: float = 120.0
) -> tuple[dict, bool]:
    """Start the build, SIGKILL it as soon as the manifest satisfies `reached`.

    Returns the manifest seen at the kill and whether the process was killed (not finished).
    """
    process = subprocess.Popen(
        command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            manifest = read_manifest(folder)
            if manifest is not None and reached(manifest):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return manifest, True
            if process.poll() is not None:
                return read_manifest(folder) or {}, False
            time.sleep(0.002)
        raise AssertionError("the build neither reached the kill point nor finished in time")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    bert = make_tiny_bert(root / "bert")
    corpus = make_corpus(root / "corpus", 25, seed=3)
    reference = root / "reference"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1): same float reductions
    try:
        config = tiny_config(bert, block_rows=25)
        build_database([corpus], reference, config, show_progress=False)
    finally:
        torch.set_num_threads(before)
    return root, bert, corpus, arrays(reference)


def test_sigkill_at_several_points_then_resume_is_bit_identical(inputs):
    root, bert, corpus, reference = inputs
    folder = root / "killed"
    command = build_command(corpus, folder, bert)
    killed_in = []
    for what, reached in KILL_POINTS:
        manifest, killed = run_until(command, folder, reached)
        assert killed, f"the build finished before it could be killed {what}"
        killed_in.append([s for s, done in manifest["stages"].items() if not done][0])
    assert killed_in == [
        "tokenizer",
        "chunks",
        "embeddings",
        "neighbours",
    ]  # each kill landed mid-stage
    done = subprocess.run(command, env=environment(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert arrays(folder) == reference
    assert not list(folder.rglob("*.tmp-*"))  # leftovers of killed writes are cleaned up
