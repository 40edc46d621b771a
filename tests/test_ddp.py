"""Data-parallel training (2 CPU processes, gloo) matches one process with the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retrolm.model import RETRO
from retrolm.runs import read_metrics
from retrolm.train import main, setup, train
from tests.test_train import make_source, tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        trainer = setup(ddp_config(), make_source(), Path(out) / "run", show_progress=False)
        main(trainer)
        torch.save(trainer.model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ddp_config(**kw):
    return tiny_config(max_steps=4, batch_size=4, checkpoint_every=2, eval_every=2, **kw)


def test_two_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # in sync

    single = train(ddp_config(), make_source(), tmp_path / "single", show_progress=False)
    accum = train(ddp_config(grad_accum=2), make_source(), tmp_path / "accum", show_progress=False)
    ddp = read_metrics(tmp_path / "run")
    for other in (read_metrics(single), read_metrics(accum)):
        assert [r["step"] for r in ddp] == [r["step"] for r in other]
        for a, b in zip(ddp, other):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            if "valid_loss" in b:
                assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-5)
    saved = RETRO.load(tmp_path / "run" / "model").state_dict()
    ref = RETRO.load(single / "model").state_dict()
    for k in ref:
        torch.testing.assert_close(saved[k], ref[k], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)
