"""insclr.plot: the precision–recall interpolation against closed forms, the training figure and
its command on a metrics file."""

import json

import numpy as np
import pytest
from PIL import Image

from insclr.plot import eval_maps, main, mean_pr_curve, smooth, training_plot


def test_mean_pr_curve_closed_form():
    levels = np.array([0.0, 0.5, 0.6, 1.0])
    # query 1: hits at ranks 1 and 3 of 2 positives -> P = 1 up to recall 1/2, 2/3 up to 1
    # query 2: 1 of its 2 positives at rank 2 -> P = 1/2 up to recall 1/2, then never reached
    _, p = mean_pr_curve([[True, False, True], [False, True, False]], [2, 2], levels)
    np.testing.assert_allclose(p, [(1 + 0.5) / 2, (1 + 0.5) / 2, (2 / 3 + 0) / 2, (2 / 3 + 0) / 2])
    _, none = mean_pr_curve([[False]], [0], levels)  # no positives: left out
    assert (none == 0).all()


def test_smooth():
    np.testing.assert_allclose(smooth([1, 3, 5, 7], window=2), [1, 2, 4, 6])


def _records(n=50):
    rng = np.random.default_rng(0)
    out = [{"step": s, "loss": 1 / s + 0.1 * rng.random(), "batch_loss": 0.5 / s, "memory_loss": 0.5 / s,
            "batch_pos_per_row": 2.0, "batch_neg_per_row": 10.0, "selected": s % 5, "lr": 1e-3 * s / n,
            "images_per_s": 100 + rng.random()} for s in range(1, n + 1)]
    out.append({"step": n, "eval/roxford5k/mapM": 0.4, "eval/roxford5k/mapH": 0.2})
    return out


def test_training_plot(tmp_path):
    records = _records()
    titles = training_plot([r for r in records if "loss" in r], eval_maps(records), tmp_path / "c.png")
    assert titles == ["loss (moving average)", "positives and negatives per row", "selected pseudo-positives",
                      "learning rate", "throughput", "mAP at each evaluation"]
    assert eval_maps(records) == {"roxford5k Medium": [(50, 40.0)], "roxford5k Hard": [(50, 20.0)]}
    im = Image.open(tmp_path / "c.png")
    assert im.size == (1280, 1020)  # 2 × 3 panels of 6.4 × 3.4 inches at 100 dpi


def test_plot_command(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(10)) + '{"step": 1')
    assert main([str(run)]) == 0  # a last line cut by a crash is skipped
    assert (run / "training_curves.png").is_file() and "wrote" in capsys.readouterr().out
    (run / "metrics.jsonl").write_text('garbage\n{"step": 1}\n')
    assert main([str(run)]) == 2 and "metrics.jsonl:1" in capsys.readouterr().err
    assert main([str(tmp_path / "none")]) == 2


@pytest.mark.parametrize("depth", [1, 3])
def test_pr_curve_is_bounded(depth):
    _, p = mean_pr_curve([[True, False, True][:depth]], [2])
    assert ((0 <= p) & (p <= 1)).all() and p[0] == 1
