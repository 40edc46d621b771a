"""quickstart: corpus subset and plan are deterministic, fit the budget, and are reused."""

from __future__ import annotations

import json
import random

import pytest

from retrolm.errors import InputError, MismatchError
from retrolm.quickstart import (
    PLAN_VERSION,
    QuickstartConfig,
    choose_valid,
    comparator_verdict,
    folder_redundancy,
    load_or_make_plan,
    select_files,
    stdlib_files,
)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for folder in ("a", "b", "c"):
        (root / folder).mkdir(parents=True)
        for i in range(10):
            (root / folder / f"f{i}.py").write_text(f"# {folder}{i}\n" + "x = 1\n" * (50 + 40 * i))
    return sorted(root.rglob("*.py"))


def test_stdlib_files_are_the_standard_library_only():
    files = stdlib_files()
    assert len(files) > 500
    assert all(f.suffix == ".py" for f in files)
    assert not [f for f in files if "site-packages" in f.parts]


def test_select_files_is_deterministic_and_fits_the_budget(corpus):
    budget = 6000
    a = select_files(corpus, budget, seed=0)
    assert a == select_files(list(reversed(corpus)), budget, seed=0)
    total = sum(p.stat().st_size for p in a)
    assert 0.9 * budget <= total <= budget
    # whole folders first: the subset is not spread thinly over every folder
    assert len({p.parent for p in a}) < 3
    assert select_files(corpus, budget, seed=1) != a


def test_select_files_takes_everything_under_a_large_budget(corpus):
    assert select_files(corpus, 10**9, seed=0) == sorted(corpus)


def test_the_most_redundant_folders_are_taken_first(tmp_path):
    rng = random.Random(0)
    shared = " ".join(f"w{rng.randrange(10**6)}" for _ in range(200))
    for folder in ("a_unique", "b_shared", "c_unique"):
        (tmp_path / folder).mkdir()
        for i in range(6):
            words = " ".join(f"w{rng.randrange(10**6)}" for _ in range(200))
            text = f"{words}\n{shared}\n" if folder == "b_shared" else f"{words}\n{words[::-1]}\n"
            (tmp_path / folder / f"f{i}.txt").write_text(text)
    files = sorted(tmp_path.rglob("*.txt"))
    redundancy = folder_redundancy(files)
    assert redundancy[tmp_path / "b_shared"] > 0.4
    assert redundancy[tmp_path / "a_unique"] < 0.05 and redundancy[tmp_path / "c_unique"] < 0.05
    one_folder = sum(p.stat().st_size for p in files if p.parent.name == "b_shared")
    for seed in range(4):  # whatever the seed, the shared folder wins
        chosen = select_files(files, one_folder, seed=seed)
        assert {p.parent.name for p in chosen} == {"b_shared"}


def test_choose_valid_holds_out_some_but_not_all(corpus):
    valid = choose_valid(corpus, fraction=0.05, seed=0)
    assert len(valid) == 3  # at least three files
    assert set(valid) < set(corpus)
    assert all(p.stat().st_size >= 1024 for p in valid)
    assert choose_valid(corpus, fraction=0.05, seed=0) == valid
    with pytest.raises(InputError, match="at least 2"):
        choose_valid(corpus[:1], fraction=0.5, seed=0)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="minutes"):
        QuickstartConfig(minutes=0.5)
    with pytest.raises(ValueError, match="--retriever dense: a quickstart with --base"):
        QuickstartConfig(base="smollm2", retriever="dense")  # never silently BM25 instead
    assert QuickstartConfig(base="smollm2").retriever == "bm25"


def test_cli_refuses_dense_retrieval_with_a_base(tmp_path, capsys):
    from retrolm.cli import main

    argv = ["quickstart", "--base", "smollm2", "--retriever", "dense", "--out", str(tmp_path / "q")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--retriever dense" in err
    assert not (tmp_path / "q").exists()


def test_a_stored_plan_is_reused_and_other_settings_are_refused(tmp_path):
    out = tmp_path / "qs"
    out.mkdir()
    cfg = QuickstartConfig(out=str(out), minutes=10)
    stored = {
        "version": PLAN_VERSION,
        "settings": {"corpus": [], "minutes": 10.0, "seed": 0, "retriever": "bm25"},
        "files": ["a.py"],
        "valid_files": ["a.py"],
        "corpus_bytes": 10,
        "retrieval_only": [],
        "retrieval_only_bytes": 0,
        "database": {},
        "model": {},
        "train": {},
        "eval": {},
        "compare": [],
        "retrofit_steps": 0,
        "max_new_tokens": 8,
        "measured": {},
        "estimate_seconds": {},
    }
    (out / "plan.json").write_text(json.dumps(stored))
    plan = load_or_make_plan(cfg, out, embedder=None)  # no measurement: the plan is reused
    assert plan.files == ["a.py"]
    with pytest.raises(MismatchError, match="other settings"):
        load_or_make_plan(QuickstartConfig(out=str(out), minutes=20), out, embedder=None)
    (out / "plan.json").write_text(json.dumps(stored | {"version": PLAN_VERSION - 1}))
    with pytest.raises(MismatchError, match="another retrolm version"):
        load_or_make_plan(cfg, out, embedder=None)


def test_missing_corpus_is_a_clear_error(tmp_path):
    from retrolm.cli import main

    assert (
        main(["quickstart", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    )


def test_the_report_fences_a_sample_in_its_files_language():
    from retrolm.quickstart import fence_language

    assert fence_language("/usr/lib/python3.11/email/utils.py") == "python"
    assert fence_language("/usr/share/perl/5.36.0/pod/perlre.pod") == "perl"
    assert fence_language("Documentation/admin-guide/README.rst") == "rst"
    assert fence_language("notes/README") == "" and fence_language("data.jsonl:12") == ""


def test_retrieval_only_files_are_the_rest_of_the_corpus_never_the_held_out(corpus, monkeypatch):
    import retrolm.quickstart as qs

    chosen = select_files(corpus, 6000, seed=0)
    valid = choose_valid(chosen, fraction=0.05, seed=0)
    extra = qs.retrieval_only_files(corpus, chosen)
    assert sorted(extra + chosen) == sorted(corpus) and not set(extra) & set(valid)
    rest_bytes = sum(p.stat().st_size for p in extra)
    monkeypatch.setattr(qs, "RETRIEVAL_ONLY_MAX_BYTES", rest_bytes // 2)
    capped = qs.retrieval_only_files(corpus, chosen)
    assert set(capped) < set(extra) and sum(p.stat().st_size for p in capped) <= rest_bytes // 2


def test_the_verdict_names_the_lowest_bits_per_byte_and_how_far_the_others_are():
    result = {"retro_bpb": 1.5, "ralm_bpb": 1.65, "knnlm_bpb": 1.2}
    (_, sentence) = comparator_verdict(result)
    assert sentence.startswith("Best use of the database: kNN-LM;")
    # 1.5 / 1.2 - 1 = 25.0%, 1.65 / 1.2 - 1 = 37.5%; nearest first
    assert "RETRO[ON] (25.0% higher), In-Context RALM (37.5% higher)" in sentence
    assert comparator_verdict({"retro_bpb": 1.5}) == []  # nothing to compare with


def test_a_measured_training_step_feeds_what_training_feeds(monkeypatch):
    """The planner times the step training runs: seq_len inputs (a complete last chunk, which
    the encoder and CCA read) with seq_len targets, and k neighbours per chunk."""
    from retrolm.config import RetroConfig
    from retrolm.model import RETRO
    from retrolm.quickstart import measure_train_step

    seen = []
    real_loss = RETRO.loss

    def loss(self, tokens, targets, neighbours=None):
        seen.append((tuple(tokens.shape), tuple(targets.shape), tuple(neighbours.shape)))
        return real_loss(self, tokens, targets, neighbours)

    monkeypatch.setattr(RETRO, "loss", loss)
    cfg = RetroConfig.preset("tiny", vocab_size=64)
    measure_train_step(cfg, batch=2, seq_len=64, k=2, bf16=False, retrofit=True)
    chunks = 64 // cfg.chunk_size
    assert seen and set(seen) == {((2, 64), (2, 64), (2, chunks, 2, cfg.neighbour_len))}


def test_the_plan_times_the_evaluation_in_the_precision_it_runs_in(tmp_path, monkeypatch):
    """Training may use bfloat16; the evaluation runs as `plan.eval` says, and its estimate
    comes from forward passes timed that way."""
    import retrolm.quickstart as qs

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"f{i}.py").write_text("def f(x):\n    return x + 1\n" * (20 + i))
    forward = []
    monkeypatch.setattr(qs, "measure_bm25", lambda texts: 50e-9)
    monkeypatch.setattr(qs, "measure_faiss", lambda dim: (1e-10, 1e-10))
    # bfloat16 steps twice as fast as float32: training takes bfloat16
    monkeypatch.setattr(
        qs, "measure_train_step", lambda cfg, b, s, k, bf16, retrofit=False: 0.5 if bf16 else 1.0
    )
    monkeypatch.setattr(
        qs, "measure_forward", lambda cfg, b, s, k, bf16: forward.append(bf16) or 0.1
    )
    cfg = qs.QuickstartConfig(out=str(tmp_path / "o"), corpus=[str(corpus)], retriever="bm25")
    plan = qs.make_plan(cfg, embedder=None)
    assert plan.train["bf16"] is True
    assert forward and set(forward) == {plan.eval.get("bf16", False)}
