"""The parity tool's pieces (no original code needed) and, where a developer has a checkout of the
original InsCLR (INSCLR_ORIGINAL=PATH), a short side-by-side run of both trainers."""

import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from insclr.bench.parity import launch_original as lo
from insclr.bench.parity import stats
from insclr.config import ModelConfig, load_config
from insclr.model import build_model

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "demo.yaml"


def test_mean_spread_and_welch_t_match_the_closed_forms():
    a, b = [11.0, 12.0, 13.0, 14.0], [10.0, 10.5, 11.0]
    assert stats.mean(a) == 12.5
    assert stats.spread(a) == pytest.approx(statistics.stdev(a), rel=1e-12)  # n - 1, as statistics.stdev
    t, dof = stats.welch_t(a, b)
    va, vb = statistics.variance(a) / 4, statistics.variance(b) / 3
    assert t == pytest.approx((12.5 - 10.5) / math.sqrt(va + vb), rel=1e-12)
    assert dof == pytest.approx((va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2), rel=1e-12)
    assert math.isnan(stats.welch_t([1.0], b)[0]) and stats.spread([3.0]) == 0.0


def test_table_has_a_row_per_seed_then_mean_spread_t():
    rows = {0: {"ours": {"x": 1.0}, "original": {"x": 2.0}}, 1: {"ours": {"x": 3.0}, "original": {"x": 4.0}}}
    lines = stats.table(rows, ["x"], ["ours", "original"]).splitlines()
    assert lines[0] == "| seed | ours x | original x |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["0", "1", "mean", "spread", "t"]
    assert lines[4] == "| mean | 2.00 | 3.00 |"
    assert lines[6].split("|")[2].strip() == f"{-1 / math.sqrt(2 * 2 / 2):.2f}"


@pytest.mark.parametrize("head", ["linear_norm", "norm_linear_norm"])
def test_weight_mapping_round_trips_and_names_the_original_layout(head):
    model = build_model(ModelConfig(arch="resnet18", head=head, dim=16, init="random"))
    theirs = lo.to_original(model.state_dict())
    assert "backbone.conv1.weight" in theirs and "backbone.layer4.1.bn2.running_var" in theirs
    assert "combiner.head.fc.weight" in theirs and ("combiner.head.fc.bias" in theirs) == (head == "linear_norm")
    assert not any(k.startswith(("trunk.", "head.")) for k in theirs)
    back = lo.from_original({"module." + k: v for k, v in theirs.items()})  # DataParallel prefix too
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    with pytest.raises(KeyError, match="combiner.attention"):
        lo.from_original({"combiner.attention_head.fc.weight": torch.zeros(1)})


def test_options_follow_our_config(tmp_path):
    cfg = load_config(CONFIG, ["data.shards=x", "data.pool=y"])
    opts = lo.original_options(cfg, "out/run_", "n.npz", "init.pth", workers=1, num_images=2195)
    assert opts["INPUT.TRAIN_IMG_SIZE"] == (96, 96) and opts["MODEL.HEAD.IN_DIM"] == 512
    assert (opts["XBM.START_STEP"], opts["XBM.GET_STEP"], opts["XBM.GET_SIZE"]) == (300, 400, 256)
    assert opts["XBM.SIZE"] == 2195 and opts["SOLVER.STEPS"] == [450] and opts["NEIGHBOR.K"] == 1
    assert opts["TEST.TEST_PERIOD"] > cfg.train.steps  # its evaluators never run
    with pytest.raises(ValueError, match="selection.mode=fixed"):
        lo.original_options(load_config(CONFIG, ["selection.mode=fixed", "noaug.enabled=true"]), "o", "n", "i", 1, 1)
    # yacs keys keep the original's types: an int default takes 3 from 3.0, a float one 1 as 1.0
    defaults = {"MODEL": {"POOL": {"GMP": {"P": 3}}}, "SOLVER": {"BASE_LR": 1e-3}}
    assert type(lo.coerce(defaults, "MODEL.POOL.GMP.P", 3.0)) is int
    assert type(lo.coerce(defaults, "SOLVER.BASE_LR", 1)) is float
    with pytest.raises(ValueError, match="integer"):
        lo.coerce(defaults, "MODEL.POOL.GMP.P", 2.5)


def test_neighbour_file_and_image_order(tmp_path):
    from insclr.io import save_npz

    save_npz(tmp_path / "pool.npz", neighbors=np.array([[1, 2], [0, 2], [0, 1]], dtype=np.int32),
             similarities=np.ones((3, 2), dtype=np.float16))
    assert lo.write_neighbors(tmp_path / "pool.npz", tmp_path / "n.npz") == 3
    with np.load(tmp_path / "n.npz") as f:
        assert f["neighbor"].tolist() == [[1, 2], [0, 2], [0, 1]]
    src = tmp_path / "gldv2"
    (src / "train" / "a").mkdir(parents=True)
    few, many = " ".join(f"f{i}" for i in range(3)), " ".join(f"m{i:02d}" for i in range(15))
    (src / "train_clean.csv").write_text(f"landmark_id,images\n7,{few}\n9,{many}\n")
    work = tmp_path / "work"
    lo.link_gldv2(src, work)
    assert (work / "datasets" / "gldv2" / "a").resolve() == (src / "train" / "a").resolve()
    assert lo.original_ids(work) == [f"m{i:02d}" for i in range(15)]  # landmarks under 15 images dropped


def test_the_stand_in_writer_logs_one_record_per_step(tmp_path):
    import json

    writer = lo._Writer(tmp_path)
    for step in (1, 2):
        writer.add_scalar("loss", torch.tensor(step * 0.5), step)
        writer.add_scalar("memory/loss", 0.0, step)
        writer.flush()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 0.5, "memory/loss": 0.0}, {"step": 2, "loss": 1.0, "memory/loss": 0.0}]


ORIGINAL = os.environ.get("INSCLR_ORIGINAL", "")


@pytest.mark.skipif(not (Path(ORIGINAL) / "tools" / "train_net.py").is_file(),
                    reason="needs a checkout of justforforfor/insclr in INSCLR_ORIGINAL (and yacs)")
def test_both_trainers_run_side_by_side(tmp_path):
    from insclr.shard import main as shard_main
    from insclr.synth import generate

    generate(tmp_path / "synth", seed=0, scale="tiny", datasets=["gldv2", "roxford5k", "rparis6k"])
    for name in ("gldv2", "roxford5k", "rparis6k"):
        assert shard_main([name, "--src", str(tmp_path / "synth" / name), "--out", str(tmp_path / "shards" / name)]) == 0
    sys.path.insert(0, str(HERE))
    from train_loop_helper import label_pool

    label_pool(tmp_path / "shards" / "gldv2", tmp_path / "pool.npz", k=8)
    argv = [sys.executable, "-m", "insclr.bench", "parity", "--original", ORIGINAL, "--config", str(CONFIG),
            "--gldv2", str(tmp_path / "synth" / "gldv2"), "--shards-root", str(tmp_path / "shards"),
            "--pool", str(tmp_path / "pool.npz"), "--seeds", "0,1", "--jobs", "2", "--steps", "5", "--size", "96",
            "--out", str(tmp_path / "out"), "--json", str(tmp_path / "parity.json"),
            "--set", "data.size=64", "--set", "memory.start_step=2", "--set", "memory.get_step=3",
            "--set", "memory.get_size=16", "--set", "train.milestones=[4]"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| 1 |" in proc.stdout and "| t |" in proc.stdout
    import json

    figures = json.loads((tmp_path / "parity.json").read_text())
    assert math.isfinite(figures["ratio"]) and set(figures["seeds"]["0"]) == {"ours", "original"}
    metrics = (tmp_path / "out" / "original" / "seed-0" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 5 and "memory/loss" in metrics[-1]  # the original's bank took part
