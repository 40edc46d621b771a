"""`retrolm train` on hostile folders and settings: --overwrite deletes only a run's own files, a
run killed before its first checkpoint starts again, a split too small for one batch, damaged
run files and bad settings are each one line with exit code 2, never a traceback."""

from __future__ import annotations

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

from retrolm.cli import main as cli_main
from retrolm.data import ArrayChunkSource
from retrolm.errors import ConfigError, CorruptArtifactError, InputError
from retrolm.lock import LOCK_FILE
from retrolm.runs import read_metrics
from retrolm.train import TrainConfig, train
from tests.test_evaluate import build_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(autouse=True)
def log_to_this_tests_stderr():
    """`retrolm`'s log handler writes to the stderr of the first `main()`; give each test its own
    (pytest swaps sys.stderr per test)."""
    logger = logging.getLogger("retrolm")
    saved = logger.handlers[:]
    logger.handlers.clear()
    yield
    logger.handlers[:] = saved


def cli(capsys, *args) -> tuple[int, str, str]:
    """`retrolm ARGS` in this process: (exit code, stdout, stderr), never a traceback."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the lock file aside), by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def args_for(db: Path, out: Path, *extra) -> list:
    return [
        "train", "--db", db, "--out", out, "--preset", "tiny", "--batch-size", "4",
        "--seq-len", "64", "--eval-every", "0", "--lr", "3e-3", "--steps", "3", "--no-progress",
        *extra,
    ]  # fmt: skip


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run)]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> list[float]:
    """The losses of a clean run of `args_for` (3 steps)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert cli_main([str(a) for a in args_for(world["db"], run)]) == 0
    return losses(run)


def add_user_files(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "code.py").write_text("print('mine')\n")
    (folder / "data").mkdir()
    (folder / "data" / "x.bin").write_bytes(bytes(range(256)))
    return {
        k: v for k, v in snapshot(folder).items() if k in ("notes.txt", "code.py", "data/x.bin")
    }


# ----------------------------------------------------------------------------- --overwrite


def test_overwrite_deletes_only_the_runs_files_and_trains_anew(world, reference, tmp_path, capsys):
    run = Path(shutil.copytree(world["retro"], tmp_path / "run"))
    mine = add_user_files(run)
    code, _, err = cli(capsys, *args_for(world["db"], run, "--overwrite"))
    assert code == 0, err
    assert {k: v for k, v in snapshot(run).items() if k in mine} == mine
    assert "notes.txt" in err and "kept" in err  # said, not silent
    assert losses(run) == reference  # the old run's metrics are gone, the new run is clean
    assert len(list((run / "checkpoints").glob("step-*"))) == 1
    # the user's files are no run: the same command (no flag) is refused, as for any run
    code, _, err = cli(capsys, *args_for(world["db"], run))
    assert code == 2 and "already holds a run" in one_error_line(err)


def test_overwrite_of_a_folder_holding_only_a_config_keeps_the_users_files(
    world, reference, tmp_path, capsys
):
    folder = tmp_path / "mine"
    mine = add_user_files(folder)
    shutil.copy(world["retro"] / "train_config.json", folder)
    before = snapshot(folder)
    # without a flag: refused (a config beside files a run does not write), nothing touched
    code, _, err = cli(capsys, *args_for(world["db"], folder))
    assert code == 2 and "--overwrite" in one_error_line(err)
    assert snapshot(folder) == before
    code, _, err = cli(capsys, *args_for(world["db"], folder, "--overwrite"))
    assert code == 0, err
    assert {k: v for k, v in snapshot(folder).items() if k in mine} == mine
    assert losses(folder) == reference


@pytest.mark.parametrize("flag", [[], ["--overwrite"], ["--resume"]], ids=["plain", "ow", "resume"])
def test_a_folder_of_user_files_only_is_refused_and_untouched(world, tmp_path, capsys, flag):
    folder = tmp_path / "mine"
    before = add_user_files(folder)
    code, _, err = cli(capsys, *args_for(world["db"], folder, *flag))
    assert code == 2
    line = one_error_line(err)
    assert "holds no retrolm run" in line and "notes.txt" in line
    assert "already holds a run" not in line
    assert snapshot(folder) == before
    assert not (folder / LOCK_FILE).exists()


def test_overwrite_and_resume_together_are_refused(world, tmp_path, capsys):
    run = Path(shutil.copytree(world["retro"], tmp_path / "run"))
    before = snapshot(run)
    code, _, err = cli(capsys, *args_for(world["db"], run, "--overwrite", "--resume"))
    assert code == 2 and "give one of them" in one_error_line(err)
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- killed early


def half_written(run: Path, world, state: str) -> None:
    """The folder a `train` killed while writing its first files leaves."""
    run.mkdir(parents=True)
    (run / LOCK_FILE).write_text("")
    text = (world["retro"] / "train_config.json").read_text()
    config = {**json.loads(text), "max_steps": 3}
    if state == "temp":  # killed inside the atomic write: only its temporary file
        (run / "train_config.json.tmp-k1ll3d").write_text(text[:40])
    elif state == "truncated":  # a config cut short (a copy, an older writer)
        (run / "train_config.json").write_text(json.dumps(config)[:50])
    elif state == "config":  # killed between the config and run.json
        (run / "train_config.json").write_text(json.dumps(config))
    elif state == "config+run":  # killed before the first checkpoint
        (run / "train_config.json").write_text(json.dumps(config))
        shutil.copy(world["retro"] / "run.json", run)
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"st')
    elif state == "first-save":  # killed while saving the first checkpoint
        (run / "train_config.json").write_text(json.dumps(config))
        shutil.copy(world["retro"] / "run.json", run)
        (run / "checkpoints" / "step-00000003.tmp-k1ll3d" / "model").mkdir(parents=True)


STATES = ["temp", "truncated", "config", "config+run", "first-save"]


@pytest.mark.parametrize("state", STATES)
def test_a_run_killed_before_its_first_checkpoint_restarts_with_the_same_command(
    world, reference, tmp_path, capsys, state
):
    run = tmp_path / "run"
    half_written(run, world, state)
    code, _, err = cli(capsys, *args_for(world["db"], run))
    assert code == 0, err
    assert losses(run) == reference
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("state", STATES)
def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(
    world, reference, tmp_path, capsys, state
):
    run = tmp_path / "run"
    half_written(run, world, state)
    code, _, err = cli(capsys, *args_for(world["db"], run, "--resume"))
    assert code == 0, err
    assert losses(run) == reference
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


@pytest.mark.parametrize("state", STATES)
def test_resume_without_db_of_a_run_killed_early_says_to_give_db(world, tmp_path, capsys, state):
    run = tmp_path / "run"
    half_written(run, world, state)
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--no-progress")
    if state in ("config+run", "first-save"):  # run.json names the database
        assert code == 0, err
        return
    assert code == 2 and "--db" in one_error_line(err)


def test_sigkill_while_the_first_files_are_written_then_the_same_command(
    world, reference, tmp_path
):
    """A real `kill -9` at the moment the run folder gets its first file: the same command
    then trains the run, with the losses of a clean run."""
    run = tmp_path / "run"
    args = [str(a) for a in args_for(world["db"], run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrolm", "-q", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        if run.is_dir() and any(p.name != LOCK_FILE for p in run.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    proc.wait()
    flags = ["--resume"] if (run / "checkpoints").is_dir() else []  # killed late: resume
    assert cli_main([*args, *flags]) == 0
    assert losses(run) == reference


# ----------------------------------------------------------------------------- too few samples


def all_in(split: str, chunks: int = 64, m: int = 8) -> ArrayChunkSource:
    tokens = np.random.default_rng(0).integers(2, 40, (chunks, m))
    return ArrayChunkSource(
        tokens,
        np.repeat(np.arange(chunks // 8), 8),
        np.array([split] * chunks),
        np.full((chunks, 2), -1),
        pad_id=0,
    )


def test_an_empty_train_split_is_one_error_and_writes_nothing(tmp_path):
    cfg = TrainConfig(preset="tiny", max_steps=2, batch_size=4, seq_len=32)
    with pytest.raises(InputError, match="train split .* 0 chunks .*add documents"):
        train(cfg, all_in("valid"), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra,expect",
    [(["--batch-size", "4096"], "--batch-size"), (["--seq-len", "128", "--batch-size", "64"],
     "--seq-len")],
    ids=["batch", "seq-len"],
)  # fmt: skip
def test_a_train_split_smaller_than_one_batch_is_one_line(world, tmp_path, capsys, extra, expect):
    code, _, err = cli(capsys, *args_for(world["db"], tmp_path / "run", *extra))
    assert code == 2
    line = one_error_line(err)
    assert "train split" in line and "fewer than one batch" in line and expect in line
    assert not (tmp_path / "run").exists()


def test_an_empty_valid_split_is_said_and_training_goes_on(tmp_path, capsys):
    cfg = TrainConfig(preset="tiny", max_steps=2, batch_size=4, seq_len=32, eval_every=1)
    train(cfg, all_in("train"), tmp_path / "run", show_progress=False)
    err = capsys.readouterr().err
    assert "valid split" in err and "no validation loss" in err
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert all(r.get("valid_loss") is None for r in read_metrics(tmp_path / "run"))


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--seed", "-1"], "--seed must lie in"),
        (["--seed", str(2**64)], "--seed must lie in"),
        (["--seed", str(2**70)], "--seed must lie in"),
        (["--lr", "inf"], "--lr must be"),
        (["--weight-decay", "nan"], "--weight-decay must be"),
        (["--weight-decay", "inf"], "--weight-decay must be"),
        (["--clip", "nan"], "--clip must be"),
        (["--minutes", "nan"], "--minutes must be"),
        (["--minutes", "0"], "--minutes must be"),
        (["--minutes", "-1"], "--minutes must be"),
    ],
    ids=["seed-neg", "seed-2^64", "seed-2^70", "lr-inf", "wd-nan", "wd-inf", "clip-nan",
         "minutes-nan", "minutes-0", "minutes-neg"],
)  # fmt: skip
def test_bad_settings_are_one_line_before_anything_is_written(
    world, tmp_path, capsys, extra, expect
):
    code, _, err = cli(capsys, *args_for(world["db"], tmp_path / "run", *extra))
    assert code == 2 and expect in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_trains(world, tmp_path, capsys):
    code, _, err = cli(capsys, *args_for(world["db"], tmp_path / "run", "--seed", str(2**64 - 1)))
    assert code == 0, err


@pytest.mark.parametrize(
    "text,expect",
    [
        (b": [\n", "line 1"),
        (b"\xff\xfe\x00\x01", "not UTF-8"),
        (b"weight_decay: heavy\n", "weight_decay"),
        (b"min_lr_ratio: [1]\n", "min_lr_ratio"),
        (b"model: 3\n", "TrainConfig.model"),
        (b"bf16: 'yes'\n", "bf16"),
        (b"- 1\n- 2\n", "mapping"),
    ],
    ids=["yaml", "binary", "string-number", "list-number", "model-int", "bool-string", "list"],
)
def test_a_bad_config_file_is_one_line(world, tmp_path, capsys, text, expect):
    config = tmp_path / "c.yaml"
    config.write_bytes(text)
    code, _, err = cli(capsys, *args_for(world["db"], tmp_path / "run", "--config", config))
    assert code == 2 and expect in one_error_line(err)
    code, _, err = cli(capsys, *args_for(world["db"], tmp_path / "run", "--config", tmp_path))
    assert code == 2 and "is a folder" in one_error_line(err)


def test_a_config_files_numbers_in_e_notation_are_numbers(world, tmp_path, capsys):
    """YAML 1.1 reads `1e-3` as a string; a number field takes it as the number it says."""
    config = tmp_path / "c.yaml"
    config.write_text("weight_decay: 1e-2\nmin_lr_ratio: 5e-1\n")
    args = args_for(world["db"], tmp_path / "run", "--config", config)
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    stored = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert stored["weight_decay"] == 0.01 and stored["min_lr_ratio"] == 0.5


def test_train_config_checks_kinds_and_ranges():
    for bad in [
        {"seed": -1}, {"seed": 2**64}, {"seed": 1.5}, {"lr": float("inf")}, {"lr": "fast"},
        {"beta1": 1.0}, {"beta2": -0.1}, {"grad_clip": float("nan")}, {"weight_decay": None},
        {"model": [1]}, {"tensorboard": "yes"}, {"eval_every": 1.5}, {"preset": 3},
    ]:  # fmt: skip
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    assert TrainConfig(grad_clip=float("inf"), seed=2**64 - 1).seed == 2**64 - 1
    assert TrainConfig(retrofit=Path("base")).retrofit == "base"  # stored as JSON


# ----------------------------------------------------------------------------- the run folder


def test_out_is_a_file(world, tmp_path, capsys):
    out = tmp_path / "f.txt"
    out.write_text("mine")
    code, _, err = cli(capsys, *args_for(world["db"], out))
    assert code == 2 and "is a file, not a folder" in one_error_line(err)
    assert out.read_text() == "mine"


def test_resume_of_nothing_without_db_says_what_to_do(tmp_path, capsys):
    for out in (tmp_path / "none", tmp_path):
        code, _, err = cli(capsys, "train", "--out", out / "x", "--resume", "--no-progress")
        assert code == 2 and "holds no run to resume" in one_error_line(err)
    assert not (tmp_path / "none").exists()


def unfinished(world, tmp_path) -> Path:
    """A copy of the world's RETRO run as if killed after its last checkpoint."""
    run = Path(shutil.copytree(world["retro"], tmp_path / "run"))
    shutil.rmtree(run / "model")
    return run


@pytest.mark.parametrize("damage", ['{"pre', "[1, 2]", ""], ids=["cut", "list", "empty"])
def test_a_damaged_config_of_a_run_with_checkpoints_is_one_line_that_deletes_nothing(
    world, tmp_path, capsys, damage
):
    run = unfinished(world, tmp_path)
    (run / "train_config.json").write_text(damage)
    before = snapshot(run)
    for extra in ([], ["--db", world["db"]]):
        code, _, err = cli(capsys, "train", "--out", run, "--resume", "--no-progress", *extra)
        assert code == 2
        line = one_error_line(err)
        assert "train_config.json is damaged" in line and "--overwrite" in line
    assert snapshot(run) == before
    with pytest.raises(CorruptArtifactError):
        train(None, world["db"], run, resume=True, show_progress=False)


def test_a_damaged_run_json_is_rewritten_from_the_database_given(world, tmp_path, capsys):
    run = Path(shutil.copytree(world["retro"], tmp_path / "run"))
    ref = losses(run)
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # keep_checkpoints 2: step 2 is kept
    (run / "run.json").write_text('{"data')
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--no-progress")
    assert code == 2 and "--db" in one_error_line(err)
    code, _, err = cli(
        capsys, "train", "--out", run, "--resume", "--no-progress", "--db", world["db"]
    )
    assert code == 0, err
    assert "run.json is damaged" in err  # a warning, then the run goes on
    assert losses(run) == ref
    assert json.loads((run / "run.json").read_text())["database"]["num_chunks"] > 0


def test_an_unreadable_trainer_state_is_one_line(world, tmp_path, capsys):
    """A checkpoint of no recorded checksums whose trainer.pt is garbage."""
    run = unfinished(world, tmp_path)
    for ckpt in (run / "checkpoints").glob("step-*"):
        (ckpt / "trainer.pt").write_bytes(b"garbage")
        state = json.loads((ckpt / "state.json").read_text())
        state.pop("files", None)
        (ckpt / "state.json").write_text(json.dumps(state))
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--no-progress")
    assert code == 2 and "trainer.pt" in one_error_line(err)


# ----------------------------------------------------------------------------- --retrofit


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "retro", "notes"])
def test_retrofit_of_something_that_is_no_baseline_is_one_line(world, tmp_path, capsys, kind):
    ref = {
        "missing": tmp_path / "nowhere",
        "file": tmp_path / "f.txt",
        "empty": tmp_path / "empty",
        "retro": world["retro"],
        "notes": tmp_path / "notes",
    }[kind]
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    add_user_files(tmp_path / "notes")
    code, _, err = cli(capsys, *args_for(world["db"], tmp_path / "run", "--retrofit", ref))
    assert code == 2
    line = one_error_line(err)
    assert "--retrofit" in line and ("--no-retrieval" in line or "Hugging Face" in line)
    assert not (tmp_path / "run").exists()


def gpt2_folder(folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=300, n_positions=128
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_a_damaged_hugging_face_base_is_one_error(world, tmp_path, capsys):
    from retrolm.hf import retrofit_hf

    base = gpt2_folder(tmp_path / "gpt2")
    weights = base / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(CorruptArtifactError, match="truncated"):
        retrofit_hf(base, chunk_size=16)
    weights.write_bytes(intact)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "n_layer": "two"}))
    with pytest.raises(CorruptArtifactError, match="config"):
        retrofit_hf(base, chunk_size=16)
    code, _, err = cli(capsys, *args_for(world["db"], tmp_path / "run", "--retrofit", base))
    assert code == 2 and "cannot read the Hugging Face config" in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_metrics_with_damaged_lines_are_read_around_them(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe\x00junk\n[1]\n{"st')
    assert read_metrics(run) == [{"step": 1, "loss": 2.0}]
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe\x00junk\n")
    code, _, err = cli(capsys, "plot", run, "--out", tmp_path / "x.png")
    assert code == 2 and "holds no records" in one_error_line(err)
