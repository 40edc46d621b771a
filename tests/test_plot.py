"""Loss curves of several runs on one figure."""

from __future__ import annotations

import json

import pytest

from retrolm.cli import main as cli_main
from retrolm.errors import InputError
from retrolm.plot import plot_runs
from retrolm.train import train
from tests.test_train import make_source, tiny_config


def test_plot_several_runs(tmp_path):
    import matplotlib.image

    cfg = dict(max_steps=4, eval_every=2)
    a = train(tiny_config(**cfg), make_source(), tmp_path / "retro", show_progress=False)
    b = train(
        tiny_config(**cfg, no_retrieval=True), make_source(), tmp_path / "base", show_progress=False
    )
    with open(a / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a kill is skipped
    out = plot_runs([a, b], tmp_path / "loss.png", smooth=2)
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert not list(tmp_path.glob("*.tmp-*"))
    assert cli_main(["plot", str(a), str(b), "--out", str(tmp_path / "l.svg"), "--x", "step"]) == 0
    assert (tmp_path / "l.svg").read_text().lstrip().startswith("<?xml")


def test_plot_bad_inputs(tmp_path, capsys):
    with pytest.raises(InputError, match="metrics.jsonl"):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")
    a = tmp_path / "a"
    a.mkdir()
    (a / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(InputError, match="labels"):
        plot_runs([a], tmp_path / "x.png", labels=["one", "two"])
    assert cli_main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_noisy_train_loss_is_drawn_raw_and_smoothed(tmp_path):
    import numpy as np

    from retrolm.plot import _moving_average

    rng = np.random.default_rng(0)
    losses = (3 + rng.normal(0, 1.5, 200)).tolist()  # jumps of nats from step to step
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, start=1):
            f.write(json.dumps({"step": step, "tokens": 64 * step, "loss": loss}) + "\n")
    smoothed = _moving_average(losses, 5)
    expected = [np.mean(losses[max(0, i - 4) : i + 1]) for i in range(len(losses))]
    np.testing.assert_allclose(smoothed, expected)
    assert np.std(np.diff(smoothed)) < 0.5 * np.std(np.diff(losses))
    svg = plot_runs([run], tmp_path / "loss.svg", labels=["r"]).read_text()
    assert "r train (mean of 5)" in svg  # default window: 1/40 of the run
    raw = plot_runs([run], tmp_path / "raw.svg", labels=["r"], smooth=1).read_text()
    assert "mean of" not in raw


def _fake_run(folder, steps, tokens_per_step, retrofit=None):
    folder.mkdir()
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(
                json.dumps({"step": step, "tokens": tokens_per_step * step, "loss": 3.0}) + "\n"
            )
        f.write(json.dumps({"step": steps, "tokens": tokens_per_step * steps, "valid_loss": 2.5}))
    config = {"max_steps": steps} | ({"retrofit": str(retrofit)} if retrofit else {})
    (folder / "train_config.json").write_text(json.dumps(config))
    return folder


def test_a_retrofit_is_drawn_after_the_run_it_continues(tmp_path):
    from retrolm.plot import run_starts
    from retrolm.runs import read_metrics

    base = _fake_run(tmp_path / "base", 10, 64)
    fit = _fake_run(tmp_path / "fit", 4, 64, retrofit=base)
    again = _fake_run(tmp_path / "again", 2, 64, retrofit=fit / "model")  # a model folder
    alone = _fake_run(tmp_path / "alone", 3, 64, retrofit=tmp_path / "elsewhere")
    runs = [fit, base, again, alone]
    records = [read_metrics(r) for r in runs]
    assert run_starts(runs, records, "tokens") == [640, 0, 640 + 256, 0]
    assert run_starts(runs, records, "step") == [10, 0, 14, 0]
    assert run_starts([fit], records[:1], "tokens") == [0]  # its baseline is not drawn
    (fit / "train_config.json").write_text("[1, 2")  # damaged: drawn from 0, no error
    assert run_starts([fit, base], records[:2], "tokens") == [0, 0]
    svg = plot_runs([base, fit], tmp_path / "loss.svg", labels=["b", "f"], smooth=1)
    assert svg.stat().st_size > 0
