"""Atomic writes: a failed or interrupted write never replaces or half-writes the target."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrolm.io import (
    atomic_dir,
    atomic_open,
    read_json,
    remove_stale_tmp,
    save_npy,
    sha256_file,
    write_json,
)


def test_write_json_round_trip(tmp_path):
    path = tmp_path / "a" / "m.json"
    write_json(path, {"x": [1, 2], "y": "é"})
    assert read_json(path) == {"x": [1, 2], "y": "é"}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_failed_write_keeps_old_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write('{"v": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_dir_is_removed_on_failure_and_replaces_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"old")
    with pytest.raises(KeyError), atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"half")
        raise KeyError("boom")
    assert (target / "w.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"new")
    assert (target / "w.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_npy_checksum_matches_file(tmp_path):
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    digest = save_npy(tmp_path / "b.npy", a)
    assert digest == sha256_file(tmp_path / "b.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), a)


def test_remove_stale_tmp(tmp_path):
    (tmp_path / "block-0.npy.tmp-abc").write_bytes(b"partial")
    (tmp_path / "block-1.npy").write_bytes(b"done")
    assert remove_stale_tmp(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["block-1.npy"]
