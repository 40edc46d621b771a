"""Faults and hostile input: every case ends in a one-line error with exit code 2
(a user's problem) or 1 with a traceback (a bug), and nothing the user had is lost.

Every CLI case checks the exit code, that stderr holds no traceback unless it is a bug, and the
files (with their hashes) of what the user had before.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from retrolm.checkpoint import latest_checkpoint, save_checkpoint, verify_checkpoint
from retrolm.cli import main as cli_main
from retrolm.database import Database, DatabaseConfig
from retrolm.errors import ConfigError, DivergedError
from retrolm.lock import LOCK_FILE
from retrolm.runs import read_metrics
from retrolm.train import TrainConfig, fit, setup, train
from tests.test_evaluate import build_world, make_corpus

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the lock file aside), by relative path."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def cli(capsys, *args: str, bug: bool = False) -> tuple[int, str, str]:
    """Run `retrolm ARGS` in this process: (exit code, stdout, stderr); no traceback unless
    `bug`."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    if not bug:
        assert "Traceback" not in err, err
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def tiny_train_args(db: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--db", db, "--out", out, "--preset", "tiny", "--batch-size", "4",
        "--seq-len", "64", "--eval-every", "0", "--lr", "3e-3", "--no-progress", *extra,
    ]  # fmt: skip


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def log_to_this_tests_stderr():
    """`retrolm`'s log handler writes to the stderr of the first `main()`; give each test its own
    (pytest swaps sys.stderr per test)."""
    logger = logging.getLogger("retrolm")
    saved = logger.handlers[:]
    logger.handlers.clear()
    yield
    logger.handlers[:] = saved


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("faults"))


@pytest.fixture
def db_copy(world, tmp_path):
    """A copy of the world's database that a test may change."""
    return Path(shutil.copytree(world["db"], tmp_path / "db"))


def _try_mount(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` at `folder` (root with mount rights only; skipped elsewhere)."""
    if not _try_mount(folder, f"size={size}"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-error tests cover it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def read_only(tmp_path):
    """A folder no one may write: a read-only tmpfs as root, chmod 555 otherwise."""
    folder = tmp_path / "ro"
    if os.geteuid() == 0:
        if not _try_mount(folder, "size=1m,ro"):
            pytest.skip("root without mount rights: a read-only folder cannot be made")
        yield folder
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    else:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def unfinished_run(db, out: Path, stop_after: int, **kw) -> TrainConfig:
    """A run stopped (as if killed) after `stop_after` steps; returns its config."""
    base = dict(preset="tiny", max_steps=8, batch_size=4, seq_len=64, eval_every=0, lr=3e-3)
    cfg = TrainConfig(**{**base, "checkpoint_every": 2, "keep_checkpoints": 3, **kw})
    trainer = setup(cfg, db, out, show_progress=False)
    for record in fit(trainer):
        if record["step"] == stop_after:
            break
    return cfg


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run)]


# ----------------------------------------------------------------------------- 1. --overwrite


@pytest.mark.parametrize(
    "bad",
    [["--preset", "nosuch"], ["--model", "nosuch_field=1"], ["--seq-len", "100"],
     ["--model", "chunk_size=8"], ["--neighbours", "50"]],
    ids=["preset", "model-field", "seq-len", "chunk-size", "neighbours"],
)  # fmt: skip
def test_overwrite_with_bad_settings_keeps_the_run(world, tmp_path, capsys, bad):
    run = Path(shutil.copytree(world["retro"], tmp_path / "run"))
    before = snapshot(run)
    code, _, err = cli(
        capsys, *tiny_train_args(world["db"], run, "--steps", "5", "--overwrite", *bad)
    )
    assert code == 2
    one_error_line(err)
    assert snapshot(run) == before  # model, checkpoints, metrics: all still there
    code, _, _ = cli(capsys, *tiny_train_args(world["db"], run, "--steps", "3", "--overwrite"))
    assert code == 0 and len(losses(run)) == 3  # a valid --overwrite does start over


# ----------------------------------------------------------------------------- 2. checkpoints


def test_pruning_compares_step_numbers_and_latest_is_never_deleted(tmp_path):
    class Model:
        def save(self, folder: Path) -> None:
            folder.mkdir(parents=True)
            (folder / "config.json").write_text("{}")

    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, 100, Model(), {"x": torch.zeros(1)}, {}, keep=1)
    save_checkpoint(folder, 2, Model(), {"x": torch.zeros(1)}, {}, keep=1)  # a restarted run
    latest = json.loads((folder / "latest.json").read_text())
    assert latest["step"] == 2 and (folder / latest["name"]).is_dir()
    assert (folder / "step-00000100").is_dir()  # pruning never removes what it just wrote
    # each checkpoint carries the checksums of its files
    state = json.loads((folder / "step-00000002" / "state.json").read_text())
    assert set(state["files"]) == {"model/config.json", "trainer.pt"}


@pytest.mark.parametrize("damaged", ["trainer.pt", "model/model.safetensors"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(
    world, tmp_path, capsys, damaged
):
    db = Database.open(world["db"])
    ref = tmp_path / "ref"
    cfg = unfinished_run(db, ref, stop_after=8)
    run = tmp_path / "run"
    unfinished_run(db, run, stop_after=5)  # checkpoints at steps 2 and 4, metrics up to 5
    target = run / "checkpoints" / "step-00000004" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # truncated
    step2 = snapshot(run / "checkpoints" / "step-00000002")
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--no-progress")
    assert code == 0, err
    assert "step-00000004 is damaged" in err and "step-00000002" in err
    assert "delete" not in err.lower()
    # resumed from step 2: history is kept up to there, recomputed after, bit-identical
    train(cfg, db, ref, resume=True, show_progress=False)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))
    assert losses(run) == losses(ref)
    ckpts = run / "checkpoints"
    latest = json.loads((ckpts / "latest.json").read_text())
    assert latest["step"] == 8 and verify_checkpoint(ckpts / latest["name"]) is None
    assert (ckpts / "damaged-step-00000004").is_dir()  # set aside, not deleted
    assert snapshot(ckpts / "step-00000002") == step2 or not (ckpts / "step-00000002").exists()


def test_every_checkpoint_damaged_is_one_error_that_deletes_nothing(world, tmp_path, capsys):
    db = Database.open(world["db"])
    run = tmp_path / "run"
    unfinished_run(db, run, stop_after=5)
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step:08d}" / "trainer.pt").write_bytes(b"garbage")
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--no-progress")
    assert code == 2
    line = one_error_line(err)
    assert "damaged" in line and "--overwrite" in line and "delete" not in line.lower()
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- 3. db add


def test_db_add_skips_documents_already_in_the_database(world, db_copy, tmp_path, capsys,
                                                        monkeypatch):  # fmt: skip
    corpus = world["root"] / "corpus"
    before = snapshot(db_copy)
    documents = Database.open(db_copy).info()["counts"]["documents"]
    monkeypatch.chdir(corpus.parent)  # the same files, spelt as a relative path
    code, _, err = cli(capsys, "db", "add", db_copy, "corpus", "--no-progress")
    assert code == 2
    assert "24 duplicate" in one_error_line(err)
    assert snapshot(db_copy) == before
    # two old files under new names plus one new file: only the new one is added
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(corpus / "doc00.txt", mixed / "copy-a.txt")
    shutil.copy(corpus / "doc05.txt", mixed / "copy-b.txt")
    (mixed / "new.txt").write_text("a genuinely new document about lazy wizards\n" * 5)
    code, _, err = cli(capsys, "db", "add", db_copy, mixed, "--no-progress")
    assert code == 0, err
    info = Database.open(db_copy).info()
    assert info["counts"]["documents"] == documents + 1
    assert info["counts"]["skipped"].get("duplicate") == 2


# ----------------------------------------------------------------------------- 4. eval --baseline


def test_eval_refuses_a_retro_baseline_and_labels_figures(world, capsys):
    db, retro, base = world["db"], world["retro"], world["base"]
    code, out, err = cli(capsys, "eval", retro, "--db", db, "--baseline", retro, "--no-progress")
    assert code == 2 and "RETRO run" in one_error_line(err) and out == ""
    code, out, err = cli(capsys, "eval", base, "--db", db, "--baseline", retro, "--no-progress")
    assert code == 2 and out == ""
    code, out, err = cli(capsys, "eval", base, "--db", db, "--baseline", base, "--no-progress")
    assert code == 2 and "no-retrieval run" in one_error_line(err)
    code, out, _ = cli(capsys, "eval", retro, "--db", db, "--baseline", base, "--json",
                       "--no-progress")  # fmt: skip
    assert code == 0
    runs = json.loads(out)["runs"]
    assert runs == {"retro_bpb": str(retro), "retro_off_bpb": str(retro), "baseline_bpb": str(base)}
    code, out, _ = cli(capsys, "eval", retro, "--db", db, "--baseline", base, "--no-progress")
    assert f"baseline: {base}" in out and f"RETRO[ON]: {retro}" in out


# ----------------------------------------------------------------------------- 5. db build settings


def _world_build_args(world, out: Path) -> list[str]:
    """The `db build` command of the world's own database (its fixed valid split)."""
    args = _build_args(
        world, world["root"] / "corpus", out, "--split-list", world["root"] / "valid.txt"
    )
    i = args.index("--valid-fraction")
    return args[:i] + args[i + 2 :]


def _build_args(world, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "db", "build", corpus, "--out", out, "--vocab-size", "300", "--chunk-size", "16",
        "--neighbours", "4", "--valid-fraction", "0.25", "--block-rows", "64", "--embedder",
        f"bert-mean:{world['bert']}", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [["--index", "Garbage,XYZ"], ["--embedder", "/missing"], ["--tokenizer", "/missing.json"],
     ["--split-list", "/missing.txt"]],
    ids=["index", "embedder", "tokenizer", "split-list"],
)  # fmt: skip
def test_bad_build_settings_fail_before_anything_is_written(world, tmp_path, capsys, bad,
                                                            monkeypatch):  # fmt: skip
    import retrolm.database.build as build

    def no_stage(*a, **k):
        raise AssertionError("a stage ran before the settings were checked")

    corpus, out = world["root"] / "corpus", tmp_path / "db"
    with monkeypatch.context() as m:
        m.setattr(build, "run_tokenizer", no_stage)
        args = _build_args(world, corpus, out, *bad)
        if bad[0] == "--embedder":  # the full flag list names the tiny BERT; replace it
            i = args.index("--embedder")
            args[i + 1] = bad[1]
            args = args[: len(args) - 2]
        code, _, err = cli(capsys, *args)
    assert code == 2
    one_error_line(err)
    assert not out.exists() or not any(out.iterdir())
    code, _, err = cli(capsys, *_build_args(world, corpus, out))  # the corrected command
    assert code == 0, err


def test_a_setting_that_fails_its_stage_can_be_corrected_on_rerun(world, tmp_path, capsys):
    corpus, out = world["root"] / "corpus", tmp_path / "db"
    code, _, err = cli(capsys, *_build_args(world, corpus, out, "--index", "IVF4096,Flat"))
    assert code == 2 and "IVF" in one_error_line(err)  # fails in the index stage
    embeddings = snapshot(out / "embeddings")
    assert embeddings
    code, _, err = cli(capsys, *_build_args(world, corpus, out, "--index", "Flat"))
    assert code == 0, err
    assert snapshot(out / "embeddings") == embeddings  # not redone
    assert Database.open(out).info()["index"]["factory"] == "Flat"
    # a finished database still refuses other settings
    code, _, err = cli(capsys, *_build_args(world, corpus, out, "--index", "HNSW32"))
    assert code == 2 and "other settings" in one_error_line(err)


# ----------------------------------------------------------------------------- 6. model vs database


@pytest.mark.parametrize("override", ["chunk_size=8", "vocab_size=280", "neighbour_len=8"])
def test_model_that_cannot_read_the_database_is_refused_before_the_run_folder(
    world, tmp_path, capsys, override
):
    run = tmp_path / "run"
    code, _, err = cli(
        capsys, *tiny_train_args(world["db"], run, "--steps", "2", "--model", override)
    )
    assert code == 2
    assert override.split("=")[0] in one_error_line(err)
    assert not run.exists()
    code, _, err = cli(capsys, *tiny_train_args(world["db"], run, "--steps", "2"))
    assert code == 0, err  # the corrected command, without --overwrite


# ----------------------------------------------------------------------------- 7. Ctrl-C


def test_interrupted_train_says_how_to_resume_and_that_works(world, tmp_path, capsys, monkeypatch):
    import retrolm.train as train_module

    run = tmp_path / "run"
    real_step = train_module.train_step

    def step_then_interrupt(trainer):
        if trainer.step == 5:
            raise KeyboardInterrupt
        return real_step(trainer)

    args = tiny_train_args(world["db"], run, "--steps", "8", "--checkpoint-every", "2")
    with monkeypatch.context() as m:
        m.setattr(train_module, "train_step", step_then_interrupt)
        code, _, err = cli(capsys, *args)
    assert code == 130
    hint = err.strip().splitlines()[-1]
    assert f"retrolm train --out {run} --resume" in hint
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--no-progress")
    assert code == 0, err
    ref = tmp_path / "ref"
    assert (
        cli(capsys, *tiny_train_args(world["db"], ref, "--steps", "8", "--checkpoint-every", "2"))[
            0
        ]
        == 0
    )
    assert losses(run) == losses(ref)


# ----------------------------------------------------------------------------- 8. locks


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A process that holds the writer's lock of `folder` until it is killed."""
    code = (
        "import sys, time; from retrolm.lock import folder_lock\n"
        f"with folder_lock({str(folder)!r}):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=python_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_first(world, db_copy, tmp_path, capsys):
    holder = _hold_lock(db_copy)
    try:
        before = snapshot(db_copy)
        code, _, err = cli(capsys, "db", "add", db_copy, world["root"] / "corpus", "--no-progress")
        assert code == 2
        line = one_error_line(err)
        assert f"pid {holder.pid}" in line and "in use" in line
        code, _, err = cli(capsys, *_world_build_args(world, db_copy))
        assert code == 2 and f"pid {holder.pid}" in one_error_line(err)
        assert snapshot(db_copy) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases the lock of a killed holder
        holder.wait()
    code, _, err = cli(capsys, *_world_build_args(world, db_copy))
    assert code == 0, err

    run = Path(shutil.copytree(world["retro"], tmp_path / "run"))
    holder = _hold_lock(run)
    try:
        before = snapshot(run)
        code, _, err = cli(
            capsys, *tiny_train_args(world["db"], run, "--steps", "2", "--overwrite")
        )
        assert code == 2 and f"pid {holder.pid}" in one_error_line(err)
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_db_adds_at_once_neither_crashes_nor_doubles(world, db_copy, tmp_path):
    extra = make_corpus(tmp_path / "extra", n_docs=6, seed=9)
    command = [sys.executable, "-m", "retrolm", "-q", "db", "add", str(db_copy), str(extra),
               "--no-progress"]  # fmt: skip
    procs = [
        subprocess.Popen(command, env=python_env(), stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code in (0, 2) and "Traceback" not in err, err
    assert sorted(code for code, _ in results)[0] == 0
    refused = [err for code, err in results if code == 2]
    assert all("in use" in err or "already in the database" in err for err in refused)
    documents = Database.open(world["db"]).info()["counts"]["documents"]
    assert Database.open(db_copy).info()["counts"]["documents"] == documents + 6


# ----------------------------------------------------------------------------- 9. OS errors


def test_disk_full_while_building_is_one_line_and_resumable(world, tmp_path, capsys, monkeypatch):
    import retrolm.database.build as build

    real = build.save_npy
    calls = {"n": 0}

    def full_disk(path, array):
        calls["n"] += 1
        if "neighbours" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, array)

    corpus, out = world["root"] / "corpus", tmp_path / "db"
    with monkeypatch.context() as m:
        m.setattr(build, "save_npy", full_disk)
        code, _, err = cli(capsys, *_build_args(world, corpus, out))
    assert code == 2 and "disk is full" in one_error_line(err)
    code, _, err = cli(capsys, *_build_args(world, corpus, out))  # space freed: resumes
    assert code == 0, err


def test_faiss_and_torch_write_failures_are_one_line(world, tmp_path, capsys, monkeypatch):
    import retrolm.checkpoint as checkpoint
    import retrolm.database.index as index

    def faiss_full(index_, path):
        raise RuntimeError("Error in faiss::FileIOWriter::operator() ... ret == (n) failed")

    corpus, out = world["root"] / "corpus", tmp_path / "db"
    with monkeypatch.context() as m:
        m.setattr(index, "save_index", faiss_full)
        code, _, err = cli(capsys, *_build_args(world, corpus, out))
    assert code == 2 and "disk may be full" in one_error_line(err)

    run = tmp_path / "run"
    real_save = checkpoint.torch.save
    calls = {"n": 0}

    def torch_full(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64")
        return real_save(obj, path)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.torch, "save", torch_full)
        code, _, err = cli(capsys, *tiny_train_args(world["db"], run, "--steps", "6",
                                                    "--checkpoint-every", "2"))  # fmt: skip
    assert code == 2 and "disk may be full" in one_error_line(err)
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step-00000002" and verify_checkpoint(ckpt) is None  # kept intact
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--no-progress")
    assert code == 0, err


def test_disk_full_on_a_small_tmpfs(world, tmp_path, capsys):
    corpus = world["root"] / "corpus"
    with small_disk(tmp_path / "small", "48k") as disk:  # the database needs ~140 kB
        code, _, err = cli(capsys, *_build_args(world, corpus, disk / "db"))
        assert code == 2 and "disk" in one_error_line(err)
    with small_disk(tmp_path / "small2", "1m") as disk:  # a checkpoint needs ~2 MB
        code, _, err = cli(capsys, *tiny_train_args(world["db"], disk / "run", "--steps", "2"))
        assert code == 2 and "disk" in one_error_line(err)


def test_a_short_write_is_a_disk_full_error_naming_file_and_space(tmp_path):
    """numpy reports a full disk as a bare OSError ("N requested and M written"): it is a
    `WriteError` naming the file, the free space and the size needed, and leaves no file."""
    from retrolm.errors import WriteError
    from retrolm.io import save_npy

    with small_disk(tmp_path / "small", "300k") as disk:
        with pytest.raises(WriteError) as info:
            save_npy(disk / "big.npy", np.zeros(200_000))  # 1.5 MiB
        message = str(info.value)
        assert str(disk / "big.npy") in message and "disk is full" in message
        assert "1.5 MiB needed" in message and f"free in {disk}" in message
        assert list(disk.iterdir()) == []


def test_a_memory_mapped_output_on_a_full_disk_is_an_error_not_a_bus_error(tmp_path):
    """A memory map over a sparse file dies of SIGBUS on a full disk; `allocate` reserves the
    blocks first, so the failure is a `WriteError`."""
    from retrolm.errors import WriteError
    from retrolm.io import allocate

    with small_disk(tmp_path / "small", "100k") as disk:
        path = disk / "map.npy"
        mapping = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(100_000,))
        with pytest.raises(WriteError, match="disk is full"):
            allocate(path)
        del mapping


def test_a_short_write_outside_the_atomic_writers_is_one_line(world, tmp_path, capsys,
                                                               monkeypatch):  # fmt: skip
    import retrolm.train as train_module

    def short_write(*args, **kwargs):
        raise OSError("664704 requested and 234464 written")

    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "save_checkpoint", short_write)
    code, _, err = cli(capsys, *tiny_train_args(world["db"], run, "--steps", "2"))
    line = one_error_line(err)
    assert code == 2 and "disk is full" in line and str(run) in line and "free in" in line


def test_eval_out_on_a_full_disk_is_one_line_naming_the_file(world, tmp_path, capsys):
    with small_disk(tmp_path / "small", "64k") as disk:
        filler = disk / "filler"
        # take every block the tmpfs has
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        report = disk / "report.json"
        code, _, err = cli(capsys, "eval", world["retro"], "--db", world["db"], "--out", report,
                           "--no-progress")  # fmt: skip
        line = one_error_line(err)
        assert code == 2 and "disk is full" in line and str(report) in line
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # nothing half-written


@pytest.mark.slow
def test_no_disk_size_kills_a_build_or_a_training_run(world, tmp_path):
    """On a disk of any size, `db build` and `train` end in success or in one line about the
    full disk (exit 2), never in a signal or a traceback; the rerun with room resumes."""
    corpus = world["root"] / "corpus"
    for kb in range(40, 200, 16):
        with small_disk(tmp_path / f"d{kb}", f"{kb}k") as disk:
            done = subprocess.run(
                [sys.executable, "-m", "retrolm", "-q", *map(str, _build_args(world, corpus,
                                                                              disk / "db"))],
                env=python_env(), capture_output=True, text=True,
            )  # fmt: skip
            assert done.returncode in (0, 2), (kb, done.returncode, done.stderr)
            assert "Traceback" not in done.stderr, done.stderr
            if done.returncode == 2:
                assert "disk" in one_error_line(done.stderr), done.stderr
    for mb in (1, 2, 3):
        with small_disk(tmp_path / f"t{mb}", f"{mb}m") as disk:
            args = tiny_train_args(world["db"], disk / "run", "--steps", "4",
                                   "--checkpoint-every", "2")  # fmt: skip
            done = subprocess.run(
                [sys.executable, "-m", "retrolm", "-q", *map(str, args)],
                env=python_env(), capture_output=True, text=True,
            )  # fmt: skip
            assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr


def test_unwritable_outputs_fail_before_any_work(world, read_only, capsys, monkeypatch):
    import retrolm.evaluate as evaluate

    corpus = world["root"] / "corpus"
    code, _, err = cli(capsys, *_build_args(world, corpus, read_only / "db"))
    assert code == 2 and "read-only" in one_error_line(err).lower() or "denied" in err
    code, _, err = cli(capsys, *tiny_train_args(world["db"], read_only / "run", "--steps", "2"))
    assert code == 2
    one_error_line(err)

    def no_eval(*a, **k):
        raise AssertionError("evaluated although the result could not be written")

    monkeypatch.setattr(evaluate, "evaluate_run", no_eval)
    code, _, err = cli(capsys, "eval", world["retro"], "--db", world["db"], "--out",
                       read_only / "report.json", "--no-progress")  # fmt: skip
    assert code == 2 and "report.json" in one_error_line(err)
    code, _, err = cli(capsys, "plot", world["retro"], "--out", read_only / "loss.png")
    assert code == 2
    one_error_line(err)


def test_out_under_proc_and_bad_plot_format(world, tmp_path, capsys):
    for args in (
        _build_args(world, world["root"] / "corpus", "/proc/x/db"),
        tiny_train_args(world["db"], "/proc/x/run", "--steps", "2"),
        ["plot", world["retro"], "--out", "/proc/x/loss.png"],
        ["plot", world["retro"], "--out", tmp_path / "loss.xyz"],
    ):
        code, _, err = cli(capsys, *args)
        assert code == 2
        one_error_line(err)
    assert not (tmp_path / "loss.xyz").exists()


def test_broken_pipe_is_one_line(world):
    command = [sys.executable, "-m", "retrolm", "db", "search", str(world["db"]), "lazy dog",
               "-k", "20"]  # fmt: skip
    proc = subprocess.Popen(
        command, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    proc.stdout.close()  # as `| head` does once it has read its lines; here before any
    err = proc.stderr.read().decode()
    assert proc.wait() == 2
    assert "Traceback" not in err and "pipe" in one_error_line(err)


def test_diverging_run_is_one_line_and_keeps_the_last_checkpoint(world, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(capsys, *tiny_train_args(world["db"], run, "--steps", "4", "--lr", "1e6",
                                                "--clip", "0"))  # fmt: skip
    assert code == 2 and "diverged" in one_error_line(err)
    assert not run.exists()  # nothing was checkpointed: nothing blocks the corrected command
    assert cli(capsys, *tiny_train_args(world["db"], run, "--steps", "2"))[0] == 0


def test_divergence_after_a_checkpoint_keeps_it(world, tmp_path, capsys, monkeypatch):
    import retrolm.train as train_module

    real_step = train_module.train_step

    def diverge_at_5(trainer):
        loss = real_step(trainer)
        return float("nan") if trainer.step == 5 else loss

    run = tmp_path / "run"
    args = tiny_train_args(world["db"], run, "--steps", "8", "--checkpoint-every", "2")
    with monkeypatch.context() as m:
        m.setattr(train_module, "train_step", diverge_at_5)
        code, _, err = cli(capsys, *args)
    assert code == 2
    line = one_error_line(err)
    assert "diverged" in line and "step-00000004" in line and "--overwrite" in line
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step-00000004" and verify_checkpoint(ckpt) is None
    assert issubclass(DivergedError, FloatingPointError)


# ----------------------------------------------------------------------------- 10. bugs vs errors


def test_user_errors_exit_2_and_bugs_exit_1_with_a_traceback(world, capsys, monkeypatch):
    import retrolm.cli.db as cli_db

    code, _, err = cli(capsys, "db", "search", world["db"], "lazy", "-k", "0")
    assert code == 2
    one_error_line(err)

    def broken(args):
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(cli_db, "_info", broken)  # the parser is built anew by each main()
    code, _, err = cli(capsys, "db", "info", world["db"], bug=True)
    assert code == 1
    assert "Traceback" in err and "an internal invariant failed" in err and "bug" in err
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match="chunk_size"):
        DatabaseConfig(chunk_size=0)


# ----------------------------------------------------------------------------- 11. long lines


def test_a_long_single_line_document_is_tokenized_in_bounded_pieces(world, tmp_path, monkeypatch):
    from retrolm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(world["db"] / "tokenizer.json")
    rng = np.random.default_rng(0)
    words = np.array(["the", "quick", "brown", "fox,", "jumps", "(over)", "a", "lazy", "dog."])
    text = " ".join(rng.choice(words, 40_000)) + "  double  spaces\tand tabs"  # one line
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "long.txt").write_text(text)
    (corpus / "short.txt").write_text("a short one\n")
    sizes: list[int] = []
    real = Tokenizer.encode_batch

    def spy(self, texts):
        sizes.append(sum(len(t) for t in texts))
        return real(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", spy)
    cfg = DatabaseConfig(tokenizer=str(world["db"] / "tokenizer.json"), chunk_size=16,
                         retriever="bm25", tokenize_batch_bytes=8192, valid_fraction=0.0)  # fmt: skip
    from retrolm.database import chunk_stage

    folder = chunk_stage([corpus], tmp_path / "db", cfg, show_progress=False)
    assert max(sizes) <= 2 * 8192  # never the whole 200 kB line at once
    monkeypatch.setattr(Tokenizer, "encode_batch", real)
    tokens = np.concatenate([np.load(p) for p in sorted((folder / "chunks").glob("tokens-*"))])
    records = [json.loads(line) for line in (folder / "documents.jsonl").read_text().splitlines()]
    long = next(r for r in records if r["name"].endswith("long.txt"))
    rows = tokens[long["first_chunk"] : long["first_chunk"] + long["num_chunks"]].reshape(-1)
    ids = rows[rows != tokenizer.pad_id][:-1]  # drop the padding and the final eos
    assert ids.tolist() == tokenizer.encode(text)  # the same ids as the whole text at once


@pytest.mark.slow
def test_chunk_memory_does_not_grow_with_line_length(tmp_path):
    """`db chunk` of a 30 MB single-line file stays well under a gigabyte."""
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = " ".join(rng.choice(words, 5_000_000))  # ~30 MB, no newline
    (corpus / "one-line.txt").write_text(text)
    (corpus / "other.txt").write_text("another document\n" * 50)
    code = (
        "import resource, sys\n"
        "from retrolm.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "-q", "db", "chunk", str(corpus), "--out",
         str(tmp_path / "db"), "--vocab-size", "1000", "--no-progress"],
        env=python_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    peak_mb = int(done.stdout.split()[-1]) / 1024
    assert peak_mb < 1500, peak_mb


# ----------------------------------------------------------------------------- 12. quickstart


def test_quickstart_refuses_bad_corpora_and_outs_at_once(world, tmp_path, capsys):
    one = tmp_path / "tiny1"
    one.mkdir()
    (one / "a.py").write_text("x = 1\n")
    binary = tmp_path / "binary"
    binary.mkdir()
    for i in range(3):
        (binary / f"b{i}.bin").write_bytes(b"\x00\x01\x02" * 100)
    start = time.monotonic()
    code, _, err = cli(capsys, "quickstart", "--corpus", one, "--out", tmp_path / "q1")
    assert code == 2 and "at least 2 text files" in one_error_line(err)
    code, _, err = cli(capsys, "quickstart", "--corpus", binary, "--out", tmp_path / "q2")
    assert code == 2 and "3 file(s), of which 0 of text (3 binary)" in one_error_line(err)
    for existing in (world["db"], world["retro"]):
        before = snapshot(existing)
        code, _, err = cli(capsys, "quickstart", "--corpus", world["root"] / "corpus", "--out",
                           existing)  # fmt: skip
        assert code == 2 and "not a quickstart" in one_error_line(err)
        assert snapshot(existing) == before
    assert time.monotonic() - start < 30  # refused up front, not after the planning
    assert not (tmp_path / "q1").exists() or not any((tmp_path / "q1").iterdir())


# ----------------------------------------------------------------------------- 13. silent oddities


def test_silent_oddities_are_said(world, tmp_path, capsys, db_copy):
    corpus = world["root"] / "corpus"
    out = tmp_path / "big-vocab"
    args = _build_args(world, corpus, out, "--retriever", "bm25")
    args[args.index("--vocab-size") + 1] = "1000000"
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    info = Database.open(out).info()
    assert "1000000" in err and info["tokenizer"]["requested_vocab_size"] == 1000000
    code, out_text, _ = cli(capsys, "db", "info", out)
    assert "asked for 1000000" in out_text

    code, _, err = cli(capsys, *tiny_train_args(world["db"], tmp_path / "r", "--neighbours", "20"))
    assert code == 2 and "stores 4" in one_error_line(err)
    assert not (tmp_path / "r").exists()

    code, _, err = cli(capsys, "generate", world["retro"], "def", "--db", world["db"],
                       "--neighbours", "0")  # fmt: skip
    assert code == 2 and "--neighbours" in one_error_line(err)

    code, _, err = cli(capsys, *_build_args(world, tmp_path / "nosuch", tmp_path / "db2"))
    assert code == 2 and "no such file or folder" in one_error_line(err)
    assert not (tmp_path / "db2").exists()


def test_resume_on_another_database_says_so(world, tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus2", n_docs=30, seed=5)
    other = tmp_path / "other-db"
    args = _build_args(world, corpus, other, "--tokenizer", str(world["db"] / "tokenizer.json"))
    assert cli(capsys, *args)[0] == 0
    run = tmp_path / "run"
    unfinished_run(Database.open(world["db"]), run, stop_after=3)
    before = snapshot(run)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--db", other, "--no-progress")
    assert code == 2
    line = one_error_line(err)
    assert "another database" in line and "sampler" not in line
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- 14. exact resume


def test_resume_uses_the_thread_count_of_the_run(tmp_path):
    """Float sums are split by thread: a resume under another torch thread count (another
    machine, OMP_NUM_THREADS, the test suite's single thread) takes the run's count again."""
    from tests.test_train import make_source, tiny_config

    src = make_source()
    cfg = tiny_config(max_steps=7, checkpoint_every=2)
    train(cfg, src, tmp_path / "ref", show_progress=False)
    before = torch.get_num_threads()
    trainer = setup(cfg, src, tmp_path / "cut", show_progress=False)
    for record in fit(trainer):
        if record["step"] == 5:
            break
    try:
        torch.set_num_threads(before + 1)
        train(None, src, tmp_path / "cut", resume=True, show_progress=False)
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
