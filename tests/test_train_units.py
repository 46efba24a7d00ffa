"""Pieces of the training loop that stand alone: row order, optimizer groups, checkpoints, metrics."""

import json

import pytest
import torch

from insclr.config import load_config
from insclr.train import checkpoint
from insclr.train.metrics import Metrics, trim_after
from insclr.train.resume import candidates
from insclr.train.optim import build_optimizer, build_scheduler, param_groups
from insclr.train.step import amp_dtype, any_rank, global_order, set_train_mode


def reference_order(world, b, k):
    """Rank-ordered rows -> [all anchors (rank order), then all neighbours (rank order)], by hand."""
    rows = b * (k + 1)
    anchors, neighbours = [], []
    for r in range(world):
        anchors += [r * rows + i for i in range(b)]
        neighbours += [r * rows + b + j for j in range(b * k)]
    return anchors + neighbours


@pytest.mark.parametrize("world,b,k", [(1, 4, 3), (2, 2, 3), (4, 1, 2), (3, 2, 0)])
def test_global_order(world, b, k):
    assert global_order(world, b, k).tolist() == reference_order(world, b, k)


def test_global_order_rebuilds_section4_batch():
    # global batch of 4 anchors, K=2; rank r holds anchors [2r, 2r+2) and their neighbours
    anchors = torch.tensor([10, 20, 30, 40])
    neigh = torch.tensor([[11, 12], [21, 22], [31, 32], [41, 42]])
    single = torch.cat([anchors, neigh.reshape(-1)])
    ranks = [torch.cat([anchors[2 * r:2 * r + 2], neigh[2 * r:2 * r + 2].reshape(-1)]) for r in range(2)]
    assert torch.equal(torch.cat(ranks)[global_order(2, 2, 2)], single)


def _small_net():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    return model


def test_param_groups_original_rule_decays_all_but_biases():
    model = _small_net()
    decay, no_decay = param_groups(model, 1e-4)  # default: the original's name rule
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[1].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].bias), id(model[3].bias)}


def test_param_groups_norm_and_bias_exempts_1d():
    model = _small_net()
    decay, no_decay = param_groups(model, 1e-4, "norm_and_bias")
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, bn weight + bias, linear bias


def test_param_groups_learnable_gem_p_decayed_as_original():
    from insclr.model import RetrievalModel

    model = RetrievalModel("resnet18", "linear_norm", 8, gem_p="learn")
    decay, _ = param_groups(model, 1e-4)
    assert any(p is model.pool.p for p in decay["params"])  # "pool.p" has no "bias" in its name


def test_adam_l2_and_multistep():
    cfg = load_config(None, ["train.lr=0.1", "train.milestones=[2,4]", "train.weight_decay=0.5"]).train
    w = torch.nn.Parameter(torch.ones(2, 2))
    model = torch.nn.Module()
    model.w = w
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg)
    # L2, not decoupled: Adam's update sees grad + wd * w; with zero loss gradient its first step is -lr
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.allclose(w, torch.full((2, 2), 0.9))
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_amp_dtype_and_freeze_bn():
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="train.amp"):
        amp_dtype("fp8", cpu)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
    set_train_mode(model, freeze_bn=True)
    assert model.training and model[0].training and not model[1].training
    assert not any_rank(False, cpu) and any_rank(True, cpu)


def _save(tmp_path, step, value, keep=2):
    cfg = load_config(None, [f"train.out={tmp_path}"])
    return checkpoint.save(tmp_path, step, {"step": step, "v": value}, {"bank": torch.full((3,), value)},
                           {"rng": checkpoint.rng_state()}, cfg, keep=keep)


def test_checkpoint_latest_keep_and_stale_tmp(tmp_path):
    assert checkpoint.latest(tmp_path) is None and candidates("auto", tmp_path) == []
    for step in (10, 20, 30):
        _save(tmp_path, step, float(step))
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [20, 30]  # keep=2
    # a crash during the save of step 40 leaves a partial .tmp folder: ignored, then replaced
    partial = tmp_path / "ckpt" / ".tmp-step-00000040"
    partial.mkdir()
    (partial / "rank-0.pt").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path).name == "step-00000030"
    manifest, shared, banks, per_rank = checkpoint.load(checkpoint.latest(tmp_path))
    assert manifest["step"] == 30 and set(manifest["files"]) == {"state.pt", "banks.pt", "rank-0.pt", "config.yaml"}
    assert shared == {"step": 30, "v": 30.0} and torch.equal(banks["bank"], torch.full((3,), 30.0))
    _save(tmp_path, 40, 40.0)
    assert not partial.exists() and checkpoint.latest(tmp_path).name == "step-00000040"
    assert (checkpoint.latest(tmp_path) / "config.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        candidates(str(tmp_path / "nope"), tmp_path)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_metrics_resume_trims_later_steps(tmp_path):
    m = Metrics(tmp_path, True)
    for step in range(1, 6):
        m.log({"step": step, "loss": step / 10})
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # cut by a crash
    m = Metrics(tmp_path, True, start_step=3)
    m.log({"step": 4, "loss": 0.0})
    m.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    trim_after(tmp_path / "missing.jsonl", 3)  # nothing to trim: no error
