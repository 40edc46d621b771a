"""Training: `setup -> main -> fit`, with checkpoints, exact resume and DDP.

It writes a run folder (its layout and the helpers that read it: `retrolm.runs`).

`--resume` restores model, optimizer, RNG and sampler position, so an interrupted and resumed
run computes the very same per-step losses as an uninterrupted one: bit for bit, whatever the
machine's load, given the same torch build, CPU/GPU kind and number of torch threads (float
sums are split by thread, so the count changes their last bits; a checkpoint records it and a
resume uses it again). Launched by `torchrun`
(WORLD_SIZE > 1) it trains data-parallel: gloo on CPU, nccl on GPU; every rank draws the same
global batch and keeps its share, and losses are normalised by the global number of targets, so
the result matches a single process with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from retrolm.checkpoint import (
    discard_after,
    latest_checkpoint,
    load_checkpoint_state,
    save_checkpoint,
    step_of,
)
from retrolm.config import TrainConfig
from retrolm.data import ChunkSource, ResumableSampler, RetroSamples
from retrolm.distributed import Dist
from retrolm.errors import (
    ConfigError,
    CorruptArtifactError,
    DivergedError,
    InputError,
    MismatchError,
)
from retrolm.io import atomic_open, check_writable, read_json, write_json
from retrolm.lock import folder_lock, is_lock_file
from retrolm.log import progress
from retrolm.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_DIR,
    RUN_FILE,
    check_database,
    check_model_database,
    check_same_database,
    database_facts,
    finished_model,
    is_run_artifact,
    is_run_temp,
    open_database,
    read_run_json,
    read_run_meta,
    resolve_device,
)

log = logging.getLogger(__name__)
RETROFIT_FIELDS = ("cca_layers", "enc_dim", "enc_depth", "enc_heads", "num_neighbours",
                   "cca_match", "copy_head")  # fmt: skip


def get_lr(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up, then cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress_ = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress_))


# ---------------------------------------------------------------------------------------------
# set-up


def init_distributed(device: torch.device) -> Dist:
    """Join the process group that torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def model_config(cfg: TrainConfig, facts: dict[str, Any]) -> Any:
    """The RetroConfig of a fresh run: preset, overrides, and the database's vocabulary."""
    from retrolm.config import RetroConfig
    from retrolm.hf import is_hf_model_folder, train_model_config

    if is_hf_model_folder(cfg.retrofit):  # a RetrofitConfig: the base's shape, cfg.model's
        return train_model_config(cfg.retrofit, facts, cfg.model, cfg.num_neighbours)

    overrides: dict[str, Any] = {
        "chunk_size": facts["chunk_size"],
        "neighbour_len": 2 * facts["chunk_size"],
        "pad_id": facts["pad_id"],
    }
    if facts.get("vocab_size"):
        overrides["vocab_size"] = facts["vocab_size"]
    overrides.update(cfg.model)
    if cfg.num_neighbours is not None:  # the run's k wins over a k in the model's fields
        overrides["num_neighbours"] = cfg.num_neighbours
    if cfg.no_retrieval:
        overrides["cca_layers"] = ()
    mcfg = RetroConfig.preset(cfg.preset, **overrides)
    if cfg.retrofit:
        base = RetroConfig.from_dict(read_json(finished_model(Path(cfg.retrofit)) / "config.json"))
        if base.cca_layers:
            raise ConfigError(
                f"--retrofit {cfg.retrofit} is a RETRO model with retrieval already (CCA in "
                f"layers {list(base.cca_layers)}); give a baseline trained with --no-retrieval, "
                "or a Hugging Face model folder"
            )
        if not mcfg.cca_layers:
            raise ConfigError("TrainConfig.model: retrofit needs cca_layers (the preset has none)")
        # the retrieval side (what RETRO-fitting adds) comes from this config; the decoder,
        # chunking and vocabulary from the baseline
        keep = {f: getattr(mcfg, f) for f in RETROFIT_FIELDS}
        mcfg = dataclasses.replace(base, **keep)
    return mcfg


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; decay only on weight matrices, not on norms, biases or embeddings."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach: one fused kernel per group instead of one per tensor (also on the CPU)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


@dataclass
class RunFolder:
    """What a run folder holds: a run's own files (`retrolm.runs.RUN_ARTIFACTS`) and others."""

    artifacts: list[str]  # what a run wrote (its lock file and stale temporary files aside)
    foreign: list[str]  # what a run never writes: the user's files, kept by --overwrite
    checkpoints: bool  # at least one checkpoint folder (intact or not)
    finished: bool  # the final model is there

    @property
    def state(self) -> str:
        """One of: new (no run), started (stopped before its first checkpoint: nothing done),
        unfinished (checkpoints, no final model), finished."""
        if self.finished:
            return "finished"
        if self.checkpoints:
            return "unfinished"
        return "started" if self.artifacts else "new"

    def foreign_listing(self, most: int = 5) -> str:
        names = self.foreign[:most] + (["..."] if len(self.foreign) > most else [])
        return ", ".join(names)


def inspect_run_folder(out: Path) -> RunFolder:
    """Sort the entries of the run folder `out` (which may not exist) into a run's and others."""
    artifacts, foreign = [], []
    if out.is_dir():
        for p in sorted(out.iterdir()):
            if is_lock_file(p) or is_run_temp(p):
                continue
            (artifacts if is_run_artifact(p) else foreign).append(p.name)
    return RunFolder(
        artifacts=artifacts,
        foreign=foreign,
        checkpoints=has_checkpoints(out),
        finished=(out / MODEL_DIR / "config.json").is_file(),
    )


def check_run_flags(out: Path, resume: bool, overwrite: bool) -> None:
    """Raises:
    InputError: `out` is a file. ConfigError: both `resume` and `overwrite`."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; choose another --out")
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the run in --out and --overwrite starts it over: give one of them"
        )


def prepare_run_folder(out: Path, resume: bool, overwrite: bool) -> RunFolder:
    """Refuse a folder holding another run unless resume or overwrite says what to do.

    A run stopped before its first checkpoint (killed while it wrote its first files, say) has
    done nothing: the same command starts it again, and `resume` starts it from step 0.

    Raises:
        InputError: `out` is a file; it holds a run and neither flag was given; it holds files
            but no run (nothing is ever written among a user's files, or deleted).
        ConfigError: both `resume` and `overwrite`.
    """
    check_run_flags(out, resume, overwrite)
    folder = inspect_run_folder(out)
    state = folder.state
    if state == "new":
        if folder.foreign:
            raise InputError(
                f"{out} is not empty ({folder.foreign_listing()}) and holds no retrolm run "
                f"({CONFIG_FILE} missing); choose a new or empty --out: retrolm neither writes a "
                "run among other files nor deletes them"
            )
        return folder
    if resume or overwrite:
        if folder.foreign and (overwrite or state == "started"):
            log.warning(
                "%s also holds files a run does not write (%s); they are kept",
                out,
                folder.foreign_listing(),
            )
        return folder
    if state == "started":
        if folder.foreign:
            raise InputError(
                f"{out} holds a run stopped before its first checkpoint, beside files a run does "
                f"not write ({folder.foreign_listing()}); pass --overwrite to start the run over "
                "(those files are kept), or choose another --out"
            )
        log.info("%s holds a run stopped before its first checkpoint; starting it again", out)
        return folder
    held = "a finished run" if state == "finished" else "an unfinished run"
    raise InputError(
        f"{out} already holds a run ({held}); pass --resume to continue it, --overwrite to start "
        "over (only the run's own files are deleted), or choose another --out"
    )


def stored_config(out: Path, warn: bool = True) -> dict[str, Any] | None:
    """The settings stored in the run folder `out`, or None where there are none to go by.

    A damaged `train_config.json` in a run with no checkpoint belongs to a run that did
    nothing (a kill while it was written): it counts as absent (with a warning, if `warn`).

    Raises:
        CorruptArtifactError: it is damaged, and the run has checkpoints to resume.
    """
    path = out / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return read_run_json(
            path,
            "the run's settings are lost: restore the file, or start over with --overwrite "
            "(which deletes the run's checkpoints)",
        )
    except CorruptArtifactError as e:
        if has_checkpoints(out) or (out / MODEL_DIR / "config.json").is_file():
            raise
        if warn:
            log.warning("%s; the run did nothing yet: it starts anew", str(e).split(";")[0])
        return None


def stored_run_meta(out: Path) -> dict[str, Any] | None:
    """The run.json of a run being resumed, or None where it has none (or a damaged one: it is
    written anew from the database given, with a warning)."""
    if not (out / RUN_FILE).is_file():
        return None
    try:
        return read_run_meta(out)
    except CorruptArtifactError as e:
        log.warning(
            "%s; it is written anew from the database given (which is not checked against "
            "the one the run started with)",
            str(e).split(";")[0],
        )
        return None


def check_enough_samples(data: RetroSamples, batch_size: int, facts: dict[str, Any]) -> None:
    """Refuse a train split that holds fewer samples than one batch.

    Raises:
        InputError: naming the split's size and what to change.
    """
    if len(data) >= batch_size:
        return
    where = facts.get("path") or "the database"
    m, chunks = data.source.chunk_size, len(data.chunk_ids)
    smaller = "" if data.seq_len == m else f" or --seq-len (to {m}, or another multiple of {m})"
    raise InputError(
        f"the train split of {where} holds {chunks} chunks of {m} tokens: {len(data)} samples "
        f"of {data.seq_len} tokens, fewer than one batch of {batch_size}; add documents to the "
        f"database (`retrolm db add`), or lower --batch-size{smaller}"
    )


def check_retrofit_reference(ref: str | None) -> None:
    """Refuse a `retrofit` that is neither a finished retrolm baseline run nor a Hugging Face
    model folder, naming what it is.

    Raises:
        InputError: missing, a file, or a folder of neither kind.
    """
    from retrolm.hf import is_hf_model_folder

    if ref is None or is_hf_model_folder(ref):
        return
    path = Path(ref)
    hint = (
        "give a finished baseline run (trained with --no-retrieval) or a Hugging Face model "
        "folder (config.json with a model_type), or a .gguf file"
    )
    if not path.exists():
        raise InputError(f"--retrofit {ref} does not exist; {hint}")
    if not path.is_dir():
        raise InputError(f"--retrofit {ref} is a file, not a model; {hint}")
    if not (path / RUN_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        raise InputError(f"--retrofit {ref} is neither a retrolm run nor a model folder; {hint}")


@dataclass
class Trainer:
    """The state `fit` works on, built by `setup`."""

    cfg: TrainConfig
    out: Path
    model: nn.Module  # the RETRO (unwrapped)
    ddp_model: nn.Module  # SummedLoss(model), wrapped for DDP when distributed
    optimizer: torch.optim.Optimizer
    train_data: RetroSamples
    valid_data: RetroSamples | None
    sampler: ResumableSampler
    device: torch.device
    dist: Dist
    total_steps: int
    decided: bool = False  # `minutes`: total_steps is decided (measured, or read from run.json)
    # `minutes`: each decision as [first step it applies to, total steps]; the learning rate of a
    # step follows the decision in force at that step, so that a resumed run repeats it
    decisions: list[list[int]] = field(default_factory=list)
    pad_id: int = 0
    step: int = 0
    tokens_seen: int = 0
    show_progress: bool = True
    writer: Any = None  # TensorBoard SummaryWriter or None
    data_seconds: float = 0.0  # time the last step spent building its batches


def setup(
    config: TrainConfig | None,
    db: str | Path | ChunkSource,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Trainer:
    """Open the data, build or restore model and optimizer, and prepare the run folder.

    Args:
        config: the run's settings; None to reuse the stored ones with `resume`.
        db: database folder (or an opened chunk source).
        out: run folder.
        resume: continue the run in `out` from its latest checkpoint.
        overwrite: delete the run in `out` and start over.
        show_progress: progress bar on stderr.

    Raises:
        InputError: bad run folder or database; MismatchError: resume with other settings.
    """
    from retrolm.hf import load_model_folder

    out = Path(out)
    config = resolve_retrofit_base(config)
    prepare_run_folder(out, resume, overwrite)
    check_writable(out, "run folder")
    cfg = _run_config(config, out, resume)
    source = open_database(db)
    facts = database_facts(source)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_ = init_distributed(device)
    old_meta = stored_run_meta(out) if resume else None
    _check_sources(cfg, source, out, old_meta)

    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg, facts)
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len or seq_len % mcfg.chunk_size:
        raise ConfigError(
            f"TrainConfig.seq_len ({seq_len}) must be a multiple of the chunk size "
            f"{mcfg.chunk_size} and at most max_seq_len {mcfg.max_seq_len}"
        )
    k = mcfg.num_neighbours if mcfg.cca_layers else 0
    check_model_database(mcfg, facts, k)
    train_data, valid_data = _samples(cfg, source, facts, seq_len, k)
    try:
        sampler = ResumableSampler(
            len(train_data),
            cfg.batch_size,
            seed=cfg.seed,
            rank=dist_.rank,
            world_size=dist_.world_size,
            grad_accum=cfg.grad_accum,
        )
    except ValueError as e:  # a batch that does not split over the processes
        raise ConfigError(f"TrainConfig.{e}") from e
    model = create_model(cfg, mcfg)
    ckpt = latest_checkpoint(out / "checkpoints") if resume else None
    if ckpt is not None:
        model = load_model_folder(ckpt / "model")
        freeze_for_retrofit(model, cfg)
    model.to(device)
    trainer = Trainer(
        cfg=cfg,
        out=out,
        model=model,
        ddp_model=wrap_ddp(model, device, dist_),
        optimizer=build_optimizer(model, cfg),
        train_data=train_data,
        valid_data=valid_data,
        sampler=sampler,
        device=device,
        dist=dist_,
        total_steps=cfg.total_steps(seq_len),
        pad_id=mcfg.pad_id,
        show_progress=show_progress and dist_.is_main,
    )
    if ckpt is not None:
        restore(trainer, ckpt)
    elif resume:
        log.info("no checkpoint in %s yet; starting the run from step 0", out)
    decided = old_meta.get("decided_steps") if old_meta is not None and ckpt else None
    if decided is not None:  # a --minutes run resumed: the steps its first session decided
        trainer.total_steps, trainer.decided = int(decided), True
        assert old_meta is not None
        trainer.decisions = old_meta.get("decisions") or [[0, int(decided)]]
    dist_.barrier()  # every rank has checked everything before rank 0 changes the folder
    if dist_.is_main:
        _start_run_folder(trainer, ckpt, resume, facts, mcfg, seq_len, decided)
    dist_.barrier()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "model: %.2fM parameters (%.2fM trained), %s; %d train samples of %d tokens, k=%d",
        model.num_params() / 1e6 if hasattr(model, "num_params") else n_train / 1e6,
        n_train / 1e6,
        "retrieval" if mcfg.cca_layers else "no retrieval",
        len(train_data),
        seq_len,
        k,
    )
    return trainer


def _run_config(config: TrainConfig | None, out: Path, resume: bool) -> TrainConfig:
    """The run's settings: `config`, or on `resume` the stored ones (which `config`, if given,
    must equal).

    Raises:
        MismatchError: a resume with other settings; InputError: nothing to resume, no config.
    """
    stored = stored_config(out) if resume else None
    if stored is not None:
        stored_cfg = TrainConfig.from_dict(stored)
        if config is not None and config.to_dict() != stored_cfg.to_dict():
            old = stored_cfg.to_dict()
            diff = [k for k, v in config.to_dict().items() if old[k] != v]
            raise MismatchError(
                f"{out} was started with other settings ({', '.join(diff)} differ); resume "
                "without changing them, or use --overwrite"
            )
        config = stored_cfg
    if config is None:
        raise InputError(f"{out} holds no run to resume; give a config to start one")
    return config


def _check_sources(
    cfg: TrainConfig, source: ChunkSource, out: Path, old_meta: dict[str, Any] | None
) -> None:
    """Refuse a database other than a resumed run's, and a retrofit base or baseline that does
    not read this database's tokens."""
    from retrolm.hf import check_database_tokens, is_hf_model_folder

    if old_meta is not None:
        check_database(old_meta["database"], source, str(out))
        check_same_database(old_meta["database"], source, str(out))
    check_retrofit_reference(cfg.retrofit)
    if is_hf_model_folder(cfg.retrofit):
        check_database_tokens(cfg.retrofit, source)
    elif cfg.retrofit:
        check_database(read_run_meta(cfg.retrofit)["database"], source, cfg.retrofit)


def _samples(
    cfg: TrainConfig, source: ChunkSource, facts: dict[str, Any], seq_len: int, k: int
) -> tuple[RetroSamples, RetroSamples | None]:
    """The train samples (enough for a batch, or InputError) and the valid ones (None, with a
    warning, when the valid split holds no whole sample)."""
    train_data = RetroSamples(source, "train", seq_len, k)
    valid_data = RetroSamples(source, "valid", seq_len, k)
    check_enough_samples(train_data, cfg.batch_size, facts)
    if len(valid_data) > 0:
        return train_data, valid_data
    if cfg.eval_every:
        log.warning(
            "the valid split of %s holds %d chunks, no sample of %d tokens: no validation "
            "loss is recorded; build the database with a larger --valid-fraction, or lower "
            "--seq-len",
            facts.get("path") or "the database",
            len(valid_data.chunk_ids),
            seq_len,
        )
    return train_data, None


def _start_run_folder(
    trainer: Trainer,
    ckpt: Path | None,
    resume: bool,
    facts: dict[str, Any],
    mcfg: Any,
    seq_len: int,
    decided: int | None,
) -> None:
    """On the main rank, once the run is known to start: clear the run's old files (a resumed
    run's stale temporary files only; every other file stays), drop checkpoints after the one
    resumed, and write the config, `run.json` and the metrics kept."""
    cfg, out = trainer.cfg, trainer.out
    clear_run_folder(out, temporary_only=resume)
    if ckpt is not None:
        discard_after(out / "checkpoints", trainer.step)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, cfg.to_dict())
    run_meta = {
        "database": facts,
        "model_config": mcfg.to_dict(),
        "seq_len": seq_len,
        "total_steps": trainer.total_steps,
        "world_size": trainer.dist.world_size,
        "retrofit_from": str(Path(cfg.retrofit).resolve()) if cfg.retrofit else None,
        "retrofit_base_sha256": getattr(mcfg, "base_sha256", None),  # a HF base's weights
        "retrofit_gguf": getattr(mcfg, "base_gguf", None) or None,  # the file it came from
        "retrofit_gguf_sha256": getattr(mcfg, "base_gguf_sha256", None) or None,
    }
    if decided is not None:
        run_meta["decided_steps"] = int(decided)
        run_meta["decisions"] = trainer.decisions
    write_json(out / RUN_FILE, run_meta)
    truncate_metrics(out / METRICS_FILE, trainer.step)
    trainer.writer = open_tensorboard(out) if cfg.tensorboard else None


def clear_run_folder(out: Path, temporary_only: bool = False) -> None:
    """Delete the run in `out` (for --overwrite): only what a run writes
    (`retrolm.runs.RUN_ARTIFACTS` and their temporary files; with `temporary_only`, those
    temporary files alone); the folder, its lock file and every other file stay."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if not (is_run_temp(p) if temporary_only else is_run_artifact(p)):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def create_model(cfg: TrainConfig, mcfg: Any) -> nn.Module:
    """A fresh model, or a frozen baseline with fresh retrieval parts for RETRO-fitting."""
    from retrolm.hf import RetroFitted, is_hf_model_folder
    from retrolm.model import RETRO

    if is_hf_model_folder(cfg.retrofit):
        return RetroFitted.from_config(mcfg)  # the base frozen, fresh encoder and CCA
    if cfg.retrofit:
        model = RETRO.from_baseline(finished_model(Path(cfg.retrofit)), mcfg)
        freeze_for_retrofit(model, cfg)
        return model
    return RETRO(mcfg)


def freeze_for_retrofit(model: nn.Module, cfg: TrainConfig) -> None:
    """With retrofit, train only the encoder and CCA parameters."""
    if not cfg.retrofit:
        return
    trainable = {id(p) for _, p in model.retrieval_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def wrap_ddp(model: nn.Module, device: torch.device, dist_: Dist) -> nn.Module:
    """The module a training step calls: SummedLoss(model), wrapped in DDP when distributed."""
    if not dist_.enabled:
        return SummedLoss(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(SummedLoss(model), device_ids=ids)


def restore(trainer: Trainer, ckpt: Path) -> None:
    """Load optimizer, RNG and sampler position from checkpoint `ckpt`."""
    trainer_state, state = load_checkpoint_state(ckpt)
    trainer.optimizer.load_state_dict(trainer_state["optimizer"])
    torch.set_rng_state(trainer_state["rng_cpu"])
    threads = int(trainer_state.get("num_threads") or 0)
    if threads and threads != torch.get_num_threads():
        log.info(
            "using %d torch threads, as the run did (not %d): a float sum is split by thread, so "
            "another count would change the losses in their last bits",
            threads,
            torch.get_num_threads(),
        )
        torch.set_num_threads(threads)
    if trainer.device.type == "cuda" and trainer_state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(trainer_state["rng_cuda"], trainer.device)
    try:
        trainer.sampler.load_state_dict(state["sampler"])
    except ValueError as e:  # another data set: a run.json without chunk counts gets here
        raise MismatchError(
            f"{trainer.out} cannot resume on this database ({e}): it is not the database the "
            "run started with; resume with that one (--db), or start a new run"
        ) from e
    trainer.step = int(state["step"])
    trainer.tokens_seen = int(state["tokens_seen"])
    log.info("resumed %s at step %d (%s)", trainer.out, trainer.step, ckpt.name)


def open_tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed; pip install tensorboard to get event files")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut short by a kill
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------
# the loop


class SummedLoss(nn.Module):
    """Wraps a RETRO so that its forward (the one DDP hooks) returns the summed target loss.

    Uses the model's fused output-layer + cross-entropy (`RETRO.loss`), which never builds the
    (B, n, vocab) logits.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        neighbours: torch.Tensor | None,
        bf16: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed negative log-likelihood in nats, number of non-pad targets)."""
        pad_id = self.model.cfg.pad_id
        count = (targets != pad_id).sum()
        ctx = torch.autocast(tokens.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            mean = self.model.loss(tokens, targets, neighbours)  # 0 when nothing to predict
        return mean.float() * count, count


def token_nll(
    model: nn.Module,
    tokens: torch.Tensor,
    neighbours: torch.Tensor | None,
    targets: torch.Tensor,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood (nats) of the non-pad targets, and their count."""
    loss_module = model if isinstance(model, SummedLoss) else SummedLoss(model)
    return loss_module(tokens, targets, neighbours, bf16)


def to_device(batch, device: torch.device):
    nb = batch.neighbours.to(device) if batch.neighbours is not None else None
    return batch.tokens.to(device), nb, batch.targets.to(device)


def neighbour_drop_mask(sample_ids: np.ndarray, seed: int, step: int, rate: float) -> np.ndarray:
    """(B,) bool: which samples train without neighbours at `step`.

    A function of (seed, step, sample id) alone, so the same on any number of processes or
    micro-batches, and on resume.
    """
    draws = [np.random.default_rng([seed, step, int(i)]).random() for i in sample_ids]
    return np.asarray(draws, dtype=np.float64) < rate


def train_step(trainer: Trainer) -> float:
    """One optimizer step over this rank's micro-batches; returns the global mean loss."""
    cfg, model, pad = trainer.cfg, trainer.ddp_model, trainer.pad_id
    lr = lr_now(trainer)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    indices = trainer.sampler.next_step()
    micro = [trainer.train_data.get(ix) for ix in indices]
    if cfg.neighbour_dropout > 0:
        for ix, batch in zip(indices, micro):
            if batch.neighbours is not None:  # all-pad neighbours are absent (RETRO[OFF])
                drop = neighbour_drop_mask(ix, cfg.seed, trainer.step, cfg.neighbour_dropout)
                batch.neighbours[torch.from_numpy(drop)] = pad
    trainer.data_seconds = time.perf_counter() - t0
    count = trainer.dist.sum(
        torch.tensor(sum(int((b.targets != pad).sum()) for b in micro), dtype=torch.float64)
    )
    scale = trainer.dist.world_size / max(1.0, float(count))
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(micro):
        sync = not trainer.dist.enabled or i == len(micro) - 1
        with nullcontext() if sync else model.no_sync():
            tokens, neighbours, targets = to_device(batch, trainer.device)
            nll, _ = model(tokens, targets, neighbours, cfg.bf16)
            (nll * scale).backward()
        loss_sum += nll.detach().double().cpu()
    if cfg.grad_clip > 0:
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step += 1
    trainer.tokens_seen += cfg.batch_size * trainer.train_data.seq_len
    return float(trainer.dist.sum(loss_sum)) / max(1.0, float(count))


@torch.no_grad()
def validate(trainer: Trainer) -> float | None:
    """Mean loss (nats per target token) on a fixed set of validation samples, all ranks."""
    data = trainer.valid_data
    if data is None:
        return None
    cfg = trainer.cfg
    micro = cfg.batch_size // cfg.grad_accum // trainer.dist.world_size  # samples per forward
    n = min(len(data), cfg.eval_batches * cfg.batch_size)  # the same set whatever the layout
    mine = np.arange(n)[trainer.dist.rank :: trainer.dist.world_size]
    total = torch.zeros(2, dtype=torch.float64)
    trainer.model.eval()
    for start in range(0, len(mine), micro):
        batch = data.get(mine[start : start + micro])
        tokens, neighbours, targets = to_device(batch, trainer.device)
        nll, cnt = token_nll(trainer.model, tokens, neighbours, targets, cfg.bf16)
        total += torch.stack([nll.double().cpu(), cnt.double().cpu()])
    trainer.model.train()
    total = trainer.dist.sum(total)
    return float(total[0] / total[1].clamp(min=1))


def checkpoint(trainer: Trainer) -> None:
    """Save model, optimizer, RNG and sampler position (rank 0), atomically."""
    if trainer.dist.is_main:
        trainer_state = {
            "optimizer": trainer.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            # float reductions are split by thread: resume with as many to be bit-exact
            "num_threads": torch.get_num_threads(),
            "rng_cuda": torch.cuda.get_rng_state(trainer.device)
            if trainer.device.type == "cuda"
            else None,
        }
        state = {"sampler": trainer.sampler.state_dict(), "tokens_seen": trainer.tokens_seen}
        save_checkpoint(
            trainer.out / "checkpoints",
            trainer.step,
            trainer.model,
            trainer_state,
            state,
            keep=trainer.cfg.keep_checkpoints,
        )
    trainer.dist.barrier()


def log_metrics(trainer: Trainer, record: dict[str, Any]) -> None:
    if not trainer.dist.is_main:
        return
    with open(trainer.out / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if trainer.writer is not None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                trainer.writer.add_scalar(key, value, record["step"])


def fit(trainer: Trainer) -> Iterator[dict[str, Any]]:
    """Train to `total_steps`, yielding each step's record (step, loss, lr, tokens, ...)."""
    cfg = trainer.cfg
    bar = progress(
        desc="train",
        total=trainer.total_steps,
        initial=trainer.step,
        unit="step",
        show=trainer.show_progress,
    )
    tokens_per_step = cfg.batch_size * trainer.train_data.seq_len
    t_start, steps_done = time.perf_counter(), 0
    t_calibrate = t_start  # the end of the first step of this session (timing starts there)
    upper = trainer.total_steps  # before a --minutes decision: the configured bound
    t_decided: float | None = None  # when this session decided (None: it did not, or rechecked)
    trainer.model.train()
    while trainer.step < trainer.total_steps:
        t0 = time.perf_counter()
        lr = lr_now(trainer)
        loss = train_step(trainer)
        dt = time.perf_counter() - t0
        steps_done += 1
        now = time.perf_counter()
        if steps_done == 1:
            t_calibrate = now
        elif cfg.minutes and not trainer.decided and steps_done == CALIBRATION_STEPS:
            decide_steps(trainer, t_start, (now - t_calibrate) / (steps_done - 1), upper)
            bar.total, t_decided = trainer.total_steps, now
        elif t_decided is not None and (
            steps_done == RECHECK_STEPS or trainer.step == trainer.total_steps
        ):
            since = (now - t_decided) / (steps_done - CALIBRATION_STEPS)
            decide_steps(trainer, t_start, since, upper)
            bar.total, t_decided = trainer.total_steps, None
        tok_s = tokens_per_step * steps_done / (time.perf_counter() - t_start)
        record: dict[str, Any] = {
            "step": trainer.step,
            "loss": loss,
            "lr": lr,
            "tokens": trainer.tokens_seen,
            "tokens_per_s": tok_s,
            "step_s": dt,
            "data_s": trainer.data_seconds,
        }
        if not math.isfinite(loss):
            raise diverged(trainer, loss, lr)
        last = trainer.step == trainer.total_steps
        if cfg.eval_every and (trainer.step % cfg.eval_every == 0 or last):
            record["valid_loss"] = validate(trainer)
        if trainer.step % cfg.log_every == 0 or last or "valid_loss" in record:
            log_metrics(trainer, record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if trainer.step % cfg.checkpoint_every == 0 or last:
            checkpoint(trainer)
        yield record
    bar.close()


CALIBRATION_STEPS = 8  # steps timed (after the first) before a --minutes run decides its steps
RECHECK_STEPS = 32  # a --minutes run decides again from the steps after its first decision
TIME_RESERVE = 0.03  # of a --minutes budget kept for validation, checkpoints and the final save


def decide_steps(trainer: Trainer, t_start: float, step_seconds: float, upper: int) -> None:
    """Fix a `minutes` run's total steps (at most `upper`) from the measured seconds per step,
    on every rank alike, and record them in run.json (a resumed run reads them back)."""
    cfg = trainer.cfg
    assert cfg.minutes is not None
    left = cfg.minutes * 60.0 * (1 - TIME_RESERVE) - (time.perf_counter() - t_start)
    steps = min(upper, trainer.step + max(0, int(left / max(step_seconds, 1e-9))))
    if trainer.dist.enabled:
        shared = torch.tensor([steps], dtype=torch.int64, device=trainer.device)
        dist.broadcast(shared, src=0)
        steps = int(shared.item())
    trainer.total_steps, trainer.decided = max(steps, trainer.step), True
    trainer.decisions.append([trainer.step, trainer.total_steps])
    log.info("%.2f s a step: %d steps fit the %.1f-minute budget", step_seconds, steps, cfg.minutes)
    if trainer.dist.is_main:
        meta = read_json(trainer.out / RUN_FILE)
        meta["decided_steps"] = trainer.total_steps
        meta["decisions"] = trainer.decisions
        write_json(trainer.out / RUN_FILE, meta)


def lr_now(trainer: Trainer) -> float:
    """The learning rate of the step `trainer` is at, on the schedule in force at that step."""
    bound = trainer.cfg.total_steps(trainer.train_data.seq_len)
    total = steps_in_force(trainer.decisions, trainer.step, bound)
    return get_lr(trainer.step, trainer.cfg, total)


def steps_in_force(decisions: list[list[int]], step: int, bound: int) -> int:
    """The total steps the learning-rate schedule of step `step` (0-based) follows: the last
    decision made at or before it, else the configured bound."""
    total = bound
    for first, steps in decisions:
        if first <= step:
            total = steps
    return total


def diverged(trainer: Trainer, loss: float, lr: float) -> DivergedError:
    """The error of a run whose loss became non-finite (nothing of that step was saved)."""
    saved = latest_checkpoint(trainer.out / "checkpoints") if trainer.dist.is_main else None
    kept = (
        f"the checkpoint {saved.name} (from before the divergence) is kept; start over with "
        "--overwrite"
        if saved is not None
        else "no checkpoint was written, so the run is not kept: rerun with a lower --lr"
    )
    return DivergedError(
        f"training diverged: the loss is {loss} at step {trainer.step} (learning rate {lr:.3g}); "
        f"lower --lr (or raise --warmup, or keep --clip on); {kept}"
    )


def finish(trainer: Trainer) -> Path:
    """Write the final model folder (atomically) and close the run."""
    from retrolm.io import atomic_dir, write_guard

    final = trainer.out / MODEL_DIR
    if trainer.dist.is_main:
        with atomic_dir(final) as tmp, write_guard(final):
            trainer.model.save(tmp)
        if trainer.writer is not None:
            trainer.writer.close()
    trainer.dist.barrier()
    return final


def main(trainer: Trainer) -> Path:
    """Run `fit` to the end and write the final model; returns the run folder."""
    for _ in fit(trainer):
        pass
    finish(trainer)
    log.info("finished %s: %d steps, %d tokens", trainer.out, trainer.step, trainer.tokens_seen)
    return trainer.out


def train(
    config: TrainConfig | None,
    db: str | Path | ChunkSource,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Train a RETRO model (or the no-retrieval baseline, or a RETRO-fit) on a database.

    Args:
        config: settings (None: the stored ones, with `resume`).
        db: database folder.
        out: run folder (created; refused if it holds another run, see `resume`/`overwrite`).
        resume: continue from the latest checkpoint (a finished run is returned as is).
        overwrite: delete the run in `out` and start over.
        show_progress: progress bar on stderr.

    Returns:
        The run folder; its `model/` holds the final model.

    Raises:
        InputError, MismatchError, ConfigError: bad folder, database or settings (checked
            before anything is written or, with `overwrite`, deleted).
        LockedError: another process trains into `out`.
        DivergedError: the loss became non-finite (the last checkpoint is kept).
    """
    out = Path(out)
    config = resolve_retrofit_base(config)
    check_run_flags(out, resume, overwrite)
    if resume and (out / MODEL_DIR / "config.json").is_file():
        stored = stored_config(out)
        if config is None or config.to_dict() == stored:
            log.info("%s is already finished; nothing to resume", out)
            return out
    folder = inspect_run_folder(out)
    if folder.state == "new" and folder.foreign:  # refused before a lock file is put among them
        prepare_run_folder(out, resume, overwrite)
    fresh = folder.state == "new"
    with folder_lock(out, "run folder"):
        trainer = None
        try:
            trainer = setup(
                config, db, out, resume=resume, overwrite=overwrite, show_progress=show_progress
            )
            return main(trainer)
        except Exception:
            # A run that failed before its first checkpoint leaves no run's files that would
            # refuse the corrected command (Ctrl-C is not an Exception: what it leaves is
            # started again, or resumed). A setup that failed changed nothing in a folder that
            # held a run.
            started = fresh or trainer is not None
            if started and int(os.environ.get("RANK", "0")) == 0 and not has_checkpoints(out):
                clear_run_folder(out)
            raise


def resolve_retrofit_base(config: TrainConfig | None) -> TrainConfig | None:
    """`config` with a `retrofit` GGUF file or packaged name (`smollm2`) replaced by its
    converted Hugging Face folder (`retrolm.hf.resolve`), as the run records it."""
    from retrolm.hf.resolve import resolve_reference

    if config is None or not config.retrofit:
        return config
    return dataclasses.replace(config, retrofit=resolve_reference(config.retrofit))


def has_checkpoints(out: Path) -> bool:
    """At least one checkpoint folder (a save killed midway leaves only a temporary one)."""
    folder = out / "checkpoints"
    return folder.is_dir() and any(p.is_dir() and step_of(p) is not None for p in folder.iterdir())
