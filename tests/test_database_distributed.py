"""The database build over torch.distributed ranks: any number of ranks gives the same database,
a killed launch resumes, two builds into one folder are kept apart; parallel index adds and
on-disk inverted lists equal a serial in-memory index; `--embed-dtype auto`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from retrolm.database import (
    Database,
    build_database,
    chunk_stage,
    embed_stage,
    index_stage,
    neighbours_stage,
)
from retrolm.database import build as build_module
from retrolm.database import distributed as db_distributed
from retrolm.database import index as ix
from retrolm.database.distributed import build_lock, node_threads
from retrolm.database.embed import (
    DTYPE_CACHE_FILE,
    choose_dtype,
    load_embedder,
    make_tiny_bert,
    measure_dtypes,
)
from retrolm.database.manifest import load_manifest
from retrolm.database.ondisk import choose_layout, is_ondisk, merge_blocks_ondisk
from retrolm.distributed import Dist, blocks_for_rank
from retrolm.errors import CorruptArtifactError, UserError
from tests.test_database import arrays, make_corpus, tiny_config
from tests.test_database_resume import environment, read_manifest

FLAGS = [
    "--vocab-size", "300", "--chunk-size", "16", "--block-rows", "25", "--neighbours", "4",
    "--valid-fraction", "0.2", "--embed-batch-size", "64", "--index", "IVF4,Flat", "--no-progress",
]  # fmt: skip


def command(corpus: Path, out: Path, bert: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "retrolm", "-q", "db", "build", str(corpus), "--out", str(out),
        *FLAGS, "--embedder", f"bert-mean:{bert}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A corpus, a tiny BERT and the database one process builds from them (one thread, like
    the ranks, so that the float reductions are the same)."""
    root = tmp_path_factory.mktemp("dist")
    bert = make_tiny_bert(root / "bert")
    corpus = make_corpus(root / "corpus", 25, seed=3)
    reference = root / "reference"
    single_threaded_build(corpus, reference, bert)
    return root, bert, corpus, reference


def assert_same_database(folder: Path, reference: Path) -> None:
    got, want = arrays(folder), arrays(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        if name.startswith("embeddings/"):  # equal up to float rounding
            np.testing.assert_allclose(
                np.load(folder / name), np.load(reference / name), rtol=1e-3, atol=1e-3
            )
        else:  # chunk tokens, chunk -> document map, documents table, neighbour ids and dists
            assert got[name] == want[name], name
    a = Database.open(folder).manifest.index
    b = Database.open(reference).manifest.index
    assert (a.factory, a.ntotal, a.search_params) == (b.factory, b.ntotal, b.search_params)
    assert (folder / a.file).read_bytes() == (reference / b.file).read_bytes()
    assert not list(folder.rglob("*.tmp-*")) and not (folder / "records").exists()
    assert not list((folder / "index").glob("codes-*")) and not list(
        (folder / "index").glob("trained-*")
    )


class Killed(BaseException):
    """Stands for a SIGKILL at one point of a build."""


def single_threaded_build(corpus: Path, out: Path, bert: Path) -> None:
    """`build_database` in one process with one thread (as each rank runs, so that the float
    reductions are the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = tiny_config(bert, block_rows=25, index="IVF4,Flat")
        build_database([corpus], out, config, show_progress=False, dist=Dist())
    finally:
        torch.set_num_threads(before)


def test_a_kill_after_rank_records_are_merged_loses_no_embedder(inputs, tmp_path, monkeypatch):
    """Ranks' embedding records name the embedder; once the main rank deletes them, the manifest
    on disk must already hold it, or the database would be finished without one."""
    root, bert, corpus, reference = inputs
    folder = tmp_path / "db"
    config = tiny_config(bert, block_rows=25, index="IVF4,Flat")
    chunk_stage([corpus], folder, config, show_progress=False, dist=Dist())
    ref = load_manifest(reference).embeddings
    (folder / "embeddings").mkdir()
    embedder = {"spec": ref.spec, "dim": ref.dim, "metric": ref.metric}
    for block_id, written in ref.blocks.items():  # what two ranks leave behind
        shutil.copy(reference / written.file, folder / written.file)
        db_distributed.write_record(
            folder, "embeddings", block_id, {**written.to_json(), "embedder": embedder}
        )
    clear = db_distributed.clear_records

    def clear_then_die(*args):
        clear(*args)
        raise Killed

    monkeypatch.setattr(db_distributed, "clear_records", clear_then_die)
    with pytest.raises(Killed):
        build_module._merge_embedding_records(folder, load_manifest(folder))
    on_disk = load_manifest(folder).embeddings
    assert sorted(on_disk.blocks) == sorted(ref.blocks)
    assert (on_disk.spec, on_disk.dim, on_disk.metric) == (ref.spec, ref.dim, ref.metric)
    monkeypatch.undo()
    single_threaded_build(corpus, folder, bert)  # the rerun finishes the same database
    assert_same_database(folder, reference)


def test_a_block_no_rank_recorded_keeps_its_stage_unfinished(inputs, tmp_path, monkeypatch):
    root, bert, corpus, reference = inputs
    folder = tmp_path / "db"
    finish = build_module._finish_block

    def lose_block_1(folder, manifest, stage, block_id, *args, **kw):
        if not (stage == "neighbours" and block_id == 1):
            finish(folder, manifest, stage, block_id, *args, **kw)

    monkeypatch.setattr(build_module, "_finish_block", lose_block_1)
    with pytest.raises(CorruptArtifactError, match=r"neighbours blocks \[1\] were not recorded"):
        single_threaded_build(corpus, folder, bert)
    assert not load_manifest(folder).is_done("neighbours")
    monkeypatch.undo()
    single_threaded_build(corpus, folder, bert)
    assert_same_database(folder, reference)


def test_blocks_for_rank_splits_the_blocks_by_number():
    for world in (1, 2, 3, 8):
        shares = [list(blocks_for_rank(10, r, world)) for r in range(world)]
        assert sorted(sum(shares, [])) == list(range(10))  # every block once
        assert all(b % world == r for r, share in enumerate(shares) for b in share)
    with pytest.raises(ValueError):
        blocks_for_rank(10, 2, 2)


def test_two_gloo_ranks_build_the_same_database_as_one_process(inputs):
    root, bert, corpus, reference = inputs
    out = root / "two"
    done = subprocess.run(
        command(corpus, out, bert, "--workers", "2"),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)  # printed once, by the main rank
    assert len(read_manifest(out)["chunks"]["blocks"]) >= 4  # both ranks had blocks
    assert_same_database(out, reference)


def test_a_second_build_into_the_same_folder_is_refused(inputs, tmp_path):
    root, bert, corpus, reference = inputs
    out = tmp_path / "db"
    with build_lock(out, Dist()):  # a build in progress (this process holds the lock)
        refused = subprocess.run(
            command(corpus, out, bert), env=environment(), capture_output=True, text=True
        )
        assert refused.returncode == 2
        assert refused.stderr.count("\n") == 1 and "is in use by another retrolm process" in (
            refused.stderr
        )
        assert f"pid {os.getpid()}" in refused.stderr  # it names the holder
        # nothing written but the one lock file (every writer of a folder takes the same lock)
        assert sorted(p.name for p in out.iterdir()) == [".retrolm.lock"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the lock went with its holder, and the refused build left nothing in the way
        config = tiny_config(bert, block_rows=25, index="IVF4,Flat")
        build_database([corpus], out, config, show_progress=False, dist=Dist())
    finally:
        torch.set_num_threads(before)
    assert_same_database(out, reference)


@pytest.mark.slow
def test_the_lock_dies_with_a_killed_build(inputs, tmp_path):
    root, bert, corpus, reference = inputs
    out = tmp_path / "db"
    first = subprocess.Popen(command(corpus, out, bert), env=environment(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while read_manifest(out) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        second = subprocess.run(
            command(corpus, out, bert), env=environment(), capture_output=True, text=True
        )
        if first.poll() is None:  # (the first build may finish first on a fast machine)
            assert second.returncode == 2 and "in use by another retrolm process" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = subprocess.run(command(corpus, out, bert), env=environment(), capture_output=True)
    assert done.returncode == 0
    assert_same_database(out, reference)


def test_a_lock_held_by_another_process_is_refused_by_build_lock(tmp_path):
    """build_lock is the folder lock every writer takes: held by another process (here a
    `folder_lock` in a child), a build is refused with the holder named, and it is free again
    once that process has gone."""
    folder = tmp_path / "db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from retrolm.lock import folder_lock\n"
         "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(folder)],
        stdout=subprocess.PIPE, text=True, env=environment(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(UserError, match=f"in use by another retrolm process .pid {holder.pid}"),
            build_lock(folder, Dist()),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with build_lock(folder, Dist()):
        assert (folder / ".retrolm.lock").is_file()
    assert list(folder.iterdir()) == []  # the killed holder's lock file went with the last writer


# ----------------------------------------------------------------------------- index


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, d)).astype(np.float32)
    return centres[rng.integers(0, 32, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("factory", ["IVF32,Flat", "OPQ4_16,IVF32,PQ4"])
def test_lists_sized_before_adding_give_the_same_index(factory):
    """`reserve_lists` (what `_add_codes` does with the cells the encoding kept) only makes
    room: the index equals one added without it, also when the lists already hold entries
    (`db add`)."""
    x = clustered(6000, 16, seed=0)
    plain = ix.build_index(factory, 16, "l2", x[:3000], seed=0)
    sized = ix.build_index(factory, 16, "l2", x[:3000], seed=0)
    blocks = [
        (x[s : s + 1000], np.arange(s, s + 1000, dtype=np.int64)) for s in range(0, 6000, 1000)
    ]
    for vectors, ids in blocks:
        ix.add_encoded(plain, ix.encode_block(plain, vectors), ids)
    for part in (blocks[:2], blocks[2:]):  # the first part fills lists the second adds to
        cells = np.concatenate([ix.encode_with_cells(sized, v, 1)[1][1][:, 0] for v, _ in part])
        assert ix.reserve_lists(sized, np.bincount(cells, minlength=32))
        for vectors, ids in part:
            ix.add_encoded(sized, ix.encode_block(sized, vectors), ids)
    assert faiss.serialize_index(sized).tobytes() == faiss.serialize_index(plain).tobytes()
    assert not ix.reserve_lists(sized, np.ones(31, np.int64))  # not one count per list
    assert not ix.reserve_lists(ix.build_index("Flat", 16, "l2", None), np.ones(32, np.int64))


@pytest.mark.parametrize(
    "factory", ["Flat", "IVF32,Flat", "OPQ4_16,IVF32,PQ4", "HNSW8", "IVF32_HNSW8,SQ8"]
)
def test_encoded_blocks_added_in_order_equal_a_serial_add(factory):
    x = clustered(6000, 16, seed=0)
    serial = ix.build_index(factory, 16, "l2", x[:3000], seed=0)
    coded = ix.build_index(factory, 16, "l2", x[:3000], seed=0)
    encoder = faiss.deserialize_index(faiss.serialize_index(coded))  # as a rank loads it
    for start in range(0, 6000, 1000):
        ids = np.arange(start, start + 1000, dtype=np.int64) * 3  # global ids, not positions
        ix.add_vectors(serial, x[start : start + 1000], ids)
        ix.add_encoded(coded, ix.encode_block(encoder, x[start : start + 1000]), ids)
    assert coded.ntotal == serial.ntotal == 6000
    assert faiss.serialize_index(coded).tobytes() == faiss.serialize_index(serial).tobytes()
    if factory == "Flat":  # exact search is still brute force
        d, i = ix.search(coded, x[:50], 5)
        true = np.argsort(((x[:50, None] - x[None]) ** 2).sum(-1), axis=1)[:, :5] * 3
        assert (i == true).mean() > 0.99


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,PQ4"])
def test_search_params_are_the_cheapest_reaching_the_target_recall(factory, monkeypatch):
    monkeypatch.setattr(ix, "TUNE_MIN_VECTORS", 1000)
    x = clustered(4000, 16, seed=2)
    index = ix.build_index(factory, 16, "l2", x, seed=0)
    ix.add_vectors(index, x, np.arange(4000))
    queries = x[::20]
    true = ix.exact_search_blocks(queries, [(x, np.arange(4000))], 10, "l2")[1]
    params, recall = ix.choose_search_params(index, factory, queries, [(x, np.arange(4000))])
    default = ix.default_search_params(factory, 4000)["nprobe"]
    assert index.nprobe == params["nprobe"] <= default
    reached = {}  # the powers of two the tuning tries: to the target, the default or a flat step
    for nprobe in (1, 2, 4, 8, 16, 32, 64):
        if nprobe <= default:
            index.nprobe = nprobe
            reached[nprobe] = ix.recall_at_k(ix.search(index, queries, 10)[1], true)
            gains = np.diff(list(reached.values()))
            if reached[nprobe] >= ix.TUNE_TARGET_RECALL or (gains[-1:] < ix.TUNE_MIN_GAIN).any():
                break
    assert recall == reached[params["nprobe"]]
    goal = min(ix.TUNE_TARGET_RECALL, max(reached.values()) - ix.TUNE_PLATEAU)
    assert recall >= goal and all(r < goal for p, r in reached.items() if p < params["nprobe"])


def test_neighbours_search_with_the_cells_the_encoding_kept(inputs, tmp_path, monkeypatch):
    """The encode stage keeps each chunk's nearest IVF cells; the neighbour stage searches the
    same chunks with them instead of finding them again, with the very neighbours a fresh
    search finds, and deletes them when it ends."""
    root, bert, corpus, reference = inputs
    config = tiny_config(bert, block_rows=25, index="IVF64,Flat")  # probes 16 of 64 cells
    out = chunk_stage([corpus], tmp_path / "db", config, show_progress=False)
    embed_stage(out, show_progress=False)
    reserved = []  # the add sizes the lists from the kept cells first
    reserve = ix.reserve_lists
    monkeypatch.setattr(
        ix, "reserve_lists", lambda index, n: reserved.append(int(n.sum())) or reserve(index, n)
    )
    index_stage(out, show_progress=False)
    kept = read_manifest(out)["index"]["encoded_cells"]
    assert kept and all((out / e["cells_file"]).is_file() for e in kept.values())
    indexed = sum(e["rows"] for e in kept.values())
    assert reserved == [indexed]
    found_rows = []
    cells = ix.CellFinder.cells
    monkeypatch.setattr(
        ix.CellFinder, "cells", lambda self, x, n: found_rows.append(len(x)) or cells(self, x, n)
    )
    neighbours_stage(out, show_progress=False)
    with_kept = sum(found_rows)
    assert with_kept < indexed  # only the valid chunks' cells were found again
    assert "encoded_cells" not in read_manifest(out)["index"]
    assert not list((out / "index").glob("cells-*")) and not list((out / "index").glob("celldis-*"))
    first = {k: v for k, v in arrays(out).items() if k.startswith("neighbours/")}
    for path in (out / "neighbours").glob("*.npy"):  # again, now without kept cells
        path.unlink()
    found_rows.clear()
    neighbours_stage(out, show_progress=False)
    assert sum(found_rows) >= indexed
    assert {k: v for k, v in arrays(out).items() if k.startswith("neighbours/")} == first


def test_an_index_replaced_before_its_neighbour_stage_takes_its_kept_cells_along(inputs, tmp_path):
    """Kept cells belong to the index that encoded them: when a new index replaces it before
    the neighbour stage ended (`db add` after an interrupted build), they are deleted too."""
    from retrolm.database.build import _install_index
    from retrolm.database.manifest import load_manifest

    root, bert, corpus, reference = inputs
    config = tiny_config(bert, block_rows=25, index="IVF64,Flat")
    out = chunk_stage([corpus], tmp_path / "db", config, show_progress=False)
    embed_stage(out, show_progress=False)
    index_stage(out, show_progress=False)
    manifest = load_manifest(out)
    kept = manifest.index.encoded_cells
    files = [out / f for e in kept.values() for f in (e.cells_file, e.celldis_file)]
    assert files and all(f.is_file() for f in files)
    replacement = dataclasses.replace(manifest.index, encoded_cells=None)
    _install_index(out, manifest, replacement)
    assert not any(f.exists() for f in files)
    assert (out / replacement.file).is_file()  # the index file itself is still in use


def test_index_training_borrows_the_threads_of_the_waiting_local_ranks(
    inputs, tmp_path, monkeypatch
):
    """Rank 0 trains and tunes the index while the other ranks of its node wait at a barrier:
    it uses their threads too (LOCAL_WORLD_SIZE x its own, at most the cores), and its own
    again afterwards."""
    saved = torch.get_num_threads(), faiss.omp_get_max_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    try:
        torch.set_num_threads(2)
        faiss.omp_set_num_threads(2)
        for local, expected in (("4", 8), ("8", 8), ("1", 2)):  # 4 x 2; capped at the cores
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
            with node_threads() as threads:
                assert threads == torch.get_num_threads() == faiss.omp_get_max_threads()
                assert threads == expected
            assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (2, 2)
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        seen = []
        build_index = ix.build_index
        monkeypatch.setattr(
            ix,
            "build_index",
            lambda *a, **k: seen.append(torch.get_num_threads()) or build_index(*a, **k),
        )
        root, bert, corpus, reference = inputs
        out = chunk_stage([corpus], tmp_path / "db", tiny_config(bert), show_progress=False)
        embed_stage(out, show_progress=False)
        index_stage(out, show_progress=False)
        assert seen == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved[0])
        faiss.omp_set_num_threads(saved[1])


def test_auto_index_goes_on_disk_only_when_no_index_fits_memory():
    assert choose_layout(1_000_000, 384, 8 << 30) == ("IVF4096,SQ8", False)
    factory, ondisk = choose_layout(10_000_000, 384, 64 << 20)  # < 8-byte codes, > centroids
    assert ondisk and factory == "OPQ32_128,IVF32768,PQ32"
    with pytest.raises(UserError, match="index-memory"):
        choose_layout(10_000_000, 384, 1 << 10)


@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF32_HNSW8,SQ8"])
def test_ondisk_lists_merged_from_shards_search_like_the_in_memory_index(tmp_path, factory):
    x = clustered(8000, 16, seed=1)
    memory = ix.build_index(factory, 16, "ip", x[:4000], seed=0)
    trained = faiss.serialize_index(memory)
    blocks = []
    for start in range(0, 8000, 700):  # uneven blocks: shards hold several
        ids = np.arange(start, min(start + 700, 8000), dtype=np.int64)
        ix.add_vectors(memory, x[ids], ids)
        blocks.append((ix.encode_block(memory, x[ids]), ids))
    ondisk = merge_blocks_ondisk(
        faiss.deserialize_index(trained),
        iter(blocks),
        tmp_path / "lists.ivfdata",
        tmp_path / "shards",
        shard_bytes=100_000,
        load_trained=lambda: faiss.deserialize_index(trained),
    )
    assert not list((tmp_path / "shards").iterdir())  # the shards were merged and removed
    ix.save_index(ondisk, tmp_path / "index.faiss")
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("index.faiss", "lists.ivfdata"):  # a database folder can be moved
        (tmp_path / name).rename(moved / name)
    loaded = ix.load_index(moved / "index.faiss", ondisk=True)
    assert is_ondisk(loaded) and not is_ondisk(memory) and loaded.ntotal == 8000
    for params in ({"nprobe": 1}, {"nprobe": 8}):
        ix.apply_search_params(memory, params)
        ix.apply_search_params(loaded, params)
        want, got = ix.search(memory, x[::97], 10), ix.search(loaded, x[::97], 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_a_database_with_ondisk_lists_equals_one_in_memory(inputs, tmp_path, monkeypatch, capsys):
    import retrolm.database.ondisk as ondisk

    root, bert, corpus, reference = inputs
    monkeypatch.setattr(ondisk, "choose_layout", lambda n, d, budget: ("IVF4,Flat", True))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = tiny_config(bert, block_rows=25)  # --index auto: the patched layout, on disk
        folder = build_database([corpus], tmp_path / "db", config, show_progress=False)
    finally:
        torch.set_num_threads(before)
    record = Database.open(folder).manifest.index
    assert record.ondisk and (folder / record.ivfdata_file).is_file()
    for name, data in arrays(reference).items():
        if name.startswith("neighbours/"):
            assert arrays(folder)[name] == data, name
    db = Database.open(folder)
    assert is_ondisk(db.index)
    from retrolm.cli import main as cli_main

    assert cli_main(["db", "info", str(folder)]) == 0
    assert "on-disk inverted lists" in capsys.readouterr().out


# ----------------------------------------------------------------------------- embedding dtype


def test_auto_embed_dtype_is_measured_once_and_recorded(inputs, tmp_path):
    root, bert, corpus, reference = inputs
    folder = build_database(
        [corpus], tmp_path / "db", tiny_config(bert, block_rows=25), show_progress=False
    )
    choice = Database.open(folder).manifest.embeddings.dtype_choice
    assert choice["dtype"] == "float32" and choice["float32_s"] is None  # narrow: not timed
    # a recorded choice is what a resumed build uses, whatever a new measurement would say
    config = tiny_config(bert, block_rows=25)
    out = chunk_stage([corpus], tmp_path / "bf16", config, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["embeddings"]["dtype_choice"] = {"dtype": "bfloat16", "chunks": 0}
    (out / "manifest.json").write_text(json.dumps(manifest))
    embed_stage(out, show_progress=False)
    explicit = chunk_stage(
        [corpus], tmp_path / "explicit", tiny_config(bert, block_rows=25, embed_dtype="bfloat16"),
        show_progress=False,
    )  # fmt: skip
    embed_stage(explicit, show_progress=False)
    got, want = arrays(out), arrays(explicit)
    assert {k: v for k, v in got.items() if k.startswith("emb")} == {
        k: v for k, v in want.items() if k.startswith("emb")
    }
    float32 = arrays(folder)
    assert all(got[k] != float32[k] for k in got if k.startswith("emb"))  # bfloat16 differs


def test_measure_dtypes_picks_bfloat16_only_when_clearly_faster(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    wide = make_tiny_bert(tmp_path / "wide", hidden_size=128, intermediate_size=256)
    embedder = load_embedder(f"bert-mean:{wide}")
    choice = measure_dtypes(embedder, ["some words of text"] * 40, batch_size=16)
    assert embedder.dtype == "float32"  # left as it was
    assert choice["float32_s"] > 0 and choice["bfloat16_s"] > 0 and choice["chunks"] == 32
    faster = choice["bfloat16_s"] * 1.2 < choice["float32_s"]
    assert choice["dtype"] == ("bfloat16" if faster else "float32")


def test_the_dtype_choice_is_timed_once_per_machine(tmp_path, monkeypatch):
    import retrolm.database.embed as embed_module

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    wide = make_tiny_bert(tmp_path / "wide", hidden_size=128, intermediate_size=256)
    embedder = load_embedder(f"bert-mean:{wide}")
    timed = []
    real = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda *a, **k: timed.append(1) or real(*a, **k))
    texts, cache = ["some words of text"] * 40, tmp_path / "cache"
    first = choose_dtype(embedder, texts, 16, cache=cache)
    assert timed and "cached" not in first
    timed.clear()
    again = choose_dtype(embedder, texts, 16, cache=cache)
    assert not timed and again == {**first, "cached": True}
    choose_dtype(embedder, texts, 8, cache=cache)  # another batch size: timed again
    assert timed
    timed.clear()
    monkeypatch.setattr(embed_module, "cpu_model", lambda: "another processor")
    choose_dtype(embedder, texts, 16, cache=cache)  # another machine: timed again
    assert timed
    timed.clear()
    (cache / DTYPE_CACHE_FILE).write_text("{not json")  # damaged: timed over, then rewritten
    choose_dtype(embedder, texts, 16, cache=cache)
    assert timed and "another processor" in (cache / DTYPE_CACHE_FILE).read_text()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    untimed = choose_dtype(embedder, texts, 4, cache=cache)  # nothing measured: nothing kept
    assert untimed["chunks"] == 0 and "batch 4" not in (cache / DTYPE_CACHE_FILE).read_text()


def test_a_cpu_without_native_bf16_keeps_float32_without_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    wide = make_tiny_bert(tmp_path / "wide", hidden_size=128, intermediate_size=256)
    embedder = load_embedder(f"bert-mean:{wide}")

    def embed(*args, **kwargs):
        raise AssertionError("timed on a CPU without bf16")

    monkeypatch.setattr(embedder, "embed", embed)
    choice = measure_dtypes(embedder, ["some words of text"] * 40, batch_size=16)
    assert choice["dtype"] == "float32" and choice["float32_s"] is None
    assert "AVX2" in choice["reason"]


# ----------------------------------------------------------------------------- faults


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def records(folder: Path, stage: str) -> int:
    return len(list((folder / "records").glob(f"{stage}-*.json")))


KILL_POINTS = [
    ("mid-chunking", lambda f, m: m is not None and len(m["chunks"]["blocks"]) >= 2),
    ("mid-embedding", lambda f, m: records(f, "embeddings") >= 2),
    ("mid-encoding", lambda f, m: m is not None and m.get("index_build") is not None),
    ("mid-neighbours", lambda f, m: records(f, "neighbours") >= 2),
]


@pytest.mark.slow
def test_sigkill_of_the_launch_at_any_stage_then_rerun_gives_the_same_database(inputs):
    root, bert, corpus, reference = inputs
    out = root / "killed"
    cmd = command(corpus, out, bert, "--workers", "2", "--block-rows", "10")
    single = root / "single-10"
    assert subprocess.run(command(corpus, single, bert, "--block-rows", "10"),
                          env=environment()).returncode == 0  # fmt: skip
    for what, reached in KILL_POINTS:
        launch = subprocess.Popen(cmd, env=environment(), start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not reached(out, read_manifest(out)):
                assert launch.poll() is None, f"the build finished before {what}"
                assert time.monotonic() < deadline
                time.sleep(0.002)
        finally:
            os.killpg(launch.pid, signal.SIGKILL)  # the launcher and every rank
            launch.wait()
    done = subprocess.run(cmd, env=environment(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_database(out, single)


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_launch_and_a_rerun_resumes(inputs):
    root, bert, corpus, reference = inputs
    out = root / "rank-died"
    cmd = command(corpus, out, bert, "--workers", "2")
    launch = subprocess.Popen(cmd, env=environment(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while records(out, "embeddings") < 1:
        assert time.monotonic() < deadline and launch.poll() is None
        time.sleep(0.002)
    ranks = children(launch.pid)
    assert len(ranks) >= 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    assert launch.wait(timeout=120) != 0
    assert "failed" in launch.stderr.read()
    assert all(not Path(f"/proc/{r}").exists() for r in ranks)  # the other rank was stopped
    done = subprocess.run(cmd, env=environment(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_database(out, reference)
