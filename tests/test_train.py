"""Training: schedule, optimizer groups, checkpoints, exact resume, run folders, retrofit."""

from __future__ import annotations

import math
import shutil
import time

import numpy as np
import pytest
import torch

from retrolm.checkpoint import latest_checkpoint, load_checkpoint_state
from retrolm.data import ArrayChunkSource
from retrolm.errors import InputError, MismatchError
from retrolm.io import read_json
from retrolm.model import RETRO
from retrolm.runs import read_metrics
from retrolm.train import (
    TrainConfig,
    build_optimizer,
    fit,
    get_lr,
    main,
    neighbour_drop_mask,
    setup,
    train,
)


def make_source(seed: int = 0, num_docs: int = 30, m: int = 8) -> ArrayChunkSource:
    """Random documents of 2-9 chunks of the tiny preset's chunk size, 4 stored neighbours."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 10, num_docs)
    chunk_doc = np.repeat(np.arange(num_docs), sizes)
    n = len(chunk_doc)
    tokens = rng.integers(2, 40, (n, m))  # a small alphabet: learnable in a few steps
    split = np.where(chunk_doc % 10 == 3, "valid", "train")
    train_ids = np.flatnonzero(split == "train")
    stored = np.stack([rng.choice(train_ids, 4, replace=False) for _ in range(n)])
    stored = np.where(chunk_doc[stored] == chunk_doc[:, None], -1, stored)
    return ArrayChunkSource(tokens, chunk_doc, split, stored, pad_id=0)


def tiny_config(**kw) -> TrainConfig:
    base = dict(
        preset="tiny",
        max_steps=6,
        batch_size=4,
        seq_len=32,
        checkpoint_every=2,
        eval_every=3,
        eval_batches=1,
        warmup_steps=2,
        lr=3e-3,
    )
    return TrainConfig(**{**base, **kw})


def losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run)]


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=110)
    assert get_lr(0, cfg, 110) == pytest.approx(0.1)
    assert get_lr(9, cfg, 110) == pytest.approx(1.0)
    assert get_lr(10, cfg, 110) == pytest.approx(1.0)
    assert get_lr(60, cfg, 110) == pytest.approx(0.55)
    assert get_lr(110, cfg, 110) == pytest.approx(0.1)
    lrs = [get_lr(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_config_validation_and_tokens():
    with pytest.raises(ValueError, match="max_steps / max_tokens"):
        TrainConfig(max_steps=1, max_tokens=10)
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    assert TrainConfig(max_tokens=1000, batch_size=4).total_steps(64) == math.ceil(1000 / 256)
    cfg = tiny_config(model={"dec_depth": 2, "cca_layers": [2]})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_the_runs_num_neighbours_wins_over_the_models_fields():
    """`num_neighbours` is the run's k; a k among the model's fields (a preset's full field
    list, as the quickstart and the benchmarks pass) must not silently override it."""
    from retrolm.config import preset_fields
    from retrolm.train import model_config

    facts = {"chunk_size": 16, "pad_id": 0, "vocab_size": 300}
    fields = preset_fields("tiny") | {"num_neighbours": 2}
    assert model_config(TrainConfig(preset="tiny", model=fields), facts).num_neighbours == 2
    cfg = TrainConfig(preset="tiny", model=fields, num_neighbours=4)
    assert model_config(cfg, facts).num_neighbours == 4


def test_optimizer_does_not_decay_norms_biases_embeddings():
    from retrolm.config import RetroConfig

    model = RETRO(RetroConfig.preset("tiny"))
    opt = build_optimizer(model, tiny_config(weight_decay=0.1))
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0
    assert id(model.tok_emb.weight) in no_decay
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            assert id(p) in no_decay, name
        elif p.ndim == 2 and "emb" not in name:
            assert id(p) in decay, name
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"neighbour_dropout": 0.5, "model": {"cca_match": 2}},
        {"model": {"cca_match": 2, "copy_head": True}},
    ],
    ids=["plain", "dropout+match", "copy"],
)
def test_resume_gives_the_same_per_step_losses(tmp_path, extra):
    src = make_source()
    cfg = tiny_config(max_steps=7, checkpoint_every=2, **extra)
    train(cfg, src, tmp_path / "ref", show_progress=False)
    ref = losses(tmp_path / "ref")
    assert len(ref) == 7 and ref[-1] < ref[0]

    # interrupted after step 5: the latest checkpoint is step 4, step 5 is done again
    trainer = setup(cfg, src, tmp_path / "cut", show_progress=False)
    for record in fit(trainer):
        if record["step"] == 5:
            break
    del trainer
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-00000004"
    train(None, src, tmp_path / "cut", resume=True, show_progress=False)
    assert losses(tmp_path / "cut") == ref  # bit-identical, step by step
    a = RETRO.load(tmp_path / "ref" / "model").state_dict()
    b = RETRO.load(tmp_path / "cut" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == list(range(1, 8))
    # resuming a finished run does nothing
    train(None, src, tmp_path / "cut", resume=True, show_progress=False)
    assert losses(tmp_path / "cut") == ref


def test_neighbour_drop_mask_is_per_sample_whatever_the_layout():
    ids = np.arange(4000)
    mask = neighbour_drop_mask(ids, seed=0, step=3, rate=0.25)
    assert 0.22 < mask.mean() < 0.28
    split = np.empty_like(mask)  # four processes (or micro-batches) drawing their own samples
    for rank in range(4):
        split[ids[rank::4]] = neighbour_drop_mask(ids[rank::4], seed=0, step=3, rate=0.25)
    assert np.array_equal(split, mask)
    assert not np.array_equal(neighbour_drop_mask(ids, seed=0, step=4, rate=0.25), mask)
    assert not neighbour_drop_mask(ids, seed=0, step=3, rate=0.0).any()


def test_full_neighbour_dropout_trains_as_without_neighbours(tmp_path):
    src = make_source()
    absent = ArrayChunkSource(
        src.tokens,
        src.chunk_doc,
        src.chunk_split,
        np.full_like(src.stored_neighbours, -1),
        pad_id=0,
    )
    train(tiny_config(neighbour_dropout=1.0), src, tmp_path / "dropped", show_progress=False)
    train(tiny_config(), absent, tmp_path / "absent", show_progress=False)
    train(tiny_config(), src, tmp_path / "read", show_progress=False)
    assert losses(tmp_path / "dropped") == losses(tmp_path / "absent")
    assert losses(tmp_path / "read") != losses(tmp_path / "absent")


def test_kill_during_checkpoint_save_keeps_the_latest_readable(tmp_path, monkeypatch):
    src = make_source()
    cfg = tiny_config(max_steps=4, checkpoint_every=2)
    trainer = setup(cfg, src, tmp_path / "run", show_progress=False)
    gen = fit(trainer)
    next(gen), next(gen)  # step 2 checkpointed
    import retrolm.checkpoint as ckpt_mod

    def dying_save(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while writing step 4

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        next(gen), next(gen)
    folder = tmp_path / "run" / "checkpoints"
    latest = latest_checkpoint(folder)
    assert latest.name == "step-00000002"
    assert not (folder / "step-00000004").exists()
    monkeypatch.undo()
    trainer_state, state = load_checkpoint_state(latest)
    assert state["step"] == 2 and "optimizer" in trainer_state
    RETRO.load(latest / "model")
    train(None, src, tmp_path / "run", resume=True, show_progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_run_folder_rules(tmp_path):
    src = make_source()
    cfg = tiny_config(max_steps=2)
    run = train(cfg, src, tmp_path / "run", show_progress=False)
    assert (run / "train_config.json").is_file() and (run / "model" / "config.json").is_file()
    with pytest.raises(InputError, match="already holds a run"):
        train(cfg, src, run, show_progress=False)
    with pytest.raises(MismatchError, match="lr"):
        train(tiny_config(max_steps=2, lr=1e-2), src, run, resume=True, show_progress=False)
    train(tiny_config(max_steps=3), src, run, overwrite=True, show_progress=False)
    assert len(losses(run)) == 3
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds no retrolm run"):
        train(cfg, src, other, overwrite=True, show_progress=False)
    assert (other / "mine.txt").read_text() == "keep me"


def test_baseline_and_retrofit(tmp_path):
    src = make_source()
    base = train(
        tiny_config(max_steps=3, no_retrieval=True), src, tmp_path / "base", show_progress=False
    )
    baseline = RETRO.load(base / "model")
    assert baseline.encoder is None and not baseline.cfg.cca_layers
    trainer = setup(
        tiny_config(max_steps=3, retrofit=str(base)), src, tmp_path / "fit", show_progress=False
    )
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trained = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trained == {id(p) for _, p in trainer.model.retrieval_parameters()}
    fitted = main(trainer)
    model = RETRO.load(fitted / "model")
    assert model.cfg.cca_layers and model.encoder is not None
    before = baseline.state_dict()
    retrieval = {name for name, _ in model.retrieval_parameters()}
    after = model.state_dict()
    for name, value in before.items():  # the frozen decoder is untouched
        assert name not in retrieval and torch.equal(after[name], value), name
    changed = [n for n in retrieval if not torch.equal(after[n], initial[n])]
    assert len(changed) > len(retrieval) // 2  # the retrieval parts were trained

    # the retrieval side of the config is the retrofit's own: match bonus and copy head too
    fit = tiny_config(max_steps=1, retrofit=str(base), model={"cca_match": 3, "copy_head": True})
    model = RETRO.load(train(fit, src, tmp_path / "copy", show_progress=False) / "model")
    assert model.cfg.copy_head and model.cfg.cca_match == 3 and model.copy is not None
    assert model.cfg.dec_dim == baseline.cfg.dec_dim


def test_bf16_and_grad_accum_run(tmp_path):
    src = make_source()
    run = train(
        tiny_config(max_steps=2, bf16=True, grad_accum=2), src, tmp_path / "r", show_progress=False
    )
    assert all(math.isfinite(x) for x in losses(run))


def _run_cli(args: list[str]):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "retrolm", "-q", *args])


def _wait_for(predicate, proc, timeout: float = 120.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_sigkill_during_training_and_saving_then_resume_gives_the_same_losses(tmp_path):
    """`retrolm train` killed (SIGKILL) mid-step and mid-save, resumed each time: same losses."""
    from tests.test_evaluate import build_world

    world = build_world(tmp_path / "world")
    args = ["train", "--db", str(world["db"]), "--preset", "tiny", "--steps", "24"]
    args += ["--batch-size", "4", "--seq-len", "64", "--checkpoint-every", "3", "--no-progress"]
    args += ["--eval-every", "6"]
    assert _run_cli([*args, "--out", str(tmp_path / "ref")]).wait() == 0
    run = tmp_path / "cut"
    ckpts = run / "checkpoints"

    def saving() -> bool:  # a checkpoint folder is being written
        return ckpts.is_dir() and any(".tmp-" in p.name for p in ckpts.iterdir())

    def past(step: int):
        return lambda: (ckpts / "latest.json").is_file() and read_metrics(run)[-1]["step"] > step

    kills = 0
    for when in (past(4), saving, past(13), saving):
        proc = _run_cli([*args, "--out", str(run), "--resume"])
        if _wait_for(when, proc):
            proc.kill()
            kills += 1
        proc.wait()
        assert latest_checkpoint(ckpts) is None or RETRO.load(latest_checkpoint(ckpts) / "model")
    assert kills >= 2
    assert _run_cli([*args, "--out", str(run), "--resume"]).wait() == 0
    ref, got = losses(tmp_path / "ref"), losses(run)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 25))
    assert got == ref, [(i, a, b) for i, (a, b) in enumerate(zip(got, ref)) if a != b]


def test_a_minutes_budget_decides_again_when_only_the_first_steps_were_slow(tmp_path, monkeypatch):
    """A load that slows the first steps (another job starting) must not cut the run short:
    the steps after the first decision decide again."""
    import retrolm.train as train_module

    real_step = train_module.train_step
    calls = {"n": 0}

    def step(trainer):  # the first 8 steps 0.2 s each, then fast
        calls["n"] += 1
        time.sleep(0.2 if calls["n"] <= 8 else 0.01)
        return real_step(trainer)

    monkeypatch.setattr(train_module, "train_step", step)
    cfg = tiny_config(max_steps=400, minutes=0.05, checkpoint_every=1000)
    start = time.perf_counter()
    train(cfg, make_source(), tmp_path / "run", show_progress=False)
    took = time.perf_counter() - start
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    decided = read_json(tmp_path / "run" / "run.json")["decided_steps"]
    # the first decision (0.2 s a step, 1.6 s of 3 spent) allows about 14 steps; the second,
    # from the fast steps, many more, still within the budget
    assert steps[-1] == decided > 20
    assert took < 3.0 * 1.5


def test_a_minutes_budget_decides_the_steps_once_and_a_resume_keeps_them(tmp_path, monkeypatch):
    import retrolm.train as train_module

    real_step = train_module.train_step
    pause = {"s": 0.05, "calls": 0}

    def slow_step(trainer):  # steps of known length, faster after the first decision
        pause["calls"] += 1
        time.sleep(pause["s"] if pause["calls"] <= 9 else pause["s"] / 2)
        return real_step(trainer)

    monkeypatch.setattr(train_module, "train_step", slow_step)
    src = make_source()
    cfg = tiny_config(max_steps=400, minutes=0.03, checkpoint_every=10, keep_checkpoints=50)
    train(cfg, src, tmp_path / "run", show_progress=False)
    meta = read_json(tmp_path / "run" / "run.json")
    decided = meta["decided_steps"]
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    # 1.8 s of steps of at least 0.025 s: at most 72; the second decision, from the faster
    # steps, gave more steps than the first, so the schedule changed mid-run
    assert 10 <= decided <= 72 and steps[-1] == decided
    (first, n1), (second, n2) = meta["decisions"]
    assert first == 8 and second > 10 and n2 > n1
    ref = losses(tmp_path / "run")
    # killed after step 12: the resumed run trains the decided steps, not a new decision, and
    # each step at the learning rate it had (the first decision's until the second)
    shutil.rmtree(tmp_path / "run" / "model")
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > 10:
            shutil.rmtree(ckpt)
    pause["s"] = 0.0  # a new decision would now choose the upper bound
    train(None, src, tmp_path / "run", resume=True, show_progress=False)
    assert read_json(tmp_path / "run" / "run.json")["decided_steps"] == decided
    assert losses(tmp_path / "run") == ref
